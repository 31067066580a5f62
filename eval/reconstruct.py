"""Reconstruct images through UAE: image -> caption -> image. Writes `<name>.txt` (caption) and
`recon_<name>.png` per image into --out (the names Unified-Bench's scorer pairs), and `reconstruct.json`.

    python -m eval.reconstruct photo.jpg --uae ckpt/UAE --out recon/
    python -m eval.reconstruct photo.jpg --uae ckpt/UAE --run runs/grpo_decoder --prompt bench --out recon/
    python -m eval.reconstruct photo.jpg --tiny --out recon/

<name> is the image's file stem; inputs that share a stem (a/x.png, b/x.png) get `<stem>_<i>`, i their position on
the command line. Existing files are never replaced without --overwrite. `reconstruct.json`, rewritten after every
image, maps each input to its outputs and lists the images skipped (unreadable, or refused by the caption processor)
with the reason.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from eval.cli import (check_inputs, output_names, parser, refuse_overwrite, report_skipped, save_image, skip,
                      write_json, write_text)
from eval.model_args import (add_model_args, add_prompt_arg, add_sampling_args, caption_prompt, check_model_args,
                             check_size, load_model)
from model.image_io import load_rgb

INDEX = "reconstruct.json"


def main(argv=None) -> dict:
    p = parser("python -m eval.reconstruct", __doc__)
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--out", default="recon", help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files in --out")
    add_prompt_arg(p, "demo")
    add_sampling_args(p)
    add_model_args(p)
    a = p.parse_args(argv)
    check_inputs(p, "images", a.images)
    check_model_args(p, a)
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        p.error(f"argument --out: {out} is not a folder")
    try:
        names = output_names(a.images)
    except ValueError as e:
        p.error(f"argument images: {e}")
    refuse_overwrite(p, [out / INDEX] + [out / f for n in names for f in (f"{n}.txt", f"recon_{n}.png")],
                     a.overwrite)
    uae = load_model(a)
    check_size(p, a, uae)
    result = {"reconstructions": [], "skipped": []}
    for i, (f, name) in enumerate(zip(a.images, names)):
        gen = torch.Generator().manual_seed(a.seed + i)
        try:
            image = load_rgb(f)
            # The processor's ValueErrors name what it cannot take (aspect ratio over 200, an empty image).
            caption = uae.caption([image], prompt=caption_prompt(a.prompt), generator=gen)[0]
        except (OSError, ValueError) as e:
            skip(result["skipped"], f, e)
        else:
            # The caption and the image draw from one generator, as UAE.reconstruct does.
            recon = uae.generate([caption], a.height, a.width, a.steps, a.guidance_scale, generator=gen)[0]
            write_text(out / f"{name}.txt", caption + "\n")
            save_image(recon, out / f"recon_{name}.png")
            result["reconstructions"].append({"image": f, "caption": caption, "caption_file": f"{name}.txt",
                                              "recon": f"recon_{name}.png"})
            print(f"[{i + 1}/{len(a.images)}] {f}: {len(caption.split())} words -> {out / f'recon_{name}.png'}",
                  file=sys.stderr, flush=True)
        write_json(out / INDEX, result)
    report_skipped(result["skipped"], len(a.images))
    return result


if __name__ == "__main__":
    main()
