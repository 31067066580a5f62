"""model/lora.py against peft 0.21 (and diffusers' SD3 LoRA files): forward, disable, merge, init, gradients,
PEFT/diffusers file round trips both ways, stacked (frozen) adapters, bad input."""
import copy
import json

import pytest
import torch
from torch import nn

from model.layers import attention
from model.lora import (
    LoRALinear, apply_lora, freeze_lora, frozen_lora_layers, load_lora, lora_disabled, lora_layers,
    lora_levels_disabled, lora_parameters, lora_state_dict, merge_lora, save_lora, set_lora_enabled, unmerge_lora,
    unwrap_lora,
)
from tests.numerics import rel_err
from weights import CheckpointError

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

D, HEADS, FF = 15, 3, 29


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(D, D)])  # diffusers' "to_out.0" naming

    def forward(self, x, mask):
        B, L, _ = x.shape
        q, k, v = (p(x).view(B, L, HEADS, -1).transpose(1, 2) for p in (self.to_q, self.to_k, self.to_v))
        o = attention(q, k, v, mask=mask[:, None, None, :])
        return self.to_out[0](o.transpose(1, 2).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, FF), nn.Linear(FF, D)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.attn = Attention()
        self.mlp = MLP()

    def forward(self, x, mask):
        x = x + self.attn(self.norm(x), mask)
        return x + self.mlp(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(D, 7)

    def forward(self, x, mask):
        for b in self.blocks:
            x = b(x, mask)
        return self.head(x)


def make_base(seed=0):
    torch.manual_seed(seed)
    return Net().eval()


def make_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 7, D, generator=g)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 5:] = False  # padded sequences
    mask[2, 3:] = False
    return x, mask


def randomize_lora(ours, peft_model=None, seed=2):
    """Same random A and B in both (B is zero at init, which would make every comparison trivial)."""
    g = torch.Generator().manual_seed(seed)
    inner = peft_model.base_model.model if peft_model is not None else None
    with torch.no_grad():
        for name, m in lora_layers(ours).items():
            for which in "AB":
                lin = getattr(m, which)
                w = torch.randn(lin.weight.shape, generator=g) * 0.3
                lin.weight.copy_(w)
                if inner is not None:
                    getattr(inner.get_submodule(name), f"lora_{which}")[m.adapter_name].weight.copy_(w)


def pair(targets, rank=3, alpha=5, dropout=0.0, init="gaussian"):
    base = make_base()
    ours = copy.deepcopy(base)
    names = apply_lora(ours, targets, rank, alpha, dropout=dropout, init=init)
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                                                         lora_dropout=dropout, init_lora_weights=True))
    randomize_lora(ours, ref)
    return base, ours, ref.eval(), names


def peft_wrapped(ref):
    from peft.tuners.lora import LoraLayer
    return [n.removeprefix("base_model.model.") for n, m in ref.named_modules() if isinstance(m, LoraLayer)]


TARGETS = [
    ["to_q", "to_v", "fc2"],
    ["to_out.0", "blocks.1.mlp.fc1"],
    r"blocks\.\d\.attn\.to_(q|k)",
]


@pytest.mark.parametrize("targets", TARGETS)
def test_forward_matches_peft(targets):
    base, ours, ref, names = pair(targets)
    assert names == peft_wrapped(ref)
    x, mask = make_inputs()
    with torch.no_grad():
        out, want = ours(x, mask), ref(x, mask)
        assert rel_err(out, want) <= 1e-5
        assert rel_err(out, base(x, mask)) > 1e-3  # the adapters do change the function


def test_dropout_on_lora_input_matches_peft():
    base, ours, ref, _ = pair(["to_k", "fc1"], dropout=0.25)
    ours.train(), ref.train()
    x, mask = make_inputs()
    torch.manual_seed(5)
    out = ours(x, mask)
    torch.manual_seed(5)
    want = ref(x, mask)
    assert rel_err(out, want) <= 1e-5
    ours.eval()
    with torch.no_grad():
        assert rel_err(ours(x, mask), out) > 1e-4  # dropout was active in training
        assert rel_err(ours(x, mask), ref.eval()(x, mask)) <= 1e-5


