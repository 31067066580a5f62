"""What every training script shares: options from argv, torch.distributed setup, seeding, metrics, the
non-finite guard and atomic, resumable checkpoints.

The scripts stay single files that read top to bottom; anything here is plumbing with no algorithm in it.
"""
from __future__ import annotations

import argparse
import dataclasses
import fcntl
import importlib
import json
import math
import os
import shutil
import socket
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from model.handoff import BASE_PARTS
from model.uae import LORA_ALPHA, LORA_RANK
from weights import DTYPES

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
    opts = cls(**vars(parser.parse_args(argv)))
    if hasattr(opts, "check"):
        opts.check()
    return opts


class UsageError(ValueError):
    """A bad option value or run folder, found before any work: `run_script` reports it as one line."""


def run_script(main) -> None:
    """The `__main__` of every training script: a UsageError becomes one `error:` line and exit code 2 (argparse's
    convention) instead of a traceback; an N-process run ends without interpreter finalisation.

    Why the latter: a library may keep the process group alive past destroy_process_group() (FSDP2 does), and
    its gloo threads then release the tensors of finished collectives while the interpreter finalises, which aborts
    the process ("terminate called without an active exception") after a run that finished and saved everything.
    main() has closed its files and left the group by then; stdout and stderr are flushed first."""
    try:
        main()
    except UsageError as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def require(ok: bool, message: str) -> None:
    """Option checks read as the rule they enforce: require(o.steps >= 1, "--steps must be >= 1")."""
    if not ok:
        raise UsageError(message)


