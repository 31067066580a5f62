"""One Flow-GRPO stage-3 step (train/grpo_decoder.py's loop body) at SD3.5-medium and -large shapes, random weights.

Per preset: MMDiT in bf16 with LoRA r32/a64 on the 8 attention projections (fp32 adapters, AdamW), the SD3 VAE
decoder and a CLIP ViT-L/14 reward, all random-initialised on the GPU. One source image, G = 8 trajectories at
512 px, 10 denoising steps with CFG 4.5 (both halves in one DiT batch), SDE on all but the last step. The captioner
is replaced by cached captions: random connector outputs, 512 context tokens of width 4096 (gpu-baselines.md).
  sampling: the rollout (10 guided DiT forwards of batch 2G, no grad)
  reward:   VAE decode of the G final latents, CLIP features of source and reconstructions, group advantages
  training: per trained step, the policy forward+backward (CFG, unconditional branch detached) and the
            reference forward, the adapter off (KL, beta 0.04), then clip and AdamW
The rollout and the update are train/grpo_decoder.py's own functions (`rollout`, `train_minibatch`), called with
the script's paper options, so this times exactly what the script runs (one minibatch per step here).
Activation checkpointing of the DiT blocks is on by default (off, SD3.5-large at batch 16 does not fit on 80 GB).
A short step (2 denoising steps) warms up first; the timed step is the full one. Peak memory is
torch.cuda.max_memory_allocated over the timed step; images/s counts the G generated images.

    python bench/grpo_decoder_step.py [--presets sd3.5-medium,sd3.5-large] [--attention sdpa,triton] [--out r.json]
    python bench/grpo_decoder_step.py --smoke          # tiny models on CPU
"""
from __future__ import annotations

import common  # noqa: F401  (puts the repository on sys.path)

common.interpret_if_smoke()

import time  # noqa: E402

import torch  # noqa: E402

from common import on, sync  # noqa: E402
from eval.reward import ReconstructionReward, clip_backbone  # noqa: E402
from model.clip import CLIP, CLIPConfig  # noqa: E402
from model.flow import flow_sigmas  # noqa: E402
from model.layers import set_attention_backend  # noqa: E402
from model.lora import apply_lora, lora_parameters  # noqa: E402
from model.mmdit import MMDiT, MMDiTConfig  # noqa: E402
from model.uae import DIT_LORA_TARGETS, LORA_ALPHA, LORA_RANK, dit_velocity  # noqa: E402
from model.vae import VAE, VAEConfig  # noqa: E402
from train import grpo_decoder as gd  # noqa: E402
from train.rl import group_advantages  # noqa: E402


class Pieces:
    def __init__(self, preset: str, smoke: bool, device, dtype, grad_ckpt: bool):
        self.dit = on(device, dtype, lambda: MMDiT(MMDiTConfig.preset(preset)))
        self.dit.requires_grad_(False)
        apply_lora(self.dit, DIT_LORA_TARGETS.split(","), rank=LORA_RANK, alpha=LORA_ALPHA, init="gaussian")
        self.params = lora_parameters(self.dit)
        for p in self.params:  # trained adapters stay fp32 whatever the base dtype (as train/grpo_decoder.py)
            p.data = p.data.float()
        self.dit.gradient_checkpointing = grad_ckpt
        self.vae = on(device, dtype, lambda: VAE(VAEConfig.preset("tiny" if smoke else "sd3"))).eval()
        clip = on(device, dtype, lambda: CLIP(CLIPConfig.preset("tiny" if smoke else "vit-l-14")))
        self.reward = ReconstructionReward(clip_backbone(clip))
        self.opt = torch.optim.AdamW(self.params, lr=3e-4, weight_decay=1e-4)
        self.dtype = dtype


