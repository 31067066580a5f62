"""model/qwen2_5_vl_generation.py against transformers 5.24 `generate` (fp32, tiny random models saved with
save_pretrained): greedy and sampled generation with transformers' processors, stopping, the static KV cache against
uncached forwards, per-row generators, prompts shared by several rows, and bad requests."""
import pytest
import torch
from transformers.generation.logits_process import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from model.qwen2_5_vl_generation import GenerationConfig, draw_tokens, generate
from tests import qwen_reference
from tests.numerics import rel_err
from tests.qwen_reference import IM_END, PAD, VIDEO, VOCAB, hf_kwargs, make_batch, ours_kwargs

untied = qwen_reference.untied  # the module-scoped reference model fixture


def hf_generate(hf, batch, **kw):
    kw = {"do_sample": False, "top_k": None, "top_p": None, "temperature": None, **kw}
    return hf.generate(**hf_kwargs(hf, batch), **kw)


@pytest.mark.parametrize("case, penalty", [("text", 1.0), ("image", 1.0), ("image", 1.3)])
def test_greedy_generation_matches_hf(untied, case, penalty):
    hf, ours, _ = untied
    rows = [([], 5), ([], 9), ([], 2)] if case == "text" else [(["wide"], 2), ([], 8), (["tall", "wide"], 1)]
    batch = make_batch(rows, seed=7)
    free = generate(ours, batch["input_ids"], config=GenerationConfig(
        max_new_tokens=40, eos_token_id=VIDEO, pad_token_id=PAD, repetition_penalty=penalty), **ours_kwargs(batch))
    assert free.new_tokens.shape == (3, 40) and free.mask.all()
    # Make row 0 stop early on the token it produces at step 12 (or earlier, if it produced it before).
    eos = int(free.new_tokens[0, 12])
    out = generate(ours, batch["input_ids"], config=GenerationConfig(
        max_new_tokens=40, eos_token_id=(eos, VIDEO), pad_token_id=PAD, repetition_penalty=penalty),
        **ours_kwargs(batch))
    ref = hf_generate(hf, batch, max_new_tokens=40, eos_token_id=[eos, VIDEO], pad_token_id=PAD,
                      repetition_penalty=penalty)
    assert torch.equal(out.sequences, ref)
    stop = int((free.new_tokens[0] == eos).nonzero()[0])
    assert out.mask[0].sum() == stop + 1 and (out.new_tokens[0, stop + 1:] == PAD).all()
    assert (out.logprobs[0, stop + 1:] == 0).all() and (out.logprobs[out.mask] <= 0).all()
    assert out.sequences.shape[1] == batch["input_ids"].shape[1] + out.new_tokens.shape[1]


def test_generation_stops_when_all_rows_finish(untied):
    _, ours, _ = untied
    batch = make_batch([([], 4), ([], 6)], seed=8)
    free = generate(ours, batch["input_ids"], batch["attention_mask"],
                    config=GenerationConfig(max_new_tokens=10, eos_token_id=VIDEO, pad_token_id=PAD))
    eos = (int(free.new_tokens[0, 2]), int(free.new_tokens[1, 3]))
    out = generate(ours, batch["input_ids"], batch["attention_mask"],
                   config=GenerationConfig(max_new_tokens=10, eos_token_id=eos, pad_token_id=PAD), return_hidden=True)
    n = out.new_tokens.shape[1]
    assert n <= 4 and torch.isin(out.new_tokens[:, -1], torch.tensor(eos + (PAD,))).all()
    assert out.mask.sum(1).tolist() == [int((free.new_tokens[i, :n] == e).nonzero()[0]) + 1 for i, e in enumerate(eos)]
    assert out.hidden.shape == (2, batch["input_ids"].shape[1] + n, 64)


SAMPLING = dict(do_sample=True, temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.2)


