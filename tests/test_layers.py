"""model/layers.py: the one attention function's packed (cu_seqlens) form against attention run per segment, its
bad-input errors, and RMSNorm against transformers' Qwen2RMSNorm."""
import pytest
import torch
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

import kernels.attention
from model.layers import RMSNorm, attention, block_diagonal_mask, get_attention_backend, set_attention_backend
from tests.numerics import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU tensors: Triton's interpreter (conftest.py)


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
@pytest.mark.parametrize("causal, heads", [(False, (4, 4)), (True, (4, 2))])
def test_packed_sequences_equal_attention_per_segment(backend, causal, heads):
    if backend == "triton" and DEVICE == "cpu" and not kernels.attention._INTERPRET:
        pytest.skip("no CUDA and triton was imported without TRITON_INTERPRET=1")
    torch.manual_seed(0)
    bounds = [0, 7, 8, 21, 21, 33]  # odd lengths, a one-token and an empty segment
    h, hkv = heads
    q = torch.randn(1, h, 33, 16, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(1, hkv, 33, 16, device=DEVICE, requires_grad=True) for _ in range(2))
    previous = get_attention_backend()
    try:
        set_attention_backend(backend)
        out = attention(q, k, v, causal=causal, cu_seqlens=torch.tensor(bounds, dtype=torch.int32, device=DEVICE),
                        max_seqlen=13)
    finally:
        set_attention_backend(previous)
    parts = [attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], causal=causal)
             for s, e in zip(bounds, bounds[1:]) if e > s]
    ref = torch.cat(parts, dim=2)
    assert out.shape == q.shape and rel_err(out, ref) <= 1e-5
    grad = torch.randn(out.shape, device=DEVICE)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        assert rel_err(a, b) <= 1e-5


def test_block_diagonal_mask():
    mask = block_diagonal_mask(torch.tensor([0, 2, 2, 5], dtype=torch.int32), 5)
    expected = torch.zeros(5, 5, dtype=torch.bool)
    expected[:2, :2] = expected[2:, 2:] = True
    assert torch.equal(mask, expected)


def test_attention_errors():
    q, k = torch.randn(1, 3, 6, 8), torch.randn(1, 2, 6, 8)
    with pytest.raises(ValueError, match="query heads 3 not a multiple of key/value heads 2"):
        attention(q, k, k)
    q, cu = torch.randn(2, 2, 6, 8), torch.tensor([0, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"B = 1, Lq = Lk.*q \[2, 2, 6, 8\]"):
        attention(q, q, q, cu_seqlens=cu, max_seqlen=6)
    with pytest.raises(ValueError, match="mask given"):
        attention(q[:1], q[:1], q[:1], mask=torch.ones(6, 6, dtype=torch.bool), cu_seqlens=cu, max_seqlen=6)
    with pytest.raises(ValueError, match="needs max_seqlen"):
        attention(q[:1], q[:1], q[:1], cu_seqlens=cu)
    with pytest.raises(ValueError, match="attention backend must be one of"):
        set_attention_backend("flash")


def test_rmsnorm_matches_qwen2():
    torch.manual_seed(1)
    ours, theirs = RMSNorm(24, eps=1e-6), Qwen2RMSNorm(24, eps=1e-6)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        theirs.weight.copy_(ours.weight)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 5, 24, dtype=dtype) * 4
        got, want = ours.to(dtype)(x), theirs.to(dtype)(x)
        assert got.dtype == want.dtype == dtype
        assert torch.equal(got, want)
