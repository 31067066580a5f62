"""Batched generation with Qwen2.5-VL: static KV cache, prefill, decode step, logits processing, sampling.

The model (model/qwen2_5_vl.py) computes hidden states; this module drives it token by token, as gpt-fast keeps the
model and its generation loop apart. Behaviour follows transformers 5.24 `GenerationMixin.generate` for
`Qwen2_5_VLForConditionalGeneration` (greedy / multinomial sampling, its logits-processor order; fp32 parity is
tested).

`generate` prefills a left-padded batch into a preallocated static KV cache ([B, Hkv, max_len, D] per layer) and then
runs `decode_step`, whose shapes do not change from step to step (new keys are written with `index_copy_` at a
`cache_position` tensor and attention always spans the whole cache under a mask), so it can be captured in a CUDA
graph: `generate(..., cuda_graph=True)` replays it as one (model/graph_decode.py). Sampling settings travel as one
`GenerationConfig`; what varies per call (images, generators, rows per prompt) are arguments.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from model.qwen2_5_vl import causal_mask

if TYPE_CHECKING:
    from model.qwen2_5_vl import Qwen25VL

__all__ = ["GenerationConfig", "GenerationOutput", "KVCache", "new_cache", "prefill", "decode_step", "generate",
           "process_logits", "draw_tokens"]


@dataclass(frozen=True)
class GenerationConfig:
    """How to continue a prompt (transformers' GenerationConfig fields of the same names): up to max_new_tokens per
    row, greedy or sampled (do_sample) with the processors temperature, top_k (0: off), top_p (1: off) and
    repetition_penalty (1: off); a row ends at any of eos_token_id and is padded with pad_token_id after it.
    Defaults: greedy, Qwen2.5-VL's <|im_end|> and <|endoftext|> as eos, <|endoftext|> as pad."""
    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_id: int | Sequence[int] = (151645, 151643)
    pad_token_id: int = 151643

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def eos_ids(self) -> list[int]:
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)


@dataclass
class KVCache:
    """Preallocated decoder cache. keys/values: per layer [B, Hkv, max_len, D]; key_valid [B, max_len] marks the
    columns holding real tokens; rope_delta [B] turns a cache column into its M-RoPE text position."""
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    key_valid: torch.Tensor
    rope_delta: torch.Tensor

    @property
    def max_len(self) -> int:
        return self.key_valid.shape[1]


@dataclass
class GenerationOutput:
    """sequences [B, T+N]: prompt + new tokens (pad after a row's eos); new_tokens [B, N]; logprobs [B, N] fp32
    log-probability of each chosen token under the processed distribution it was drawn from (0 after eos); mask
    [B, N] True for generated tokens up to and including eos; hidden [B, T+N, d] final-norm hidden states of the
    whole sequence (with return_hidden; after a row's eos they are those of its pad tokens run as ordinary tokens,
    so use `mask`)."""
    sequences: torch.Tensor
    new_tokens: torch.Tensor
    logprobs: torch.Tensor
    mask: torch.Tensor
    hidden: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------------------------- steps

def new_cache(model: Qwen25VL, batch: int, max_len: int) -> KVCache:
    """An empty cache for `batch` rows of up to `max_len` tokens, in the model's dtype and device."""
    cfg, weight = model.config.text, model.language_model.embed_tokens.weight
    shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
    return KVCache(
        keys=[torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in range(cfg.num_hidden_layers)],
        values=[torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in range(cfg.num_hidden_layers)],
        key_valid=torch.zeros(batch, max_len, dtype=torch.bool, device=weight.device),
        rope_delta=torch.zeros(batch, dtype=torch.long, device=weight.device))


def prefill(model: Qwen25VL, input_ids, attention_mask, pixel_values, image_grid_thw, cache: KVCache,
            image_features=None) -> torch.Tensor:
    """Run the prompt into columns [0, T) of `cache`; returns hidden states [B, T, d]."""
    x, positions, rope_delta, attention_mask = model.embed(input_ids, attention_mask, pixel_values, image_grid_thw,
                                                           image_features)
    columns = torch.arange(x.shape[1], device=x.device)
    cache.key_valid[:, :x.shape[1]] = attention_mask.bool()
    cache.rope_delta.copy_(rope_delta)
    return model.language_model(x, positions, causal_mask(cache.key_valid, columns), cache, columns)