def test_sampling_reproducible_and_logprobs_match_processed_distribution(untied):
    hf, ours, _ = untied
    batch = make_batch([(["wide"], 2), ([], 9)], seed=9)
    config = GenerationConfig(max_new_tokens=24, eos_token_id=IM_END, pad_token_id=PAD, **SAMPLING)
    run = lambda seed: generate(ours, batch["input_ids"], config=config,
                                generator=torch.Generator().manual_seed(seed), **ours_kwargs(batch))
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.sequences, c.sequences)

    # Independent recomputation: transformers' logits of the sampled sequence (full forward, no cache) through
    # transformers' own processors, in generate's order, then log_softmax.
    prompt_len = batch["input_ids"].shape[1]
    mask = batch["attention_mask"]
    full = dict(batch, input_ids=a.sequences, attention_mask=torch.cat([mask, a.mask.long()], 1))
    with torch.no_grad():
        logits = hf(**hf_kwargs(hf, full)).logits.float()
    processors = LogitsProcessorList([
        RepetitionPenaltyLogitsProcessor(1.2, prompt_ignore_length=(mask != 0).int().argmax(1)),
        TemperatureLogitsWarper(0.7), TopKLogitsWarper(40), TopPLogitsWarper(0.9)])
    want = torch.zeros_like(a.logprobs)
    for i in range(a.new_tokens.shape[1]):
        scores = processors(a.sequences[:, :prompt_len + i], logits[:, prompt_len - 1 + i].clone())
        want[:, i] = scores.log_softmax(-1).gather(1, a.new_tokens[:, i:i + 1])[:, 0]
    assert rel_err(a.logprobs[a.mask], want[a.mask]) <= 1e-5
    assert (a.logprobs[~a.mask] == 0).all()


def test_sampling_with_global_rng_matches_hf(untied):
    hf, ours, _ = untied
    batch = make_batch([(["tall"], 3), ([], 5)], seed=10)
    torch.manual_seed(123)
    out = generate(ours, batch["input_ids"], config=GenerationConfig(
        max_new_tokens=20, eos_token_id=IM_END, pad_token_id=PAD, **SAMPLING), **ours_kwargs(batch))
    torch.manual_seed(123)
    ref = hf_generate(hf, batch, max_new_tokens=20, eos_token_id=[IM_END], pad_token_id=PAD, **SAMPLING)
    assert torch.equal(out.sequences, ref)


def test_cached_decode_matches_uncached_forward(untied):
    _, ours, _ = untied
    batch = make_batch([(["wide"], 1), ([], 6), (["tall"], 4)], seed=11)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    images = {k: batch[k] for k in ("pixel_values", "image_grid_thw")}
    out = generate(ours, ids, mask, config=GenerationConfig(max_new_tokens=16, eos_token_id=VIDEO, pad_token_id=PAD),
                   return_hidden=True, **images)
    # Greedy from scratch: a full uncached forward over the growing sequence at every step.
    seq, seq_mask = ids, mask
    with torch.no_grad():
        for _ in range(16):
            nxt = ours(seq, attention_mask=seq_mask, **images)[:, -1].argmax(-1)
            seq, seq_mask = torch.cat([seq, nxt[:, None]], 1), torch.cat([seq_mask, torch.ones_like(nxt)[:, None]], 1)
        hidden = ours.forward_hidden(seq, attention_mask=seq_mask, **images)
    assert torch.equal(out.sequences, seq)
    keep = seq_mask.bool()
    assert rel_err(out.hidden[keep], hidden[keep]) <= 1e-5

    # GRPO path: log-probs of the sampled tokens from an uncached forward through token_logprobs, at temperature T.
    sampled = generate(ours, ids, mask, config=GenerationConfig(max_new_tokens=12, do_sample=True, temperature=0.8,
                                                                eos_token_id=IM_END, pad_token_id=PAD),
                       generator=torch.Generator().manual_seed(5), **images)
    full_mask = torch.cat([mask, sampled.mask.long()], 1)
    with torch.no_grad():
        h = ours.forward_hidden(sampled.sequences, attention_mask=full_mask, **images)
        lp = ours.token_logprobs(h[:, ids.shape[1] - 1:-1], sampled.new_tokens, temperature=0.8)
    assert lp.shape == sampled.logprobs.shape and lp.dtype == torch.float32
    assert rel_err(lp[sampled.mask], sampled.logprobs[sampled.mask]) <= 1e-5


