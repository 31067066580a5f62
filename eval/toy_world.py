"""The toy world: UAE's pipeline end to end on procedural scenes with exact ground truth, on a CPU.

    python -m eval.toy_world --out runs/toy_world            # prepare the world (cached), run the pipeline, report
    python -m eval.toy_world --out /tmp/toy_world --quick    # a shortened run (what the tests run)
    python -m eval.toy_world --out runs/toy_world --prepare-only   # the world alone, for the main job on it

A scene is a background and 1-3 objects (colour, shape, size, cell of a 3x3 grid; train/world.py); its captions
exist at five detail levels and a parser maps any caption back to the attributes it states, so a caption's precision
and recall against the true scene are exact. The world's models are trained here with the project's own code and
saved in the official layouts (train/world_models.py): a VAE (autoencoder), a CLIP trained contrastively (the frozen
reward and benchmark backbone), a byte-level BPE tokenizer with the Qwen chat tokens, then a captioner
(train/sft_captioner.py, full-parameter, first on captions that name colours, then on a MIX of detail levels, so the
starting policy says little and sometimes more, with its text objective on the world's echo texts, so that the LM's
last states keep what a caption says) and a decoder (train/sft_decoder.py, full-parameter, on full-detail captions,
10% of them replaced by UAE's negative prompt so that classifier-free guidance subtracts a prediction the decoder
was trained for). The result is the pipeline's start.

The pipeline, per seed, with the same scripts as the real models: cold start -> GRPO on the captioner (the decoder
frozen, its text encoding included: --text-encoder frozen) -> Flow-GRPO on the decoder; plus two stage-2 controls
on the first seed (lr 0: must stay flat; token_mean loss normalisation: must rise too, so the gain is not a length
bias of the per-sequence mean). After every stage the model is evaluated on held-out scenes, Unified-Bench style:
greedy caption -> regenerate -> cosine of the world CLIP's image features (recon_score, with its standard error
over images; a change between stages is judged against the standard error of the per-image change, the scenes and
render seeds being the same at every stage), caption length and attribute precision / recall / F1, and what the
captioner sees apart from what it says (colour_accuracy: teacher-forced on a level-2 caption up to an object's colour,
is that colour its most likely next word; chance 1 / 5); and the decoder alone, from the ground-truth full captions:
recon_score_fixed and attribute_accuracy (is each object's colour present in its cell of the generated image: a
GenEval in miniature). Floor: the empty caption; ceiling: the ground-truth full caption, both through the start
decoder and the last stage's (a seed's own ceiling is its last stage's recon_score_fixed); between them the ladder:
the ground-truth captions at each detail level through the start decoder.

Each stage of each seed, trained then scored, is a job (`pipeline_jobs`); `run_jobs` runs them in --workers spawned
processes of one thread each, a job as soon as the one it starts from is done, its training output in runs/logs/.

Writes DIR/report.json ({"stages": [...], "floor": ..., "ceiling": ..., "ladder": ..., "targets": ...}),
DIR/report.html (tables, reward curves, source / reconstruction grids and captions before and after) and the runs
under DIR/runs/. The world lives in DIR/world/ (or --world): reused when its recorded settings match (the held-out
split is rewritten to the plan's count; no model depends on it), rebuilt with --rebuild, else an error.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import html
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image, ImageDraw

from eval.cli import HelpFormatter, write_json, write_text

WORLD_VERSION = 7  # bump when train/world.py or train/world_models.py change what a prepared world holds
SIZE = 64  # image size of the world, in pixels
BUDGET_S = 15 * 60  # the time targets: preparing the world, and the pipeline with its report, each on 2 CPU cores


@dataclass(frozen=True)
class Plan:
    """Every size and step count of a toy-world run; --quick takes QUICK."""
    world_seed: int = 0
    seeds: tuple[int, ...] = (0, 1, 2)
    n_train: int = 4000
    # Held-out scenes of the evaluation (none is a train scene: train/world.py `is_heldout`); no model of the world
    # depends on them, so a prepared world takes another count without a rebuild. 128: the standard error of a
    # stage's per-image change is ~0.04 there, against stage 2's ~+0.1.
    n_heldout: int = 128
    # Measured alone on a 2-core VM (2026-12-01): captioner SFT ~0.33 s/step (32 pairs + 16 texts), cold start
    # ~0.9 s/step, GRPO on the captioner ~1 s/step (2 images x G 8, 40 tokens), Flow-GRPO ~2.1 s/step (2 x 8, 8 steps,
    # all 7 trained); decoder SFT 0.12 s/step at batch 16 from its latent cache (2026-12-02). Some 2-core VMs (AMD EPYC)
    # were ~2.5x slower throughout; there the stage 3 below (4 x 8, 3 trained steps) took ~5 s/step.
    # 1200 steps in all (both parts below): the 4-layer LM attends to an object's few visual tokens only after a
    # plateau; on the mix alone the start captioner named an object's colour right 20% / 24% / 64% of the time (chance
    # 20%) after 400 / 800 / 1200 steps, and a captioner that cannot see the objects adds wrong ones when stage 2
    # makes it say more.
    captioner_steps: int = 1200
    captioner_batch: int = 32
    captioner_lr: float = 2e-3
    # Caption levels of the captioner's SFT pairs, drawn uniformly from this list: mostly terse (background, count),
    # sometimes more, so that the start policy often says little and RL can find that detail pays.
    captioner_levels: tuple[int, ...] = (0, 0, 1, 1, 2, 3, 4)
    # The first 600 steps train on captions that all name colours (levels 2-4), the last 600 on the mix above (a
    # second run of train/sft_captioner.py, from the first's weights): in the mix only 3 pairs in 7 say what colour
    # an object is, and the LM left its plateau late and at a machine's whim (colour accuracy 0.31 / 0.41 / 0.56 after
    # 1200 steps at lr 4e-3 / 2e-3 / 3e-3 on one AMD VM, 0.68 at 2e-3 on an Intel one). This way, on that AMD VM:
    # 0.88 / 0.71 at sampler seeds 0 / 1 (2026-12-03), and the greedy start caption stays terse (5 words, mostly "a
    # gray background."): the mix comes last.
    captioner_detail_steps: int = 600
    captioner_detail_levels: tuple[int, ...] = (2, 3, 4)
    # The captioner SFT's text objective (train/sft_captioner.py --text-data) on echo texts of the train captions:
    # without it the LM's last states lose what a caption says and the decoder SFT cannot learn to follow captions.
    captioner_text_batch: int = 16
    captioner_text_weight: float = 1.0
    # 2700 steps of 16 at lr 2e-3: the DiT learns where a caption puts objects only slowly. Measured on one captioner
    # (2026-12-02, ground-truth-caption score / attribute accuracy on 128 held-out scenes): 600 x 32 at lr 1e-3 0.24 /
    # 0.35, whose loss at sigma 0.97 (0.51) was that of knowing the background alone (0.48): it ignored the objects;
    # 1500 x 32 at 2e-3 0.27 / 0.40; 2400 x 32 at 2e-3 0.38 / 0.39; 2400 x 16 0.31 / 0.25; 3000 x 16 0.37 / 0.39.
    # 2700 rather than 3000 (until WORLD_VERSION 6): with 3000 the preparation took 15.2-15.6 min, over its 15.
    decoder_steps: int = 2700
    decoder_batch: int = 16
    decoder_lr: float = 2e-3
    decoder_lr_schedule: str = "cosine"
    decoder_warmup_steps: int = 30
    # Pairs trained with UAE's negative prompt in place of their caption (SD3's text dropout): classifier-free
    # guidance subtracts the decoder's prediction for the negative prompt, which without dropout is a text it never
    # saw. Measured on one captioner (2026-12-02): ground-truth-caption score 0.29 / 0.13 at decoder seeds 0 / 1
    # without dropout, 0.23 / 0.28 with it.
    decoder_caption_dropout: float = 0.1
    # Training noise levels drawn higher than SD3's logit-normal(0, 1) (mean sigma 0.85 instead of 0.70): where an
    # object goes is decided at high noise, and at mean 0 the decoder learned backgrounds and colours but put few
    # objects where the caption said. Measured on one captioner (2026-12-02): ground-truth-caption score 0.15 / 0.17
    # at seeds 0 / 1, against 0.08 at mean 0.
    decoder_logit_mean: float = -1.0
    caption_tokens: int = 40  # a full-detail caption of 3 objects is at most 31 world tokens
    sample_steps: int = 8
    guidance_scale: float = 3.0
    cold_start_steps: int = 20
    cold_start_lr: float = 1e-4
    encoder_steps: int = 48
    encoder_group: int = 8
    encoder_images: int = 2
    encoder_lr: float = 1e-3
    # Decayed linearly to 0 (transformers' get_linear_schedule_with_warmup, TRL's GRPOTrainer default). Measured seed
    # for seed from run N's cold starts (2026-12-03, one thread per process), recall change on seeds 0-5: constant
    # +0.22 / +0.24 / -0.02 / +0.20 / +0.03 / +0.17 (seed 2 settled on "one object on a ... background.", seed 4
    # collapsed into colour words repeated to the token limit), linear +0.21 / +0.24 / +0.10 / +0.18 / +0.17 / +0.17
    # at higher precision and no collapse; linear from 1.5e-3: seed 2 +0.09.
    encoder_lr_schedule: str = "linear"
    decoder_rl_steps: int = 40
    decoder_rl_group: int = 8
    decoder_rl_images: int = 4
    decoder_rl_lr: float = 3e-4
    # Stage 3 runs the first 3 of the 8 denoising steps as SDE and trains them, ODE elsewhere (Flow-GRPO-Fast's
    # window): the layout of a scene is decided early, and fewer trained steps mean fewer noise terms in the policy
    # gradient; on the world this learns faster per second than all 7 steps at 2 images per step.
    decoder_rl_sde_window: str = "0:3"
    lora_rank: int = 16
    controls: bool = True
    quick_world: bool = False

    def __post_init__(self):
        # The mix comes last: its run (runs/sft_captioner) is the captioner the decoder SFT starts from.
        if not 0 <= self.captioner_detail_steps < self.captioner_steps:
            raise ValueError(f"Plan.captioner_detail_steps must be in [0, captioner_steps {self.captioner_steps}), "
                             f"got {self.captioner_detail_steps}")

    def world_settings(self) -> dict:
        """What the prepared world depends on: a world prepared with other values is not this one."""
        keys = ("world_seed", "n_train", "captioner_steps", "captioner_batch", "captioner_lr",
                "captioner_levels", "captioner_detail_steps", "captioner_detail_levels", "captioner_text_batch",
                "captioner_text_weight", "decoder_steps", "decoder_batch",
                "decoder_lr", "decoder_lr_schedule", "decoder_warmup_steps", "decoder_caption_dropout",
                "decoder_logit_mean", "quick_world")
        values = {k: getattr(self, k) for k in keys}
        # As world.json stores them (tuples come back as lists), so a reused world compares equal.
        return {"version": WORLD_VERSION, "size": SIZE, **json.loads(json.dumps(values))}


QUICK = Plan(seeds=(0,), n_train=32, n_heldout=4, captioner_steps=2, captioner_detail_steps=1, captioner_batch=4,
             captioner_text_batch=2, decoder_steps=2, decoder_batch=4, decoder_warmup_steps=0, caption_tokens=12,
             sample_steps=2, cold_start_steps=1, encoder_steps=2, encoder_group=2, encoder_images=1, decoder_rl_steps=2,
             decoder_rl_group=2, decoder_rl_images=1, decoder_rl_sde_window="0:1", lora_rank=4, controls=False,
             quick_world=True)


# ----------------------------------------------------------------------------------------------- the world

@dataclass
class World:
    folder: Path

    @property
    def base(self) -> Path:
        return self.folder / "base"

    def base_args(self) -> list[str]:
        """The world's base model as the training scripts' plain parts."""
        b = self.base
        return ["--lvlm", str(b / "lvlm"), "--sd3", str(b / "sd3"), "--connector", str(b / "connector.safetensors"),
                "--pooled", str(b / "pooled.safetensors"), "--size", str(SIZE), "--device", "cpu"]

    @property
    def clip(self) -> Path:
        return self.base / "clip"

    def write_train_args(self, plan: Plan) -> Path:
        """`train.args`: the options that put train/grpo_decoder.py on the world, for `torchrun
        train/grpo_decoder.py $(cat WORLD/train.args)` (the README): its base, its start, its reward, the sampler
        of the pipeline's stage 3, its data with the full-detail captions (stage 3's --dataset-captions), and the
        held-out scenes as --eval-data, where the decoder's gain shows."""
        args = self.base_args() + [
            "--init", str(self.start), "--clip", str(self.clip), "--data", str(self.data("train_full")),
            "--dataset-captions", "--sample-steps", str(plan.sample_steps), "--guidance-scale",
            str(plan.guidance_scale), "--eval-data", str(self.data("heldout")), "--eval-images",
            str(min(32, plan.n_heldout))]
        path = self.folder / "train.args"
        write_text(path, " ".join(args) + "\n")
        return path

    def data(self, name: str) -> Path:
        return self.folder / "data" / name / "data.jsonl"

    @property
    def start(self) -> Path:
        """The pipeline's start: the decoder SFT run (on top of the captioner SFT run)."""
        return self.folder / "runs" / "sft_decoder"


