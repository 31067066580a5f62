"""model/mmdit.py against diffusers' SD3Transformer2DModel on tiny random checkpoints saved as safetensors."""
import json

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from safetensors.torch import save_file

import model.mmdit as mmdit
from model.mmdit import MMDiT, MMDiTConfig, StabilityCheckpoint
from tests.numerics import rel_err
from weights import CheckpointError

TINY = dict(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=3, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=40, caption_projection_dim=32, pooled_projection_dim=24,
            pos_embed_max_size=16)
STYLES = {
    "sd3": dict(qk_norm=None),
    "sd3.5-large": dict(qk_norm="rms_norm"),
    # head dim 24, MMDiT-X second attention in the first two blocks
    "sd3.5-medium": dict(qk_norm="rms_norm", dual_attention_layers=(0, 1), attention_head_dim=24,
                         caption_projection_dim=48),
}


def reference(style: str = "sd3", seed: int = 0) -> SD3Transformer2DModel:
    """A diffusers model with every parameter and the position table re-drawn, so that no weight keeps a
    structured (zero, one, sincos) initial value that could hide a mix-up."""
    torch.manual_seed(seed)
    ref = SD3Transformer2DModel(**{**TINY, **STYLES[style]}).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.2)
        ref.pos_embed.pos_embed.normal_()
    return ref


def saved(ref: SD3Transformer2DModel, folder, **kwargs):
    ref.save_pretrained(folder, safe_serialization=True, **kwargs)
    return folder


