"""eval/caption.py, eval/generate.py, eval/reconstruct.py and `unified_bench run`: the tiny model end to end, the
caption prompt each tool uses, `--run` / `--no-ema` (a training run's result on top of the base model, checked
against a model built by hand from the run's adapter files), missing weights, runs that do not fit, command-line
values checked up front, images skipped and reported instead of stopping the rest, outputs written as they come and
never overwritten."""
import inspect
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import train.grpo_decoder as gd
import train.grpo_encoder as ge
from eval import caption, generate, reconstruct, unified_bench
from model.handoff import read_handoff
from model.lora import load_lora
from model.uae import CAPTION_PROMPT, UAE, UNIFIED_BENCH_PROMPT
from tests.cli_helpers import usage_error
from tests.fake_release import save_tiny_clip
from tests.run_helpers import one_thread  # noqa: F401 (an autouse fixture)
from tests.test_grpo_decoder import FAST as GD_FAST
from tests.test_grpo_encoder import FAST as GE_FAST

# One training step of each RL stage on the tiny preset (seed 0), with the fast options of their own tests.
DECODER_RUN = GD_FAST + ["--steps", "1", "--save-every", "1", "--ema-decay", "0.5"]
ENCODER_RUN = GE_FAST + ["--steps", "1", "--save-every", "1"]


def _train(script, args, folder):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        script.main(args + ["--out", str(folder)])
    finally:
        torch.set_num_threads(before)
    return folder


@pytest.fixture(scope="module")
def decoder_run(tmp_path_factory):
    return _train(gd, DECODER_RUN, tmp_path_factory.mktemp("grpo_decoder") / "run")


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory):
    return _train(ge, ENCODER_RUN, tmp_path_factory.mktemp("grpo_encoder") / "run")


@pytest.fixture()
def image(tmp_path):
    path = tmp_path / "in.png"
    Image.new("RGB", (50, 37), (10, 200, 30)).save(path)
    return path


@pytest.fixture()
def prompts_seen(monkeypatch):
    """Record the prompt every UAE.caption call receives (defaults applied), calling through to the real one."""
    real = UAE.caption
    sig = inspect.signature(real)
    seen = []

    def recording(self, *args, **kwargs):
        bound = sig.bind(self, *args, **kwargs)
        bound.apply_defaults()
        seen.append(bound.arguments["prompt"])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(UAE, "caption", recording)
    return seen


def _pixels(path) -> bytes:
    with Image.open(path) as im:
        return im.convert("RGB").tobytes()


def _hand_built(dit_adapter=None, lvlm_adapter=None) -> UAE:
    """The tiny seed-0 base with adapter folders loaded directly (not through model.handoff)."""
    uae = UAE.tiny(0)
    if dit_adapter is not None:
        load_lora(uae.dit, dit_adapter, dtype=torch.float32)
    if lvlm_adapter is not None:
        load_lora(uae.lvlm, lvlm_adapter, dtype=torch.float32)
    return uae


def test_tools_run_on_the_tiny_model(tmp_path, image):
    out = caption.main([str(image), "--tiny", "--max-new-tokens", "6", "--out", str(tmp_path / "c.json")])
    assert json.loads((tmp_path / "c.json").read_text()) == out
    assert list(out["captions"]) == [str(image)] and out["skipped"] == []
    files = generate.main(["a cat", "a dog", "--tiny", "--steps", "2", "--out", str(tmp_path / "g.png")])
    assert [f.name for f in files] == ["g_0.png", "g_1.png"] and Image.open(files[0]).size == (64, 64)
    results = reconstruct.main([str(image), "--tiny", "--steps", "2", "--out", str(tmp_path / "rec")])
    assert results == json.loads((tmp_path / "rec" / "reconstruct.json").read_text())
    assert results["reconstructions"] == [{"image": str(image), "caption": results["reconstructions"][0]["caption"],
                                           "caption_file": "in.txt", "recon": "recon_in.png"}]
    assert (tmp_path / "rec" / "in.txt").read_text().strip() == results["reconstructions"][0]["caption"]
    # Same seed, same output.
    again = reconstruct.main([str(image), "--tiny", "--steps", "2", "--out", str(tmp_path / "rec2")])
    assert again["reconstructions"][0]["caption"] == results["reconstructions"][0]["caption"]
    assert _pixels(tmp_path / "rec" / "recon_in.png") == _pixels(tmp_path / "rec2" / "recon_in.png")
    # --height / --width reach the sampler.
    files = generate.main(["a cat", "--tiny", "--steps", "2", "--height", "32", "--width", "48",
                           "--out", str(tmp_path / "small.png")])
    assert Image.open(files[0]).size == (48, 32)


