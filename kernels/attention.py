"""FlashAttention-2 in Triton: forward, backward and a packed variable-length (block-diagonal) variant.

Algorithm (Dao 2023, "FlashAttention-2"): the forward streams key/value blocks past a resident query block with an
online softmax and saves only the row logsumexp; the backward recomputes the probabilities from it. A preprocess kernel
computes delta = rowsum(dO * O), one kernel accumulates dK/dV per key block (looping over every query head of its
group, so grouped-query attention needs no atomics and is deterministic) and one accumulates dQ per query block.

Conventions:
- Dense: q [B,H,Lq,D], k/v [B,Hkv,Lk,D] with Hkv dividing H; query head h reads key/value head h // (H/Hkv), the
  grouped-query pairing of Qwen2's attention (transformers' `repeat_kv`) and of SDPA's `enable_gqa`.
- Varlen: q [total,H,D], k/v [total,Hkv,D] packed back to back; cu_seqlens int32 [n+1] cuts the rows into segments
  that attend only within themselves (Qwen2.5-VL vision windows and per-image attention, flash-attn's varlen layout).
  One launch covers every segment: the grid is (block, head, segment) and each program reads its segment's bounds
  from cu_seqlens.
- causal=True is top-left aligned like torch SDPA's is_causal (tril(ones(Lq, Lk))): query i sees keys j <= i.
  The models only use it with Lq == Lk, where both alignments agree.
- Any strides are accepted (e.g. a [B,L,H,D] tensor transposed to [B,H,L,D]); outputs and gradients are contiguous.
- Accumulation is fp32 for every input dtype. fp32 inputs use exact ("ieee") dot products, not TF32.
- The head dimension is padded to a power of two (>= 16, tl.dot's minimum) inside the kernels with masked loads, so
  D = 80 (Qwen2.5-VL vision) works; D <= 128 (the tiles are sized for it).
- The logsumexp is kept in base 2 (the kernels use exp2 with log2(e) folded into the scale, as the reference Triton
  tutorial does); it never leaves this module.
- Without CUDA the kernels run on CPU tensors under Triton's interpreter (slow; for tests), which needs
  TRITON_INTERPRET=1 in the environment before triton is first imported; otherwise CPU calls are an error.

Tile sizes are fixed per (dtype, padded head dim) by `_tiles`: checked to compile for sm_90 without register spills,
not benchmarked (no autotuning).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_GRID = 65535  # CUDA limit of grid axes 1 and 2, which carry heads and batch entries / segments
# Triton's interpreter (CPU tensors) is on when TRITON_INTERPRET=1 both when triton was first imported (its own
# language helpers are built then) and when the kernels below are decorated; a mix of the two cannot run.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1" and isinstance(tl.zeros, InterpretedFunction)


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr):
    # "upcast" only under the interpreter: triton 3.9's interpreter multiplies bf16 operands as their raw uint16 bits.
    # Products of bf16 values are exact in fp32, so this matches a bf16 tensor-core dot with fp32 accumulation.
    if DOT_PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _fwd_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kl, stride_vl, start_n, offs_m, offs_n, d_mask, k_len,
               qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    cols = start_n + offs_n
    if MASKED:
        kv_mask = (cols[:, None] < k_len) & d_mask[None, :]
    else:
        kv_mask = d_mask[None, :]
    k = tl.load(k_ptrs + start_n * stride_kl, mask=kv_mask, other=0.0)
    v = tl.load(v_ptrs + start_n * stride_vl, mask=kv_mask, other=0.0)
    s = _dot(q, tl.trans(k), DOT_PRECISION) * qk_scale
    if MASKED:
        valid = cols[None, :] < k_len
        if CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None])
        s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, CU,
                sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sob, soh, sol, sod, slb, slh,
                GROUP, LQ, LK, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CAUSAL: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    hk = h // GROUP
    if VARLEN:
        start = tl.load(CU + b).to(tl.int64)
        q_len = tl.load(CU + b + 1) - start
        k_len = q_len
    else:
        start = 0
        q_len = LQ
        k_len = LK
    start_m = pid_m * BLOCK_M
    if start_m >= q_len:
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m_mask = offs_m < q_len

    q_ptrs = Q + b * sqb + h * sqh + (start + offs_m)[:, None] * sql + offs_d[None, :] * sqd
    q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    k_ptrs = K + b * skb + hk * skh + (start + offs_n)[:, None] * skl + offs_d[None, :] * skd
    v_ptrs = V + b * svb + hk * svh + (start + offs_n)[:, None] * svl + offs_d[None, :] * svd

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Key blocks entirely inside the sequence (and, when causal, entirely left of this query block's first row) need
    # no mask; only the tail runs the masked path.
    full_end = (k_len // BLOCK_N) * BLOCK_N
    end = k_len
    if CAUSAL:
        full_end = tl.minimum(full_end, (start_m // BLOCK_N) * BLOCK_N)
        end = tl.minimum(k_len, start_m + BLOCK_M)
    for start_n in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, skl, svl, start_n, offs_m, offs_n, d_mask,
                                   k_len, qk_scale, False, CAUSAL, DOT_PRECISION)
    for start_n in range(full_end, end, BLOCK_N):
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, skl, svl, start_n, offs_m, offs_n, d_mask,
                                   k_len, qk_scale, True, CAUSAL, DOT_PRECISION)
    # Top-left causal alignment gives every row at least key 0, so l_i > 0 and m_i is finite.
    acc = acc / l_i[:, None]
    o_ptrs = O + b * sob + h * soh + (start + offs_m)[:, None] * sol + offs_d[None, :] * sod
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    tl.store(LSE + b * slb + h * slh + start + offs_m, m_i + tl.math.log2(l_i), mask=m_mask)


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, CU,
                      sob, soh, sol, sod, sdb, sdh, sdl, sdd, slb, slh, LQ,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, VARLEN: tl.constexpr):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    if VARLEN:
        start = tl.load(CU + b).to(tl.int64)
        q_len = tl.load(CU + b + 1) - start
    else:
        start = 0
        q_len = LQ
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < q_len
    mask = m_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = (start + offs_m)[:, None]
    o = tl.load(O + b * sob + h * soh + rows * sol + offs_d[None, :] * sod, mask=mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + rows * sdl + offs_d[None, :] * sdd, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + b * slb + h * slh + start + offs_m, delta, mask=m_mask)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU,
                     sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sdb, sdh, sdl, sdd,
                     skgb, skgh, skgl, skgd, svgb, svgh, svgl, svgd, slb, slh,
                     GROUP, LQ, LK, qk_scale, sm_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     CAUSAL: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    if VARLEN:
        start = tl.load(CU + b).to(tl.int64)
        q_len = tl.load(CU + b + 1) - start
        k_len = q_len
    else:
        start = 0
        q_len = LQ
        k_len = LK
    start_n = pid_n * BLOCK_N
    if start_n >= k_len:
        return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    n_mask = offs_n < k_len
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(K + b * skb + hk * skh + (start + offs_n)[:, None] * skl + offs_d[None, :] * skd, mask=kv_mask,
                other=0.0)
    v = tl.load(V + b * svb + hk * svh + (start + offs_n)[:, None] * svl + offs_d[None, :] * svd, mask=kv_mask,
                other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # Causal: only queries i >= start_n see this key block.
    lo = (start_n // BLOCK_M) * BLOCK_M if CAUSAL else 0
    for g in range(GROUP):
        h = hk * GROUP + g
        for start_m in range(lo, q_len, BLOCK_M):
            rows = start_m + offs_m
            r_mask = rows < q_len
            qd_mask = r_mask[:, None] & d_mask[None, :]
            q = tl.load(Q + b * sqb + h * sqh + (start + rows)[:, None] * sql + offs_d[None, :] * sqd,
                        mask=qd_mask, other=0.0)
            do = tl.load(DO + b * sdb + h * sdh + (start + rows)[:, None] * sdl + offs_d[None, :] * sdd,
                         mask=qd_mask, other=0.0)
            lse = tl.load(LSE + b * slb + h * slh + start + rows, mask=r_mask, other=0.0)
            delta = tl.load(DELTA + b * slb + h * slh + start + rows, mask=r_mask, other=0.0)
            # Transposed scores [BLOCK_N, BLOCK_M] so dV += P^T dO and dK += dS^T Q need no transposes of P.
            p_t = tl.math.exp2(_dot(k, tl.trans(q), DOT_PRECISION) * qk_scale - lse[None, :])
            valid = r_mask[None, :]
            if CAUSAL:
                valid = valid & (offs_n[:, None] <= rows[None, :])
            p_t = tl.where(valid, p_t, 0.0)
            dv += _dot(p_t.to(do.dtype), do, DOT_PRECISION)
            dp_t = _dot(v, tl.trans(do), DOT_PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += _dot(ds_t.to(q.dtype), q, DOT_PRECISION)
    dk = dk * sm_scale
    tl.store(DK + b * skgb + hk * skgh + (start + offs_n)[:, None] * skgl + offs_d[None, :] * skgd,
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * svgb + hk * svgh + (start + offs_n)[:, None] * svgl + offs_d[None, :] * svgd,
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU,
                   sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sdb, sdh, sdl, sdd,
                   sqgb, sqgh, sqgl, sqgd, slb, slh,
                   GROUP, LQ, LK, qk_scale, sm_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    hk = h // GROUP
    if VARLEN:
        start = tl.load(CU + b).to(tl.int64)
        q_len = tl.load(CU + b + 1) - start
        k_len = q_len
    else:
        start = 0
        q_len = LQ
        k_len = LK
    start_m = pid_m * BLOCK_M
    if start_m >= q_len:
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m_mask = offs_m < q_len
    qd_mask = m_mask[:, None] & d_mask[None, :]
    rows = (start + offs_m)[:, None]
    q = tl.load(Q + b * sqb + h * sqh + rows * sql + offs_d[None, :] * sqd, mask=qd_mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + rows * sdl + offs_d[None, :] * sdd, mask=qd_mask, other=0.0)
    lse = tl.load(LSE + b * slb + h * slh + start + offs_m, mask=m_mask, other=0.0)
    delta = tl.load(DELTA + b * slb + h * slh + start + offs_m, mask=m_mask, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    end = tl.minimum(k_len, start_m + BLOCK_M) if CAUSAL else k_len
    for start_n in range(0, end, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols < k_len)[:, None] & d_mask[None, :]
        k = tl.load(K + b * skb + hk * skh + (start + cols)[:, None] * skl + offs_d[None, :] * skd, mask=kv_mask,
                    other=0.0)
        v = tl.load(V + b * svb + hk * svh + (start + cols)[:, None] * svl + offs_d[None, :] * svd, mask=kv_mask,
                    other=0.0)
        p = tl.math.exp2(_dot(q, tl.trans(k), DOT_PRECISION) * qk_scale - lse[:, None])
        valid = cols[None, :] < k_len
        if CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None])
        p = tl.where(valid, p, 0.0)
        dp = _dot(do, tl.trans(v), DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, DOT_PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + b * sqgb + h * sqgh + rows * sqgl + offs_d[None, :] * sqgd, dq.to(DQ.dtype.element_ty),
             mask=qd_mask)


def _tiles(block_d: int, dtype: torch.dtype) -> dict:
    """(BLOCK_M, BLOCK_N, num_warps) per kernel. Chosen so that no kernel spills registers when compiled for sm_90
    (ptxas resource usage with unit feature strides), not benchmarked. fp32 dots run on FMA units ("ieee") and need
    smaller tiles than 16-bit tensor-core dots."""
    if dtype == torch.float32:
        return dict(fwd=(64, 32, 8) if block_d <= 64 else (32, 64, 8), dkdv=(32, 32, 8), dq=(64, 32, 8), stages=2)
    if block_d <= 64:
        return dict(fwd=(128, 64, 4), dkdv=(32, 128, 8), dq=(128, 32, 4), stages=3)
    return dict(fwd=(128, 64, 8), dkdv=(32, 64, 8), dq=(128, 32, 8), stages=3)


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact dots (Triton's default would be TF32); "tf32" is ignored for 16-bit inputs."""
    if dtype == torch.float32:
        return "ieee"
    return "upcast" if dtype == torch.bfloat16 and _INTERPRET else "tf32"


