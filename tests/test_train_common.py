"""train/common.py: options from argv, metrics, the non-finite guard, atomic and resumable checkpoints, run
folders (lock, refusal, fallback) and a clean end of N-process runs."""
import dataclasses
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from model.layers import get_attention_backend
from train.common import (MetricsLogger, NonFiniteGuard, RunOptions, UsageError, apply_optimizer_options,
                          build_uae, latest_checkpoint, lock_run_folder, lr_multiplier, open_run_folder, option,
                          parse_options, release_run_folder, rng_state, save_checkpoint, set_lr, set_rng_state,
                          warn_zero_advantages)

ROOT = Path(__file__).resolve().parents[1]


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
    assert latest_checkpoint(tmp_path) == (None, None)
    torch.manual_seed(0)
    rng = rng_state()
    a = torch.rand(3)
    save_checkpoint(tmp_path, 1, {"options": {"lr": 1.0, "steps": 5}, "rng": rng, "w": torch.ones(2)},
                    write_extra=lambda d: (d / "adapter.txt").write_text("x"))
    folder, _ = latest_checkpoint(tmp_path)
    assert folder.name == "step_00000001" and (folder / "adapter.txt").exists()
    assert (tmp_path / "latest").read_text() == "step_00000001"
    _, state = latest_checkpoint(tmp_path, {"lr": 1.0, "steps": 9}, compare=("lr",))
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(2))
    set_rng_state(state["rng"])
    assert torch.equal(torch.rand(3), a)
    with pytest.raises(ValueError, match="lr: checkpoint 1.0 vs now 2.0"):
        latest_checkpoint(tmp_path, {"lr": 2.0}, compare=("lr",))

    # A save killed part-way leaves `latest` on the previous complete checkpoint, and no temp folder behind.
    def crash(folder):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, {"options": {}}, write_extra=crash)
    assert latest_checkpoint(tmp_path)[0].name == "step_00000001"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000001"]


