"""Generate images from text prompts with UAE's decoder (released defaults: 1024 px, 40 steps, CFG 5).

    python -m eval.generate "a red fox in the snow" --uae ckpt/UAE --out fox.png
    python -m eval.generate "a red fox in the snow" --uae ckpt/UAE --run runs/grpo_decoder --out fox.png
    python -m eval.generate "a red fox" --tiny --out fox.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from eval.model_args import add_model_args, add_sampling_args, load_model


def main(argv=None) -> list[Path]:
    p = argparse.ArgumentParser(prog="python -m eval.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("prompts", nargs="+", help="text prompts (one image each)")
    p.add_argument("--out", default="generated.png", help="output PNG; with several prompts, _0, _1, ... are added")
    add_sampling_args(p)
    add_model_args(p)
    a = p.parse_args(argv)
    uae = load_model(a)
    out = Path(a.out)
    files = []
    for i, prompt in enumerate(a.prompts):
        image = uae.generate([prompt], a.height, a.width, a.steps, a.guidance_scale,
                             generator=torch.Generator().manual_seed(a.seed + i))[0]
        f = out if len(a.prompts) == 1 else out.with_name(f"{out.stem}_{i}{out.suffix}")
        f.parent.mkdir(parents=True, exist_ok=True)
        image.save(f)
        files.append(f)
        print(f"[{i + 1}/{len(a.prompts)}] wrote {f}", file=sys.stderr, flush=True)
    return files


if __name__ == "__main__":
    main()
