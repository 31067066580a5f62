"""Unified-GRPO stage 2 (generation for understanding): GRPO on the captioner.

The LVLM (a new LoRA adapter) is the policy over caption tokens: G captions are sampled per source image, each is
re-encoded -> connector -> frozen DiT -> image, and the reward is the cosine of frozen CLIP image features of source
and reconstruction. Token-level clipped objective with the k3 KL to the reference policy (train/rl.py):

    J = 1/G sum_i 1/|o_i| sum_t [min(rho A_i, clip(rho, 1-eps, 1+eps) A_i) - beta KL_t]

Per-token log-probs of the policy and the reference come from one code path (`UAE.caption_logprobs`: forward_hidden
-> `lvlm.token_logprobs`), where the fused log-prob kernel plugs in; one optimizer step per batch of rollouts, so the
old policy's log-probs are the policy's own, detached (`policy_loss`, TRL's num_iterations = 1).

A rank's share of the step runs as batches, not caption by caption (`sample_captions`, `render_captions`): each
image's vision features and prompt prefill are computed once and its KV cache copied to its G rows, which decode as
one batch; the captions render as one DiT batch; the log-prob forwards reuse the image features and run each
prompt once for its G captions (`Qwen25VL.forward_hidden_after_prompts`). Every caption and every initial noise has
its own seeded generator, so what a caption samples and renders does not depend on the rows beside it: N processes
equal one process with the same global batch up to float rounding of the batched matmuls (tested to 1e-5). Texts are
padded for the DiT to the step's longest over all ranks, as stage 3 pads (the DiT has no text mask).
bench/grpo_encoder_step.py times this against the caption-by-caption step.

The decoder is frozen, and its text path is the LVLM: with --text-encoder frozen (the default) captions are encoded
for the DiT without this stage's adapter (`UAE.captioner_only`), here and after (the handoff records the adapter as
captioner-only). Otherwise every policy update also moves what the decoder reads, a change the policy gradient does
not see (the reward's gradient reaches the adapter only through the caption tokens): on the toy world's small LVLM
that drift cost more reconstruction than the longer captions gained. --text-encoder policy keeps one LVLM for both.

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
    # 8 GPUs, as the pipeline's stage 2: starting from the cold start's run (stage 1) with --init; the learning rate
    # decays linearly to 0, TRL's default schedule (on the toy world it kept seeds from collapsing at the same peak)
    torchrun --nproc_per_node=8 train/grpo_encoder.py --uae ckpt/UAE --init runs/cold_start \
        --clip ckpt/clip-vit-large-patch14 --data data/images/ --dtype bf16 --size 512 --gen-steps 10 \
        --guidance-scale 5 --render-noise caption --group-size 8 --images-per-step 8 --max-new-tokens 0 --lr 1e-4 \
        --beta 0.04 --lr-schedule linear --steps 1000 --out runs/grpo_encoder
    # resume: the same command with --resume
"""
from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass

if __package__ in (None, ""):  # `torchrun train/grpo_encoder.py` runs the file as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from model.lora import apply_lora, load_lora, lora_disabled, lora_layers, lora_parameters
from model.uae import LLM_LORA_TARGETS
from train.common import (BASE_KEYS, MetricsLogger, NonFiniteGuard, RunOptions, all_gather_cat, average_gradients,
                          build_dataset, build_reward, build_uae, condition_length, finish_run, finite, group_rewards,
                          init_distributed, is_tiny, open_run_folder, option, parse_dtype, parse_options, reduce_stats,
                          require, resume_loop, rng_state, run_script, save_run_checkpoint, set_lr, split_for_rank,
                          step_generator, trained_adapter, warn_single_sample_groups, warn_zero_advantages)
from train.data import ResumableSampler
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
    mask_truncated_completions: bool = option(False, "captions that hit --max-new-tokens without an end token take "
                                                     "no part in the loss (their rewards still do in the group's "
                                                     "advantages): TRL's mask_truncated_completions, DAPO's "
                                                     "overlong filtering")
    logprob: str = option("fused", "fused (kernels/logprob.py, no [tokens, vocab] logits) | naive (log_softmax)")
    lora_targets: str = option(LLM_LORA_TARGETS, "comma-separated LM module names that get LoRA")
    text_encoder: str = option("frozen", "how the decoder encodes captions, in this stage and after it: frozen "
                                         "(the LVLM without this stage's adapter: the decoder stays the one the "
                                         "stage started with) | policy (the LVLM with it: one LVLM writes and "
                                         "encodes captions)")
    cuda_graph: bool = option(False, "replay the caption decode steps as CUDA graphs (model/graph_decode.py; CUDA)")

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
        require(self.text_encoder in ("frozen", "policy"),
                f"--text-encoder must be frozen or policy, got {self.text_encoder!r}")
        require(not (self.cuda_graph and self.device == "cpu"), "--cuda-graph needs a CUDA device, not --device cpu")


