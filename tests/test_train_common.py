"""train/common.py: options from argv, metrics, the non-finite guard, atomic and resumable checkpoints."""
import json
from dataclasses import dataclass

import pytest
import torch

from model.layers import get_attention_backend
from train.common import (MetricsLogger, NonFiniteGuard, RunOptions, build_uae, latest_checkpoint,
                          load_checkpoint_state, option, parse_options, rng_state, save_checkpoint, set_rng_state)


@dataclass
class Opts:
    steps: int = option(3, "optimizer steps")
    lr: float = option(1e-3, "learning rate")
    out: str = option("runs/x", "run folder")
    ema: bool = option(True, "keep an EMA")


def test_parse_options_types_defaults_and_help(capsys):
    o = parse_options(Opts, ["--steps", "7", "--lr", "0.5", "--no-ema"])
    assert o == Opts(steps=7, lr=0.5, out="runs/x", ema=False)
    assert parse_options(Opts, []) == Opts()
    with pytest.raises(SystemExit):
        parse_options(Opts, ["--help"])
    text = capsys.readouterr().out
    assert "--steps" in text and "optimizer steps" in text and "default: 3" in text
    with pytest.raises(SystemExit):
        parse_options(Opts, ["--steps", "x"])


def test_metrics_logger_writes_jsonl_and_eta(tmp_path, capsys):
    log = MetricsLogger(tmp_path / "m.jsonl", total_steps=2)
    log.log(1, {"loss": torch.tensor(0.5), "reward": 0.25})
    log.log(2, {"loss": float("nan")})
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == 0.5 and rows[0]["reward"] == 0.25 and "s_per_step" in rows[0]
    assert rows[1]["loss"] == "nan"
    out = capsys.readouterr().out
    assert "step 1/2" in out and "eta" in out


def test_non_finite_guard_skips_then_stops():
    g = NonFiniteGuard(limit=2)
    assert not g.bad(1, loss=torch.tensor(1.0))
    assert g.bad(2, loss=torch.tensor(float("nan")))
    assert not g.bad(3, reward=torch.tensor([0.1, 0.2]))
    assert g.bad(4, reward=torch.tensor([float("inf")]))
    with pytest.raises(RuntimeError, match="2 steps in a row"):
        g.bad(5, loss=float("nan"))


def test_checkpoint_atomic_latest_and_option_check(tmp_path, monkeypatch):
    assert latest_checkpoint(tmp_path) is None
    torch.manual_seed(0)
    rng = rng_state()
    a = torch.rand(3)
    save_checkpoint(tmp_path, 1, {"options": {"lr": 1.0, "steps": 5}, "rng": rng, "w": torch.ones(2)},
                    write_extra=lambda d: (d / "adapter.txt").write_text("x"))
    folder = latest_checkpoint(tmp_path)
    assert folder.name == "step_00000001" and (folder / "adapter.txt").exists()
    state = load_checkpoint_state(folder, {"lr": 1.0, "steps": 9}, compare=("lr",))
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(2))
    set_rng_state(state["rng"])
    assert torch.equal(torch.rand(3), a)
    with pytest.raises(ValueError, match="lr: checkpoint 1.0 vs now 2.0"):
        load_checkpoint_state(folder, {"lr": 2.0}, compare=("lr",))

    # A save killed part-way leaves `latest` on the previous complete checkpoint.
    def crash(folder):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, {"options": {}}, write_extra=crash)
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    assert not (tmp_path / "step_00000002").exists()


def test_metrics_logger_resume_drops_rows_after_the_checkpoint(tmp_path):
    path = tmp_path / "m.jsonl"
    log = MetricsLogger(path, total_steps=4)
    for step in (1, 2, 3):  # the run logged step 3, then died before checkpointing it
        log.log(step, {"loss": float(step)})
    log.close()
    log = MetricsLogger(path, total_steps=4, start_step=2)
    log.log(3, {"loss": 30.0})
    log.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_reduce_stats_mean_min_max():
    from train.common import reduce_stats

    got = reduce_stats([{"loss": torch.tensor(1.0), "ratio_min": 0.9, "ratio_max": 1.1},
                        {"loss": 3.0, "ratio_min": 0.8, "ratio_max": 1.05}])
    assert got == {"loss": 2.0, "ratio_min": 0.8, "ratio_max": 1.1}
    assert reduce_stats([]) == {}


def test_build_uae_refuses_triton_attention_without_cuda_or_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="--attention triton needs a CUDA device"):
        build_uae(RunOptions(attention="triton"), torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="attention backend must be one of"):
        build_uae(RunOptions(attention="flash"), torch.float32, torch.device("cpu"))
    assert get_attention_backend() == "sdpa"