def prepare_world(folder: Path, plan: Plan, rebuild: bool) -> World:
    """The world's data and models in `folder`, built once: a folder whose world.json matches the plan is reused;
    one that does not is rebuilt with `rebuild`, else an error (a world is never silently mixed with another's)."""
    from train import sft_captioner, sft_decoder, world, world_models

    settings = plan.world_settings()
    marker = folder / "world.json"
    if marker.is_file():
        found = json.loads(marker.read_text())
        if found.get("settings") == settings:
            print(f"toy world: using the prepared world in {folder}", flush=True)
            write_heldout(World(folder), plan)
            World(folder).write_train_args(plan)
            return World(folder)
        if not rebuild:
            diff = {k: (found.get("settings", {}).get(k), v) for k, v in settings.items()
                    if found.get("settings", {}).get(k) != v}
            raise SystemExit(f"error: {folder} holds a world prepared with other settings ({diff}: there vs now); "
                             "pass --rebuild to replace it or --world to use another folder")
    elif folder.exists() and any(folder.iterdir()) and not rebuild:
        raise SystemExit(f"error: {folder} is not empty and holds no finished world (world.json); pass --rebuild to "
                         "replace it")
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    w, times = World(folder), {}
    t = start = time.perf_counter()
    train = world.scenes("train", plan.n_train, plan.world_seed)
    world.write_split(folder / "data" / "train_mix", train, SIZE, levels=plan.captioner_levels, seed=plan.world_seed)
    if plan.captioner_detail_steps:
        world.write_split(folder / "data" / "train_detail", train, SIZE, levels=plan.captioner_detail_levels,
                          seed=plan.world_seed)
    world.write_split(folder / "data" / "train_full", train, SIZE, levels=world.LEVELS - 1, seed=plan.world_seed)
    world.write_echo_texts(folder / "data" / "text_echo.jsonl", train)
    write_heldout(w, plan)
    times["data_s"] = time.perf_counter() - t
    print("toy world: training the VAE and the CLIP ...", flush=True)
    measured = world_models.prepare_base(w.base, plan.world_seed, quick=plan.quick_world)
    t = time.perf_counter()
    print("toy world: training the captioner (train/sft_captioner.py) ...", flush=True)
    parts = [("train_detail", plan.captioner_detail_steps, folder / "runs" / "sft_captioner_detail"),
             ("train_mix", plan.captioner_steps - plan.captioner_detail_steps, folder / "runs" / "sft_captioner")]
    init: list[str] = []
    for data, steps, run in parts:
        if steps == 0:  # no detail part: the mix alone, from the base
            continue
        sft_captioner.main(w.base_args() + init + [
            "--data", str(w.data(data)), "--lora-rank", "0", "--batch-size", str(plan.captioner_batch),
            "--text-data", str(folder / "data" / "text_echo.jsonl"), "--text-batch-size",
            str(plan.captioner_text_batch), "--text-weight", str(plan.captioner_text_weight),
            "--lr", str(plan.captioner_lr), "--steps", str(steps), "--save-every", str(steps),
            "--seed", str(plan.world_seed), "--out", str(run)])
        init = ["--init", str(run)]
    times["captioner_s"] = time.perf_counter() - t
    t = time.perf_counter()
    print("toy world: training the decoder (train/sft_decoder.py) ...", flush=True)
    sft_decoder.main(w.base_args() + [
        "--init", str(folder / "runs" / "sft_captioner"), "--data", str(w.data("train_full")), "--lora-rank", "0",
        "--batch-size", str(plan.decoder_batch), "--lr", str(plan.decoder_lr), "--lr-schedule",
        plan.decoder_lr_schedule, "--warmup-steps", str(plan.decoder_warmup_steps), "--caption-dropout",
        str(plan.decoder_caption_dropout), "--logit-mean", str(plan.decoder_logit_mean), "--steps",
        str(plan.decoder_steps), "--save-every", str(plan.decoder_steps), "--seed", str(plan.world_seed),
        "--cache-latents", str(folder / "cache" / "train_full"), "--out", str(w.start)])
    times["decoder_s"] = time.perf_counter() - t
    w.write_train_args(plan)
    times["prepare_s"] = round(time.perf_counter() - start, 1)
    write_json(marker, {"settings": settings, "measured": {**measured, **times}})
    return w


