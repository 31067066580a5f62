"""What every training script shares: options from argv, torch.distributed setup, seeding, metrics, the
non-finite guard and atomic, resumable checkpoints.

The scripts stay single files that read top to bottom; anything here is plumbing with no algorithm in it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from model.handoff import BASE_PARTS

# ----------------------------------------------------------------------------------------------- options from argv

def parse_options(cls, argv: list[str] | None = None, description: str | None = None):
    """Build an argparse parser from a dataclass of options: `--name value` for every field, `--flag/--no-flag` for
    booleans; `--help` lists each option with its default and the field's docstring-style comment if any."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        origin = typing.get_origin(kind)
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            args = [a for a in typing.get_args(kind) if a is not type(None)]
            kind = args[0]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", " ")
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=kind, default=default, help=help_text)
    return cls(**vars(parser.parse_args(argv)))


def option(default, help: str):
    """A dataclass field with a help text for `--help`."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass
class RunOptions:
    """Options every training script takes; each script's Options extends this and may change defaults."""
    uae: str = option("", "UAE release folder (llm_model/ llm_lora/ dit/ dit_lora/ SD3/); empty and no plain parts "
                          "= the tiny random preset (seeded by --seed)")
    lvlm: str = option("", "plain parts: a Qwen2.5-VL folder (overrides the release's)")
    sd3: str = option("", "plain parts: an SD3/SD3.5 diffusers folder (transformer/, vae/)")
    dit: str = option("", "plain parts: a transformer folder replacing --sd3's")
    connector: str = option("", "plain parts: a connector file (default: the projector inside --lvlm)")
    pooled: str = option("", "plain parts: a .safetensors holding 'pooled_projections' (default: from --sd3's CLIPs)")
    llm_lora: str = option("", "plain parts: an LVLM LoRA (release llm_lora/ layout), kept frozen")
    dit_lora: str = option("", "plain parts: a DiT LoRA (PEFT folder), kept frozen")
    init: str = option("", "start from a previous stage's result: its run folder (latest checkpoint) or a checkpoint "
                           "folder; its adapters stack frozen under this stage's, its connector replaces the base's")
    data: str = option("", "folder or JSONL of images (with captions where the stage needs them); "
                           "empty = procedurally generated scenes")
    procedural_images: int = option(1000, "how many procedural scenes when --data is empty")
    out: str = option("runs/train", "run folder: metrics.jsonl, checkpoints, adapters")
    resume: bool = option(False, "continue from the latest checkpoint in --out")
    steps: int = option(30, "optimizer steps")
    size: int = option(64, "image size in pixels")
    lr: float = option(1e-4, "AdamW learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    grad_clip: float = option(1.0, "gradient norm clip")
    lora_rank: int = option(32, "LoRA rank")
    lora_alpha: float = option(64.0, "LoRA alpha")
    dtype: str = option("fp32", "fp32 | bf16 model weights")
    device: str = option("auto", "auto | cpu | cuda")
    grad_checkpointing: bool = option(False, "activation checkpointing")
    attention: str = option("sdpa", "sdpa | triton: attention backend of every model (triton: kernels/attention.py)")
    seed: int = option(0, "seed of every random draw")
    save_every: int = option(10, "checkpoint every N steps (and at the end)")
    max_bad_steps: int = option(5, "stop after this many non-finite steps in a row")


# ----------------------------------------------------------------------------------------------- distributed

@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> Dist:
    """Join the torchrun process group (gloo on CPU, nccl on CUDA); a plain `python script.py` is a world of one."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world,
                                device_id=dev if device == "cuda" else None)
    return Dist(rank, world, local_rank, dev)


def close_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equally-shaped tensors from every rank along dim 0, in rank order (identity for one process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def global_max(n: int) -> int:
    """The largest `n` over ranks (identity for one process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return n
    t = torch.tensor([n], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def encode_text(uae, texts: list[str]) -> torch.Tensor:
    """`uae.encode_text` padded to the longest text of all ranks: the DiT has no text mask (the released convention),
    so the padding a text gets changes its image, and global padding keeps N processes equal to one process with
    the same global batch."""
    return uae.encode_text(texts, pad_to=global_max(uae.generate_ids(texts)[0].shape[1]))


def condition(uae, prompts: list[str], guidance_scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`uae.condition` (the negative prompt padded together with the positives) padded like `encode_text`."""
    from model.uae import NEGATIVE_PROMPT

    padded_together = ([NEGATIVE_PROMPT] if guidance_scale > 1.0 else []) + list(prompts)
    return uae.condition(prompts, guidance_scale, pad_to=global_max(uae.generate_ids(padded_together)[0].shape[1]))


def reduce_stats(rows: list[dict[str, torch.Tensor | float]]) -> dict[str, float]:
    """Combine per-step statistics (one dict per micro-step, same keys) over the rows and over ranks: keys ending in
    `_min` take the minimum, `_max` the maximum, everything else the mean (each rank holds an equal share). Every rank
    gets the same numbers, so skip decisions agree and rank 0 logs what one process would."""
    if not rows:
        return {}
    names = list(rows[0])
    table = torch.tensor([[float(r[k]) for k in names] for r in rows], dtype=torch.float64)
    mins = torch.tensor([n.endswith("_min") for n in names])
    maxs = torch.tensor([n.endswith("_max") for n in names])
    mean, low, high = table.mean(0), table.amin(0), table.amax(0)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(mean)
        mean /= dist.get_world_size()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
    out = torch.where(mins, low, torch.where(maxs, high, mean))
    return dict(zip(names, out.tolist()))


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average the gradients of the trained parameters over ranks (what DDP does for adapter training, written out so
    that one and several processes run the same code path and give the same result)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def split_for_rank(n_global: int, d: Dist, what: str) -> slice:
    """The contiguous slice of a global batch this rank owns; the global size must divide across ranks."""
    if n_global % d.world:
        raise ValueError(f"{what}={n_global} does not divide across {d.world} ranks")
    per = n_global // d.world
    return slice(d.rank * per, (d.rank + 1) * per)


# ----------------------------------------------------------------------------------------------- seeding, dtype

def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of one step's global random draws (data noise, sampling seeds): a function of (seed, step)
    only, so a resumed run and any number of ranks draw exactly what an uninterrupted single process draws."""
    return torch.Generator().manual_seed(seed * 100_003 + step)


def parse_dtype(name: str) -> torch.dtype:
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"--dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]


# ----------------------------------------------------------------------------------------------- metrics

class MetricsLogger:
    """One line per step to stdout (rank 0) and one JSON object per step to `path` (rank 0), with s/step and ETA."""

    def __init__(self, path: str | Path | None, total_steps: int, is_main: bool = True, start_step: int = 0):
        """start_step > 0 (a resumed run): append to the existing file, first dropping rows logged after
        `start_step` (the checkpoint the run resumes from), so that it equals an uninterrupted run's file."""
        resume = start_step > 0
        self.total = total_steps
        self.is_main = is_main
        self.file = None
        if is_main and path is not None:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            if resume and path.exists():
                kept = [line for line in path.read_text().splitlines()
                        if line.strip() and json.loads(line).get("step", 0) <= start_step]
                tmp = path.with_name(path.name + f".tmp.{os.getpid()}")
                tmp.write_text("".join(line + "\n" for line in kept))
                os.replace(tmp, path)
            self.file = open(path, "a" if resume else "w")
        self.last = time.perf_counter()

    def log(self, step: int, metrics: dict) -> None:
        now = time.perf_counter()
        sec = now - self.last
        self.last = now
        if not self.is_main:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}, "s_per_step": round(sec, 4)}
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        eta = sec * max(self.total - step, 0)
        shown = " ".join(f"{k} {_fmt(v)}" for k, v in row.items() if k != "step")
        print(f"step {step}/{self.total} {shown} eta {_duration(eta)}", flush=True)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _plain(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _duration(sec: float) -> str:
    sec = int(sec)
    return f"{sec // 3600}h{sec % 3600 // 60:02d}m{sec % 60:02d}s" if sec >= 3600 else f"{sec // 60}m{sec % 60:02d}s"


class NonFiniteGuard:
    """Skip steps whose loss or reward is NaN/inf with a warning; stop the run after `limit` in a row."""

    def __init__(self, limit: int = 5):
        self.limit = limit
        self.in_a_row = 0

    def bad(self, step: int, **values: torch.Tensor | float) -> bool:
        bad = [k for k, v in values.items() if not bool(torch.isfinite(torch.as_tensor(v)).all())]
        if not bad:
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        print(f"warning: step {step}: non-finite {', '.join(bad)}; step skipped "
              f"({self.in_a_row} in a row, stopping at {self.limit})", file=sys.stderr, flush=True)
        if self.in_a_row >= self.limit:
            raise RuntimeError(f"{self.limit} steps in a row with non-finite {', '.join(bad)}; stopping at step {step}")
        return True


# ----------------------------------------------------------------------------------------------- checkpoints

def save_checkpoint(run_dir: str | Path, step: int, state: dict, write_extra=None) -> Path:
    """Write `run_dir/step_{step:08d}/` atomically: everything goes into a temp folder which is renamed into place,
    then `run_dir/latest` is replaced atomically. A run killed mid-save leaves at worst a stray temp folder, never
    a checkpoint that `latest` points to and that loads wrong. `write_extra(folder)` adds files (e.g. a PEFT
    adapter)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"step_{step:08d}"
    tmp = run_dir / f".tmp_step_{step:08d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    torch.save({"step": step, **state}, tmp / "state.pt")
    if write_extra is not None:
        write_extra(tmp)
    (tmp / "COMPLETE").write_text(str(step))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = run_dir / f".latest.tmp.{os.getpid()}"
    pointer.write_text(final.name)
    os.replace(pointer, run_dir / "latest")
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    run_dir = Path(run_dir)
    pointer = run_dir / "latest"
    if not pointer.exists():
        return None
    folder = run_dir / pointer.read_text().strip()
    if not (folder / "COMPLETE").exists():
        raise RuntimeError(f"{pointer} names {folder}, which is not a complete checkpoint")
    return folder


def load_checkpoint_state(folder: str | Path, options: dict, compare: tuple[str, ...]) -> dict:
    """Read `state.pt` and refuse a checkpoint written by a run whose options differ in any of `compare`."""
    state = torch.load(Path(folder) / "state.pt", map_location="cpu", weights_only=True)
    saved = state.get("options", {})
    diff = {k: (saved.get(k), options.get(k)) for k in compare if saved.get(k) != options.get(k)}
    if diff:
        shown = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"cannot resume from {folder}: it was written by a run with other options ({shown})")
    return state


def resume_checkpoint(o, compare: tuple[str, ...], is_main: bool) -> tuple[Path | None, dict | None]:
    """With --resume: the latest complete checkpoint in `o.out` and its state, options checked against `compare`;
    (None, None) when not resuming or nothing was saved yet. Call it before building the model (the checkpoint's
    model/ folder is part of what the model is built from); restore `state["rng"]` once the model is built."""
    folder = latest_checkpoint(o.out) if o.resume else None
    if folder is None:
        return None, None
    state = load_checkpoint_state(folder, dataclasses.asdict(o), compare)
    if is_main:
        print(f"resuming from {folder} at step {state['step']}", flush=True)
    return folder, state


def rng_state() -> dict:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------- models

# Options that pick the model a run starts from; a resumed run must keep them.
BASE_KEYS = BASE_PARTS + ("init",)


def base_model(o: RunOptions) -> dict:
    """The base model of a run, as model.handoff records it (the tiny preset is identified by its seed)."""
    from model.handoff import base_identity

    return base_identity(tiny_seed=o.seed, **{k: getattr(o, k) for k in BASE_PARTS})


def build_uae(o: RunOptions, dtype: torch.dtype, device: torch.device, resume_from: Path | None = None):
    """The model a stage starts from, frozen; scripts then add the adapters they train. Returns (uae, inherited):

    the base (the release at --uae, plain parts, or the tiny preset seeded by --seed), then what the stage builds
    on: with --resume, the handoff of the checkpoint resumed from minus the adapters this run trains (the script
    loads those into its fresh adapters); else the previous stage's handoff given by --init. `inherited` is what
    every checkpoint of this run hands on besides its own work (model/handoff.py). --attention selects the
    backend of model.layers.attention."""
    from model.handoff import load_handoff, read_handoff
    from model.layers import set_attention_backend
    from model.uae import UAE

    if o.attention == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"--attention triton needs a CUDA device (got {device}) or TRITON_INTERPRET=1 set before "
                         "triton is imported (slow; for tests)")
    set_attention_backend(o.attention)
    inherited = None  # read and checked first: a wrong --init fails before the base model is loaded
    if resume_from is not None:
        inherited = read_handoff(resume_from).inherited()
    elif o.init:
        inherited = read_handoff(o.init)
    if inherited is not None:
        inherited.check_base(base_model(o))
    parts = {k: getattr(o, k) or None for k in BASE_PARTS if k != "uae"}
    if o.uae or any(parts.values()):
        uae = UAE.from_pretrained(o.uae or None, dtype=dtype, device=device, **parts)
    else:
        uae = UAE.tiny(o.seed, dtype, device)
    if inherited is not None:
        load_handoff(uae, inherited)
    return uae.requires_grad_(False), inherited


def trained_adapter(checkpoint: Path, component: str) -> Path:
    """The adapter a checkpoint's run trained on `component` ('lvlm' or 'dit'), to load on --resume."""
    from model.handoff import read_handoff

    return read_handoff(checkpoint).trained_adapter(component)


def is_tiny(o: RunOptions) -> bool:
    return base_model(o)["tiny_seed"] is not None


def save_run_checkpoint(o: RunOptions, step: int, state: dict, uae, *, stage: str, trains: tuple[str, ...],
                        inherited, dit_ema=None, connector_state: dict | None = None,
                        dit_state: dict | None = None) -> Path:
    """`save_checkpoint` of `state` (optimizer, sampler, RNG, ...) with the model this run has so far in the
    checkpoint's `model/` folder (model.handoff.save_handoff: what it inherited plus what it `trains`)."""
    from model.handoff import FOLDER, save_handoff

    def write(folder: Path) -> None:
        save_handoff(folder / FOLDER, uae, base=base_model(o), stage=stage, run=o.out, step=step,
                     inherited=inherited, trains=trains, dit_ema=dit_ema, connector_state=connector_state,
                     dit_state=dit_state)

    return save_checkpoint(o.out, step, state, write_extra=write)


def build_dataset(o: RunOptions, need_caption: bool):
    """--data as (image, caption) pairs, or the procedural scenes (which come with captions)."""
    from train.data import ImageCaptionDataset, ProceduralDataset

    if o.data:
        return ImageCaptionDataset(o.data, need_caption=need_caption)
    return ProceduralDataset(o.procedural_images, o.size, o.seed)


def build_reward(clip_path: str, tiny: bool, seed: int, dtype: torch.dtype, device: torch.device):
    """The reconstruction reward on CLIP image features: the CLIP folder given, or a tiny random CLIP for the tiny
    preset (it is an error to train real weights against a random reward)."""
    from eval.reward import ReconstructionReward, clip_backbone
    from model.clip import CLIP, CLIPConfig, init_clip_weights

    if clip_path:
        clip = CLIP.from_pretrained(clip_path, dtype=dtype, device=device)
    elif tiny:
        torch.manual_seed(seed + 1)
        clip = CLIP(CLIPConfig.preset("tiny"))
        # With the usual std 0.02 a random CLIP maps every image to nearly the same feature (cosine ~0.9999);
        # larger weights make the tiny reward tell images apart, so the tiny runs have a signal to climb.
        init_clip_weights(clip, std=0.15)
        clip.to(device=device, dtype=dtype)
    else:
        raise ValueError("--clip is required with --uae (the reward backbone)")
    return ReconstructionReward(clip_backbone(clip))
