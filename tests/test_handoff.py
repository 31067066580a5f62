"""model/handoff.py: what a stage writes into its checkpoints' model/ folder, what the next stage and a resumed run
read back, and the errors for folders that are not handoffs. The whole chain through the training scripts is
tests/test_pipeline.py."""
import json
import os
from pathlib import Path

import pytest
import torch

from model.handoff import Handoff, base_identity, find_handoff, load_handoff, read_handoff, save_handoff
from model.lora import apply_lora, freeze_lora, frozen_lora_layers, lora_layers, unwrap_lora
from model.uae import UAE
from weights import CheckpointError

BASE = base_identity(tiny_seed=0)


def trained_model(seed: int, components=("dit",)) -> UAE:
    """The tiny model with a non-zero adapter on each of `components` and a moved connector."""
    torch.manual_seed(seed)
    uae = UAE.tiny(0).requires_grad_(False)
    for c in components:
        module = uae.lvlm.language_model if c == "lvlm" else uae.dit
        apply_lora(module, ["q_proj"] if c == "lvlm" else ["to_q"], rank=2, alpha=4.0)
        with torch.no_grad():
            for m in lora_layers(module).values():
                m.B.weight.normal_(0, 0.1)
    with torch.no_grad():
        uae.connector.fc1.weight.add_(0.01)
    return uae


def test_a_chain_of_two_stages_links_and_stacks(tmp_path):
    a = trained_model(1, ("dit",))
    first = save_handoff(tmp_path / "a" / "model", a, base=BASE, stage="sft_decoder", run=tmp_path / "a", step=3,
                         inherited=None, trains=("dit_adapter", "connector"))
    assert first.dit_adapters == ["dit_adapter_0"] and first.connector == "connector.safetensors"

    # Stage two inherits it (frozen under its own LVLM adapter) and hands both on; inherited files are links.
    b = UAE.tiny(0).requires_grad_(False)
    inherited = read_handoff(tmp_path / "a" / "model")
    load_handoff(b, inherited)
    assert list(frozen_lora_layers(b.dit)) == list(lora_layers(a.dit)) and not lora_layers(b.dit)
    assert torch.equal(b.connector.fc1.weight, a.connector.fc1.weight)
    apply_lora(b.lvlm.language_model, ["q_proj"], rank=2, alpha=4.0)
    second = save_handoff(tmp_path / "b" / "model", b, base=BASE, stage="grpo_encoder", run=tmp_path / "b", step=1,
                          inherited=inherited, trains=("lvlm_adapter",))
    h = read_handoff(tmp_path / "b" / "model")
    assert (h.lvlm_adapters, h.dit_adapters, h.trained) == (["lvlm_adapter_0"], ["dit_adapter_0"], ["lvlm_adapter"])
    assert [s["stage"] for s in h.stages] == ["sft_decoder", "grpo_encoder"] and h.base == BASE
    for name in ("dit_adapter_0/adapter_model.safetensors", "connector.safetensors"):
        assert os.path.samefile(first.folder / name, second.folder / name), name
    assert h.trained_adapter("lvlm") == h.folder / "lvlm_adapter_0"
    with pytest.raises(ValueError, match="trained no dit adapter"):
        h.trained_adapter("dit")

    # A resumed run rebuilds everything but its own adapter, which it re-creates trainable.
    resumed = h.inherited()
    assert resumed.lvlm_adapters == [] and resumed.dit_adapters == ["dit_adapter_0"]
    assert resumed.connector == "connector.safetensors" and resumed.trained == []
    assert [s["stage"] for s in resumed.stages] == ["sft_decoder"]


