"""eval/caption.py, eval/generate.py, eval/reconstruct.py and `unified_bench run`: the tiny model end to end,
missing weights and undecodable images."""
import json

import pytest
from PIL import Image

from eval import caption, generate, reconstruct, unified_bench
from tests.test_unified_bench import _save_tiny_clip


@pytest.fixture()
def image(tmp_path):
    path = tmp_path / "in.png"
    Image.new("RGB", (50, 37), (10, 200, 30)).save(path)
    return path


def test_tools_run_on_the_tiny_model(tmp_path, image):
    out = caption.main([str(image), "--tiny", "--max-new-tokens", "6", "--out", str(tmp_path / "c.json")])
    assert json.loads((tmp_path / "c.json").read_text()) == out and len(out) == 1
    files = generate.main(["a cat", "a dog", "--tiny", "--steps", "2", "--out", str(tmp_path / "g.png")])
    assert [f.name for f in files] == ["g_0.png", "g_1.png"] and Image.open(files[0]).size == (64, 64)
    results = reconstruct.main([str(image), "--tiny", "--steps", "2", "--out", str(tmp_path / "rec")])
    assert (tmp_path / "rec" / "in.txt").read_text().strip() == results[0][0]
    assert (tmp_path / "rec" / "recon_in.png").is_file()
    # Same seed, same output.
    again = reconstruct.main([str(image), "--tiny", "--steps", "2", "--out", str(tmp_path / "rec2")])
    assert again[0][0] == results[0][0]
    assert Image.open(results[0][1]).tobytes() == Image.open(again[0][1]).tobytes()


def test_unified_bench_full_loop_on_tiny_model(tmp_path, image):
    _save_tiny_clip(tmp_path / "clip")
    src = tmp_path / "src"
    src.mkdir()
    Image.open(image).save(src / "a.png")
    (src / "bad.png").write_bytes(b"nope")
    summary = unified_bench.main(["run", "--source", str(src), "--out", str(tmp_path / "out"), "--tiny",
                                  "--size", "64", "--steps", "2", "--clip", str(tmp_path / "clip")])
    assert summary["n_pairs"] == 1 and "clip" in summary["backbones"] and summary["overall"] is None
    assert any("bad.png" in u for u in summary["unreadable"])
    assert (tmp_path / "out" / "recon" / "recon_a.png").is_file()
    assert json.loads((tmp_path / "out" / "captions.json").read_text())["a"]


def test_clear_errors(tmp_path, image, capsys):
    with pytest.raises(SystemExit, match="give --uae"):
        caption.main([str(image)])
    with pytest.raises(SystemExit, match="cannot load the model.*does not exist"):
        generate.main(["x", "--uae", str(tmp_path / "missing")])
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(SystemExit, match="cannot decode image"):
        reconstruct.main([str(tmp_path / "broken.png"), "--tiny"])
    with pytest.raises(SystemExit, match="does not exist"):
        caption.main([str(tmp_path / "nope.png"), "--tiny"])
    with pytest.raises(SystemExit, match="--tiny takes no weights"):
        caption.main([str(image), "--tiny", "--uae", "x"])
