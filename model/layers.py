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
              mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Scaled dot-product attention. q [B,H,Lq,D], k/v [B,Hkv,Lk,D] with Hkv dividing H (grouped-query heads);
    mask: bool (True = attend) or additive float, broadcastable to [B,H,Lq,Lk]. Returns [B,H,Lq,D]."""
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} not a multiple of key/value heads {k.shape[1]}")
    if _backend == "triton" and mask is None and (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        from kernels.attention import flash_attention

        return flash_attention(q, k, v, causal=causal, scale=scale)
    # enable_gqa shares each key/value head across its query group without materialising the repeats (the decode
    # step would otherwise copy the whole KV cache per call).
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scale,
                                          enable_gqa=k.shape[1] != q.shape[1])


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
