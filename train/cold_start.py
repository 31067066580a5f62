"""Unified-GRPO stage 1: cold start. The LVLM and the DiT are trained jointly with only the reconstruction loss

    L = 1 - cos(f(x), f(x~)),   f = frozen CLIP image features, x~ = decoder(connector(LVLM(x, caption)))

The caption is sampled from the LVLM (no gradient through the discrete tokens); the DiT is conditioned on the hidden
states of the caption tokens computed with the image in context (`UAE.caption_context`), so the gradient flows from the
reconstruction through the sampler, the VAE decoder and the connector into the LVLM (LoRA) — and into the DiT (LoRA).
Sampling uses few steps (released: 512 px, 10 steps, CFG 5); `--grad-last-k` truncates backprop to the last K steps.

Launch:
    # tiny preset on procedurally generated images, one CPU process
    torchrun --nproc_per_node=1 train/cold_start.py
    # 1 GPU, official weights
    torchrun --nproc_per_node=1 train/cold_start.py --uae ckpt/UAE --clip ckpt/clip-vit-large-patch14 \
        --data data/images/ --dtype bf16 --size 512 --sample-steps 10 --guidance-scale 5 --lr 1e-4 --batch-size 1 \
        --grad-checkpointing --steps 1000 --out runs/cold_start
    # 8 GPUs, as the pipeline's stage 1: starting from the SFT stages' result (the captioner's run, which holds the
    # decoder's too) with --init
    torchrun --nproc_per_node=8 train/cold_start.py --uae ckpt/UAE --init runs/sft_decoder \
        --clip ckpt/clip-vit-large-patch14 --data data/images/ --dtype bf16 --size 512 --sample-steps 10 \
        --guidance-scale 5 --lr 1e-4 --batch-size 8 --grad-checkpointing --steps 1000 --out runs/cold_start
    # resume: the same command with --resume
"""
from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass

if __package__ in (None, ""):  # `torchrun train/cold_start.py` runs the file as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from model.flow import flow_sigmas, sample_ode
from model.lora import apply_lora, load_lora, lora_parameters
from model.uae import DIT_LORA_TARGETS, LLM_LORA_TARGETS, NEGATIVE_PROMPT, UAESettings
from train.common import (BASE_KEYS, MetricsLogger, NonFiniteGuard, RunOptions, average_gradients, build_dataset,
                          build_reward, build_uae, finish_run, finite, global_max, init_distributed, is_tiny,
                          open_run_folder, option, parse_dtype, parse_options, reduce_stats, require, resume_loop,
                          rng_state, run_script, save_run_checkpoint, set_lr, split_for_rank, step_generator,
                          trained_adapter)
from train.data import ResumableSampler, pil_to_tensor


