"""train/world.py: the procedural world (scenes, splits, renders, captions, parser, caption and image scores)."""
import itertools
import json
import random

import numpy as np
import pytest
from PIL import Image

from train.data import ImageCaptionDataset
from train.world import (BACKGROUNDS, COLOURS, LEVELS, POSITIONS, SHAPES, SIZES, ParsedObject, Scene, WorldObject,
                         A_COLOURS, _best_matching, attribute_accuracy, colour_cues, corpus, describe, echo_text,
                         is_heldout, parse, read_scenes, render, sample_scene, scenes, score_caption,
                         write_echo_texts, write_split)

TWO = Scene("gray", (WorldObject("square", "orange", "small", "center"),
                     WorldObject("circle", "red", "large", "top left")))


def test_scene_is_canonical_and_validated():
    a, b = TWO.objects
    assert [o.position for o in TWO.objects] == ["top left", "center"]
    assert Scene("gray", (b, a)) == Scene("gray", [a, b]) and len({Scene("gray", (a, b)), Scene("gray", (b, a))}) == 1
    with pytest.raises(ValueError, match="distinct positions"):
        Scene("gray", (a, a))
    with pytest.raises(ValueError, match="1..3 objects"):
        Scene("gray", ())
    with pytest.raises(ValueError, match="background.*'red'"):
        Scene("red", (a,))
    with pytest.raises(ValueError, match="colour.*'pink'"):
        WorldObject("circle", "pink", "small", "top")
    with pytest.raises(ValueError, match="max_objects"):
        sample_scene(random.Random(0), max_objects=4)


def test_scenes_are_deterministic_distinct_and_seeded():
    train = scenes("train", 200, seed=0)
    assert train == scenes("train", 200, seed=0) and train[:50] == scenes("train", 50, seed=0)
    assert len(set(train)) == 200 and train != scenes("train", 200, seed=1)
    assert {len(s.objects) for s in train} == {1, 2, 3}
    assert len({s.background for s in train}) == len(BACKGROUNDS)
    with pytest.raises(ValueError, match="'test'"):
        scenes("test", 5, seed=0)


def test_heldout_split_never_meets_any_train_split():
    heldout = {s for seed in (0, 1) for s in scenes("heldout", 300, seed)}
    train = {s for seed in (0, 1, 2) for s in scenes("train", 2000, seed)}
    assert len(heldout) > 300 and heldout.isdisjoint(train)
    assert all(is_heldout(s) for s in heldout) and not any(is_heldout(s) for s in train)
    # the hash holds out about one scene in ten of the stream both splits sample from
    drawn = [sample_scene(random.Random(i)) for i in range(3000)]
    assert 0.06 < sum(map(is_heldout, drawn)) / len(drawn) < 0.14


def test_render_is_deterministic_with_exact_interiors():
    img = render(TWO, 64)
    assert img.mode == "RGB" and img.size == (64, 64) and img.tobytes() == render(TWO, 64).tobytes()
    px = np.asarray(img)
    assert tuple(px[0, 63]) == BACKGROUNDS["gray"]
    assert tuple(px[10, 10]) == COLOURS["red"] and tuple(px[32, 32]) == COLOURS["orange"]
    # the small square (0.45 of a 21-pixel cell) leaves the cell's rim as background; anti-aliased edges exist
    assert tuple(px[32, 24]) == BACKGROUNDS["gray"]
    assert len({tuple(p) for p in px.reshape(-1, 3)}) > 3
    with pytest.raises(ValueError, match="render size"):
        render(TWO, 2)


def test_describe_levels():
    assert [describe(TWO, level) for level in range(LEVELS)] == [
        "a gray background.",
        "two objects on a gray background.",
        "a red object and an orange object on a gray background.",
        "a red circle and an orange square on a gray background.",
        "a large red circle at the top left and a small orange square in the center on a gray background."]
    three = Scene("white", (WorldObject("triangle", "blue", "small", "left"),
                            WorldObject("circle", "yellow", "large", "bottom"),
                            WorldObject("square", "green", "small", "top right")))
    assert describe(three, 4) == ("a small green square at the top right, a small blue triangle on the left and "
                                  "a large yellow circle at the bottom on a white background.")
    assert describe(Scene("black", three.objects[:1]), 1) == "one object on a black background."
    for level in (-1, 5):
        with pytest.raises(ValueError, match="caption level"):
            describe(TWO, level)