def write_heldout(w: World, plan: Plan) -> None:
    """The held-out split of `plan.n_heldout` scenes with their full-detail captions, (re)written unless the world
    holds exactly those (a larger count extends a smaller one: train/world.py `scenes`)."""
    from train import world

    folder = w.folder / "data" / "heldout"
    scenes = world.scenes("heldout", plan.n_heldout, plan.world_seed)
    done = all((folder / f).is_file() for f in ("data.jsonl", "scenes.jsonl"))
    if done and world.read_scenes(folder) == scenes:
        return
    if folder.exists():
        shutil.rmtree(folder)
    world.write_split(folder, scenes, SIZE, levels=world.LEVELS - 1, seed=plan.world_seed)


# ----------------------------------------------------------------------------------------------- the pipeline

STAGES = ("cold_start", "grpo_encoder", "grpo_decoder")  # a seed's pipeline, each stage from the one before
CONTROLS = ("grpo_encoder_lr0", "grpo_encoder_token_mean")  # stage-2 controls, from the first seed's cold start


def stage_folder(runs: Path, seed: int, stage: str) -> Path:
    return runs / f"seed{seed}" / stage


def train_stage(w: World, plan: Plan, runs: Path, seed: int, stage: str) -> Path:
    """Train `stage` (one of STAGES or CONTROLS) of `seed`'s pipeline with its training script, from the stage before
    it (--init; a control from the cold start: 'lr0' must stay flat, 'token_mean' must rise too). Returns its run
    folder."""
    from train import cold_start, grpo_decoder, grpo_encoder

    if stage not in STAGES + CONTROLS:
        raise ValueError(f"train_stage: unknown stage {stage!r}; expected one of {STAGES + CONTROLS}")
    common = w.base_args() + ["--clip", str(w.clip), "--seed", str(seed), "--overwrite",
                              "--lora-rank", str(plan.lora_rank), "--lora-alpha", str(2 * plan.lora_rank)]
    out = stage_folder(runs, seed, stage)
    if stage == "cold_start":
        cold_start.main(common + [
            "--init", str(w.start), "--data", str(w.data("train_full")), "--batch-size", "2",
            "--sample-steps", str(plan.sample_steps), "--grad-last-k", "1", "--guidance-scale",
            str(plan.guidance_scale), "--max-new-tokens", str(plan.caption_tokens), "--lr", str(plan.cold_start_lr),
            "--steps", str(plan.cold_start_steps), "--save-every", str(plan.cold_start_steps), "--out", str(out)])
    elif stage.startswith("grpo_encoder"):
        lr = 0.0 if stage == "grpo_encoder_lr0" else plan.encoder_lr
        grpo_encoder.main(common + [
            "--init", str(stage_folder(runs, seed, "cold_start")), "--data", str(w.data("train_full")),
            "--images-per-step", str(plan.encoder_images), "--group-size", str(plan.encoder_group),
            "--max-new-tokens", str(plan.caption_tokens), "--gen-steps", str(plan.sample_steps), "--guidance-scale",
            str(plan.guidance_scale), "--render-noise", "group", "--temperature", "1.0", "--text-encoder", "frozen",
            "--lr", str(lr), "--lr-schedule", plan.encoder_lr_schedule, "--steps", str(plan.encoder_steps),
            "--save-every", str(plan.encoder_steps),
            "--loss-norm", "token_mean" if stage == "grpo_encoder_token_mean" else "sequence_mean",
            "--out", str(out)])
    else:
        # Stage 3 learns to follow long captions (the paper's claim 2) on the world's full-detail captions
        # (--dataset-captions): they stand in for the long captions UAE's captioner writes after stage 2, as this
        # world's captioner says more after stage 2 but stays well short of full detail.
        grpo_decoder.main(common + [
            "--init", str(stage_folder(runs, seed, "grpo_encoder")), "--data", str(w.data("train_full")),
            "--images-per-step", str(plan.decoder_rl_images), "--group-size", str(plan.decoder_rl_group),
            "--sample-steps", str(plan.sample_steps), "--guidance-scale", str(plan.guidance_scale),
            "--caption-tokens", str(plan.caption_tokens), "--caption-temperature", "0", "--dataset-captions",
            "--sde-window", plan.decoder_rl_sde_window, "--lr", str(plan.decoder_rl_lr), "--steps",
            str(plan.decoder_rl_steps), "--save-every", str(plan.decoder_rl_steps), "--out", str(out)])
    return out