def test_disabled_is_base_exactly():
    base, ours, ref, _ = pair(["to_q", "to_k", "to_v", "to_out.0", "fc1", "fc2"])
    x, mask = make_inputs()
    with torch.no_grad():
        adapted = ours(x, mask)
        with lora_disabled(ours):
            assert torch.equal(ours(x, mask), base(x, mask))
        assert torch.equal(ours(x, mask), adapted)
        set_lora_enabled(ours, False)
        assert torch.equal(ours(x, mask), base(x, mask))
        with lora_disabled(ours):
            pass
        assert not any(m.enabled for m in lora_layers(ours).values())  # the context restores the previous state
        set_lora_enabled(ours, True)
        assert torch.equal(ours(x, mask), adapted)


def test_merge_unmerge():
    base, ours, _, _ = pair(["to_q", "to_out.0", "fc2"], rank=4, alpha=7)
    x, mask = make_inputs()
    before = {n: m.base_layer.weight.clone() for n, m in lora_layers(ours).items()}
    with torch.no_grad():
        unmerged = ours(x, mask)
        merge_lora(ours)
        assert rel_err(ours(x, mask), unmerged) <= 1e-5
        assert not torch.equal(next(iter(lora_layers(ours).values())).base_layer.weight, next(iter(before.values())))
        with pytest.raises(ValueError, match="already merged"):
            merge_lora(ours)
        with pytest.raises(ValueError, match="merged"):
            set_lora_enabled(ours, False)
        unmerge_lora(ours)
        with pytest.raises(ValueError, match="not merged"):
            unmerge_lora(ours)
        for n, m in lora_layers(ours).items():
            assert rel_err(m.base_layer.weight, before[n]) <= 1e-6
        assert rel_err(ours(x, mask), unmerged) <= 1e-5
        set_lora_enabled(ours, False)
        with pytest.raises(ValueError, match="disabled"):
            merge_lora(ours)


def assert_only_these_train(model, params):
    """After a backward: `params` train and got a non-zero gradient, every other parameter is frozen, no gradient."""
    ids = {id(p) for p in params}
    for n, p in model.named_parameters():
        if id(p) in ids:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert not p.requires_grad and p.grad is None, n


def test_only_lora_params_get_gradients():
    base, ours, _, names = pair(["to_q", "to_v", "fc1"])
    x, mask = make_inputs()
    x.requires_grad_(True)
    ours(x, mask).square().mean().backward()
    params = lora_parameters(ours)
    assert len(params) == 2 * len(names) == 2 * 6
    assert_only_these_train(ours, params)
    assert x.grad is not None


def test_lora_state_dict_names_follow_peft():
    _, ours, ref, _ = pair(["to_k", "fc2"])
    sd = lora_state_dict(ours)
    want = {k.removeprefix("base_model.model."): v for k, v in ref.state_dict().items() if ".lora_" in k}
    assert sd.keys() == want.keys()
    assert all(torch.equal(sd[k], want[k]) for k in sd)


@pytest.mark.parametrize("init", ["gaussian", "kaiming"])
def test_init_b_zero_and_a_distribution(init):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(1024, 64), nn.Tanh(), nn.Linear(64, 5))
    x = torch.randn(4, 1024)
    with torch.no_grad():
        want = model(x)
        apply_lora(model, ["0"], rank=8, alpha=16, init=init)
        assert torch.equal(model(x), want)
    a, b = model[0].A.weight, model[0].B.weight
    assert torch.equal(b, torch.zeros_like(b))
    if init == "gaussian":  # peft: normal_(std=1/r)
        assert abs(a.std().item() - 1 / 8) < 0.05 / 8
    else:  # peft: kaiming_uniform_(a=sqrt(5)) -> U(-1/sqrt(in), 1/sqrt(in))
        bound = 1 / 1024 ** 0.5
        assert a.abs().max().item() <= bound
        assert abs(a.std().item() - bound / 3 ** 0.5) < 0.05 * bound / 3 ** 0.5
    assert abs(a.mean().item()) < 0.1 * a.std().item()


