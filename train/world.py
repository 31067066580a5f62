"""A procedural world with exact ground truth: scenes of 1-3 coloured shapes in the cells of a 3x3 grid on a plain
background, their renders, captions at five detail levels, a parser that reads those captions back, and scores that
compare a caption (fact precision / recall against the scene) or an image (colour checks per grid cell, a GenEval in
miniature) with the scene. On this world the paper's claims (a longer, more detailed caption reconstructs better;
RL on reconstruction similarity makes captions more complete) can be measured exactly, on a CPU.

Detail levels of `describe` (each adds facts to the previous one; listing objects states their count):
    0  a gray background.
    1  two objects on a gray background.
    2  a red object and an orange object on a gray background.
    3  a red circle and an orange square on a gray background.
    4  a large red circle at the top left and a small orange square in the center on a gray background.

Held-out scenes are fixed by a hash of the scene itself, not by the seed, so no seed's train split ever holds a scene
of any seed's held-out split.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from model.image_io import to_rgb

# Object colours lie >= 99 apart in RGB and >= 110 from every background: a pixel's nearest palette colour names it.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220),
    "yellow": (235, 225, 25), "purple": (150, 40, 190), "orange": (245, 125, 15)}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245), "gray": (128, 128, 128), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
LEVELS = 5
MAX_OBJECTS = 3

# Side of a shape as a fraction of its grid cell's side.
_EXTENT = {"small": 0.45, "large": 0.8}
_SUPERSAMPLE = 4
# One scene in ten is held out; the hash of its canonical form decides which.
_HELDOUT_EVERY = 10
# attribute_accuracy: a pixel shows a palette colour when that colour is its nearest and lies within this distance;
# an object passes when that many of its cell's pixels show its colour (a small triangle at 32 px covers ~9% of its
# cell, ~5% with the anti-aliased rim excluded), the background when it fills half the cells without objects.
_MATCH_DISTANCE = 60.0
_OBJECT_MIN_FRACTION = 0.03
_BACKGROUND_MIN_FRACTION = 0.5

_COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
_POSITION_PHRASES = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right"}


@dataclass(frozen=True)
class WorldObject:
    shape: str
    colour: str
    size: str
    position: str

    def __post_init__(self):
        for name, value, allowed in (("shape", self.shape, SHAPES), ("colour", self.colour, tuple(COLOURS)),
                                     ("size", self.size, SIZES), ("position", self.position, POSITIONS)):
            if value not in allowed:
                raise ValueError(f"WorldObject.{name} must be one of {allowed}, got {value!r}")


@dataclass(frozen=True)
class Scene:
    """A background and 1-3 objects in distinct cells. Objects are kept in reading order of their cells, so two
    scenes with the same content compare (and hash) equal whatever order they were given in."""
    background: str
    objects: tuple[WorldObject, ...]

    def __post_init__(self):
        if self.background not in BACKGROUNDS:
            raise ValueError(f"Scene.background must be one of {tuple(BACKGROUNDS)}, got {self.background!r}")
        objects = tuple(self.objects)
        if not all(isinstance(o, WorldObject) for o in objects):
            raise ValueError(f"Scene.objects must be WorldObjects, got {objects!r}")
        if not 1 <= len(objects) <= MAX_OBJECTS:
            raise ValueError(f"Scene.objects must hold 1..{MAX_OBJECTS} objects, got {len(objects)}")
        if len({o.position for o in objects}) != len(objects):
            raise ValueError(f"Scene.objects must sit in distinct positions, got {[o.position for o in objects]}")
        object.__setattr__(self, "objects", tuple(sorted(objects, key=lambda o: POSITIONS.index(o.position))))


def sample_scene(rng: random.Random, max_objects: int = MAX_OBJECTS) -> Scene:
    """A scene with a uniform number of objects in 1..max_objects, each attribute uniform, positions distinct."""
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"max_objects must be in 1..{MAX_OBJECTS}, got {max_objects}")
    background = rng.choice(tuple(BACKGROUNDS))
    positions = rng.sample(POSITIONS, rng.randint(1, max_objects))
    return Scene(background, tuple(WorldObject(rng.choice(SHAPES), rng.choice(tuple(COLOURS)), rng.choice(SIZES), p)
                                   for p in positions))


def is_heldout(scene: Scene) -> bool:
    """Whether the scene belongs to the held-out split (for every seed): a hash of its canonical form decides."""
    canonical = scene.background + "|" + ";".join(f"{o.shape},{o.colour},{o.size},{o.position}"
                                                  for o in scene.objects)
    digest = hashlib.blake2b(canonical.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % _HELDOUT_EVERY == 0


def scenes(split: str, n: int, seed: int) -> list[Scene]:
    """`n` distinct scenes of the split, drawn from the split's own seeded stream; the same (split, n, seed) gives
    the same list, and a larger `n` extends a smaller one."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    # Past ~1e5 the distinct held-out scenes with few objects run out and the draw slows; far more than any use here.
    if not 0 <= n <= 100_000:
        raise ValueError(f"n (number of scenes) must be in 0..100000, got {n}")
    rng = random.Random(f"{split}:{seed}")
    want_heldout = split == "heldout"
    out: list[Scene] = []
    seen: set[Scene] = set()
    while len(out) < n:
        scene = sample_scene(rng)
        if is_heldout(scene) == want_heldout and scene not in seen:
            seen.add(scene)
            out.append(scene)
    return out