def main_job_command(w: World, plan: Plan) -> str:
    """The main job on world `w` (the toy world's third command in the README, which `--prepare-only` prints):
    train/grpo_decoder.py from the world's start on `train.args`, with the plan's stage-3 batch, window, learning
    rate and steps."""
    return (f"torchrun --nproc_per_node=1 train/grpo_decoder.py $(cat {w.folder / 'train.args'}) --group-size "
            f"{plan.decoder_rl_group} --images-per-step {plan.decoder_rl_images} --sde-window "
            f"{plan.decoder_rl_sde_window} --lr {plan.decoder_rl_lr:g} --steps {plan.decoder_rl_steps} "
            "--out runs/grpo_decoder_world")


def pipeline_jobs(w: World, plan: Plan, runs: Path) -> dict[str, tuple[tuple, tuple[str, ...]]]:
    """The pipeline as jobs for `run_jobs`: name -> (`stage_job`'s arguments, the jobs it needs). The start's
    evaluation (with the floor), then each seed's stages in order, then the controls; the first seed's last stage
    also scores the floor through its decoder."""
    jobs = {"start": ((w, plan, runs, None, "start", True), ())}
    for seed in plan.seeds:
        needs: tuple[str, ...] = ()
        for stage in STAGES:
            floor = seed == plan.seeds[0] and stage == STAGES[-1]
            jobs[f"seed{seed}/{stage}"] = ((w, plan, runs, seed, stage, floor), needs)
            needs = (f"seed{seed}/{stage}",)
    if plan.controls:
        for stage in CONTROLS:
            jobs[f"seed{plan.seeds[0]}/{stage}"] = ((w, plan, runs, plan.seeds[0], stage, False),
                                                     (f"seed{plan.seeds[0]}/cold_start",))
    return jobs


def usable_cores() -> int:
    """The CPU cores this process may run on (all of them where the OS does not say: macOS)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


_EVALUATORS: dict = {}  # one Evaluator per (world, plan) in each worker process


def stage_job(w: World, plan: Plan, runs: Path, seed: int | None, stage: str, floor: bool) -> dict:
    """One job of the pipeline, as a worker runs it: train `stage` of `seed` (`train_stage`; 'start' trains nothing:
    the world's start) and evaluate it on the held-out scenes (`Evaluator.stage`, and with `floor` the empty
    caption through its decoder). The training script's output goes to runs/logs/."""
    key = (str(w.folder), plan)
    if key not in _EVALUATORS:
        _EVALUATORS[key] = Evaluator(w, plan)
    ev = _EVALUATORS[key]
    log = runs / "logs" / f"{'start' if seed is None else f'seed{seed}_{stage}'}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            run = w.start if seed is None else train_stage(w, plan, runs, seed, stage)
            result = {"run": run, "row": ev.stage(run)}
            if floor:
                result["floor"] = ev.floor(run)
            if seed is None:  # the report's first row of images and its true captions, and the detail ladder
                result.update(sources=ev.sources[:8], full_captions=ev.full_captions[:8],
                              ladder=ev.ladder(run, result["row"]))
    except (Exception, SystemExit) as e:
        raise RuntimeError(f"{e!r} (its log: {log})") from e
    return result