def test_draw_tokens_per_row_generators_follow_the_distribution():
    # Inverse-CDF sampling with one generator per row: row b depends only on generator b, the frequencies follow
    # the probabilities (30000 draws: 4 std of a binomial frequency is < 0.012), zero-probability tokens never come.
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2], [0.1, 0.0, 0.9, 0.0, 0.0]])
    draws = torch.stack([draw_tokens(probs, [torch.Generator().manual_seed(2 * i), torch.Generator().manual_seed(
        2 * i + 1)]) for i in range(30000)])
    for b in range(2):
        freq = torch.bincount(draws[:, b], minlength=5).float() / len(draws)
        assert (freq - probs[b]).abs().max() < 0.012, (b, freq)
        assert (freq[probs[b] == 0] == 0).all()
    alone = torch.stack([draw_tokens(probs[1:], [torch.Generator().manual_seed(2 * i + 1)]) for i in range(200)])
    assert torch.equal(alone[:, 0], draws[:200, 1])


def test_prompt_of_row_shares_the_prefill_and_rows_keep_their_own_generators(untied):
    _, ours, _ = untied
    batch = make_batch([(["wide"], 2), (["tall"], 4)], seed=21)
    rows = [0, 1, 1, 0, 1]
    seeds = [3, 4, 5, 6, 7]
    config = GenerationConfig(max_new_tokens=10, eos_token_id=IM_END, pad_token_id=PAD, **SAMPLING)
    shared = generate(ours, batch["input_ids"], config=config, prompt_of_row=rows,
                      generator=[torch.Generator().manual_seed(s) for s in seeds], **ours_kwargs(batch))
    # Each row alone: its own prompt (with its own image), batch 1, the same seed.
    grids = batch["image_grid_thw"]
    pixels = batch["pixel_values"].split(grids.prod(-1).tolist())
    for r, (i, s) in enumerate(zip(rows, seeds)):
        keep = batch["attention_mask"][i].bool()
        one = generate(ours, batch["input_ids"][i:i + 1, keep], pixel_values=pixels[i], image_grid_thw=grids[i:i + 1],
                       config=config, generator=[torch.Generator().manual_seed(s)])
        n = int(one.mask.sum())
        assert torch.equal(shared.new_tokens[r, :n], one.new_tokens[0, :n]) and int(shared.mask[r].sum()) == n
        assert rel_err(shared.logprobs[r, :n], one.logprobs[0, :n]) <= 1e-5
    greedy = dict(max_new_tokens=8, eos_token_id=IM_END, pad_token_id=PAD)
    a = generate(ours, batch["input_ids"], config=GenerationConfig(**greedy), prompt_of_row=rows, **ours_kwargs(batch))
    assert a.sequences.shape[0] == 5 and torch.equal(a.sequences[:, :batch["input_ids"].shape[1]],
                                                     batch["input_ids"][rows])
    with pytest.raises(ValueError, match="prompt index in"):
        generate(ours, batch["input_ids"], config=GenerationConfig(**greedy), prompt_of_row=[0, 2],
                 **ours_kwargs(batch))
    with pytest.raises(ValueError, match="one generator per output row"):
        generate(ours, batch["input_ids"], config=GenerationConfig(do_sample=True, **greedy), prompt_of_row=rows,
                 generator=[torch.Generator()] * 2, **ours_kwargs(batch))


def test_bad_generation_requests(untied):
    _, ours, _ = untied
    gen = dict(max_new_tokens=4, eos_token_id=IM_END, pad_token_id=PAD)
    text = make_batch([([], 3), ([], 5)], seed=17)
    ids, mask = text["input_ids"], text["attention_mask"]
    with pytest.raises(ValueError, match=r"\+ max_new_tokens 250 = 2.. exceeds max_position_embeddings 256"):
        generate(ours, ids, mask, config=GenerationConfig(**{**gen, "max_new_tokens": 250}))
    with pytest.raises(ValueError, match="left-padded"):
        generate(ours, ids, mask.flip(1), config=GenerationConfig(**gen))
    for bad, match in [(dict(do_sample=True, temperature=0.0), "temperature"), (dict(top_k=-1), "top_k"),
                       (dict(top_p=0.0), "top_p"), (dict(repetition_penalty=0.0), "repetition_penalty"),
                       (dict(max_new_tokens=0), "max_new_tokens"), (dict(pad_token_id=VOCAB), "pad_token_id")]:
        with pytest.raises(ValueError, match=match):
            generate(ours, ids, mask, config=GenerationConfig(**{**gen, **bad}))