@pytest.mark.parametrize("targets", [["to_q", "fc2"], ["blocks.0.mlp.fc1", "to_v"]])
def test_save_ours_load_in_peft(tmp_path, targets):
    base, ours, _, names = pair(targets, rank=2, alpha=3, init="kaiming")
    save_lora(ours, tmp_path, base_model_name_or_path="tiny/net")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["bias"], config["task_type"]) == \
        ("LORA", 2, 3, "none", None)
    assert config["init_lora_weights"] is True
    ref = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert peft_wrapped(ref) == names
    x, mask = make_inputs()
    with torch.no_grad():
        assert rel_err(ref(x, mask), ours(x, mask)) <= 1e-5


@pytest.mark.parametrize("init", ["gaussian", True])
def test_save_peft_load_ours(tmp_path, init):
    base = make_base()
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(r=3, lora_alpha=6, target_modules=["to_k", "to_out.0", "fc1"],
                                                         init_lora_weights=init))
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if ".lora_" in n:
                p.normal_(0, 0.3)
    ref.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    names = load_lora(ours, tmp_path)
    assert names == peft_wrapped(ref)
    assert all(m.init == ("gaussian" if init == "gaussian" else "kaiming") for m in lora_layers(ours).values())
    x, mask = make_inputs()
    with torch.no_grad():
        assert rel_err(ours(x, mask), ref.eval()(x, mask)) <= 1e-5
    # loading again into the already wrapped model reuses its layers
    again = load_lora(ours, tmp_path)
    assert again == names
    merge_lora(ours)
    with pytest.raises(ValueError, match="unmerge_lora first"):
        load_lora(ours, tmp_path)


def test_tiny_transformers_model_matches_peft(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32)
    base = Qwen2ForCausalLM(cfg).eval()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ours = copy.deepcopy(base)
    apply_lora(ours, targets, rank=4, alpha=8)
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets)).eval()
    randomize_lora(ours, ref)
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(4))
    am = torch.ones_like(ids)
    am[1, 6:] = 0
    with torch.no_grad():
        out = ours(input_ids=ids, attention_mask=am).logits
        assert rel_err(out, ref(input_ids=ids, attention_mask=am).logits) <= 1e-5
        save_lora(ours, tmp_path)
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
        assert rel_err(out, loaded(input_ids=ids, attention_mask=am).logits) <= 1e-5


def _tiny_sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=4,
                                 num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=8,
                                 pooled_projection_dim=6, out_channels=4, pos_embed_max_size=8).eval()


def _sd3_inputs():
    g = torch.Generator().manual_seed(6)
    return dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(2, 5, 12, generator=g),
                pooled_projections=torch.randn(2, 6, generator=g), timestep=torch.tensor([300.0, 700.0]))


SD3_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def test_diffusers_sd3_lora_files(tmp_path):
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict

    base = _tiny_sd3()
    ref = copy.deepcopy(base)
    ref.add_adapter(LoraConfig(r=3, lora_alpha=4, target_modules=SD3_TARGETS, init_lora_weights="gaussian"))
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if ".lora_" in n:
                p.normal_(0, 0.3)
        want = ref(**_sd3_inputs(), return_dict=False)[0]
        # the model's own save: bare keys, config in the safetensors metadata
        ref.save_lora_adapter(tmp_path / "model")
        # the pipeline's save: "transformer." prefix on keys and metadata
        StableDiffusion3Pipeline.save_lora_weights(
            tmp_path / "pipe", transformer_lora_layers=get_peft_model_state_dict(ref),
            transformer_lora_adapter_metadata=ref.peft_config["default"].to_dict())
        for folder, prefix in [("model", None), ("pipe", None), ("pipe", "transformer")]:
            ours = copy.deepcopy(base)
            names = load_lora(ours, tmp_path / folder, prefix=prefix)
            assert names == peft_wrapped(ref) and len(names) == 15  # the last block has no to_add_out
            assert rel_err(ours(**_sd3_inputs(), return_dict=False)[0], want) <= 1e-5
        # our file, in the PEFT layout, read back by peft on the diffusers model
        save_lora(ours, tmp_path / "ours")
        back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
        assert rel_err(back(**_sd3_inputs(), return_dict=False)[0], want) <= 1e-5


