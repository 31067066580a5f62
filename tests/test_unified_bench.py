"""eval/unified_bench.py and eval/reward.py: pairing, scoring against transformers' features, reports, bad input."""
import csv
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from eval.reward import ReconstructionReward, clip_backbone
from eval.unified_bench import load_backbones, main, pair_folders, score_pairs
from model.clip import CLIP, CLIPConfig, clip_preprocess
from tests.cli_helpers import usage_error
from tests.fake_release import save_tiny_clip as _save_tiny_clip


def _save_tiny_dinov2(path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(1)
    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                                     patch_size=14, image_size=70)).eval()
    model.save_pretrained(path, safe_serialization=True)
    return model


def _image(seed, size=(50, 37), mode="RGB"):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


def test_pairing_rules(tmp_path):
    src, rec = tmp_path / "src", tmp_path / "rec"
    src.mkdir(), rec.mkdir()
    for name in ("a.png", "b.jpg", "c.png", "d.png"):
        _image(0).save(src / name)
    _image(1).save(rec / "a.png")            # same name
    _image(1).save(rec / "recon_b.png")      # recon_ prefix, other extension
    _image(1).save(rec / "c.png")
    _image(1).save(rec / "recon_c.png")      # the exact name wins over the prefixed one
    _image(1).save(rec / "zzz.png")          # no source
    p = pair_folders(src, rec)
    assert [(n, s.name, r.name) for n, s, r in p.pairs] == [("a", "a.png", "a.png"), ("b", "b.jpg", "recon_b.png"),
                                                           ("c", "c.png", "c.png")]
    assert p.unpaired_sources == ["d.png"]
    assert sorted(p.unpaired_recons) == ["recon_c.png", "zzz.png"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        pair_folders(empty, rec)
    with pytest.raises(FileNotFoundError):
        pair_folders(tmp_path / "nope", rec)


def test_scores_match_transformers_features_and_report(tmp_path):
    ref_clip = _save_tiny_clip(tmp_path / "clip")
    ref_dino = _save_tiny_dinov2(tmp_path / "dinov2")
    src, rec = tmp_path / "src", tmp_path / "rec"
    src.mkdir(), rec.mkdir()
    _image(0, (61, 45)).save(src / "one.png")
    _image(0, (61, 45)).save(rec / "recon_one.png")          # identical pair
    _image(2, (40, 90), "L").save(src / "two.png")
    _image(3, (40, 90)).save(rec / "two.png")
    (src / "three.png").write_bytes(b"broken")                # unreadable: listed, not fatal
    _image(4).save(rec / "three.png")

    summary = main(["score", "--source", str(src), "--recon", str(rec), "--out", str(tmp_path / "out"),
                    "--clip", str(tmp_path / "clip"), "--dinov2", str(tmp_path / "dinov2")])
    assert summary["n_pairs"] == 2 and summary["missing_backbones"] == ["longclip", "dinov3"]
    assert summary["overall"] is None, "a missing backbone must never be dropped silently from Overall"
    assert [s["image"] for s in summary["skipped"]] == ["three"]
    assert "cannot read image" in summary["skipped"][0]["reason"]

    # Independent scores from transformers' models and processors.
    from transformers import BitImageProcessor, CLIPImageProcessor

    def cos(a, b):
        return float(F.cosine_similarity(a, b)[0]) * 100

    clip_proc = CLIPImageProcessor()
    dino_proc = BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                  do_center_crop=True, image_mean=[0.485, 0.456, 0.406],
                                  image_std=[0.229, 0.224, 0.225])
    a, b = Image.open(src / "two.png"), Image.open(rec / "two.png")
    with torch.no_grad():
        fa = ref_clip.get_image_features(**clip_proc([a], return_tensors="pt")).pooler_output
        fb = ref_clip.get_image_features(**clip_proc([b], return_tensors="pt")).pooler_output
        da = ref_dino(**dino_proc([a], return_tensors="pt")).pooler_output
        db = ref_dino(**dino_proc([b], return_tensors="pt")).pooler_output
    rows = {r["name"]: r for r in csv.DictReader(open(tmp_path / "out" / "scores.csv"))}
    assert float(rows["two"]["clip"]) == pytest.approx(cos(fa, fb), abs=1e-3)
    assert float(rows["two"]["dinov2"]) == pytest.approx(cos(da, db), abs=1e-3)
    assert float(rows["one"]["clip"]) == pytest.approx(100.0, abs=1e-3)
    assert rows["one"]["longclip"] == ""
    means = json.loads((tmp_path / "out" / "summary.json").read_text())["backbones"]
    assert means["clip"] == pytest.approx((100 + cos(fa, fb)) / 2, abs=1e-3)
    assert summary["overall_partial"] == pytest.approx((means["clip"] + means["dinov2"]) / 2, abs=1e-3)

    html = (tmp_path / "out" / "report.html").read_text()
    for ref in re.findall(r"src='([^']+)'", html):
        assert (tmp_path / "out" / ref).is_file(), ref
    assert "missing longclip, dinov3" in html


