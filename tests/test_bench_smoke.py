"""The bench/ plumbing on tiny shapes: every script's --help, `bench/run_all.py --smoke` end to end (each benchmark
in its own process, CPU, Triton's interpreter), the JSON and markdown it writes, and the target arithmetic. The
smoke numbers are timings of toy shapes and are never asserted; the kernels' errors against SDPA / fp32 are."""
import importlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402
import run_all  # noqa: E402

SCRIPTS = ["attention", "logprob", "generate", "grpo_decoder_step", "grpo_encoder_step", "data_path"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "bench/run_all.py", "--smoke", "--results-dir", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (json_file,) = out.glob("*-smoke.json")
    return json.loads(json_file.read_text()), (out / "RESULTS.md").read_text()


def test_every_script_has_help(capsys):
    for name in SCRIPTS + ["run_all"]:
        with pytest.raises(SystemExit) as exit_:
            importlib.import_module(name).main(["--help"])
        text = capsys.readouterr().out
        assert exit_.value.code == 0 and "--smoke" in text and "--quick" in text, name


def test_run_all_smoke_runs_every_benchmark(smoke):
    summary, _ = smoke
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == ["attention", "logprob", "generate", "grpo_decoder_step sd3.5-medium",
                           "grpo_encoder_step", "data_path"]
    for s in steps.values():
        assert s["rc"] == 0 and s["result"]["smoke"] and s["result"]["rows"], s["name"]
        assert s["result"]["env"]["torch"] and s["result"]["command"].startswith("python bench/")

    attention = steps["attention"]["result"]["rows"]
    assert {r["impl"] for r in attention} == {"ours", "sdpa", "loop sdpa"}
    assert {r["pass"] for r in attention} == {"fwd", "fwd+bwd"}
    ours = [r for r in attention if r["impl"] == "ours"]
    assert len(ours) == 8 and all(r["max_abs_err"] < 1e-4 for r in ours)  # fp32 under the interpreter

    logprob = steps["logprob"]["result"]["rows"]
    assert {(r["impl"], r["grads"]) for r in logprob} == {(i, g) for i in ("ours", "naive")
                                                          for g in ("hidden", "hidden+head")}
    assert all(r["logprob_err"] < 1e-4 and r["dh_err"] < 1e-4 for r in logprob)

    generate = steps["generate"]["result"]["rows"]
    assert {(r["impl"], r["batch"]) for r in generate} == {(i, b) for i in ("ours eager", "hf generate")
                                                           for b in (1, 2)}
    assert all(r["new_tokens"] == 8 and r["tok_per_s"] > 0 for r in generate)

    (grpo,) = steps["grpo_decoder_step sd3.5-medium"]["result"]["rows"]
    assert grpo["finite"] and grpo["trained_steps"] == 2
    assert grpo["step_s"] == pytest.approx(grpo["sampling_s"] + grpo["reward_s"] + grpo["training_s"], abs=2e-3)

    sequential, batched = steps["grpo_encoder_step"]["result"]["rows"]
    assert (sequential["variant"], batched["variant"]) == ("sequential", "batched")
    for row in (sequential, batched):
        assert row["finite"] and row["G"] == 8 and row["caption_tokens"] > 0
        assert row["step_s"] == pytest.approx(sum(row[k] for k in ("sample_s", "render_s", "reward_s", "update_s")),
                                              abs=5e-3)
    speedup = next(t for t in steps["grpo_encoder_step"]["result"]["targets"] if t["target"].startswith("stage-2"))
    assert speedup["value"] == pytest.approx(sequential["step_s"] / batched["step_s"], rel=1e-3)

    data, step = steps["data_path"]["result"]["rows"][:-1], steps["data_path"]["result"]["rows"][-1]
    assert [r["workers"] for r in data] == [0, 2] and all(r["samples_per_s"] > 0 for r in data)
    assert step["path"] == "step" and step["step_s"] == pytest.approx(step["vae_s"] + step["dit_s"], abs=2e-3)
    (ratio,) = steps["data_path"]["result"]["targets"]
    assert ratio["value"] == pytest.approx(data[1]["samples_per_s"] / step["samples_per_s"], rel=1e-2)

    names = [t["target"] for t in summary["targets"]]
    assert sum(n.startswith("attention ") for n in names) == 6 and sum(n.startswith("varlen ") for n in names) == 2
    assert sum(n.startswith("logprob ") for n in names) == 2 and any(n.startswith("generate B1") for n in names)


def test_markdown_says_smoke_and_lists_targets(smoke):
    summary, md = smoke
    assert "SMOKE RUN" in md and summary["env"]["card"] in md and "python bench/run_all.py --smoke" in md
    assert "## Targets of issue 7" in md and md.count("\n| attention smoke") == 6
    for step in summary["steps"]:
        assert f"## {step['name']}" in md


def test_full_run_plan_and_time_budget(tmp_path):
    args = lambda **kw: run_all.argparse.Namespace(**{**dict(smoke=False, quick=False, no_tests=False,  # noqa: E731
                                                             only=""), **kw})
    plan = run_all.steps(args())
    # The issue-16 data check runs ahead of SD3.5-large, the step a short budget drops first.
    assert [n for n, _, _ in plan] == ["tests", "attention", "logprob", "generate", "grpo_decoder_step sd3.5-medium",
                                       "grpo_encoder_step", "data_path", "grpo_decoder_step sd3.5-large"]
    assert plan[-3][1][-1] == "--cuda-graph" and plan[-2][1][-2:] == ["--workers", "0,2,8"]
    assert all(t in plan[0][1] for t in run_all.TESTS)
    assert plan[-1][1][-3:] == ["sd3.5-large", "--attention", "sdpa,triton"]
    quick = run_all.steps(args(quick=True))
    assert all("--quick" in argv for n, argv, _ in quick if n != "tests") and quick[-1][1][-1] == "sdpa"
    assert [n for n, _, _ in run_all.steps(args(only="logprob,grpo"))] == [
        "logprob", "grpo_decoder_step sd3.5-medium", "grpo_encoder_step", "grpo_decoder_step sd3.5-large"]

    (tmp_path / "RESULTS.md").write_text("# old GPU run\n" + run_all.CPU_SECTION + "\n\nkept by hand\n")
    summary = run_all.main(["--smoke", "--budget-s", "0", "--results-dir", str(tmp_path)])
    assert summary["steps"] and all(s["rc"] == "skipped: time budget spent" for s in summary["steps"])
    md = (tmp_path / "RESULTS.md").read_text()
    assert "skipped: time budget spent" in md and "old GPU run" not in md
    assert md.endswith(run_all.CPU_SECTION + "\n\nkept by hand\n")  # the hand-recorded CPU numbers survive


def test_target_verdicts():
    hit = common.target("x", 1.2, 0.9, higher=True)
    assert hit["met"] and hit["verdict"] == "met"
    low = common.target("x", 0.45, 0.9, higher=True)
    assert not low["met"] and low["gap"] == 0.5 and "needs 2.00x more" in low["verdict"]
    over = common.target("x", 0.3, 0.2, higher=False)
    assert not over["met"] and "1.50x the goal" in over["verdict"]
    assert common.target("x", 0.1, 0.2, higher=False)["met"]
    assert common.target("x", None, 0.2, higher=False)["verdict"] == "not measured"


def test_step_timeout_kills_its_process_group(tmp_path):
    pid_file = tmp_path / "pid"
    child = f"import subprocess, time; p = subprocess.Popen(['sleep', '60']); open({str(pid_file)!r}, 'w').write(" \
            "str(p.pid)); time.sleep(60)"
    step = run_all.run_step("sleepy", ["-c", child], 3, tmp_path)
    assert step["rc"] == "timeout" and step["seconds"] < 30
    stat = Path(f"/proc/{int(pid_file.read_text())}/stat")

    def alive():  # a killed process may linger as a zombie until something reaps it
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (FileNotFoundError, ProcessLookupError):
            return False

    for _ in range(50):
        if not alive():
            break
        time.sleep(0.1)
    assert not alive()  # the grandchild went with the group