def test_colour_cues_stop_where_an_objects_colour_is_named():
    three = Scene("gray", (WorldObject("circle", "red", "large", "top left"),
                           WorldObject("square", "orange", "small", "center"),
                           WorldObject("circle", "red", "small", "bottom right")))
    # "a red object, an orange object and a red object on a gray background.": orange is given away by "an"
    assert colour_cues(three) == [("a", "red"), ("a red object, an orange object and a", "red")]
    assert set(A_COLOURS) == set(COLOURS) - {"orange"}
    for scene in scenes("train", 200, seed=5):
        cues = colour_cues(scene)
        assert [c for _, c in cues] == [o.colour for o in scene.objects if o.colour != "orange"]
        for prefix, colour in cues:
            assert describe(scene, 2).startswith(f"{prefix} {colour} object") and prefix.split()[-1] == "a"


def test_parse_reads_every_level_exactly():
    for scene in scenes("train", 300, seed=4):
        full = [ParsedObject(o.shape, o.colour, o.size, o.position) for o in scene.objects]
        n = len(scene.objects)
        expected = [[], [ParsedObject()] * n, [ParsedObject(colour=o.colour) for o in full],
                    [ParsedObject(o.shape, o.colour) for o in full], full]
        for level in range(LEVELS):
            p = parse(describe(scene, level))
            assert p.background == scene.background and p.objects == expected[level]
            assert p.count == (n if level else None)


def test_parse_tolerates_reasonable_variation():
    expected = parse(describe(TWO, 4))
    for text in ["A  Large RED circle at the TOP LEFT and a small orange square at the centre on a grey background",
                 "a large red circle in the top-left, an small orange square in the middle, gray background",
                 "On a gray background: a large red circle (top left) and a small orange square in the center."]:
        assert parse(text) == expected, text
    assert parse("two red circles on the left").objects == [ParsedObject("circle", "red", None, "left")] * 2


@pytest.mark.parametrize("text", ["", "   ", ".", b"\xff\xfe\x00garbage\x80", "\x00\ud800",
                                  "一个红色的圆圈在左上角", "ein roter Kreis oben links", None, 42, "red " * 3000,
                                  "9 9 9 objects"])
def test_parse_never_raises(text):
    p = parse(text)
    assert p.count is None or p.count == len(p.objects) >= 1


def test_parse_survives_token_salad():
    rng = random.Random(0)
    words = " ".join(corpus()[::50]).split() + ["the", "of", "xyz", ",", "9", "background", "and"]
    for _ in range(200):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(0, 60)))
        p = parse(text)
        result = score_caption(text, TWO)
        assert p.count is None or p.count == len(p.objects)
        assert 0 <= result["correct"] <= min(result["stated"], result["true"])


def test_score_caption_exact_values():
    def check(text, stated, correct):
        r = score_caption(text, TWO)
        p, rec = (correct / stated if stated else 0.0), correct / 10
        assert (r["stated"], r["correct"], r["true"]) == (stated, correct, 10), text
        assert r["precision"] == pytest.approx(p) and r["recall"] == pytest.approx(rec)
        assert r["f1"] == pytest.approx(2 * p * rec / (p + rec) if p + rec else 0.0)

    check(describe(TWO, 4), 10, 10)
    check("a small orange square in the center and a large red circle at the top left on a gray background.", 10, 10)
    check("a red circle on a gray background.", 4, 3)  # one object stated: its count is wrong
    check(describe(TWO, 4).replace("red", "blue"), 10, 9)
    check(describe(TWO, 4).replace(" on a", " and a small green triangle at the bottom on a"), 14, 9)
    check("", 0, 0)
    check(b"\xff\xfe\x00\x80\x81 garbage \xc3\x28", 0, 0)
    # 769 whole repeats (13 characters each) in 10,000: one count fact and two per circle; one circle is right
    check(("a red circle " * 1000)[:10_000], 1 + 2 * 769, 2)


def test_score_caption_takes_the_best_assignment_not_the_first():
    scene = Scene("gray", (WorldObject("circle", "red", "large", "top left"),
                           WorldObject("square", "red", "small", "center")))
    # in order, "a red object" would take the circle (1 fact) and leave "a red circle" 1; swapped both score fully
    r = score_caption("a red object and a red circle on a gray background.", scene)
    assert (r["stated"], r["correct"], r["precision"]) == (5, 5, 1.0)


