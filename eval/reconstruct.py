"""Reconstruct images through UAE: image -> caption -> image. Writes `<name>.txt` (caption) and
`recon_<name>.png` per image into --out (the names Unified-Bench's scorer pairs).

    python -m eval.reconstruct photo.jpg --uae ckpt/UAE --out recon/
    python -m eval.reconstruct photo.jpg --uae ckpt/UAE --run runs/grpo_decoder --prompt bench --out recon/
    python -m eval.reconstruct photo.jpg --tiny --out recon/
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from eval.model_args import add_model_args, add_prompt_arg, add_sampling_args, caption_prompt, load_model, open_image


def main(argv=None) -> list[tuple[str, Path]]:
    p = argparse.ArgumentParser(prog="python -m eval.reconstruct", description=__doc__.split("\n\n")[0])
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--out", default="recon", help="output folder")
    add_prompt_arg(p, "demo")
    add_sampling_args(p)
    add_model_args(p)
    a = p.parse_args(argv)
    images = [open_image(f) for f in a.images]
    uae = load_model(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for i, (f, im) in enumerate(zip(a.images, images)):
        gen = torch.Generator().manual_seed(a.seed + i)
        captions, recon = uae.reconstruct([im], a.height, a.width, a.steps, a.guidance_scale, generator=gen,
                                          prompt=caption_prompt(a.prompt))
        stem = Path(f).stem
        (out / f"{stem}.txt").write_text(captions[0] + "\n")
        recon[0].save(out / f"recon_{stem}.png")
        results.append((captions[0], out / f"recon_{stem}.png"))
        print(f"[{i + 1}/{len(images)}] {f}: {len(captions[0].split())} words -> {out / f'recon_{stem}.png'}",
              file=sys.stderr, flush=True)
    return results


if __name__ == "__main__":
    main()
