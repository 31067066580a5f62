"""Stage 0, captioner side: supervised training of the encoder (Qwen2.5-VL), cross-entropy of captions of images.

Each pair is the chat UAE.caption writes in: the caption prompt with the image (`UAE.caption_inputs`, --prompt), then
the assistant's turn, whose tokens are the targets: the caption, tokenised on its own as generation continues the
prompt, and `<|im_end|>`, the token that ends the turn and UAE.caption's generation, so the captioner learns to stop.
One forward over prompt + caption (`UAE.caption_hidden`, the teacher-forced path GRPO's log-probs take too) gives
each target's log-prob; the loss is their negative mean over every caption token of the global batch:

    L = -1/T sum_i sum_t log p(c_i,t | image_i, prompt, c_i,<t),   T = sum_i |c_i| (the <|im_end|> included)

Token-level, not per caption then per batch: every token weighs the same, so a long caption teaches in proportion to
its length, as the usual LM SFT. T comes from the whole global batch, which every rank tokenises (captions are
cheap), so a rank's share of the loss does not depend on how the batch is split: N processes train as one process
with the same global batch. Captions are padded to the global batch's longest for the same reason.

--text-data adds text-only chats in the `generate` turn (the chat the decoder reads, UAE.generate_turn_ids) with
the LM loss, mixed in at --text-weight (its own token mean, over --text-batch-size chats a step):

    L = L_caption + w * L_text,   L_text = -1/T' sum_j sum_t log p(x_j,t | x_j,<t)   (every chat token after the first)

The decoder is conditioned on the LM's last hidden states over a text. A pretrained LVLM's states keep what the text
said (its text pretraining); an LM trained only to caption images has no reason to, and the toy world's (a 4-layer LM
trained from scratch) loses the content words there, so a decoder conditioned on it cannot learn to follow captions.
The text objective is the stand-in for that pretraining (the toy world's corpus: train/world.py `write_echo_texts`).

--lora-rank N > 0 trains a LoRA adapter on the LM (LLM_LORA_TARGETS, as GRPO on the captioner does) on top of any
adapters the model carries; --lora-rank 0 trains every LVLM weight (vision tower, merger, LM: what a captioner learning
from random init needs), first merging the adapters below it (the release's LLM LoRA, an --init run's), and hands the
full weights on (model/handoff.py `lvlm.safetensors`). No FSDP: each process holds the whole LVLM, its gradients and
AdamW state (a 3B LVLM in bf16: ~40 GB before activations), and the gradients are averaged over ranks
(`average_gradients`).

Launch:
    # tiny preset on procedurally generated (image, caption) pairs, one CPU process (the random LVLM learns to caption)
    torchrun --nproc_per_node=1 train/sft_captioner.py
    # 1 GPU, official weights, LoRA on the LM (--data: a JSONL of {"image": path, "caption": text} or a folder of
    # images with same-name .txt captions)
    torchrun --nproc_per_node=1 train/sft_captioner.py --uae ckpt/UAE --data data/pairs.jsonl --dtype bf16 \
        --batch-size 4 --lora-rank 64 --lora-alpha 128 --lr 1e-4 --grad-checkpointing --steps 1000 \
        --out runs/sft_captioner
    # 8 GPUs, full-parameter SFT of the LVLM, as the pipeline's SFT stages: after the decoder's (--init)
    torchrun --nproc_per_node=8 train/sft_captioner.py --uae ckpt/UAE --data data/pairs.jsonl --dtype bf16 \
        --batch-size 16 --lora-rank 0 --lr 1e-5 --grad-checkpointing --steps 1000 --out runs/sft_captioner
    # resume: the same command with --resume
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass

if __package__ in (None, ""):  # `torchrun train/sft_captioner.py` runs the file as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from eval.model_args import caption_prompt
from model.lora import apply_lora, load_lora, lora_parameters, unwrap_lora
from model.uae import LLM_LORA_TARGETS
from train.common import (BASE_KEYS, MetricsLogger, NonFiniteGuard, RunOptions, average_gradients, build_dataset,
                          build_uae, finish_run, finite, init_distributed, open_run_folder, option, parse_dtype,
                          parse_options, reduce_stats, require, resume_loop, rng_state, run_script,
                          save_run_checkpoint, set_lr, split_for_rank, trained_adapter)
from train.data import ResumableSampler, SamplerState


@dataclass
class Options(RunOptions):
    out: str = option("runs/sft_captioner", "run folder: metrics.jsonl, checkpoints (model/: the handoff)")
    steps: int = option(40, "optimizer steps")
    size: int = option(64, "procedural scenes' size in pixels (--data images reach the captioner as they are, "
                           "resized by its processor)")
    lr: float = option(1e-2, "AdamW learning rate (launch lines: 1e-4 LoRA, 1e-5 full-parameter)")
    batch_size: int = option(4, "(image, caption) pairs per step (global)")
    lora_rank: int = option(0, "LoRA rank on the LM; 0 = full-parameter training of the whole LVLM, replicated on "
                               "every process (no FSDP; the tiny preset is random: its captioner learns from "
                               "scratch)")
    prompt: str = option("demo", "caption prompt: 'demo' (the released demo's, which UAE.caption and the later "
                                 "stages use), 'bench' (Unified-Bench's), or the prompt text itself")
    logprob: str = option("fused", "fused (kernels/logprob.py, no [tokens, vocab] logits) | naive (log_softmax)")
    save_every: int = option(20, "checkpoint every N steps (and at the end)")
    text_data: str = option("", "JSONL of {\"text\": ...} lines: text-only generate-turn chats trained with the LM "
                                "loss alongside the captions (see above); empty = captions only")
    text_batch_size: int = option(16, "text chats per step (global), with --text-data")
    text_weight: float = option(1.0, "weight w of the text loss, with --text-data")

    full_parameter_training = True  # --lora-rank 0

    def check(self) -> None:
        super().check()
        require(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        require(bool(self.prompt.strip()), "--prompt is empty")
        require(self.logprob in ("fused", "naive"), f"--logprob must be fused or naive, got {self.logprob!r}")
        require(self.text_batch_size >= 1, f"--text-batch-size must be >= 1, got {self.text_batch_size}")
        require(finite(self.text_weight) and self.text_weight >= 0,
                f"--text-weight must be >= 0, got {self.text_weight}")
        require(not self.text_data or os.path.isfile(self.text_data),
                f"--text-data {self.text_data}: no such file")


RESUME_KEYS = BASE_KEYS + ("data", "batch_size", "size", "lora_rank", "lora_alpha", "prompt", "seed", "text_data",
                           "text_batch_size")


def read_texts(path: str) -> list[str]:
    """The texts of a --text-data JSONL ({"text": ...} per line); a bad line or an empty file is an error naming it."""
    texts = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: expected a JSON object with a 'text' field ({e!r})") from None
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{path}:{n}: 'text' must be a non-empty string")
            texts.append(text)
    if not texts:
        raise ValueError(f"--text-data {path} holds no texts")
    return texts


def text_loss(uae, texts: list[str], my_share: slice, n_world: int) -> torch.Tensor:
    """This rank's share of L_text over the global batch `texts`, times the world size (as the caption loss). Every
    chat token after the first is a target; pads are not. Every rank tokenises the whole batch: its token count is
    the mean's denominator."""
    ids, mask = uae.generate_turn_ids(texts)  # right-padded to the global batch's longest chat
    targets, valid = ids[:, 1:], mask[:, 1:].bool()
    hidden = uae.lvlm.forward_hidden(ids[my_share], attention_mask=mask[my_share], pad_states=False)
    logp = uae.lvlm.token_logprobs(hidden[:, :-1], targets[my_share])
    return -logp[valid[my_share]].sum() * (n_world / int(valid.sum()))