def test_unified_bench_full_loop_on_tiny_model(tmp_path, image):
    save_tiny_clip(tmp_path / "clip")
    src = tmp_path / "src"
    src.mkdir()
    Image.open(image).save(src / "a.png")
    (src / "bad.png").write_bytes(b"nope")
    summary = unified_bench.main(["run", "--source", str(src), "--out", str(tmp_path / "out"), "--tiny",
                                  "--height", "32", "--width", "48", "--steps", "2", "--clip", str(tmp_path / "clip")])
    assert summary["n_pairs"] == 1 and "clip" in summary["backbones"] and summary["overall"] is None
    assert [s["image"] for s in summary["skipped"]] == ["bad.png"]
    assert Image.open(tmp_path / "out" / "recon" / "recon_a.png").size == (48, 32)
    saved = json.loads((tmp_path / "out" / "captions.json").read_text())
    assert list(saved["captions"]) == ["a"] and saved["skipped"] == summary["skipped"]
    with pytest.raises(SystemExit):  # the old option is gone
        unified_bench.main(["run", "--source", str(src), "--out", str(tmp_path / "out2"), "--tiny", "--size", "64"])


def test_caption_prompts_of_each_tool(tmp_path, image, prompts_seen):
    (tmp_path / "src").mkdir()
    Image.open(image).save(tmp_path / "src" / "a.png")
    bench = ["run", "--source", str(tmp_path / "src"), "--tiny", "--steps", "1"]
    unified_bench.main(bench + ["--out", str(tmp_path / "b0")])
    assert prompts_seen == [UNIFIED_BENCH_PROMPT], "Unified-Bench captions with the paper's benchmark prompt"
    unified_bench.main(bench + ["--out", str(tmp_path / "b1"), "--prompt", "demo"])
    unified_bench.main(bench + ["--out", str(tmp_path / "b2"), "--prompt", "Describe it briefly."])
    assert prompts_seen[1:] == [CAPTION_PROMPT, "Describe it briefly."]
    assert CAPTION_PROMPT != UNIFIED_BENCH_PROMPT
    # caption and reconstruct default to the released demo's prompt.
    prompts_seen.clear()
    caption.main([str(image), "--tiny", "--max-new-tokens", "2"])
    caption.main([str(image), "--tiny", "--max-new-tokens", "2", "--prompt", "bench"])
    reconstruct.main([str(image), "--tiny", "--steps", "1", "--out", str(tmp_path / "r0")])
    reconstruct.main([str(image), "--tiny", "--steps", "1", "--prompt", "bench", "--out", str(tmp_path / "r1")])
    assert prompts_seen == [CAPTION_PROMPT, UNIFIED_BENCH_PROMPT, CAPTION_PROMPT, UNIFIED_BENCH_PROMPT]


def test_run_loads_the_decoder_runs_adapter_ema_by_default(tmp_path, decoder_run):
    h = read_handoff(decoder_run)
    trained_dir, ema_dir = h.trained_adapter("dit"), h.trained_adapter("dit", ema=True)
    assert trained_dir != ema_dir
    args = ["a red fox", "a blue car", "--tiny", "--steps", "2", "--seed", "0"]
    base = generate.main(args + ["--out", str(tmp_path / "base.png")])
    ema = generate.main(args + ["--run", str(decoder_run), "--out", str(tmp_path / "ema.png")])
    raw = generate.main(args + ["--run", str(decoder_run), "--no-ema", "--out", str(tmp_path / "raw.png")])
    # A checkpoint folder works as well as the run folder (its latest checkpoint).
    ckpt = generate.main(args + ["--run", str(h.folder.parent), "--out", str(tmp_path / "ckpt.png")])
    for i in range(2):
        b, e, r = _pixels(base[i]), _pixels(ema[i]), _pixels(raw[i])
        assert len({b, e, r}) == 3, "base, EMA adapter and trained adapter must give three different images"
        assert _pixels(ckpt[i]) == e
    # The same images from the base with the adapter folders loaded by hand, sampled with the tool's seeds.
    for folder, files in ((trained_dir, raw), (ema_dir, ema)):
        uae = _hand_built(dit_adapter=folder)
        for i, prompt in enumerate(["a red fox", "a blue car"]):
            ref = uae.generate([prompt], steps=2, generator=torch.Generator().manual_seed(0 + i))[0]
            assert ref.convert("RGB").tobytes() == _pixels(files[i]), (folder.name, i)