def test_best_matching_equals_brute_force():
    rng = random.Random(1)

    def random_stated():
        return ParsedObject(*(rng.choice([None, *values]) for values in (SHAPES, COLOURS, SIZES, POSITIONS)))

    for _ in range(300):
        true = sample_scene(rng).objects
        stated = [random_stated() for _ in range(rng.randint(0, 5))]
        pairs = [[sum(getattr(s, a) is not None and getattr(s, a) == getattr(t, a)
                      for a in ("shape", "colour", "size", "position")) for s in stated] for t in true]
        slots = list(range(len(stated))) + [None] * len(true)
        brute = max(sum(pairs[t][i] for t, i in enumerate(perm) if i is not None)
                    for perm in itertools.permutations(slots, len(true)))
        assert _best_matching(stated, true) == brute


def test_recall_rises_with_level_at_full_precision():
    for scene in scenes("heldout", 40, seed=0):
        results = [score_caption(describe(scene, level), scene) for level in range(LEVELS)]
        assert all(r["precision"] == 1.0 for r in results)
        recalls = [r["recall"] for r in results]
        assert recalls == sorted(set(recalls)) and recalls[-1] == 1.0


def test_attribute_accuracy():
    pool = scenes("train", 60, seed=2)
    for scene in pool:
        for size in (32, 64):
            assert attribute_accuracy(render(scene, size), scene) == 1.0, (scene, size)
    wrong = [attribute_accuracy(render(other), scene) for scene, other in zip(pool, pool[1:])]
    assert np.mean(wrong) < 0.5
    # the background alone passes only its own check; a blank image of another colour passes none
    assert attribute_accuracy(Image.new("RGB", (64, 64), BACKGROUNDS["gray"]), TWO) == pytest.approx(1 / 3)
    assert attribute_accuracy(Image.new("RGB", (64, 64), BACKGROUNDS["white"]), TWO) == 0.0
    moved = Scene("gray", (WorldObject("circle", "red", "large", "bottom right"),
                           WorldObject("square", "orange", "small", "center")))
    assert attribute_accuracy(render(moved), TWO) == pytest.approx(2 / 3)  # red moved away; orange, background kept
    shifted = np.clip(np.asarray(render(TWO), dtype=np.int16) + 25, 0, 255).astype(np.uint8)
    assert attribute_accuracy(Image.fromarray(shifted).convert("RGBA"), TWO) == 1.0


def test_corpus_covers_every_caption_word():
    words = {w for line in corpus() for w in line.replace(",", " ").replace(".", " ").split()}
    used = {w for scene in scenes("heldout", 200, seed=9) for level in range(LEVELS)
            for w in describe(scene, level).replace(",", " ").replace(".", " ").split()}
    assert used <= words
    assert {*COLOURS, *BACKGROUNDS, *SHAPES, *SIZES, "one", "two", "three", "objects", "an"} <= words
    assert all(w.islower() and w.isalpha() for w in words)
    assert corpus() == corpus()


def test_write_split_is_readable_and_seeded(tmp_path):
    pool = scenes("train", 12, seed=0)
    path = write_split(tmp_path / "a", pool, size=32, levels=[1, 4], seed=3)
    ds = ImageCaptionDataset(path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(ds) == 12 and read_scenes(tmp_path / "a") == pool
    for i, (scene, row) in enumerate(zip(pool, rows)):
        image, caption = ds[i]
        assert image.tobytes() == render(scene, 32).tobytes() and caption == describe(scene, row["level"])
    assert {r["level"] for r in rows} == {1, 4}
    same = write_split(tmp_path / "b", pool, size=32, levels=[1, 4], seed=3)
    other = write_split(tmp_path / "c", pool, size=32, levels=[1, 4], seed=4)
    assert same.read_text() == path.read_text() and other.read_text() != path.read_text()
    def levels(folder, choice):
        return {json.loads(line)["level"] for line in write_split(folder, pool, 32, choice, 0).read_text().splitlines()}

    assert levels(tmp_path / "d", 2) == {2} and levels(tmp_path / "e", "mix") == {0, 1, 2, 3, 4}
    assert levels(tmp_path / "g", "0, 3") == {0, 3}
    for bad in ([], [5], "4,x", "all"):
        with pytest.raises(ValueError, match="levels"):
            write_split(tmp_path / "f", pool, 32, bad, 0)


def test_echo_texts_write_every_word_twice(tmp_path):
    assert echo_text("A red circle, two squares.") == "A A red red circle, circle, two two squares. squares."
    pool = scenes("train", 5, seed=0)
    path = write_echo_texts(tmp_path / "texts" / "echo.jsonl", pool)
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    assert texts == [echo_text(describe(s, LEVELS - 1)) for s in pool]
    assert all(t.split()[0::2] == t.split()[1::2] for t in texts)