def test_pipeline_file_without_metadata_needs_apply_first(tmp_path):
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict

    base = _tiny_sd3()
    ref = copy.deepcopy(base)
    ref.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"]))
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if ".lora_" in n:
                p.normal_(0, 0.3)
        StableDiffusion3Pipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(ref))
        ours = copy.deepcopy(base)
        with pytest.raises(ValueError, match="apply_lora"):
            load_lora(ours, tmp_path)
        apply_lora(ours, ["to_q", "to_v"], rank=2, alpha=2)
        load_lora(ours, tmp_path / "pytorch_lora_weights.safetensors")
        want = ref(**_sd3_inputs(), return_dict=False)[0]
        assert rel_err(ours(**_sd3_inputs(), return_dict=False)[0], want) <= 1e-5


# ---- stacked (frozen) adapters ----

# A release adapter and two training stages. Overlapping target sets, so paths carry one, two or three levels and
# some levels skip paths below or above them. (Names: peft warns about an adapter name inside "lora_", like "a".)
LEVELS = [
    ("release", ["to_q", "to_v", "fc2"], 3, 5),
    ("stage1", ["to_q", "to_k", "fc2", "head"], 2, 3),
    ("stage2", r"blocks\.1\.(attn\.to_q|mlp\.fc2|mlp\.fc1)", 4, 4),
]


def peft_paths(ref, adapter):
    from peft.tuners.lora import LoraLayer
    return [n.removeprefix("base_model.model.") for n, m in ref.named_modules()
            if isinstance(m, LoraLayer) and adapter in m.lora_A]


def build_stack(base, depth, ref=None, dtype=None):
    """Ours: levels[:depth] applied in turn, each randomized, every one but the last frozen. With `ref` (a peft model
    holding the same adapters), the same weights go into it."""
    ours = copy.deepcopy(base)
    for i, (name, targets, rank, alpha) in enumerate(LEVELS[:depth]):
        wrapped = apply_lora(ours, targets, rank, alpha, adapter_name=name, dtype=dtype)
        if ref is not None:
            assert wrapped == peft_paths(ref, name)  # frozen levels are matched as the Linear at their path
        randomize_lora(ours, ref, seed=10 + i)
        if i < depth - 1:
            assert freeze_lora(ours) == wrapped
    return ours


def peft_stack(base, depth):
    ref = None
    for name, targets, rank, alpha in LEVELS[:depth]:
        cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets)
        if ref is None:
            ref = get_peft_model(copy.deepcopy(base), cfg, adapter_name=name)
        else:
            ref.add_adapter(name, cfg)
    return ref.eval()


def set_peft_active(ref, depth):
    # PeftModel.set_adapter takes one name; the tuner's set_adapter takes a list and sums the adapters in order
    ref.base_model.set_adapter([name for name, *_ in LEVELS[:depth]])


@pytest.mark.parametrize("depth", [2, 3])
def test_stack_matches_peft_with_several_active_adapters(depth):
    base = make_base()
    ref = peft_stack(base, depth)
    ours = build_stack(base, depth, ref)
    x, mask = make_inputs()
    with torch.no_grad():
        out = ours(x, mask)
        set_peft_active(ref, depth)
        assert rel_err(out, ref(x, mask)) <= 1e-5
        with lora_disabled(ours):  # the RL reference: newest adapter off, the frozen ones on
            older = ours(x, mask)
        set_peft_active(ref, depth - 1)
        assert rel_err(older, ref(x, mask)) <= 1e-5
        # every level contributes: the stack differs from one level less, and one level less from the base
        assert rel_err(out, older) > 1e-3 and rel_err(older, base(x, mask)) > 1e-3
    assert list(lora_layers(ours)) == peft_paths(ref, LEVELS[depth - 1][0])
    older_paths = {p for name, *_ in LEVELS[:depth - 1] for p in peft_paths(ref, name)}
    frozen = frozen_lora_layers(ours)
    assert set(frozen) == older_paths
    # the outermost frozen level per path: the newest frozen adapter that targets it
    for path, m in frozen.items():
        assert m.frozen and m.adapter_name == next(name for name, *_ in reversed(LEVELS[:depth - 1])
                                                   if path in peft_paths(ref, name))