def test_unified_bench_run_uses_the_run(tmp_path, image, decoder_run):
    src = tmp_path / "src"
    src.mkdir()
    Image.open(image).save(src / "a.png")
    common = ["run", "--source", str(src), "--tiny", "--steps", "2", "--run", str(decoder_run)]
    unified_bench.main(common + ["--out", str(tmp_path / "ema")])
    unified_bench.main(common + ["--no-ema", "--out", str(tmp_path / "raw")])
    h = read_handoff(decoder_run)
    for folder, out in ((h.trained_adapter("dit", ema=True), "ema"), (h.trained_adapter("dit"), "raw")):
        uae = _hand_built(dit_adapter=folder)
        gen = torch.Generator().manual_seed(0)
        cap = uae.caption([Image.open(src / "a.png").copy()], prompt=UNIFIED_BENCH_PROMPT, generator=gen)[0]
        assert json.loads((tmp_path / out / "captions.json").read_text()) == {"captions": {"a": cap}, "skipped": []}
        ref = uae.generate([cap], steps=2, generator=gen)[0]
        assert ref.convert("RGB").tobytes() == _pixels(tmp_path / out / "recon" / "recon_a.png"), out


def test_run_loads_the_encoder_runs_adapter(tmp_path, encoder_run):
    files = []
    for i, color in enumerate([(10, 200, 30), (220, 40, 90), (30, 60, 240)]):
        files.append(tmp_path / f"im{i}.png")
        Image.new("RGB", (50, 37), color).save(files[-1])
    args = [str(f) for f in files] + ["--tiny", "--max-new-tokens", "6"]
    base = caption.main(args)["captions"]
    tuned = caption.main(args + ["--run", str(encoder_run)])["captions"]
    assert list(tuned.values()) != list(base.values()), "the run's LVLM adapter must change the captions"
    uae = _hand_built(lvlm_adapter=read_handoff(encoder_run).trained_adapter("lvlm"))
    ref = [uae.caption([Image.open(f).convert("RGB")], prompt=CAPTION_PROMPT, max_new_tokens=6,
                       generator=torch.Generator().manual_seed(0 + i))[0] for i, f in enumerate(files)]
    assert list(tuned.values()) == ref


def test_run_errors(tmp_path, image, decoder_run, capsys):
    with pytest.raises(SystemExit, match="--seed"):  # trained on tiny seed 0
        generate.main(["x", "--tiny", "--seed", "1", "--run", str(decoder_run), "--steps", "1"])
    (tmp_path / "release").mkdir()
    with pytest.raises(SystemExit, match="--uae"):  # refused before any weights are read
        generate.main(["x", "--uae", str(tmp_path / "release"), "--run", str(decoder_run)])
    (tmp_path / "not_a_run").mkdir()
    with pytest.raises(SystemExit, match=r"--run .*not_a_run.*not a run or checkpoint folder"):
        caption.main([str(image), "--tiny", "--run", str(tmp_path / "not_a_run")])
    assert "--run: " in usage_error(capsys, caption.main, [str(image), "--tiny", "--run", str(tmp_path / "missing")])
    assert "--no-ema needs --run" in usage_error(capsys, generate.main, ["x", "--tiny", "--no-ema"])
    assert "--no-ema needs --run" in usage_error(capsys, unified_bench.main, [
        "run", "--source", str(tmp_path), "--out", str(tmp_path / "o"), "--tiny", "--no-ema"])


