"""eval/toy_world.py: the shortened run end to end (world preparation, the pipeline with the training scripts,
evaluation on held-out scenes, report), the world cache, and the targets' bookkeeping."""
import html
import json
import math
import os
import re
import time
from pathlib import Path

import pytest

from eval import toy_world
from eval.toy_world import mean, stderr
from train import world
from tests.run_helpers import one_thread  # noqa: F401 (an autouse fixture)


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    return out, toy_world.main(["--out", str(out), "--quick", "--workers", "2"])


def test_quick_run_writes_the_report(quick_report):
    out, report = quick_report
    saved = json.loads((out / "report.json").read_text())
    assert [(r["stage"], r["seed"]) for r in saved["stages"]] == [
        ("start", 0), ("cold_start", 0), ("grpo_encoder", 0), ("grpo_decoder", 0)]
    for row in saved["stages"]:
        for key in ("recon_score", "recon_stderr", "caption_len", "caption_recall", "caption_precision",
                    "caption_f1", "colour_accuracy", "recon_score_fixed", "attribute_accuracy"):
            assert math.isfinite(row[key]), (row["stage"], key)
        assert -1 <= row["recon_score"] <= 1 and 0 <= row["caption_recall"] <= 1
    assert {"recon_score", "recon_stderr"} <= set(saved["floor"]) and {"recon_score"} <= set(saved["ceiling"])
    assert [t["target"] for t in saved["targets"]][0] == "stage 2: caption recall"
    # The time budgets are targets too; the preparation's is what world.json recorded when the world was built.
    times = {t["target"]: t for t in saved["targets"] if t["target"].startswith("time: ")}
    recorded = json.loads((out / "world" / "world.json").read_text())["measured"]["prepare_s"]
    assert 0 < recorded <= saved["timing_s"]["prepare"]
    assert times["time: preparation"]["measured"] == f"{recorded / 60:.1f} min"
    assert set(times) == {"time: preparation", "time: pipeline and report"}
    assert "a --quick run" in saved["summary"]
    page = (out / "report.html").read_text()
    assert "Targets" in page and "floor (empty caption)" in page and "ceiling (ground-truth caption)" in page
    # The ladder: the ground-truth captions at every detail level through the start decoder, the last of them the
    # start's ceiling (the full captions, scored by the same renders).
    ladder = saved["ladder"]
    assert [r["level"] for r in ladder] == list(range(world.LEVELS))
    assert [r["example"] for r in ladder] == [world.describe(world.read_scenes(out / "world" / "data" / "heldout")[0],
                                                             level) for level in range(world.LEVELS)]
    assert ladder[-1]["recon_score"] == pytest.approx(saved["ceiling"]["start_decoder"]["recon_score"], abs=1e-9)
    assert "Ground-truth captions by detail level" in page and html.escape(ladder[1]["example"]) in page
    # What the reward CLIP pays for each attribute a caption states, as the world measured it when it was built.
    changes = saved["world"]["measured"]["clip"]["cos_change"]
    assert "What the reward pays" in page and all(f"{a} {c:.3f}" in page for a, c in changes.items())
    for name in ("reward_cold_start", "reward_grpo_encoder", "reward_grpo_decoder", "grid_reconstructions"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 0
    # Every stage ran with the real training scripts, from the previous stage (--init): the handoff says so.
    handoff = json.loads((out / "runs" / "seed0" / "grpo_decoder" / "step_00000002" / "model" / "handoff.json")
                         .read_text())
    assert [s["stage"] for s in handoff["stages"]] == ["sft_captioner", "sft_captioner", "sft_decoder", "cold_start",
                                                       "grpo_encoder", "grpo_decoder"]


def test_the_numbers_do_not_depend_on_the_workers(quick_report, tmp_path):
    # The fixture ran the pipeline's jobs in two worker processes; here they run one after another in this process.
    # Every job is on one thread and every stage seeds its draws (train/common.py build_uae), so the run repeats
    # exactly: a different count of workers (or of cores) is no reason for a result to move.
    out, report = quick_report
    again = toy_world.main(["--out", str(tmp_path), "--world", str(out / "world"), "--quick", "--workers", "1"])
    assert report["workers"] == 2 and again["workers"] == 1
    for key in ("stages", "floor", "ceiling", "controls"):
        assert again[key] == report[key], key

    def targets(r: dict) -> list[dict]:  # the time budgets differ, the rest may not
        return [t for t in r["targets"] if not t["target"].startswith("time: ")]

    assert targets(again) == targets(report)
    logs = sorted(p.name for p in (out / "runs" / "logs").iterdir())
    assert logs == ["seed0_cold_start.log", "seed0_grpo_decoder.log", "seed0_grpo_encoder.log", "start.log"]
    assert "step 1/" in (out / "runs" / "logs" / "seed0_grpo_encoder.log").read_text()


def _job(name: str, seconds: float = 0.0, fail: bool = False) -> dict:
    """A job for run_jobs (module level: spawned workers import it)."""
    import torch

    start = time.time()
    time.sleep(seconds)
    if fail:
        raise ValueError(f"{name} broke")
    return {"name": name, "threads": torch.get_num_threads(), "pid": os.getpid(), "start": start, "end": time.time()}


@pytest.mark.parametrize("workers", [1, 2])
def test_jobs_run_after_what_they_need_each_on_one_thread(workers):
    import torch

    torch.set_num_threads(2)  # run_jobs puts every job on one thread, and gives this process its threads back
    jobs = {"a": (("a", 0.3), ()), "b": (("b",), ("a",)), "c": (("c",), ()), "d": (("d",), ("b", "c"))}
    lines: list[str] = []
    got = toy_world.run_jobs(_job, jobs, workers, log=lines.append)
    assert torch.get_num_threads() == 2
    assert {n: r["name"] for n, r in got.items()} == {n: n for n in jobs} and len(lines) == len(jobs)
    for name, (_, needs) in jobs.items():
        assert got[name]["threads"] == 1
        assert all(got[name]["start"] >= got[n]["end"] for n in needs), name
    assert all((r["pid"] == os.getpid()) == (workers == 1) for r in got.values())


def test_a_failed_job_stops_the_run_and_is_named():
    jobs = {"bad": (("bad", 0.0, True), ()), "after": (("after",), ("bad",))}
    for workers in (1, 2):
        with pytest.raises(RuntimeError, match="job bad failed: ValueError.*bad broke"):
            toy_world.run_jobs(_job, jobs, workers, log=lambda line: None)
    # A job running beside the failed one is stopped, not waited for.
    import multiprocessing
    with pytest.raises(RuntimeError, match="job bad failed"):
        toy_world.run_jobs(_job, {"slow": (("slow", 600.0), ()), "bad": (("bad", 1.0, True), ())}, 2,
                           log=lambda line: None)
    assert not multiprocessing.active_children()
    with pytest.raises(ValueError, match=r"job 'x' needs \['nope'\], which are not jobs"):
        toy_world.run_jobs(_job, {"x": (("x",), ("nope",))}, 1)
    for workers in (1, 2):
        with pytest.raises(ValueError, match="wait on each other"):
            toy_world.run_jobs(_job, {"x": (("x",), ("y",)), "y": (("y",), ("x",))}, workers)
    assert toy_world.run_jobs(_job, {}, 2) == {}
    with pytest.raises(ValueError, match="unknown stage 'grpo_encoder_lr1'"):
        toy_world.train_stage(None, toy_world.QUICK, Path("runs"), 0, "grpo_encoder_lr1")
    with pytest.raises(SystemExit):
        toy_world.main(["--out", "unused", "--quick", "--workers", "0"])


def test_the_world_trains_its_models_with_the_plans_settings(quick_report):
    # The plan's SFT settings reach the training scripts: a dropped or misspelled option would train the world's
    # captioner or decoder with the scripts' defaults instead.
    from train.common import latest_checkpoint

    out, _ = quick_report
    plan = toy_world.QUICK
    _, decoder = latest_checkpoint(out / "world" / "runs" / "sft_decoder")
    assert {k: decoder["options"][k] for k in ("steps", "batch_size", "lr", "lr_schedule", "warmup_steps",
                                                "caption_dropout", "logit_mean")} == {
        "steps": plan.decoder_steps, "batch_size": plan.decoder_batch, "lr": plan.decoder_lr,
        "lr_schedule": plan.decoder_lr_schedule, "warmup_steps": plan.decoder_warmup_steps,
        "caption_dropout": plan.decoder_caption_dropout, "logit_mean": plan.decoder_logit_mean}
    # The decoder trains from a latent cache inside the world folder, so a rebuilt world never reads another's.
    assert Path(decoder["options"]["cache_latents"]).is_relative_to(out / "world")
    # The captioner: first on captions that name colours, then on the mix of detail levels from those weights.
    runs = out / "world" / "runs"
    for run, steps, data in (("sft_captioner_detail", plan.captioner_detail_steps, "train_detail"),
                             ("sft_captioner", plan.captioner_steps - plan.captioner_detail_steps, "train_mix")):
        _, captioner = latest_checkpoint(runs / run)
        assert {k: captioner["options"][k] for k in ("steps", "batch_size", "lr", "text_batch_size",
                                                      "text_weight")} == {
            "steps": steps, "batch_size": plan.captioner_batch, "lr": plan.captioner_lr,
            "text_batch_size": plan.captioner_text_batch, "text_weight": plan.captioner_text_weight}
        assert Path(captioner["options"]["data"]) == out / "world" / "data" / data / "data.jsonl"
    assert captioner["options"]["init"] == str(runs / "sft_captioner_detail")
    from train.world import parse
    detail = [parse(json.loads(line)["caption"])
              for line in (out / "world" / "data" / "train_detail" / "data.jsonl").read_text().splitlines()]
    assert detail and all(p.objects and all(o.colour for o in p.objects) for p in detail)  # every object's colour named


def test_stage_2_runs_with_the_plans_settings(quick_report):
    # The plan's stage-2 settings reach grpo_encoder, its learning rate decaying as the plan's schedule says.
    from train.common import latest_checkpoint, lr_multiplier

    out, _ = quick_report
    plan = toy_world.QUICK
    run = out / "runs" / "seed0" / "grpo_encoder"
    _, state = latest_checkpoint(run)
    assert {k: state["options"][k] for k in ("steps", "group_size", "images_per_step", "lr", "lr_schedule")} == {
        "steps": plan.encoder_steps, "group_size": plan.encoder_group, "images_per_step": plan.encoder_images,
        "lr": plan.encoder_lr, "lr_schedule": plan.encoder_lr_schedule}
    lrs = [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    expected = [plan.encoder_lr * lr_multiplier(s, plan.encoder_steps, 0, plan.encoder_lr_schedule)
                for s in range(1, plan.encoder_steps + 1)]
    assert plan.encoder_lr_schedule == "linear" and lrs == pytest.approx(expected) and lrs[-1] < lrs[0]


def test_the_main_job_runs_on_the_world_with_its_train_args(quick_report):
    # The toy world's third command in the README: train/grpo_decoder.py on the prepared world, from its start,
    # with the held-out scenes evaluated before the first step and after the last.
    import shlex

    import train.grpo_decoder as gd

    out, _ = quick_report
    args = shlex.split((out / "world" / "train.args").read_text())
    run = out / "main_job"
    gd.main(args + ["--group-size", "2", "--steps", "1", "--lora-rank", "2", "--out", str(run)])
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals] == [0, 1] and len(evals[0]["eval_rewards"]) == toy_world.QUICK.n_heldout
    assert all(-1 <= x <= 1 for r in evals for x in r["eval_rewards"])


def test_prepare_only_reuses_the_world_and_prints_the_main_job(quick_report, capsys):
    # --prepare-only stops after the world: no job runs and the report stays as it was; it prints the main job's
    # command on that world.
    out, _ = quick_report
    report_before = (out / "report.json").stat().st_mtime_ns
    runs_before = sorted(p.name for p in (out / "runs").iterdir())
    result = toy_world.main(["--out", str(out), "--quick", "--prepare-only"])
    printed = capsys.readouterr().out
    command = toy_world.main_job_command(toy_world.World(out / "world"), toy_world.QUICK)
    assert result == {"world": str(out / "world"), "main_job": command}
    assert "using the prepared world" in printed and command in printed and "running the pipeline" not in printed
    assert f"$(cat {out / 'world' / 'train.args'})" in command and "--steps 2 " in command
    assert (out / "report.json").stat().st_mtime_ns == report_before
    assert sorted(p.name for p in (out / "runs").iterdir()) == runs_before


def test_the_readme_runs_the_main_job_on_the_world_with_the_plans_stage_3():
    # The README's command for the main job on the world is the one --prepare-only prints for the default plan.
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    joined = re.sub(r"\\\n\s+", "", readme)  # backslash-continued lines joined
    command = toy_world.main_job_command(toy_world.World(Path("runs/toy_world/world")), toy_world.Plan())
    assert command in joined
    assert "python -m eval.toy_world --out runs/toy_world --prepare-only" in readme


def test_the_prepared_world_is_reused_and_never_mixed(quick_report, capsys):
    out, _ = quick_report
    world = out / "world"
    before = (world / "world.json").read_text()
    toy_world.prepare_world(world, toy_world.QUICK, rebuild=False)
    assert "using the prepared world" in capsys.readouterr().out and (world / "world.json").read_text() == before
    other = toy_world.dataclasses.replace(toy_world.QUICK, world_seed=1)
    with pytest.raises(SystemExit, match="prepared with other settings .*world_seed.*--rebuild"):
        toy_world.prepare_world(world, other, rebuild=False)
    # No model depends on the held-out scenes: another count reuses the world and rewrites only that split, the
    # first scenes staying the same.
    from train.world import read_scenes
    first = read_scenes(world / "data" / "heldout")
    models = {p: p.stat().st_mtime_ns for p in (world / "base").rglob("*.safetensors")}
    more = toy_world.dataclasses.replace(toy_world.QUICK, n_heldout=toy_world.QUICK.n_heldout + 3)
    toy_world.prepare_world(world, more, rebuild=False)
    assert read_scenes(world / "data" / "heldout")[:len(first)] == first
    assert len((world / "data" / "heldout" / "data.jsonl").read_text().splitlines()) == more.n_heldout
    assert {p: p.stat().st_mtime_ns for p in (world / "base").rglob("*.safetensors")} == models
    toy_world.prepare_world(world, toy_world.QUICK, rebuild=False)
    assert read_scenes(world / "data" / "heldout") == first
    assert len(list((world / "data" / "heldout" / "images").iterdir())) == len(first)


def test_evaluator_renders_each_caption_as_if_alone(quick_report):
    # Captions of one token length share a batch (no padding): every image equals the caption drawn alone from its
    # seed, up to one grey level of rounding, in the captions' order.
    import numpy as np
    import torch

    out, _ = quick_report
    ev = toy_world.Evaluator(toy_world.World(out / "world"), toy_world.QUICK)
    uae = ev.model(None)
    captions = ["a gray background.", ev.full_captions[0], "", ev.full_captions[1], "a white background."]
    images = ev.render(uae, captions)
    alone = [uae.generate([c], toy_world.SIZE, toy_world.SIZE, toy_world.QUICK.sample_steps,
                          toy_world.QUICK.guidance_scale, torch.Generator().manual_seed(10_000 + i))[0]
             for i, c in enumerate(captions)]
    diffs = [np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() for a, b in zip(images, alone)]
    assert max(diffs) <= 1, diffs
    assert np.abs(np.asarray(images[0], dtype=int) - np.asarray(images[4], dtype=int)).max() > 1  # other seeds


def test_colour_logits_are_the_next_token_logits_after_each_cue(quick_report):
    # The batched, teacher-forced read equals a plain forward over each cue's prompt + prefix alone, at its last token.
    import torch

    from train import world

    out, _ = quick_report
    ev = toy_world.Evaluator(toy_world.World(out / "world"), toy_world.QUICK)
    uae = ev.model(None)
    assert len({len(uae.processor.encode(prefix)) for _, prefix, _ in ev.cues}) > 1  # padding is exercised
    candidates = [uae.processor.encode(" " + c)[0] for c in world.A_COLOURS]
    reference = []
    for k, prefix, _ in ev.cues:
        inputs = uae.caption_inputs([ev.sources[k]])
        ids = torch.cat([inputs["input_ids"], torch.tensor([uae.processor.encode(prefix)])], dim=1)
        hidden = uae.lvlm.forward_hidden(ids, pixel_values=inputs["pixel_values"],
                                         image_grid_thw=inputs["image_grid_thw"])
        reference.append(uae.lvlm.lm_head(hidden[0, -1])[candidates])
    torch.testing.assert_close(ev.colour_logits(uae), torch.stack(reference).detach(), rtol=1e-4, atol=1e-5)
    named = [world.A_COLOURS[int(j)] for j in torch.stack(reference).argmax(-1)]
    assert ev.colour_accuracy(uae) == sum(n == c for n, (_, _, c) in zip(named, ev.cues)) / len(ev.cues)


def test_a_folder_that_is_not_a_world_is_refused(tmp_path):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "mine.txt").write_text("x")
    with pytest.raises(SystemExit, match="holds no finished world"):
        toy_world.prepare_world(tmp_path / "w", toy_world.QUICK, rebuild=False)
    assert (tmp_path / "w" / "mine.txt").exists()


