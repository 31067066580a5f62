"""Unified-GRPO stage 2 (generation for understanding): GRPO on the captioner.

The LVLM (a new LoRA adapter) is the policy over caption tokens: G captions are sampled per source image, each is
re-encoded -> connector -> frozen DiT -> image, and the reward is the cosine of frozen CLIP image features of source
and reconstruction. Token-level clipped objective with the k3 KL to the reference policy (train/rl.py):

    J = 1/G sum_i 1/|o_i| sum_t [min(rho A_i, clip(rho, 1-eps, 1+eps) A_i) - beta KL_t]

Per-token log-probs of the policy, the old policy and the reference all come from one code path
(`UAE.caption_logprobs`: forward_hidden -> `lvlm.token_logprobs`), where the fused log-prob kernel plugs in.

The reference policy is the model this stage started from (the new adapter off, every earlier adapter on); its
forward runs only when beta > 0 (TRL's GRPOTrainer skips the reference model at beta 0 too).

Launch:
    # tiny preset on procedurally generated images, one CPU process
    torchrun --nproc_per_node=1 train/grpo_encoder.py
    # 1 GPU, official weights; rewards rendered as the released recipe renders (512 px, 10 steps, CFG 5)
    torchrun --nproc_per_node=1 train/grpo_encoder.py --uae ckpt/UAE --clip ckpt/clip-vit-large-patch14 \
        --data data/images/ --dtype bf16 --size 512 --gen-steps 10 --guidance-scale 5 --render-noise caption \
        --group-size 8 --images-per-step 1 --max-new-tokens 0 --lr 1e-4 --beta 0.04 --steps 1000 \
        --out runs/grpo_encoder
    # 8 GPUs, as the pipeline's stage 2: starting from the cold start's run (stage 1) with --init
    torchrun --nproc_per_node=8 train/grpo_encoder.py --uae ckpt/UAE --init runs/cold_start \
        --clip ckpt/clip-vit-large-patch14 --data data/images/ --dtype bf16 --size 512 --gen-steps 10 \
        --guidance-scale 5 --render-noise caption --group-size 8 --images-per-step 8 --max-new-tokens 0 --lr 1e-4 \
        --beta 0.04 --steps 1000 --out runs/grpo_encoder
    # resume: the same command with --resume
"""
from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass

if __package__ in (None, ""):  # `torchrun train/grpo_encoder.py` runs the file as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from model.lora import apply_lora, load_lora, lora_disabled, lora_parameters
from model.uae import LLM_LORA_TARGETS
from train.common import (BASE_KEYS, MetricsLogger, NonFiniteGuard, RunOptions, all_gather_cat, apply_optimizer_options,
                          average_gradients, build_dataset, build_reward, build_uae, finish_run, finite,
                          init_distributed, is_tiny, open_run_folder, option, parse_dtype, parse_options, reduce_stats,
                          require, rng_state, run_script, save_run_checkpoint, set_rng_state, split_for_rank,
                          step_generator, trained_adapter, warn_single_sample_groups, warn_zero_advantages)
from train.data import ResumableSampler, SamplerState, pil_to_tensor
from train.rl import group_advantages, grpo_loss