def test_levels_disabled_leaves_one_adapter_out_of_the_stack():
    # The decoder's text encoding without a captioner-only adapter (model/uae.py): one frozen level in the middle of
    # the stack off equals peft summing the other two adapters.
    base = make_base()
    ref = peft_stack(base, 3)
    ours = build_stack(base, 3, ref)
    middle = [m for m in ours.modules() if isinstance(m, LoRALinear) and m.adapter_name == "stage1"]
    assert middle and all(m.frozen for m in middle)
    x, mask = make_inputs()
    with torch.no_grad():
        full = ours(x, mask)
        with lora_levels_disabled(middle):
            without = ours(x, mask)
        ref.base_model.set_adapter(["release", "stage2"])
        assert rel_err(without, ref(x, mask)) <= 1e-5
        assert rel_err(full, without) > 1e-3
        assert torch.equal(ours(x, mask), full)  # every level is back on
    merge_lora(ours)
    with pytest.raises(ValueError, match="cannot disable merged LoRA levels"):
        with lora_levels_disabled(list(lora_layers(ours).values())):
            pass


def test_stack_parameter_names():
    base = make_base()
    ours = build_stack(base, 3)
    sd = ours.state_dict()
    # blocks.1.attn.to_q carries all three levels; the active one keeps peft's names, each frozen one gains a
    # base_layer. per level above it
    p = "blocks.1.attn.to_q"
    assert {k for k in sd if k.startswith(p + ".")} == {
        f"{p}.lora_A.stage2.weight", f"{p}.lora_B.stage2.weight",
        f"{p}.base_layer.lora_A.stage1.weight", f"{p}.base_layer.lora_B.stage1.weight",
        f"{p}.base_layer.base_layer.lora_A.release.weight", f"{p}.base_layer.base_layer.lora_B.release.weight",
        f"{p}.base_layer.base_layer.base_layer.weight", f"{p}.base_layer.base_layer.base_layer.bias",
    }
    assert set(lora_state_dict(ours)) == {f"{n}.lora_{w}.stage2.weight" for n in lora_layers(ours) for w in "AB"}
    inner = ours.get_submodule(p).linear
    assert type(inner) is nn.Linear and torch.equal(inner.weight, base.get_submodule(p).weight)
    assert ours.get_submodule(p).weight is inner.weight
    assert (ours.get_submodule(p).in_features, ours.get_submodule(p).out_features) == (D, D)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_freeze_then_new_adapter_is_bitwise_the_same_model(dtype):
    base = make_base().to(dtype)
    ours = copy.deepcopy(base)
    apply_lora(ours, ["to_q", "to_v", "fc2"], rank=3, alpha=5)
    randomize_lora(ours)
    x, mask = make_inputs()
    x = x.to(dtype)
    with torch.no_grad():
        before = ours(x, mask)
        assert not torch.equal(before, base(x, mask))
        freeze_lora(ours)
        assert not any(p.requires_grad for p in ours.parameters())
        assert torch.equal(ours(x, mask), before)
        apply_lora(ours, ["to_q", "to_k", "fc1"], rank=2, alpha=4)  # fresh: B = 0
        assert torch.equal(ours(x, mask), before)
        with lora_disabled(ours):
            assert torch.equal(ours(x, mask), before)


def test_stack_only_new_adapter_trains():
    ours = build_stack(make_base(), 3)
    new = lora_layers(ours)
    params = lora_parameters(ours)
    assert len(params) == 2 * len(new) == 2 * 3
    assert {id(p) for p in params} == {id(m.A.weight) for m in new.values()} | {id(m.B.weight) for m in new.values()}
    x, mask = make_inputs()
    ours(x, mask).square().mean().backward()
    assert_only_these_train(ours, params)