def test_checkpoints_are_fsynced_before_they_count(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def record(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    save_checkpoint(tmp_path, 1, {"options": {}}, write_extra=lambda d: (d / "model").mkdir() or
                    (d / "model" / "w.bin").write_bytes(b"123"))
    tmp = str(tmp_path / ".tmp_step_00000001_")
    names = {s.replace(tmp, "TMP").split("_", 1)[-1] if s.startswith(tmp) else s for s in synced}
    for f in ("state.pt", "COMPLETE", "model/w.bin", "model"):
        assert any(n.endswith(f) for n in names), (f, synced)
    assert str(tmp_path / "metrics.jsonl") in synced and str(tmp_path / "latest") not in synced  # pointer via temp
    assert synced[-1] == str(tmp_path)  # the folder entry of the renames last


def _two_checkpoints(run):
    for step in (1, 2):
        save_checkpoint(run, step, {"options": {"lr": 1.0}, "w": torch.full((4,), float(step))},
                        write_extra=lambda d: (d / "model").mkdir() or (d / "model" / "a.bin").write_bytes(b"x" * 64))


@pytest.mark.parametrize("damage", ["truncated_state", "truncated_model_file", "no_marker", "latest_gone"])
def test_resume_falls_back_to_the_newest_usable_checkpoint(tmp_path, capsys, damage):
    _two_checkpoints(tmp_path)
    step2 = tmp_path / "step_00000002"
    if damage == "truncated_state":
        data = (step2 / "state.pt").read_bytes()
        (step2 / "state.pt").write_bytes(data[: len(data) // 2])
    elif damage == "truncated_model_file":
        (step2 / "model" / "a.bin").write_bytes(b"x" * 10)
    elif damage == "no_marker":
        (step2 / "COMPLETE").unlink()
    else:
        import shutil
        shutil.rmtree(step2)
    folder, state = latest_checkpoint(tmp_path, {"lr": 1.0}, ("lr",))
    assert folder.name == "step_00000001" and torch.equal(state["w"], torch.ones(4))
    if damage != "latest_gone":
        assert "skipping a checkpoint that is not usable" in capsys.readouterr().err


def test_resume_with_no_usable_checkpoint_is_an_error(tmp_path):
    _two_checkpoints(tmp_path)
    (tmp_path / "step_00000002" / "state.pt").write_bytes(b"garbage")  # truncated: told by its recorded size
    state = tmp_path / "step_00000001" / "state.pt"
    state.write_bytes(b"\0" * state.stat().st_size)  # same size, damaged: told by loading it
    with pytest.raises(RuntimeError, match="no usable checkpoint .*00002/state.pt: 7 bytes, the save wrote .*"
                                           "00001/state.pt: unreadable .*--overwrite"):
        latest_checkpoint(tmp_path)


def _run_options(tmp_path, **kw):
    return RunOptions(out=str(tmp_path / "run"), steps=5, **kw)


def test_fresh_run_refuses_a_used_folder_unless_overwrite(tmp_path):
    o = _run_options(tmp_path)
    run = Path(o.out)
    _two_checkpoints(run)
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    (run / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="already holds a run .*--resume .*--overwrite"):
        open_run_folder(o, (), True)
    assert (run / "metrics.jsonl").read_text().count("step") == 2  # untouched
    assert open_run_folder(_run_options(tmp_path, overwrite=True), (), True) == (None, None)
    assert sorted(p.name for p in run.iterdir()) == [".lock", "notes.txt"]  # the user's file stays
    with pytest.raises(UsageError, match="exclude each other"):
        _run_options(tmp_path, resume=True, overwrite=True).check()
    release_run_folder(o.out)


def test_open_run_folder_removes_stale_temp_files_and_resumes(tmp_path, capsys):
    o = _run_options(tmp_path, resume=True, lr=1.0)
    run = Path(o.out)
    _two_checkpoints(run)
    (run / ".tmp_step_00000003_999").mkdir()
    (run / ".tmp_step_00000003_999" / "state.pt").write_bytes(b"partial")
    (run / ".latest.tmp.999").write_text("step_00000003")
    folder, state = open_run_folder(o, ("lr",), True)
    assert folder.name == "step_00000002" and state["step"] == 2
    assert not any(p.name.startswith(".") and p.name != ".lock" for p in run.iterdir())
    assert "left by an interrupted save" in capsys.readouterr().err
    release_run_folder(o.out)


def test_a_second_writer_is_refused(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[2]); "
                               "from train.common import lock_run_folder; lock_run_folder(sys.argv[1]); "
                               "print('locked', flush=True); sys.stdin.read()", str(run), str(ROOT)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UsageError, match=f"is in use by another run \\(pid {holder.pid} on "):
            lock_run_folder(run)
    finally:
        holder.communicate("")
    lock_run_folder(run)  # free once the other run ended
    lock_run_folder(run)  # re-entrant within one process
    release_run_folder(run)


def test_metrics_resume_drops_a_torn_last_line_and_names_a_bad_one(tmp_path, capsys):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 2.0}\n{"step": 3, "lo')
    MetricsLogger(path, total_steps=4, start_step=2).close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    assert "torn last line" in capsys.readouterr().err
    path.write_text('{"step": 1}\n{"ste\n{"step": 2}\n')
    with pytest.raises(ValueError, match="m.jsonl: line 2 is not a JSON row"):
        MetricsLogger(path, total_steps=4, start_step=2)


def test_new_optimizer_options_apply_on_resume(capsys):
    w = torch.nn.Parameter(torch.ones(2))
    old = torch.optim.AdamW([w], lr=1e-3, weight_decay=0.0)
    w.grad = torch.ones(2)
    old.step()
    new = torch.optim.AdamW([w], lr=5e-4, weight_decay=0.1)
    new.load_state_dict(old.state_dict())
    assert new.param_groups[0]["lr"] == 1e-3  # what load_state_dict alone leaves
    apply_optimizer_options(new, RunOptions(lr=5e-4, weight_decay=0.1), True)
    assert (new.param_groups[0]["lr"], new.param_groups[0]["weight_decay"]) == (5e-4, 0.1)
    assert torch.equal(new.state[w]["exp_avg"], old.state[w]["exp_avg"])  # the moments are kept
    out = capsys.readouterr().out
    assert "resume: lr 0.001 -> 0.0005 (--lr)" in out and "resume: weight_decay 0.0 -> 0.1 (--weight-decay)" in out


def test_lr_multiplier_warmup_constant_and_cosine():
    # warmup: step / warmup up to the warmup's last step, then the schedule
    assert [lr_multiplier(s, 10, 4) for s in range(1, 7)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_multiplier(1, 10) == 1.0 and lr_multiplier(10, 10) == 1.0
    # cosine over the 10 steps after a warmup of 2: 0.1 + 0.45 (1 + cos(pi (step - 3) / 10))
    cos = [lr_multiplier(s, 12, 2, "cosine") for s in range(1, 13)]
    assert cos[:2] == [0.5, 1.0] and cos[2] == 1.0
    assert cos[7] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 5 / 10)))  # step 8: half way, 0.55
    assert all(a > b for a, b in zip(cos[2:], cos[3:])) and cos[-1] > 0.1
    with pytest.raises(ValueError, match="constant, cosine, linear"):
        lr_multiplier(1, 10, 0, "step")


@pytest.mark.parametrize("steps, warmup", [(1, 0), (7, 0), (13, 3), (9, 9)])
def test_linear_schedule_matches_transformers(steps, warmup):
    # transformers' get_linear_schedule_with_warmup (the Trainer's and TRL's default): the rate of optimizer step s
    # (1-based) is its lambda at s - 1 scheduler steps taken. After the warmup the two agree exactly; in the warmup
    # transformers starts at 0 (its first step does nothing), ours at 1 / warmup.
    from transformers import get_linear_schedule_with_warmup
    w = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([w], lr=1.0)
    sched = get_linear_schedule_with_warmup(opt, warmup, steps)
    theirs = []
    for _ in range(steps):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ours = [lr_multiplier(s, steps, warmup, "linear") for s in range(1, steps + 1)]
    assert ours[warmup:] == pytest.approx(theirs[warmup:], rel=1e-12, abs=0)
    assert ours[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    assert ours[-1] == pytest.approx(1 / max(steps - warmup, 1) if steps > warmup else 1.0)


def test_set_lr_and_a_scheduled_resume(capsys):
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([w], lr=1.0)
    opts = RunOptions(lr=2e-3, steps=10, warmup_steps=4, lr_schedule="cosine")
    assert set_lr(opt, opts, 2) == pytest.approx(1e-3) and opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    saved = dataclasses.asdict(opts)  # what a checkpoint's state["options"] holds
    resumed = torch.optim.AdamW([w], lr=2e-3)
    resumed.load_state_dict(opt.state_dict())
    apply_optimizer_options(resumed, opts, True, saved)  # the same --lr: the saved step's rate is no change of it
    assert "resume: lr" not in capsys.readouterr().out
    apply_optimizer_options(resumed, RunOptions(lr=1e-3, steps=10), True, saved)
    assert "resume: lr 0.002 -> 0.001 (--lr)" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--lr-schedule", "step"], "--lr-schedule must be one of constant, cosine, linear"),
    (["--steps", "5", "--warmup-steps", "6"], r"--warmup-steps must be in \[0, --steps 5\]"),
    (["--warmup-steps=-1"], "--warmup-steps must be in"),
])
def test_schedule_options_are_checked_up_front(args, message):
    with pytest.raises(UsageError, match=message):
        parse_options(RunOptions, args)


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--save-every", "0"], "--save-every must be >= 1"),
    (["--size", "40"], "--size must be a positive multiple of 16"),
    (["--lr", "nan"], "--lr must be >= 0"),
    (["--lr=-1e-3"], "--lr must be >= 0"),
    (["--lora-rank", "0"], "--lora-rank must be >= 1"),
    (["--dtype", "fp8"], "--dtype must be one of fp32, bf16, fp16"),
    (["--device", "tpu"], "--device must be auto, cpu or cuda"),
    (["--data", "/nonexistent/data"], "--data /nonexistent/data: no such file or folder"),
])
def test_run_options_are_checked_up_front(args, message):
    with pytest.raises(UsageError, match=message):
        parse_options(RunOptions, args)


