"""Training data: (image, caption) pairs from a folder or JSONL, procedurally generated scenes for the built-in tiny
runs, and a resumable sampler that hands every rank the same global order."""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import os
import sys
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from model.image_io import IMAGE_SUFFIXES, decode_image, load_rgb, to_rgb


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

    load = __getitem__

    def caption(self, i: int) -> str:
        return procedural_scene(i, self.size, self.seed)[1]

    def name(self, i: int) -> str:
        return f"procedural scene {i}"

    def image_size(self, i: int) -> tuple[int, int]:
        return self.size, self.size

    def fingerprint(self) -> str:
        return f"procedural n={self.n} size={self.size} seed={self.seed}"


class ImageCaptionDataset:
    """(image, caption) pairs from one of:
      - a JSONL file (`{"image": path, "caption": text}` per line, paths relative to the file);
      - a folder of images with same-named `.txt` captions;
      - a folder of JSONL manifests (`*.jsonl`, no images), read as one manifest in file-name order;
      - a folder of tar shards (`*.tar`, no images), webdataset-style: the members `key.jpg` (any image suffix) and
        `key.txt` of one key are one pair, key = the member name up to the first dot of its base name.
    Every form is indexed once when opened (tar shards: the byte offset and size of each member, read from the
    headers), so items are addressed by number and the sampler's seeded global permutation orders them: a stronger
    form of the per-worker shuffle buffer of streaming readers, with exact resume for free. A tar shard whose
    headers cannot be read keeps the members before the damage and loses the rest; a member whose data runs past
    the end of its shard (a truncated tar) is dropped; each is warned about with its name and counted in
    `damaged`. Images that fail to decode are skipped and counted when first met; captions are optional for stages
    that caption the image themselves (`need_caption=False`)."""

    def __init__(self, path: str | Path, need_caption: bool = True):
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"dataset {path} does not exist")
        self.root = path if path.is_dir() else path.parent
        self.damaged: list[str] = []
        # Tar members: (shard number, image offset, image size, caption offset, caption size (-1: none)) per item.
        self.shards: list[Path] = []
        self.members: list[tuple[int, int, int, int, int]] = []
        items: list[tuple[Path | str, str | None]] = []
        if path.is_file():
            items = _read_manifest(path)
        else:
            images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            tars, manifests = sorted(path.glob("*.tar")), sorted(path.glob("*.jsonl"))
            if images:
                for img in images:
                    txt = img.with_suffix(".txt")
                    items.append((img, txt.read_text().strip() if txt.exists() else None))
            elif tars and manifests:
                raise ValueError(f"dataset {path} holds both tar shards and JSONL manifests; put them in separate "
                                 "folders")
            elif tars:
                self.shards = tars
                for n, shard in enumerate(tars):
                    items += self._index_shard(n, shard)
            else:
                for manifest in manifests:
                    items += _read_manifest(manifest)
        if need_caption:
            missing = [str(p) for p, c in items if not c and not self.shards] + [
                str(items[k][0]) for k, m in enumerate(self.members) if m[4] < 0]
            if missing:
                raise ValueError(f"{path}: {len(missing)} image(s) have no caption, e.g. {missing[:3]}")
        if not items:
            raise ValueError(f"dataset {path} is empty (no images with suffix {IMAGE_SUFFIXES}, no *.jsonl manifest "
                             f"lines, no complete *.tar members)" + (f"; damaged: {self.damaged}" if self.damaged
                                                                     else ""))
        self.items = items
        self.skipped: set[int] = set()

    def _index_shard(self, number: int, shard: Path) -> list[tuple[str, None]]:
        """The pairs of one tar shard, in member order, as (shard:key, None); their offsets go to self.members.
        Captions are read with the image (a few hundred bytes next to it), so a 700K-pair index stays small."""
        keys: dict[str, dict[str, tuple[int, int]]] = {}
        size = shard.stat().st_size
        end = 0
        try:
            with tarfile.open(shard, "r:") as tar:
                for m in tar:
                    end = m.offset_data + m.size
                    if not m.isfile():
                        continue
                    base = m.name.rsplit("/", 1)[-1]
                    if "." not in base:
                        continue
                    key = m.name[:len(m.name) - len(base)] + base.split(".", 1)[0]
                    ext = "." + base.split(".", 1)[1].lower()
                    if m.offset_data + m.size > size:  # the file ends inside it: nothing follows
                        self._damage(f"{shard}:{m.name}: truncated member ({m.size} bytes declared, "
                                     f"{max(size - m.offset_data, 0)} present); skipped")
                        return self._pairs(number, keys)
                    keys.setdefault(key, {}).setdefault(ext, (m.offset_data, m.size))
                end = tar.offset
        except (tarfile.TarError, OSError, EOFError) as e:
            self._damage(f"{shard}: unreadable after byte {end} ({type(e).__name__}: {e}); "
                         f"{len(keys)} key(s) before it kept, the rest skipped")
        else:  # tarfile stops silently at a bad header past the first member: only zero blocks may follow the end
            with open(shard, "rb") as f:
                f.seek(end)
                if f.read().strip(b"\0"):
                    self._damage(f"{shard}: unreadable header at byte {end}; {len(keys)} key(s) before it kept, "
                                 "the rest skipped")
        return self._pairs(number, keys)

    def _pairs(self, number: int, keys: dict[str, dict[str, tuple[int, int]]]) -> list[tuple[str, None]]:
        shard = self.shards[number]
        out = []
        for key, parts in keys.items():
            image = next((parts[s] for s in IMAGE_SUFFIXES if s in parts), None)
            if image is None:
                continue
            text = parts.get(".txt", (0, -1))
            self.members.append((number, *image, *text))
            out.append((f"{shard.name}:{key}", None))  # the caption is read with the image
        return out

    def _damage(self, what: str) -> None:
        self.damaged.append(what)
        print(f"warning: dataset {what} ({len(self.damaged)} damaged so far)", file=sys.stderr, flush=True)

    def __len__(self) -> int:
        return len(self.items)

    def name(self, i: int) -> str:
        """Item `i` as warnings name it: its image file, or shard:key."""
        return str(self.items[i][0])

    def fingerprint(self) -> str:
        """A hash of every item's name relative to the dataset's root (and the tar members' offsets), in order: two
        openings of the same data agree, an edited dataset does not (the latent cache checks it)."""
        h = hashlib.sha256()
        for name, _ in self.items:
            h.update(os.path.relpath(name, self.root).encode() if isinstance(name, Path) else name.encode())
            h.update(b"\0")
        h.update(repr(self.members).encode())
        return h.hexdigest()

    def caption(self, i: int) -> str | None:
        """Item `i`'s caption, without its image (tar shards: read from the shard, next to the image)."""
        if not self.shards:
            return self.items[i][1]
        shard, _, _, text_at, text_size = self.members[i]
        if text_size < 0:
            return None
        with open(self.shards[shard], "rb") as f:
            f.seek(text_at)
            return f.read(text_size).decode("utf-8", errors="replace").strip()

    def load(self, i: int) -> tuple[Image.Image, str | None]:
        """Item `i` decoded to RGB; OSError or ValueError (naming the item) when it cannot be."""
        source = self.items[i][0]
        if not self.shards:
            return load_rgb(source), self.caption(i)
        shard, image_at, image_size, _, _ = self.members[i]
        with open(self.shards[shard], "rb") as f:
            f.seek(image_at)
            data = f.read(image_size)
        if len(data) != image_size:
            raise ValueError(f"{source}: {len(data)} of {image_size} bytes (the shard changed since it was indexed)")
        return to_rgb(decode_image(data, source)), self.caption(i)

    def image_size(self, i: int) -> tuple[int, int]:
        """(width, height) of item i as `load` returns it (EXIF orientation applied), from the header where it can."""
        source = self.items[i][0]
        if self.shards:
            shard, at, size, _, _ = self.members[i]
            with open(self.shards[shard], "rb") as f:
                f.seek(at)
                data = io.BytesIO(f.read(size))
        try:
            with Image.open(data if self.shards else source) as im:
                w, h = im.size
                return (h, w) if im.getexif().get(0x0112) in (5, 6, 7, 8) else (w, h)  # rotated a quarter turn
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
            raise ValueError(f"cannot read image {str(source)!r} ({type(e).__name__}: {e})") from None

    def note_skipped(self, i: int, reason: str) -> None:
        """Count item `i` as undecodable and warn, once per item."""
        if i not in self.skipped:
            self.skipped.add(i)
            print(f"warning: skipping undecodable image {self.name(i)} ({reason}); {len(self.skipped)} skipped so "
                  "far", file=sys.stderr, flush=True)

    def __getitem__(self, i: int) -> tuple[Image.Image, str | None] | None:
        try:
            return self.load(i)
        except (OSError, ValueError) as e:
            self.note_skipped(i, str(e))
            return None