def run_jobs(fn: Callable[..., dict], jobs: dict[str, tuple[tuple, tuple[str, ...]]], workers: int,
             log: Callable[[str], None] = print) -> dict[str, dict]:
    """fn(*args) of every job (name -> (args, the names of the jobs it needs)) once the jobs it needs are done, the
    first ready one in `jobs`' order first, at most `workers` at a time, each worker a process of its own (spawned:
    a forked child of a process that ran OpenMP can hang) on ONE thread; `workers` 1 runs them here, on one thread
    too. A job's numbers are then the same whatever `workers` is or the machine's core count (the rounding of a
    matmul changes with its thread count), and on the world's small models two one-thread processes do more than one
    two-thread process (the whole pipeline: 12.8 min against 17.5 on a 2-core AMD VM, 2026-12-03). A failed job
    stops the run with an error naming it, and the jobs running beside it."""
    for name, (_, needs) in jobs.items():
        unknown = [n for n in needs if n not in jobs]
        if unknown:
            raise ValueError(f"run_jobs: job {name!r} needs {unknown}, which are not jobs")
    results: dict[str, dict] = {}
    if not jobs:
        return results
    pending, t0 = dict(jobs), time.perf_counter()

    def ready() -> list[str]:
        return [n for n, (_, needs) in pending.items() if all(d in results for d in needs)]

    # One loop for both ways: here (workers 1) a job runs at submit and its future is already done.
    children_before = set(multiprocessing.active_children())
    pool = None if workers == 1 else ProcessPoolExecutor(
        min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"), initializer=torch.set_num_threads,
        initargs=(1,))

    def submit(args: tuple) -> Future:
        if pool is not None:
            return pool.submit(fn, *args)
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except (Exception, SystemExit) as e:
            future.set_exception(e)
        return future

    running: dict[Future, str] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    failed = True
    try:
        while pending or running:
            for name in ready()[:workers - len(running)]:
                args, _ = pending.pop(name)
                running[submit(args)] = name
            if not running:
                raise ValueError(f"run_jobs: the jobs {sorted(pending)} wait on each other")
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                name = running.pop(future)
                try:
                    results[name] = future.result()
                except (Exception, SystemExit) as e:
                    raise RuntimeError(f"toy world: job {name} failed: {e!r}") from e
                log(f"toy world: {name} done ({len(results)}/{len(jobs)}, {time.perf_counter() - t0:.0f} s)")
        failed = False
    finally:
        torch.set_num_threads(threads)
        if pool is not None:
            # After a failure the error is raised at once, the jobs not started are dropped and the running ones
            # stopped (the executor would otherwise keep this process alive until they end).
            pool.shutdown(wait=not failed, cancel_futures=True)
            if failed:
                for worker in set(multiprocessing.active_children()) - children_before:
                    worker.terminate()
                    worker.join()
    return results


# ----------------------------------------------------------------------------------------------- evaluation

class Evaluator:
    """Unified-Bench on the world's held-out scenes, with exact caption scores (the module docstring)."""

    def __init__(self, w: World, plan: Plan):
        from eval.reward import ReconstructionReward, clip_backbone
        from model.clip import CLIP
        from train import world

        self.w, self.plan = w, plan
        self.scenes = world.read_scenes(w.folder / "data" / "heldout")
        self.sources = [world.render(s, SIZE) for s in self.scenes]
        self.full_captions = [world.describe(s, world.LEVELS - 1) for s in self.scenes]
        self.cues = [(i, prefix, colour) for i, s in enumerate(self.scenes) for prefix, colour in world.colour_cues(s)]
        self.reward = ReconstructionReward(clip_backbone(CLIP.from_pretrained(w.clip, dtype=torch.float32)))
        self.source_features = self.reward.source_features(self.sources)

    def model(self, run: Path | None):
        from model.handoff import load_handoff, read_handoff
        from model.uae import UAE

        b = self.w.base
        uae = UAE.from_pretrained(lvlm=b / "lvlm", sd3=b / "sd3", connector=b / "connector.safetensors",
                                  pooled=b / "pooled.safetensors", dtype=torch.float32)
        if run is not None:
            load_handoff(uae, read_handoff(run), ema=True)
        return uae.eval()

    @torch.no_grad()
    def render(self, uae, captions: list[str]) -> list[Image.Image]:
        """The decoder's images of `captions`, image i from the noise of seed 10_000 + i, each as if drawn alone."""
        return uae.generate_each_alone(captions, [10_000 + i for i in range(len(captions))], SIZE, SIZE,
                                       self.plan.sample_steps, self.plan.guidance_scale)

    def scores(self, images: list[Image.Image]) -> tuple[float, float, list[float]]:
        s = self.reward(None, images, source_features=self.source_features).tolist()
        return mean(s), stderr(s), s

    @torch.no_grad()
    def colour_logits(self, uae) -> torch.Tensor:
        """[n_cues, len(world.A_COLOURS)]: the captioner's next-token logits of each object colour that takes "a",
        teacher-forced on each held-out `world.colour_cues` prefix after the image prompt that `UAE.caption` uses."""
        from train import world

        p = uae.processor
        candidates = []
        for colour in world.A_COLOURS:
            ids = p.encode(" " + colour)
            if len(ids) != 1:
                raise ValueError(f"the captioner's tokenizer writes ' {colour}' as {len(ids)} tokens; colour_logits "
                                 "reads one token per colour (the world's tokenizer)")
            candidates += ids
        out = []
        for first in range(0, len(self.sources), 16):  # each image's vision tower and prompt once (caption_rows)
            chunk = [(k - first, prefix) for k, prefix, _ in self.cues if first <= k < first + 16]
            if not chunk:
                continue
            # A placeholder after each prefix: caption_hidden's state at its index is the one that predicts it.
            rows = [torch.tensor(p.encode(prefix) + candidates[:1]) for _, prefix in chunk]
            lengths = torch.tensor([len(r) for r in rows])
            tokens = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=p.pad_token_id)
            mask = torch.arange(tokens.shape[1]) < lengths[:, None]
            inputs = uae.caption_rows(uae.caption_inputs(self.sources[first:first + 16]), [k for k, _ in chunk])
            hidden = uae.caption_hidden(inputs, tokens.to(uae.device), mask.to(uae.device))
            out.append(uae.lvlm.lm_head(hidden[torch.arange(len(rows)), lengths - 1])[:, candidates].float())
        return torch.cat(out)

    def colour_accuracy(self, uae) -> float:
        """What the captioner sees, apart from how much it says: the share of held-out objects whose colour its
        `colour_logits` rank first (chance: 1 / len(world.A_COLOURS)). A captioner that names objects' colours it
        cannot see adds wrong facts, which caps what GRPO on the captioner can gain in recall."""
        from train import world

        named = [world.A_COLOURS[int(j)] for j in self.colour_logits(uae).argmax(-1)]
        return mean([float(n == colour) for n, (_, _, colour) in zip(named, self.cues)])

    @torch.no_grad()
    def stage(self, run: Path | None) -> dict:
        from train import world

        uae = self.model(run)
        captions = uae.caption(self.sources, max_new_tokens=self.plan.caption_tokens, do_sample=False)
        recon = self.render(uae, captions)
        score, err, per_image = self.scores(recon)
        caption_scores = [world.score_caption(c, s) for c, s in zip(captions, self.scenes)]
        fixed = self.render(uae, self.full_captions)
        fixed_score, fixed_err, fixed_per_image = self.scores(fixed)
        return {
            "recon_score": score, "recon_stderr": err,
            "caption_len": mean([len(c.split()) for c in captions]),
            "caption_recall": mean([c["recall"] for c in caption_scores]),
            "caption_precision": mean([c["precision"] for c in caption_scores]),
            "caption_f1": mean([c["f1"] for c in caption_scores]), "colour_accuracy": self.colour_accuracy(uae),
            "recon_score_fixed": fixed_score, "recon_stderr_fixed": fixed_err,
            "attribute_accuracy": mean([world.attribute_accuracy(im, s) for im, s in zip(fixed, self.scenes)]),
            "recon_per_image": per_image, "recon_fixed_per_image": fixed_per_image,
            "captions": captions, "_recon": recon,
        }

    @torch.no_grad()
    def ladder(self, run: Path, row: dict) -> list[dict]:
        """The ground-truth captions at each detail level (train/world.py `describe`: background, + count, + colours,
        + shapes, + sizes and positions) through the decoder of `run`: the benchmark should score more true detail
        higher, from the floor's end (level 0) to the ceiling (the full captions). The full captions' scores are
        those `stage` scored for `run` (its `row`: the same captions and render seeds), not rendered again."""
        from train import world

        uae, rows = self.model(run), []
        for level in range(world.LEVELS - 1):
            score, err, per_image = self.scores(self.render(uae, [world.describe(s, level) for s in self.scenes]))
            rows.append({"level": level, "recon_score": score, "recon_stderr": err, "recon_per_image": per_image})
        rows.append({"level": world.LEVELS - 1, **ceiling_row(row)})
        return [{**r, "example": world.describe(self.scenes[0], r["level"])} for r in rows]

    @torch.no_grad()
    def floor(self, run: Path) -> dict:
        """The empty caption through the decoder of `run` (the ceiling, the ground-truth caption through a stage's
        decoder, is that stage's recon_score_fixed)."""
        score, err, per_image = self.scores(self.render(self.model(run), [""] * len(self.scenes)))
        return {"recon_score": score, "recon_stderr": err, "recon_per_image": per_image}


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def stderr(xs: list[float]) -> float:
    if len(xs) < 2:
        return float("nan")
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