def caption_targets(processor, caption: str) -> torch.Tensor:
    """The tokens the captioner learns to write for `caption`: its text, tokenised on its own (as generation continues
    the prompt), then <|im_end|>. Special tokens spelled out in a caption would be parsed as such (an image
    placeholder breaks the forward, an <|im_end|> teaches an early stop), so they are refused, naming the caption."""
    p = processor
    ids = p.encode(caption.strip())
    special = {p.im_start_id, p.im_end_id, p.pad_token_id, p.image_token_id, p.video_token_id, p.vision_start_id,
               p.vision_end_id}
    found = sorted(special.intersection(ids))
    if found:
        raise ValueError(f"the caption {caption[:80]!r} holds the special token(s) "
                         f"{p.decode(found, skip_special_tokens=False)}; remove them from the data")
    return torch.tensor(ids + [p.im_end_id])


def main(argv: list[str] | None = None) -> dict:
    opts = parse_options(Options, argv, description=__doc__.split("\n\n")[0])
    dist_env = init_distributed(opts.device)
    dtype = parse_dtype(opts.dtype)
    my_share = split_for_rank(opts.batch_size, dist_env, "batch_size")
    prompt = caption_prompt(opts.prompt)

    folder, state = open_run_folder(opts, RESUME_KEYS, dist_env.is_main)
    uae, inherited = build_uae(opts, dtype, dist_env.device, folder)
    uae.lvlm.fused_logprobs = opts.logprob == "fused"
    if opts.lora_rank > 0:
        # Adapters on the text decoder only (the vision tower's MLP shares the projection names), trained in fp32.
        apply_lora(uae.lvlm.language_model, LLM_LORA_TARGETS.split(","), rank=opts.lora_rank, alpha=opts.lora_alpha,
                   init="gaussian")
        params = lora_parameters(uae.lvlm)
        for p in params:
            p.data = p.data.float()
    else:
        if uae.captioner_only:
            raise ValueError(f"--init {opts.init}: its LVLM adapters {inherited.captioner_only} are captioner-only "
                             "(GRPO on the captioner; the decoder's text encoding leaves them off), and --lora-rank 0 "
                             "would merge them into the weights the decoder reads; train an adapter (--lora-rank > 0)")
        unwrap_lora(uae.lvlm, merge=True)  # every LVLM weight trains: the adapters below become part of them
        uae.lvlm.requires_grad_(True)
        params = list(uae.lvlm.parameters())  # a tied LM head is the embedding: listed once
    uae.lvlm.gradient_checkpointing = opts.grad_checkpointing
    opt = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)

    dataset = build_dataset(opts, need_caption=True)
    sampler = ResumableSampler(dataset, seed=opts.seed)
    texts = read_texts(opts.text_data) if opts.text_data else None
    text_sampler = ResumableSampler(texts, seed=opts.seed + 1) if texts else None
    text_share = split_for_rank(opts.text_batch_size, dist_env, "text_batch_size") if texts else None
    if state is not None and opts.lora_rank > 0:  # full LVLM weights came back with the checkpoint's model/ (build_uae)
        load_lora(uae.lvlm, trained_adapter(folder, "lvlm"))
    start = resume_loop(state, opt, sampler, opts, dist_env.is_main)
    if state is not None and text_sampler is not None:
        text_sampler.state = SamplerState(**state["text_sampler"])
    log = MetricsLogger(os.path.join(opts.out, "metrics.jsonl"), opts.steps, dist_env.is_main, start_step=start)
    guard = NonFiniteGuard(opts.max_bad_steps)
    pad = uae.processor.pad_token_id
    metrics: dict = {}

    for step in range(start + 1, opts.steps + 1):
        pairs = sampler.next_batch(opts.batch_size)
        # Every rank tokenises the whole global batch: its token count normalises the loss, its longest caption sets
        # the padding.
        targets = [caption_targets(uae.processor, caption) for _, caption in pairs]
        n_tokens, n_max = sum(len(t) for t in targets), max(len(t) for t in targets)
        tokens = torch.stack([torch.nn.functional.pad(t, (0, n_max - len(t)), value=pad) for t in targets[my_share]])
        mask = torch.stack([torch.arange(n_max) < len(t) for t in targets[my_share]])
        tokens, mask = tokens.to(dist_env.device), mask.to(dist_env.device)
        inputs = uae.caption_inputs([image for image, _ in pairs[my_share]], prompt)

        opt.zero_grad(set_to_none=True)
        lr = set_lr(opt, opts, step)
        hidden = uae.caption_hidden(inputs, tokens, mask)
        logp = uae.lvlm.token_logprobs(hidden, tokens)
        # This rank's tokens' share of the global token mean, times the world size: average_gradients divides the
        # summed gradients by it (and reduce_stats the logged values), leaving the gradient of the global mean.
        share = dist_env.world / n_tokens
        loss = -logp[mask].sum() * share
        stats = {"loss": loss.detach()}
        if text_sampler is not None:
            text = text_loss(uae, text_sampler.next_batch(opts.text_batch_size), text_share, dist_env.world)
            loss = loss + opts.text_weight * text
            stats = {"loss": loss.detach(), "caption_loss": stats["loss"], "text_loss": text.detach()}
        loss.backward()
        with torch.no_grad():  # the argmax needs the logits: once, without their gradient
            hits = (uae.lvlm.lm_head(hidden.detach()).argmax(-1) == tokens) & mask
        average_gradients(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, opts.grad_clip)
        step_stats = reduce_stats([{**stats, "token_acc": hits.sum() * share}])  # global means
        if guard.bad(step, loss=step_stats["loss"], grad_norm=grad_norm):
            opt.zero_grad(set_to_none=True)
        else:
            opt.step()
        metrics = {**step_stats, "caption_tokens": n_tokens / opts.batch_size, "grad_norm": float(grad_norm),
                   "lr": lr}
        log.log(step, metrics)
        if step % opts.save_every == 0 or step == opts.steps:
            state = {"options": asdict(opts), "optimizer": opt.state_dict(), "sampler": asdict(sampler.state),
                     "rng": rng_state()}
            if text_sampler is not None:
                state["text_sampler"] = asdict(text_sampler.state)
            if dist_env.is_main:
                trains = ("lvlm_adapter",) if opts.lora_rank > 0 else ("lvlm_weights",)
                save_run_checkpoint(opts, step, state, uae, stage="sft_captioner", trains=trains, inherited=inherited)
    finish_run(opts, log)
    return metrics


if __name__ == "__main__":
    run_script(main)
