"""model/connector.py: shapes, exact-GELU numerics, gradients, loading our files and the UAE release layout."""
import math

import pytest
import torch
from safetensors.torch import save_file

from model.connector import Connector, ConnectorConfig, load_pooled
from tests.numerics import rel_err
from weights import CheckpointError

TINY = ConnectorConfig.preset("tiny")


def make(seed=0):
    torch.manual_seed(seed)
    model = Connector(TINY)
    with torch.no_grad():
        model.pooled.normal_()
    return model


def test_presets():
    uae = ConnectorConfig.preset("uae")
    assert (uae.in_dim, uae.hidden_dim, uae.out_dim, uae.pooled_dim) == (2048, 8192, 4096, 2048)
    with torch.device("meta"):
        model = Connector(uae)
    assert model.fc1.weight.shape == (8192, 2048) and model.fc2.weight.shape == (4096, 8192)
    assert model.pooled.shape == (2048,)
    with pytest.raises(ValueError, match="unknown connector preset 'sd3'"):
        ConnectorConfig.preset("sd3")
    with pytest.raises(ValueError, match="hidden_dim"):
        ConnectorConfig(hidden_dim=0)


def test_forward_is_exact_gelu_mlp_per_token():
    model = make()
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 7, TINY.in_dim, generator=g) * 2
    out = model(hidden)
    assert out.shape == (3, 7, TINY.out_dim)
    w1, b1, w2, b2 = (t.detach().double() for t in (model.fc1.weight, model.fc1.bias, model.fc2.weight,
                                                     model.fc2.bias))
    h = hidden.double() @ w1.T + b1
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU, not the tanh approximation
    want = h @ w2.T + b2
    assert rel_err(out.double(), want) <= 1e-5
    tanh = torch.nn.functional.gelu(hidden @ model.fc1.weight.T + model.fc1.bias, approximate="tanh")
    assert rel_err((tanh @ model.fc2.weight.T + model.fc2.bias).double(), want) > 1e-5  # the test can tell them apart
    # token-wise: a token's output does not depend on the others (padding cannot leak)
    assert rel_err(model(hidden[1:2, 2:3]), out[1:2, 2:3]) <= 1e-6


def test_pooled_batch():
    model = make()
    p = model.pooled_batch(4)
    assert p.shape == (4, TINY.pooled_dim) and torch.equal(p[3], model.pooled)


def test_gradients_reach_both_linears_and_input():
    model = make()
    hidden = torch.randn(2, 5, TINY.in_dim, requires_grad=True)
    model(hidden).square().sum().backward()
    for t in (model.fc1.weight, model.fc1.bias, model.fc2.weight, model.fc2.bias, hidden):
        assert t.grad is not None and t.grad.abs().sum() > 0
    assert not model.pooled.requires_grad


def test_save_and_load_our_file(tmp_path):
    model = make()
    model.save(tmp_path / "connector.safetensors")
    loaded = Connector.from_pretrained(tmp_path / "connector.safetensors", config="tiny")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert torch.equal(load_pooled(tmp_path / "connector.safetensors", dim=TINY.pooled_dim), model.pooled)
    x = torch.randn(2, 3, TINY.in_dim)
    assert torch.equal(loaded(x), model(x))
    bf16 = Connector.from_pretrained(tmp_path / "connector.safetensors", config=TINY, dtype=torch.bfloat16)
    assert bf16.fc1.weight.dtype == torch.bfloat16 and bf16.pooled.dtype == torch.bfloat16


def _release_folder(tmp_path, model):
    """The UAE llm_model/ layout: Qwen keys and the projector (nn.Sequential) in sharded files, no pooled vector."""
    tmp_path.mkdir()
    g = torch.Generator().manual_seed(2)
    save_file({"model.embed_tokens.weight": torch.randn(11, TINY.in_dim, generator=g),
               "visual.merger.mlp.0.weight": torch.randn(4, 4, generator=g),
               "lm_head.weight": torch.randn(11, TINY.in_dim, generator=g)}, str(tmp_path / "model-1.safetensors"))
    save_file({"projector.0.weight": model.fc1.weight.detach(), "projector.0.bias": model.fc1.bias.detach(),
               "projector.2.weight": model.fc2.weight.detach(), "projector.2.bias": model.fc2.bias.detach(),
               "model.norm.weight": torch.ones(TINY.in_dim)}, str(tmp_path / "model-2.safetensors"))
    return tmp_path


def test_load_release_layout_with_pooled(tmp_path):
    model = make()
    folder = _release_folder(tmp_path / "llm_model", model)
    with pytest.raises(CheckpointError, match="no pooled vector"):
        Connector.from_pretrained(folder, config="tiny")
    save_file({"pooled_projections": model.pooled[None].clone()}, str(tmp_path / "pooled.safetensors"))  # [1, D]
    for pooled in (tmp_path / "pooled.safetensors", model.pooled.clone()):
        loaded = Connector.from_pretrained(folder, config="tiny", pooled=pooled)
        for k, v in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k


def test_given_pooled_overrides_stored(tmp_path):
    model = make()
    model.save(tmp_path / "c.safetensors")
    other = torch.randn(TINY.pooled_dim)
    loaded = Connector.from_pretrained(tmp_path / "c.safetensors", config="tiny", pooled=other)
    assert torch.equal(loaded.pooled, other) and torch.equal(loaded.fc1.weight, model.fc1.weight)


def test_bad_inputs(tmp_path):
    model = make()
    with pytest.raises(ValueError, match=r"hidden must be \[batch, tokens, 12\], got \[2, 5, 13\]"):
        model(torch.randn(2, 5, 13))
    with pytest.raises(ValueError, match="hidden must be"):
        model(torch.randn(5, 12))
    model.save(tmp_path / "c.safetensors")
    with pytest.raises(CheckpointError, match=r"shape mismatch for 'fc1.weight'.*\[37, 12\].*\[8192, 2048\]"):
        Connector.from_pretrained(tmp_path / "c.safetensors", config="uae")
    with pytest.raises(ValueError, match=r"pooled must have shape \[10\], got \[11\]"):
        Connector.from_pretrained(tmp_path / "c.safetensors", config="tiny", pooled=torch.zeros(11))
    save_file({"pooled_projections": torch.zeros(2, 10)}, str(tmp_path / "p.safetensors"))
    with pytest.raises(CheckpointError, match=r"'pooled_projections' has shape \[2, 10\], expected \[10\]"):
        load_pooled(tmp_path / "p.safetensors", dim=10)
    with pytest.raises(CheckpointError, match="no key 'pooled'"):
        load_pooled(tmp_path / "p.safetensors", dim=10, key="pooled")
    save_file({"projector.0.weight": torch.zeros(37, 12)}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(CheckpointError, match="missing key 'fc1.bias'"):
        Connector.from_pretrained(tmp_path / "partial.safetensors", config="tiny", pooled=torch.zeros(10))
