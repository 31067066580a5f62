"""What one training stage hands to the next, and to the evaluation tools: the model a run ends with, written as the
changes it made on top of its base model.

Unified-GRPO runs as a chain (decoder SFT -> captioner SFT -> cold start -> GRPO on the captioner -> Flow-GRPO on the
decoder), each stage starting exactly where the previous one ended. Every checkpoint of every stage holds a `model/`
folder:

    model/handoff.json        the manifest below
    model/lvlm_adapter_<i>/   PEFT adapters of the LVLM, oldest first (i = position in the stack)
    model/dit_adapter_<i>/    PEFT adapters of the DiT, oldest first
    model/dit_adapter_<i>_ema/  the EMA of the newest DiT adapter, when the stage that trained it kept one
    model/connector.safetensors  the connector, once a stage has trained it (else the base's)
    model/dit.safetensors     full DiT weights, once a stage has trained every DiT parameter (`--lora-rank 0`)
    model/lvlm.safetensors    full LVLM weights (vision tower, merger, LM), once a stage has trained every LVLM
                              parameter (train/sft_captioner.py --lora-rank 0)

The base is what the run loaded before any stage touched it: the UAE release (its own LoRA adapters included) or
plain parts, or the tiny preset and its seed; the manifest records it and a later stage on another base is refused.
Adapters are STACKED, never merged: loading a handoff wraps the base with each adapter in turn and freezes it
(`model.lora.freeze_lora`), so a stage's new trainable adapter sits on top of every earlier one, the RL reference
policy (new adapter off) is exactly the model the stage started from, and no delta is rounded into bf16 weights.
Adapters and the connector are loaded in the dtype they were saved in, the one they were trained in (fp32 adapters on
a bf16 model), so a stage's first forward equals the previous stage's last bit for bit. A stage that trains every DiT
(LVLM) weight first merges the stack below it (`unwrap_lora(merge=True)`); its `dit.safetensors` (`lvlm.safetensors`)
then replaces the base DiT (LVLM) and the adapters it absorbed, the release's own included; the manifest's base stays
the one the run loaded (the configs, tokenizer and other parts the weights belong with).

GRPO on the captioner trains its adapter against a frozen decoder, whose text path is the LVLM itself: its manifest
lists that adapter under `captioner_only`, and loading a handoff tells the UAE to encode text for the DiT without it
(`UAE.captioner_only`), so every later stage and evaluation tool pairs the new captions with the decoder that was
frozen. A stage that trains every LVLM weight cannot keep that split and refuses such a handoff.

Files a stage inherits are hard-linked into each of its checkpoints (copied across file systems): every
checkpoint is self-contained, so `--resume`, `--init` and the evaluation tools read one folder.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from weights import CheckpointError, load_module, open_checkpoint, read_json, save_safetensors

FOLDER = "model"
MANIFEST = "handoff.json"
FORMAT = "uae-handoff/1"
CONNECTOR_FILE = "connector.safetensors"
DIT_FILE = "dit.safetensors"
LVLM_FILE = "lvlm.safetensors"
# The paths that say which base model a run started from (the release folder or plain parts), as the training
# scripts and eval tools name their options; without any, the tiny preset and its seed.
BASE_PARTS = ("uae", "lvlm", "sd3", "dit", "connector", "pooled", "llm_lora", "dit_lora")
BASE_OPTIONS = BASE_PARTS + ("tiny_seed",)


def base_identity(tiny_seed: int | None = None, **paths: str | os.PathLike | None) -> dict:
    """The base model as a comparable dict: absolute paths of the given parts (release folder `uae` or plain
    parts), or the tiny preset's seed when no path is given."""
    unknown = set(paths) - set(BASE_PARTS)
    if unknown:
        raise ValueError(f"unknown base part(s) {sorted(unknown)}; expected {BASE_PARTS}")
    given = {k: str(Path(v).resolve()) for k, v in paths.items() if v}
    return {k: given.get(k) for k in BASE_PARTS} | {"tiny_seed": None if given else tiny_seed}


def _option_name(key: str) -> str:
    return "--seed (of the tiny preset)" if key == "tiny_seed" else "--" + key.replace("_", "-")