def inputs(cfg: dict, batch: int, h: int, w: int, length: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg["in_channels"], h, w, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    context = torch.randn(batch, length, cfg["joint_attention_dim"], generator=g)
    context[1:, length - 3:] = 0.0  # right padding of shorter captions (SD3 takes no text mask)
    pooled = torch.randn(batch, cfg["pooled_projection_dim"], generator=g)
    return x, t, context, pooled


def run_reference(ref, x, t, context, pooled):
    return ref(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t,
               return_dict=False)[0]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """(diffusers reference, our model loaded from its save_pretrained folder) per style, built once."""
    out = {}
    for style in STYLES:
        ref = reference(style)
        folder = saved(ref, tmp_path_factory.mktemp(style) / "transformer")
        out[style] = (ref, MMDiT.from_pretrained(folder), folder)
    return out


# --------------------------------------------------------------------------------------------------- parity

@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize("hw", [(10, 14), (6, 18)])
def test_velocity_matches_diffusers(loaded, style, hw):
    ref, model, _ = loaded[style]
    x, t, context, pooled = inputs(ref.config, 3, *hw)
    with torch.no_grad():
        want = run_reference(ref, x, t, context, pooled)
        got = model(x, t, context, pooled)
    assert got.shape == (3, 16, *hw) and got.dtype == torch.float32
    assert rel_err(got, want) <= 1e-5


def test_scalar_timestep_and_full_position_table(loaded):
    ref, model, _ = loaded["sd3"]
    x, _, context, pooled = inputs(ref.config, 2, 32, 32)  # 16x16 tokens: the whole table, no crop
    with torch.no_grad():
        want = run_reference(ref, x, torch.tensor([250.0, 250.0]), context, pooled)
        got = model(x, 250.0, context, pooled)
    assert rel_err(got, want) <= 1e-5


def test_one_joint_attention_call_per_block(loaded, monkeypatch):
    ref, model, _ = loaded["sd3.5-medium"]
    calls = []
    real = mmdit.attention

    def counting(q, k, v, **kw):
        calls.append((q.shape[2], k.shape[2]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(mmdit, "attention", counting)
    x, t, context, pooled = inputs(ref.config, 1, 10, 14)
    with torch.no_grad():
        model(x, t, context, pooled)
    joint = [c for c in calls if c == (35 + 7, 35 + 7)]
    image_only = [c for c in calls if c == (35, 35)]
    assert len(joint) == 3 and len(image_only) == 2 and len(calls) == 5


def test_gradients_match_diffusers(loaded):
    ref, model, _ = loaded["sd3.5-medium"]
    x, t, context, pooled = inputs(ref.config, 2, 6, 10)
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(2, 16, 6, 10, generator=g)
    grads = []
    for net in (ref, model):
        net.zero_grad()
        leaves = [a.clone().requires_grad_() for a in (x, context, pooled)]
        out = run_reference(net, leaves[0], t, *leaves[1:]) if net is ref else net(leaves[0], t, *leaves[1:])
        (out * weight).sum().backward()
        grads.append(dict({f"input{i}": a.grad for i, a in enumerate(leaves)},
                          **{n: p.grad for n, p in net.named_parameters()}))
    want, got = grads
    assert set(got) == set(want)
    for name, b in want.items():
        if b.abs().max() == 0:  # the last block's context queries: output dropped, gradient exactly zero
            assert got[name].abs().max() == 0, name
        else:
            assert rel_err(got[name], b) <= 1e-5, name


def test_activation_checkpointing_is_exact(loaded):
    ref, _, folder = loaded["sd3.5-large"]
    plain = MMDiT.from_pretrained(folder)
    ckpt = MMDiT.from_pretrained(folder)
    ckpt.gradient_checkpointing = True
    x, t, context, pooled = inputs(ref.config, 2, 10, 6)
    results = []
    for net in (plain, ckpt):
        c = context.clone().requires_grad_()
        out = net(x, t, c, pooled)
        out.square().mean().backward()
        results.append((out.detach(), c.grad, {n: p.grad for n, p in net.named_parameters()}))
    (o1, c1, p1), (o2, c2, p2) = results
    assert torch.equal(o1, o2) and torch.equal(c1, c2)
    for name in p1:
        assert torch.equal(p1[name], p2[name]), name
    assert MMDiT(MMDiTConfig(**TINY), gradient_checkpointing=True).gradient_checkpointing


# ---------------------------------------------------------------------------------------------------- loading

def test_sharded_folder_and_model_root_load_the_same(loaded, tmp_path):
    ref, model, _ = loaded["sd3.5-large"]
    folder = saved(ref, tmp_path / "root" / "transformer", max_shard_size="20KB")
    assert len(list(folder.glob("*.safetensors"))) > 1 and list(folder.glob("*.safetensors.index.json"))
    x, t, context, pooled = inputs(ref.config, 3, 10, 14)
    with torch.no_grad():
        want = model(x, t, context, pooled)
        for path in (folder, tmp_path / "root"):
            assert torch.equal(MMDiT.from_pretrained(path)(x, t, context, pooled), want)


def test_bf16_load(loaded):
    ref, _, folder = loaded["sd3"]
    model = MMDiT.from_pretrained(folder, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    x, t, context, pooled = inputs(ref.config, 2, 10, 14)
    with torch.no_grad():
        want = run_reference(ref, x, t, context, pooled)
        got = model(x, t, context, pooled)  # fp32 inputs are cast to the parameter dtype
    assert got.dtype == torch.bfloat16
    assert rel_err(got, want) <= 5e-2


def _to_stability(sd: dict, num_layers: int) -> dict:
    """diffusers -> Stability single-file names, written out independently of model/mmdit.py: fused [q; k; v],
    (shift, scale) order for the final layer and the last block's context modulation."""
    def swap(t):
        a, b = t.chunk(2)
        return torch.cat([b, a])

    out = {"pos_embed": sd["pos_embed.pos_embed"], "context_embedder.weight": sd["context_embedder.weight"],
           "context_embedder.bias": sd["context_embedder.bias"]}
    for p in ("weight", "bias"):
        out[f"x_embedder.proj.{p}"] = sd[f"pos_embed.proj.{p}"]
        for src, dst in (("t", "timestep"), ("y", "text")):
            out[f"{src}_embedder.mlp.0.{p}"] = sd[f"time_text_embed.{dst}_embedder.linear_1.{p}"]
            out[f"{src}_embedder.mlp.2.{p}"] = sd[f"time_text_embed.{dst}_embedder.linear_2.{p}"]
        out[f"final_layer.linear.{p}"] = sd[f"proj_out.{p}"]
        out[f"final_layer.adaLN_modulation.1.{p}"] = swap(sd[f"norm_out.linear.{p}"])
        for i in range(num_layers):
            d, s = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
            last = i == num_layers - 1
            out[s + f"x_block.attn.qkv.{p}"] = torch.cat([sd[d + f"attn.to_{n}.{p}"] for n in "qkv"])
            out[s + f"context_block.attn.qkv.{p}"] = torch.cat([sd[d + f"attn.add_{n}_proj.{p}"] for n in "qkv"])
            out[s + f"x_block.attn.proj.{p}"] = sd[d + f"attn.to_out.0.{p}"]
            out[s + f"x_block.adaLN_modulation.1.{p}"] = sd[d + f"norm1.linear.{p}"]
            ctx_mod = sd[d + f"norm1_context.linear.{p}"]
            out[s + f"context_block.adaLN_modulation.1.{p}"] = swap(ctx_mod) if last else ctx_mod
            out[s + f"x_block.mlp.fc1.{p}"] = sd[d + f"ff.net.0.proj.{p}"]
            out[s + f"x_block.mlp.fc2.{p}"] = sd[d + f"ff.net.2.{p}"]
            if not last:
                out[s + f"context_block.attn.proj.{p}"] = sd[d + f"attn.to_add_out.{p}"]
                out[s + f"context_block.mlp.fc1.{p}"] = sd[d + f"ff_context.net.0.proj.{p}"]
                out[s + f"context_block.mlp.fc2.{p}"] = sd[d + f"ff_context.net.2.{p}"]
            if d + f"attn2.to_q.{p}" in sd:
                out[s + f"x_block.attn2.qkv.{p}"] = torch.cat([sd[d + f"attn2.to_{n}.{p}"] for n in "qkv"])
                out[s + f"x_block.attn2.proj.{p}"] = sd[d + f"attn2.to_out.0.{p}"]
            if p == "weight" and d + "attn.norm_q.weight" in sd:
                for n in "qk":
                    out[s + f"x_block.attn.ln_{n}.weight"] = sd[d + f"attn.norm_{n}.weight"]
                    out[s + f"context_block.attn.ln_{n}.weight"] = sd[d + f"attn.norm_added_{n}.weight"]
                    if d + "attn2.norm_q.weight" in sd:
                        out[s + f"x_block.attn2.ln_{n}.weight"] = sd[d + f"attn2.norm_{n}.weight"]
    return {k: v.contiguous() for k, v in out.items()}


@pytest.mark.parametrize("style", ["sd3", "sd3.5-medium"])
def test_stability_single_file(loaded, tmp_path, style):
    ref, _, _ = loaded[style]
    sd = {k: v.detach() for k, v in ref.state_dict().items()}
    stability = _to_stability(sd, ref.config.num_layers)
    # The test's mapping must agree with diffusers' own converter.
    back = convert_sd3_transformer_checkpoint_to_diffusers({"model.diffusion_model." + k: v.clone()
                                                             for k, v in stability.items()})
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)

    file = tmp_path / "sd3_single.safetensors"
    bundled = {"first_stage_model.decoder.conv_in.weight": torch.zeros(2, 2)}  # other models in the same file
    save_file({**{"model.diffusion_model." + k: v for k, v in stability.items()}, **bundled}, file)
    config = MMDiTConfig.from_json(dict(ref.config))
    model = MMDiT.from_pretrained(file, config=config)
    x, t, context, pooled = inputs(ref.config, 3, 10, 14)
    with torch.no_grad():
        assert rel_err(model(x, t, context, pooled), run_reference(ref, x, t, context, pooled)) <= 1e-5

    unprefixed = tmp_path / "unprefixed.safetensors"
    save_file(stability, unprefixed)
    assert StabilityCheckpoint.detect(stability) and len(StabilityCheckpoint(stability, 3)) == len(sd)
    with torch.no_grad():
        assert torch.equal(MMDiT.from_pretrained(unprefixed, config=config)(x, t, context, pooled),
                           model(x, t, context, pooled))


def test_stability_file_needs_a_config(loaded, tmp_path):
    ref, _, _ = loaded["sd3"]
    file = tmp_path / "sub" / "sd3.safetensors"
    file.parent.mkdir()
    save_file(_to_stability({k: v.detach() for k, v in ref.state_dict().items()}, 3), file)
    with pytest.raises(ValueError, match="no config.json"):
        MMDiT.from_pretrained(file)
    with pytest.raises(CheckpointError, match="missing key 'transformer_blocks.3"):  # 24 layers asked, 3 stored
        MMDiT.from_pretrained(file, config="sd3-medium")


# ----------------------------------------------------------------------------------------------------- config

def test_config_from_json_matches_diffusers(loaded):
    ref, _, folder = loaded["sd3.5-medium"]
    cfg = MMDiTConfig.from_json(folder / "config.json")
    assert cfg == MMDiTConfig.from_json(folder)
    assert cfg == MMDiTConfig.from_json(json.loads((folder / "config.json").read_text()))
    for key, value in ref.config.items():
        if not key.startswith("_"):
            assert getattr(cfg, key) == (tuple(value) if isinstance(value, list) else value), key
    # an omitted key takes diffusers' default
    assert MMDiTConfig.from_json({"caption_projection_dim": 1152}) == MMDiTConfig()
    assert MMDiTConfig.from_json({**dict(ref.config), "out_channels": None}).out_channels == 16


def test_presets():
    large = MMDiTConfig.preset("sd3.5-large")
    assert (large.num_layers, large.inner_dim, large.qk_norm, large.pos_embed_max_size) == (38, 2432, "rms_norm", 192)
    medium = MMDiTConfig.preset("sd3.5-medium")
    assert medium.dual_attention_layers == tuple(range(13)) and medium.pos_embed_max_size == 384
    sd3 = MMDiTConfig.preset("sd3-medium")
    assert (sd3.num_layers, sd3.inner_dim, sd3.qk_norm, sd3.dual_attention_layers) == (24, 1536, None, ())
    for cfg in (large, medium, sd3):
        assert (cfg.patch_size, cfg.in_channels, cfg.out_channels) == (2, 16, 16)
        assert (cfg.attention_head_dim, cfg.joint_attention_dim, cfg.pooled_projection_dim) == (64, 4096, 2048)
    with pytest.raises(ValueError, match="unknown MMDiT preset 'sd4'"):
        MMDiTConfig.preset("sd4")


@pytest.mark.parametrize("name", ["sd3-medium", "sd3.5-medium", "sd3.5-large", "tiny"])
def test_preset_parameters_match_diffusers(name):
    """Every parameter name and shape of a released config equals diffusers' (built on the meta device)."""
    cfg = MMDiTConfig.preset(name)
    with torch.device("meta"):
        ours = MMDiT(cfg).state_dict()
        ref = SD3Transformer2DModel(**{f: getattr(cfg, f) for f in cfg.__dataclass_fields__}).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}


def test_tiny_preset_runs():
    torch.manual_seed(0)
    model = MMDiT(MMDiTConfig.preset("tiny"))
    x = torch.randn(2, 16, 8, 12)
    out = model(x, torch.tensor([10.0, 900.0]), torch.randn(2, 5, 20), torch.randn(2, 10))
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("bad, match", [
    (dict(caption_projection_dim=40), "caption_projection_dim"),
    (dict(qk_norm="layer_norm"), "qk_norm"),
    (dict(dual_attention_layers=(0, 3)), r"dual_attention_layers \[3\]"),
    (dict(patch_size=0), "patch_size"),
    (dict(hidden_size=8), r"unknown SD3Transformer2DModel config key\(s\) \['hidden_size'\]"),
])
def test_bad_config(bad, match):
    with pytest.raises(ValueError, match=match):
        MMDiTConfig.from_json({**TINY, **bad})


def test_unreadable_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read an MMDiT config"):
        MMDiTConfig.from_json(tmp_path)


# -------------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("change, match", [
    (lambda x, t, c, p: (x[:, :, :9], t, c, p), "multiples of patch_size 2"),
    (lambda x, t, c, p: (torch.zeros(3, 16, 34, 8), t, c, p), "exceed the position table: at most 32"),
    (lambda x, t, c, p: (x[:, :4], t, c, p), r"latents x must be \[B, 16, H, W\]"),
    (lambda x, t, c, p: (x[0], t, c, p), r"latents x must be \[B, 16, H, W\]"),
    (lambda x, t, c, p: (x, t, c[..., :32], p), "joint_attention_dim=40"),
    (lambda x, t, c, p: (x, t, c[:2], p), r"context must be \[B=3"),
    (lambda x, t, c, p: (x, t, c, p[:, :20]), "pooled_projection_dim=24"),
    (lambda x, t, c, p: (x, t[:2], c, p), r"timestep must be a scalar or \[B=3\]"),
])
def test_bad_inputs(loaded, change, match):
    ref, model, _ = loaded["sd3"]
    args = change(*inputs(ref.config, 3, 10, 14))
    with pytest.raises(ValueError, match=match):
        model(*args)


