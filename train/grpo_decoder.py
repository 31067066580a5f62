"""Unified-GRPO stage 3 (understanding for generation): Flow-GRPO on the decoder.

The frozen captioner describes each source image; the MMDiT (LoRA adapters) samples G stochastic (SDE) trajectories per
caption; reward = cosine of frozen CLIP image features of source and reconstruction; group-normalised advantages; a
per-step clipped likelihood ratio with a KL penalty to the adapters-off reference (Flow-GRPO, see
../shared/notes/algorithms.md and train/rl.py).

Launch:
    # tiny preset on procedurally generated images, one CPU process (the README's main job)
    torchrun --nproc_per_node=1 train/grpo_decoder.py
    # 1 GPU, official weights, the paper's (Flow-GRPO's) hyper-parameters spelled out
    torchrun --nproc_per_node=1 train/grpo_decoder.py --uae ckpt/UAE --clip ckpt/clip-vit-large-patch14 \
        --data data/images/ --dtype bf16 --size 512 --group-size 8 --images-per-step 1 --sample-steps 10 \
        --noise-level 0.7 --guidance-scale 4.5 --clip-eps 1e-4 --beta 0.04 --lr 3e-4 --weight-decay 1e-4 \
        --lora-rank 32 --lora-alpha 64 --steps 1000 --out runs/grpo_decoder
    # 8 GPUs (trajectories of each step sharded across ranks, rewards all-gathered for the advantages)
    torchrun --nproc_per_node=8 train/grpo_decoder.py --uae ckpt/UAE --clip ckpt/clip-vit-large-patch14 \
        --data data/images/ --dtype bf16 --size 512 --group-size 24 --images-per-step 8 --sample-steps 10 \
        --noise-level 0.7 --guidance-scale 4.5 --clip-eps 1e-4 --beta 0.04 --lr 3e-4 --weight-decay 1e-4 \
        --lora-rank 32 --lora-alpha 64 --steps 1000 --out runs/grpo_decoder
    # resume
    torchrun --nproc_per_node=8 train/grpo_decoder.py ... --resume

One process and N processes give the same result for the same global batch: every random draw (data order, caption
sampling, initial and per-step noise) is made in global order from seeded generators and sliced per rank, and the
gradients are averaged over ranks (DDP's all-reduce, written out in `average_gradients`).
"""
from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass

if __package__ in (None, ""):  # `torchrun train/grpo_decoder.py` runs the file as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from model.flow import flow_sigmas, sde_step_with_logprob
from model.lora import apply_lora, load_lora, lora_disabled, lora_parameters, save_lora
from model.uae import UAE
from train.common import (MetricsLogger, NonFiniteGuard, RunOptions, all_gather_cat, average_gradients, build_dataset,
                          build_reward, build_uae, close_distributed, condition, init_distributed, option, parse_dtype,
                          parse_options, reduce_stats, resume_checkpoint, rng_state, save_checkpoint, split_for_rank,
                          step_generator)
from train.data import ResumableSampler, SamplerState, pil_to_tensor
from train.rl import EMA, flow_grpo_loss, group_advantages

DIT_LORA_TARGETS = "to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out"


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
    out: str = option("runs/grpo_decoder", "run folder: metrics.jsonl, checkpoints, adapters")
    images_per_step: int = option(1, "source images per step (global)")
    group_size: int = option(64, "trajectories per image (G; paper: 24, 8 on one GPU)")
    sample_steps: int = option(4, "denoising steps when sampling trajectories (paper: 10)")
    sde_window: str = option("", "'start:end' steps run as SDE and trained, ODE elsewhere; empty = all but the last")
    noise_level: float = option(0.7, "SDE noise level a")
    guidance_scale: float = option(4.5, "CFG scale while sampling and training (1 = off)")
    train_cfg: bool = option(True, "apply CFG in the training forward too (as sampled)")
    minibatches: int = option(1, "optimizer steps per rollout batch: the trajectories are split into this many "
                                 "minibatches (by global index modulo, so any rank count gives the same minibatches)")
    inner_epochs: int = option(1, "passes over each rollout batch (PPO epochs); >1 re-uses the trajectories, and the "
                                  "clipped ratio keeps the later updates near the sampling policy")
    clip_eps: float = option(1e-4, "ratio clip range")
    adv_clip: float = option(5.0, "advantage clamp")
    beta: float = option(0.0, "KL coefficient (paper: 0.04)")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    lora_targets: str = option(DIT_LORA_TARGETS, "comma-separated DiT module names that get LoRA")
    ema_decay: float = option(0.95, "EMA decay of the adapters (for evaluation); 0 = off")
    caption_temperature: float = option(0.7, "captioner sampling temperature (0 = greedy)")
    caption_tokens: int = option(0, "max caption tokens; 0 = the model's default")


