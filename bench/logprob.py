"""Fused token log-probs (kernels/logprob.py) against the naive log_softmax + gather, same run, same GPU.

The stage-2 GRPO shape: B8 x T512 tokens (N = 4096), hidden 2048, vocabulary 151936, bf16 hidden
states and LM head. Naive: `F.linear(h, W).float().log_softmax(-1).gather(-1, t)` (what GRPO code usually writes).
Both forward+backward with gradients to the hidden states (the LM head frozen, as with LoRA), and, unless --quick,
also to the head weight. Reports the median time and the peak memory allocated above the inputs during one
forward+backward, and max |error| of log-probs and hidden-state gradients against an fp32 reference.

    python bench/logprob.py [--quick] [--out results.json]
    python bench/logprob.py --smoke          # tiny shapes; on CPU under TRITON_INTERPRET=1
"""
from __future__ import annotations

import common  # noqa: F401  (puts the repository on sys.path)

common.interpret_if_smoke()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels.logprob import token_logprobs, token_logprobs_reference  # noqa: E402

FULL = dict(tokens=8 * 512, hidden=2048, vocab=151936)
SMOKE = dict(tokens=37, hidden=16, vocab=1000, vocab_chunk=256)


def naive(h, w, t, temperature):
    return (F.linear(h, w).float() / temperature).log_softmax(-1).gather(-1, t[:, None])[:, 0]


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--temperature", type=float, default=1.0)
    args = common.parse(p, argv, __file__)
    device = common.device_for(args)
    shape = SMOKE if args.smoke else FULL
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    reps = dict(warmup_ms=10, rep_ms=50) if args.quick else dict(warmup_ms=25, rep_ms=200)
    torch.manual_seed(0)
    n, d, vocab = shape["tokens"], shape["hidden"], shape["vocab"]
    hidden = torch.randn(n, d, device=device, dtype=dtype)
    weight = (torch.randn(vocab, d, device=device) / d ** 0.5).to(dtype)
    targets = torch.randint(vocab, (n,), device=device)
    grad_out = torch.randn(n, device=device)
    temp = args.temperature
    impls = {"ours": lambda h, w: token_logprobs(h, w, targets, temp, vocab_chunk=shape.get("vocab_chunk")),
             "naive": lambda h, w: naive(h, w, targets, temp)}

    # Accuracy against fp32 (fp32 logits of the upcast inputs).
    h32 = hidden.float().requires_grad_()
    ref = token_logprobs_reference(h32, weight.float(), targets, temp)
    (ref_dh,) = torch.autograd.grad(ref, h32, grad_out)
    ref, ref_dh = ref.detach(), ref_dh.detach()
    del h32

    rows, ms = [], {}
    for train_head in (False,) if args.quick else (False, True):
        for name, f in impls.items():
            h = hidden.detach().requires_grad_()
            w = weight.detach().requires_grad_(train_head)
            leaves = (h, w) if train_head else (h,)

            def step():
                return torch.autograd.grad(f(h, w), leaves, grad_out)

            out = f(h, w).detach()
            dh = step()[0]
            err = dict(logprob_err=float((out.float() - ref).abs().max()),
                       dh_err=float((dh.float() - ref_dh).abs().max()))
            del out, dh
            peak = common.peak_extra_gib(step, device)
            t = common.bench_ms(step, device, **reps)
            ms[name, train_head] = t
            rows.append(dict(impl=name, grads="hidden+head" if train_head else "hidden",
                             shape=f"N{n} d{d} V{vocab} {str(dtype).split('.')[-1]}", fwd_bwd_ms=round(t, 3),
                             peak_extra_gib=None if peak is None else round(peak, 3), **err))
    peaks = {(r["impl"], r["grads"]): r["peak_extra_gib"] for r in rows}
    mem = (peaks["ours", "hidden"] / peaks["naive", "hidden"]) if peaks["naive", "hidden"] else None
    targets = [common.target("logprob peak extra memory: ours / naive", mem, 0.2, higher=False),
               common.target("logprob fwd+bwd time: ours / naive", ms["ours", False] / ms["naive", False], 1.0,
                             higher=False)]
    return common.report("logprob", args, rows, targets)


if __name__ == "__main__":
    main()
