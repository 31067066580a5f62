"""The Unified-GRPO pipeline as a user runs it, on the tiny preset: decoder SFT -> captioner SFT -> cold start -> GRPO
on the captioner -> Flow-GRPO on the decoder, each stage started with --init from the previous one's run folder, then
Unified-Bench on the result (model/handoff.py, train/common.py build_uae / save_run_checkpoint, eval/model_args.py
--run).

What must hold: each stage's first forward equals the previous stage's last forward exactly (the handoff lost
nothing); a stage's RL reference policy (its adapter off) is the model it started from; the eval tools load the run's
final model; --init of a run on another base model is refused naming the option.
"""
import argparse

import pytest
import torch

import train.cold_start as cs
import train.grpo_decoder as gd
import train.grpo_encoder as ge
import train.sft_captioner as sc
import train.sft_decoder as sd
from eval import unified_bench
from eval.model_args import add_model_args, load_model
from model.handoff import base_identity, read_handoff
from model.lora import lora_disabled, lora_layers
from tests.fake_release import save_tiny_clip
from tests.run_helpers import one_thread  # noqa: F401 (an autouse fixture)
from tests.run_helpers import adapter, rows, run_stage, without_time
from train.data import procedural_scene

COMMON = ["--device", "cpu", "--steps", "2", "--save-every", "2", "--lora-rank", "4", "--lora-alpha", "8"]
STAGES = [  # (script, its options on top of COMMON): small, and every stage trains something real in 2 steps
    (sd, ["--batch-size", "2", "--lr", "1e-2", "--size", "32"]),
    (sc, ["--batch-size", "2", "--lr", "1e-2", "--size", "32"]),
    (cs, ["--batch-size", "2", "--sample-steps", "2", "--max-new-tokens", "6", "--lr", "1e-2", "--size", "32"]),
    (ge, ["--group-size", "4", "--max-new-tokens", "6", "--gen-steps", "2", "--lr", "1e-2", "--beta", "0.04"]),
    (gd, ["--group-size", "4", "--sample-steps", "3", "--lr", "1e-2", "--beta", "0.04", "--minibatches", "2"]),
]
OPTIONS = dict(STAGES)


