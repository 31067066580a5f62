"""model/dino.py against transformers 5.24 Dinov2Model / DINOv3ViTModel and their image processors."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from model.dino import (IMAGENET_MEAN, IMAGENET_STD, DINOv2, DINOv2Config, DINOv3, DINOv3Config, dinov2_preprocess,
                        dinov3_preprocess)
from model.image_io import load_rgb
from tests.numerics import rel_err
from tests.test_clip import sample_images
from weights import CheckpointError

transformers = pytest.importorskip("transformers")


def randomize(model):
    """Perturb LayerNorm / LayerScale / token parameters away from their init values so every tensor matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(s in name for s in ("norm", "lambda1", "cls_token", "register_tokens", "position_embeddings")):
                p.add_(0.3 * torch.randn_like(p))
    return model


def hf_dinov2(tmp_path, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=3,
                                    image_size=70, patch_size=14, layerscale_value=0.5)
    model = randomize(transformers.Dinov2Model(cfg).eval())
    folder = tmp_path / "dinov2"
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


def hf_dinov3(tmp_path, seed=0, **overrides):
    torch.manual_seed(seed)
    kwargs = dict(hidden_size=64, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                  num_register_tokens=3, patch_size=8, layerscale_value=0.5, rope_theta=100.0)
    cfg = transformers.DINOv3ViTConfig(**{**kwargs, **overrides})
    model = randomize(transformers.DINOv3ViTModel(cfg).eval())
    folder = tmp_path / "dinov3"
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


# The table is trained for 70 px (5 x 5 patches of 14): 224 (16 x 16), non-square, non-divisible, the native size,
# and a 1 x 25 grid (same patch count as the table, which transformers still resizes since the input is not square).
@pytest.mark.parametrize("hw", [(224, 224), (98, 154), (75, 80), (70, 70), (20, 350)])
def test_dinov2_matches_transformers(tmp_path, hw):
    ref, folder = hf_dinov2(tmp_path)
    ours = DINOv2.from_pretrained(folder)
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, *hw)
    with torch.no_grad():
        want = ref(pixel_values=pixels)
        got = ours(pixels)
        assert got.shape == want.last_hidden_state.shape
        assert rel_err(got, want.last_hidden_state) <= 1e-5
        assert rel_err(ours.features(pixels), want.pooler_output) <= 1e-5


@pytest.mark.parametrize("overrides", [{}, dict(key_bias=True, proj_bias=False, mlp_bias=False, rope_theta=37.0)])
@pytest.mark.parametrize("hw", [(48, 48), (40, 72)])
def test_dinov3_matches_transformers(tmp_path, overrides, hw):
    ref, folder = hf_dinov3(tmp_path, **overrides)
    ours = DINOv3.from_pretrained(folder)
    torch.manual_seed(1)
    pixels = torch.randn(3, 3, *hw)
    with torch.no_grad():
        want = ref(pixel_values=pixels)
        got = ours(pixels)
        assert got.shape == want.last_hidden_state.shape
        assert rel_err(got, want.last_hidden_state) <= 1e-5
        assert rel_err(ours.features(pixels), want.pooler_output) <= 1e-5


def test_presets_and_config():
    v2 = DINOv2Config.preset("dinov2-large")
    assert (v2.hidden_size, v2.num_layers, v2.num_heads, v2.patch_size, v2.image_size) == (1024, 24, 16, 14, 518)
    v3 = DINOv3Config.preset("dinov3-vitl16")
    assert (v3.hidden_size, v3.num_layers, v3.patch_size, v3.num_register_tokens) == (1024, 24, 16, 4)
    assert not v3.key_bias
    with pytest.raises(ValueError, match="unknown DINOv2 preset"):
        DINOv2Config.preset("dinov2-giant")
    with pytest.raises(ValueError, match="unknown DINOv3 preset"):
        DINOv3Config.preset("dinov3-vit7b16")
    with pytest.raises(ValueError, match="use_swiglu_ffn"):
        DINOv2Config.from_hf({"model_type": "dinov2", "use_swiglu_ffn": True})
    with pytest.raises(ValueError, match="use_gated_mlp"):
        DINOv3Config.from_hf({"model_type": "dinov3_vit", "use_gated_mlp": True})
    with pytest.raises(ValueError, match="model_type"):
        DINOv2Config.from_hf({"model_type": "dinov3_vit"})
    with pytest.raises(ValueError, match="image_size must be square"):
        DINOv2Config.from_hf({"image_size": [224, 448]})


