"""Helpers shared by the training-script tests: reading a run folder's metrics, adapters and checkpoints, and a
single-threaded torch for the tiny in-process runs (faster, and other processes share the CPU)."""
import json
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


def without_time(rs):
    return [{k: v for k, v in r.items() if k != "s_per_step"} for r in rs]