def _row(stage, seed, recon, err=0.01, recall=0.5, length=10.0, fixed=0.5, acc=0.5):
    return {"stage": stage, "seed": seed, "recon_score": recon, "recon_stderr": err, "caption_recall": recall,
            "caption_len": length, "recon_score_fixed": fixed, "recon_stderr_fixed": err, "attribute_accuracy": acc}


def test_a_plan_whose_captioner_parts_do_not_fit_is_refused():
    # The mix comes last (the decoder starts from its run): all 1200 steps on the detail captions leave none for it.
    with pytest.raises(ValueError, match=r"captioner_detail_steps must be in \[0, captioner_steps 1200\), got 1200"):
        toy_world.Plan(captioner_detail_steps=1200)
    with pytest.raises(ValueError, match="got -1"):
        toy_world.Plan(captioner_detail_steps=-1)
    assert toy_world.Plan(captioner_detail_steps=0).captioner_detail_steps == 0  # the mix alone


FLOOR = {"recon_score": 0.1, "recon_stderr": 0.01}  # the empty caption's row, without per-image scores


def test_targets_are_judged_from_the_rows():
    rows = [_row("cold_start", 0, 0.80, recall=0.3, length=8), _row("grpo_encoder", 0, 0.90, recall=0.6, length=14),
            _row("grpo_decoder", 0, 0.91, fixed=0.7, acc=0.8)]
    met = {t["target"]: t["met"] for t in toy_world.check_targets(rows, {"lr0": _row("x", 0, 0.805)}, floor=FLOOR)}
    assert met == {"stage 2: caption recall": True, "stage 2: caption length": True,
                   "stage 2: reconstruction score": True, "stage 2 control lr 0: flat": True,
                   "stage 3: reconstruction score with fixed captions": True, "stage 3: attribute accuracy": True,
                   "benchmark: ceiling above and floor below every trained row": False}
    # The ceiling of a row is its own decoder's score from the ground-truth captions (recon_score_fixed): the cold
    # start's and stage 2's rows above have 0.5 there, below their own scores.
    for r in rows:
        r["recon_score_fixed"] = 0.95
    bench = {t["target"]: t for t in toy_world.check_targets(rows, {}, floor=FLOOR)}[
        "benchmark: ceiling above and floor below every trained row"]
    assert bench["met"] and bench["measured"] == [pytest.approx(0.04), pytest.approx(0.7)]
    # Without per-image scores, in standard errors of the unpaired difference (0.01 on each side).
    assert bench["in_stderrs"] == [pytest.approx(0.04 / math.hypot(0.01, 0.01), abs=0.01),
                                   pytest.approx(0.7 / math.hypot(0.01, 0.01), abs=0.01)]
    assert not {t["target"]: t for t in toy_world.check_targets(rows, {}, floor={**FLOOR, "recon_score": 0.85})}[
        "benchmark: ceiling above and floor below every trained row"]["met"]
    rows[1]["caption_len"] = 11.0  # 1.375x: missed, and said so
    rows[2]["attribute_accuracy"] = 0.5
    met = {t["target"]: t["met"] for t in toy_world.check_targets(rows, {"lr0": _row("x", 0, 0.9)}, floor=FLOOR)}
    assert not met["stage 2: caption length"] and not met["stage 3: attribute accuracy"]
    assert not met["stage 2 control lr 0: flat"]


