"""Caption images with UAE's encoder (Qwen2.5-VL), using the released demo's prompt by default.

    python -m eval.caption photo.jpg other.png --uae ckpt/UAE            # prints one caption per image
    python -m eval.caption photo.jpg --uae ckpt/UAE --run runs/grpo_encoder --prompt bench
    python -m eval.caption photo.jpg --tiny --out captions.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from eval.model_args import add_model_args, add_prompt_arg, caption_prompt, load_model, open_image


def main(argv=None) -> dict[str, str]:
    p = argparse.ArgumentParser(prog="python -m eval.caption", description=__doc__.split("\n\n")[0])
    p.add_argument("images", nargs="+", help="image files")
    add_prompt_arg(p, "demo")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None, help="default 0.7 (released); 0 = greedy")
    p.add_argument("--out", default=None, help="write {image: caption} JSON here")
    add_model_args(p)
    a = p.parse_args(argv)
    images = [open_image(f) for f in a.images]
    uae = load_model(a)
    kw = {"prompt": caption_prompt(a.prompt)}
    if a.temperature == 0:
        kw["do_sample"] = False
    elif a.temperature is not None:
        kw["temperature"] = a.temperature
    out = {}
    for i, (f, im) in enumerate(zip(a.images, images)):
        text = uae.caption([im], max_new_tokens=a.max_new_tokens, generator=torch.Generator().manual_seed(a.seed + i),
                           **kw)[0]
        out[f] = text
        print(f"[{i + 1}/{len(images)}] {f}", file=sys.stderr, flush=True)
        print(text, flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