def finite(x: float) -> bool:
    return math.isfinite(x)


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
    data: str = option("", "JSONL, folder of images, or folder of *.jsonl manifests or *.tar shards (with captions "
                           "where the stage needs them); empty = procedurally generated scenes")
    procedural_images: int = option(1000, "how many procedural scenes when --data is empty")
    out: str = option("runs/train", "run folder: metrics.jsonl, checkpoints, adapters")
    resume: bool = option(False, "continue from the latest checkpoint in --out")
    steps: int = option(30, "optimizer steps")
    size: int = option(64, "image size in pixels")
    lr: float = option(1e-4, "AdamW learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    grad_clip: float = option(1.0, "gradient norm clip")
    lr_schedule: str = option("constant", "learning-rate schedule after the warmup: constant | cosine (decays "
                                          "towards a tenth of --lr at the last step) | linear (to 0 past the last "
                                          "step: transformers' and so TRL's default)")
    warmup_steps: int = option(0, "steps of linear learning-rate warmup from 0 to --lr")
    lora_rank: int = option(LORA_RANK, "LoRA rank")
    lora_alpha: float = option(LORA_ALPHA, "LoRA alpha")
    dtype: str = option("fp32", "fp32 | bf16 model weights")
    device: str = option("auto", "auto | cpu | cuda")
    grad_checkpointing: bool = option(False, "activation checkpointing")
    attention: str = option("sdpa", "sdpa | triton: attention backend of every model (triton: kernels/attention.py)")
    seed: int = option(0, "seed of every random draw")
    save_every: int = option(10, "checkpoint every N steps (and at the end)")
    max_bad_steps: int = option(5, "stop after this many non-finite steps in a row")
    full_parameter_training: typing.ClassVar[bool] = False  # whether --lora-rank 0 (train every weight) is allowed

    overwrite: bool = option(False, "start over in an --out that holds a previous run (its metrics and checkpoints "
                                    "are deleted); without it or --resume such a folder is refused")

    def check(self) -> None:
        """Every option value that can be judged before any work; each script's Options extends it. A violation is a
        UsageError naming the option."""
        require(self.steps >= 1, f"--steps must be >= 1, got {self.steps}")
        require(self.size >= 16 and self.size % 16 == 0,
                f"--size must be a positive multiple of 16 (VAE factor 8 x DiT patch 2), got {self.size}")
        require(finite(self.lr) and self.lr >= 0, f"--lr must be >= 0 (0: a control run), got {self.lr}")
        require(finite(self.weight_decay) and self.weight_decay >= 0,
                f"--weight-decay must be >= 0, got {self.weight_decay}")
        require(finite(self.grad_clip) and self.grad_clip > 0, f"--grad-clip must be > 0, got {self.grad_clip}")
        require(self.lr_schedule in LR_SCHEDULES,
                f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        require(0 <= self.warmup_steps <= self.steps,
                f"--warmup-steps must be in [0, --steps {self.steps}], got {self.warmup_steps}")
        lowest_rank = 0 if self.full_parameter_training else 1
        require(self.lora_rank >= lowest_rank, f"--lora-rank must be >= {lowest_rank}, got {self.lora_rank}")
        require(finite(self.lora_alpha) and self.lora_alpha > 0, f"--lora-alpha must be > 0, got {self.lora_alpha}")
        require(self.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        require(self.device in ("auto", "cpu", "cuda"), f"--device must be auto, cpu or cuda, got {self.device!r}")
        require(self.device != "cuda" or torch.cuda.is_available(),
                "--device cuda: no CUDA device is available to this process (torch.cuda.is_available() is False)")
        require(self.attention in ("sdpa", "triton"), f"--attention must be sdpa or triton, got {self.attention!r}")
        require(self.seed >= 0, f"--seed must be >= 0, got {self.seed}")
        require(self.save_every >= 1, f"--save-every must be >= 1, got {self.save_every}")
        require(self.max_bad_steps >= 1, f"--max-bad-steps must be >= 1, got {self.max_bad_steps}")
        require(self.procedural_images >= 1, f"--procedural-images must be >= 1, got {self.procedural_images}")
        require(not (self.resume and self.overwrite), "--resume and --overwrite exclude each other")
        for name in BASE_PARTS + ("init", "data"):
            path = getattr(self, name)
            require(not path or os.path.exists(path), f"--{name.replace('_', '-')} {path}: no such file or folder")


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
        # torch._dynamo (imported lazily, e.g. by the first optimizer) keeps references to the process groups that
        # exist when it is imported, so destroy_process_group() would no longer free the default group: its gloo
        # threads then outlive the script and race with interpreter shutdown ("terminate called without an active
        # exception", rc != 0 after a finished run). Imported first, it holds none.
        importlib.import_module("torch._dynamo")
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


def global_max(n: int) -> int:
    """The largest `n` over ranks (identity for one process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return n
    t = torch.tensor([n], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def encode_text_padded_over_ranks(uae, texts: list[str]) -> torch.Tensor:
    """`uae.encode_text` padded to the longest text of all ranks: the DiT has no text mask (the released convention),
    so the padding a text gets changes its image, and global padding keeps N processes equal to one process with
    the same global batch."""
    return uae.encode_text(texts, pad_to=global_max(uae.generate_turn_ids(texts)[0].shape[1]))


def condition_length(uae, prompts: list[str], guidance_scale: float) -> int:
    """The token length every rank pads `prompts` to (with the negative prompt, which is padded together with them
    under guidance): the longest over all ranks, so a prompt's conditioning never depends on the rank layout."""
    from model.uae import NEGATIVE_PROMPT

    padded_together = ([NEGATIVE_PROMPT] if guidance_scale > 1.0 else []) + list(prompts)
    return global_max(uae.generate_turn_ids(padded_together)[0].shape[1])


def condition_padded_over_ranks(uae, prompts: list[str],
                                guidance_scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`uae.condition` (the negative prompt padded together with the positives) padded like
    `encode_text_padded_over_ranks`."""
    return uae.condition(prompts, guidance_scale, pad_to=condition_length(uae, prompts, guidance_scale))


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


def split_for_rank(n_global: int, dist_env: Dist, what: str) -> slice:
    """The contiguous slice of a global batch this rank owns; the global size must divide across ranks."""
    if n_global % dist_env.world:
        raise UsageError(f"{what}={n_global} does not divide across {dist_env.world} ranks")
    per = n_global // dist_env.world
    return slice(dist_env.rank * per, (dist_env.rank + 1) * per)


# ----------------------------------------------------------------------------------------------- seeding, dtype

def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of one step's global random draws (data noise, sampling seeds): a function of (seed, step)
    only, so a resumed run and any number of ranks draw exactly what an uninterrupted single process draws."""
    return torch.Generator().manual_seed(seed * 100_003 + step)


LR_SCHEDULES = ("constant", "cosine", "linear")


def lr_multiplier(step: int, steps: int, warmup: int = 0, schedule: str = "constant") -> float:
    """The factor of the base learning rate at optimizer step `step` (1-based) of `steps`: a linear warmup to 1 over
    the first `warmup` steps, then 1 ("constant"), a cosine decay towards a tenth ("cosine": 0.1 + 0.9 (1 + cos(pi
    p)) / 2, p the fraction of the steps after the warmup already taken), or a linear decay ("linear": (steps - step +
    1) / (steps - warmup), from 1 to 1 / (steps - warmup) at the last step; transformers'
    get_linear_schedule_with_warmup, the default of its Trainer and so of TRL's GRPOTrainer). A decayed rate is what
    makes a short run's last weights usable as they are: at a constant rate they carry the optimizer's step noise."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"learning-rate schedule must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")
    if step <= warmup:
        return step / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return (steps - step + 1) / max(steps - warmup, 1)
    progress = (step - 1 - warmup) / max(steps - warmup, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def set_scheduled_lr(opt: torch.optim.Optimizer, base_lr: float, step: int, steps: int, warmup: int,
                     schedule: str) -> float:
    """Set every parameter group's learning rate to base_lr * lr_multiplier(step, steps, warmup, schedule); returns
    it (a metric)."""
    lr = base_lr * lr_multiplier(step, steps, warmup, schedule)
    for group in opt.param_groups:
        group["lr"] = lr
    return lr


def set_lr(opt: torch.optim.Optimizer, opts, step: int) -> float:
    """`set_scheduled_lr` for `step` from a script's --lr, --steps, --warmup-steps and --lr-schedule."""
    return set_scheduled_lr(opt, opts.lr, step, opts.steps, opts.warmup_steps, opts.lr_schedule)


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


# ----------------------------------------------------------------------------------------------- metrics

class MetricsLogger:
    """One line per step to stdout (rank 0) and one JSON object per step to `path` (rank 0), with s/step and ETA
    (`timed`; an evaluation log, `timed=False`, prints its lines after `label` instead). List values (per-image
    scores) go to the file only."""

    def __init__(self, path: str | Path | None, total_steps: int, is_main: bool = True, start_step: int = 0,
                 timed: bool = True, label: str = "step"):
        """start_step > 0 (a resumed run): append to the existing file, first dropping rows logged after
        `start_step` (the checkpoint the run resumes from), so that it equals an uninterrupted run's file."""
        resume = start_step > 0
        self.total = total_steps
        self.is_main = is_main
        self.timed, self.label = timed, label
        self.file = None
        if is_main and path is not None:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            if resume and path.exists():
                kept = [line for line, row in read_metrics_rows(path) if row.get("step", 0) <= start_step]
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
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        if self.timed:
            row["s_per_step"] = round(sec, 4)
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        shown = " ".join(f"{k} {_fmt(v)}" for k, v in row.items() if k != "step" and not isinstance(v, list))
        eta = f" eta {_duration(sec * max(self.total - step, 0))}" if self.timed else ""
        print(f"{self.label} {step}/{self.total} {shown}{eta}", flush=True)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def read_metrics_rows(path: str | Path) -> list[tuple[str, dict]]:
    """The rows of a metrics file (metrics.jsonl, eval.jsonl) with their lines. A last line that is not valid JSON
    was torn by a run killed mid-write and is dropped with a warning; a bad line elsewhere is an error naming it."""
    path = Path(path)
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append((line, json.loads(line)))
        except json.JSONDecodeError as e:
            if i < len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not a JSON row ({e})") from None
            print(f"warning: {path}: dropping a torn last line (a run killed mid-write): {line[:80]!r}",
                  file=sys.stderr, flush=True)
    return out


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
    """Write `run_dir/step_{step:08d}/` atomically and durably: everything goes into a temp folder, the COMPLETE
    marker (model.handoff: every file with its size) last, all of it fsynced, then the folder is renamed into place
    and `run_dir/latest` replaced atomically. A run killed mid-save leaves the previous checkpoints as they were; a
    save that fails (e.g. a full disk) removes its temp folder. `write_extra(folder)` adds files (the handoff)."""
    from model.handoff import write_complete_marker

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"step_{step:08d}"
    tmp = run_dir / f".tmp_step_{step:08d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        torch.save({"step": step, **state}, tmp / "state.pt")
        if write_extra is not None:
            write_extra(tmp)
        write_complete_marker(tmp, step)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if (run_dir / "metrics.jsonl").is_file():  # the rows up to this step survive a power loss with it
        _fsync(run_dir / "metrics.jsonl")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = run_dir / f".latest.tmp.{os.getpid()}"
    pointer.write_text(final.name)
    _fsync(pointer)
    os.replace(pointer, run_dir / "latest")
    _fsync(run_dir)
    return final


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for root, _dirs, files in os.walk(folder):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))


def check_resume_options(folder: str | Path, state: dict, options: dict, compare: tuple[str, ...]) -> None:
    saved = state.get("options", {})
    diff = {k: (saved.get(k), options.get(k)) for k in compare if saved.get(k) != options.get(k)}
    if diff:
        shown = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise UsageError(f"cannot resume from {folder}: it was written by a run with other options ({shown})")


def latest_checkpoint(run_dir: str | Path, options: dict | None = None,
                      compare: tuple[str, ...] = ()) -> tuple[Path | None, dict | None]:
    """The newest checkpoint of `run_dir` that is complete and whose state.pt loads, with that state; checkpoints
    that are not (a save cut short, a truncated or replaced file) are skipped with a warning naming the file, so a
    run resumes from the last good one. (None, None) when the folder holds no checkpoint at all; an error when it
    holds some and none is usable (starting over would silently drop them). With `options`, the state's options
    must match them in `compare`."""
    from model.handoff import run_checkpoints

    found = run_checkpoints(run_dir)
    skipped = []
    for folder, problem in found:
        if problem is None:
            try:
                state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
            except Exception as e:  # torch.load raises several types for a damaged file; all mean "unusable"
                problem = f"{folder / 'state.pt'}: unreadable ({type(e).__name__}: {e})"
        if problem is not None:
            skipped.append(problem)
            continue
        for reason in skipped:
            print(f"warning: skipping a checkpoint that is not usable: {reason}", file=sys.stderr, flush=True)
        if options is not None:
            check_resume_options(folder, state, options, compare)
        return folder, state
    if skipped:
        raise RuntimeError(f"{run_dir}: no usable checkpoint to resume from ({'; '.join(skipped)}); pass --overwrite "
                           "to start the run over")
    return None, None


# ----------------------------------------------------------------------------------------------- run folder

def _run_files(run_dir: Path) -> list[Path]:
    """What a run writes into --out; anything else there is the user's and is left alone."""
    return sorted(p for p in run_dir.iterdir() if p.name in ("metrics.jsonl", "latest") or p.name.startswith("step_"))


def _stale_temp_files(run_dir: Path) -> list[Path]:
    """Temp files of saves that did not finish (save_checkpoint, MetricsLogger): garbage once the folder is locked."""
    prefixes = (".tmp_step_", ".latest.tmp.", "metrics.jsonl.tmp.")
    return sorted(p for p in run_dir.iterdir() if p.name.startswith(prefixes))


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink()


_HELD_LOCKS: dict[Path, int] = {}


def lock_run_folder(run_dir: str | Path) -> None:
    """Hold an exclusive lock on `run_dir/.lock` until `release_run_folder` or the process ends, so that a second
    run on the same folder fails at its start instead of interleaving its metrics and checkpoints with this one's.
    Re-entrant within a process (tests run a script's main() several times in one process)."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _HELD_LOCKS:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise UsageError(f"--out {run_dir} is in use by another run ({holder}); two runs cannot share a run "
                         "folder") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    _HELD_LOCKS[run_dir] = fd


def release_run_folder(run_dir: str | Path) -> None:
    fd = _HELD_LOCKS.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)


def open_run_folder(opts, compare: tuple[str, ...], is_main: bool) -> tuple[Path | None, dict | None]:
    """Take `o.out` for this run; with --resume return the checkpoint to continue from and its state (options
    checked against `compare`), else (None, None). Call it before building the model (the checkpoint's model/
    folder is part of what the model is built from); restore `state["rng"]` once the model is built.

    Rank 0 locks the folder and removes temp files of interrupted saves. A fresh run (no --resume) refuses a folder
    that holds another run's metrics or checkpoints unless --overwrite, which deletes them first: rerunning a
    command must not silently truncate the metrics of the run it replaces or leave its later checkpoints behind."""
    run_dir = Path(opts.out)
    if is_main:
        lock_run_folder(run_dir)
        for p in _stale_temp_files(run_dir):
            print(f"removing {p}: left by an interrupted save", file=sys.stderr, flush=True)
            _remove(p)
        if not opts.resume:
            found = _run_files(run_dir)
            if found and not opts.overwrite:
                shown = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
                raise UsageError(f"--out {run_dir} already holds a run ({shown}); pass --resume to continue it or "
                                 "--overwrite to replace it")
            for p in found:
                _remove(p)
    if not opts.resume:
        return None, None
    folder, state = latest_checkpoint(run_dir, dataclasses.asdict(opts), compare)
    if is_main and folder is not None:
        print(f"resuming from {folder} at step {state['step']}", flush=True)
        if state["step"] >= opts.steps:
            print(f"the checkpoint is at step {state['step']} and --steps is {opts.steps}: nothing left to train "
                  "(raise --steps to continue)", flush=True)
    return folder, state


def apply_optimizer_options(opt: torch.optim.Optimizer, opts, is_main: bool, saved: dict | None = None) -> None:
    """After loading a checkpoint's optimizer state: this run's --lr and --weight-decay replace the saved ones
    (load_state_dict restores the old values), and each change is logged. `saved`: the checkpoint's options, whose
    values the change is against when they hold them (a scheduled run's groups hold the step's rate, not --lr)."""
    for key in ("lr", "weight_decay"):
        new = getattr(opts, key)
        old = {saved[key]} if saved and key in saved else {group[key] for group in opt.param_groups}
        for group in opt.param_groups:
            group[key] = new
        if is_main and old != {new}:
            print(f"resume: {key} {', '.join(map(str, sorted(old)))} -> {new} (--{key.replace('_', '-')})",
                  flush=True)


def resume_loop(state: dict | None, opt: torch.optim.Optimizer, sampler, opts, is_main: bool,
                load_optimizer=None) -> int:
    """Continue a training loop from a checkpoint's `state` (None: a fresh run, step 0): the optimizer's state (with
    `load_optimizer`, e.g. FSDP2's resharding load, else `opt.load_state_dict`), then this run's --lr and
    --weight-decay (`apply_optimizer_options`), the sampler's position and the RNG. Returns the step it ended at.
    The trained weights come back separately (build_uae, the scripts' adapters)."""
    if state is None:
        return 0
    from train.data import SamplerState

    (load_optimizer or opt.load_state_dict)(state["optimizer"])
    apply_optimizer_options(opt, opts, is_main, state.get("options"))
    if hasattr(sampler, "load_state_dict"):  # a sampler with more state than (epoch, position): BucketSampler
        sampler.load_state_dict(state["sampler"])
    else:
        sampler.state = SamplerState(**state["sampler"])
    set_rng_state(state["rng"])
    return state["step"]


def finish_run(opts, log: "MetricsLogger") -> None:
    """The end of a training script's main(): close the metrics file, release the run folder, leave the process
    group."""
    log.close()
    release_run_folder(opts.out)
    close_distributed()


def warn_single_sample_groups(group_size: int, is_main: bool) -> None:
    if group_size == 1 and is_main:
        print("warning: --group-size 1: each reward is compared only with itself, so every advantage is 0 and the "
              "policy does not change (GRPO needs >= 2 samples per group)", file=sys.stderr, flush=True)


def warn_zero_advantages(step: int, advantages: torch.Tensor, is_main: bool) -> None:
    """GRPO learns only from reward differences within a group: say so when a step has none (a constant reward)."""
    if is_main and not bool(advantages.ne(0).any()):
        print(f"warning: step {step}: every sample of each group got the same reward, so every advantage is 0 and "
              "this step does not change the policy", file=sys.stderr, flush=True)


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


def base_model(opts: RunOptions) -> dict:
    """The base model of a run, as model.handoff records it (the tiny preset is identified by its seed)."""
    from model.handoff import base_identity

    return base_identity(tiny_seed=opts.seed, **{k: getattr(opts, k) for k in BASE_PARTS})


def build_uae(opts: RunOptions, dtype: torch.dtype, device: torch.device, resume_from: Path | None = None):
    """The model a stage starts from, frozen; scripts then add the adapters they train. Returns (uae, inherited):

    the base (the release at --uae, plain parts, or the tiny preset seeded by --seed), then what the stage builds
    on: with --resume, the handoff of the checkpoint resumed from minus the adapters this run trains (the script
    loads those into its fresh adapters); else the previous stage's handoff given by --init. `inherited` is what
    every checkpoint of this run hands on besides its own work (model/handoff.py). --attention selects the
    backend of model.layers.attention.

    Seeds torch's global generator with --seed first: torch seeds it differently in every process, and a stage's
    fresh adapters are drawn from it (model.lora's A init) after this, so they must be the same on every rank (the
    ranks only average gradients) and in every run of the same command."""
    from model.handoff import load_handoff, read_handoff
    from model.layers import set_attention_backend
    from model.uae import UAE

    torch.manual_seed(opts.seed)

    if opts.attention == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"--attention triton needs a CUDA device (got {device}) or TRITON_INTERPRET=1 set before "
                         "triton is imported (slow; for tests)")
    set_attention_backend(opts.attention)
    inherited = None  # read and checked first: a wrong --init fails before the base model is loaded
    if resume_from is not None:
        inherited = read_handoff(resume_from).inherited()
    elif opts.init:
        inherited = read_handoff(opts.init)
    if inherited is not None:
        inherited.check_base(base_model(opts))
    parts = {k: getattr(opts, k) or None for k in BASE_PARTS if k != "uae"}
    if opts.uae or any(parts.values()):
        uae = UAE.from_pretrained(opts.uae or None, dtype=dtype, device=device, **parts)
    else:
        uae = UAE.tiny(opts.seed, dtype, device)
    if inherited is not None:
        load_handoff(uae, inherited)
    return uae.requires_grad_(False), inherited


def trained_adapter(checkpoint: Path, component: str) -> Path:
    """The adapter a checkpoint's run trained on `component` ('lvlm' or 'dit'), to load on --resume."""
    from model.handoff import read_handoff

    return read_handoff(checkpoint).trained_adapter(component)


def is_tiny(opts: RunOptions) -> bool:
    return base_model(opts)["tiny_seed"] is not None


def save_run_checkpoint(opts: RunOptions, step: int, state: dict, uae, *, stage: str, trains: tuple[str, ...],
                        inherited, dit_ema=None, connector_state: dict | None = None,
                        dit_state: dict | None = None, captioner_only: bool = False) -> Path:
    """`save_checkpoint` of `state` (optimizer, sampler, RNG, ...) with the model this run has so far in the
    checkpoint's `model/` folder (model.handoff.save_handoff: what it inherited plus what it `trains`)."""
    from model.handoff import FOLDER, save_handoff

    def write(folder: Path) -> None:
        save_handoff(folder / FOLDER, uae, base=base_model(opts), stage=stage, run=opts.out, step=step,
                     inherited=inherited, trains=trains, dit_ema=dit_ema, connector_state=connector_state,
                     dit_state=dit_state, captioner_only=captioner_only)

    return save_checkpoint(opts.out, step, state, write_extra=write)


def build_dataset(opts: RunOptions, need_caption: bool):
    """--data as (image, caption) pairs, or the procedural scenes (which come with captions)."""
    from train.data import ImageCaptionDataset, ProceduralDataset

    if opts.data:
        return ImageCaptionDataset(opts.data, need_caption=need_caption)
    return ProceduralDataset(opts.procedural_images, opts.size, opts.seed)


@torch.no_grad()
def group_rewards(reward_fn, images: list, image_of: list[int], recon: torch.Tensor, size: int) -> torch.Tensor:
    """Reward [R] of reconstruction r against its source images[image_of[r]] (`image_of` ascending, as a rank's rows
    are): each source's features are computed once for its group's rows, not once per row."""
    from train.data import pil_to_tensor

    first = image_of[0]
    sources = pil_to_tensor(images[first:image_of[-1] + 1], size).to(recon.device)
    features = reward_fn.source_features(sources)
    return reward_fn(None, recon, source_features=features[[i - first for i in image_of]])


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
