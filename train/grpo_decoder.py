"""Unified-GRPO stage 3 (understanding for generation): Flow-GRPO on the decoder.

The frozen captioner describes each source image; the MMDiT (a new LoRA adapter) samples G stochastic (SDE)
trajectories per caption; reward = cosine of frozen CLIP image features of source and reconstruction;
group-normalised advantages; per trained denoising step j a clipped likelihood ratio and a KL penalty to the
reference policy (the model this stage started from: the new adapter off, every earlier adapter on):

    L_j = mean_i max(-A_i r_ij, -A_i clip(r_ij, 1 - eps, 1 + eps)) + beta mean_i KL_ij,
    r_ij = exp(log p_theta(x_{j+1} | x_j) - log p_old(x_{j+1} | x_j))

with log p the Gaussian of the SDE step and KL_ij = mean_CHW |mu_theta - mu_ref|^2 / (2 std_dev_t^2)
(model/flow.py `sde_step_with_logprob`, `transition_log_prob`; train/rl.py `flow_grpo_loss`, `kl_gaussian_means`).
As in Flow-GRPO's scripts/train_sd3.py: the training forward applies CFG with the unconditional branch detached, the
reference forward runs only when beta > 0, and the rollout batch is split into `--minibatches` optimizer steps
(Flow-GRPO makes two per sampling epoch, so the second is off-policy and the clipped ratio acts).

Launch:
    # tiny preset on procedurally generated images, one CPU process (the README's main job)
    torchrun --nproc_per_node=1 train/grpo_decoder.py
    # 1 GPU, official weights, the paper's (Flow-GRPO's) hyper-parameters spelled out
    torchrun --nproc_per_node=1 train/grpo_decoder.py --uae ckpt/UAE --clip ckpt/clip-vit-large-patch14 \
        --data data/images/ --dtype bf16 --size 512 --group-size 8 --images-per-step 1 --sample-steps 10 \
        --noise-level 0.7 --guidance-scale 4.5 --clip-eps 1e-4 --beta 0.04 --adv-std global --minibatches 2 \
        --lr 3e-4 --weight-decay 1e-4 --lora-rank 32 --lora-alpha 64 --steps 1000 --out runs/grpo_decoder
    # 8 GPUs (trajectories sharded across ranks, rewards all-gathered for the advantages), as the pipeline's last
    # stage: starting from the captioner's GRPO run (stage 2) with --init
    torchrun --nproc_per_node=8 train/grpo_decoder.py --uae ckpt/UAE --init runs/grpo_encoder \
        --clip ckpt/clip-vit-large-patch14 --data data/images/ --dtype bf16 --size 512 --group-size 24 \
        --images-per-step 8 --sample-steps 10 --noise-level 0.7 --guidance-scale 4.5 --clip-eps 1e-4 --beta 0.04 \
        --adv-std global --minibatches 2 --lr 3e-4 --weight-decay 1e-4 --lora-rank 32 --lora-alpha 64 \
        --steps 1000 --out runs/grpo_decoder
    # resume: the same command with --resume

With --eval-data, the EMA adapter (what evaluation loads) is evaluated on held-out images before the first step and
every --eval-every steps, as Flow-GRPO's eval_freq: the same images redrawn from the same noise by the ODE sampler,
scored by the reward, written to eval.jsonl with the per-image scores and the paired gain since step 0, which shows
a gain that the per-step rollout reward (new images every step) hides.

One process and N processes give the same result for the same global batch: every random draw (data order, caption
sampling, initial and per-step noise) is made in global order from seeded generators and sliced per rank, and the
gradients are averaged over ranks (DDP's all-reduce, written out in `average_gradients`).
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import asdict, dataclass

if __package__ in (None, ""):  # `torchrun train/grpo_decoder.py` runs the file as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from model.flow import Trajectory, flow_sigmas, sample_sde_trajectory, transition_log_prob
from model.lora import apply_lora, load_lora, lora_disabled, lora_parameters
from model.uae import DIT_LORA_TARGETS, UAESettings
from train.common import (BASE_KEYS, MetricsLogger, NonFiniteGuard, RunOptions, UsageError, all_gather_cat,
                          average_gradients, build_dataset, build_reward, build_uae, condition_padded_over_ranks,
                          finish_run, finite, group_rewards, init_distributed, is_tiny, open_run_folder, option,
                          parse_dtype, parse_options, read_metrics_rows, reduce_stats, require, resume_loop, rng_state,
                          run_script, save_run_checkpoint, set_lr, split_for_rank, step_generator, trained_adapter,
                          warn_single_sample_groups, warn_zero_advantages)
from train.data import ResumableSampler
from train.rl import EMA, flow_grpo_loss, group_advantages


@dataclass
class Options(RunOptions):
    clip: str = option("", "CLIP ViT-L/14 folder for the reward; empty = a tiny random CLIP (tiny preset only)")
    # Tiny-preset defaults (the no-argument run; the launch lines in the docstring give the paper's values). The
    # policy gradient E[A grad log p] is unbiased but its noise grows with the latent size (every latent entry of every
    # trained step adds an independent score term), so the tiny run uses 32 px (16x4x4 latents), 4 denoising steps, a
    # large group on one image, lr 1e-2 and no KL penalty (with beta 0.04 the KL pull outweighs the noisy policy
    # gradient at this scale and the reward stays flat); with these the reward rises within a minute on one CPU.
    procedural_images: int = option(1, "how many procedural scenes when --data is empty")
    steps: int = option(60, "optimizer steps")
    size: int = option(32, "image size in pixels")
    lr: float = option(1e-2, "AdamW learning rate (paper: 3e-4)")
    dataset_captions: bool = option(False, "condition on the dataset's captions (cached captions) instead of "
                                           "captioning with the frozen captioner")
    out: str = option("runs/grpo_decoder", "run folder: metrics.jsonl, checkpoints (model/: the handoff)")
    images_per_step: int = option(1, "source images per step (global)")
    group_size: int = option(64, "trajectories per image (G; paper: 24, 8 on one GPU)")
    sample_steps: int = option(4, "denoising steps when sampling trajectories (paper: 10)")
    sde_window: str = option("", "'start:end' steps run as SDE and trained, ODE elsewhere; empty = all but the last")
    noise_level: float = option(0.7, "SDE noise level a")
    init_noise: str = option("trajectory", "initial noise of the trajectories: trajectory (a fresh draw each, "
                                           "Flow-GRPO) | group (one draw per image, shared by its G trajectories, "
                                           "DanceGRPO's --init_same_noise: their rewards then differ by what the SDE "
                                           "steps drew, the steps that are trained)")
    guidance_scale: float = option(4.5, "CFG scale while sampling and training (1 = off)")
    train_cfg: bool = option(True, "apply CFG in the training forward too (as sampled; unconditional branch "
                                   "detached, as Flow-GRPO)")
    minibatches: int = option(1, "optimizer steps per rollout batch: the trajectories are split into this many "
                                 "minibatches (by global index modulo, so any rank count gives the same minibatches); "
                                 "Flow-GRPO makes 2, so the second is off-policy and the ratio clip acts")
    inner_epochs: int = option(1, "passes over each rollout batch (PPO epochs); >1 re-uses the trajectories, and the "
                                  "clipped ratio keeps the later updates near the sampling policy")
    clip_eps: float = option(1e-4, "ratio clip range")
    adv_clip: float = option(5.0, "advantage clamp")
    adv_std: str = option("group", "advantage normalisation: group (each group's own std, the paper's equation) | "
                                   "global (the std of all the step's rewards, Flow-GRPO's sample.global_std, which "
                                   "its SD3 configs set)")
    beta: float = option(0.0, "KL coefficient, on Flow-GRPO's scale (paper: 0.04); 0 skips the reference forward")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    lora_targets: str = option(DIT_LORA_TARGETS, "comma-separated DiT module names that get LoRA")
    ema_decay: float = option(0.95, "EMA decay of the adapters (for evaluation); 0 = off")
    caption_temperature: float = option(UAESettings.caption_temperature, "captioner sampling temperature (0 = greedy)")
    caption_tokens: int = option(0, "max caption tokens; 0 = the model's default")
    eval_data: str = option("", "held-out image-caption data, evaluated before the first step and every --eval-every "
                                "steps (Flow-GRPO's eval_freq): its first --eval-images items redrawn from fixed "
                                "noise by the ODE sampler with the EMA adapter and scored by the reward, to "
                                "eval.jsonl; empty = no evaluation")
    eval_every: int = option(10, "steps between held-out evaluations")
    eval_images: int = option(16, "held-out images per evaluation (divides across the processes)")

    def check(self) -> None:
        super().check()
        require(self.images_per_step >= 1, f"--images-per-step must be >= 1, got {self.images_per_step}")
        require(self.group_size >= 1, f"--group-size must be >= 1, got {self.group_size}")
        sde_steps_of(self)
        require(finite(self.noise_level) and 0 < self.noise_level < 1,
                f"--noise-level must lie in (0, 1) (the SDE step's Gaussian needs a positive std; the sampler takes "
                f"a < 1), got {self.noise_level}")
        require(finite(self.guidance_scale) and self.guidance_scale >= 1,
                f"--guidance-scale must be >= 1 (1 = no CFG), got {self.guidance_scale}")
        require(self.init_noise in ("trajectory", "group"),
                f"--init-noise must be trajectory or group, got {self.init_noise!r}")
        require(self.minibatches >= 1, f"--minibatches must be >= 1, got {self.minibatches}")
        require(self.inner_epochs >= 1, f"--inner-epochs must be >= 1, got {self.inner_epochs}")
        require(finite(self.clip_eps) and self.clip_eps > 0, f"--clip-eps must be > 0, got {self.clip_eps}")
        require(finite(self.adv_clip) and self.adv_clip > 0, f"--adv-clip must be > 0, got {self.adv_clip}")
        require(self.adv_std in ("group", "global"), f"--adv-std must be group or global, got {self.adv_std!r}")
        require(finite(self.beta) and self.beta >= 0, f"--beta must be >= 0, got {self.beta}")
        require(0 <= self.ema_decay < 1, f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        require(finite(self.caption_temperature) and self.caption_temperature >= 0,
                f"--caption-temperature must be >= 0, got {self.caption_temperature}")
        require(self.caption_tokens >= 0, f"--caption-tokens must be >= 0, got {self.caption_tokens}")
        require(any(t for t in self.lora_targets.split(",")), "--lora-targets names no module")
        require(self.eval_every >= 1, f"--eval-every must be >= 1, got {self.eval_every}")
        require(self.eval_images >= 1, f"--eval-images must be >= 1, got {self.eval_images}")


# Options that must match to resume (the rest, e.g. --steps, may change).
RESUME_KEYS = BASE_KEYS + ("data", "dataset_captions", "images_per_step", "group_size", "size", "sample_steps",
                           "sde_window", "lora_rank", "lora_alpha", "lora_targets", "seed")


def sde_steps_of(opts: Options) -> list[int]:
    """Indices of the denoising steps run as SDE (and trained), a contiguous window. The last step (to sigma 0) is
    never trained: its Gaussian is degenerate."""
    last = opts.sample_steps - 1
    require(last >= 1, f"--sample-steps must be >= 2 (the last step is never trained), got {opts.sample_steps}")
    if not opts.sde_window:
        return list(range(last))
    try:
        start, end = (int(x) for x in opts.sde_window.split(":"))
    except ValueError:
        raise UsageError(f"--sde-window must look like 'start:end', got {opts.sde_window!r}") from None
    require(0 <= start < end <= last, f"--sde-window {opts.sde_window!r} must satisfy 0 <= start < end <= {last}")
    return list(range(start, end))


@torch.no_grad()
def rollout(velocity_fn, noise: torch.Tensor, step_noise: torch.Tensor, sigmas: torch.Tensor, opts: Options,
            sde_steps: list[int], guidance_scale: float | None) -> Trajectory:
    """Sample trajectories with the current policy: SDE on `sde_steps` (their log-probs are the old policy's),
    Euler ODE elsewhere; step i's eps is step_noise[:, i]."""
    return sample_sde_trajectory(velocity_fn, noise, sigmas, noise_level=opts.noise_level,
                                 guidance_scale=guidance_scale, sde_window=(sde_steps[0], sde_steps[-1] + 1),
                                 step_noise=step_noise)


# Held-out image i is redrawn from the noise of seed EVAL_SEED + i at every evaluation (paired across steps).
EVAL_SEED = 10_000


def held_out_items(opts: Options) -> list:
    """The first --eval-images decodable (image, caption) items of --eval-data, in file order."""
    from train.data import ImageCaptionDataset

    dataset = ImageCaptionDataset(opts.eval_data, need_caption=opts.dataset_captions)
    items = []
    for i in range(len(dataset)):
        item = dataset[i]
        if item is not None:
            items.append(item)
        if len(items) == opts.eval_images:
            return items
    raise UsageError(f"--eval-images {opts.eval_images}: --eval-data {opts.eval_data} holds only {len(items)} "
                     "decodable items")


@torch.no_grad()
def evaluate(uae, reward_fn, items: list, opts: Options, dist_env) -> torch.Tensor:
    """Per-image held-out rewards [len(items)] (every rank gets all): each image's caption (the dataset's with
    --dataset-captions, else the frozen captioner's greedy one) redrawn alone by the ODE sampler from the noise of
    seed EVAL_SEED + its index, so a score depends neither on the step nor on the process count, and scored against
    the image. Each process draws its share."""
    my_share = split_for_rank(len(items), dist_env, "--eval-images")
    my_items = items[my_share]
    images = [im for im, _ in my_items]
    if opts.dataset_captions:
        captions = [c for _, c in my_items]
    else:
        kw = {"max_new_tokens": opts.caption_tokens} if opts.caption_tokens else {}
        captions = uae.caption(images, do_sample=False, **kw)
    recon = uae.generate_each_alone(captions, range(EVAL_SEED + my_share.start, EVAL_SEED + my_share.stop),
                                    opts.size, opts.size, opts.sample_steps, opts.guidance_scale, output_type="tensor")
    rewards = group_rewards(reward_fn, images, list(range(len(images))), recon, opts.size)
    return all_gather_cat(rewards.float())


def eval_metrics(rewards: torch.Tensor, baseline: torch.Tensor | None) -> dict:
    """Mean held-out reward and its standard error; with the step-0 rewards, the mean per-image gain since then and
    the standard error of that paired change (the images and their noise are the same at every evaluation)."""
    def stderr(x: torch.Tensor) -> float:
        return float(x.std() / len(x) ** 0.5) if len(x) > 1 else float("nan")

    out = {"eval_reward": float(rewards.mean()), "eval_reward_stderr": stderr(rewards)}
    if baseline is not None and len(baseline) == len(rewards):
        out |= {"eval_gain": float((rewards - baseline).mean()), "eval_gain_stderr": stderr(rewards - baseline)}
    return out | {"eval_rewards": [float(r) for r in rewards]}


def step_zero_rewards(path: str) -> torch.Tensor | None:
    """The per-image rewards of the step-0 evaluation in an eval.jsonl, if it holds one."""
    if not os.path.isfile(path):
        return None
    return next((torch.tensor(r["eval_rewards"]) for _, r in read_metrics_rows(path)
                 if r.get("step") == 0 and "eval_rewards" in r), None)


def train_minibatch(dit, velocity_fn, traj: Trajectory, idx: torch.Tensor, advantages: torch.Tensor, opts: Options,
                    sde_steps: list[int], guidance_scale: float | None) -> list[dict]:
    """Accumulate the gradient of the Flow-GRPO loss of trajectories `idx` over every trained step (one backward per
    step, the loss divided by the number of steps); `velocity_fn` is conditioned on rows `idx`. Returns each step's
    statistics."""
    stats = []
    for j in sde_steps:
        x, x_next = traj.latents[idx, j], traj.latents[idx, j + 1]
        new = transition_log_prob(velocity_fn, x, x_next, traj.sigmas[j], traj.sigmas[j + 1], opts.noise_level,
                                  guidance_scale)
        mean_ref = None
        if opts.beta > 0:  # Flow-GRPO runs the reference only when it enters the loss
            with torch.no_grad(), lora_disabled(dit):
                mean_ref = transition_log_prob(velocity_fn, x, x_next, traj.sigmas[j], traj.sigmas[j + 1],
                                               opts.noise_level, guidance_scale).mean
        loss, loss_stats = flow_grpo_loss(new.log_prob, traj.log_probs[idx, j], advantages[idx], new.mean, mean_ref,
                                  new.std_dev_t, opts.clip_eps, opts.beta)
        (loss / len(sde_steps)).backward()
        stats.append({k: v.detach().float() for k, v in loss_stats.items()} | {"loss": loss.detach().float()})
    return stats


def main(argv: list[str] | None = None) -> dict:
    opts = parse_options(Options, argv, description=__doc__.split("\n\n")[0])
    dist_env = init_distributed(opts.device)
    dtype = parse_dtype(opts.dtype)
    sde_steps = sde_steps_of(opts)
    n_traj = opts.images_per_step * opts.group_size
    my_share = split_for_rank(n_traj, dist_env, "images_per_step * group_size")
    require((my_share.stop - my_share.start) % opts.minibatches == 0,
            f"trajectories per rank {my_share.stop - my_share.start} must divide into --minibatches {opts.minibatches}")
    warn_single_sample_groups(opts.group_size, dist_env.is_main)

    folder, state = open_run_folder(opts, RESUME_KEYS, dist_env.is_main)
    uae, inherited = build_uae(opts, dtype, dist_env.device, folder)
    reward_fn = build_reward(opts.clip, is_tiny(opts), opts.seed, dtype, dist_env.device)
    targets = [t for t in opts.lora_targets.split(",") if t]
    apply_lora(uae.dit, targets, rank=opts.lora_rank, alpha=opts.lora_alpha, init="gaussian")
    params = lora_parameters(uae.dit)
    for p in params:  # trained adapters stay fp32 whatever the base dtype
        p.data = p.data.float()
    uae.dit.gradient_checkpointing = opts.grad_checkpointing
    opt = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    ema = EMA(params, decay=opts.ema_decay) if opts.ema_decay > 0 else None

    dataset = build_dataset(opts, need_caption=opts.dataset_captions)
    sampler = ResumableSampler(dataset, seed=opts.seed)
    if state is not None:
        load_lora(uae.dit, trained_adapter(folder, "dit"))
        if ema is not None:
            ema.load_state_dict(state["ema"])
    start = resume_loop(state, opt, sampler, opts, dist_env.is_main)
    log = MetricsLogger(os.path.join(opts.out, "metrics.jsonl"), opts.steps, dist_env.is_main, start_step=start)
    guard = NonFiniteGuard(opts.max_bad_steps)
    sigmas = flow_sigmas(opts.sample_steps, shift=uae.settings.shift).to(dist_env.device)
    latent_shape = uae.latent_shape(1, opts.size, opts.size)[1:]
    metrics: dict = {}
    eval_items = held_out_items(opts) if opts.eval_data else []
    eval_log = MetricsLogger(os.path.join(opts.out, "eval.jsonl"), opts.steps, dist_env.is_main, start_step=start,
                             timed=False, label="eval step") if eval_items else None
    baseline = None

    def run_eval(step: int) -> None:
        nonlocal baseline
        with ema.swap() if ema is not None else contextlib.nullcontext():
            rewards = evaluate(uae, reward_fn, eval_items, opts, dist_env)
        if step == 0:
            baseline = rewards
        eval_log.log(step, eval_metrics(rewards, baseline))

    if eval_items:
        if start == 0:
            run_eval(0)
        else:  # a resumed run measures its gains from the step-0 evaluation it logged
            baseline = step_zero_rewards(os.path.join(opts.out, "eval.jsonl"))

    for step in range(start + 1, opts.steps + 1):
        lr = set_lr(opt, opts, step)  # one rate for the step's minibatches
        # Every rank draws the same global randomness, then keeps its slice of trajectories.
        gen = step_generator(opts.seed, step)
        batch = sampler.next_batch(opts.images_per_step)
        images = [im for im, _ in batch]
        if opts.init_noise == "group":
            per_image = torch.randn(opts.images_per_step, *latent_shape, generator=gen)
            noise = per_image.repeat_interleave(opts.group_size, 0)
        else:
            noise = torch.randn(n_traj, *latent_shape, generator=gen)
        noise = noise[my_share].to(dist_env.device)
        step_noise = torch.randn(n_traj, opts.sample_steps, *latent_shape, generator=gen)[my_share].to(dist_env.device)
        cap_seeds = torch.randint(2**31 - 1, (opts.images_per_step,), generator=gen).tolist()

        # 1. Captions of this rank's images: cached in the dataset, or from the frozen captioner as one batch (one
        #    seeded generator per image: a caption does not depend on the images beside it).
        image_of = [i // opts.group_size for i in range(n_traj)][my_share]
        captions = {i: batch[i][1] for i in set(image_of)} if opts.dataset_captions else {}
        todo = sorted(set(image_of) - set(captions))
        if todo:
            kw = {"max_new_tokens": opts.caption_tokens} if opts.caption_tokens else {}
            texts = uae.caption([images[i] for i in todo], do_sample=opts.caption_temperature > 0,
                                temperature=opts.caption_temperature or 1.0,
                                generator=[torch.Generator().manual_seed(cap_seeds[i]) for i in todo], **kw)
            captions.update(zip(todo, texts))
        prompts = [captions[i] for i in image_of]

        # 2. Rollouts with the current policy (adapters on), the SDE steps' log-probs recorded.
        with torch.no_grad():
            context, negative = condition_padded_over_ranks(uae, prompts, opts.guidance_scale)
        sample_guidance = opts.guidance_scale if negative is not None else None
        traj = rollout(uae.velocity_fn(context, negative), noise, step_noise, sigmas, opts, sde_steps, sample_guidance)

        # 3. Reward: reconstruction similarity to the source image.
        with torch.no_grad():
            recon = uae.vae.decode(uae.vae.from_model_latents(traj.latents[:, -1].to(dtype))).float()
            rewards = group_rewards(reward_fn, images, image_of, recon, opts.size)
        all_rewards = all_gather_cat(rewards.float())
        advantages = group_advantages(all_rewards, opts.group_size, clip=opts.adv_clip,
                                      global_std=opts.adv_std == "global")
        if opts.group_size > 1:
            warn_zero_advantages(step, advantages, dist_env.is_main)
        advantages = advantages[my_share]

        # 4. Policy update: `minibatches` optimizer steps per pass, `inner_epochs` passes. Minibatch k holds the
        #    trajectories whose global index is k modulo `minibatches` (every rank holds an equal share of it).
        train_guidance = sample_guidance if opts.train_cfg else None
        global_index = torch.arange(my_share.start, my_share.stop)
        stats, grad_norms = [], []
        for _epoch in range(opts.inner_epochs):
            for k in range(opts.minibatches):
                idx = (global_index % opts.minibatches == k).nonzero().squeeze(1).to(dist_env.device)
                velocity_k = uae.velocity_fn(context[idx], negative[idx] if train_guidance else None)
                opt.zero_grad(set_to_none=True)
                update_stats = train_minibatch(uae.dit, velocity_k, traj, idx, advantages, opts, sde_steps,
                                               train_guidance)
                stats += update_stats
                average_gradients(params)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, opts.grad_clip)
                grad_norms.append(float(grad_norm))
                # Statistics of this update over the ranks: every rank takes the same skip decision.
                loss = reduce_stats(update_stats)["loss"]
                if guard.bad(step, loss=loss, reward=all_rewards, grad_norm=grad_norm):
                    opt.zero_grad(set_to_none=True)
                else:
                    opt.step()
                    if ema is not None:
                        ema.update()
        step_stats = reduce_stats(stats)

        metrics = {"loss": step_stats.pop("loss"), "reward_mean": float(all_rewards.mean()),
                   "reward_std": float(all_rewards.std(unbiased=False)),
                   "grad_norm": sum(grad_norms) / len(grad_norms), "lr": lr, **step_stats}
        log.log(step, metrics)
        if eval_items and (step % opts.eval_every == 0 or step == opts.steps):
            run_eval(step)

        if step % opts.save_every == 0 or step == opts.steps:
            state = {"options": asdict(opts), "optimizer": opt.state_dict(), "ema": ema.state_dict() if ema else None,
                     "sampler": asdict(sampler.state), "rng": rng_state()}
            if dist_env.is_main:  # the EMA adapter is what evaluation loads (Flow-GRPO evaluates the EMA)
                save_run_checkpoint(opts, step, state, uae, stage="grpo_decoder", trains=("dit_adapter",),
                                    inherited=inherited, dit_ema=ema.swap if ema is not None else None)
    if eval_log is not None:
        eval_log.close()
    finish_run(opts, log)
    return metrics


if __name__ == "__main__":
    run_script(main)