def decode_step(model: Qwen25VL, token: torch.Tensor, cache: KVCache,
                cache_position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row at cache column `cache_position` ([1] long tensor): (fp32 logits [B, V], hidden
    [B, d]). Shapes depend only on the batch and the cache size, so the step can be captured in a CUDA graph."""
    cache.key_valid.index_fill_(1, cache_position, True)
    positions = (cache_position + cache.rope_delta)[None, :, None].expand(3, -1, 1)
    mask = cache.key_valid[:, None, None, :]
    x = model.language_model.embed_tokens(token[:, None])
    hidden = model.language_model(x, positions, mask, cache, cache_position)[:, 0]
    return model.lm_head(hidden).float(), hidden


# ----------------------------------------------------------------------------------------------------------- tokens

def process_logits(logits: torch.Tensor, seen: torch.Tensor | None, config: GenerationConfig) -> torch.Tensor:
    """fp32 next-token scores [B, V] after transformers' processors, in its order: repetition penalty over the
    tokens `seen` [B, V] (prompt without left padding + generated), then only when sampling temperature, top-k,
    top-p (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper with min_tokens_to_keep=1)."""
    scores = logits
    if config.repetition_penalty != 1.0:
        penalty = config.repetition_penalty
        penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
        scores = torch.where(seen, penalized, scores)
    if not config.do_sample:
        return scores
    if config.temperature != 1.0:
        scores = scores / config.temperature
    if config.top_k > 0:
        kth = scores.topk(min(config.top_k, scores.shape[-1])).values[..., -1:]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if config.top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1)
        remove = sorted_scores.softmax(-1).cumsum(-1) <= 1 - config.top_p
        remove[..., -1] = False
        scores = scores.masked_fill(remove.scatter(1, order, remove), -float("inf"))
    return scores


def draw_tokens(probs: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
    """One token per row of `probs` [B, V]. One generator (or None: the global RNG): torch.multinomial, as
    transformers samples. A sequence of B generators: inverse-CDF sampling, row b from one uniform drawn from
    generator b (on that generator's device), so row b's tokens depend only on its generator and its own
    distribution, whatever rows share the batch; the same seeds give the same tokens on CPU and GPU up to the
    rounding of the probabilities. Zero-probability tokens (top-k / top-p) have zero width and are never drawn."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, 1, generator=generator)[:, 0]
    u = torch.stack([torch.rand((), generator=g, device=g.device, dtype=torch.float64).cpu() for g in generator])
    cdf = probs.double().cumsum(-1)
    x = u.to(probs.device)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, x, right=True)[:, 0].clamp_(max=probs.shape[-1] - 1)


# ----------------------------------------------------------------------------------------------------------- generate

def _check_request(model: Qwen25VL, input_ids: torch.Tensor, attention_mask: torch.Tensor, config: GenerationConfig,
                   prompt_of_row, generator) -> torch.Tensor | None:
    """Validate what the config cannot check alone; returns the rows' prompt indices (None: one row per prompt)."""
    vocab = model.config.text.vocab_size
    eos = config.eos_ids
    if not 0 <= config.pad_token_id < vocab or not eos or not all(0 <= e < vocab for e in eos):
        raise ValueError(f"pad_token_id {config.pad_token_id} and eos_token_id {eos} must be ids in [0, {vocab})")
    if input_ids.ndim == 2 and attention_mask.shape == input_ids.shape and \
            (attention_mask[:, 1:] < attention_mask[:, :-1]).any():
        raise ValueError("generate needs left-padded prompts: attention_mask has a 0 after a 1")
    n_prompts, prompt_len = input_ids.shape
    rows = None
    if prompt_of_row is not None:
        rows = torch.as_tensor(prompt_of_row, dtype=torch.long, device=input_ids.device)
        if rows.ndim != 1 or rows.numel() == 0 or int(rows.min()) < 0 or int(rows.max()) >= n_prompts:
            raise ValueError(f"prompt_of_row must list, for each output row, a prompt index in [0, {n_prompts}),"
                             f" got {rows.tolist()}")
    batch = n_prompts if rows is None else rows.numel()
    if generator is not None and not isinstance(generator, torch.Generator) and len(generator) != batch:
        raise ValueError(f"one generator per output row: got {len(generator)} for {batch} rows")
    max_len = prompt_len + config.max_new_tokens
    if max_len > model.config.text.max_position_embeddings:
        raise ValueError(f"prompt length {prompt_len} + max_new_tokens {config.max_new_tokens} = {max_len} exceeds "
                         f"max_position_embeddings {model.config.text.max_position_embeddings}")
    return rows


@torch.no_grad()
def generate(model: Qwen25VL, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
             config: GenerationConfig = GenerationConfig(), *,
             generator: torch.Generator | Sequence[torch.Generator] | None = None,
             prompt_of_row: Sequence[int] | torch.Tensor | None = None, image_features: torch.Tensor | None = None,
             return_hidden: bool = False, cuda_graph: bool = False) -> GenerationOutput:
    """Greedy or sampled continuation of a left-padded batch, row by row until eos or config.max_new_tokens; stops
    when every row has finished. Sampling: `draw_tokens` (one generator: torch.multinomial as transformers, the
    global RNG when None; a list: one generator per row, so a row's tokens do not depend on its batch).

    prompt_of_row: output row r continues prompt prompt_of_row[r] (e.g. [0]*G + [1]*G for G samples of each of
    two images): the prompts, their images included, are prefilled once and their KV cache rows copied to the
    output rows, which then decode as one batch. None: one row per prompt. `image_features`: see `Qwen25VL.embed`.

    cuda_graph: replay each decode step as a CUDA graph recorded once per (batch, prompt + max_new_tokens) and
    kept for the model (model/graph_decode.py); same tokens as without. CUDA only: on another device the first
    decode step raises ValueError. Sampling and the stopping test stay outside the graph."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    rows = _check_request(model, input_ids, attention_mask, config, prompt_of_row, generator)
    vocab = model.config.text.vocab_size
    eos = torch.tensor(config.eos_ids, device=input_ids.device)
    n_prompts, prompt_len = input_ids.shape
    batch = n_prompts if rows is None else rows.numel()
    max_len = prompt_len + config.max_new_tokens

    if cuda_graph:
        from model import graph_decode

        decode = graph_decode.decoder_for(model, batch, max_len)
        cache = decode.cache
    else:
        cache = new_cache(model, batch, max_len)

        def decode(token, cache, cache_position):
            return decode_step(model, token, cache, cache_position)
    if rows is None:
        prompt_hidden = prefill(model, input_ids, attention_mask, pixel_values, image_grid_thw, cache, image_features)
    else:  # prefill each prompt once, then copy its cache rows to the rows that continue it
        prompt_cache = new_cache(model, n_prompts, prompt_len)
        prompt_hidden = prefill(model, input_ids, attention_mask, pixel_values, image_grid_thw, prompt_cache,
                                image_features)[rows]
        for full, part in zip((*cache.keys, *cache.values), (*prompt_cache.keys, *prompt_cache.values)):
            full[:, :, :prompt_len] = part[rows]
        cache.key_valid[:, :prompt_len] = prompt_cache.key_valid[rows]
        cache.rope_delta.copy_(prompt_cache.rope_delta[rows])
        input_ids, attention_mask = input_ids[rows], attention_mask[rows]
    logits = model.lm_head(prompt_hidden[:, -1]).float()
    seen = None
    if config.repetition_penalty != 1.0:  # transformers ignores the left padding (prompt_ignore_length)
        seen = torch.zeros(batch, vocab + 1, dtype=torch.bool, device=input_ids.device)
        seen.scatter_(1, input_ids.masked_fill(attention_mask == 0, vocab), True)
        seen = seen[:, :vocab].contiguous()
    unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
    cache_position = torch.tensor([prompt_len], device=input_ids.device)
    tokens, logprobs, masks, hiddens = [], [], [], [prompt_hidden]
    for step in range(config.max_new_tokens):
        scores = process_logits(logits, seen, config)
        if config.do_sample:
            token = draw_tokens(scores.softmax(-1), generator)
        else:
            token = scores.argmax(-1)
        logprob = scores.log_softmax(-1).gather(1, token[:, None])[:, 0]
        token = torch.where(unfinished, token, config.pad_token_id)
        tokens.append(token)
        logprobs.append(torch.where(unfinished, logprob, 0.0))
        masks.append(unfinished)
        unfinished = unfinished & ~torch.isin(token, eos)
        if seen is not None:
            seen[torch.arange(batch, device=token.device), token] = True
        last = step == config.max_new_tokens - 1 or not bool(unfinished.any())
        if not last or return_hidden:  # the last token is run only for its hidden state
            logits, hidden = decode(token, cache, cache_position)
            cache_position += 1
            hiddens.append(hidden[:, None])
        if last:
            break
    new_tokens = torch.stack(tokens, dim=1)
    return GenerationOutput(
        sequences=torch.cat([input_ids, new_tokens.to(input_ids.dtype)], dim=1), new_tokens=new_tokens,
        logprobs=torch.stack(logprobs, dim=1), mask=torch.stack(masks, dim=1),
        hidden=torch.cat(hiddens, dim=1) if return_hidden else None)
