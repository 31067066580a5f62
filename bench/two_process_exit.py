"""Do N-process training runs end cleanly? Short 2-process CPU runs (gloo) of every training script, in a loop,
counting the runs whose torchrun exit code is not 0 after the run finished and saved.

Before the fix in train.common (torch._dynamo imported before the process group exists; run_script ending
N-process runs without interpreter finalisation) about 1 run in 20 failed under CPU load: a rank aborted at exit with
"terminate called without an active exception". Target: 0 failures in 50. Measured 2026-11-30 on a 2-core x86 VM
(torch 2.13.0+cpu) with --runs 50 --load 1: 0 failures in 50 (322 s); the code before the fix, same command: 1 in 50
(a grpo_decoder run; rank 1 SIGABRT at exit).

    python bench/two_process_exit.py --runs 50              # ~8 min on 2 CPU cores
    python bench/two_process_exit.py --runs 50 --load 1     # with one busy-looping process competing for the CPU
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The smallest run of each script; sft_decoder with --fsdp, where FSDP2 keeps the process group alive past
# destroy_process_group() (the case run_script's exit covers).
JOBS = {
    "grpo_decoder.py": ["--size", "32", "--group-size", "2", "--sample-steps", "2", "--steps", "1"],
    "grpo_encoder.py": ["--size", "32", "--group-size", "2", "--max-new-tokens", "2", "--gen-steps", "1",
                        "--steps", "1"],
    "cold_start.py": ["--size", "32", "--batch-size", "2", "--sample-steps", "1", "--max-new-tokens", "2",
                      "--steps", "1"],
    "sft_decoder.py": ["--size", "32", "--batch-size", "2", "--lora-rank", "0", "--fsdp", "--steps", "1"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--runs", type=int, default=50, help="runs in all, cycling over the scripts")
    parser.add_argument("--load", type=int, default=0, help="busy-looping processes competing for the CPU")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    failures, names, start = [], list(JOBS), time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(args.runs):
                script = names[i % len(names)]
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                       "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(ROOT / "train" / script),
                       *JOBS[script], "--device", "cpu", "--out", str(Path(tmp) / f"run{i}")]
                proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
                status = "ok" if proc.returncode == 0 else f"FAILED rc {proc.returncode}"
                print(f"run {i + 1}/{args.runs} {script}: {status}", flush=True)
                if proc.returncode != 0:
                    failures.append(script)
                    print(proc.stderr[-2000:], flush=True)
    finally:
        for h in hogs:
            h.kill()
    print(f"{len(failures)} failures in {args.runs} runs ({time.perf_counter() - start:.0f} s, "
          f"{os.cpu_count()} CPUs, load {args.load})")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