@dataclass
class Options(RunOptions):
    clip: str = option("", "CLIP ViT-L/14 folder for the loss; empty = a tiny random CLIP (tiny preset only)")
    out: str = option("runs/cold_start", "run folder: metrics.jsonl, checkpoints (model/: the handoff)")
    # Tiny no-argument run: one procedural image at lr 1e-2, so the loss visibly falls in a minute (the tiny random
    # captioner writes near-identical captions for different images, so several images cannot be told apart).
    # Real runs pass --data and the paper-scale lr (see the launch lines).
    procedural_images: int = option(1, "how many procedural scenes when --data is empty")
    lr: float = option(1e-2, "AdamW learning rate (real runs: ~1e-4)")
    batch_size: int = option(2, "images per step (global)")
    sample_steps: int = option(4, "denoising steps (released: 10)")
    grad_last_k: int = option(0, "backprop through the last K denoising steps only; 0 = all")
    guidance_scale: float = option(5.0, "CFG scale")
    caption_temperature: float = option(UAESettings.caption_temperature, "caption sampling temperature")
    max_new_tokens: int = option(0, "max caption tokens; 0 = the model's default")
    train_connector: bool = option(True, "train the connector's full weights")

    def check(self) -> None:
        super().check()
        require(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        require(self.sample_steps >= 1, f"--sample-steps must be >= 1, got {self.sample_steps}")
        require(0 <= self.grad_last_k <= self.sample_steps,
                f"--grad-last-k must be in [0, --sample-steps {self.sample_steps}], got {self.grad_last_k}")
        require(finite(self.guidance_scale) and self.guidance_scale >= 1,
                f"--guidance-scale must be >= 1 (1 = no CFG), got {self.guidance_scale}")
        require(finite(self.caption_temperature) and self.caption_temperature >= 0,
                f"--caption-temperature must be >= 0, got {self.caption_temperature}")
        require(self.max_new_tokens >= 0, f"--max-new-tokens must be >= 0, got {self.max_new_tokens}")


RESUME_KEYS = BASE_KEYS + ("data", "batch_size", "size", "sample_steps", "lora_rank", "lora_alpha",
                           "train_connector", "seed")


def main(argv: list[str] | None = None) -> dict:
    opts = parse_options(Options, argv, description=__doc__.split("\n\n")[0])
    dist_env = init_distributed(opts.device)
    dtype = parse_dtype(opts.dtype)
    my_share = split_for_rank(opts.batch_size, dist_env, "batch_size")

    folder, state = open_run_folder(opts, RESUME_KEYS, dist_env.is_main)
    uae, inherited = build_uae(opts, dtype, dist_env.device, folder)
    reward_fn = build_reward(opts.clip, is_tiny(opts), opts.seed, dtype, dist_env.device)
    apply_lora(uae.lvlm.language_model, LLM_LORA_TARGETS.split(","), rank=opts.lora_rank, alpha=opts.lora_alpha,
               init="gaussian")
    apply_lora(uae.dit, DIT_LORA_TARGETS.split(","), rank=opts.lora_rank, alpha=opts.lora_alpha, init="gaussian")
    params = lora_parameters(uae.lvlm) + lora_parameters(uae.dit)
    uae.connector.float()  # trained (or handed on) in fp32
    if opts.train_connector:
        uae.connector.requires_grad_(True)
        params += list(uae.connector.parameters())
    for p in params:
        p.data = p.data.float()
    uae.lvlm.gradient_checkpointing = uae.dit.gradient_checkpointing = opts.grad_checkpointing
    opt = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)

    dataset = build_dataset(opts, need_caption=False)
    sampler = ResumableSampler(dataset, seed=opts.seed)
    if state is not None:  # the trained connector came back with the checkpoint's model/ (build_uae)
        load_lora(uae.lvlm, trained_adapter(folder, "lvlm"))
        load_lora(uae.dit, trained_adapter(folder, "dit"))
    start = resume_loop(state, opt, sampler, opts, dist_env.is_main)
    log = MetricsLogger(os.path.join(opts.out, "metrics.jsonl"), opts.steps, dist_env.is_main, start_step=start)
    guard = NonFiniteGuard(opts.max_bad_steps)
    sigmas = flow_sigmas(opts.sample_steps, shift=uae.settings.shift).to(dist_env.device)
    guidance = opts.guidance_scale if opts.guidance_scale > 1 else None
    metrics: dict = {}

    for step in range(start + 1, opts.steps + 1):
        lr = set_lr(opt, opts, step)
        gen = step_generator(opts.seed, step)
        images = sampler.next_batch(opts.batch_size)
        noise = torch.randn(uae.latent_shape(opts.batch_size, opts.size, opts.size), generator=gen)[my_share]
        noise = noise.to(dist_env.device)
        seeds = torch.randint(2**31 - 1, (opts.batch_size,), generator=gen)[my_share].tolist()
        my_images = [im for im, _ in images[my_share]]

        # 1. Captions (sampled, no gradient through the tokens) as one batch, one seeded generator per image (a
        #    caption does not depend on the rows beside it); each ends before any sampled image placeholder
        #    (UAE.caption), so the caption re-encodes with its image.
        kw = {"max_new_tokens": opts.max_new_tokens} if opts.max_new_tokens else {}
        _, inputs, out = uae.caption(my_images, temperature=opts.caption_temperature,
                                     generator=[torch.Generator().manual_seed(s) for s in seeds], return_output=True,
                                     **kw)
        extra = global_max(out.new_tokens.shape[1]) - out.new_tokens.shape[1]  # the global batch's padding
        tokens = torch.nn.functional.pad(out.new_tokens, (0, extra), value=uae.processor.pad_token_id)
        masks = torch.nn.functional.pad(out.mask, (0, extra), value=False)

        # 2. Differentiable reconstruction conditioned on the caption tokens' hidden states (image in context; the
        #    frozen vision tower's features come with the captions' inputs): Euler ODE sampling with gradients
        #    through every step (or the last --grad-last-k), both CFG branches.
        opt.zero_grad(set_to_none=True)
        context = uae.caption_context(inputs, tokens, masks)
        with torch.no_grad():
            negative = uae.encode_text([NEGATIVE_PROMPT]).expand(len(my_images), -1, -1) if guidance else None
        latents = sample_ode(uae.velocity_fn(context, negative), noise, sigmas, guidance_scale=guidance,
                             grad_last_k=opts.grad_last_k or None)
        recon = uae.vae.decode(uae.vae.from_model_latents(latents.to(dtype))).float()

        # 3. L = 1 - cos(CLIP(x), CLIP(x~)), averaged over the global batch (gradients averaged over ranks).
        sources = pil_to_tensor(my_images, opts.size).to(dist_env.device)
        similarity = reward_fn(sources, recon, differentiable=True)
        loss = (1 - similarity).mean()
        loss.backward()
        average_gradients(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, opts.grad_clip)
        step_stats = reduce_stats([{"loss": loss.detach(), "similarity": similarity.detach().mean(),
                                    "caption_len": masks.sum(1).float().mean()}])  # global means
        if guard.bad(step, loss=step_stats["loss"], grad_norm=grad_norm):
            opt.zero_grad(set_to_none=True)
        else:
            opt.step()
        metrics = {**step_stats, "grad_norm": float(grad_norm), "lr": lr}
        log.log(step, metrics)
        if step % opts.save_every == 0 or step == opts.steps:
            state = {"options": asdict(opts), "optimizer": opt.state_dict(), "sampler": asdict(sampler.state),
                     "rng": rng_state()}
            if dist_env.is_main:
                trains = ("lvlm_adapter", "dit_adapter") + (("connector",) if opts.train_connector else ())
                save_run_checkpoint(opts, step, state, uae, stage="cold_start", trains=trains, inherited=inherited)
    finish_run(opts, log)
    return metrics


if __name__ == "__main__":
    run_script(main)