@dataclass
class Handoff:
    """A `model/` folder's manifest. Adapter entries are folder names inside `folder`, oldest first; `trained`
    names what the run that wrote it trained itself (the newest lvlm / dit adapter, the connector, the dit / lvlm
    weights), the rest it inherited; `captioner_only` the LVLM adapters the decoder's text encoding leaves off."""
    folder: Path
    base: dict
    lvlm_adapters: list[str] = field(default_factory=list)
    dit_adapters: list[str] = field(default_factory=list)
    dit_ema_adapter: str | None = None
    captioner_only: list[str] = field(default_factory=list)
    connector: str | None = None
    dit_weights: str | None = None
    lvlm_weights: str | None = None
    trained: list[str] = field(default_factory=list)
    stages: list[dict] = field(default_factory=list)

    def check_base(self, base: dict, what: str = "this run") -> None:
        """Refuse to put this handoff on another base model, naming each option that differs."""
        diff = [k for k in BASE_OPTIONS if self.base.get(k) != base.get(k)]
        if diff:
            shown = "; ".join(f"{_option_name(k)}: {self.base.get(k)!r} there, {base.get(k)!r} for {what}"
                              for k in diff)
            raise ValueError(f"{self.folder.parent} was trained on another base model ({shown}); pass the same "
                             f"base model options as the run that wrote it")

    def inherited(self) -> "Handoff":
        """The part a resumed run inherited: without the adapters it trained itself (it re-creates those as
        trainable and loads their values from its checkpoint) and without its own entry in `stages`. A trained
        connector or DiT / LVLM weights stay: they are the run's current values and are loaded as such."""
        lvlm, dit, ema = list(self.lvlm_adapters), list(self.dit_adapters), self.dit_ema_adapter
        if "lvlm_adapter" in self.trained:
            lvlm.pop()  # and out of captioner_only below: the resumed run marks it again as it re-creates it
        if "dit_adapter" in self.trained:
            dit.pop()
            ema = None
        return replace(self, lvlm_adapters=lvlm, dit_adapters=dit, dit_ema_adapter=ema, stages=self.stages[:-1],
                       captioner_only=[n for n in self.captioner_only if n in lvlm],
                       trained=[t for t in self.trained if t not in ("lvlm_adapter", "dit_adapter")])

    def trained_adapter(self, component: str, ema: bool = False) -> Path:
        """The folder of the adapter the writing run trained on `component` ('lvlm' or 'dit')."""
        if f"{component}_adapter" not in self.trained:
            raise ValueError(f"{self.folder}: the run that wrote it trained no {component} adapter "
                             f"(it trained {self.trained or 'nothing'})")
        if ema:
            if component != "dit" or self.dit_ema_adapter is None:
                raise ValueError(f"{self.folder}: no EMA adapter for {component}")
            return self.folder / self.dit_ema_adapter
        return self.folder / (self.lvlm_adapters if component == "lvlm" else self.dit_adapters)[-1]


# A run folder holds step_XXXXXXXX/ checkpoints; a checkpoint counts only once its COMPLETE marker is written (the
# last file of a save, train/common.save_checkpoint), which lists every file with its size in bytes, so a checkpoint
# truncated or partly overwritten since is told apart from a good one without reading the weights.
COMPLETE = "COMPLETE"