@dataclass
class Options(RunOptions):
    clip: str = option("", "CLIP ViT-L/14 folder for the reward; empty = a tiny random CLIP (tiny preset only)")
    # Tiny-preset defaults (the no-argument run; the launch lines in the docstring give the GPU values). The tiny
    # random DiT barely listens to the caption: at 32 px / 4 steps / CFG 5 the reward's spread over captions (std
    # ~0.0004) is ~40x smaller than its spread over the decoder's initial noise (~0.016), so with a fresh noise per
    # caption the advantages are noise and the reward stays flat. The tiny run therefore renders every caption of an
    # image from one fixed noise (the reward becomes a deterministic function of the caption), raises CFG to 10 (the
    # caption matters ~2x more), uses short captions (6 tokens), G 32 on one image, lr 1e-3 (1e-2 and 3e-3 collapse
    # the policy onto one caption within ~20 steps, then the reward drifts down) and no KL penalty; with these the
    # reward rises (~+0.002) within a minute on one CPU.
    procedural_images: int = option(1, "how many procedural scenes when --data is empty")
    steps: int = option(60, "optimizer steps")
    size: int = option(32, "image size in pixels of the rendered reconstructions (released recipe: 512)")
    lr: float = option(1e-3, "AdamW learning rate (GPU launch lines: 1e-4)")
    out: str = option("runs/grpo_encoder", "run folder: metrics.jsonl, checkpoints (model/: the handoff)")
    images_per_step: int = option(1, "source images per step (global)")
    group_size: int = option(32, "captions per image (G; paper: 8)")
    temperature: float = option(1.0, "caption sampling temperature (also used for the log-probs)")
    max_new_tokens: int = option(6, "max caption tokens; 0 = the model's default")
    gen_steps: int = option(4, "denoising steps of the frozen decoder when rendering a caption (released recipe: 10)")
    guidance_scale: float = option(10.0, "decoder CFG scale (released recipe: 5)")
    render_noise: str = option("fixed", "initial noise of the frozen decoder: caption (a fresh draw per caption; "
                                        "GPU launch lines) | group (one draw per image, shared by its G captions: "
                                        "the advantage then compares captions, not noise draws) | fixed (one draw "
                                        "per image slot, the same every step: the reward is a deterministic "
                                        "function of the caption)")
    clip_eps: float = option(0.2, "ratio clip range")
    adv_clip: float = option(5.0, "advantage clamp")
    beta: float = option(0.0, "k3 KL coefficient (paper: 0.04); 0 skips the reference forward")
    loss_norm: str = option("sequence_mean", "sequence_mean (GRPO) | token_mean (DAPO)")
    logprob: str = option("fused", "fused (kernels/logprob.py, no [tokens, vocab] logits) | naive (log_softmax)")
    lora_targets: str = option(LLM_LORA_TARGETS, "comma-separated LM module names that get LoRA")

    def check(self) -> None:
        super().check()
        require(self.images_per_step >= 1, f"--images-per-step must be >= 1, got {self.images_per_step}")
        require(self.group_size >= 1, f"--group-size must be >= 1, got {self.group_size}")
        require(finite(self.temperature) and self.temperature > 0,
                f"--temperature must be > 0 (the log-probs divide by it), got {self.temperature}")
        require(self.max_new_tokens >= 0, f"--max-new-tokens must be >= 0, got {self.max_new_tokens}")
        require(self.gen_steps >= 1, f"--gen-steps must be >= 1, got {self.gen_steps}")
        require(finite(self.guidance_scale) and self.guidance_scale >= 1,
                f"--guidance-scale must be >= 1 (1 = no CFG), got {self.guidance_scale}")
        require(self.render_noise in ("caption", "group", "fixed"),
                f"--render-noise must be caption, group or fixed, got {self.render_noise!r}")
        require(finite(self.clip_eps) and self.clip_eps > 0, f"--clip-eps must be > 0, got {self.clip_eps}")
        require(finite(self.adv_clip) and self.adv_clip > 0, f"--adv-clip must be > 0, got {self.adv_clip}")
        require(finite(self.beta) and self.beta >= 0, f"--beta must be >= 0, got {self.beta}")
        require(self.loss_norm in ("sequence_mean", "token_mean"),
                f"--loss-norm must be sequence_mean or token_mean, got {self.loss_norm!r}")
        require(self.logprob in ("fused", "naive"), f"--logprob must be fused or naive, got {self.logprob!r}")
        require(any(t for t in self.lora_targets.split(",")), "--lora-targets names no module")


RESUME_KEYS = BASE_KEYS + ("data", "images_per_step", "group_size", "size", "lora_rank", "lora_alpha",
                           "lora_targets", "seed")


