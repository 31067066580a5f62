"""The decoder SFT's data path alone against its model step alone, in samples/s, at SD3.5-medium 512 px batch 8 shapes.

data: what train/sft_decoder.py runs for each batch besides the model: photo-like JPEGs (--image-px, default
      1024x768, quality 90) decoded, centre-cropped and resized to 512 px by train.data.BatchLoader + ImageTensors,
      in 0, 2, ... worker processes (--workers). The first batch (worker start-up) is not timed.
step: the step's model work on such a batch with random weights: the SD3 VAE encoding the 512 px images and the
      SD3.5-medium MMDiT forward and backward (full parameters) at 1024 image + --text-tokens text tokens. On a GPU the
      whole model runs at batch 8 in bf16. On a CPU a step takes many minutes, so --layers of the 24 blocks run at
      batch --micro-batch in fp32 and the time is scaled to 24 blocks and batch 8 (linear in both; the embedding and
      output layers are scaled with the blocks, which overstates the step by a few percent).
The last line is `ratio N.NN`: data samples/s with the default --workers of train/sft_decoder.py (2) over the
step's. Loading keeps up when the ratio is >= 1.5 (issue 16's goal, for a GPU step on a 16-core host).

    python bench/data_path.py                     # CPU: ~2 min on 2 cores; on a GPU the full step
    python bench/data_path.py --smoke             # tiny shapes (plumbing)
"""
from __future__ import annotations

import common  # noqa: F401  (puts the repository on sys.path)

import dataclasses  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from common import on, sync  # noqa: E402
from model.mmdit import MMDiT, MMDiTConfig  # noqa: E402
from model.vae import VAE, VAEConfig  # noqa: E402
from train.data import BatchLoader, ImageCaptionDataset, ImageTensors, ResumableSampler  # noqa: E402

DEFAULT_WORKERS = 2  # train/sft_decoder.py's --workers default


def write_images(folder: Path, n: int, width: int, height: int) -> None:
    """n JPEGs that decode like photos: smooth structure (an upsampled 32x24 random image) plus fine noise."""
    g = np.random.default_rng(0)
    for i in range(n):
        coarse = Image.fromarray(g.integers(0, 256, (24, 32, 3), dtype=np.uint8)).resize((width, height),
                                                                                        Image.BICUBIC)
        pixels = np.asarray(coarse).astype(np.int16) + g.integers(-12, 13, (height, width, 3), dtype=np.int16)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)
        (folder / f"{i:05d}.txt").write_text(f"photo {i}")


def data_rate(dataset, size: int, batch: int, workers: int, batches: int) -> float:
    """Samples/s of the loader alone over `batches` global batches, after one untimed batch."""
    loader = BatchLoader(ResumableSampler(dataset, seed=0), batch, slice(0, batch), ImageTensors(dataset, size),
                         workers=workers)
    loader.next_batch()
    t = time.perf_counter()
    for _ in range(batches):
        images = torch.stack([im for im, _ in loader.next_batch()])
        ImageTensors.to_unit_range(images)
    seconds = time.perf_counter() - t
    loader.close()
    return batches * batch / seconds


