"""Caption images with UAE's encoder (Qwen2.5-VL), using the released demo's prompt by default.

    python -m eval.caption photo.jpg other.png --uae ckpt/UAE            # prints one caption per image
    python -m eval.caption photo.jpg --uae ckpt/UAE --run runs/grpo_encoder --prompt bench
    python -m eval.caption photo.jpg --tiny --out captions.json

--out is rewritten after every image: {"captions": {image: caption}, "skipped": [{"image", "reason"}]} (an image that
cannot be read or captioned, e.g. one whose aspect ratio exceeds the processor's 200, is skipped and listed, not
fatal); eval.caption_judge reads the file as it is.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from eval.cli import at_least, check_inputs, parser, refuse_overwrite, report_skipped, skip, write_json
from eval.model_args import add_model_args, add_prompt_arg, caption_prompt, check_model_args, load_model
from model.image_io import load_rgb


def main(argv=None) -> dict:
    p = parser("python -m eval.caption", __doc__)
    p.add_argument("images", nargs="+", help="image files")
    add_prompt_arg(p, "demo")
    p.add_argument("--max-new-tokens", type=at_least(1), default=None,
                   help="caption length limit in tokens (default: the model's, 512 for the release)")
    p.add_argument("--temperature", type=at_least(0.0, float), default=None,
                   help="sampling temperature (default: the model's, 0.7 for the release); 0 = greedy")
    p.add_argument("--out", default=None, help="write the captions and the skipped images here (JSON)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_model_args(p)
    a = p.parse_args(argv)
    check_inputs(p, "images", a.images)
    check_model_args(p, a)
    if a.out:
        refuse_overwrite(p, [Path(a.out)], a.overwrite)
    uae = load_model(a)
    kw = {"prompt": caption_prompt(a.prompt)}
    if a.temperature == 0:
        kw["do_sample"] = False
    elif a.temperature is not None:
        kw["temperature"] = a.temperature
    result = {"captions": {}, "skipped": []}
    for i, f in enumerate(a.images):
        print(f"[{i + 1}/{len(a.images)}] {f}", file=sys.stderr, flush=True)
        try:
            image = load_rgb(f)
            # The processor's ValueErrors name what it cannot take (aspect ratio over 200, an empty image).
            text = uae.caption([image], max_new_tokens=a.max_new_tokens,
                               generator=torch.Generator().manual_seed(a.seed + i), **kw)[0]
        except (OSError, ValueError) as e:
            skip(result["skipped"], f, e)
        else:
            result["captions"][f] = text
            print(text, flush=True)
        if a.out:
            write_json(Path(a.out), result)
    report_skipped(result["skipped"], len(a.images))
    return result


if __name__ == "__main__":
    main()