# Options that must match to resume (the rest, e.g. --steps, may change).
RESUME_KEYS = ("uae", "data", "dataset_captions", "images_per_step", "group_size", "size", "sample_steps",
               "sde_window", "lora_rank",
               "lora_alpha", "lora_targets", "seed")


def trained_steps(o: Options) -> list[int]:
    """Indices of the denoising steps run as SDE (and trained). The last step (to sigma 0) is never trained: its
    Gaussian is degenerate."""
    last = o.sample_steps - 1
    if not o.sde_window:
        return list(range(last))
    try:
        start, end = (int(x) for x in o.sde_window.split(":"))
    except ValueError:
        raise ValueError(f"--sde-window must look like 'start:end', got {o.sde_window!r}") from None
    if not 0 <= start < end <= last:
        raise ValueError(f"--sde-window {o.sde_window!r} must satisfy 0 <= start < end <= {last}")
    return list(range(start, end))


def velocity(uae: UAE, x, sigma, context, negative, guidance_scale):
    t = (sigma * 1000).expand(x.shape[0]).to(x.device)
    return uae.velocity_fn(context, negative, guidance_scale)(x, t)


@torch.no_grad()
def rollout(uae: UAE, o: Options, context, negative, noise, step_noise, sigmas, sde_steps, guidance):
    """Sample trajectories; return latents [B, N+1, ...], old log-probs [B, N] (0 on ODE steps) and final latents."""
    x = noise
    latents, logps = [x], []
    for i in range(o.sample_steps):
        v = velocity(uae, x, sigmas[i], context, negative, guidance)
        level = o.noise_level if i in sde_steps else 0.0
        x, logp, _, _ = sde_step_with_logprob(v, x, sigmas[i], sigmas[i + 1], level, noise=step_noise[:, i])
        latents.append(x)
        logps.append(logp if i in sde_steps else torch.zeros_like(logp))
    return torch.stack(latents, 1), torch.stack(logps, 1)


