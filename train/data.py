"""Training data: (image, caption) pairs from a folder or JSONL, procedurally generated scenes for the built-in tiny
runs, and a resumable sampler that hands every rank the same global order."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from model.image_io import IMAGE_SUFFIXES, load_rgb, to_rgb


_COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
           "purple": (140, 60, 180), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20)}
_SHAPES = ("circle", "square", "triangle")


def procedural_scene(index: int, size: int = 64, seed: int = 0) -> tuple[Image.Image, str]:
    """A deterministic scene of 1-3 coloured shapes on a plain background, and a caption that describes it."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    names = list(_COLORS)

    def pick(seq):
        return seq[int(torch.randint(len(seq), (1,), generator=g))]

    background = pick(names)
    img = Image.new("RGB", (size, size), _COLORS[background])
    draw = ImageDraw.Draw(img)
    parts = []
    for _ in range(1 + int(torch.randint(3, (1,), generator=g))):
        color = pick([c for c in names if c != background])
        shape = pick(_SHAPES)
        r = int(size * (0.12 + 0.15 * float(torch.rand((), generator=g))))
        cx, cy = (int(r + (size - 2 * r) * float(torch.rand((), generator=g))) for _ in range(2))
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            draw.ellipse(box, fill=_COLORS[color])
        elif shape == "square":
            draw.rectangle(box, fill=_COLORS[color])
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=_COLORS[color])
        vertical = "top" if cy < size / 3 else "bottom" if cy > 2 * size / 3 else "middle"
        horizontal = "left" if cx < size / 3 else "right" if cx > 2 * size / 3 else "center"
        article = "an" if color[0] in "aeiou" else "a"
        parts.append(f"{article} {color} {shape} at the {vertical} {horizontal}")
    caption = f"A {background} background with " + ", ".join(parts) + "."
    return img, caption


class ProceduralDataset:
    def __init__(self, n: int, size: int = 64, seed: int = 0):
        if n < 1:
            raise ValueError(f"procedural dataset size must be >= 1, got {n}")
        self.n, self.size, self.seed = n, size, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Image.Image, str]:
        return procedural_scene(i, self.size, self.seed)


class ImageCaptionDataset:
    """(image, caption) pairs from a JSONL file (`{"image": path, "caption": text}` per line, paths relative to the
    file) or a folder of images with same-named `.txt` captions. Images that fail to decode are skipped and counted
    when first met; captions are optional for stages that caption the image themselves (`need_caption=False`)."""

    def __init__(self, path: str | Path, need_caption: bool = True):
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"dataset {path} does not exist")
        items: list[tuple[Path, str | None]] = []
        if path.is_file():
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    items.append((path.parent / row["image"], row.get("caption")))
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{n}: expected a JSON object with an 'image' field ({e!r})") from None
        else:
            for img in sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
                txt = img.with_suffix(".txt")
                items.append((img, txt.read_text().strip() if txt.exists() else None))
        if need_caption:
            missing = [str(p) for p, c in items if not c]
            if missing:
                raise ValueError(f"{path}: {len(missing)} image(s) have no caption, e.g. {missing[:3]}")
        if not items:
            raise ValueError(f"dataset {path} is empty (no images with suffix {IMAGE_SUFFIXES})")
        self.items = items
        self.skipped: set[int] = set()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Image.Image, str | None] | None:
        file, caption = self.items[i]
        try:
            return load_rgb(file), caption
        except (OSError, ValueError) as e:
            if i not in self.skipped:
                self.skipped.add(i)
                print(f"warning: skipping undecodable image {file} ({e}); {len(self.skipped)} skipped so far",
                      file=sys.stderr, flush=True)
            return None


@dataclass
class SamplerState:
    epoch: int = 0
    position: int = 0


class ResumableSampler:
    """Global index order: a seeded permutation per epoch. Every rank walks the same order, takes the whole global
    batch and keeps its slice, so the data a step sees does not depend on the number of ranks; `state` is saved in
    checkpoints and resumes exactly."""

    def __init__(self, dataset, seed: int, state: SamplerState | None = None):
        self.dataset = dataset
        self.seed = seed
        self.state = state or SamplerState()

    def _order(self, epoch: int) -> list[int]:
        return torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def next_batch(self, n: int) -> list:
        """The next `n` decodable samples in global order (undecodable ones are skipped, never repeated in place)."""
        out = []
        tries = 0
        while len(out) < n:
            order = self._order(self.state.epoch)
            if self.state.position >= len(order):
                self.state = SamplerState(self.state.epoch + 1, 0)
                continue
            item = self.dataset[order[self.state.position]]
            self.state.position += 1
            tries += 1
            if item is not None:
                out.append(item)
            elif tries > max(4 * n, 2 * len(self.dataset)):
                raise RuntimeError("too many undecodable images in a row; check the dataset")
        return out


def pil_to_tensor(images: list[Image.Image], size: int) -> torch.Tensor:
    """PIL images -> [B,3,size,size] in [-1, 1] (bicubic resize of the centre square), the VAE's input range."""
    out = []
    for im in images:
        w, h = im.size
        s = min(w, h)
        im = to_rgb(im).crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        im = im.resize((size, size), Image.BICUBIC)
        t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, 3)
        out.append(t.permute(2, 0, 1).float() / 127.5 - 1.0)
    return torch.stack(out)


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B,3,H,W] in [-1, 1] -> PIL images (rounded, clamped)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
    return [Image.fromarray(a.numpy()) for a in x]


__all__ = ["procedural_scene", "ProceduralDataset", "ImageCaptionDataset", "ResumableSampler", "SamplerState",
           "pil_to_tensor", "tensor_to_pil"]
