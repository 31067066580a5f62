"""model/lora.py against peft 0.21 (and diffusers' SD3 LoRA files): forward, disable, merge, init, gradients,
PEFT/diffusers file round trips both ways, bad input."""
import copy
import json

import pytest
import torch
from torch import nn

from model.layers import attention
from model.lora import (
    LoRALinear, apply_lora, load_lora, lora_disabled, lora_layers, lora_parameters, lora_state_dict, merge_lora,
    save_lora, set_lora_enabled, unmerge_lora,
)
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


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


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
                    getattr(inner.get_submodule(name), f"lora_{which}")["default"].weight.copy_(w)


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


def test_only_lora_params_get_gradients():
    base, ours, _, names = pair(["to_q", "to_v", "fc1"])
    x, mask = make_inputs()
    x.requires_grad_(True)
    ours(x, mask).square().mean().backward()
    params = lora_parameters(ours)
    assert len(params) == 2 * len(names) == 2 * 6
    lora_ids = {id(p) for p in params}
    for n, p in ours.named_parameters():
        if id(p) in lora_ids:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert not p.requires_grad and p.grad is None, n
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
    apply_lora(model, ["to_q"], rank=2, alpha=2)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, ["to_k"], rank=2, alpha=2, adapter_name="other")
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear(nn.LayerNorm(3), 2, 2)


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
