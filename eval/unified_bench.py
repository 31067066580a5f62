"""Unified-Bench: how well the caption -> regenerate loop closes.

Score = cosine similarity of L2-normalised features of a source image and its reconstruction under CLIP ViT-L/14,
LongCLIP-L, DINOv2-L and DINOv3-L; per-backbone means x100; Overall = mean of the four backbones. A backbone whose
weights are not given is reported as missing and Overall is then left empty (`overall_partial` holds the mean of the
backbones that were scored) — a missing backbone is never silently dropped from Overall.

    # (a) score two folders paired by file name (a `recon_` prefix on the reconstruction is accepted)
    python -m eval.unified_bench score --source src/ --recon rec/ --out bench_out/ \
        --clip ckpt/clip-vit-large-patch14 --longclip ckpt/longclip-L.pt --dinov2 ckpt/dinov2-large \
        --dinov3 ckpt/dinov3-vitl16
    # (b) the full loop on our model: caption every image with the Unified-Bench prompt, regenerate (by default with
    #     the model's settings, model.uae.UAESettings: the release's 1024 px, 40 steps, CFG 5), score; --run adds a
    #     training run's result to the release
    python -m eval.unified_bench run --source src/ --out bench_out/ --uae ckpt/UAE --clip ckpt/clip-vit-large-patch14
    python -m eval.unified_bench run --source src/ --out bench_out/ --uae ckpt/UAE --run runs/grpo_decoder \
        --clip ckpt/clip-vit-large-patch14
    python -m eval.unified_bench run --source src/ --out bench_out/ --tiny     # tiny random model, CPU demo

The caption prompt (`--prompt bench`, model.uae.UNIFIED_BENCH_PROMPT) asks for an accurate, comprehensive description
from which a generation model can redraw the image, as the paper's protocol does; `--prompt demo` uses the released
demo's prompt instead.

Writes `summary.json`, `scores.csv` (one row per image) and `report.html` (source, reconstruction, caption and
scores side by side; the images are files in `images/` next to it); `run` also writes `recon/` and `captions.json`
(eval.caption's layout), both as it goes, image by image. An image that cannot be read, converted or captioned is
skipped and listed with the reason in summary.json's `skipped` (and in captions.json); files in --source whose suffix
is not an image's are listed in `ignored`. Existing outputs are only replaced with --overwrite.
"""
from __future__ import annotations

import csv
import html
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from eval.cli import (HelpFormatter, at_least, device, output_names, parser, refuse_overwrite, save_image, skip,
                      write_json, write_text)
from eval.model_args import (add_model_args, add_prompt_arg, add_sampling_args, caption_prompt, check_model_args,
                             check_size, load_model)
from eval.reward import Backbone, ReconstructionReward
from model.image_io import IMAGE_SUFFIXES, load_rgb

BACKBONES = ("clip", "longclip", "dinov2", "dinov3")
RECON_PREFIX = "recon_"


class NoPairsError(ValueError):
    """Not one pair of images could be read."""


@dataclass
class Pairing:
    pairs: list[tuple[str, Path, Path]]  # (name, source file, reconstruction file)
    unpaired_sources: list[str] = field(default_factory=list)
    unpaired_recons: list[str] = field(default_factory=list)


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _ignored(folder: Path) -> list[str]:
    """Files in `folder` that are not taken as images (by suffix), so that leaving them out is never silent."""
    return sorted(p.name for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in IMAGE_SUFFIXES)


def pair_folders(source_dir: str | Path, recon_dir: str | Path) -> Pairing:
    """Pair by file stem, ignoring the extension; a reconstruction may carry a `recon_` prefix. An exact stem wins over
    a prefixed one. Images without a partner are listed, not fatal."""
    sources = _images(Path(source_dir))
    recons = _images(Path(recon_dir))
    by_stem: dict[str, Path] = {}
    for p in recons:
        stem = p.stem[len(RECON_PREFIX):] if p.stem.startswith(RECON_PREFIX) else p.stem
        if stem not in by_stem or not p.stem.startswith(RECON_PREFIX):
            by_stem[stem] = p
    pairs, unpaired = [], []
    for s in sources:
        r = by_stem.pop(s.stem, None)
        if r is None:
            unpaired.append(s.name)
        else:
            pairs.append((s.stem, s, r))
    used = {r for _, _, r in pairs}
    return Pairing(pairs, unpaired, [p.name for p in recons if p not in used])