def test_stack_merge_unmerge_touches_innermost_weight():
    base = make_base()
    ours = build_stack(base, 2)
    x, mask = make_inputs()
    frozen_before = {k: v.clone() for k, v in ours.state_dict().items() if ".base_layer.lora_" in k}
    with torch.no_grad():
        want = ours(x, mask)
        merge_lora(ours)
        assert rel_err(ours(x, mask), want) <= 1e-5
        p = "blocks.0.attn.to_q"  # b on top of a
        assert not torch.equal(ours.get_submodule(p).weight, base.get_submodule(p).weight)
        with pytest.raises(ValueError, match="frozen"):
            ours.get_submodule(p).base_layer.merge()
        unmerge_lora(ours)
        assert rel_err(ours.get_submodule(p).weight, base.get_submodule(p).weight) <= 1e-6
        assert rel_err(ours(x, mask), want) <= 1e-5
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in frozen_before.items())


def test_stack_save_load_round_trip(tmp_path):
    base = make_base()
    ours = build_stack(base, 3)
    save_lora(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    # the file describes the active adapter alone, at the outer wrapper's paths
    from safetensors.torch import load_file
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == {f"base_model.model.{n}.lora_{w}.weight" for n in lora_layers(ours) for w in "AB"}
    assert (config["r"], config["lora_alpha"]) == (4, 4)
    x, mask = make_inputs()
    with torch.no_grad():
        want = ours(x, mask)
        # onto a fresh model with the same frozen stack
        again = build_stack(base, 2)
        freeze_lora(again)
        assert load_lora(again, tmp_path, adapter_name="stage2") == list(lora_layers(ours))
        assert torch.equal(again(x, mask), want)
        assert set(again.state_dict()) == set(ours.state_dict())
        # onto the plain base: the adapter alone, as peft reads the same folder
        plain = copy.deepcopy(base)
        load_lora(plain, tmp_path)
        assert not frozen_lora_layers(plain)
        assert rel_err(plain(x, mask), PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()(x, mask)) <= 1e-5
        assert rel_err(plain(x, mask), want) > 1e-3  # the frozen levels were not in the file


def test_unwrap_merge_matches_stack_and_peft_merge():
    base = make_base()
    ref = peft_stack(base, 3)
    ours = build_stack(base, 3, ref)
    x, mask = make_inputs()
    with torch.no_grad():
        want = ours(x, mask)
        paths = set(frozen_lora_layers(ours)) | set(lora_layers(ours))
        assert set(unwrap_lora(ours, merge=True)) == paths
        assert not any(isinstance(m, LoRALinear) for m in ours.modules())
        assert ours.state_dict().keys() == base.state_dict().keys()
        assert rel_err(ours(x, mask), want) <= 1e-5
        set_peft_active(ref, 3)
        merged = ref.merge_and_unload()
        for k, v in merged.state_dict().items():
            assert torch.allclose(ours.state_dict()[k], v, rtol=1e-6, atol=1e-7), k
        assert any(not torch.equal(ours.state_dict()[k], v) for k, v in base.state_dict().items())


def test_unwrap_merge_bf16_rounds_as_peft():
    # In bf16 every level's add rounds, so the order and the rounding matter. peft keeps adapters of a bf16 model in
    # fp32 (autocast_adapter_dtype=True) and adds each fp32 delta into the bf16 weight, oldest level first.
    base = make_base().to(torch.bfloat16)
    ref = peft_stack(base, 3)
    assert all(p.dtype == torch.float32 for n, p in ref.named_parameters() if ".lora_" in n)
    ours = build_stack(base, 3, ref, dtype=torch.float32)
    with torch.no_grad():
        unwrap_lora(ours, merge=True)
        set_peft_active(ref, 3)
        merged = ref.merge_and_unload().state_dict()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, merged[k]), k