def _strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int, int]:
    """(batch, head, position, feature) strides; packed varlen tensors [total,H,D] have no batch axis (stride 0, the
    segment start is added inside the kernel)."""
    if varlen:
        return 0, t.stride(1), t.stride(0), t.stride(2)
    return tuple(t.stride())


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, causal, scale):
        varlen = cu_seqlens is not None
        if varlen:
            batch, lq, lk = cu_seqlens.numel() - 1, max_seqlen, max_seqlen
            heads, kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[2]
            lse = torch.empty(heads, q.shape[0], device=q.device, dtype=torch.float32)
            lse_strides = (0, lse.stride(0))
        else:
            batch, heads, lq, head_dim = q.shape
            kv_heads, lk = k.shape[1], k.shape[2]
            lse = torch.empty(batch, heads, lq, device=q.device, dtype=torch.float32)
            lse_strides = (lse.stride(0), lse.stride(1))
        block_d = max(16, triton.next_power_of_2(head_dim))
        tiles = _tiles(block_d, q.dtype)
        precision = _dot_precision(q.dtype)
        o = torch.empty(q.shape, device=q.device, dtype=q.dtype)
        cu = cu_seqlens if varlen else q  # unused pointer when dense
        block_m, block_n, warps = tiles["fwd"]
        grid = (triton.cdiv(lq, block_m), heads, batch)
        _fwd_kernel[grid](q, k, v, o, lse, cu, *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen),
                          *_strides(o, varlen), *lse_strides, heads // kv_heads, lq, lk, scale * _LOG2E,
                          HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal,
                          VARLEN=varlen, DOT_PRECISION=precision, num_warps=warps, num_stages=tiles["stages"])
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
        ctx.meta = (batch, heads, kv_heads, lq, lk, head_dim, block_d, causal, scale, lse_strides, precision)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
        batch, heads, kv_heads, lq, lk, head_dim, block_d, causal, scale, lse_strides, precision = ctx.meta
        varlen = cu_seqlens is not None
        cu = cu_seqlens if varlen else q
        tiles = _tiles(block_d, q.dtype)
        delta = torch.empty_like(lse)
        _bwd_delta_kernel[(triton.cdiv(lq, 64), heads, batch)](
            o, do, delta, cu, *_strides(o, varlen), *_strides(do, varlen), *lse_strides, lq,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=64, VARLEN=varlen)
        dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
        dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
        dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
        inputs = (*_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(do, varlen))
        consts = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, CAUSAL=causal, VARLEN=varlen, DOT_PRECISION=precision,
                      num_stages=tiles["stages"])
        block_m, block_n, warps = tiles["dkdv"]
        _bwd_dkdv_kernel[(triton.cdiv(lk, block_n), kv_heads, batch)](
            q, k, v, do, lse, delta, dk, dv, cu, *inputs, *_strides(dk, varlen), *_strides(dv, varlen),
            *lse_strides, heads // kv_heads, lq, lk, scale * _LOG2E, scale,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, **consts)
        block_m, block_n, warps = tiles["dq"]
        _bwd_dq_kernel[(triton.cdiv(lq, block_m), heads, batch)](
            q, k, v, do, lse, delta, dq, cu, *inputs, *_strides(dq, varlen), *lse_strides,
            heads // kv_heads, lq, lk, scale * _LOG2E, scale, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
            **consts)
        return dq, dk, dv, None, None, None, None


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ndim: int, layout: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != ndim:
            raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} dtype must be one of {_DTYPES}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k shape {tuple(k.shape)} differs from v shape {tuple(v.shape)}")
    if q.device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"Triton attention needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is first "
                         f"imported), got device {q.device}")
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim:
        raise ValueError(f"q head dim {head_dim} differs from k/v head dim {k.shape[-1]}")
    if not 1 <= head_dim <= 128:
        raise ValueError(f"head dim must be in [1, 128], got {head_dim}")
    heads, kv_heads = q.shape[-2 if ndim == 3 else 1], k.shape[-2 if ndim == 3 else 1]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"query heads {heads} not a multiple of key/value heads {kv_heads}")
    if heads > _MAX_GRID:
        raise ValueError(f"at most {_MAX_GRID} heads (a CUDA grid axis), got {heads}")


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                    scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale [+ top-left causal mask]) v. q [B,H,Lq,D], k/v [B,Hkv,Lk,D] -> [B,H,Lq,D];
    scale defaults to 1/sqrt(D). Differentiable in q, k, v."""
    _check_inputs(q, k, v, 4, "[B,H,L,D]")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"q batch {q.shape[0]} differs from k/v batch {k.shape[0]}")
    if q.shape[0] > _MAX_GRID:
        raise ValueError(f"at most {_MAX_GRID} batch entries (a CUDA grid axis), got {q.shape[0]}")
    if k.shape[2] == 0:
        raise ValueError("k/v have no positions (Lk = 0)")
    if q.numel() == 0:
        return q.new_empty(q.shape)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _FlashAttention.apply(q, k, v, None, None, bool(causal), scale)


def flash_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                           max_seqlen: int, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """Block-diagonal attention over packed sequences: rows cu_seqlens[i]:cu_seqlens[i+1] of q attend only to the same
    rows of k/v. q [total,H,D], k/v [total,Hkv,D], cu_seqlens int32 [n+1] (0, ..., total), max_seqlen >= the longest
    segment -> [total,H,D]. Checks cu_seqlens' values, which costs one device-to-host copy."""
    _check_inputs(q, k, v, 3, "[total,H,D]")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"q has {q.shape[0]} packed rows but k/v have {k.shape[0]}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be a 1-D int32 tensor [n+1] with n >= 1, got shape "
                         f"{tuple(cu_seqlens.shape)} and dtype {cu_seqlens.dtype}")
    if cu_seqlens.numel() - 1 > _MAX_GRID:
        raise ValueError(f"at most {_MAX_GRID} segments (a CUDA grid axis), got {cu_seqlens.numel() - 1}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    bounds = cu_seqlens.tolist()
    lengths = [e - s for s, e in zip(bounds, bounds[1:])]
    if bounds[0] != 0 or bounds[-1] != q.shape[0] or min(lengths) < 0:
        raise ValueError(f"cu_seqlens must rise from 0 to the packed length {q.shape[0]}, got {bounds}")
    if max(lengths) > max_seqlen:
        raise ValueError(f"max_seqlen {max_seqlen} is shorter than the longest segment {max(lengths)}")
    if q.numel() == 0:
        return q.new_empty(q.shape)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _FlashAttention.apply(q, k, v, cu_seqlens, int(max_seqlen), bool(causal), scale)
