"""Plumbing shared by the bench scripts: options, timing, peak memory, targets, the printed table and the JSON file.

Every script times ours against its reference in the same process on the same device, prints a table and, with
`--out FILE`, writes {"bench", "env", "command", "rows", "targets"} as JSON (bench/run_all.py collects them).
`--smoke` runs tiny shapes on whatever is there (CPU: Triton's interpreter, set up by `interpret_if_smoke` before
triton is imported) to test the plumbing; its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/x.py` puts bench/ first on the path, not the repository
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402  (imports no triton)


def interpret_if_smoke(argv: list[str] | None = None) -> None:
    """Switch Triton's interpreter on for a --smoke run without CUDA. Call before anything imports triton."""
    argv = sys.argv[1:] if argv is None else argv
    if "--smoke" in argv and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[-1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes, runs on CPU (plumbing only; the numbers mean nothing)")
    p.add_argument("--quick", action="store_true", help="fewer shapes and repeats (bench/run_all.py --quick)")
    p.add_argument("--out", default="", help="write the rows and targets to this JSON file")
    return p


def parse(p: argparse.ArgumentParser, argv: list[str] | None, script: str) -> argparse.Namespace:
    """parse_args, remembering the command line (as run from the repository root) for the report."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    rel = Path(script).resolve().relative_to(ROOT)
    args.command = " ".join(shlex.quote(a) for a in ["python", str(rel), *argv])
    return args


def device_for(args) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not args.smoke:
        raise SystemExit("this benchmark needs a CUDA GPU; use --smoke to run its tiny shapes on CPU")
    return torch.device("cpu")


def on(device, dtype: torch.dtype, build):
    """build() with its parameters created directly on `device` in `dtype` (no CPU init of billions of weights)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return build()
    finally:
        torch.set_default_dtype(old)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_ms(fn, device: torch.device, warmup_ms: float = 25, rep_ms: float = 100, cpu_reps: int = 2) -> float:
    """Median milliseconds of fn(): CUDA events via triton.testing.do_bench on a GPU (L2 flushed between calls),
    else the host clock over `cpu_reps` calls after one warm-up."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    times = []
    for _ in range(cpu_reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def wall_s(fn, device: torch.device, reps: int = 1) -> tuple[float, object]:
    """(median seconds of fn() with synchronisation, last result), for long calls (whole generations, steps)."""
    times, out = [], None
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def peak_extra_gib(fn, device: torch.device) -> float | None:
    """Peak device memory allocated while fn() runs, above what was allocated before, in GiB (None off CUDA)."""
    if device.type != "cuda":
        fn()
        return None
    sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**30


def target(name: str, value: float | None, goal: float, higher: bool, why: str = "") -> dict:
    """A target of issue 7: value (a ratio, ours against the reference) must be >= goal (higher) or <= goal.
    `gap` is value / goal: for a >= target below 1 means missed by that factor, for a <= target above 1."""
    if value is None or value != value:
        return dict(target=name, value=None, goal=goal, op=">=" if higher else "<=", met=False, gap=None,
                    verdict="not measured", why=why)
    met = value >= goal if higher else value <= goal
    gap = value / goal
    if met:
        verdict = "met"
    elif higher:
        verdict = f"missed: {value:.3g} is {gap:.2f} of the goal (needs {1 / gap:.2f}x more)"
    else:
        verdict = f"missed: {value:.3g} is {gap:.2f}x the goal"
    return dict(target=name, value=round(value, 4), goal=goal, op=">=" if higher else "<=", met=met,
                gap=round(gap, 4), verdict=verdict, why=why)


def env() -> dict:
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__, "python": platform.python_version(),
            "card": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.machine()})",
            "cuda": torch.version.cuda}
    for name in ("triton", "transformers"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    return info


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return "" if v is None else str(v)


def table(rows: list[dict]) -> str:
    """Plain-text table over the union of the rows' keys, in first-seen order."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    cells = [keys] + [[fmt(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(keys))]
    return "\n".join("  ".join(c[i].ljust(widths[i]) for i in range(len(keys))).rstrip() for c in cells)


def report(bench: str, args, rows: list[dict], targets: list[dict]) -> dict:
    result = {"bench": bench, "env": env(), "command": args.command,
              "smoke": bool(args.smoke), "quick": bool(args.quick), "rows": rows, "targets": targets}
    print(f"\n== {bench} ({result['env']['card']}, torch {result['env']['torch']})", flush=True)
    if rows:
        print(table(rows))
    if targets:
        print(table([{k: t[k] for k in ("target", "value", "op", "goal", "verdict")} for t in targets]))
    sys.stdout.flush()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result