def main(argv: list[str] | None = None) -> dict:
    o = parse_options(Options, argv, description=__doc__.split("\n\n")[0])
    d = init_distributed(o.device)
    dtype = parse_dtype(o.dtype)
    n_caps = o.images_per_step * o.group_size
    mine = split_for_rank(n_caps, d, "images_per_step * group_size")
    warn_single_sample_groups(o.group_size, d.is_main)

    folder, state = open_run_folder(o, RESUME_KEYS, d.is_main)
    uae, inherited = build_uae(o, dtype, d.device, folder)
    uae.lvlm.fused_logprobs = o.logprob == "fused"
    reward_fn = build_reward(o.clip, is_tiny(o), o.seed, dtype, d.device)
    targets = [t for t in o.lora_targets.split(",") if t]
    # Adapters on the text decoder only (the vision tower's MLP shares the projection names).
    apply_lora(uae.lvlm.language_model, targets, rank=o.lora_rank, alpha=o.lora_alpha, init="gaussian")
    params = lora_parameters(uae.lvlm)
    for p in params:
        p.data = p.data.float()
    uae.lvlm.gradient_checkpointing = o.grad_checkpointing
    opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)

    dataset = build_dataset(o, need_caption=False)
    sampler = ResumableSampler(dataset, seed=o.seed)
    start = 0
    if state is not None:
        load_lora(uae.lvlm, trained_adapter(folder, "lvlm"))
        opt.load_state_dict(state["optimizer"])
        apply_optimizer_options(opt, o, d.is_main)
        sampler.state = SamplerState(**state["sampler"])
        start = state["step"]
        set_rng_state(state["rng"])
    log = MetricsLogger(os.path.join(o.out, "metrics.jsonl"), o.steps, d.is_main, start_step=start)
    guard = NonFiniteGuard(o.max_bad_steps)
    metrics: dict = {}

    for step in range(start + 1, o.steps + 1):
        gen = step_generator(o.seed, step)
        images = [im for im, _ in sampler.next_batch(o.images_per_step)]
        seeds = torch.randint(2**31 - 1, (n_caps, 2), generator=gen)
        image_of = [i // o.group_size for i in range(n_caps)]
        if o.render_noise == "group":  # every caption of an image renders from its group's first draw
            seeds[:, 1] = seeds[[i * o.group_size for i in image_of], 1]
        elif o.render_noise == "fixed":  # one draw per image slot, independent of the step
            fixed = torch.randint(2**31 - 1, (o.images_per_step,), generator=torch.Generator().manual_seed(o.seed))
            seeds[:, 1] = fixed[image_of]
        seeds, image_of = seeds[mine].tolist(), image_of[mine]

        # 1. Sample this rank's captions (one seeded generator per caption: independent of the rank layout). Each
        #    caption ends before any sampled image placeholder (UAE.caption).
        kw = {"max_new_tokens": o.max_new_tokens} if o.max_new_tokens else {}
        rows = []
        for k, i in enumerate(image_of):
            _, _, out = uae.caption([images[i]], do_sample=True, temperature=o.temperature,
                                    generator=torch.Generator().manual_seed(seeds[k][0]), return_output=True, **kw)
            rows.append((out.new_tokens[0], out.mask[0]))
        n_max = max(t.shape[0] for t, _ in rows)
        pad = uae.processor.pad_token_id
        tokens = torch.stack([torch.nn.functional.pad(t, (0, n_max - t.shape[0]), value=pad) for t, _ in rows])
        masks = torch.stack([torch.nn.functional.pad(m, (0, n_max - m.shape[0]), value=False) for _, m in rows])
        inputs = uae.caption_inputs([images[i] for i in image_of])
        texts = [t.strip() for t in uae.processor.batch_decode(tokens.masked_fill(~masks, pad).tolist())]

        # 2. Render each caption with the frozen decoder and score it against its source.
        with torch.no_grad():
            recon = []
            for k, text in enumerate(texts):
                g = torch.Generator().manual_seed(seeds[k][1])
                recon.append(uae.generate([text], o.size, o.size, o.gen_steps, o.guidance_scale, g,
                                          output_type="tensor"))
            recon = torch.cat(recon)
            sources = pil_to_tensor([images[i] for i in image_of], o.size).to(d.device)
            rewards = reward_fn(sources, recon)
        all_rewards = all_gather_cat(rewards.float())
        advantages = group_advantages(all_rewards, o.group_size, clip=o.adv_clip)
        if o.group_size > 1:
            warn_zero_advantages(step, advantages, d.is_main)
        advantages = advantages[mine]

        # 3. Old-policy (and, with beta > 0, reference) log-probs through the same path, then the clipped update.
        with torch.no_grad():
            old_logp = uae.caption_logprobs(inputs, tokens, masks, o.temperature)
            ref_logp = None
            if o.beta > 0:
                with lora_disabled(uae.lvlm):
                    ref_logp = uae.caption_logprobs(inputs, tokens, masks, o.temperature)
        opt.zero_grad(set_to_none=True)
        logp = uae.caption_logprobs(inputs, tokens, masks, o.temperature)
        loss, st = grpo_loss(logp, old_logp, ref_logp, advantages, masks, o.clip_eps, o.beta, reduction=o.loss_norm)
        loss.backward()
        average_gradients(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
        step_stats = reduce_stats([{"loss": loss.detach(), **st}])  # over ranks: every rank skips alike
        if guard.bad(step, loss=step_stats["loss"], reward=all_rewards, grad_norm=grad_norm):
            opt.zero_grad(set_to_none=True)
        else:
            opt.step()

        lengths = all_gather_cat(masks.sum(1).float())
        metrics = {"loss": step_stats.pop("loss"), "reward_mean": float(all_rewards.mean()),
                   "reward_std": float(all_rewards.std(unbiased=False)), "grad_norm": float(grad_norm),
                   "caption_len": float(lengths.mean()), **step_stats}
        log.log(step, metrics)
        if step % o.save_every == 0 or step == o.steps:
            state = {"options": asdict(o), "optimizer": opt.state_dict(), "sampler": asdict(sampler.state),
                     "rng": rng_state()}
            if d.is_main:
                save_run_checkpoint(o, step, state, uae, stage="grpo_encoder", trains=("lvlm_adapter",),
                                    inherited=inherited)
    finish_run(o, log)
    return metrics


if __name__ == "__main__":
    run_script(main)