def step_time(args, device, dtype) -> dict:
    """Seconds of the VAE encode and of the MMDiT forward + backward for one batch of args.batch at args.size, from
    a run of args.layers blocks at batch args.micro_batch (scaled)."""
    if args.smoke:
        cfg, vae_cfg = MMDiTConfig.preset("tiny"), VAEConfig.preset("tiny")
    else:
        cfg, vae_cfg = MMDiTConfig.preset("sd3.5-medium"), VAEConfig()
    full_layers = cfg.num_layers
    layers = min(args.layers or full_layers, full_layers)
    cfg = dataclasses.replace(cfg, num_layers=layers, dual_attention_layers=tuple(
        i for i in cfg.dual_attention_layers if i < layers))
    torch.manual_seed(0)
    vae = on(device, dtype, lambda: VAE(vae_cfg)).eval().requires_grad_(False)
    dit = on(device, dtype, lambda: MMDiT(cfg))
    mb = args.micro_batch or args.batch
    images = torch.rand(mb, 3, args.size, args.size, device=device, dtype=dtype) * 2 - 1
    context = torch.randn(mb, args.text_tokens, cfg.joint_attention_dim, device=device, dtype=dtype)
    pooled = torch.randn(mb, cfg.pooled_projection_dim, device=device, dtype=dtype)
    t = torch.full((mb,), 500.0, device=device)

    def encode():
        with torch.no_grad():
            return vae.encode_dist(images)[0]

    def forward_backward(latents):
        dit.zero_grad(set_to_none=True)
        v = dit(latents, t, context, pooled)
        v.float().pow(2).mean().backward()

    latents = encode()
    forward_backward(latents)  # warm-up: allocator, kernels
    times = {}
    for name, fn in (("vae_s", encode), ("dit_s", lambda: forward_backward(latents))):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times[name] = time.perf_counter() - t0
    scale_batch = args.batch / mb
    return {"vae_s": times["vae_s"] * scale_batch, "dit_s": times["dit_s"] * scale_batch * full_layers / layers,
            "measured": f"{layers} of {full_layers} blocks, batch {mb}" + (" (scaled)" if layers < full_layers
                                                                            or mb < args.batch else "")}


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--workers", default="0,2", help="comma-separated worker counts of the data path")
    p.add_argument("--images", type=int, default=64, help="JPEGs written (the data path cycles over them)")
    p.add_argument("--image-px", default="1024x768", help="source JPEG width x height")
    p.add_argument("--batches", type=int, default=8, help="timed batches per worker count")
    p.add_argument("--device", default="", help="cpu or cuda for the step (default: cuda if there is one)")
    p.add_argument("--layers", type=int, default=0, help="MMDiT blocks run (0: 1 on CPU, all on a GPU)")
    p.add_argument("--micro-batch", type=int, default=0, help="batch run (0: 1 on CPU, --batch on a GPU)")
    p.add_argument("--text-tokens", type=int, default=256, help="caption tokens in the DiT context")
    args = common.parse(p, argv, __file__)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.size, args.batch = (64, 4) if args.smoke else (512, 8)
    if device.type == "cpu":
        args.layers = args.layers or 1
        args.micro_batch = args.micro_batch or 1
    if args.smoke:
        args.images, args.batches, args.text_tokens, args.image_px = 12, 3, 16, "96x80"
    elif args.quick:
        args.batches = 4
    width, height = (int(v) for v in args.image_px.split("x"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-data-") as folder:
        write_images(Path(folder), args.images, width, height)
        dataset = ImageCaptionDataset(folder)
        for w in (int(v) for v in args.workers.split(",")):
            rate = data_rate(dataset, args.size, args.batch, w, args.batches)
            rows.append(dict(path="data", workers=w, source_px=args.image_px, px=args.size, batch=args.batch,
                             samples_per_s=round(rate, 2)))
    step = step_time(args, device, dtype)
    step_s = step["vae_s"] + step["dit_s"]
    rows.append(dict(path="step", device=str(device), px=args.size, batch=args.batch, vae_s=round(step["vae_s"], 3),
                     dit_s=round(step["dit_s"], 3), step_s=round(step_s, 3),
                     samples_per_s=round(args.batch / step_s, 4), measured=step["measured"]))
    data = {r["workers"]: r["samples_per_s"] for r in rows if r["path"] == "data"}
    default = data.get(DEFAULT_WORKERS, max(data.values()))
    ratio = default / (args.batch / step_s)
    targets = [common.target(f"data path ({DEFAULT_WORKERS} workers) over the model step, samples/s (goal 1.5x)",
                             ratio, 1.5, True)]
    result = common.report("data_path", args, rows, targets)
    print(f"ratio {ratio:.2f}")
    return result


if __name__ == "__main__":
    main()