def test_missing_extra_and_misshaped_keys(loaded, tmp_path):
    ref, _, folder = loaded["sd3"]
    sd = {k: v.detach().contiguous() for k, v in ref.state_dict().items()}
    config = (folder / "config.json").read_text()
    cases = {
        "missing": ({k: v for k, v in sd.items() if k != "transformer_blocks.1.attn.to_k.bias"},
                    "missing key 'transformer_blocks.1.attn.to_k.bias'"),
        "extra": ({**sd, "transformer_blocks.0.attn.to_x.weight": torch.zeros(1)},
                  "unexpected key 'transformer_blocks.0.attn.to_x.weight'"),
        "shape": ({**sd, "pos_embed.pos_embed": torch.zeros(1, 100, 32)}, "shape mismatch for 'pos_embed.pos_embed'"),
    }
    for name, (tensors, match) in cases.items():
        (tmp_path / name).mkdir()
        save_file(tensors, tmp_path / name / "diffusion_pytorch_model.safetensors")
        (tmp_path / name / "config.json").write_text(config)
        with pytest.raises(CheckpointError, match=match):
            MMDiT.from_pretrained(tmp_path / name)


def test_fresh_model_position_table_is_diffusers_initial_table():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    from model.mmdit import sincos_position_table

    for dim, size, base in [(32, 16, 4), (48, 12, 64), (16, 7, 3)]:
        ours = sincos_position_table(dim, size, base)[0]
        ref = get_2d_sincos_pos_embed(dim, size, base_size=base).float()
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-7)