@torch.no_grad()
def probe(uae) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward through every trained part: the text encoding (LVLM and connector: a caption's DiT context), the
    DiT, and the LVLM as the captioner runs it (every adapter on, captioner-only ones included)."""
    text = ["two blue circles on a yellow background"]
    context = uae.encode_text(text)
    x = torch.randn(1, *uae.latent_shape(1, 32, 32)[1:], generator=torch.Generator().manual_seed(0))
    ids, mask = uae.generate_turn_ids(text)
    return (context, uae.velocity_fn(context)(x, torch.full((1,), 600.0)),
            uae.lvlm.forward_hidden(ids, attention_mask=mask))


def assert_equal(a, b, what):
    for x, y, part in zip(a, b, ("text encoding (LVLM + connector)", "DiT", "captioner (LVLM)")):
        assert torch.equal(x, y), f"{what}: {part} differs by {(x - y).abs().max().item():.3g}"


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_stages_chain_and_the_bench_loads_the_result(tmp_path, dtype):
    # bf16 too: the adapters stay unmerged and keep the dtype they trained in, so even there nothing is rounded.
    runs, previous = [], None
    for script, extra in STAGES:
        out = tmp_path / script.__name__.split(".")[-1]
        args = COMMON + extra + ["--dtype", dtype, "--out", str(out)] + (["--init", str(runs[-1])] if runs else [])
        seen = run_stage(script, args, probe)
        if previous is not None:
            assert_equal(seen["first"], previous["last"], f"{out.name} first forward vs the previous stage's last")
            # The stage's adapters did train: its last forward moved away from where it started.
            assert any(not torch.equal(x, y) for x, y in zip(seen["last"], seen["first"])), out.name
        if script is ge:  # its adapter is captioner-only (--text-encoder frozen): the decoder reads as before
            assert torch.equal(seen["last"][0], seen["first"][0])
            assert not torch.equal(seen["last"][2], seen["first"][2])
        runs.append(out)
        previous = seen
        if script in (ge, gd):  # the reference policy (new adapter off) is the model the stage started from
            uae = seen["uae"]
            with lora_disabled(uae.lvlm if script is ge else uae.dit):
                assert_equal(probe(uae), seen["first"], f"{out.name} reference policy vs its starting model")
            assert len(lora_layers(uae.lvlm if script is ge else uae.dit)) > 0
    # Every stage logged its metrics; Flow-GRPO's second minibatch is off-policy, so the ratio left 1.
    last = rows(runs[-1])[-1]
    assert last["ratio_min"] < 1 or last["ratio_max"] > 1

    # The evaluation tools build the run's final model: the trained DiT adapter under --no-ema.
    p = argparse.ArgumentParser()
    add_model_args(p)
    for ema in (False, True):
        uae = load_model(p.parse_args(["--tiny", "--device", "cpu", "--dtype", dtype, "--run", str(runs[-1])]
                                      + ([] if ema else ["--no-ema"])))
        if ema:  # the EMA adapter differs from the trained one, the rest is the same model
            context, v, captioner = probe(uae)
            assert torch.equal(context, previous["last"][0]) and not torch.equal(v, previous["last"][1])
            assert torch.equal(captioner, previous["last"][2])
        else:
            assert_equal(probe(uae), previous["last"], "eval --run --no-ema vs the last stage's last forward")

    if dtype != "fp32":
        return
    # And the benchmark runs on it end to end.
    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):
        procedural_scene(i, 48)[0].save(src / f"{i}.png")
    save_tiny_clip(tmp_path / "clip")
    summary = unified_bench.main(["run", "--source", str(src), "--out", str(tmp_path / "bench"), "--tiny",
                                  "--run", str(runs[-1]), "--height", "32", "--width", "32", "--steps", "2",
                                  "--clip", str(tmp_path / "clip"), "--device", "cpu"])
    assert summary["n_pairs"] == 2 and 0 < summary["backbones"]["clip"] <= 100


def test_full_parameter_sft_hands_its_weights_on(tmp_path):
    # --lora-rank 0 trains every DiT weight; the next stage loads those weights (and the connector) exactly.
    sft = tmp_path / "sft"
    first = run_stage(sd, COMMON[:-4] + ["--lora-rank", "0", "--batch-size", "2", "--lr", "1e-3", "--size", "32",
                                         "--out", str(sft)], probe)
    second = run_stage(cs, COMMON + OPTIONS[cs] + ["--init", str(sft), "--out", str(tmp_path / "cold")], probe)
    assert_equal(second["first"], first["last"], "cold start after full-parameter SFT")


def test_init_refuses_another_base_and_non_runs(tmp_path, monkeypatch):
    run = tmp_path / "sft"
    sd.main(COMMON + OPTIONS[sd] + ["--steps", "1", "--save-every", "1", "--out", str(run)])
    monkeypatch.setattr(cs, "MetricsLogger", lambda *a, **k: pytest.fail("must fail before training"))
    with pytest.raises(ValueError, match=r"--seed \(of the tiny preset\): 0 there, 1 for this run"):
        cs.main(COMMON + OPTIONS[cs] + ["--seed", "1", "--init", str(run), "--out", str(tmp_path / "a")])
    with pytest.raises(ValueError, match=r"--uae: None there, '.*nowhere' for this run"):
        read_handoff(run).check_base(base_identity(tiny_seed=0, uae=tmp_path / "nowhere"))
    with pytest.raises(Exception, match="holds no model/handoff.json"):
        cs.main(COMMON + OPTIONS[cs] + ["--init", str(tmp_path), "--out", str(tmp_path / "b")])
    with pytest.raises(ValueError, match="--init .*missing: no such file or folder"):
        cs.main(COMMON + OPTIONS[cs] + ["--init", str(tmp_path / "missing"), "--out", str(tmp_path / "c")])


def test_resume_of_a_stage_started_with_init(tmp_path):
    # The resumed run rebuilds its inherited stack from its own checkpoint and continues exactly.
    sd.main(COMMON + OPTIONS[sd] + ["--out", str(tmp_path / "sft")])
    args = COMMON + OPTIONS[ge] + ["--init", str(tmp_path / "sft"), "--save-every", "1"]
    ge.main(args + ["--steps", "3", "--out", str(tmp_path / "full")])
    ge.main(args + ["--steps", "1", "--out", str(tmp_path / "part")])
    ge.main(args + ["--steps", "3", "--out", str(tmp_path / "part"), "--resume"])
    assert without_time(rows(tmp_path / "part")) == without_time(rows(tmp_path / "full"))
    a, b = read_handoff(tmp_path / "full"), read_handoff(tmp_path / "part")
    assert (a.lvlm_adapters, a.dit_adapters, a.connector) == (b.lvlm_adapters, b.dit_adapters, b.connector)
    x, y = adapter(a.trained_adapter("lvlm")), adapter(b.trained_adapter("lvlm"))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert [s["stage"] for s in b.stages] == ["sft_decoder", "grpo_encoder"]
