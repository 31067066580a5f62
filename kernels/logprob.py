"""Fused per-token log-probabilities from hidden states and the LM head, without the [N, V] logits.

logprob[i] = z[i, t_i] - logsumexp_j z[i, j] with z = (hidden @ weight^T) / temperature: what token-level GRPO needs
for every sampled token. Naively that materialises N x V logits (151936-token Qwen vocabulary) plus their softmax for
the backward. Here the vocabulary is cut into chunks of `vocab_chunk` rows of the LM head (Liger-Kernel's
fused-linear-cross-entropy idea, chunked over vocabulary instead of tokens):

- forward: per chunk, torch computes the fp32 logits [N, chunk] and a Triton kernel folds them into a running
  (max, sum) online logsumexp per token and picks up the target logit when it lies in the chunk. Saves lse [N].
- backward: per chunk, the logits are recomputed and a Triton kernel turns them into
  dz = grad * (onehot(target) - softmax) / temperature; then grad_hidden += dz @ W_chunk (fp32 accumulator) and
  grad_weight[chunk] = dz^T @ hidden. Chunking the vocabulary (not the tokens) means each grad_weight row block is
  written exactly once, so no [V, d] accumulator is needed.

Peak extra memory: O(N * vocab_chunk) (fp32 logits + their gradient in the input dtype) + an fp32 [N, d] accumulator;
`vocab_chunk` defaults to about 2^25 / N vocabulary rows (128 MiB of fp32 logits).

Logits are computed in fp32 (fp32 output of a bf16/fp16 GEMM via torch.mm's out_dtype on CUDA), so bf16 inputs give
more accurate log-probs than log_softmax over bf16 logits. Runs on CUDA tensors, or on CPU tensors under Triton's
interpreter (TRITON_INTERPRET=1 in the environment before triton is first imported; slow, for tests); other CPU calls
fall back to the plain torch `token_logprobs_reference`.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOGITS_BUDGET = 1 << 25
# Triton's interpreter (CPU tensors) is on when TRITON_INTERPRET=1 both when triton was first imported (its own
# language helpers are built then) and when the kernels below are decorated; a mix of the two cannot run.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1" and isinstance(tl.zeros, InterpretedFunction)


@triton.jit
def _online_lse_kernel(LOGITS, stride_row, TARGETS, RUN_MAX, RUN_SUM, TARGET_Z, vocab_start, chunk, inv_temp,
                       BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    run_max = tl.load(RUN_MAX + row)
    run_sum = tl.load(RUN_SUM + row)
    for start in range(0, chunk, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(base + cols, mask=cols < chunk, other=float("-inf")).to(tl.float32) * inv_temp
        new_max = tl.maximum(run_max, tl.max(z, 0))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max), 0)
        run_max = new_max
    tl.store(RUN_MAX + row, run_max)
    tl.store(RUN_SUM + row, run_sum)
    local = tl.load(TARGETS + row) - vocab_start
    in_chunk = (local >= 0) & (local < chunk)
    target = tl.load(base + local, mask=in_chunk, other=0.0).to(tl.float32)
    tl.store(TARGET_Z + row, target * inv_temp, mask=in_chunk)


@triton.jit
def _grad_logits_kernel(LOGITS, stride_row, GRAD_LOGITS, stride_grad_row, TARGETS, LSE, GRAD_OUT, vocab_start, chunk,
                        inv_temp, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    out = GRAD_LOGITS + row * stride_grad_row
    lse = tl.load(LSE + row)
    scale = tl.load(GRAD_OUT + row).to(tl.float32) * inv_temp
    local = tl.load(TARGETS + row) - vocab_start
    for start in range(0, chunk, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < chunk
        p = tl.exp(tl.load(base + cols, mask=mask, other=0.0).to(tl.float32) * inv_temp - lse)
        dz = scale * (tl.where(cols == local, 1.0, 0.0) - p)
        tl.store(out + cols, dz.to(GRAD_LOGITS.dtype.element_ty), mask=mask)


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result; 16-bit inputs keep their tensor-core GEMM on CUDA (fp32 accumulate and output)."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def _block_v(chunk: int) -> int:
    return min(4096, triton.next_power_of_2(chunk))


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, vocab_chunk):
        n, vocab = hidden.shape[0], weight.shape[0]
        inv_temp = 1.0 / temperature
        run_max = torch.full((n,), float("-inf"), device=hidden.device, dtype=torch.float32)
        run_sum = torch.zeros(n, device=hidden.device, dtype=torch.float32)
        target_z = torch.empty(n, device=hidden.device, dtype=torch.float32)
        for start in range(0, vocab, vocab_chunk):
            logits = _mm_f32(hidden, weight[start:start + vocab_chunk].t())
            chunk = logits.shape[1]
            _online_lse_kernel[(n,)](logits, logits.stride(0), targets, run_max, run_sum, target_z, start, chunk,
                                     inv_temp, BLOCK_V=_block_v(chunk))
        lse = run_max + run_sum.log()
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.vocab_chunk = temperature, vocab_chunk
        return target_z - lse

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, vocab = hidden.shape[0], weight.shape[0]
        grad_out = grad_out.contiguous()
        grad_hidden = torch.zeros(hidden.shape, device=hidden.device, dtype=torch.float32) if need_hidden else None
        grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_weight else None
        for start in range(0, vocab, ctx.vocab_chunk):
            w_chunk = weight[start:start + ctx.vocab_chunk]
            logits = _mm_f32(hidden, w_chunk.t())
            chunk = logits.shape[1]
            # fp32 inputs: the gradient overwrites the logits in place; 16-bit: it is stored in the GEMM dtype.
            grad_logits = logits if hidden.dtype == torch.float32 else torch.empty_like(logits, dtype=hidden.dtype)
            _grad_logits_kernel[(n,)](logits, logits.stride(0), grad_logits, grad_logits.stride(0), targets, lse,
                                      grad_out, start, chunk, 1.0 / ctx.temperature, BLOCK_V=_block_v(chunk))
            if need_hidden:
                grad_hidden += _mm_f32(grad_logits, w_chunk)
            if need_weight:
                torch.mm(grad_logits.t(), hidden, out=grad_weight[start:start + chunk])
        if need_hidden:
            grad_hidden = grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, None, None, None


def _check_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [N, d], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be [V, d] with d = {hidden.shape[1]}, got shape {tuple(weight.shape)}")
    if hidden.dtype not in _DTYPES or weight.dtype != hidden.dtype:
        raise ValueError(f"hidden and weight must share a dtype in {_DTYPES}, got {hidden.dtype} and {weight.dtype}")
    if targets.shape != hidden.shape[:1] or targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"targets must be an int32/int64 tensor [{hidden.shape[0]}], got shape "
                         f"{tuple(targets.shape)} and dtype {targets.dtype}")
    if weight.device != hidden.device or targets.device != hidden.device:
        raise ValueError(f"hidden ({hidden.device}), weight ({weight.device}) and targets ({targets.device}) must "
                         f"share a device")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if targets.numel() and not (0 <= int(targets.min()) and int(targets.max()) < weight.shape[0]):
        raise ValueError(f"targets must lie in [0, {weight.shape[0]}), got range "
                         f"[{int(targets.min())}, {int(targets.max())}]")


def token_logprobs_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             temperature: float = 1.0) -> torch.Tensor:
    """Plain torch: fp32 logits [N, V], log_softmax, gather. Same contract as `token_logprobs`."""
    _check_inputs(hidden, weight, targets, temperature)
    logits = torch.nn.functional.linear(hidden.float(), weight.float()) / temperature
    return logits.log_softmax(-1).gather(1, targets.long()[:, None])[:, 0]


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   vocab_chunk: int | None = None) -> torch.Tensor:
    """log softmax(hidden @ weight^T / temperature)[i, targets[i]] for hidden [N, d], weight [V, d] (the LM head),
    targets [N] -> [N] float32, differentiable in hidden and weight. vocab_chunk: LM-head rows per step (memory
    O(N * vocab_chunk)); default about 2^25 / N. Checking the targets' range costs one device-to-host copy."""
    _check_inputs(hidden, weight, targets, temperature)
    if vocab_chunk is not None and vocab_chunk < 1:
        raise ValueError(f"vocab_chunk must be >= 1, got {vocab_chunk}")
    if not hidden.is_cuda and not _INTERPRET:
        return token_logprobs_reference(hidden, weight, targets, temperature)
    n, vocab = hidden.shape[0], weight.shape[0]
    if vocab_chunk is None:
        vocab_chunk = max(1024, _LOGITS_BUDGET // max(n, 1) // 128 * 128)
    if n == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    return _TokenLogprobs.apply(hidden.contiguous(), weight, targets.contiguous(), float(temperature),
                                min(int(vocab_chunk), vocab))