def load_backbones(paths: dict[str, str | None], device: str = "cpu", dtype=torch.float32) -> dict[str, Backbone]:
    """Build the backbones whose weights are given; a missing or mismatched checkpoint is a ValueError naming the
    option and the loader's message."""
    out: dict[str, Backbone] = {}
    for name, path in paths.items():
        if not path:
            continue
        try:
            out[name] = _load_backbone(name, path, device, dtype)
        except (FileNotFoundError, ValueError) as e:  # CheckpointError is a ValueError
            raise ValueError(f"cannot load --{name} {path}: {e}") from None
    return out


def _load_backbone(name: str, path: str, device: str, dtype) -> Backbone:
    from eval.reward import clip_backbone, dinov2_backbone, dinov3_backbone

    if name == "clip":
        from model.clip import CLIP

        return clip_backbone(CLIP.from_pretrained(path, dtype=dtype, device=device), "clip")
    if name == "longclip":
        from model.clip import CLIP

        return clip_backbone(CLIP.from_longclip(path, dtype=dtype, device=device), "longclip")
    if name == "dinov2":
        from model.dino import DINOv2

        return dinov2_backbone(DINOv2.from_pretrained(path, dtype=dtype, device=device))
    if name == "dinov3":
        from model.dino import DINOv3

        return dinov3_backbone(DINOv3.from_pretrained(path, dtype=dtype, device=device))
    raise ValueError(f"unknown backbone {name!r}; expected one of {BACKBONES}")


def score_pairs(pairing: Pairing, backbones: dict[str, Backbone], out_dir: str | Path,
                captions: dict[str, str] | None = None, batch_size: int = 16,
                skipped: list[dict] | None = None, ignored: list[str] | None = None) -> dict:
    """Score every pair with every backbone; write summary.json, scores.csv, report.html and images/. A pair whose
    images cannot be read or converted to RGB (model/image_io.py, the conversion every backbone's preprocessing makes)
    is skipped and added to `skipped` (entries {"image", "reason"}; earlier ones, e.g. from captioning, are kept)."""
    out_dir = Path(out_dir)
    rows, skipped, kept = [], list(skipped or []), []
    for name, s, r in pairing.pairs:
        try:
            kept.append((name, load_rgb(s), load_rgb(r)))
        except (OSError, ValueError) as e:
            skip(skipped, name, e)
    if not kept:
        unpaired = f" (unpaired sources: {pairing.unpaired_sources[:5]})" if pairing.unpaired_sources else ""
        raise NoPairsError(f"no readable image pairs to score{unpaired}")
    scores: dict[str, torch.Tensor] = {}
    for bname, backbone in backbones.items():
        reward = ReconstructionReward(backbone, batch_size)
        scores[bname] = reward([x[1] for x in kept], [x[2] for x in kept]).cpu() * 100
    for i, (name, src, rec) in enumerate(kept):
        src_file, rec_file = f"images/{name}_source.png", f"images/{name}_recon.png"
        save_image(_thumbnail(src), out_dir / src_file)
        save_image(_thumbnail(rec), out_dir / rec_file)
        row = {"name": name, "source": src_file, "recon": rec_file,
               **{b: round(float(scores[b][i]), 4) if b in scores else None for b in BACKBONES}}
        present = [row[b] for b in BACKBONES if row[b] is not None]
        row["overall"] = round(sum(present) / len(present), 4) if present and len(present) == len(BACKBONES) else None
        row["caption"] = (captions or {}).get(name, "")
        rows.append(row)
    means = {b: round(float(scores[b].mean()), 4) for b in BACKBONES if b in scores}
    missing = [b for b in BACKBONES if b not in scores]
    summary = {
        "n_pairs": len(rows), "backbones": means, "missing_backbones": missing,
        "overall": round(sum(means.values()) / len(BACKBONES), 4) if not missing else None,
        "overall_partial": round(sum(means.values()) / len(means), 4) if means else None,
        "unpaired_sources": pairing.unpaired_sources, "unpaired_recons": pairing.unpaired_recons,
        "skipped": skipped, "ignored": list(ignored or []),
    }
    write_json(out_dir / "summary.json", summary)
    table = io.StringIO(newline="")
    w = csv.DictWriter(table, fieldnames=["name", *BACKBONES, "overall", "source", "recon", "caption"])
    w.writeheader()
    w.writerows(rows)
    write_text(out_dir / "scores.csv", table.getvalue())
    _write_html(out_dir / "report.html", summary, rows)
    return summary


