"""Every GPU check of issue 7 and the stage-2 / stage-3 step benchmarks in one command, within a time budget.

1. pytest of the kernels, the CUDA-graph decoder and the models' kernel paths on the GPU (TESTS below)
2. bench/attention.py, bench/logprob.py, bench/generate.py, bench/grpo_decoder_step.py (SD3.5-medium with the SDPA
   and Triton attention backends), bench/grpo_encoder_step.py (stage 2 sequential vs batched, Qwen2.5-VL-3B and
   SD3.5-medium, CUDA-graph decode), bench/grpo_decoder_step.py SD3.5-large (SDPA; both backends without --quick),
   bench/data_path.py (decoder SFT: data loading alone vs the SD3.5-medium 512 px batch-8 step alone)
Each runs as its own process (a crash or out-of-memory loses one step, not the run) under a timeout cut to what is
left of --budget-s. Writes bench/results/<date>-<card>.json (everything, with each step's exit code and time) and
bench/RESULTS.md (card, date, versions, the exact command, the targets with the ratio reached and by how much each
missed one misses, then every table; the hand-recorded "Measured on CPU" section at its end is kept). --copy-to DIR
also copies both there (the device machine's $OUT).

    python bench/run_all.py                                   # ~6-8 min on an H100 (hard stop: --budget-s)
    PYTHONUNBUFFERED=1 python bench/run_all.py --copy-to "$OUT" 2>&1 | tee "$OUT/log.txt"
    python bench/run_all.py --smoke                           # tiny CPU plumbing run; results in a temp folder
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import common

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
TESTS = ["tests/test_kernels_attention.py", "tests/test_kernels_logprob.py", "tests/test_graph_decode.py",
         "tests/test_layers.py", "tests/test_qwen2_5_vl.py::test_vision_tower_varlen_kernel_matches_sdpa",
         "tests/test_qwen2_5_vl.py::test_log_prob_path_without_pad_states"]


def steps(args) -> list[tuple[str, list[str], float]]:
    """(name, argv after the python executable, timeout in seconds)."""
    mode = ["--smoke"] if args.smoke else ["--quick"] if args.quick else []
    py = lambda name: [f"bench/{name}"] + mode  # noqa: E731  (run from the repository root)
    both = "sdpa" if args.smoke else "sdpa,triton"  # the interpreter makes the Triton backend slow on CPU
    out = []
    if not args.no_tests:
        parallel = ["-n", "4"] if importlib.util.find_spec("xdist") else []  # Triton compiles in 4 processes
        out.append(("tests", ["-m", "pytest", "-q", "-p", "no:cacheprovider", *parallel, *TESTS], 180))
    out += [("attention", py("attention.py"), 150),
            ("logprob", py("logprob.py"), 90),
            ("generate", py("generate.py"), 200),
            ("grpo_decoder_step sd3.5-medium", py("grpo_decoder_step.py") + ["--presets", "sd3.5-medium",
                                                                              "--attention", both], 150)]
    # Stage 2 sequential vs batched (Qwen2.5-VL-3B + SD3.5-medium at 512 px on a GPU), the decode as CUDA graphs.
    out.append(("grpo_encoder_step", py("grpo_encoder_step.py") + ([] if args.smoke else ["--cuda-graph"]), 240))
    # Decoder SFT: the data path (JPEG decode + resize in 0 / 2 / 8 loader workers) against the model step; ahead of
    # SD3.5-large, the step a short budget drops first.
    out.append(("data_path", py("data_path.py") + ([] if args.smoke else ["--workers", "0,2,8"]), 240))
    if not args.smoke:  # (--smoke runs the tiny DiT whatever the preset)
        out.append(("grpo_decoder_step sd3.5-large", py("grpo_decoder_step.py") + [
            "--presets", "sd3.5-large", "--attention", "sdpa" if args.quick else both], 200))

    if args.only:
        keep = args.only.split(",")
        out = [s for s in out if any(s[0].startswith(k) for k in keep)]
    return out


def run_step(name, argv, timeout, work: Path) -> dict:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    out = work / f"{slug}.json"
    junit = work / f"{slug}.xml"
    cmd = [sys.executable, *argv] + (["--junitxml", str(junit)] if name == "tests" else ["--out", str(out)])
    print(f"\n#### {name}: {' '.join(shlex.quote(c) for c in cmd)}  (timeout {timeout:.0f} s)", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)  # its own process group
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # with any workers it started (pytest-xdist)
        proc.wait()
        rc = "timeout"
    step = dict(name=name, command=" ".join(shlex.quote(c) for c in cmd), rc=rc,
                seconds=round(time.perf_counter() - start, 1))
    if out.is_file():
        step["result"] = json.loads(out.read_text())
    if junit.is_file():
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        step["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        step["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                          if c.find("failure") is not None or c.find("error") is not None]
    return step


def md_table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(common.fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def markdown(summary: dict) -> str:
    e = summary["env"]
    lines = ["# Benchmark results", ""]
    if summary["smoke"]:
        lines += ["**SMOKE RUN: tiny shapes on the CPU, the numbers mean nothing.**", ""]
    lines += [f"- card: {e['card']}", f"- date: {e['date']}",
              f"- torch {e['torch']} (CUDA {e['cuda']}), triton {e['triton']}, transformers {e['transformers']}, "
              f"python {e['python']}",
              f"- command: `{summary['command']}` (from the repository root; {summary['seconds']:.0f} s)",
              "- every ratio compares ours with the reference timed in the same process on the same GPU", ""]
    targets = summary["targets"]
    if targets:
        lines += ["## Targets of issue 7", "",
                  md_table([{"target": t["target"], "reached": t["value"], "goal": f"{t['op']} {t['goal']}",
                             "met": "yes" if t["met"] else "**no**", "verdict": t["verdict"]} for t in targets]),
                  "", "Why a missed target is missed: see the tables below (TFLOP/s against the ~800 TFLOP/s bf16 "
                  "matmul ceiling, decode GB/s of LM weights against the ~3.0 TB/s copy ceiling).", ""]
    lines += ["## Steps", "", md_table([{"step": s["name"], "exit": s["rc"], "seconds": s["seconds"],
                                         **({"tests": json.dumps(s["tests"])} if "tests" in s else {})}
                                        for s in summary["steps"]]), ""]
    for s in summary["steps"]:
        if s.get("failed"):
            lines += [f"Failed tests: {', '.join(s['failed'])}", ""]
        if s.get("result") and s["result"]["rows"]:
            lines += [f"## {s['name']}", "", f"`{s['result']['command']}`", "", md_table(s["result"]["rows"]), ""]
    return "\n".join(lines)


CPU_SECTION = "\n## Measured on CPU"


def kept_cpu_section(md_path: Path) -> str:
    """The CPU measurements recorded by hand at the end of the markdown file (from CPU_SECTION on), which a GPU
    run's rewrite keeps."""
    old = md_path.read_text() if md_path.is_file() else ""
    return old[old.index(CPU_SECTION):] if CPU_SECTION in old else ""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer shapes and repeats in every benchmark (~4 min)")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run of the plumbing (no pytest step)")
    p.add_argument("--budget-s", type=float, default=520, help="start no step after this many seconds; a step's "
                   "timeout is cut to what is left")
    p.add_argument("--only", default="", help="comma-separated step-name prefixes (tests, attention, logprob, ...)")
    p.add_argument("--no-tests", action="store_true", help="skip the pytest step")
    p.add_argument("--results-dir", default="", help="default bench/results (a temp folder with --smoke)")
    p.add_argument("--markdown", default="", help="default bench/RESULTS.md (inside --results-dir with --smoke)")
    p.add_argument("--copy-to", default="", help="also copy the JSON and the markdown into this folder")
    args = p.parse_args(argv)
    if args.smoke:
        args.no_tests = True
    results = Path(args.results_dir or (tempfile.mkdtemp(prefix="bench-smoke-") if args.smoke else BENCH / "results"))
    md_path = Path(args.markdown or (results / "RESULTS.md" if args.smoke else BENCH / "RESULTS.md"))
    work = Path(tempfile.mkdtemp(prefix="bench-steps-"))

    start, done = time.perf_counter(), []
    for name, step_argv, timeout in steps(args):
        left = args.budget_s - (time.perf_counter() - start)
        if left < 30:
            done.append(dict(name=name, rc="skipped: time budget spent", seconds=0))
            continue
        done.append(run_step(name, step_argv, min(timeout, left), work))

    env = common.env()
    summary = {"env": env, "smoke": args.smoke, "quick": args.quick,
               "command": " ".join(["python", "bench/run_all.py"] + [shlex.quote(a) for a in
                                                                     (sys.argv[1:] if argv is None else argv)]),
               "seconds": round(time.perf_counter() - start, 1), "steps": done,
               "targets": [t for s in done for t in (s.get("result") or {}).get("targets", [])]}
    card = re.sub(r"[^a-z0-9]+", "-", env["card"].lower()).strip("-")
    results.mkdir(parents=True, exist_ok=True)
    json_path = results / f"{env['date'][:10]}-{card}{'-smoke' if args.smoke else ''}.json"
    json_path.write_text(json.dumps(summary, indent=1))
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(markdown(summary) + kept_cpu_section(md_path))
    if args.copy_to:
        Path(args.copy_to).mkdir(parents=True, exist_ok=True)
        for f in (json_path, md_path):
            shutil.copy(f, Path(args.copy_to) / f.name)
    print(f"\nwrote {json_path} and {md_path} ({summary['seconds']:.0f} s)")
    for s in done:
        print(f"  {s['name']:<34} exit {s['rc']!s:<28} {s['seconds']:>7.1f} s")
    for t in summary["targets"]:
        print(f"  {'MET ' if t['met'] else 'MISS'} {t['target']}: {t['verdict']}")
    shutil.rmtree(work, ignore_errors=True)
    return summary


if __name__ == "__main__":
    main()
