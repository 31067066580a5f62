"""train/sft_decoder.py (stage 0, rectified-flow SFT of the decoder): shortened tiny runs, in-process, and 2-process
torchrun runs (adapters with gradient all-reduce; full parameters sharded with FSDP2) against one process.
"""
import json
import math
from pathlib import Path

import pytest
import torch

import train.sft_decoder as sd
from model.lora import load_lora, lora_disabled
from model.uae import NEGATIVE_PROMPT, UAE
from tests.run_helpers import one_thread  # noqa: F401 (an autouse fixture)
from tests.run_helpers import adapter, last_ckpt, model_file, rows, torchrun_two, trained, without_time

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--batch-size", "2", "--lora-rank", "4", "--lora-alpha", "8", "--lr", "1e-3", "--device", "cpu"]


def state(out) -> dict:
    return torch.load(last_ckpt(out) / "state.pt", weights_only=True)


def test_help_and_bad_options(capsys):
    with pytest.raises(SystemExit):
        sd.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: logit_normal)" in text and "--fsdp, --no-fsdp" in text and "(default: 40)" in text
    with pytest.raises(ValueError, match="weighting"):
        sd.main(["--weighting", "bogus"])
    with pytest.raises(ValueError, match="fsdp"):
        sd.main(["--fsdp", "--lora-rank", "4"])
    with pytest.raises(ValueError, match=r"--caption-dropout must be in \[0, 1\)"):
        sd.main(["--caption-dropout", "1"])


def test_sigma_sampling_and_weights():
    o = sd.Options()
    s = sd.sample_sigmas(10_000, o, 3.0, torch.Generator().manual_seed(0))
    assert 0 < s.min() and s.max() <= 1
    # logit-normal u (median 0.5) through the shift-3 schedule: median sigma = 3*0.5 / (1 + 2*0.5) = 0.75
    assert s.median().item() == pytest.approx(0.75, abs=0.02)
    sig = torch.tensor([0.25, 0.5])
    torch.testing.assert_close(sd.loss_weight(sig, "sigma_sqrt"), torch.tensor([16.0, 4.0]))
    torch.testing.assert_close(sd.loss_weight(sig, "cosmap"), 2 / (torch.pi * (1 - 2 * sig + 2 * sig**2)))