def test_unwrap_drop_is_base_exactly():
    base = make_base()
    ours = build_stack(base, 3)
    x, mask = make_inputs()
    unwrap_lora(ours, merge=False)
    assert not any(isinstance(m, LoRALinear) for m in ours.modules())
    sd = ours.state_dict()
    assert sd.keys() == base.state_dict().keys()
    assert all(torch.equal(sd[k], v) for k, v in base.state_dict().items())
    with torch.no_grad():
        assert torch.equal(ours(x, mask), base(x, mask))
    # a merged active adapter is taken back out of the weight before it is dropped
    ours = build_stack(base, 2)
    merge_lora(ours)
    unwrap_lora(ours, merge=False)
    for k, v in base.state_dict().items():
        assert torch.allclose(ours.state_dict()[k], v, rtol=1e-6, atol=1e-6), k


# ---- bad input ----

def test_target_matching_nothing():
    with pytest.raises(ValueError, match=r"\['nope'\] match no module"):
        apply_lora(make_base(), ["to_q", "nope"], rank=2, alpha=2)
    with pytest.raises(ValueError, match="match no module"):
        apply_lora(make_base(), r"blocks\.9\..*", rank=2, alpha=2)
    with pytest.raises(ValueError, match="does not compile"):
        apply_lora(make_base(), "to_q(", rank=2, alpha=2)
    with pytest.raises(ValueError, match="non-empty list"):
        apply_lora(make_base(), [], rank=2, alpha=2)


def test_target_not_linear():
    with pytest.raises(ValueError, match=r"'blocks.0.attn' of type Attention"):
        apply_lora(make_base(), ["attn"], rank=2, alpha=2)
    with pytest.raises(ValueError, match="LayerNorm"):
        apply_lora(make_base(), ["norm"], rank=2, alpha=2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=0), "rank"), (dict(rank=2.0), "rank"), (dict(alpha=0), "alpha"), (dict(dropout=1.0), "dropout"),
    (dict(init="orthogonal"), "init"), (dict(adapter_name="a.b"), "adapter_name"),
])
def test_bad_hyperparameters(kwargs, match):
    args = dict(rank=2, alpha=2) | kwargs
    with pytest.raises(ValueError, match=match):
        apply_lora(make_base(), ["to_q"], **args)


def test_second_adapter_and_missing_adapter():
    model = make_base()
    with pytest.raises(ValueError, match="no LoRA layers"):
        set_lora_enabled(model, False)
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_lora(model, "unused")
    assert freeze_lora(model) == []
    apply_lora(model, ["to_q"], rank=2, alpha=2)
    # a second adapter goes on top of a frozen first one only, never beside an active one
    with pytest.raises(ValueError, match="already has LoRA.*freeze_lora"):
        apply_lora(model, ["to_k"], rank=2, alpha=2, adapter_name="other")
    with pytest.raises(ValueError, match="active LoRALinear.*freeze_lora"):
        LoRALinear(model.blocks[0].attn.to_q, 2, 2)
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear(nn.LayerNorm(3), 2, 2)
    assert freeze_lora(model) == ["blocks.0.attn.to_q", "blocks.1.attn.to_q"]
    # with only frozen adapters left, the active-adapter functions have nothing to act on
    for fn in (lambda: set_lora_enabled(model, False), lambda: save_lora(model, "unused"),
               lambda: lora_parameters(model), lambda: merge_lora(model)):
        with pytest.raises(ValueError, match="no LoRA layers besides 2 frozen"):
            fn()
    assert apply_lora(model, ["to_q", "to_k"], rank=2, alpha=2, adapter_name="other") == \
        ["blocks.0.attn.to_q", "blocks.0.attn.to_k", "blocks.1.attn.to_q", "blocks.1.attn.to_k"]


def _peft_folder(tmp_path, rank=3, targets=("to_k", "fc1"), **extra):
    ref = get_peft_model(make_base(), LoraConfig(r=rank, lora_alpha=6, target_modules=list(targets), **extra))
    ref.save_pretrained(tmp_path)
    return tmp_path


def test_load_rank_mismatch(tmp_path):
    folder = _peft_folder(tmp_path, rank=3)
    model = make_base()
    apply_lora(model, ["to_k", "fc1"], rank=4, alpha=6)
    with pytest.raises(CheckpointError, match=r"blocks.0.attn.to_k.lora_A.weight'.*file \[3, 15\], model \[4, 15\]"):
        load_lora(model, folder)


