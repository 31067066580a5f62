"""Layers shared by every model: the one attention function all blocks call, and RMSNorm.

`attention` is the single place where attention is computed, so the Triton kernels (kernels/attention.py) plug in
here: `set_attention_backend("triton")` routes every model's attention through them; "sdpa" (torch) is the default
and the fallback for anything a kernel does not support (arbitrary masks, CPU tensors outside Triton's interpreter).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

_BACKENDS = ("sdpa", "triton")
_backend = "sdpa"


def set_attention_backend(name: str) -> None:
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"attention backend must be one of {_BACKENDS}, got {name!r}")
    _backend = name


def get_attention_backend() -> str:
    return _backend


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              mask: torch.Tensor | None = None, scale: float | None = None, cu_seqlens: torch.Tensor | None = None,
              max_seqlen: int | None = None) -> torch.Tensor:
    """Scaled dot-product attention. q [B,H,Lq,D], k/v [B,Hkv,Lk,D] with Hkv dividing H (grouped-query heads);
    mask: bool (True = attend) or additive float, broadcastable to [B,H,Lq,Lk]. Returns [B,H,Lq,D].

    cu_seqlens (int32 [n+1], with B = 1 and Lq = Lk): the positions hold n packed sequences [cu[i], cu[i+1]) that
    attend only within themselves (the Qwen vision tower's windows and frames); max_seqlen bounds their length. The
    Triton backend runs them in one varlen launch; SDPA gets the equivalent block-diagonal mask."""
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} not a multiple of key/value heads {k.shape[1]}")
    if cu_seqlens is not None:
        if mask is not None or q.shape[0] != 1 or q.shape[2] != k.shape[2]:
            raise ValueError(f"cu_seqlens needs one packed row (B = 1, Lq = Lk) and no mask; got q {list(q.shape)}, "
                             f"k {list(k.shape)}, mask {'given' if mask is not None else 'None'}")
        if max_seqlen is None:
            raise ValueError("cu_seqlens needs max_seqlen (the longest packed sequence)")
    use_kernel = _backend == "triton" and mask is None and (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
    if use_kernel and cu_seqlens is not None:
        from kernels.attention import flash_attention_varlen

        packed = [t[0].transpose(0, 1) for t in (q, k, v)]  # [L, H, D] views
        return flash_attention_varlen(*packed, cu_seqlens, max_seqlen, causal=causal, scale=scale).transpose(0, 1)[None]
    if use_kernel:
        from kernels.attention import flash_attention

        return flash_attention(q, k, v, causal=causal, scale=scale)
    if cu_seqlens is not None:
        mask = block_diagonal_mask(cu_seqlens, q.shape[2])
        if causal:
            mask = mask.tril()
    # enable_gqa shares each key/value head across its query group without materialising the repeats (the decode
    # step would otherwise copy the whole KV cache per call).
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scale,
                                          enable_gqa=k.shape[1] != q.shape[1])


def block_diagonal_mask(cu_seqlens: torch.Tensor, n: int) -> torch.Tensor:
    """Bool [n, n]: position i attends to position j iff both lie in the same [cu[k], cu[k+1]) segment."""
    segment = torch.bucketize(torch.arange(n, device=cu_seqlens.device), cu_seqlens[1:], right=True)
    return segment[:, None] == segment[None, :]


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps); the statistic is computed in fp32 and the result cast back to the input
    dtype before the weight multiply (transformers' Qwen2RMSNorm order; identical in fp32 to diffusers' RMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        h = h.to(dtype)
        return h * self.weight if self.weight is not None else h
