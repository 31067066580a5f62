"""Triton flash attention (kernels/attention.py) against torch SDPA, same run, same GPU.

Fixed-length shapes of the models' real configs (bf16): SD3.5-large joint attention B2 H38 L4608 d64,
SD3.5-medium 512 px B8 H24 L1536 d64, Qwen LM causal prefill B8 H16 L1024 d128 (also with its 2 key/value heads
unless --quick), Qwen ViT full attention B1 H16 L4096 d80; forward and forward+backward. Varlen: the Qwen2.5-VL
vision windows of two images (64-patch windows cut at the edges) through one `flash_attention_varlen` call against a
Python loop of SDPA over the windows (and, unless --quick, per-image full attention against a loop over images).

FLOPs: forward 4*B*H*Lq*Lk*d (halved when causal), forward+backward 3.5x that (the notes' convention). Errors: max
|ours - SDPA| of the output and of dq, dk, dv on the same inputs.

    python bench/attention.py [--quick] [--out results.json]
    python bench/attention.py --smoke          # tiny shapes; on CPU under TRITON_INTERPRET=1
"""
from __future__ import annotations

import common  # noqa: F401  (puts the repository on sys.path)

common.interpret_if_smoke()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels.attention import flash_attention, flash_attention_varlen  # noqa: E402

# name, B, H, Hkv, L, D, causal
SHAPES = [("sd3.5-large joint", 2, 38, 38, 4608, 64, False),
          ("sd3.5-medium 512px", 8, 24, 24, 1536, 64, False),
          ("qwen-lm prefill causal", 8, 16, 16, 1024, 128, True),
          ("qwen-vit full", 1, 16, 16, 4096, 80, False)]
EXTRA = [("qwen-lm prefill causal gqa", 8, 16, 2, 1024, 128, True)]
SMOKE = [("smoke joint", 1, 2, 2, 37, 64, False), ("smoke causal gqa", 1, 4, 2, 29, 16, True),
         ("smoke d80", 1, 2, 2, 19, 80, False)]
VIT_IMAGES = [[1, 64, 92], [1, 36, 36]]  # patches (t, h, w) of two images: 7184 patches, 127 windows
SMOKE_CU = [0, 16, 37, 64, 70]


def sdpa(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])


def loop_sdpa(q, k, v, bounds):
    """Reference for packed varlen attention: one SDPA call per segment."""
    outs = [F.scaled_dot_product_attention(q[s:e].transpose(0, 1)[None], k[s:e].transpose(0, 1)[None],
                                           v[s:e].transpose(0, 1)[None])[0].transpose(0, 1)
            for s, e in zip(bounds, bounds[1:])]
    return torch.cat(outs)


def fwd_bwd(f, inputs, grad):
    leaves = [t.detach().requires_grad_() for t in inputs]

    def run():
        return torch.autograd.grad(f(*leaves), leaves, grad)

    return run


def max_err(ours, ref) -> float:
    return max(float((a.float() - b.float()).abs().max()) for a, b in zip(ours, ref))


def time_pair(case, shape, flops, ours, ref, inputs, device, reps, name_ref):
    """Rows for fwd and fwd+bwd of ours and the reference, with errors; returns (rows, {pass: ref_ms / ours_ms})."""
    rows, speedup = [], {}
    grad = torch.randn_like(ours(*inputs))
    out_err = max_err([ours(*inputs)], [ref(*inputs)])
    grad_err = max_err(fwd_bwd(ours, inputs, grad)(), fwd_bwd(ref, inputs, grad)())
    for name, mult, fns in (("fwd", 1.0, (lambda: ours(*inputs), lambda: ref(*inputs))),
                            ("fwd+bwd", 3.5, (fwd_bwd(ours, inputs, grad), fwd_bwd(ref, inputs, grad)))):
        ms = [common.bench_ms(fn, device, **reps) for fn in fns]
        speedup[name] = ms[1] / ms[0]
        for impl, t in zip(("ours", name_ref), ms):
            rows.append(dict(case=case, shape=shape, impl=impl, **{"pass": name}, ms=round(t, 4),
                             tflops=round(mult * flops / t / 1e9, 1),
                             max_abs_err=(out_err if name == "fwd" else grad_err) if impl == "ours" else None))
    return rows, speedup


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    args = common.parse(p, argv, __file__)
    device = common.device_for(args)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if device.type == "cpu":
        dtype = torch.float32  # the interpreter's bf16 dots are emulated; plumbing only
    reps = dict(warmup_ms=10, rep_ms=40) if args.quick else dict(warmup_ms=25, rep_ms=100)
    shapes = SMOKE if args.smoke else SHAPES + ([] if args.quick else EXTRA)
    torch.manual_seed(0)
    rows, targets = [], []

    for case, B, H, Hkv, L, D, causal in shapes:
        q = torch.randn(B, H, L, D, device=device, dtype=dtype)
        k, v = (torch.randn(B, Hkv, L, D, device=device, dtype=dtype) for _ in range(2))
        flops = 4 * B * H * L * L * D * (0.5 if causal else 1.0)
        r, speedup = time_pair(case, f"B{B} H{H}/{Hkv} L{L} d{D}" + (" causal" if causal else ""), flops,
                               lambda q, k, v: flash_attention(q, k, v, causal=causal),
                               lambda q, k, v: sdpa(q, k, v, causal), (q, k, v), device, reps, "sdpa")
        rows += r
        for name, s in speedup.items():
            targets.append(common.target(f"attention {case} {name}: SDPA time / ours", s, 0.9, higher=True))
        del q, k, v

    # Varlen: Qwen2.5-VL vision windows (and per-image full attention) of a packed batch of images.
    if args.smoke:
        segments = {"smoke windows": SMOKE_CU}
        H, D = 2, 80
    else:
        from model.qwen2_5_vl import VisionConfig, vision_attention_layout

        _, cu_windows, cu_images = vision_attention_layout(torch.tensor(VIT_IMAGES), VisionConfig())
        segments = {"qwen-vit windows": cu_windows.tolist()}
        if not args.quick:
            segments["qwen-vit per-image full"] = cu_images.tolist()
        H, D = 16, 80
    for case, bounds in segments.items():
        total, longest = bounds[-1], max(e - s for s, e in zip(bounds, bounds[1:]))
        q, k, v = (torch.randn(total, H, D, device=device, dtype=dtype) for _ in range(3))
        cu = torch.tensor(bounds, dtype=torch.int32, device=device)
        flops = sum(4 * H * (e - s) ** 2 * D for s, e in zip(bounds, bounds[1:]))
        r, speedup = time_pair(case, f"{len(bounds) - 1} segments, {total} tokens, H{H} d{D}", flops,
                               lambda q, k, v: flash_attention_varlen(q, k, v, cu, longest),
                               lambda q, k, v: loop_sdpa(q, k, v, bounds), (q, k, v), device, reps, "loop sdpa")
        rows += r
        if "windows" in case:
            for name, s in speedup.items():
                targets.append(common.target(f"varlen {case} {name}: looped SDPA time / ours", s, 3.0, higher=True))
    return common.report("attention", args, rows, targets)


if __name__ == "__main__":
    main()