# ----------------------------------------------------------------------------------------------- targets

def check_targets(rows: list[dict], controls: dict, floor: dict | None = None) -> list[dict]:
    """The issue's targets, each with the measured values and whether it is met (the report says a miss plainly).
    `floor`: the empty caption through the start decoder (`Evaluator.floor`: recon_score, recon_stderr and the
    per-image scores); the ceiling of a row is its own recon_score_fixed, the ground-truth caption through the same
    decoder."""
    by = {(r["stage"], r["seed"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    out = []

    def add(name, goal, values, met, **more):
        out.append({"target": name, "goal": goal, "measured": values, "met": bool(met), **more})

    def pairs(a, b):
        return [(by[(a, s)], by[(b, s)]) for s in seeds if (a, s) in by and (b, s) in by]

    p = pairs("cold_start", "grpo_encoder")
    add("stage 2: caption recall", "+0.2 absolute on every seed",
        [round(b["caption_recall"] - a["caption_recall"], 4) for a, b in p],
        p and all(b["caption_recall"] - a["caption_recall"] >= 0.2 for a, b in p))
    add("stage 2: caption length", ">= 1.5x on every seed",
        [round(b["caption_len"] / max(a["caption_len"], 1e-9), 3) for a, b in p],
        p and all(b["caption_len"] >= 1.5 * a["caption_len"] for a, b in p))
    add("stage 2: reconstruction score", "up by > 3 standard errors of the per-image change on every seed",
        [round((b["recon_score"] - a["recon_score"]) / _change_stderr(a, b, ""), 2) for a, b in p],
        p and all(b["recon_score"] - a["recon_score"] > 3 * _change_stderr(a, b, "") for a, b in p))
    if "lr0" in controls:
        a, c = by.get(("cold_start", seeds[0])), controls["lr0"]
        moved = abs(c["recon_score"] - a["recon_score"]) if a else float("nan")
        add("stage 2 control lr 0: flat",
            "reconstruction score within 3 standard errors of the per-image change from the cold start",
            round(moved / _change_stderr(a, c, ""), 2) if a else None, a and moved <= 3 * _change_stderr(a, c, ""))
    if "token_mean" in controls:
        a, c = by.get(("cold_start", seeds[0])), controls["token_mean"]
        add("stage 2 token_mean: rises", "reconstruction score up by > 3 standard errors of the per-image change",
            round((c["recon_score"] - a["recon_score"]) / _change_stderr(a, c, ""), 2) if a else None,
            a and c["recon_score"] - a["recon_score"] > 3 * _change_stderr(a, c, ""))
    p = pairs("grpo_encoder", "grpo_decoder")
    add("stage 3: reconstruction score with fixed captions",
        "up by > 3 standard errors of the per-image change on every seed",
        [round((b["recon_score_fixed"] - a["recon_score_fixed"]) / _change_stderr(a, b, "_fixed"), 2) for a, b in p],
        p and all(b["recon_score_fixed"] - a["recon_score_fixed"] > 3 * _change_stderr(a, b, "_fixed") for a, b in p))
    add("stage 3: attribute accuracy", "up on every seed",
        [round(b["attribute_accuracy"] - a["attribute_accuracy"], 4) for a, b in p],
        p and all(b["attribute_accuracy"] > a["attribute_accuracy"] for a, b in p))
    trained = [r for r in rows if r["stage"] in ("cold_start", "grpo_encoder", "grpo_decoder")]
    if trained and floor is not None:
        # (margin, its standard error) per row; the ceiling is scored on the same scenes and render seeds as the row,
        # and so is the floor where its per-image scores are given: paired standard errors.
        above = min((r["recon_score_fixed"] - r["recon_score"], _change_stderr(r, ceiling_row(r), ""))
                    for r in trained)
        below = min((r["recon_score"] - floor["recon_score"], _change_stderr(floor, r, "")) for r in trained)
        add("benchmark: ceiling above and floor below every trained row",
            "each trained row's score below its decoder's score from the ground-truth captions and above the empty "
            "caption's; measured: the smallest margins (ceiling - row, row - floor), and in_stderrs the same "
            "margins in standard errors of their per-image differences",
            [round(above[0], 4), round(below[0], 4)], above[0] > 0 and below[0] > 0,
            in_stderrs=[round(m / se, 2) for m, se in (above, below)])
    return out


def ceiling_row(row: dict) -> dict:
    """A row's ceiling (its decoder's scores from the ground-truth captions) as a row of its own: the report's
    ceiling, and the other side of `_change_stderr` for the ceiling's margin."""
    ceiling = {"recon_score": row["recon_score_fixed"], "recon_stderr": row["recon_stderr_fixed"]}
    if "recon_fixed_per_image" in row:
        ceiling["recon_per_image"] = row["recon_fixed_per_image"]
    return ceiling


def time_targets(prepare_s: float, pipeline_s: float) -> list[dict]:
    """The two time budgets as targets: the world's preparation (as long as it took when it was built) and the
    pipeline with its evaluations, up to writing the report (seconds more), each within BUDGET_S."""
    return [{"target": f"time: {name}", "goal": f"<= {BUDGET_S / 60:g} min on 2 CPU cores",
             "measured": f"{seconds / 60:.1f} min", "met": seconds <= BUDGET_S}
            for name, seconds in (("preparation", prepare_s), ("pipeline and report", pipeline_s))]


def last_row(rows: list[dict], seed: int) -> dict:
    """A seed's last stage's row (its recon_score_fixed is the seed's ceiling: the ground-truth captions through its
    last decoder)."""
    return [r for r in rows if r["seed"] == seed][-1]


def _change_stderr(a: dict, b: dict, suffix: str) -> float:
    """The standard error of the change b - a of a reconstruction score. Every stage is scored on the same held-out
    scenes with the same render seeds, so where both rows hold their per-image scores it is the standard error of
    the per-image differences (a paired comparison: the scenes' own spread, the same in both rows, cancels); without
    them, the unpaired sqrt(se_a^2 + se_b^2)."""
    key = f"recon{suffix}_per_image"
    if key in a and key in b and len(a[key]) == len(b[key]) > 1:
        return stderr([y - x for x, y in zip(a[key], b[key])]) or 1e-12
    return math.sqrt(a[f"recon_stderr{suffix}"] ** 2 + b[f"recon_stderr{suffix}"] ** 2) or 1e-12


# ----------------------------------------------------------------------------------------------- report

def line_plot(series: dict[str, list[float]], title: str, path: Path, width: int = 480, height: int = 240) -> None:
    """A line chart with pillow: one polyline per series over its step index, y range from the data."""
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    im = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(im)
    left, right, top, bottom = 50, width - 10, 20, height - 25
    values = [v for ys in series.values() for v in ys if math.isfinite(v)]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1e-6
    d.rectangle((left, top, right, bottom), outline=(160, 160, 160))
    d.text((left, 3), title, fill="black")
    d.text((2, top), f"{hi:.3f}", fill="black")
    d.text((2, bottom - 10), f"{lo:.3f}", fill="black")
    for k, (name, ys) in enumerate(series.items()):
        n = max(len(ys) - 1, 1)
        pts = [(left + (right - left) * i / n, bottom - (bottom - top) * (y - lo) / (hi - lo))
               for i, y in enumerate(ys) if math.isfinite(y)]
        colour = colours[k % len(colours)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        d.text((left + 5 + 110 * k, bottom + 6), name, fill=colour)
    im.save(path)


def image_grid(rows: list[list[Image.Image]], path: Path, cell: int = SIZE) -> None:
    grid = Image.new("RGB", (cell * max(len(r) for r in rows), cell * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, im in enumerate(row):
            grid.paste(im.resize((cell, cell)), (x * cell, y * cell))
    grid.save(path)


def reward_series(run: Path) -> list[float]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    key = "reward_mean" if rows and "reward_mean" in rows[0] else "similarity"
    return [float(r.get(key, float("nan"))) for r in rows]


def write_report(out: Path, report: dict, grids: dict, runs: dict) -> None:
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    for stage in ("cold_start", "grpo_encoder", "grpo_decoder"):
        series = {f"seed {s}": reward_series(r[stage]) for s, r in runs.items() if stage in r}
        series.update({f"{k} (seed {min(runs)})": reward_series(p) for k, p in report.get("_control_runs", {}).items()
                       if stage == "grpo_encoder"})
        line_plot(series, f"{stage}: reward per step", figures / f"reward_{stage}.png")
    for name, rows in grids.items():
        image_grid(rows, figures / f"grid_{name}.png")
    public = {k: v for k, v in report.items() if not k.startswith("_")}
    write_json(out / "report.json", public)

    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))

    cols = ["stage", "seed", "recon_score", "recon_stderr", "caption_len", "caption_precision", "caption_recall",
            "caption_f1", "colour_accuracy", "recon_score_fixed", "attribute_accuracy"]
    body = ["<h1>UAE on the toy world</h1>", f"<p>{html.escape(report['summary'])}</p>", "<h2>Targets</h2>",
            "<table><tr><th>target</th><th>goal</th><th>measured</th><th>met</th></tr>"]
    for t in report["targets"]:
        measured = cell(t["measured"]) + (f" ({cell(t['in_stderrs'])} s.e.)" if "in_stderrs" in t else "")
        body.append(f"<tr><td>{cell(t['target'])}</td><td>{cell(t['goal'])}</td><td>{measured}</td>"
                    f"<td>{'yes' if t['met'] else '<b>MISSED</b>'}</td></tr>")
    body.append("</table>")
    changes = report["world"]["measured"]["clip"].get("cos_change")
    if changes:  # worlds prepared before clip_quality measured it lack it
        body.append("<h2>What the reward pays</h2><p>The world CLIP's cosine between a held-out render and the render "
                    "with one attribute of one object changed (1: the reward cannot see that attribute): "
                    + ", ".join(f"{html.escape(a)} {c:.3f}" for a, c in changes.items()) + ".</p>")
    body.append("<h2>Stages (held-out scenes)</h2><table><tr>" + "".join(f"<th>{c}</th>" for c in cols)
                + "</tr>")
    shown = ([{"stage": "ceiling (ground-truth caption)", **report["ceiling"]}] + report["stages"]
             + [{"stage": f"control {k}", **v} for k, v in report["controls"].items()]
             + [{"stage": "floor (empty caption)", **report["floor"]}])
    for r in shown:
        body.append("<tr>" + "".join(f"<td>{cell(r.get(c, ''))}</td>" for c in cols) + "</tr>")
    body.append("</table><h2>Ground-truth captions by detail level (start decoder)</h2><table><tr><th>level</th>"
                "<th>first held-out scene's caption</th><th>recon_score</th><th>recon_stderr</th></tr>")
    for r in report["ladder"]:
        body.append("<tr>" + "".join(f"<td>{cell(r[c])}</td>" for c in ("level", "example", "recon_score",
                                                                          "recon_stderr")) + "</tr>")
    body.append("</table><h2>Reward curves</h2>")
    body += [f'<img src="figures/reward_{s}.png">' for s in ("cold_start", "grpo_encoder", "grpo_decoder")]
    body.append("<h2>Sources and reconstructions (held-out, first seed)</h2><p>rows: source, then each stage's "
                "regeneration from its own caption</p>")
    body += [f'<p>{html.escape(name)}</p><img src="figures/grid_{name}.png">' for name in grids]
    body.append("<h2>Captions (held-out, first seed)</h2><table><tr><th>truth</th><th>start</th><th>after stage "
                "2</th></tr>")
    for truth, before, after in report["_sample_captions"]:
        body.append(f"<tr><td>{cell(truth)}</td><td>{cell(before)}</td><td>{cell(after)}</td></tr>")
    body.append("</table>")
    style = "<style>body{font-family:sans-serif}td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}</style>"
    write_text(out / "report.html", f"<html><head><meta charset='utf-8'>{style}</head><body>"
               + "\n".join(body) + "</body></html>\n")


# ----------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m eval.toy_world", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--out", required=True, help="report folder: report.json, report.html, figures/, runs/")
    p.add_argument("--world", default=None, help="folder of the prepared world (default: OUT/world)")
    p.add_argument("--quick", action="store_true", help="a shortened run: tiny world training, one seed, a few "
                                                        "steps per stage (for tests; the targets are not expected)")
    p.add_argument("--rebuild", action="store_true", help="rebuild a world prepared with other settings")
    p.add_argument("--prepare-only", action="store_true", help="prepare (or reuse) the world and stop: no pipeline, "
                                                               "no report; prints the main job's command on it")
    p.add_argument("--seeds", default=None, help="comma-separated pipeline seeds (default: 0,1,2; --quick: 0)")
    p.add_argument("--no-controls", action="store_true", help="skip the two stage-2 control runs")
    p.add_argument("--workers", type=int, default=usable_cores(),
                   help="processes that run the pipeline's jobs side by side, each on one thread (the numbers do "
                        "not depend on it); default: the CPU cores this process may use")
    a = p.parse_args(argv)
    plan = QUICK if a.quick else Plan()
    if a.seeds is not None:
        try:
            seeds = tuple(int(s) for s in a.seeds.split(",") if s.strip())
        except ValueError:
            p.error(f"argument --seeds: expected comma-separated integers, got {a.seeds!r}")
        if not seeds or min(seeds) < 0:
            p.error(f"argument --seeds: expected non-negative integers, got {a.seeds!r}")
        plan = dataclasses.replace(plan, seeds=seeds)
    if a.no_controls:
        plan = dataclasses.replace(plan, controls=False)
    if a.workers < 1:
        p.error(f"argument --workers: expected a positive integer, got {a.workers}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    w = prepare_world(Path(a.world) if a.world else out / "world", plan, a.rebuild)
    prepare_s = time.perf_counter() - t0
    if a.prepare_only:
        command = main_job_command(w, plan)
        print(f"toy world: prepared in {w.folder}; the main job on it:\n    {command}", flush=True)
        return {"world": str(w.folder), "main_job": command}
    t1 = time.perf_counter()
    runs_dir = out / "runs"
    jobs = pipeline_jobs(w, plan, runs_dir)
    print(f"toy world: running the pipeline: {len(jobs)} jobs on {a.workers} process(es) of one thread each; each "
          f"job's training log in {runs_dir / 'logs'}", flush=True)
    results = run_jobs(stage_job, jobs, a.workers)
    start = results["start"]["row"]
    recon_rows = {"source": results["start"]["sources"], "start": start.pop("_recon")[:8]}
    rows, runs, controls, control_runs = [], {}, {}, {}
    for seed in plan.seeds:
        rows.append({"stage": "start", "seed": seed, **{k: v for k, v in start.items() if k != "captions"}})
        runs[seed] = {}
        for stage in STAGES:
            r = results[f"seed{seed}/{stage}"]
            runs[seed][stage] = r["run"]
            recon = r["row"].pop("_recon")
            if seed == plan.seeds[0]:
                recon_rows[stage] = recon[:8]
                if stage == "grpo_encoder":
                    after_captions = r["row"]["captions"]
            rows.append({"stage": stage, "seed": seed, **{k: v for k, v in r["row"].items() if k != "captions"}})
    for stage in CONTROLS if plan.controls else ():
        r = results[f"seed{plan.seeds[0]}/{stage}"]
        variant = stage.removeprefix("grpo_encoder_")
        control_runs[variant] = r["run"]
        r["row"].pop("_recon")
        controls[variant] = {k: v for k, v in r["row"].items() if k != "captions"}
    floor_start = results["start"]["floor"]
    floor_last = results[f"seed{plan.seeds[0]}/{STAGES[-1]}"]["floor"]

    pipeline_s = time.perf_counter() - t1
    built = json.loads((w.folder / "world.json").read_text())
    # The preparation's time is the world's build time, recorded in world.json: a reused world takes none here.
    targets = check_targets(rows, controls, floor_start) + time_targets(
        built["measured"]["prepare_s"], pipeline_s)
    missed = [t["target"] for t in targets if not t["met"]]
    report = {
        "stages": rows, "controls": controls,
        "floor": {**floor_start, "decoder": "start", "final_decoder": floor_last},
        "ladder": results["start"]["ladder"],
        "ceiling": {**ceiling_row(last_row(rows, plan.seeds[0])), "decoder": "grpo_decoder",
                    "start_decoder": ceiling_row(start),
                    "per_seed": {str(s): last_row(rows, s)["recon_score_fixed"] for s in plan.seeds}},
        "targets": targets, "plan": dataclasses.asdict(plan), "workers": a.workers,
        "timing_s": {"prepare": round(prepare_s, 1), "pipeline_and_report": None},
        "world": built,
        "summary": ("every target met" if not missed else f"MISSED: {'; '.join(missed)}")
                   + (" (a --quick run: the targets are not expected)" if a.quick else ""),
        "_sample_captions": list(zip(results["start"]["full_captions"], start["captions"][:8], after_captions[:8])),
        "_control_runs": control_runs,
    }
    report["timing_s"]["pipeline_and_report"] = round(time.perf_counter() - t1, 1)
    report["timing_s"]["pipeline"] = round(pipeline_s, 1)
    write_report(out, report, {"reconstructions": list(recon_rows.values())}, runs)
    print(f"toy world: {report['summary']}; report in {out / 'report.html'}", flush=True)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