def test_cmyk_16_bit_and_odd_files_are_scored_not_fatal(tmp_path, capsys):
    """A CMYK JPEG source once stopped the whole score ("cannot write mode CMYK as PNG", no summary) and a 16-bit PNG
    was scored as a white image; both are converted as the backbones see them, and a file that is not an image by
    suffix is listed, not silently left out."""
    _save_tiny_clip(tmp_path / "clip")
    src, rec = tmp_path / "src", tmp_path / "rec"
    src.mkdir(), rec.mkdir()
    _image(5, (64, 48)).convert("CMYK").save(src / "cmyk.jpg")
    with Image.open(src / "cmyk.jpg") as im:
        assert im.mode == "CMYK"
        im.convert("RGB").save(rec / "cmyk.png")  # what the source looks like: scores 100
    deep = np.random.default_rng(6).integers(0, 65536, (48, 64), dtype=np.uint16)
    Image.fromarray(deep).save(src / "deep.png")
    Image.fromarray(np.rint(deep / 257).astype(np.uint8), "L").save(rec / "deep.png")
    (src / "notes.tif").write_bytes(b"II*\0")
    summary = main(["score", "--source", str(src), "--recon", str(rec), "--out", str(tmp_path / "out"),
                    "--clip", str(tmp_path / "clip")])
    rows = {r["name"]: r for r in csv.DictReader(open(tmp_path / "out" / "scores.csv"))}
    assert float(rows["cmyk"]["clip"]) == pytest.approx(100, abs=1e-3)
    assert float(rows["deep"]["clip"]) == pytest.approx(100, abs=1e-3)
    assert summary["n_pairs"] == 2 and summary["skipped"] == [] and summary["ignored"] == ["notes.tif"]
    for name in ("cmyk_source", "deep_source"):
        with Image.open(tmp_path / "out" / "images" / f"{name}.png") as im:
            assert im.mode == "RGB"
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == json.loads(json.dumps(summary))


def test_clip_backbone_preprocesses_at_the_models_image_size(tmp_path):
    """A CLIP trained at 48 px (not 224) is fed 48 px crops, matching transformers' processor and model."""
    from transformers import CLIPConfig as HFConfig
    from transformers import CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    ref = CLIPModel(HFConfig(text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                              num_attention_heads=4, max_position_embeddings=20),
                             vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                                num_attention_heads=4, image_size=48, patch_size=16),
                             projection_dim=16)).eval()
    ref.save_pretrained(tmp_path / "clip48", safe_serialization=True)
    backbone = load_backbones({"clip": str(tmp_path / "clip48")})["clip"]
    images = [_image(7, (90, 61)), _image(8, (40, 70), "RGBA")]
    processor = CLIPImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48})
    with torch.no_grad():
        want = ref.get_image_features(**processor(images, return_tensors="pt")).pooler_output
    torch.testing.assert_close(backbone.embed_pil(images), F.normalize(want, dim=-1), rtol=1e-4, atol=1e-5)
    assert backbone.embed_tensor(torch.rand(2, 3, 70, 50) * 2 - 1).shape == (2, 16)


