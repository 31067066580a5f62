"""kernels/logprob.py: fused vocabulary-chunked token log-probs (values and grads) vs float64 log_softmax + gather.
Without CUDA the kernels run on CPU tensors under Triton's interpreter, which TRITON_INTERPRET=1 must select before
triton is first imported: set here when this module is the first importer, else it must come from the environment
(another test module's imports, e.g. diffusers, may load triton first).
"""
import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kernels.logprob as logprob  # noqa: E402
from kernels.logprob import token_logprobs, token_logprobs_reference  # noqa: E402
from tests.numerics import rel_err  # noqa: E402

if not torch.cuda.is_available() and not logprob._INTERPRET:
    pytest.skip("no CUDA and triton was imported without TRITON_INTERPRET=1: set it in the environment",
                allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N, V, D = 37, 1003, 48


def reference64(hidden, weight, targets, temperature):
    logits = hidden.double() @ weight.double().t() / temperature
    return logits.log_softmax(-1).gather(1, targets.long()[:, None])[:, 0]


def inputs(dtype=torch.float32, target_dtype=torch.int64, seed=0):
    torch.manual_seed(seed)
    hidden = torch.randn(N, D, device=DEVICE).to(dtype).requires_grad_()
    weight = (torch.randn(V, D, device=DEVICE) * 0.3).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), device=DEVICE, dtype=target_dtype)
    return hidden, weight, targets


@pytest.mark.parametrize("vocab_chunk,temperature,target_dtype", [
    (None, 0.7, torch.int64),   # one chunk
    (256, 1.3, torch.int32),    # four chunks, ragged tail
    (100, 1.0, torch.int64),    # eleven chunks
])
def test_fp32_values_and_grads(vocab_chunk, temperature, target_dtype):
    hidden, weight, targets = inputs(target_dtype=target_dtype, seed=vocab_chunk or 0)
    targets[0], targets[1] = 0, V - 1  # first and last vocabulary entries
    out = token_logprobs(hidden, weight, targets, temperature, vocab_chunk=vocab_chunk)
    ref = reference64(hidden, weight, targets, temperature)
    assert out.shape == (N,) and out.dtype == torch.float32
    assert rel_err(out, ref) <= 1e-5
    grad = torch.randn(N, device=DEVICE)
    ours = torch.autograd.grad(out, (hidden, weight), grad)
    theirs = torch.autograd.grad(ref, (hidden, weight), grad.double())
    assert rel_err(ours[0], theirs[0]) <= 1e-5
    assert rel_err(ours[1], theirs[1]) <= 1e-5


def test_bf16_inputs():
    """Logits are fp32 GEMM outputs of the bf16 values, so the values match an fp32 reference on the same values;
    gradients are rounded to bf16."""
    hidden, weight, targets = inputs(torch.bfloat16, seed=5)
    out = token_logprobs(hidden, weight, targets, 0.9, vocab_chunk=300)
    ref = reference64(hidden, weight, targets, 0.9)
    assert out.dtype == torch.float32 and rel_err(out, ref) <= 1e-5
    grad = torch.randn(N, device=DEVICE)
    ours = torch.autograd.grad(out, (hidden, weight), grad)
    theirs = torch.autograd.grad(ref, (hidden, weight), grad.double())
    assert ours[0].dtype == ours[1].dtype == torch.bfloat16
    assert rel_err(ours[0], theirs[0]) <= 2e-2
    assert rel_err(ours[1], theirs[1]) <= 2e-2


def test_frozen_head_gets_no_weight_grad():
    hidden, weight, targets = inputs(seed=6)
    weight = weight.detach()
    token_logprobs(hidden, weight, targets, vocab_chunk=128).sum().backward()
    ref_hidden = hidden.detach().clone().requires_grad_()
    reference64(ref_hidden, weight, targets, 1.0).sum().backward()
    assert weight.grad is None
    assert rel_err(hidden.grad, ref_hidden.grad) <= 1e-5


def test_never_materialises_full_logits(monkeypatch):
    """Every logits block the fused path computes is at most [N, vocab_chunk], forward and backward."""
    widest = []
    mm = logprob._mm_f32

    def recording(a, b):
        result = mm(a, b)
        if b.shape[1] != D:  # logits, not the hidden-gradient product
            widest.append(result.shape[1])
        return result

    monkeypatch.setattr(logprob, "_mm_f32", recording)
    hidden, weight, targets = inputs(seed=7)
    token_logprobs(hidden, weight, targets, vocab_chunk=200).sum().backward()
    assert widest and max(widest) == 200 and len(widest) == 2 * 6


def test_reference_path_and_fallback(monkeypatch):
    hidden, weight, targets = inputs(seed=8)
    ref = reference64(hidden, weight, targets, 0.5)
    assert rel_err(token_logprobs_reference(hidden, weight, targets, 0.5), ref) <= 1e-5
    if DEVICE == "cpu":  # without CUDA or the interpreter, token_logprobs falls back to the reference path
        monkeypatch.setattr(logprob, "_TokenLogprobs", None)
        monkeypatch.setattr(logprob, "_INTERPRET", False)
        assert rel_err(token_logprobs(hidden, weight, targets, 0.5), ref) <= 1e-5


def test_bad_inputs():
    hidden, weight, targets = inputs(seed=9)
    with pytest.raises(ValueError, match="hidden must be"):
        token_logprobs(hidden[None], weight, targets)
    with pytest.raises(ValueError, match="weight must be"):
        token_logprobs(hidden, weight[:, :5], targets)
    with pytest.raises(ValueError, match="share a dtype"):
        token_logprobs(hidden, weight.double(), targets)
    with pytest.raises(ValueError, match="targets must be an int32/int64"):
        token_logprobs(hidden, weight, targets[:5])
    with pytest.raises(ValueError, match="targets must be an int32/int64"):
        token_logprobs(hidden, weight, targets.float())
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 1003\)"):
        token_logprobs(hidden, weight, torch.full_like(targets, V))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(hidden, weight, targets, temperature=0.0)
    with pytest.raises(ValueError, match="vocab_chunk"):
        token_logprobs(hidden, weight, targets, vocab_chunk=0)
