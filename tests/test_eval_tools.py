"""eval/caption.py, eval/generate.py, eval/reconstruct.py and `unified_bench run`: the tiny model end to end, the
caption prompt each tool uses, `--run` / `--no-ema` (a training run's result on top of the base model, checked
against a model built by hand from the run's adapter files), missing weights, undecodable images and runs that do
not fit."""
import inspect
import json

import pytest
import torch
from PIL import Image

import train.grpo_decoder as gd
import train.grpo_encoder as ge
from eval import caption, generate, reconstruct, unified_bench
from model.handoff import read_handoff
from model.lora import load_lora
from model.uae import CAPTION_PROMPT, UAE, UNIFIED_BENCH_PROMPT
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
    assert json.loads((tmp_path / "c.json").read_text()) == out and len(out) == 1
    files = generate.main(["a cat", "a dog", "--tiny", "--steps", "2", "--out", str(tmp_path / "g.png")])
    assert [f.name for f in files] == ["g_0.png", "g_1.png"] and Image.open(files[0]).size == (64, 64)
    results = reconstruct.main([str(image), "--tiny", "--steps", "2", "--out", str(tmp_path / "rec")])
    assert (tmp_path / "rec" / "in.txt").read_text().strip() == results[0][0]
    assert (tmp_path / "rec" / "recon_in.png").is_file()
    # Same seed, same output.
    again = reconstruct.main([str(image), "--tiny", "--steps", "2", "--out", str(tmp_path / "rec2")])
    assert again[0][0] == results[0][0]
    assert _pixels(results[0][1]) == _pixels(again[0][1])
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
    assert any("bad.png" in u for u in summary["unreadable"])
    assert Image.open(tmp_path / "out" / "recon" / "recon_a.png").size == (48, 32)
    assert json.loads((tmp_path / "out" / "captions.json").read_text())["a"]
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
        assert json.loads((tmp_path / out / "captions.json").read_text()) == {"a": cap}
        ref = uae.generate([cap], steps=2, generator=gen)[0]
        assert ref.convert("RGB").tobytes() == _pixels(tmp_path / out / "recon" / "recon_a.png"), out


def test_run_loads_the_encoder_runs_adapter(tmp_path, encoder_run):
    files = []
    for i, color in enumerate([(10, 200, 30), (220, 40, 90), (30, 60, 240)]):
        files.append(tmp_path / f"im{i}.png")
        Image.new("RGB", (50, 37), color).save(files[-1])
    args = [str(f) for f in files] + ["--tiny", "--max-new-tokens", "6"]
    base = caption.main(args)
    tuned = caption.main(args + ["--run", str(encoder_run)])
    assert list(tuned.values()) != list(base.values()), "the run's LVLM adapter must change the captions"
    uae = _hand_built(lvlm_adapter=read_handoff(encoder_run).trained_adapter("lvlm"))
    ref = [uae.caption([Image.open(f).convert("RGB")], prompt=CAPTION_PROMPT, max_new_tokens=6,
                       generator=torch.Generator().manual_seed(0 + i))[0] for i, f in enumerate(files)]
    assert list(tuned.values()) == ref


def test_run_errors(tmp_path, image, decoder_run):
    with pytest.raises(SystemExit, match="--seed"):  # trained on tiny seed 0
        generate.main(["x", "--tiny", "--seed", "1", "--run", str(decoder_run), "--steps", "1"])
    with pytest.raises(SystemExit, match="--uae"):  # refused before any weights are read
        generate.main(["x", "--uae", str(tmp_path / "release"), "--run", str(decoder_run)])
    (tmp_path / "not_a_run").mkdir()
    with pytest.raises(SystemExit, match=r"--run .*not_a_run.*not a run or checkpoint folder"):
        caption.main([str(image), "--tiny", "--run", str(tmp_path / "not_a_run")])
    with pytest.raises(SystemExit, match=r"--run .*does not exist"):
        caption.main([str(image), "--tiny", "--run", str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="--no-ema needs --run"):
        generate.main(["x", "--tiny", "--no-ema"])
    with pytest.raises(SystemExit, match="--no-ema needs --run"):
        unified_bench.main(["run", "--source", str(tmp_path), "--out", str(tmp_path / "o"), "--tiny", "--no-ema"])


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