def test_load_alpha_mismatch(tmp_path):
    folder = _peft_folder(tmp_path)
    model = make_base()
    apply_lora(model, ["to_k", "fc1"], rank=3, alpha=5)
    with pytest.raises(ValueError, match="lora_alpha 6"):
        load_lora(model, folder)


def test_load_target_set_mismatch(tmp_path):
    folder = _peft_folder(tmp_path)
    model = make_base()
    apply_lora(model, ["to_k"], rank=3, alpha=6)  # the file also has fc1 adapters
    with pytest.raises(CheckpointError, match=r"unexpected key 'base_model.model.blocks.0.mlp.fc1.lora_A.weight'"):
        load_lora(model, folder)
    model = make_base()
    apply_lora(model, ["to_k", "fc1", "fc2"], rank=3, alpha=6)
    with pytest.raises(CheckpointError, match=r"missing key for 'blocks.0.mlp.fc2' lora_A"):
        load_lora(model, folder)


def test_load_into_model_lacking_target(tmp_path):
    folder = _peft_folder(tmp_path)

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.to_k = nn.Linear(D, D)

    with pytest.raises(ValueError, match=r"\['fc1'\] match no module"):
        load_lora(Other(), folder)


def test_load_unsupported_config(tmp_path):
    folder = _peft_folder(tmp_path, use_dora=True)
    with pytest.raises(ValueError, match="use_dora=True"):
        load_lora(make_base(), folder)


def test_load_bad_paths(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_lora(make_base(), tmp_path / "missing")
    with pytest.raises(CheckpointError, match="neither adapter_model.safetensors"):
        load_lora(make_base(), tmp_path)
    folder = _peft_folder(tmp_path / "a")
    with pytest.raises(CheckpointError, match="no key starts with prefix 'transformer.'"):
        load_lora(make_base(), folder, prefix="transformer")


def test_freeze_refuses_merged_or_disabled():
    model = make_base()
    apply_lora(model, ["to_q", "fc1"], rank=2, alpha=2)
    randomize_lora(model)
    merge_lora(model)
    with pytest.raises(ValueError, match=r"cannot freeze merged or disabled.*'blocks.0.attn.to_q'.*unmerge_lora"):
        freeze_lora(model)
    unmerge_lora(model)
    set_lora_enabled(model, False)
    with pytest.raises(ValueError, match=r"cannot freeze merged or disabled.*set_lora_enabled\(True\)"):
        freeze_lora(model)
    assert len(lora_layers(model)) == 4 and not frozen_lora_layers(model)  # nothing was frozen
    set_lora_enabled(model, True)
    freeze_lora(model)
    with pytest.raises(ValueError, match="already frozen"):
        model.blocks[0].attn.to_q.freeze()


def test_stack_targets_never_reach_inside_a_frozen_layer():
    model = make_base()
    apply_lora(model, ["to_q"], rank=2, alpha=2)
    freeze_lora(model)
    for targets in (["base_layer"], ["to_q.base_layer"], ["lora_A.default"], r".*\.to_q\..*"):
        with pytest.raises(ValueError, match="match no module"):
            apply_lora(model, targets, rank=2, alpha=2)
    # full-match regexes and names see the frozen layer at the Linear's path
    assert apply_lora(copy.deepcopy(model), r"blocks\.0\.attn\.to_q", rank=2, alpha=2) == ["blocks.0.attn.to_q"]
    assert apply_lora(model, ["blocks.1.attn.to_q"], rank=2, alpha=2) == ["blocks.1.attn.to_q"]


def test_unwrap_merge_refuses_disabled():
    model = build_stack(make_base(), 2)
    set_lora_enabled(model, False)
    with pytest.raises(ValueError, match=r"cannot merge disabled.*merge=False"):
        unwrap_lora(model, merge=True)
    assert lora_layers(model) and frozen_lora_layers(model)  # nothing was unwrapped