def _read_manifest(path: Path) -> list[tuple[Path, str | None]]:
    items = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            items.append((path.parent / row["image"], row.get("caption")))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: expected a JSON object with an 'image' field ({e!r})") from None
    return items


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
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:  # a permutation of a 700K-item dataset takes tens of ms: keep two epochs'
            order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + epoch))
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
            self._orders[epoch] = order.tolist()
        return self._orders[epoch]

    def index_at(self, state: SamplerState, offset: int) -> int:
        """The dataset index `offset` places after `state` in the global order (epochs follow one another)."""
        n = len(self.dataset)
        at = state.position + offset
        return self._order(state.epoch + at // n)[at % n]

    def advanced(self, state: SamplerState, count: int) -> SamplerState:
        """The state after `count` more items from `state`, in the form next_batch leaves (the end of an epoch is
        (epoch, len), not (epoch + 1, 0)), so either way of walking saves the same checkpoint."""
        if count == 0:
            return SamplerState(state.epoch, state.position)
        n = len(self.dataset)
        last = state.position + count - 1
        return SamplerState(state.epoch + last // n, last % n + 1)

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


class ImageTensors:
    """What a worker makes of item i: (the image cropped to its centre square and resized to `size`, a [3, size,
    size] uint8 tensor (4x less to pass between processes than floats), the caption). `to_unit_range` turns a
    stack of them into pil_to_tensor's values exactly. With aspect-ratio buckets (`bucket_of[i]` indexes `buckets`,
    (width, height) pairs) the crop takes the bucket's aspect ratio and the resize its size."""

    def __init__(self, dataset, size: int, bucket_of: list[int] | None = None,
                 buckets: list[tuple[int, int]] | None = None):
        self.dataset, self.size, self.bucket_of, self.buckets = dataset, size, bucket_of, buckets

    def __call__(self, i: int) -> tuple[torch.Tensor, str | None]:
        image, caption = _load(self.dataset, i)
        if self.bucket_of is None:
            return _fit_uint8(image, self.size, self.size), caption
        return _fit_uint8(image, *self.buckets[self.bucket_of[i]]), caption

    @staticmethod
    def to_unit_range(images: torch.Tensor) -> torch.Tensor:
        return images.float() / 127.5 - 1.0


def _load(dataset, i: int):
    """Item i, raising on an undecodable one: `load` where the dataset has it, else `dataset[i]` with None meaning
    undecodable."""
    if hasattr(dataset, "load"):
        return dataset.load(i)
    item = dataset[i]
    if item is None:
        raise ValueError(f"item {i} is undecodable")
    return item


def _name(dataset, i: int) -> str:
    return dataset.name(i) if hasattr(dataset, "name") else f"item {i}"


def _note_skipped(dataset, i: int, reason: str) -> None:
    """Count item i as undecodable (the dataset's own count and warning where it keeps one), else warn."""
    if hasattr(dataset, "note_skipped"):
        dataset.note_skipped(i, reason)
    else:
        print(f"warning: skipping undecodable item {_name(dataset, i)} ({reason})", file=sys.stderr, flush=True)


class _Fetching(torch.utils.data.Dataset):
    """fetch(i) in a worker, an undecodable item returned as its reason instead of raised, so one bad file neither
    kills the worker nor stalls the others; the main process counts it."""

    def __init__(self, fetch):
        self.fetch = fetch

    def __getitem__(self, i: int):
        try:
            return i, self.fetch(i), None
        except (OSError, ValueError) as e:
            return i, None, f"{type(e).__name__}: {e}"


def _as_is(item):
    return item


class BatchLoader:
    """The sampler's batches, this rank's share of each, made by `fetch` (e.g. ImageTensors) in `workers` processes
    (0: in this process) that run up to `prefetch` global batches ahead.

    The sampler's state stays the only state: a step's batch is the first `batch_size` decodable items of the global
    order from it, as `sampler.next_batch` takes them, and the state then moves past the last one taken. Each rank
    fetches only its slice (`share`), assuming every item decodes; the ranks then sum their failure flags (one small
    all-reduce per step). If an item failed anywhere, every rank drops the failed positions, takes the next ones in
    their place and re-fetches (in this process) what its slice now holds, until no new failure, then restarts its
    workers from the new state. So the batches, their split across ranks and the saved state are those of one
    process walking the order, whatever the number of workers or ranks, and --resume continues at the next unseen
    item (the fetched-ahead ones are fetched again)."""

    def __init__(self, sampler: ResumableSampler, batch_size: int, share: slice, fetch, workers: int = 2,
                 prefetch: int = 2, device: torch.device | None = None):
        self.sampler, self.n, self.share, self.fetch = sampler, batch_size, share, fetch
        self.workers, self.prefetch, self.device = workers, prefetch, device
        self._it = None
        self._from: SamplerState | None = None  # where the running workers' index stream started
        self._taken = 0  # global batches taken from it since

    def _indices(self, start: SamplerState):
        for step in itertools.count():
            for slot in range(self.share.start, self.share.stop):
                yield self.sampler.index_at(start, step * self.n + slot)

    def _restart(self) -> None:
        self.close()
        self._from = SamplerState(**asdict(self.sampler.state))
        self._taken = 0
        per, workers = self.share.stop - self.share.start, self.workers
        self._it = iter(torch.utils.data.DataLoader(
            _Fetching(self.fetch), batch_size=None, sampler=self._indices(self._from),
            num_workers=workers, collate_fn=_as_is,
            prefetch_factor=max(2, -(-self.prefetch * per // workers)) if workers else None))

    def close(self) -> None:
        """Stop the workers (they also exit with this process)."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def _failures(self, flags: torch.Tensor) -> torch.Tensor:
        """Every rank's failure flags summed (the ranks fill disjoint slots)."""
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_world_size() > 1:
            t = flags.to(self.device or "cpu")
            dist.all_reduce(t)
            return t.cpu()
        return flags

    def next_batch(self) -> list:
        """This rank's items of the next global batch (what fetch returned for each)."""
        expected = None if self._from is None else self.sampler.advanced(self._from, self._taken * self.n)
        if self._it is None or expected != self.sampler.state:  # first call, a resume, or after a failure
            self._restart()
        start = self.sampler.state
        fetched = {}  # stream offset -> fetched item, for this rank's slots
        flags = torch.zeros(self.n, dtype=torch.int64)
        for slot in range(self.share.start, self.share.stop):
            i, item, reason = next(self._it)
            if reason is None:
                fetched[slot] = item
            else:
                _note_skipped(self.sampler.dataset, i, reason)
                flags[slot] = 1
        self._taken += 1
        failed = self._failures(flags)
        if not failed.any():
            self.sampler.state = self.sampler.advanced(start, self.n)
            return [fetched[s] for s in range(self.share.start, self.share.stop)]
        bad = {s for s in range(self.n) if failed[s]}
        limit = max(4 * self.n, 2 * len(self.sampler.dataset))
        while True:  # rare: a failed item moves the later ones up and across ranks
            offsets = [s for s in range(self.n + len(bad)) if s not in bad]
            flags = torch.zeros(self.n, dtype=torch.int64)
            for slot in range(self.share.start, self.share.stop):
                s = offsets[slot]
                if s not in fetched:
                    i = self.sampler.index_at(start, s)
                    _, item, reason = _Fetching(self.fetch)[i]
                    if reason is None:
                        fetched[s] = item
                    else:
                        _note_skipped(self.sampler.dataset, i, reason)
                        flags[slot] = 1
            failed = self._failures(flags)
            if not failed.any():
                break
            bad |= {offsets[slot] for slot in range(self.n) if failed[slot]}
            if len(bad) > limit:
                raise RuntimeError("too many undecodable images in a row; check the dataset")
        self.sampler.state = self.sampler.advanced(start, offsets[-1] + 1)
        self._from = None  # the workers fetched ahead for the old positions: restart at the next call
        return [fetched[offsets[slot]] for slot in range(self.share.start, self.share.stop)]


def pil_to_tensor(images: list[Image.Image], size: int) -> torch.Tensor:
    """PIL images -> [B,3,size,size] in [-1, 1] (bicubic resize of the centre square), the VAE's input range."""
    return ImageTensors.to_unit_range(torch.stack([_fit_uint8(im, size, size) for im in images]))


def _fit_uint8(im: Image.Image, width: int, height: int) -> torch.Tensor:
    """The centre crop of `im` with the aspect ratio width:height, resized (bicubic) to [3, height, width] uint8."""
    w, h = im.size
    if w * height > h * width:  # wider than the target: keep the full height
        cw, ch = h * width // height, h
    else:
        cw, ch = w, w * height // width
    left, top = (w - cw) // 2, (h - ch) // 2
    im = to_rgb(im).crop((left, top, left + cw, top + ch)).resize((width, height), Image.BICUBIC)
    return torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(height, width, 3).permute(2, 0, 1)


# ----------------------------------------------------------------------------------------------- aspect-ratio buckets

def auto_buckets(size: int, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """SD3 / SDXL-style buckets for `size`: (width, height) with width * height <= size^2, sides multiples of 64 (16
    below 256 px; the VAE's 8 x the DiT's patch 2), aspect ratios up to `max_ratio` either way; the square first,
    then by aspect ratio."""
    m = 64 if size >= 256 else 16
    widest: dict[int, int] = {}  # height -> the widest width that fits the area
    for w in range(m, 4 * size + 1, m):
        h = size * size // w // m * m
        if h >= m and max(w / h, h / w) <= max_ratio:
            widest[h] = max(widest.get(h, 0), w)
    found = {(w, h) for h, w in widest.items()} | {(size, size)}
    found |= {(h, w) for w, h in found}  # both orientations of each shape
    return sorted(found, key=lambda b: (b != (size, size), b[0] / b[1]))


def parse_buckets(spec: str, size: int) -> list[tuple[int, int]] | None:
    """--buckets: "" (none: square --size), "auto" (auto_buckets(size)) or "WxH,WxH,..."; ValueError names the bad
    part."""
    if not spec:
        return None
    if spec == "auto":
        return auto_buckets(size)
    out = []
    for part in spec.split(","):
        try:
            w, h = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise ValueError(f"--buckets: {part!r} is not WIDTHxHEIGHT") from None
        if w < 16 or h < 16 or w % 16 or h % 16:
            raise ValueError(f"--buckets: {part!r}: sides must be positive multiples of 16 (VAE 8 x DiT patch 2)")
        out.append((w, h))
    return out


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> int:
    """The bucket whose aspect ratio is closest to width:height in log scale (the first of a tie)."""
    r = math.log(width / height)
    return min(range(len(buckets)), key=lambda k: abs(math.log(buckets[k][0] / buckets[k][1]) - r))


class _BucketOf:
    """A worker's bucket of item i from its size (the header: no full decode for files)."""

    def __init__(self, dataset, buckets):
        self.dataset, self.buckets = dataset, buckets

    def __call__(self, i: int) -> int:
        ds = self.dataset
        size = ds.image_size(i) if hasattr(ds, "image_size") else _load(ds, i)[0].size
        return nearest_bucket(*size, self.buckets)


def assign_buckets(dataset, buckets: list[tuple[int, int]], rank: int = 0, world: int = 1,
                   workers: int = 0) -> list[int]:
    """The bucket of every item (-1: its image cannot be read; it is skipped and counted), from one pass over the
    image headers split across the ranks (every rank gets the whole list)."""
    import torch.distributed as dist

    my_items = list(range(rank, len(dataset), world))
    loader = torch.utils.data.DataLoader(_Fetching(_BucketOf(dataset, buckets)), batch_size=None, sampler=my_items,
                                         num_workers=workers, collate_fn=_as_is)
    found = {}
    for i, bucket, reason in loader:
        found[i] = -1 if reason is not None else bucket
        if reason is not None:
            _note_skipped(dataset, i, reason)
    parts = [found]
    if dist.is_initialized() and world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, found)
    merged = {i: b for part in parts for i, b in part.items()}
    return [merged[i] for i in range(len(dataset))]


class _Subset:
    """Items `indices` of a dataset numbered 0..n-1 (one bucket's items, for its own sampler)."""

    def __init__(self, dataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def name(self, j: int) -> str:
        return _name(self.dataset, self.indices[j])

    def note_skipped(self, j: int, reason: str) -> None:
        _note_skipped(self.dataset, self.indices[j], reason)

    def load(self, j: int):
        return _load(self.dataset, self.indices[j])

    def __getitem__(self, j: int):
        try:
            return self.load(j)
        except (OSError, ValueError) as e:
            self.note_skipped(j, str(e))
            return None


class _SubsetFetch:
    def __init__(self, fetch, indices: list[int]):
        self.fetch, self.indices = fetch, indices

    def __call__(self, j: int):
        return self.fetch(self.indices[j])


class BucketSampler:
    """Aspect-ratio buckets: a ResumableSampler per bucket over its items, and the bucket of the k-th global batch
    drawn from (seed, k) with probability proportional to the bucket's number of items, so each item comes up at the
    same rate whatever its bucket. The state (`state_dict`) is the number of batches taken and each bucket's
    (epoch, position); it resumes exactly, and a global batch never mixes buckets."""

    def __init__(self, dataset, bucket_of: list[int], n_buckets: int, seed: int):
        self.dataset, self.seed = dataset, seed
        self.members = [[i for i, b in enumerate(bucket_of) if b == k] for k in range(n_buckets)]
        if not any(self.members):
            raise ValueError("no item of the dataset fits a bucket (every image is unreadable)")
        self.samplers = {k: ResumableSampler(_Subset(dataset, m), seed=seed + 7919 * (k + 1))
                         for k, m in enumerate(self.members) if m}
        self.weights = torch.tensor([float(len(m)) for m in self.members], dtype=torch.float64)
        self.batches = 0

    def bucket(self, k: int) -> int:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
        return int(torch.multinomial(self.weights, 1, generator=g))

    def state_dict(self) -> dict:
        return {"batches": self.batches, "buckets": {str(k): asdict(s.state) for k, s in self.samplers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.batches = state["batches"]
        for k, s in state["buckets"].items():
            self.samplers[int(k)].state = SamplerState(**s)


class BucketLoader:
    """BatchLoader over buckets: next_batch() -> (bucket, this rank's items of the next global batch), each bucket's
    batches fetched ahead by its own workers (`workers` shared out over the buckets, at least one each when > 0)."""

    def __init__(self, sampler: BucketSampler, batch_size: int, share: slice, fetch, workers: int = 2,
                 prefetch: int = 2, device: torch.device | None = None):
        self.sampler = sampler
        each = -(-workers // len(sampler.samplers)) if workers else 0
        self.loaders = {k: BatchLoader(s, batch_size, share, _SubsetFetch(fetch, sampler.members[k]), workers=each,
                                       prefetch=prefetch, device=device) for k, s in sampler.samplers.items()}

    def next_batch(self) -> tuple[int, list]:
        k = self.sampler.bucket(self.sampler.batches)
        items = self.loaders[k].next_batch()
        self.sampler.batches += 1
        return k, items

    def close(self) -> None:
        for loader in self.loaders.values():
            loader.close()


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B,3,H,W] in [-1, 1] -> PIL images (rounded, clamped)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
    return [Image.fromarray(a.numpy()) for a in x]


__all__ = ["procedural_scene", "ProceduralDataset", "ImageCaptionDataset", "ResumableSampler", "SamplerState",
           "BatchLoader", "ImageTensors", "BucketSampler", "BucketLoader", "auto_buckets", "parse_buckets",
           "nearest_bucket", "assign_buckets", "pil_to_tensor", "tensor_to_pil"]
