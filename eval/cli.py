"""What every eval entry point shares on the command line and on disk: checked argument types (a bad value is a
one-line argparse error, exit code 2, before any model loads), the help formatter, unique output names, the refusal to
overwrite, atomic writes, and the record of inputs skipped with their reason."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
from PIL import Image


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written; every option's default in its help, except None and False, whose meaning (the
    model's setting, off) the help text says."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """An entry point's parser, described by the first paragraph of its module docstring."""
    return argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0], formatter_class=HelpFormatter)


# ----------------------------------------------------------------------------------------------- argument types

def _number(kind, text: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") \
            from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def at_least(low, kind=int):
    """An argparse type: a `kind` number >= low (floats must be finite)."""
    def check(text: str):
        value = _number(kind, text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return value
    return check


def positive_float(text: str) -> float:
    value = _number(float, text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def device(text: str) -> str:
    """A torch device this machine has."""
    try:
        d = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r}") from None
    if d.type == "cuda" and (not torch.cuda.is_available() or (d.index or 0) >= torch.cuda.device_count()):
        raise argparse.ArgumentTypeError(f"{text}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return text


def check_inputs(p: argparse.ArgumentParser, option: str, paths: list[str]) -> None:
    """Every input file exists and none is given twice (its outputs would collide); else a one-line error naming
    it."""
    seen = set()
    for path in paths:
        if not Path(path).is_file():
            p.error(f"argument {option}: {path} is not a file")
        key = os.path.realpath(path)
        if key in seen:
            p.error(f"argument {option}: {path} is given twice")
        seen.add(key)


# ----------------------------------------------------------------------------------------------- outputs

def output_names(files: list[str | Path]) -> list[str]:
    """A distinct output name per input file: its stem, or `<stem>_<i>` (i = its position among the inputs) where
    inputs from different folders or with different suffixes share a stem, so no output overwrites another."""
    stems = [Path(f).stem for f in files]
    names = [f"{s}_{i}" if stems.count(s) > 1 else s for i, s in enumerate(stems)]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:  # e.g. inputs a.png, a.jpg and a_1.png
        raise ValueError(f"cannot give distinct output names to inputs named {clash}; rename them")
    return names


def refuse_overwrite(p: argparse.ArgumentParser, files: list[Path], overwrite: bool) -> None:
    """A one-line error naming the outputs that exist already, unless --overwrite."""
    existing = [str(f) for f in files if f.exists()]
    if existing and not overwrite:
        more = f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        p.error(f"{', '.join(existing[:3])}{more} exist(s) already; pass --overwrite to replace")


def write_text(path: Path, text: str) -> None:
    """Write through a temporary file and rename, so a reader or a crash never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def save_image(image: Image.Image, path: Path) -> None:
    """`write_text` for images: the format follows the suffix (`image_format` checks it up front)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    image.save(tmp, format=image_format(path))
    os.replace(tmp, path)


def image_format(path: str | Path) -> str:
    """The PIL format an output file's suffix names; ValueError when PIL cannot write it."""
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(f"{path}: the suffix {Path(path).suffix!r} is not an image format PIL can write "
                         f"(e.g. .png, .jpg)")
    return fmt


def skip(skipped: list[dict], image: str, reason) -> None:
    """Record an input that could not be processed (kept in the tool's output) and say so on stderr."""
    skipped.append({"image": image, "reason": str(reason)})
    print(f"warning: skipping {image}: {reason}", file=sys.stderr, flush=True)


def report_skipped(skipped: list[dict], total: int) -> None:
    """The closing line on stderr; exits with an error when no input at all could be processed."""
    if not skipped:
        return
    if len(skipped) == total:
        sys.exit(f"error: none of the {total} input(s) could be processed: "
                 + "; ".join(f"{s['image']}: {s['reason']}" for s in skipped[:3]))
    print(f"warning: skipped {len(skipped)} of {total} input(s): {', '.join(s['image'] for s in skipped)}",
          file=sys.stderr, flush=True)