def test_device_cuda_without_a_gpu_is_a_usage_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="--device cuda: no CUDA device is available"):
        parse_options(RunOptions, ["--device", "cuda"])


def test_a_bad_value_is_one_line_on_the_command_line(tmp_path):
    # noise level 1 is refused by the sampler: the option check refuses it before anything loads.
    proc = subprocess.run([sys.executable, str(ROOT / "train" / "grpo_decoder.py"), "--noise-level", "1",
                           "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "grpo_decoder.py: error: --noise-level must lie in (0, 1) (the SDE step's Gaussian needs a positive std; "
        "the sampler takes a < 1), got 1.0"]
    assert not (tmp_path / "x").exists()  # nothing started
    from train.grpo_decoder import Options
    with pytest.raises(UsageError, match=r"--noise-level must lie in \(0, 1\) .*got 0.0"):
        parse_options(Options, ["--noise-level", "0"])


def test_warn_zero_advantages(capsys):
    warn_zero_advantages(3, torch.zeros(4), True)
    assert "step 3: every sample of each group got the same reward" in capsys.readouterr().err
    warn_zero_advantages(3, torch.tensor([0.0, 1.0]), True)
    warn_zero_advantages(3, torch.zeros(4), False)  # other ranks stay quiet
    assert capsys.readouterr().err == ""


_GLOO_JOB = """
import os, sys
sys.path.insert(0, sys.argv[1])
import torch
from train.common import all_gather_cat, close_distributed, init_distributed, reduce_stats
d = init_distributed("cpu")
w = torch.nn.Parameter(torch.ones(3))
torch.optim.AdamW([w])  # the first optimizer imports torch._dynamo lazily
all_gather_cat(torch.ones(2))
reduce_stats([{"loss": torch.tensor(1.0)}])
close_distributed()
threads = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print("gloo threads left:", sorted(t for t in threads if "gloo" in t), flush=True)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads the process's threads from /proc (Linux)")
def test_leaving_the_process_group_stops_its_threads(tmp_path):
    # A group that outlives close_distributed() keeps gloo threads that race with interpreter shutdown (rank aborts
    # with "terminate called without an active exception" about 1 run in 20 under load); deterministic here.
    script = tmp_path / "job.py"
    script.write_text(_GLOO_JOB)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, str(script), str(ROOT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                              "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                              "OMP_NUM_THREADS": "1"}) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        assert "gloo threads left: []" in out, out


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


def test_build_uae_seeds_the_draws_of_a_stages_fresh_adapters(tmp_path):
    # torch seeds its global generator differently in every process, and each script draws its fresh adapters' A
    # from it right after build_uae: unseeded, two ranks would train from different adapters (they only average
    # gradients) and the same command would not repeat its run.
    from model.lora import apply_lora, lora_state_dict
    from model.uae import DIT_LORA_TARGETS, LLM_LORA_TARGETS
    from tests.fake_release import build_fake_release

    build_fake_release(tmp_path / "UAE")

    def fresh_adapters(seed: int) -> dict[str, torch.Tensor]:
        torch.rand(7)  # what this process drew before must not matter
        uae, _ = build_uae(RunOptions(uae=str(tmp_path / "UAE"), seed=seed), torch.float32, torch.device("cpu"))
        apply_lora(uae.lvlm.language_model, LLM_LORA_TARGETS.split(","), rank=2, alpha=2, init="kaiming")
        apply_lora(uae.dit, DIT_LORA_TARGETS.split(","), rank=2, alpha=2, init="gaussian")
        return {**lora_state_dict(uae.lvlm.language_model), **lora_state_dict(uae.dit)}

    first, again, other = fresh_adapters(0), fresh_adapters(0), fresh_adapters(1)
    assert first.keys() == again.keys() == other.keys() and len(first) > 4
    assert all(torch.equal(first[k], again[k]) for k in first)
    drawn = [k for k in first if "lora_A" in k]
    assert drawn and not any(torch.equal(first[k], other[k]) for k in drawn)
