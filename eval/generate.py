"""Generate images from text prompts with UAE's decoder (released defaults: 1024 px, 40 steps, CFG 5).

    python -m eval.generate "a red fox in the snow" --uae ckpt/UAE --out fox.png
    python -m eval.generate "a red fox in the snow" --uae ckpt/UAE --run runs/grpo_decoder --out fox.png
    python -m eval.generate "a red fox" --tiny --out fox.png
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from eval.cli import image_format, parser, refuse_overwrite, save_image
from eval.model_args import add_model_args, add_sampling_args, check_model_args, check_size, load_model


def main(argv=None) -> list[Path]:
    p = parser("python -m eval.generate", __doc__)
    p.add_argument("prompts", nargs="+", help="text prompts (one image each)")
    p.add_argument("--out", default="generated.png",
                   help="output image (its suffix picks the format); with several prompts, _0, _1, ... are added")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    add_sampling_args(p)
    add_model_args(p)
    a = p.parse_args(argv)
    check_model_args(p, a)
    out = Path(a.out)
    try:
        image_format(out)
    except ValueError as e:
        p.error(f"argument --out: {e}")
    files = [out] if len(a.prompts) == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}")
                                               for i in range(len(a.prompts))]
    refuse_overwrite(p, files, a.overwrite)
    uae = load_model(a)
    check_size(p, a, uae)
    for i, (prompt, f) in enumerate(zip(a.prompts, files)):
        image = uae.generate([prompt], a.height, a.width, a.steps, a.guidance_scale,
                             generator=torch.Generator().manual_seed(a.seed + i))[0]
        save_image(image, f)
        print(f"[{i + 1}/{len(a.prompts)}] wrote {f}", file=sys.stderr, flush=True)
    return files


if __name__ == "__main__":
    main()
