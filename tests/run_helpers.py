"""Helpers shared by the training-script tests: reading a run folder's metrics, adapters and checkpoints, and a
single-threaded torch for the tiny in-process runs (faster, and other processes share the CPU)."""
import json
import os
from pathlib import Path

import pytest
import torch

from weights import open_checkpoint


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def adapter(folder) -> dict[str, torch.Tensor]:
    f = open_checkpoint(Path(folder) / "adapter_model.safetensors")
    return {k: f[k] for k in f}


def last_ckpt(out) -> Path:
    return Path(out) / (Path(out) / "latest").read_text().strip()


def trained(out, component: str, ema: bool = False) -> Path:
    """The adapter folder a run trained on `component` ('lvlm' or 'dit') in its latest checkpoint's handoff."""
    from model.handoff import read_handoff

    return read_handoff(last_ckpt(out)).trained_adapter(component, ema=ema)


def model_file(out, name: str) -> dict[str, torch.Tensor]:
    """A full-weights file of the latest checkpoint's handoff (connector.safetensors, dit.safetensors)."""
    f = open_checkpoint(last_ckpt(out) / "model" / name)
    return {k: f[k] for k in f}


def run_stage(script, args: list[str], probe) -> dict:
    """Run a training script's main(args) in-process; return its model (as the script built it) and `probe(model)` at
    the first optimizer step (before the update: what the first forward saw) and after the run (the last forward's
    model), under "uae", "first" and "last"."""
    seen = {}
    real_build = script.build_uae

    def build(*a, **k):
        seen["uae"], inherited = real_build(*a, **k)
        return seen["uae"], inherited

    class FirstStepProbe(torch.optim.AdamW):
        def step(self, *a, **k):
            if "first" not in seen:
                seen["first"] = probe(seen["uae"])
            return super().step(*a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(script, "build_uae", build)
        mp.setattr(torch.optim, "AdamW", FirstStepProbe)
        script.main(args)
    seen["last"] = probe(seen["uae"])
    return seen


def without_time(rs):
    return [{k: v for k, v in r.items() if k != "s_per_step"} for r in rs]


ROOT = Path(__file__).resolve().parents[1]
_RENDEZVOUS_ERRORS = ("EADDRINUSE", "address already in use", "DistNetworkError", "RendezvousConnectionError",
                      "Connection refused", "Connection reset")


def torchrun_two(script: str, args: list[str], out) -> None:
    """Run `train/<script>` on 2 CPU processes (gloo) with a free local port. Retried once, only when the launch
    failed on the rendezvous itself (a port taken between choosing and binding it), never on the script's own error."""
    import socket
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for attempt in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
               "--master-addr=127.0.0.1", f"--master-port={port}", str(ROOT / "train" / script), *args,
               "--out", str(out)]
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        if proc.returncode == 0:
            return
        if attempt == 0 and any(e in proc.stderr for e in _RENDEZVOUS_ERRORS):
            continue
        raise AssertionError(f"torchrun {script} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