def test_bad_checkpoints_and_inputs(tmp_path):
    _, folder = hf_dinov2(tmp_path)
    ours = DINOv2.from_pretrained(folder)
    with pytest.raises(ValueError, match=r"pixel_values must be \[B, 3, H, W\]"):
        ours(torch.zeros(1, 4, 70, 70))
    with pytest.raises(ValueError, match="smaller than one 14x14 patch"):
        ours(torch.zeros(1, 3, 10, 70))

    weights = load_file(folder / "model.safetensors")
    del weights["encoder.layer.1.layer_scale2.lambda1"]
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="blocks.1.ls2"):
        DINOv2.from_pretrained(folder)

    _, folder = hf_dinov3(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_register_tokens"] = 2
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="register_tokens"):
        DINOv3.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="config.json"):
        DINOv3.from_pretrained(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------------- preprocessing

@pytest.mark.parametrize("name", list(sample_images()))
def test_dinov2_preprocess_matches_processor(name):
    image = sample_images()[name]
    processor = transformers.BitImageProcessorPil(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                                  image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))
    want = processor(image, return_tensors="pt")["pixel_values"][0]
    got = dinov2_preprocess(image)
    assert got.shape == (3, 224, 224) and got.dtype == torch.float32
    assert (got - want).abs().max() <= 1e-5


@pytest.mark.parametrize("name", list(sample_images()))
def test_dinov3_preprocess_matches_processor(name):
    pytest.importorskip("torchvision", reason="DINOv3ViTImageProcessor's only backend is torchvision")
    image = load_rgb(sample_images()[name])  # the DINOv3 processor does no RGB conversion of its own
    want = transformers.DINOv3ViTImageProcessor()(image, return_tensors="pt")["pixel_values"][0]
    assert (dinov3_preprocess(image) - want).abs().max() <= 1e-5


def imagenet_normalized(image):
    x = torch.from_numpy(np.asarray(image).astype(np.float32) / 255).permute(2, 0, 1)
    return (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def test_dinov3_preprocess_is_antialiased_bilinear():
    """Without torchvision: torch's antialiased bilinear resize follows PIL's BILINEAR filter, so on photo-like images
    the two agree to PIL's uint8 rounding (one level = 1/255/std ~ 0.018 after normalisation)."""
    rng = np.random.default_rng(5)
    coarse = Image.fromarray(rng.integers(0, 256, (9, 17, 3), dtype=np.uint8))
    for size in ((301, 157), (90, 60)):
        image = coarse.resize(size, Image.Resampling.BICUBIC)
        gap = (dinov3_preprocess(image) - imagenet_normalized(image.resize((224, 224), Image.Resampling.BILINEAR)))
        assert gap.abs().max() <= 0.03 and gap.abs().mean() <= 0.01, (gap.abs().max(), gap.abs().mean())
    square = sample_images()["rgb"].resize((224, 224))  # already 224 x 224: no resampling at all
    assert (dinov3_preprocess(square) - imagenet_normalized(square)).abs().max() <= 1e-5


def test_preprocess_bad_input(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    for fn in (dinov2_preprocess, dinov3_preprocess):
        with pytest.raises(ValueError, match="broken.jpg"):
            fn(bad)
    with pytest.raises(ValueError, match="crop 300"):
        dinov2_preprocess(sample_images()["rgb"], resize=256, crop=300)


def test_identical_images_have_cosine_one(tmp_path):
    _, folder2 = hf_dinov2(tmp_path)
    _, folder3 = hf_dinov3(tmp_path)
    image, other = sample_images()["rgb"], Image.new("RGB", (120, 90), (250, 10, 10))
    for model, prep in ((DINOv2.from_pretrained(folder2), dinov2_preprocess),
                        (DINOv3.from_pretrained(folder3), dinov3_preprocess)):
        with torch.no_grad():
            f = model.features(torch.stack([prep(image), prep(image.copy()), prep(other)]))
        cos = F.cosine_similarity(f[0:1], f[1:], dim=-1)
        assert abs(cos[0].item() - 1) <= 1e-6
        assert cos[1].item() < 1 - 1e-5  # a different image is told apart