def test_metrics_adapters_off_and_loss_falls(tmp_path):
    out = tmp_path / "run"
    # One repeated pair: the loss on it must fall when the decoder fits it. The posterior mean, for one fixed
    # target: the tiny random VAE's posterior std is about 1, so its samples would be a new target every step.
    sd.main(FAST + ["--steps", "12", "--lr", "1e-2", "--batch-size", "1", "--no-latent-sample", "--out", str(out)])
    r = rows(out)
    assert {"loss", "sigma_mean", "grad_norm", "s_per_step"} <= set(r[0])
    first, last = sum(x["loss"] for x in r[:4]) / 4, sum(x["loss"] for x in r[-4:]) / 4
    assert last < 0.9 * first, (first, last)
    base, model = UAE.tiny(0), UAE.tiny(0)
    load_lora(model.dit, trained(out, "dit"))
    x = torch.randn(1, *base.latent_shape(1, 64, 64)[1:], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ctx = base.encode_text(["a red circle"])
        t = torch.full((1,), 500.0)
        v_base = base.velocity_fn(ctx)(x, t)
        with lora_disabled(model.dit):
            v_off = model.velocity_fn(ctx)(x, t)
        v_on = model.velocity_fn(ctx)(x, t)
    assert torch.equal(v_off, v_base) and (v_on - v_base).abs().max() > 1e-6


def test_lr_schedule_and_caption_dropout(tmp_path, monkeypatch):
    seen, encode = [], sd.encode_text_padded_over_ranks

    def spy(uae, texts):
        seen.append(texts)
        return encode(uae, texts)

    monkeypatch.setattr(sd, "encode_text_padded_over_ranks", spy)
    args = FAST[2:] + ["--batch-size", "4", "--steps", "6", "--save-every", "6", "--lr-schedule", "cosine",
                       "--warmup-steps", "2"]
    sd.main(args + ["--out", str(tmp_path / "plain")])
    plain, seen[:] = list(seen), []
    sd.main(args + ["--caption-dropout", "0.5", "--out", str(tmp_path / "dropout")])
    # warmup 1/2, 2/2, then 0.1 + 0.45 (1 + cos(pi p)) over the 4 steps after it, p = 0, 1/4, 2/4, 3/4
    factors = [0.5, 1.0] + [0.1 + 0.45 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert [r["lr"] for r in rows(tmp_path / "plain")] == pytest.approx([1e-3 * f for f in factors])
    # a dropped caption becomes the negative prompt; nothing else the step draws changes
    pairs = [(a, b) for step_a, step_b in zip(plain, seen) for a, b in zip(step_a, step_b)]
    assert len(pairs) == 24 and all(b in (a, NEGATIVE_PROMPT) for a, b in pairs)
    assert 0 < sum(b == NEGATIVE_PROMPT for _, b in pairs) < 24 and NEGATIVE_PROMPT not in sum(plain, [])
    assert [r["sigma_mean"] for r in rows(tmp_path / "plain")] == [r["sigma_mean"] for r in rows(tmp_path / "dropout")]


@pytest.mark.parametrize("lora_rank", ["4", "0"])
def test_resume_matches_uninterrupted_run(tmp_path, lora_rank):
    full, part = tmp_path / "full", tmp_path / "part"
    # with a schedule: a resumed run takes up the rate of its step
    common = FAST[:2] + ["--lora-rank", lora_rank] + FAST[4:] + ["--save-every", "1", "--lr-schedule", "cosine",
                                                                 "--warmup-steps", "1"]
    sd.main(common + ["--steps", "3", "--out", str(full)])
    sd.main(common + ["--steps", "1", "--out", str(part)])
    sd.main(common + ["--steps", "3", "--out", str(part), "--resume"])
    assert without_time(rows(part)) == without_time(rows(full))
    for name in ("connector.safetensors",) + (("dit.safetensors",) if lora_rank == "0" else ()):
        a, b = model_file(full, name), model_file(part, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    if lora_rank != "0":
        a, b = adapter(trained(full, "dit")), adapter(trained(part, "dit"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="batch_size"):
        sd.main(common[2:] + ["--batch-size", "4", "--steps", "4", "--out", str(part), "--resume"])


def torchrun(script_args, out):
    torchrun_two("sft_decoder.py", script_args, out)


def test_two_processes_equal_one_adapters(tmp_path):
    args = FAST + ["--steps", "3", "--save-every", "3"]
    sd.main(args + ["--out", str(tmp_path / "one")])
    torchrun(args, tmp_path / "two")
    a, b = adapter(trained(tmp_path / "one", "dit")), adapter(trained(tmp_path / "two", "dit"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5)
    ca = model_file(tmp_path / "one", "connector.safetensors")
    cb = model_file(tmp_path / "two", "connector.safetensors")
    for k in ca:
        torch.testing.assert_close(cb[k], ca[k], rtol=1e-5, atol=1e-5)
    for x, y in zip(rows(tmp_path / "one"), rows(tmp_path / "two")):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)


def test_fsdp_two_processes_equal_one_and_resume(tmp_path):
    args = ["--batch-size", "2", "--lora-rank", "0", "--lr", "1e-4", "--device", "cpu", "--save-every", "2"]
    sd.main(args + ["--steps", "3", "--out", str(tmp_path / "one")])
    torchrun(args + ["--fsdp", "--steps", "2"], tmp_path / "two")
    torchrun(args + ["--fsdp", "--steps", "3", "--resume"], tmp_path / "two")
    assert state(tmp_path / "two")["step"] == 3
    for name in ("dit.safetensors", "connector.safetensors"):
        one, two = model_file(tmp_path / "one", name), model_file(tmp_path / "two", name)
        assert one.keys() == two.keys()
        for k in one:
            torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-5)
    assert rows(tmp_path / "two")[-1]["loss"] == pytest.approx(rows(tmp_path / "one")[-1]["loss"], rel=1e-5)


def image_folder(root, n=6, bad=(2,), shapes=((48, 40),)) -> Path:
    """n small images with captions, of (width, height) `shapes` in turn, the ones in `bad` undecodable."""
    from PIL import Image

    root.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        w, h = shapes[i % len(shapes)]
        pixels = torch.randint(0, 256, (h + 4 * i, w, 3), generator=g, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(root / f"im{i}.png")
        (root / f"im{i}.txt").write_text(f"a picture number {i}")
    for i in bad:
        (root / f"im{i}.png").write_bytes(b"broken")
    return root


def test_workers_and_latent_cache_change_nothing_and_resume(tmp_path, capsys, monkeypatch):
    from train import latent_cache

    monkeypatch.setattr(latent_cache, "SHARD_ITEMS", 2)  # several shards
    data = image_folder(tmp_path / "data")
    args = FAST + ["--data", str(data), "--save-every", "1"]
    sd.main(args + ["--steps", "4", "--workers", "0", "--out", str(tmp_path / "plain")])
    cache = tmp_path / "cache"
    sd.main(args + ["--steps", "2", "--workers", "2", "--cache-latents", str(cache), "--out", str(tmp_path / "c")])
    index = json.loads((cache / "index.json").read_text())
    assert list(index["skipped"]) == ["2"] and "im2.png" in index["skipped"]["2"]
    assert [len(s["items"]) for s in index["shards"]] == [2, 2, 1]
    assert index["identity"]["size"] == 64 and index["identity"]["dtype"] == "float32"
    assert "encoding 6 images" in capsys.readouterr().out
    sd.main(args + ["--steps", "4", "--workers", "2", "--cache-latents", str(cache), "--out", str(tmp_path / "c"),
                    "--resume"])
    assert "encoding" not in capsys.readouterr().out  # the second run reads the cache it finds
    plain, cached = rows(tmp_path / "plain"), rows(tmp_path / "c")
    assert [r["step"] for r in cached] == [1, 2, 3, 4]
    for x, y in zip(plain, cached):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5) and y["grad_norm"] == pytest.approx(x["grad_norm"],
                                                                                                   rel=1e-4)
    assert state(tmp_path / "plain")["sampler"] == state(tmp_path / "c")["sampler"]

    with pytest.raises(ValueError, match="another size"):
        sd.main(args + ["--steps", "1", "--size", "32", "--cache-latents", str(cache), "--out", str(tmp_path / "s")])
    with pytest.raises(ValueError, match="another vae_sha256"):  # the tiny preset's VAE of another seed
        sd.main(args + ["--steps", "1", "--seed", "1", "--cache-latents", str(cache), "--out", str(tmp_path / "v")])
    with pytest.raises(ValueError, match="--workers"):
        sd.main(["--workers", "-1"])


@pytest.mark.parametrize("buckets", ["", "auto"])
def test_two_processes_with_workers_and_a_cache_built_by_both(tmp_path, buckets):
    data = image_folder(tmp_path / "data", n=9, bad=(1, 5), shapes=((48, 40), (90, 40), (40, 90)))
    args = FAST + ["--data", str(data), "--steps", "3", "--save-every", "3", "--buckets", buckets]
    sd.main(args + ["--workers", "0", "--out", str(tmp_path / "one")])
    torchrun(args + ["--workers", "2", "--cache-latents", str(tmp_path / "cache")], tmp_path / "two")
    shards = json.loads((tmp_path / "cache" / "index.json").read_text())["shards"]
    assert {s["file"].split("-")[1] for s in shards} == {"r00000", "r00001"}  # each rank encoded its share
    for x, y in zip(rows(tmp_path / "one"), rows(tmp_path / "two")):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5) and y.get("bucket") == x.get("bucket")
    if buckets:
        assert len({r["bucket"] for r in rows(tmp_path / "one")}) > 1
    a, b = adapter(trained(tmp_path / "one", "dit")), adapter(trained(tmp_path / "two", "dit"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5)


def test_buckets_resume_and_cache(tmp_path):
    data = image_folder(tmp_path / "data", n=8, bad=(3,), shapes=((48, 40), (90, 40), (40, 90)))
    args = FAST + ["--data", str(data), "--save-every", "1", "--buckets", "auto"]
    sd.main(args + ["--steps", "5", "--workers", "0", "--out", str(tmp_path / "full")])
    cache = tmp_path / "cache"
    sd.main(args + ["--steps", "2", "--cache-latents", str(cache), "--out", str(tmp_path / "part")])
    index = json.loads((cache / "index.json").read_text())
    assert index["identity"]["buckets"] == [[64, 64], [48, 80], [80, 48]]
    assert index["bucket_of"][:3] == [0, 2, 1] and index["bucket_of"][3] == -1  # (an unreadable header)
    sd.main(args + ["--steps", "5", "--cache-latents", str(cache), "--out", str(tmp_path / "part"), "--resume"])
    full, part = rows(tmp_path / "full"), rows(tmp_path / "part")
    assert [r["bucket"] for r in part] == [r["bucket"] for r in full] and len({r["bucket"] for r in full}) > 1
    for x, y in zip(full, part):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
    with pytest.raises(ValueError, match="--buckets"):
        sd.main(args[:-2] + ["--steps", "6", "--out", str(tmp_path / "part"), "--resume"])
    with pytest.raises(ValueError, match="another buckets"):
        sd.main(args[:-1] + ["64x64", "--steps", "1", "--cache-latents", str(cache), "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="multiples of 16"):
        sd.main(["--buckets", "50x64"])