def test_time_targets_hold_the_budget():
    met = {t["target"]: t["met"] for t in toy_world.time_targets(toy_world.BUDGET_S, toy_world.BUDGET_S + 1)}
    assert met == {"time: preparation": True, "time: pipeline and report": False}


def test_a_change_is_judged_against_the_per_image_change():
    # The same 4 scenes before and after: each image's score moves by 0.1 +- 0.01 while the scenes spread by 0.5, so
    # the change is many standard errors of the per-image change, and well within the unpaired standard errors.
    before = [0.1, 0.9, -0.4, 0.5]
    after = [x + 0.1 + d for x, d in zip(before, (0.01, -0.01, 0.0, 0.005))]
    a, b = _row("cold_start", 0, mean(before), err=stderr(before)), _row("grpo_encoder", 0, mean(after),
                                                                        err=stderr(after))
    assert toy_world._change_stderr(a, b, "") > 0.1 / 3  # without the per-image scores: not 3 standard errors up
    a["recon_per_image"], b["recon_per_image"] = before, after
    diffs = [y - x for x, y in zip(before, after)]
    assert toy_world._change_stderr(a, b, "") == pytest.approx(stderr(diffs))
    met = {t["target"]: t for t in toy_world.check_targets([a, b], {})}["stage 2: reconstruction score"]
    assert met["met"] and met["measured"][0] == pytest.approx(mean(diffs) / stderr(diffs), abs=0.01)