# train/rl.py `clipped_policy_loss`'s statistics over the loss's tokens.
RATIO_STATS = ("clip_frac", "ratio_mean", "ratio_min", "ratio_max", "approx_kl")

RESUME_KEYS = BASE_KEYS + ("data", "images_per_step", "group_size", "size", "lora_rank", "lora_alpha",
                           "lora_targets", "seed", "text_encoder")


def sample_captions(uae, images: list, image_of: list[int], seeds: list[int], opts: Options):
    """Caption row r of image images[image_of[r]] from generator seed seeds[r], all rows as one batch: each image's
    vision features and prompt prefill are computed once and its KV cache copied to its rows (`UAE.caption` with
    `image_of`); one generator per row, so a caption depends on its seed, not on the rows beside it or the rank
    layout. Captions end before any sampled image placeholder. Returns (tokens [R, N], mask [R, N], texts, the rows'
    inputs with the image features for the log-prob forwards)."""
    first = image_of[0]
    kw = {"max_new_tokens": opts.max_new_tokens} if opts.max_new_tokens else {}
    texts, inputs, out = uae.caption(images[first:image_of[-1] + 1], do_sample=True, temperature=opts.temperature,
                                     generator=[torch.Generator().manual_seed(s) for s in seeds], return_output=True,
                                     image_of=[i - first for i in image_of], cuda_graph=opts.cuda_graph, **kw)
    return out.new_tokens, out.mask, texts, inputs


def render_captions(uae, texts: list[str], seeds: list[int], opts: Options) -> torch.Tensor:
    """The frozen decoder's images [R, 3, size, size] of `texts`, as one batch: image r from the initial noise of
    generator seed seeds[r]; every text (and the negative prompt) padded to the longest of the step over all ranks
    (`condition_length`: the DiT has no text mask, so the padding is part of the condition, as stage 3 renders)."""
    return uae.generate(texts, opts.size, opts.size, opts.gen_steps, opts.guidance_scale,
                        [torch.Generator().manual_seed(s) for s in seeds], output_type="tensor",
                        pad_to=condition_length(uae, texts, opts.guidance_scale))


