"""CUDA-graph decoding (model/graph_decode.py) through `generate(..., cuda_graph=True)`
(model/qwen2_5_vl_generation.py).

On CPU the graph is replaced by `eager_capture`, which drives the same static buffers, cache reuse and warm-up runs
(the decode step must be idempotent for those) without CUDA: tokens, log-probs, masks and hidden states must equal
the plain path bit for bit. With CUDA the real capture is checked against eager decoding too."""
import pytest
import torch
from torch import nn

from model import graph_decode
from model.lora import apply_lora, lora_disabled
from model.qwen2_5_vl import Qwen25VL, Qwen25VLConfig
from model.qwen2_5_vl_generation import GenerationConfig, generate, new_cache

VOCAB, PAD, EOS = 300, 290, 291
IDS = dict(image_token_id=295, video_token_id=296, vision_start_token_id=297, vision_end_token_id=298)


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = Qwen25VL(Qwen25VLConfig.preset("tiny", vocab_size=VOCAB, **IDS)).eval()
    with torch.no_grad():  # larger logits than the default init: varied tokens, few argmax near-ties
        m.lm_head.weight.mul_(4)
    yield m
    graph_decode.clear(m)


def batch(seed, image=True, length=0):
    """Three rows left-padded to `length` (at least the longest); the first holds a 4x4-patch image (4 merged
    tokens), so rope_delta is not zero."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, 280, (n,), generator=g).tolist() for n in (5, 9, 3)]
    if image:
        rows[0] = rows[0][:2] + [297] + [295] * 4 + [298] + rows[0][2:]
    length = max(length, *map(len, rows))
    ids = torch.full((3, length), PAD)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, length - len(r):], mask[i, length - len(r):] = torch.tensor(r), 1
    extra = dict(pixel_values=torch.randn(16, 1176, generator=g), image_grid_thw=torch.tensor([[1, 4, 4]])) if image \
        else {}
    return ids, mask, extra


def run(model, ids, mask, extra, cuda_graph, return_hidden=True, generator=None, prompt_of_row=None, **settings):
    config = GenerationConfig(**{**dict(max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD), **settings})
    if config.do_sample and generator is None:
        generator = torch.Generator(ids.device).manual_seed(3)
    return generate(model, ids, mask, config=config, generator=generator, prompt_of_row=prompt_of_row,
                    return_hidden=return_hidden, cuda_graph=cuda_graph, **extra)


def assert_same(a, b):
    for name in ("sequences", "new_tokens", "logprobs", "mask", "hidden"):
        x, y = getattr(a, name), getattr(b, name)
        if x is None or y is None:
            assert x is None and y is None, name
            continue
        assert x.shape == y.shape and torch.equal(x, y), name


class CountingCapture:
    def __init__(self):
        self.calls = 0

    def __call__(self, fn, device):
        self.calls += 1
        return graph_decode.eager_capture(fn, device)


@pytest.fixture
def counting(monkeypatch):
    capture = CountingCapture()
    monkeypatch.setattr(graph_decode, "capture_cuda_graph", capture)
    return capture


@pytest.mark.parametrize("kw", [{}, dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.9),
                                dict(repetition_penalty=1.3)], ids=["greedy", "sample", "penalty"])
def test_graph_path_equals_plain_path(model, counting, kw):
    ids, mask, extra = batch(0)
    plain = run(model, ids, mask, extra, False, **kw)
    graphed = run(model, ids, mask, extra, True, **kw)
    assert counting.calls == 1
    assert_same(graphed, plain)
    assert not torch.equal(graphed.hidden[:, -1], graphed.hidden[:, -2])  # outputs are copies, not the buffers


def test_graph_path_with_shared_prompts_and_a_generator_per_row(model, counting):
    # GRPO's stage 2: G rows per prompt (prompt_of_row: the prompts' cache rows copied into the graph's cache),
    # each sampled from its own generator.
    ids, mask, extra = batch(5)
    rows = [0, 0, 2, 1, 2]
    outs = [run(model, ids, mask, extra, graphed, do_sample=True, temperature=0.9, prompt_of_row=rows,
                generator=[torch.Generator().manual_seed(s) for s in range(5)]) for graphed in (False, True)]
    assert counting.calls == 1
    assert_same(outs[1], outs[0])


def test_graph_reused_across_calls_and_cache_reset(model, counting):
    for seed in (1, 2, 3):  # same (batch, max_len): one capture, each call starts from an empty cache
        ids, mask, extra = batch(seed, image=seed != 2, length=11)
        assert ids.shape == (3, 11)
        assert_same(run(model, ids, mask, extra, True), run(model, ids, mask, extra, False))
    assert counting.calls == 1
    ids, mask, extra = batch(4)
    assert_same(run(model, ids, mask, extra, True, max_new_tokens=5), run(model, ids, mask, extra, False,
                                                                          max_new_tokens=5))
    assert counting.calls == 2  # another max_len


def test_recorded_anew_when_parameters_or_adapters_change(model, counting):
    ids, mask, extra = batch(5)
    run(model, ids, mask, extra, True)
    with torch.no_grad():  # in-place updates are seen by the recorded graph: no new capture
        model.language_model.layers[0].mlp.down_proj.weight.mul_(2)
    assert_same(run(model, ids, mask, extra, True), run(model, ids, mask, extra, False))
    assert counting.calls == 1
    layer = model.language_model.layers[1].self_attn
    layer.q_proj.weight = nn.Parameter(layer.q_proj.weight.detach() * 3)  # a new tensor: the old graph is stale
    assert_same(run(model, ids, mask, extra, True), run(model, ids, mask, extra, False))
    assert counting.calls == 2
    apply_lora(model.language_model, ["q_proj", "v_proj"], rank=2, alpha=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    on_plain = run(model, ids, mask, extra, False)
    assert_same(run(model, ids, mask, extra, True), on_plain)
    with lora_disabled(model.language_model):
        off_plain = run(model, ids, mask, extra, False)
        assert_same(run(model, ids, mask, extra, True), off_plain)
    assert not torch.equal(on_plain.logprobs, off_plain.logprobs)
    assert_same(run(model, ids, mask, extra, True), on_plain)
    assert counting.calls == 5


def test_at_most_max_graphs_kept(model, counting):
    ids, mask, extra = batch(6)
    for n in range(1, graph_decode.MAX_GRAPHS + 3):
        run(model, ids, mask, extra, True, max_new_tokens=n + 1)
    assert len(graph_decode._GRAPHS[model]) == graph_decode.MAX_GRAPHS
    graph_decode.clear(model)
    assert model not in graph_decode._GRAPHS


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_graph_on_cpu_is_an_error(model):
    ids, mask, extra = batch(7)
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA model"):
        run(model, ids, mask, extra, True)
    assert_same(run(model, ids, mask, extra, True, max_new_tokens=1, return_hidden=False),  # no decode step: no graph
                run(model, ids, mask, extra, False, max_new_tokens=1, return_hidden=False))


def test_decoder_needs_its_own_cache(model):
    decoder = graph_decode.GraphDecoder(model, 3, 20, capture=graph_decode.eager_capture)
    with pytest.raises(ValueError, match="its own cache"):
        decoder(torch.zeros(3, dtype=torch.long), new_cache(model, 3, 20), torch.tensor([4]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_cuda_graph_matches_eager(model, dtype):
    model.to("cuda", dtype)
    ids, mask, extra = batch(8)
    ids, mask = ids.cuda(), mask.cuda()
    extra = {k: v.cuda() for k, v in extra.items()}
    for kw in ({}, dict(do_sample=True, temperature=0.8)):
        plain = run(model, ids, mask, extra, False, **kw)
        assert_same(run(model, ids, mask, extra, True, **kw), plain)
        assert_same(run(model, ids, mask, extra, True, **kw), plain)  # replayed, not recorded again