def _thumbnail(im: Image.Image, size: int = 384) -> Image.Image:
    im = im.copy()
    im.thumbnail((size, size), Image.BICUBIC)
    return im


def _fmt(v) -> str:
    return "missing" if v is None else f"{v:.2f}"


def _write_html(path: Path, summary: dict, rows: list[dict]) -> None:
    head = "".join(f"<th>{b}</th>" for b in BACKBONES)
    means = "".join(f"<td>{_fmt(summary['backbones'].get(b))}</td>" for b in BACKBONES)
    overall = _fmt(summary["overall"])
    if summary["missing_backbones"]:
        overall += (f" (partial over {len(summary['backbones'])} backbone(s): "
                    f"{_fmt(summary['overall_partial'])}; missing {', '.join(summary['missing_backbones'])})")
    body = []
    for r in rows:
        cells = "".join(f"<td>{_fmt(r[b])}</td>" for b in BACKBONES)
        body.append(f"<tr><td>{html.escape(r['name'])}</td><td><img src='{html.escape(r['source'])}'></td>"
                    f"<td><img src='{html.escape(r['recon'])}'></td><td class='cap'>{html.escape(r['caption'])}</td>"
                    f"{cells}<td>{_fmt(r['overall'])}</td></tr>")
    listed = {k: summary[k] for k in ("unpaired_sources", "unpaired_recons", "ignored")}
    listed["skipped"] = [f"{s['image']} ({s['reason']})" for s in summary["skipped"]]
    problems = "".join(f"<li>{html.escape(k)}: {html.escape(', '.join(v))}</li>" for k, v in listed.items() if v)
    write_text(path, f"""<!doctype html><html><head><meta charset="utf-8"><title>Unified-Bench</title>
<style>body{{font-family:sans-serif}} img{{max-width:256px}} td{{vertical-align:top;padding:4px}}
.cap{{max-width:420px;font-size:12px}} table{{border-collapse:collapse}} tr{{border-bottom:1px solid #ccc}}</style>
</head><body><h1>Unified-Bench</h1><p>{summary['n_pairs']} pairs. Overall: {html.escape(overall)}</p>
<table><tr>{head}</tr><tr>{means}</tr></table>{f'<ul>{problems}</ul>' if problems else ''}
<table><tr><th>name</th><th>source</th><th>reconstruction</th><th>caption</th>{head}<th>overall</th></tr>
{''.join(body)}</table></body></html>""")