@pytest.mark.parametrize("component", ["dit", "lvlm"])
def test_full_weights_absorb_the_adapters_below_them(tmp_path, component):
    # A full-parameter stage (sft_decoder / sft_captioner --lora-rank 0) merges the adapters below it and hands on
    # every weight; they replace the base's and any adapters a model carries (e.g. the release's).
    a = trained_model(2, (component,))
    save_handoff(tmp_path / "a", a, base=BASE, stage="sft", run=tmp_path, step=1, inherited=None,
                 trains=(f"{component}_adapter",))
    b = UAE.tiny(0).requires_grad_(False)
    load_handoff(b, read_handoff(tmp_path / "a"))
    unwrap_lora(getattr(b, component), merge=True)
    h = save_handoff(tmp_path / "b", b, base=BASE, stage="sft", run=tmp_path, step=1,
                     inherited=read_handoff(tmp_path / "a"), trains=(f"{component}_weights",))
    assert getattr(h, f"{component}_weights") == f"{component}.safetensors"
    assert getattr(h, f"{component}_adapters") == [] and h.base == BASE
    c = trained_model(4, (component,))  # carries an adapter of its own, frozen like a release's
    freeze_lora(getattr(c, component))
    load_handoff(c, read_handoff(tmp_path / "b"))
    assert not frozen_lora_layers(getattr(c, component))
    for (n, p), (_, q) in zip(getattr(b, component).state_dict().items(), getattr(c, component).state_dict().items()):
        assert torch.equal(p, q), n
    base = getattr(UAE.tiny(0), component).state_dict()
    assert any(not torch.equal(t, base[n]) for n, t in getattr(c, component).state_dict().items())  # merged in
    if component == "lvlm":  # the tied LM head is stored once and stays the embedding
        assert c.lvlm.lm_head.weight is c.lvlm.language_model.embed_tokens.weight

    # A later stage stacks its adapter on the full weights and hands both on, the weights hard-linked.
    apply_lora(getattr(c, component), ["q_proj"] if component == "lvlm" else ["to_q"], rank=2, alpha=4.0)
    d = save_handoff(tmp_path / "d", c, base=BASE, stage="next", run=tmp_path, step=1,
                     inherited=read_handoff(tmp_path / "b"), trains=(f"{component}_adapter",))
    assert getattr(d, f"{component}_adapters") == [f"{component}_adapter_0"]
    assert os.path.samefile(h.folder / f"{component}.safetensors", d.folder / f"{component}.safetensors")
    assert getattr(read_handoff(tmp_path / "d").inherited(), f"{component}_weights") == f"{component}.safetensors"


def test_bad_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_handoff(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="holds no model/handoff.json"):
        find_handoff(tmp_path)
    run = tmp_path / "run"
    (run / "step_00000002").mkdir(parents=True)
    (run / "latest").write_text("step_00000002")
    with pytest.raises(CheckpointError, match="no complete checkpoint .*step_00000002: no COMPLETE marker"):
        find_handoff(run)
    save_handoff(tmp_path / "m", trained_model(3), base=BASE, stage="x", run=tmp_path, step=1, inherited=None,
                 trains=("dit_adapter",))
    manifest = json.loads((tmp_path / "m" / "handoff.json").read_text())
    (tmp_path / "m" / "handoff.json").write_text(json.dumps({**manifest, "dit_adapters": ["dit_adapter_7"]}))
    with pytest.raises(CheckpointError, match="lists \\['dit_adapter_7'\\], which are not there"):
        read_handoff(tmp_path / "m")
    (tmp_path / "m" / "handoff.json").write_text(json.dumps({**manifest, "format": "other"}))
    with pytest.raises(CheckpointError, match="not a uae-handoff/1 manifest"):
        read_handoff(tmp_path / "m")
    (tmp_path / "m" / "handoff.json").write_text("{")
    with pytest.raises(CheckpointError, match="unreadable manifest"):
        read_handoff(tmp_path / "m")


def test_base_mismatch_names_every_option():
    h = Handoff(folder=Path("/runs/a/step_1/model"), base=base_identity(uae="/ckpt/UAE"))
    h.check_base(base_identity(uae="/ckpt/UAE"))
    with pytest.raises(ValueError, match=r"--uae: '/ckpt/UAE' there, None for this run; --seed \(of the tiny "
                                         r"preset\): None there, 0 for this run"):
        h.check_base(BASE)
    with pytest.raises(ValueError, match="--dit-lora"):
        h.check_base(base_identity(uae="/ckpt/UAE", dit_lora="/x"))
    with pytest.raises(ValueError, match="unknown base part"):
        base_identity(clip="/x")
    with pytest.raises(ValueError, match="unknown trained part"):
        save_handoff("/tmp/never", None, base=BASE, stage="x", run="/tmp", step=0, inherited=None, trains=("vae",))