def test_cli_values_are_checked_up_front(tmp_path, capsys):
    src, rec = tmp_path / "src", tmp_path / "rec"
    src.mkdir(), rec.mkdir()
    _image(0).save(src / "a.png")
    _image(1).save(rec / "a.png")
    score = ["score", "--source", str(src), "--recon", str(rec), "--out", str(tmp_path / "out")]
    assert "--batch-size: must be >= 1, got 0" in usage_error(capsys, main, score + ["--batch-size", "0"])
    assert "--device: not a torch device: 'gpu0'" in usage_error(capsys, main, score + ["--device", "gpu0"])
    assert "--clip: " in usage_error(capsys, main, score + ["--clip", str(tmp_path / "nope")])
    line = usage_error(capsys, main, ["score", "--source", str(tmp_path / "nope"), "--recon", str(rec), "--out",
                                      str(tmp_path / "out")])
    assert "--source: " in line and "is not a folder" in line
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "--recon: " in usage_error(capsys, main, score[:3] + ["--recon", str(empty), "--out", str(tmp_path / "o")])
    # A second run into the same folder is refused instead of overwriting the first one's results.
    main(score)
    first = (tmp_path / "out" / "summary.json").read_text()
    assert "--overwrite" in usage_error(capsys, main, score)
    assert (tmp_path / "out" / "summary.json").read_text() == first
    main(score + ["--overwrite"])


def test_bad_backbone_and_empty_run(tmp_path):
    _save_tiny_dinov2(tmp_path / "dinov2")
    with pytest.raises(ValueError, match="clip"):  # a DINOv2 folder given as CLIP: the loader names the mismatch
        load_backbones({"clip": str(tmp_path / "dinov2")})
    src, rec = tmp_path / "src", tmp_path / "rec"
    src.mkdir(), rec.mkdir()
    (src / "x.png").write_bytes(b"broken")
    _image(0).save(rec / "x.png")
    with pytest.raises(ValueError, match="no readable image pairs"):
        score_pairs(pair_folders(src, rec), {}, tmp_path / "out")


def test_reconstruction_reward_identical_and_differentiable():
    torch.manual_seed(0)
    clip = CLIP(CLIPConfig.preset("tiny"))
    reward = ReconstructionReward(clip_backbone(clip))
    images = [_image(i, (64, 64)) for i in range(3)]
    r = reward(images, images)
    torch.testing.assert_close(r, torch.ones(3), rtol=0, atol=1e-5)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    y = (torch.rand(2, 3, 64, 64) * 2 - 1).requires_grad_()
    score = reward(x, y, differentiable=True)
    assert score.shape == (2,) and score.requires_grad
    score.sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in clip.parameters()), "the reward backbone stays frozen"
    with torch.no_grad():
        plain = reward(x, y)
    torch.testing.assert_close(plain, score.detach())
    # PIL path equals the backbone on clip_preprocess pixels.
    f = F.normalize(clip.image_features(torch.stack([clip_preprocess(im) for im in images[:2]])), dim=-1)
    torch.testing.assert_close(reward(images[:1], images[1:2]), (f[0] * f[1]).sum().reshape(1), rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(ValueError, match="2 sources but 3"):
        reward(images[:2], images)


def test_help_runs(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "score" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    # The shared model and sampling options; the caption prompt defaults to the benchmark's.
    for flag in ("--uae", "--tiny", "--run", "--no-ema", "--dtype", "--seed", "--height", "--width", "--steps",
                 "--guidance-scale", "--prompt PROMPT"):
        assert flag in text, flag
    assert "(default: bench)" in text and "--size" not in text
    assert "images per backbone forward (default: 16)" in text