def write_complete_marker(folder: Path, step: int) -> None:
    files = {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*")) if f.is_file()}
    (folder / COMPLETE).write_text(json.dumps({"step": step, "files": files}, indent=1))


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` is not a complete checkpoint, or None when it is."""
    marker = folder / COMPLETE
    if not marker.is_file():
        return f"{folder}: no {COMPLETE} marker (a save that did not finish)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        files = {}  # written before the marker listed the files: only its presence is known
    for name, size in files.items():
        f = folder / name
        if not f.is_file():
            return f"{f}: missing (the save recorded {size} bytes)"
        if f.stat().st_size != size:
            return f"{f}: {f.stat().st_size} bytes, the save wrote {size} (truncated or replaced since)"
    return None


def run_checkpoints(run: Path) -> list[tuple[Path, str | None]]:
    """The checkpoints of a run folder, newest step first, each with `checkpoint_problem` (None: complete)."""
    steps = sorted((p for p in Path(run).glob("step_*") if p.is_dir() and p.name[5:].isdigit()),
                   key=lambda p: int(p.name[5:]), reverse=True)
    return [(p, checkpoint_problem(p)) for p in steps]


def find_handoff(path: str | os.PathLike) -> Path:
    """The `model/` folder of a run folder (its newest complete checkpoint), of a checkpoint folder, or the folder
    itself."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist (expected a run folder, a checkpoint folder or its model/)")
    found = run_checkpoints(p)
    if found:
        complete = [c for c, problem in found if problem is None]
        if not complete:
            raise CheckpointError(f"{p}: no complete checkpoint ({'; '.join(problem for _, problem in found)})")
        p = complete[0]
    elif (p / COMPLETE).exists() and checkpoint_problem(p) is not None:
        raise CheckpointError(checkpoint_problem(p))
    for cand in (p, p / FOLDER):
        if (cand / MANIFEST).is_file():
            return cand
    raise CheckpointError(f"{p} holds no {FOLDER}/{MANIFEST}: not a run or checkpoint folder written by this "
                          f"project's training scripts")


def read_handoff(path: str | os.PathLike) -> Handoff:
    folder = find_handoff(path)
    try:
        raw = read_json(folder / MANIFEST)
    except (OSError, CheckpointError) as e:  # both name the file
        raise CheckpointError(f"unreadable manifest: {e}") from None
    if raw.pop("format", None) != FORMAT:
        raise CheckpointError(f"{folder / MANIFEST}: not a {FORMAT} manifest")
    try:
        h = Handoff(folder=folder, **raw)
    except TypeError as e:
        raise CheckpointError(f"{folder / MANIFEST}: bad manifest: {e}") from None
    strays = [n for n in h.captioner_only if n not in h.lvlm_adapters]
    if strays:
        raise CheckpointError(f"{folder / MANIFEST}: captioner_only names {strays}, which are not LVLM adapters")
    names = h.lvlm_adapters + h.dit_adapters + [n for n in (h.dit_ema_adapter, h.connector, h.dit_weights,
                                                            h.lvlm_weights) if n]
    missing = [n for n in names if not (folder / n).exists()]
    if missing:
        raise CheckpointError(f"{folder}: the manifest lists {missing}, which are not there")
    return h


def load_handoff(uae, handoff: Handoff, ema: bool = False) -> None:
    """Put `handoff` onto `uae` (built from the same base; call `handoff.check_base` first): the DiT and LVLM weights
    and the connector replace the base's, then every adapter is loaded and frozen, oldest first. ema=True takes the
    newest DiT adapter's EMA in its place when there is one (what evaluation uses). The levels of the captioner-only
    LVLM adapters join `uae.captioner_only`."""
    from model.lora import WEIGHTS_NAME, freeze_lora, load_lora, lora_layers, unwrap_lora

    f = handoff.folder
    if handoff.dit_weights:
        unwrap_lora(uae.dit, merge=False)  # the full weights already hold every adapter below them
        load_module(uae.dit, f / handoff.dit_weights, device=uae.device)
    if handoff.lvlm_weights:
        unwrap_lora(uae.lvlm, merge=False)  # the release's LLM adapter included
        load_module(uae.lvlm, f / handoff.lvlm_weights, device=uae.device)
    if handoff.connector:
        file = f / handoff.connector
        load_module(uae.connector, file, dtype=_saved_dtype(file), device=uae.device)
    dit_adapters = list(handoff.dit_adapters)
    if ema and handoff.dit_ema_adapter:
        dit_adapters[-1] = handoff.dit_ema_adapter
    for module, names in ((uae.lvlm, handoff.lvlm_adapters), (uae.dit, dit_adapters)):
        for name in names:
            load_lora(module, f / name, dtype=_saved_dtype(f / name / WEIGHTS_NAME))
            if module is uae.lvlm and name in handoff.captioner_only:
                uae.captioner_only += lora_layers(module).values()
            freeze_lora(module)


def _saved_dtype(file: Path) -> torch.dtype:
    """The dtype a file's tensors were saved in: what the stage that wrote them trained in."""
    ckpt = open_checkpoint(file)
    return ckpt[next(iter(ckpt))].dtype


def save_handoff(folder: str | os.PathLike, uae, *, base: dict, stage: str, run: str | os.PathLike, step: int,
                 inherited: Handoff | None, trains: tuple[str, ...], dit_ema=None,
                 connector_state: dict | None = None, dit_state: dict | None = None,
                 captioner_only: bool = False) -> Handoff:
    """Write `folder` (a checkpoint's `model/`): what `inherited` holds, plus what this stage trains.

    trains: any of "lvlm_adapter" / "dit_adapter" (the active LoRA adapter of uae.lvlm / uae.dit), "connector",
    "dit_weights" / "lvlm_weights" (every DiT / LVLM parameter). dit_ema: a context manager factory that swaps the
    EMA values into the DiT adapter (train.rl.EMA.swap). connector_state / dit_state: full state dicts to write
    instead of the modules' (FSDP2 gathers them). captioner_only: the trained LVLM adapter is one the decoder's text
    encoding leaves off (GRPO on the captioner against a frozen decoder). Inherited files are hard-linked (copied
    across file systems)."""
    from model.lora import save_lora

    bad = set(trains) - {"lvlm_adapter", "dit_adapter", "connector", "dit_weights", "lvlm_weights"}
    if bad:
        raise ValueError(f"unknown trained part(s) {sorted(bad)}")
    if captioner_only and "lvlm_adapter" not in trains:
        raise ValueError("captioner_only marks the trained LVLM adapter, but this stage trains none")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    src = inherited or Handoff(folder=folder, base=base)
    if inherited is not None:
        inherited.check_base(base)
    h = Handoff(folder=folder, base=base, trained=list(trains),
                stages=src.stages + [{"stage": stage, "run": str(Path(run).resolve()), "step": step}])

    def link(name: str) -> str:
        _link_or_copy(src.folder / name, folder / name)
        return name

    if "dit_weights" in trains:  # merged: the inherited DiT adapters live inside these weights now
        save_safetensors(dit_state if dit_state is not None else uae.dit.state_dict(), folder / DIT_FILE)
        h.dit_weights = DIT_FILE
    else:
        h.dit_weights = link(src.dit_weights) if src.dit_weights else None
        h.dit_adapters = [link(n) for n in src.dit_adapters]
    if "connector" in trains:
        save_safetensors(connector_state if connector_state is not None else uae.connector.state_dict(),
                         folder / CONNECTOR_FILE)
        h.connector = CONNECTOR_FILE
    else:
        h.connector = link(src.connector) if src.connector else None
    if "lvlm_weights" in trains:  # merged: the inherited LVLM adapters live inside these weights now
        save_safetensors(_each_tensor_once(uae.lvlm), folder / LVLM_FILE)
        h.lvlm_weights = LVLM_FILE
    else:
        h.lvlm_weights = link(src.lvlm_weights) if src.lvlm_weights else None
        h.lvlm_adapters = [link(n) for n in src.lvlm_adapters]
        h.captioner_only = list(src.captioner_only)
    if "dit_adapter" not in trains and src.dit_ema_adapter and "dit_weights" not in trains:
        h.dit_ema_adapter = link(src.dit_ema_adapter)
    if "lvlm_adapter" in trains:
        name = f"lvlm_adapter_{len(h.lvlm_adapters)}"
        save_lora(uae.lvlm, folder / name)
        h.lvlm_adapters.append(name)
        if captioner_only:
            h.captioner_only.append(name)
    if "dit_adapter" in trains:
        name = f"dit_adapter_{len(h.dit_adapters)}"
        save_lora(uae.dit, folder / name)
        h.dit_adapters.append(name)
        if dit_ema is not None:
            with dit_ema():
                save_lora(uae.dit, folder / f"{name}_ema")
            h.dit_ema_adapter = f"{name}_ema"
    manifest = {"format": FORMAT, **{k: v for k, v in asdict(h).items() if k != "folder"}}
    tmp = folder / f".{MANIFEST}.tmp.{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, folder / MANIFEST)
    return h


def _each_tensor_once(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`module`'s state dict with a tied parameter under its first name only (Qwen2.5-VL-3B's lm_head is its token
    embedding): safetensors refuses tensors that share memory, and load_module re-ties the other names."""
    seen, out = set(), {}
    for name, t in module.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = t.detach()
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link a file or every file of a folder (the sources are never rewritten in place: saves replace files
    by rename), copying where the file system refuses links."""
    if src.is_dir():
        dst.mkdir(parents=True, exist_ok=True)
        for child in src.iterdir():
            _link_or_copy(child, dst / child.name)
        return
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