def test_the_ceiling_margin_is_judged_against_the_per_image_difference():
    # A row 0.05 above its ceiling on average, image by image all over the place (+-0.3): above the ceiling, so the
    # target is missed, but by well under 3 standard errors of the paired difference, and the report says how many.
    row = _row("grpo_encoder", 0, 0.45, fixed=0.40)
    ceiling = [0.1, 0.9, -0.4, 0.5, 0.3, 0.6]
    diffs = [0.35, -0.25, 0.3, -0.2, 0.25, -0.15]
    row["recon_fixed_per_image"], row["recon_per_image"] = ceiling, [c + d for c, d in zip(ceiling, diffs)]
    row["recon_score_fixed"], row["recon_score"] = mean(ceiling), mean(row["recon_per_image"])
    gaps = [0.5, 0.51, 0.49, 0.5, 0.52, 0.48]  # the floor ~0.5 below the row, image by image
    floor_images = [x - g for x, g in zip(row["recon_per_image"], gaps)]
    floor = {"recon_score": mean(floor_images), "recon_stderr": stderr(floor_images), "recon_per_image": floor_images}
    bench = {t["target"]: t for t in toy_world.check_targets([row], {}, floor=floor)}[
        "benchmark: ceiling above and floor below every trained row"]
    assert not bench["met"] and bench["measured"][0] == pytest.approx(-mean(diffs))
    assert bench["in_stderrs"][0] == pytest.approx(-mean(diffs) / stderr(diffs), abs=0.01)
    assert -3 < bench["in_stderrs"][0] < 0
    assert bench["in_stderrs"][1] == pytest.approx(mean(gaps) / stderr(gaps), abs=0.01)  # paired as well