def run_loop(uae, source_dir: str | Path, out_dir: str | Path, backbones: dict[str, Backbone], prompt: str,
             height: int | None, width: int | None, steps: int | None, guidance_scale: float | None,
             seed: int, batch_size: int = 16) -> dict:
    """Caption every source image with `prompt`, regenerate it from the caption (None: the model's settings), and
    score. Image i's caption and reconstruction draw from one generator seeded seed + i. recon/ and captions.json
    grow image by image; images that share a stem get distinct names (eval.cli.output_names)."""
    out_dir, source_dir = Path(out_dir), Path(source_dir)
    files = _images(source_dir)
    record: dict = {"captions": {}, "skipped": []}
    pairs = []
    for i, (f, name) in enumerate(zip(files, output_names(files))):
        gen = torch.Generator().manual_seed(seed + i)
        try:
            # The processor's ValueErrors name what it cannot take (aspect ratio over 200, an empty image).
            caption = uae.caption([load_rgb(f)], prompt=prompt, generator=gen)[0]
        except (OSError, ValueError) as e:
            skip(record["skipped"], f.name, e)
        else:
            recon = uae.generate([caption], height=height, width=width, steps=steps, guidance_scale=guidance_scale,
                                 generator=gen)[0]
            save_image(recon, out_dir / "recon" / f"{RECON_PREFIX}{name}.png")
            record["captions"][name] = caption
            pairs.append((name, f, out_dir / "recon" / f"{RECON_PREFIX}{name}.png"))
            print(f"[{i + 1}/{len(files)}] {f.name}: {len(caption.split())} words", flush=True)
        write_json(out_dir / "captions.json", record)
    return score_pairs(Pairing(pairs), backbones, out_dir, record["captions"], batch_size, skipped=record["skipped"],
                       ignored=_ignored(source_dir))


def main(argv: list[str] | None = None) -> dict:
    p = parser("python -m eval.unified_bench", __doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_text in (("score", "score two folders of images paired by file name"),
                            ("run", "caption -> regenerate -> score with our UAE model")):
        s = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        s.add_argument("--source", required=True, help="folder of source images")
        s.add_argument("--out", required=True, help="output folder (summary.json, scores.csv, report.html)")
        s.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in --out")
        for b in BACKBONES:
            s.add_argument(f"--{b}", default=None, help=f"{b} weights (missing backbones are reported as missing)")
        s.add_argument("--batch-size", type=at_least(1), default=16, help="images per backbone forward")
        if name == "score":
            s.add_argument("--recon", required=True, help="folder of reconstructions (same names or recon_ prefix)")
            s.add_argument("--device", type=device, default="cpu", help="torch device of the backbones")
        else:
            add_prompt_arg(s, "bench")
            add_sampling_args(s)
            add_model_args(s)
    a = p.parse_args(argv)
    if a.command == "run":
        check_model_args(p, a)
    for b in BACKBONES:
        if getattr(a, b) and not Path(getattr(a, b)).exists():
            p.error(f"argument --{b}: {getattr(a, b)} does not exist")
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        p.error(f"argument --out: {out} is not a folder")
    for option in ("source", "recon") if a.command == "score" else ("source",):
        try:
            _images(Path(getattr(a, option)))
        except (FileNotFoundError, ValueError) as e:
            p.error(f"argument --{option}: {e}")
    outputs = [out / n for n in ("summary.json", "scores.csv", "report.html")]
    if a.command == "run":
        try:
            names = output_names(_images(Path(a.source)))
        except ValueError as e:
            p.error(f"argument --source: {e}")
        outputs += [out / "captions.json"] + [out / "recon" / f"{RECON_PREFIX}{n}.png" for n in names]
    refuse_overwrite(p, outputs, a.overwrite)
    uae = None
    if a.command == "run":  # first: bad model options fail before any backbone loads
        uae = load_model(a)
        check_size(p, a, uae)
    try:
        backbones = load_backbones({b: getattr(a, b) for b in BACKBONES}, a.device)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if not backbones:
        print("warning: no backbone weights given; every backbone will be reported as missing", file=sys.stderr)
    try:
        if a.command == "score":
            summary = score_pairs(pair_folders(a.source, a.recon), backbones, a.out, batch_size=a.batch_size,
                                  ignored=_ignored(Path(a.source)))
        else:
            summary = run_loop(uae, a.source, a.out, backbones, caption_prompt(a.prompt), a.height, a.width, a.steps,
                               a.guidance_scale, a.seed, a.batch_size)
    except NoPairsError as e:  # every image was skipped, each named on stderr
        sys.exit(f"error: {e}")
    print(json.dumps({k: summary[k] for k in ("n_pairs", "backbones", "missing_backbones", "overall",
                                              "overall_partial", "skipped")}, indent=2))
    return summary


if __name__ == "__main__":
    main()