def ended(uae, tokens: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """[R] True where a caption ends with an end token (im_end or pad, the captioner's eos ids) within its mask, False
    where it was cut: by --max-new-tokens or before a sampled image placeholder (TRL's `is_eos.any(dim=1)`)."""
    p = uae.processor
    return (((tokens == p.im_end_id) | (tokens == p.pad_token_id)) & masks).any(1)


def policy_loss(uae, inputs: dict, tokens: torch.Tensor, masks: torch.Tensor, advantages: torch.Tensor,
                opts: Options) -> tuple[torch.Tensor, dict]:
    """GRPO's loss (train/rl.py `grpo_loss`) of one step's captions, differentiable to the adapter. Each batch of
    rollouts gets one optimizer step (TRL's num_iterations = 1), so the old policy is the current one: its log-probs
    are the policy's own, detached (ratio 1, as TRL's GRPOTrainer takes them), and only the policy forward and, with
    beta > 0, the reference forward (the new adapter off) run, both through `UAE.caption_logprobs`. With
    --mask-truncated-completions a cut caption's tokens are left out of the loss: with sequence_mean it adds 0 and
    still counts in the 1/G, with token_mean its tokens leave the count (TRL zeroes its completion mask alike)."""
    logp = uae.caption_logprobs(inputs, tokens, masks, opts.temperature)
    ref_logp = None
    if opts.beta > 0:
        with torch.no_grad(), lora_disabled(uae.lvlm):
            ref_logp = uae.caption_logprobs(inputs, tokens, masks, opts.temperature)
    loss_masks = masks & ended(uae, tokens, masks)[:, None] if opts.mask_truncated_completions else masks
    return grpo_loss(logp, logp.detach(), ref_logp, advantages, loss_masks, opts.clip_eps, opts.beta,
                     reduction=opts.loss_norm)


def main(argv: list[str] | None = None) -> dict:
    opts = parse_options(Options, argv, description=__doc__.split("\n\n")[0])
    dist_env = init_distributed(opts.device)
    dtype = parse_dtype(opts.dtype)
    n_caps = opts.images_per_step * opts.group_size
    my_share = split_for_rank(n_caps, dist_env, "images_per_step * group_size")
    warn_single_sample_groups(opts.group_size, dist_env.is_main)

    folder, state = open_run_folder(opts, RESUME_KEYS, dist_env.is_main)
    uae, inherited = build_uae(opts, dtype, dist_env.device, folder)
    uae.lvlm.fused_logprobs = opts.logprob == "fused"
    reward_fn = build_reward(opts.clip, is_tiny(opts), opts.seed, dtype, dist_env.device)
    targets = [t for t in opts.lora_targets.split(",") if t]
    # Adapters on the text decoder only (the vision tower's MLP shares the projection names).
    apply_lora(uae.lvlm.language_model, targets, rank=opts.lora_rank, alpha=opts.lora_alpha, init="gaussian")
    if opts.text_encoder == "frozen":
        uae.captioner_only += lora_layers(uae.lvlm).values()
    params = lora_parameters(uae.lvlm)
    for p in params:
        p.data = p.data.float()
    uae.lvlm.gradient_checkpointing = opts.grad_checkpointing
    opt = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)

    dataset = build_dataset(opts, need_caption=False)
    sampler = ResumableSampler(dataset, seed=opts.seed)
    if state is not None:
        load_lora(uae.lvlm, trained_adapter(folder, "lvlm"))
    start = resume_loop(state, opt, sampler, opts, dist_env.is_main)
    log = MetricsLogger(os.path.join(opts.out, "metrics.jsonl"), opts.steps, dist_env.is_main, start_step=start)
    guard = NonFiniteGuard(opts.max_bad_steps)
    metrics: dict = {}

    for step in range(start + 1, opts.steps + 1):
        lr = set_lr(opt, opts, step)
        gen = step_generator(opts.seed, step)
        images = [im for im, _ in sampler.next_batch(opts.images_per_step)]
        seeds = torch.randint(2**31 - 1, (n_caps, 2), generator=gen)
        image_of = [i // opts.group_size for i in range(n_caps)]
        if opts.render_noise == "group":  # every caption of an image renders from its group's first draw
            seeds[:, 1] = seeds[[i * opts.group_size for i in image_of], 1]
        elif opts.render_noise == "fixed":  # one draw per image slot, independent of the step
            fixed = torch.randint(2**31 - 1, (opts.images_per_step,),
                                  generator=torch.Generator().manual_seed(opts.seed))
            seeds[:, 1] = fixed[image_of]
        seeds, image_of = seeds[my_share].tolist(), image_of[my_share]

        # 1. Sample this rank's captions as one batch (`sample_captions`) and 2. render them as one batch with the
        #    frozen decoder (`render_captions`), scored against their sources.
        tokens, masks, texts, inputs = sample_captions(uae, images, image_of, [s for s, _ in seeds], opts)
        with torch.no_grad():
            recon = render_captions(uae, texts, [s for _, s in seeds], opts)
            rewards = group_rewards(reward_fn, images, image_of, recon, opts.size)
        all_rewards = all_gather_cat(rewards.float())
        advantages = group_advantages(all_rewards, opts.group_size, clip=opts.adv_clip)
        if opts.group_size > 1:
            warn_zero_advantages(step, advantages, dist_env.is_main)
        advantages = advantages[my_share]

        # 3. The clipped objective (`policy_loss`) and one optimizer step.
        opt.zero_grad(set_to_none=True)
        loss, loss_stats = policy_loss(uae, inputs, tokens, masks, advantages, opts)
        loss.backward()
        average_gradients(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, opts.grad_clip)
        step_stats = reduce_stats([{"loss": loss.detach(), **loss_stats}])  # over ranks: every rank skips alike
        if guard.bad(step, loss=step_stats["loss"], reward=all_rewards, grad_norm=grad_norm):
            opt.zero_grad(set_to_none=True)
        else:
            opt.step()

        lengths = all_gather_cat(masks.sum(1).float())
        cut = all_gather_cat((~ended(uae, tokens, masks)).float())
        if opts.mask_truncated_completions and bool(cut.all()):  # no token in the loss: its ratio stats are of nothing
            step_stats = {k: v for k, v in step_stats.items() if k not in RATIO_STATS}
        metrics = {"loss": step_stats.pop("loss"), "reward_mean": float(all_rewards.mean()),
                   "reward_std": float(all_rewards.std(unbiased=False)), "grad_norm": float(grad_norm),
                   "caption_len": float(lengths.mean()), "truncated_frac": float(cut.mean()), "lr": lr, **step_stats}
        log.log(step, metrics)
        if step % opts.save_every == 0 or step == opts.steps:
            state = {"options": asdict(opts), "optimizer": opt.state_dict(), "sampler": asdict(sampler.state),
                     "rng": rng_state()}
            if dist_env.is_main:
                save_run_checkpoint(opts, step, state, uae, stage="grpo_encoder", trains=("lvlm_adapter",),
                                    inherited=inherited, captioner_only=opts.text_encoder == "frozen")
    finish_run(opts, log)
    return metrics


if __name__ == "__main__":
    run_script(main)