def _cell(position: str) -> tuple[int, int]:
    """(row, column) of a position's grid cell."""
    return divmod(POSITIONS.index(position), 3)


def render(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as a size x size RGB image. Drawn at 4x and box-filtered down: edges are smooth, while a pixel
    whose 4x4 block lies inside a shape keeps the shape's exact colour."""
    if size < 3:
        raise ValueError(f"render size must be >= 3 (one pixel per grid cell), got {size}")
    big = size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    cell = big / 3
    for o in scene.objects:
        row, col = _cell(o.position)
        cx, cy, half = (col + 0.5) * cell, (row + 0.5) * cell, _EXTENT[o.size] * cell / 2
        x0, y0, x1, y1 = (round(v) for v in (cx - half, cy - half, cx + half, cy + half))
        colour = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=colour)
        elif o.shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=colour)
        else:
            draw.polygon([(round(cx), y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=colour)
    return img.resize((size, size), Image.BOX)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def describe(scene: Scene, level: int) -> str:
    """The scene's caption at a detail level 0..4 (see the module docstring); objects in reading order."""
    if level not in range(LEVELS):
        raise ValueError(f"caption level must be in 0..{LEVELS - 1}, got {level!r}")
    background = f"{scene.background} background."
    if level == 0:
        return f"{_article(scene.background)} {background}"
    n = len(scene.objects)
    if level == 1:
        return f"{_COUNT_WORDS[n]} object{'s' if n > 1 else ''} on a {background}"
    parts = []
    for o in scene.objects:
        words = ([o.size] if level >= 4 else []) + [o.colour, o.shape if level >= 3 else "object"]
        part = f"{_article(words[0])} {' '.join(words)}"
        parts.append(part + f" {_POSITION_PHRASES[o.position]}" if level >= 4 else part)
    return f"{_join(parts)} on a {background}"


# The object colours named with the article "a" (all but orange): after "an" a caption has given the colour away.
A_COLOURS = tuple(c for c in COLOURS if _article(c) == "a")


def colour_cues(scene: Scene) -> list[tuple[str, str]]:
    """Where a captioner must look at an object to go on: for each object whose colour is in A_COLOURS, its level-2
    caption up to that colour word ("a red object and a" for the second object of "a red object and a blue object on
    a gray background.") and the colour. Objects of an "an" colour are left out: the article names them."""
    caption, cues, start = describe(scene, 2), [], 0
    for o in scene.objects:
        at = caption.index(f" {o.colour} object", start)
        start = at + 1
        if o.colour in A_COLOURS:
            cues.append((caption[:at], o.colour))
    return cues


@dataclass(frozen=True)
class ParsedObject:
    """An object a caption mentions; None for each attribute it does not state."""
    shape: str | None = None
    colour: str | None = None
    size: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class Parsed:
    """What a caption states: the background colour, the number of objects it mentions (None when it mentions none),
    and each mentioned object (a count word makes that many: "two objects" is two objects without attributes)."""
    background: str | None = None
    count: int | None = None
    objects: list[ParsedObject] = field(default_factory=list)


_ATTRIBUTES = ("shape", "colour", "size", "position")
_COLOUR_WORDS = {**{c: c for c in (*COLOURS, *BACKGROUNDS)}, "grey": "gray"}
_SIZE_WORDS = {"small": "small", "large": "large", "big": "large", "tiny": "small", "little": "small"}
_NOUNS = {**{s: s for s in SHAPES}, **{s + "s": s for s in SHAPES},
          **{w: None for w in ("object", "objects", "shape", "shapes", "thing", "things", "item", "items")}}
_NUMBERS = {w: i for i, w in enumerate(("one", "two", "three", "four", "five", "six", "seven", "eight", "nine"), 1)}
_NUMBERS |= {str(i): i for i in range(1, 10)}
_VERTICAL = {"top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom"}
_HORIZONTAL = {"left": "left", "right": "right"}
_CENTRE = {"center", "centre", "middle", "central"}
# Words and marks that end one object's phrase: position words after them belong to the next object.
_SEPARATORS = {"and", "with", ",", ".", ";"}
_TOKEN = re.compile(r"[a-z]+|[0-9]|[,.;]")


def _position(words: list[str]) -> str | None:
    """A grid cell from position words: the first vertical and first horizontal word, else a centre word."""
    vertical = next((_VERTICAL[w] for w in words if w in _VERTICAL), None)
    horizontal = next((_HORIZONTAL[w] for w in words if w in _HORIZONTAL), None)
    if vertical or horizontal:
        return " ".join(w for w in (vertical, horizontal) if w)
    return "center" if any(w in _CENTRE for w in words) else None


def parse(text: str) -> Parsed:
    """Read a caption into the facts it states. Never raises: words outside the world's vocabulary, attributes with
    no object noun after them and anything that is not text are ignored. Attributes before a noun (size, colour,
    count) and position words after it (up to the next separator or attribute) belong to that noun's object; the
    first "<colour> background" is the background."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if not isinstance(text, str):
        return Parsed()
    tokens = _TOKEN.findall(text.lower())
    background = None
    objects: list[dict] = []
    pending: dict = {"where": []}
    open_objects: list[dict] = []  # the last noun's objects, still taking position words
    skip = False
    for tok, nxt in itertools.zip_longest(tokens, tokens[1:]):
        if skip:
            skip = False
        elif tok in _COLOUR_WORDS and nxt == "background":
            background = background or _COLOUR_WORDS[tok]
            skip = True
        elif tok in _SIZE_WORDS:
            pending["size"], open_objects = _SIZE_WORDS[tok], []
        elif tok in _COLOUR_WORDS:
            pending["colour"], open_objects = _COLOUR_WORDS[tok], []
        elif tok in _NUMBERS:
            pending["number"], open_objects = _NUMBERS[tok], []
        elif tok in _NOUNS:
            open_objects = [{"shape": _NOUNS[tok], "colour": pending.get("colour"), "size": pending.get("size"),
                             "where": list(pending["where"])} for _ in range(pending.get("number", 1))]
            objects += open_objects
            pending = {"where": []}
        elif tok in _VERTICAL or tok in _HORIZONTAL or tok in _CENTRE:
            for o in open_objects or [pending]:
                o["where"].append(tok)
        elif tok in _SEPARATORS:
            open_objects = []
            pending.pop("number", None)
    parsed = [ParsedObject(o["shape"], o["colour"], o["size"], _position(o["where"])) for o in objects]
    return Parsed(background, len(parsed) or None, parsed)


def _matches(stated: ParsedObject, true: WorldObject) -> int:
    return sum(getattr(stated, a) is not None and getattr(stated, a) == getattr(true, a) for a in _ATTRIBUTES)


def _best_matching(stated: list[ParsedObject], true: tuple[WorldObject, ...]) -> int:
    """Most correct attribute facts over one-to-one matchings of stated to true objects. Some best matching pairs
    each true object with one of its len(true) best-scoring stated objects (any other partner can be swapped for a
    free one of those, at no loss), so only those are tried: a long caption costs no more than a short one."""
    score = [[_matches(s, t) for s in stated] for t in true]
    options = [sorted(range(len(stated)), key=lambda i: -row[i])[:len(true)] + [None] for row in score]
    best = 0
    for choice in itertools.product(*options):
        picked = [i for i in choice if i is not None]
        if len(picked) == len(set(picked)):
            best = max(best, sum(score[t][i] for t, i in enumerate(choice) if i is not None))
    return best


def score_caption(text: str, scene: Scene) -> dict:
    """Fact precision / recall of a caption against the scene. Facts: the background, the object count (when the
    caption mentions objects) and each attribute of each mentioned object; the scene's facts are those of its full
    description (background, count, four per object). Mentioned objects are matched to the scene's by the one-to-one
    assignment with the most correct attributes; the attributes of unmatched mentions are stated and wrong."""
    p = parse(text)
    stated = (p.background is not None) + (p.count is not None) + sum(
        getattr(o, a) is not None for o in p.objects for a in _ATTRIBUTES)
    correct = (p.background == scene.background) + (p.count == len(scene.objects)) + _best_matching(
        p.objects, scene.objects)
    true = 2 + len(_ATTRIBUTES) * len(scene.objects)
    precision = correct / stated if stated else 0.0
    recall = correct / true
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "stated": stated, "correct": correct, "true": true}


_PALETTE_NAMES = (*COLOURS, *BACKGROUNDS)
_PALETTE = np.array([*COLOURS.values(), *BACKGROUNDS.values()], dtype=np.float32)


def attribute_accuracy(image: Image.Image, scene: Scene) -> float:
    """Fraction of pixel checks an image passes against the scene: per object, its colour shows in its grid cell;
    and the background colour fills the cells without objects. Each pixel is labelled with its nearest palette
    colour when that lies within `_MATCH_DISTANCE`, so a shifted shade still counts, a mixed edge pixel does not."""
    rgb = np.asarray(to_rgb(image), dtype=np.float32)
    h, w = rgb.shape[:2]
    if h < 3 or w < 3:
        raise ValueError(f"attribute_accuracy needs an image of at least 3x3 pixels, got {w}x{h}")
    dist = np.linalg.norm(rgb[:, :, None, :] - _PALETTE, axis=-1)
    labels = np.where(dist.min(-1) <= _MATCH_DISTANCE, dist.argmin(-1), -1)

    def cell(position: str) -> np.ndarray:
        row, col = _cell(position)
        return labels[round(h * row / 3):round(h * (row + 1) / 3), round(w * col / 3):round(w * (col + 1) / 3)]

    passed = sum(float((cell(o.position) == _PALETTE_NAMES.index(o.colour)).mean()) >= _OBJECT_MIN_FRACTION
                 for o in scene.objects)
    occupied = {o.position for o in scene.objects}
    empty = np.concatenate([cell(p).ravel() for p in POSITIONS if p not in occupied])
    passed += float((empty == _PALETTE_NAMES.index(scene.background)).mean()) >= _BACKGROUND_MIN_FRACTION
    return passed / (len(scene.objects) + 1)


def corpus() -> list[str]:
    """Sentences that use every word form of the world's captions: every single-object scene at level 4 (each
    colour, shape, size, position and background), and seeded scenes of 1-3 objects at every level (count words,
    plurals, articles, lists)."""
    out = [describe(Scene(bg, (WorldObject(shape, colour, size, pos),)), 4)
           for bg, colour, shape, size, pos in itertools.product(BACKGROUNDS, COLOURS, SHAPES, SIZES, POSITIONS)]
    rng = random.Random("corpus")
    for _ in range(300):
        scene = sample_scene(rng)
        out += [describe(scene, level) for level in range(LEVELS)]
    return out


def echo_text(caption: str) -> str:
    """`caption` with every word written twice ("a a small small red red circle circle ..."): predicting each
    second copy needs the word just read, so an LM trained on these texts keeps each word in its hidden state at that
    position, which is where the decoder reads a caption (train/sft_captioner.py --text-data)."""
    return " ".join(f"{word} {word}" for word in caption.split())


def write_echo_texts(path: str | Path, scenes: list[Scene]) -> Path:
    """path: a JSONL of {"text": echo_text(full-detail caption)} per scene, as train/sft_captioner.py --text-data
    reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_lines(path, [json.dumps({"text": echo_text(describe(scene, LEVELS - 1))}) for scene in scenes])
    return path


def _levels(levels: int | Sequence[int] | str) -> tuple[int, ...]:
    """Caption levels to draw from: an int, a sequence of ints, "mix" (all levels) or a comma list such as "2,4"."""
    if isinstance(levels, str):
        text = levels.strip()
        if text == "mix":
            return tuple(range(LEVELS))
        try:
            levels = [int(v) for v in text.split(",")]
        except ValueError:
            raise ValueError(f"levels must be 'mix' or comma-separated ints in 0..{LEVELS - 1}, "
                             f"got {text!r}") from None
    elif isinstance(levels, int):
        levels = [levels]
    out = tuple(levels)
    if not out or any(not isinstance(v, int) or v not in range(LEVELS) for v in out):
        raise ValueError(f"levels must be a non-empty list of ints in 0..{LEVELS - 1}, got {levels!r}")
    return out


def _write_lines(path: Path, lines: list[str]) -> None:
    """Write through a temporary file and rename, so a reader never sees a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, path)


def write_split(folder: str | Path, scenes: list[Scene], size: int, levels: int | Sequence[int] | str,
                seed: int) -> Path:
    """Render every scene to folder/images/NNNNNN.png and caption it at a level drawn uniformly from `levels` by a
    `seed`ed RNG; write folder/data.jsonl ({"image", "caption", "level"} per line, paths relative to it, as
    `train.data.ImageCaptionDataset` reads) and folder/scenes.jsonl (the ground truth, line for line). Returns the
    data.jsonl path. Existing files of the same names are replaced."""
    choices = _levels(levels)
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows, truth = [], []
    for i, scene in enumerate(scenes):
        image = f"images/{i:06d}.png"
        render(scene, size).save(folder / image)
        level = rng.choice(choices)
        rows.append(json.dumps({"image": image, "caption": describe(scene, level), "level": level}))
        truth.append(json.dumps(asdict(scene)))
    _write_lines(folder / "scenes.jsonl", truth)
    _write_lines(folder / "data.jsonl", rows)
    return folder / "data.jsonl"


def read_scenes(folder: str | Path) -> list[Scene]:
    """The ground-truth scenes `write_split` wrote to folder/scenes.jsonl, in image order."""
    path = Path(folder) / "scenes.jsonl"
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
            out.append(Scene(row["background"], tuple(WorldObject(**o) for o in row["objects"])))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}:{n}: not a scene ({e})") from None
    return out


__all__ = ["COLOURS", "BACKGROUNDS", "SHAPES", "SIZES", "POSITIONS", "LEVELS", "MAX_OBJECTS", "WorldObject", "Scene",
           "ParsedObject", "Parsed", "sample_scene", "is_heldout", "scenes", "render", "describe", "parse",
           "A_COLOURS", "colour_cues", "score_caption", "attribute_accuracy", "corpus", "echo_text", "write_echo_texts",
           "write_split", "read_scenes"]
