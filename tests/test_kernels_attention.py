"""kernels/attention.py: Triton FlashAttention forward/backward (dense, varlen) vs float64 softmax attention and SDPA.
Without CUDA the kernels run on CPU tensors under Triton's interpreter, which TRITON_INTERPRET=1 must select before
triton is first imported: set here when this module is the first importer, else it must come from the environment
(another test module's imports, e.g. diffusers, may load triton first).
"""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kernels.attention as attention_kernels  # noqa: E402
from kernels.attention import flash_attention, flash_attention_varlen  # noqa: E402
from model.layers import attention, get_attention_backend, set_attention_backend  # noqa: E402
from tests.numerics import rel_err  # noqa: E402

if not torch.cuda.is_available() and not attention_kernels._INTERPRET:
    pytest.skip("no CUDA and triton was imported without TRITON_INTERPRET=1: set it in the environment",
                allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def reference(q, k, v, causal, scale=None):
    """Softmax attention in float64 on [B,H,L,D]; causal is top-left aligned, as SDPA's is_causal."""
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if causal:
        keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    return s.softmax(-1) @ v


def leaves(*shapes, dtype):
    return [torch.randn(s, device=DEVICE).to(dtype).requires_grad_() for s in shapes]


@pytest.mark.parametrize("b,h,hkv,lq,lk,d,causal,dtype", [
    (2, 4, 2, 67, 45, 80, True, torch.float32),    # GQA, Lq > Lk, D not a power of two, several blocks
    (1, 3, 3, 17, 70, 64, False, torch.float32),   # Lq < Lk
    (2, 2, 1, 1, 33, 16, True, torch.float32),     # single query sees only key 0
    (1, 2, 2, 1, 33, 16, False, torch.float32),
    (1, 2, 1, 67, 67, 64, True, torch.bfloat16),
    (1, 2, 2, 17, 20, 128, False, torch.float32),
])
def test_dense_matches_reference(b, h, hkv, lq, lk, d, causal, dtype):
    torch.manual_seed(lq * 100 + lk)
    q, k, v = leaves((b, h, lq, d), (b, hkv, lk, d), (b, hkv, lk, d), dtype=dtype)
    out = flash_attention(q, k, v, causal=causal)
    ref = reference(q, k, v, causal)
    assert out.shape == (b, h, lq, d) and out.dtype == dtype
    assert rel_err(out, ref) <= TOL[dtype]
    grad = torch.randn(out.shape, device=DEVICE)
    ours = torch.autograd.grad(out, (q, k, v), grad.to(dtype))
    theirs = torch.autograd.grad(ref, (q, k, v), grad.double())
    for name, a, r in zip("qkv", ours, theirs):
        if r.abs().max() == 0:  # one visible key: the softmax is constant, so dq and dk vanish (up to rounding)
            assert a.abs().max() <= TOL[dtype] * theirs[2].abs().max(), name
        else:
            assert rel_err(a, r) <= TOL[dtype], name


def test_matches_sdpa_strided_inputs_and_scale():
    """Against torch SDPA (top-left is_causal, GQA), with q/k/v as transposed [B,L,H,D] views and a custom scale."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, n, hh, 48, device=DEVICE) for n, hh in ((37, 6), (53, 2), (53, 2)))
    q, k, v = (t.transpose(1, 2).requires_grad_() for t in (q, k, v))
    out = flash_attention(q, k, v, causal=True, scale=0.3)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
    assert rel_err(out, ref) <= 1e-5
    grad = torch.randn_like(out)
    for a, r in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        assert rel_err(a, r) <= 1e-5


@pytest.mark.parametrize("causal,dtype", [(False, torch.float32), (True, torch.float32), (True, torch.bfloat16)])
def test_varlen_matches_per_segment_reference(causal, dtype):
    torch.manual_seed(2)
    lengths = [5, 40, 1, 67, 17]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    total = sum(lengths)
    q, k, v = leaves((total, 4, 80), (total, 2, 80), (total, 2, 80), dtype=dtype)
    out = flash_attention_varlen(q, k, v, cu, max(lengths), causal=causal)
    bounds = cu.tolist()
    as_batch = lambda t, s, e: t[s:e].transpose(0, 1)[None]  # noqa: E731
    ref = torch.cat([reference(as_batch(q, s, e), as_batch(k, s, e), as_batch(v, s, e), causal)[0].transpose(0, 1)
                     for s, e in zip(bounds, bounds[1:])])
    assert out.shape == q.shape and rel_err(out, ref) <= TOL[dtype]
    grad = torch.randn(out.shape, device=DEVICE)
    ours = torch.autograd.grad(out, (q, k, v), grad.to(dtype))
    theirs = torch.autograd.grad(ref, (q, k, v), grad.double())
    for name, a, r in zip("qkv", ours, theirs):
        assert rel_err(a, r) <= TOL[dtype], name


def test_layers_attention_triton_backend():
    torch.manual_seed(3)
    q, k, v = (t.requires_grad_() for t in _qkv(b=2, h=4, hkv=2, lq=19, lk=19, d=32))
    previous = get_attention_backend()
    expected = attention(q, k, v, causal=True)
    expected_grads = torch.autograd.grad(expected.sum(), (q, k, v))
    try:
        set_attention_backend("triton")
        got = attention(q, k, v, causal=True)
    finally:
        set_attention_backend(previous)
    assert rel_err(got, expected) <= 1e-5
    # .sum() hands the backward an expanded (all-zero-stride) gradient
    for a, r in zip(torch.autograd.grad(got.sum(), (q, k, v)), expected_grads):
        assert rel_err(a, r) <= 1e-5


def _qkv(b=1, h=2, hkv=2, lq=5, lk=5, d=16):
    return (torch.randn(b, h, lq, d, device=DEVICE), torch.randn(b, hkv, lk, d, device=DEVICE),
            torch.randn(b, hkv, lk, d, device=DEVICE))


def test_dense_bad_inputs():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="q must be"):
        flash_attention(q[0], k, v)
    with pytest.raises(ValueError, match="dtypes differ"):
        flash_attention(q, k.half(), v)
    with pytest.raises(ValueError, match="dtype must be one of"):
        flash_attention(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="k shape"):
        flash_attention(q, k, v[:, :, :3])
    with pytest.raises(ValueError, match="head dim"):
        flash_attention(q, k[..., :8], v[..., :8])
    with pytest.raises(ValueError, match=r"head dim must be in \[1, 128\]"):
        flash_attention(*_qkv(d=160))
    with pytest.raises(ValueError, match="not a multiple"):
        flash_attention(*_qkv(h=3, hkv=2))
    with pytest.raises(ValueError, match="batch"):
        flash_attention(q, k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1))
    with pytest.raises(ValueError, match="Lk = 0"):
        flash_attention(q, k[:, :, :0], v[:, :, :0])
    with pytest.raises(ValueError, match="at most 65535 heads"):
        flash_attention(*_qkv(h=65536, hkv=1, lq=1, lk=1))
    with pytest.raises(ValueError, match="at most 65535 batch entries"):
        flash_attention(*_qkv(b=65536, lq=1, lk=1))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-without-interpreter error")
def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setattr(attention_kernels, "_INTERPRET", False)
    with pytest.raises(ValueError, match="CUDA"):
        flash_attention(*_qkv())


def test_varlen_bad_inputs():
    q, k, v = (torch.randn(10, 2, 16, device=DEVICE) for _ in range(3))
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-D int32"):
        flash_attention_varlen(q, k, v, cu.long(), 6)
    with pytest.raises(ValueError, match="cu_seqlens must rise"):
        flash_attention_varlen(q, k, v, torch.tensor([0, 4, 9], dtype=torch.int32, device=DEVICE), 6)
    with pytest.raises(ValueError, match="cu_seqlens must rise"):
        flash_attention_varlen(q, k, v, torch.tensor([0, 6, 4, 10], dtype=torch.int32, device=DEVICE), 6)
    with pytest.raises(ValueError, match="at most 65535 segments"):
        flash_attention_varlen(q, k, v, torch.zeros(65537, dtype=torch.int32, device=DEVICE), 6)
    with pytest.raises(ValueError, match="max_seqlen 5"):
        flash_attention_varlen(q, k, v, cu, 5)
    with pytest.raises(ValueError, match="packed rows"):
        flash_attention_varlen(q, k[:9], v[:9], cu, 6)
    with pytest.raises(ValueError, match=r"q must be \[total,H,D\]"):
        flash_attention_varlen(q[None], k, v, cu, 6)