def test_captioner_only_adapter_is_left_out_of_the_text_encoding(tmp_path):
    # GRPO on the captioner (--text-encoder frozen) hands on an LVLM adapter the decoder's text encoding leaves off:
    # after loading, the captioner runs with it and encode_text equals the model without it, through every later
    # stage's handoff and a resumed run's.
    a = trained_model(5, ("lvlm", "dit"))
    save_handoff(tmp_path / "a", a, base=BASE, stage="cold_start", run=tmp_path, step=1, inherited=None,
                 trains=("lvlm_adapter", "dit_adapter"))
    b = UAE.tiny(0).requires_grad_(False)
    load_handoff(b, read_handoff(tmp_path / "a"))
    apply_lora(b.lvlm.language_model, ["q_proj", "v_proj"], rank=2, alpha=4.0)
    with torch.no_grad():
        for m in lora_layers(b.lvlm).values():
            m.B.weight.normal_(0, 0.1)
    with pytest.raises(ValueError, match="trains none"):
        save_handoff(tmp_path / "x", b, base=BASE, stage="x", run=tmp_path, step=1,
                     inherited=read_handoff(tmp_path / "a"), trains=("dit_adapter",), captioner_only=True)
    h = save_handoff(tmp_path / "b", b, base=BASE, stage="grpo_encoder", run=tmp_path, step=1,
                     inherited=read_handoff(tmp_path / "a"), trains=("lvlm_adapter",), captioner_only=True)
    assert h.lvlm_adapters == ["lvlm_adapter_0", "lvlm_adapter_1"] and h.captioner_only == ["lvlm_adapter_1"]

    # A later stage (a DiT adapter) hands the split on.
    c = UAE.tiny(0).requires_grad_(False)
    load_handoff(c, read_handoff(tmp_path / "b"))
    apply_lora(c.dit, ["to_q"], rank=2, alpha=4.0)
    save_handoff(tmp_path / "c", c, base=BASE, stage="grpo_decoder", run=tmp_path, step=1,
                 inherited=read_handoff(tmp_path / "b"), trains=("dit_adapter",))
    assert read_handoff(tmp_path / "c").captioner_only == ["lvlm_adapter_1"]

    before, after = UAE.tiny(0).eval(), UAE.tiny(0).eval()
    load_handoff(before, read_handoff(tmp_path / "a"))
    load_handoff(after, read_handoff(tmp_path / "c"))
    assert len(after.captioner_only) == 2 * len(after.lvlm.language_model.layers)  # q_proj and v_proj levels
    ids, mask = before.generate_turn_ids(["a red circle", "two blue squares on grey"])
    with torch.no_grad():
        assert torch.equal(after.encode_text(["a red circle", "two blue squares on grey"]),
                           before.encode_text(["a red circle", "two blue squares on grey"]))
        captioner_after = after.lvlm.forward_hidden(ids, attention_mask=mask)
        captioner_before = before.lvlm.forward_hidden(ids, attention_mask=mask)
    assert (captioner_after - captioner_before).abs().max() > 1e-4  # the captioner does use the adapter

    # A run resuming stage b re-creates its adapter; the rest of the split stays.
    assert read_handoff(tmp_path / "b").inherited().captioner_only == []
    manifest = json.loads((tmp_path / "c" / "handoff.json").read_text())
    (tmp_path / "c" / "handoff.json").write_text(json.dumps({**manifest, "captioner_only": ["lvlm_adapter_9"]}))
    with pytest.raises(CheckpointError, match="captioner_only names \\['lvlm_adapter_9'\\], which are not LVLM"):
        read_handoff(tmp_path / "c")