def flow_grpo_step(pc: Pieces, source, context, negative, pooled, sample_steps: int, o) -> dict:
    """One stage-3 step through train/grpo_decoder.py's functions; returns the seconds of each phase."""
    device = source.device
    g = context.shape[0]
    opts = gd.Options(sample_steps=sample_steps, noise_level=o.noise_level, guidance_scale=o.guidance,
                      clip_eps=1e-4, beta=0.04)
    sde_steps = gd.sde_steps_of(opts)
    sigmas = flow_sigmas(sample_steps, shift=3.0).to(device)
    latent = (g, 16, o.size // 8, o.size // 8)
    noise = torch.randn(latent, device=device)
    step_noise = torch.randn(g, sample_steps, *latent[1:], device=device)
    velocity = dit_velocity(pc.dit, context, pooled, negative)
    times = {}

    sync(device)
    t0 = time.perf_counter()
    traj = gd.rollout(velocity, noise, step_noise, sigmas, opts, sde_steps, o.guidance)  # 1. rollout
    sync(device)
    times["sampling_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    with torch.no_grad():  # 2. reward
        recon = pc.vae.decode(pc.vae.from_model_latents(traj.latents[:, -1].to(pc.dtype))).float()
        rewards = pc.reward(source.expand(g, -1, -1, -1), recon)
        advantages = group_advantages(rewards, g, clip=5.0)
    sync(device)
    times["reward_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    pc.opt.zero_grad(set_to_none=True)  # 3. policy update
    stats = gd.train_minibatch(pc.dit, velocity, traj, torch.arange(g, device=device), advantages, opts, sde_steps,
                               o.guidance)
    torch.nn.utils.clip_grad_norm_(pc.params, 1.0)
    pc.opt.step()
    sync(device)
    times["training_s"] = time.perf_counter() - t0
    times["finite"] = bool(torch.isfinite(rewards).all() and all(torch.isfinite(s["loss"]) for s in stats))
    return times


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--presets", default="sd3.5-medium,sd3.5-large", help="comma-separated MMDiT presets")
    p.add_argument("--attention", default="sdpa", help="comma-separated attention backends: sdpa, triton")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--size", type=int, default=512, help="image size in pixels")
    p.add_argument("--sample-steps", type=int, default=10)
    p.add_argument("--context-tokens", type=int, default=512)
    p.add_argument("--guidance", type=float, default=4.5)
    p.add_argument("--noise-level", type=float, default=0.7)
    p.add_argument("--no-grad-ckpt", action="store_true", help="keep every DiT activation for the backward")
    args = common.parse(p, argv, __file__)
    device = common.device_for(args)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    presets = ["tiny"] if args.smoke else args.presets.split(",")
    if args.smoke:
        args.group_size, args.size, args.sample_steps, args.context_tokens = 2, 64, 3, 5
    rows = []
    for preset in presets:
        torch.manual_seed(0)
        pc = Pieces(preset, args.smoke, device, dtype, grad_ckpt=not args.no_grad_ckpt)
        cfg = pc.dit.config
        g = args.group_size
        context = torch.randn(g, args.context_tokens, cfg.joint_attention_dim, device=device, dtype=dtype)
        negative = torch.randn_like(context)
        pooled = torch.randn(g, cfg.pooled_projection_dim, device=device, dtype=dtype)
        source = torch.rand(1, 3, args.size, args.size, device=device) * 2 - 1
        for backend in args.attention.split(","):
            set_attention_backend(backend)
            try:
                flow_grpo_step(pc, source, context, negative, pooled, 2, args)  # warm-up: kernels, allocator
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                t = flow_grpo_step(pc, source, context, negative, pooled, args.sample_steps, args)
            finally:
                set_attention_backend("sdpa")
            total = t["sampling_s"] + t["reward_s"] + t["training_s"]
            rows.append(dict(preset=preset, attention=backend, G=g, px=args.size, steps=args.sample_steps,
                             trained_steps=args.sample_steps - 1, grad_ckpt=not args.no_grad_ckpt,
                             sampling_s=round(t["sampling_s"], 3), reward_s=round(t["reward_s"], 3),
                             training_s=round(t["training_s"], 3), step_s=round(total, 3),
                             images_per_s=round(g / total, 3),
                             peak_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                             if device.type == "cuda" else None,
                             finite=t["finite"]))
        del pc, context, negative, pooled, source
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return common.report("grpo_decoder_step", args, rows, [])


if __name__ == "__main__":
    main()