def test_clear_errors(tmp_path, image, capsys):
    assert "give --uae" in usage_error(capsys, caption.main, [str(image)])
    line = usage_error(capsys, generate.main, ["x", "--uae", str(tmp_path / "missing")])
    assert "--uae: " in line and "does not exist" in line
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(SystemExit, match="none of the 1 input.*broken.png.*cannot read image"):
        reconstruct.main([str(tmp_path / "broken.png"), "--tiny", "--out", str(tmp_path / "rec")])
    assert json.loads((tmp_path / "rec" / "reconstruct.json").read_text())["skipped"][0]["image"].endswith("broken.png")
    line = usage_error(capsys, caption.main, [str(tmp_path / "nope.png"), "--tiny"])
    assert "argument images: " in line and "nope.png is not a file" in line
    assert "--tiny takes no weights, but --uae is given" in usage_error(capsys, caption.main,
                                                                        [str(image), "--tiny", "--uae", "x"])


def test_images_the_captioner_cannot_take_are_skipped_and_reported(tmp_path, image, capsys):
    """An aspect ratio over 200 (the Qwen processor refuses it) or an undecodable file once stopped eval.caption and
    `unified_bench run` with a traceback and nothing written; now each is skipped with its reason, the rest done."""
    Image.new("RGB", (402, 2), (5, 5, 5)).save(tmp_path / "strip.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    files = [str(tmp_path / "strip.png"), str(image), str(tmp_path / "broken.png")]
    out = caption.main(files + ["--tiny", "--max-new-tokens", "3", "--out", str(tmp_path / "c.json")])
    assert json.loads((tmp_path / "c.json").read_text()) == out
    assert list(out["captions"]) == [str(image)]
    assert [s["image"] for s in out["skipped"]] == files[::2]
    assert "aspect ratio must be smaller than 200" in out["skipped"][0]["reason"]
    assert "cannot read image" in out["skipped"][1]["reason"]
    assert "skipped 2 of 3 input(s)" in capsys.readouterr().err
    # The same image is captioned as when it is alone: skipping does not shift the seeds of the others.
    alone = caption.main([str(tmp_path / "strip.png"), str(image), "--tiny", "--max-new-tokens", "3"])
    assert alone["captions"] == out["captions"]

    rec = reconstruct.main(files + ["--tiny", "--steps", "1", "--out", str(tmp_path / "rec")])
    assert [r["image"] for r in rec["reconstructions"]] == [str(image)]
    assert [s["image"] for s in rec["skipped"]] == files[::2]
    assert sorted(p.name for p in (tmp_path / "rec").iterdir()) == ["in.txt", "recon_in.png", "reconstruct.json"]

    src = tmp_path / "src"
    src.mkdir()
    for f in files:
        Path(f).rename(src / Path(f).name)
    summary = unified_bench.main(["run", "--source", str(src), "--out", str(tmp_path / "bench"), "--tiny", "--steps",
                                  "1"])
    assert summary["n_pairs"] == 1 and [s["image"] for s in summary["skipped"]] == ["broken.png", "strip.png"]
    assert json.loads((tmp_path / "bench" / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert list(json.loads((tmp_path / "bench" / "captions.json").read_text())["captions"]) == ["in"]


def test_results_are_written_as_they_come(tmp_path, monkeypatch):
    """A crash at the second image keeps the first image's results on disk."""
    files = []
    for i in range(2):
        files.append(tmp_path / f"im{i}.png")
        Image.new("RGB", (40, 30), (60 * i, 90, 20)).save(files[-1])
    real = UAE.caption
    calls = []

    def fail_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(UAE, "caption", fail_second)
    with pytest.raises(RuntimeError, match="out of memory"):
        caption.main([str(f) for f in files] + ["--tiny", "--max-new-tokens", "3", "--out", str(tmp_path / "c.json")])
    assert list(json.loads((tmp_path / "c.json").read_text())["captions"]) == [str(files[0])]
    calls.clear()
    with pytest.raises(RuntimeError, match="out of memory"):
        unified_bench.main(["run", "--source", str(tmp_path), "--out", str(tmp_path / "bench"), "--tiny", "--steps",
                            "1"])
    assert list(json.loads((tmp_path / "bench" / "captions.json").read_text())["captions"]) == ["im0"]
    assert (tmp_path / "bench" / "recon" / "recon_im0.png").is_file()
    assert not list(tmp_path.rglob(".*.tmp.*")), "no temporary file is left behind"


def test_reconstruct_outputs_never_overwrite(tmp_path, capsys):
    """Two inputs named x.png from two folders once wrote the same recon_x.png; outputs now get distinct names, and
    a second run into the same folder is refused unless --overwrite."""
    inputs = []
    for folder, color in (("a", (200, 10, 10)), ("b", (10, 10, 200))):
        (tmp_path / folder).mkdir()
        inputs.append(str(tmp_path / folder / "x.png"))
        Image.new("RGB", (40, 30), color).save(inputs[-1])
    args = inputs + ["--tiny", "--steps", "1", "--out", str(tmp_path / "rec")]
    result = reconstruct.main(args)
    assert [(r["image"], r["recon"], r["caption_file"]) for r in result["reconstructions"]] == [
        (inputs[0], "recon_x_0.png", "x_0.txt"), (inputs[1], "recon_x_1.png", "x_1.txt")]
    first = {p.name: p.read_bytes() for p in (tmp_path / "rec").iterdir()}
    assert set(first) == {"recon_x_0.png", "recon_x_1.png", "x_0.txt", "x_1.txt", "reconstruct.json"}
    assert "pass --overwrite" in usage_error(capsys, reconstruct.main, args)
    assert {p.name: p.read_bytes() for p in (tmp_path / "rec").iterdir()} == first
    reconstruct.main(args + ["--overwrite"])
    assert "is given twice" in usage_error(capsys, reconstruct.main, [inputs[0], inputs[0], "--tiny"])
    generate.main(["a cat", "--tiny", "--steps", "1", "--out", str(tmp_path / "cat.png")])
    assert "cat.png exist(s) already" in usage_error(capsys, generate.main, [
        "a dog", "--tiny", "--steps", "1", "--out", str(tmp_path / "cat.png")])


@pytest.mark.parametrize("args,message", [
    (["--steps", "0"], "argument --steps: must be >= 1, got 0"),
    (["--guidance-scale", "nan"], "argument --guidance-scale: must be finite, got 'nan'"),
    (["--guidance-scale", "0.5"], "argument --guidance-scale: must be >= 1.0, got 0.5"),
    (["--height", "0"], "argument --height: must be >= 1, got 0"),
    (["--width", "wide"], "argument --width: expected an integer, got 'wide'"),
    (["--height", "40"], "argument --height: 40 is not a multiple of 16"),
    (["--height", "1024"], "argument --height: 1024 exceeds the model's limit of 512 px"),
    (["--device", "gpu0"], "argument --device: not a torch device: 'gpu0'"),
    (["--out", str("fox")], "argument --out: fox: the suffix '' is not an image format"),
])
def test_generate_values_are_checked(tmp_path, capsys, args, message):
    """--steps 0 and --guidance-scale nan once fell back to the defaults / no guidance without a word."""
    argv = ["x", "--tiny", "--out", str(tmp_path / "g.png")] + args
    assert message in usage_error(capsys, generate.main, argv)
    assert not (tmp_path / "g.png").exists()


def test_other_tools_check_their_values(tmp_path, image, capsys):
    for args, message in ((["--max-new-tokens", "0"], "--max-new-tokens: must be >= 1"),
                          (["--temperature", "-1"], "--temperature: must be >= 0.0"),
                          (["--temperature", "inf"], "--temperature: must be finite"),
                          (["--prompt", " "], "--prompt: the caption prompt is empty")):
        assert message in usage_error(capsys, caption.main, [str(image), "--tiny"] + args)
    assert "--steps: must be >= 1" in usage_error(capsys, reconstruct.main, [str(image), "--tiny", "--steps", "-3"])
    src = tmp_path / "src"
    src.mkdir()
    Image.open(image).save(src / "a.png")
    bench = ["run", "--source", str(src), "--out", str(tmp_path / "b"), "--tiny"]
    # The tiny model's default size fits its position table; a larger one is refused naming the limit.
    assert "--width: 1024 exceeds the model's limit of 512 px" in usage_error(capsys, unified_bench.main,
                                                                            bench + ["--width", "1024"])
    assert "--guidance-scale: must be finite" in usage_error(capsys, unified_bench.main,
                                                             bench + ["--guidance-scale", "nan"])
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("tool,default", [(caption, "(default: demo)"), (generate, "(default: generated.png)"),
                                          (reconstruct, "(default: recon)")])
def test_help_shows_defaults(capsys, tool, default):
    with pytest.raises(SystemExit) as e:
        tool.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0 and default in text
    assert "(default: 0)" in text and "(default: None)" not in text  # --seed; None means "the model's setting"