def main(argv: list[str] | None = None) -> dict:
    o = parse_options(Options, argv, description=__doc__.split("\n\n")[0])
    d = init_distributed(o.device)
    dtype = parse_dtype(o.dtype)
    sde_steps = trained_steps(o)
    n_traj = o.images_per_step * o.group_size
    mine = split_for_rank(n_traj, d, "images_per_step * group_size")
    if o.minibatches < 1 or o.inner_epochs < 1:
        raise ValueError(f"--minibatches and --inner-epochs must be >= 1, got {o.minibatches}, {o.inner_epochs}")
    if (mine.stop - mine.start) % o.minibatches:
        raise ValueError(f"trajectories per rank {mine.stop - mine.start} must divide into --minibatches "
                         f"{o.minibatches}")
    torch.manual_seed(o.seed)

    uae = build_uae(o.uae, o.seed, dtype, d.device, o.attention)
    reward_fn = build_reward(o.clip, not o.uae, o.seed, dtype, d.device)
    targets = [t for t in o.lora_targets.split(",") if t]
    apply_lora(uae.dit, targets, rank=o.lora_rank, alpha=o.lora_alpha, init="gaussian")
    params = lora_parameters(uae.dit)
    for p in params:  # trained adapters stay fp32 whatever the base dtype
        p.data = p.data.float()
    uae.dit.gradient_checkpointing = o.grad_checkpointing
    opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    ema = EMA(params, decay=o.ema_decay) if o.ema_decay > 0 else None

    dataset = build_dataset(o, need_caption=o.dataset_captions)
    sampler = ResumableSampler(dataset, seed=o.seed)
    start = 0
    folder, state = resume_checkpoint(o, RESUME_KEYS, d.is_main)
    if state is not None:
        load_lora(uae.dit, folder / "adapter")
        opt.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        sampler.state = SamplerState(**state["sampler"])
        start = state["step"]
    log = MetricsLogger(os.path.join(o.out, "metrics.jsonl"), o.steps, d.is_main, start_step=start)
    guard = NonFiniteGuard(o.max_bad_steps)
    sigmas = flow_sigmas(o.sample_steps, shift=uae.settings.shift).to(d.device)
    latent_shape = uae.latent_shape(1, o.size, o.size)[1:]
    metrics: dict = {}

    for step in range(start + 1, o.steps + 1):
        # Every rank draws the same global randomness, then keeps its slice of trajectories.
        gen = step_generator(o.seed, step)
        batch = sampler.next_batch(o.images_per_step)
        images = [im for im, _ in batch]
        noise = torch.randn(n_traj, *latent_shape, generator=gen)[mine].to(d.device)
        step_noise = torch.randn(n_traj, o.sample_steps, *latent_shape, generator=gen)[mine].to(d.device)
        cap_seeds = torch.randint(2**31 - 1, (o.images_per_step,), generator=gen).tolist()

        # 1. Captions of this rank's images: cached in the dataset, or from the frozen captioner (one seeded
        #    generator per image).
        image_of = [i // o.group_size for i in range(n_traj)][mine]
        captions = {i: batch[i][1] for i in set(image_of)} if o.dataset_captions else {}
        for i in sorted(set(image_of) - set(captions)):
            kw = dict(do_sample=o.caption_temperature > 0, temperature=o.caption_temperature or 1.0,
                      generator=torch.Generator().manual_seed(cap_seeds[i]))
            if o.caption_tokens:
                kw["max_new_tokens"] = o.caption_tokens
            captions[i] = uae.caption([images[i]], **kw)[0]
        prompts = [captions[i] for i in image_of]

        # 2. Rollouts with the current policy (adapters on), all SDE steps recorded.
        with torch.no_grad():
            context, negative = condition(uae, prompts, o.guidance_scale)  # padded like the global batch
        latents, old_logp = rollout(uae, o, context, negative, noise, step_noise, sigmas, sde_steps, o.guidance_scale)

        # 3. Reward: reconstruction similarity to the source image.
        with torch.no_grad():
            recon = uae.vae.decode(uae.vae.from_model_latents(latents[:, -1].to(dtype))).float()
            sources = pil_to_tensor([images[i] for i in image_of], o.size).to(d.device)
            rewards = reward_fn(sources, recon)
        all_rewards = all_gather_cat(rewards.float())
        advantages = group_advantages(all_rewards, o.group_size, clip=o.adv_clip)[mine]

        # 4. Policy update: `minibatches` optimizer steps per pass, `inner_epochs` passes. Per optimizer step one
        #    backward per trained step, gradients accumulated over the steps. Minibatch k holds the trajectories whose
        #    global index is k modulo `minibatches` (every rank holds an equal share of it).
        stats = []
        guidance = o.guidance_scale if o.train_cfg else 1.0
        global_index = torch.arange(mine.start, mine.stop)
        grad_norms = []
        for _epoch in range(o.inner_epochs):
            for k in range(o.minibatches):
                idx = (global_index % o.minibatches == k).nonzero().squeeze(1).to(d.device)
                ctx_k = context[idx]
                neg_k = negative[idx] if (o.train_cfg and negative is not None) else None
                opt.zero_grad(set_to_none=True)
                for j in sde_steps:
                    x, x_next = latents[idx, j], latents[idx, j + 1]
                    v = velocity(uae, x, sigmas[j], ctx_k, neg_k, guidance)
                    _, logp, mean, std = sde_step_with_logprob(v, x, sigmas[j], sigmas[j + 1], o.noise_level,
                                                               prev_sample=x_next)
                    with torch.no_grad(), lora_disabled(uae.dit):
                        v_ref = velocity(uae, x, sigmas[j], ctx_k, neg_k, guidance)
                        _, _, mean_ref, _ = sde_step_with_logprob(v_ref, x, sigmas[j], sigmas[j + 1], o.noise_level,
                                                                  prev_sample=x_next)
                    loss, st = flow_grpo_loss(logp, old_logp[idx, j], advantages[idx], mean, mean_ref, std,
                                              o.clip_eps, o.beta)
                    (loss / len(sde_steps)).backward()
                    stats.append({k_: v_.detach().float() for k_, v_ in st.items()} | {"loss": loss.detach().float()})
                average_gradients(params)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
                grad_norms.append(float(grad_norm))
                # Statistics of this update over the ranks: every rank takes the same skip decision.
                update_stats = reduce_stats(stats[-len(sde_steps):])
                if guard.bad(step, loss=update_stats["loss"], reward=all_rewards, grad_norm=grad_norm):
                    opt.zero_grad(set_to_none=True)
                else:
                    opt.step()
                    if ema is not None:
                        ema.update()
        step_stats = reduce_stats(stats)
        grad_norm = sum(grad_norms) / len(grad_norms)

        metrics = {"loss": step_stats.pop("loss"), "reward_mean": float(all_rewards.mean()),
                   "reward_std": float(all_rewards.std(unbiased=False)), "grad_norm": float(grad_norm),
                   **step_stats}
        log.log(step, metrics)

        if step % o.save_every == 0 or step == o.steps:
            state = {"options": asdict(o), "optimizer": opt.state_dict(), "ema": ema.state_dict() if ema else None,
                     "sampler": asdict(sampler.state), "rng": rng_state()}

            def write(folder):
                save_lora(uae.dit, folder / "adapter")
                if ema is not None:  # the EMA of the adapters, what evaluation loads (Flow-GRPO evaluates the EMA)
                    with ema.swap():
                        save_lora(uae.dit, folder / "ema_adapter")

            if d.is_main:
                save_checkpoint(o.out, step, state, write_extra=write)
    log.close()
    close_distributed()
    return metrics


if __name__ == "__main__":
    main()
