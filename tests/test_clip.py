"""model/clip.py against transformers 5.24 CLIPModel / CLIPTokenizer / CLIPImageProcessorPil on tiny random models."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from model.clip import (CLIP, CLIPConfig, CLIPTokenizer, clip_preprocess, clip_preprocess_tensor,
                        openai_to_clip_state_dict)
from model.image_io import load_rgb
from tests.numerics import rel_err
from weights import CheckpointError

transformers = pytest.importorskip("transformers")


def hf_clip(tmp_path, eos_token_id=98, act="quick_gelu", width=32, heads=4, positions=20, image_size=30, patch=6,
            seed=0):
    torch.manual_seed(seed)
    cfg = transformers.CLIPConfig(
        text_config=dict(hidden_size=width, intermediate_size=4 * width if width >= 128 else 37, num_hidden_layers=2,
                         num_attention_heads=heads, max_position_embeddings=positions, vocab_size=99,
                         hidden_act=act, eos_token_id=eos_token_id, bos_token_id=97, pad_token_id=1),
        vision_config=dict(hidden_size=width, intermediate_size=4 * width if width >= 128 else 41,
                           num_hidden_layers=2, num_attention_heads=heads, image_size=image_size, patch_size=patch,
                           hidden_act=act),
        projection_dim=24)
    model = transformers.CLIPModel(cfg).eval()
    # Random (not init-default) LayerNorm parameters so that every loaded tensor matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path / "clip"
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


def padded_ids(eos, lengths, total, pad, left=(), seed=1):
    """Rows of `lengths` tokens (start token ... eos) padded to `total`, on the left for the rows listed in `left`."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), total), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        span = slice(total - n, total) if row in left else slice(0, n)
        tokens = torch.randint(3, 90, (n,), generator=g)
        tokens[0], tokens[-1] = 97, eos
        ids[row, span] = tokens
        mask[row, span] = 1
    return ids, mask


@pytest.mark.parametrize("eos_token_id,act", [(98, "quick_gelu"), (2, "gelu")])
def test_features_match_transformers(tmp_path, eos_token_id, act):
    ref, folder = hf_clip(tmp_path, eos_token_id=eos_token_id, act=act)
    ours = CLIP.from_pretrained(folder)
    assert ours.cfg.text.pools_at_argmax == (eos_token_id == 2)
    torch.manual_seed(2)
    pixels = torch.randn(3, 3, 30, 30)
    # Under the argmax rule the end-of-text token must carry the largest id (OpenAI's vocabulary puts it last).
    eos = 98 if eos_token_id == 2 else eos_token_id
    ids, mask = padded_ids(eos, [13, 7, 4, 6], 13, pad=1, left=(3,))
    with torch.no_grad():
        ref_img = ref.get_image_features(pixel_values=pixels)
        ref_vision = ref.vision_model(pixel_values=pixels).last_hidden_state
        ref_txt = ref.get_text_features(input_ids=ids, attention_mask=mask)
        ref_txt_nomask = ref.get_text_features(input_ids=ids)
        ref_hidden = ref.text_model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert rel_err(ours.image_features(pixels), ref_img.pooler_output) <= 1e-5
        assert rel_err(ours.vision(pixels)[0], ref_vision) <= 1e-5
        assert rel_err(ours.text_features(ids, mask), ref_txt.pooler_output) <= 1e-5
        assert rel_err(ours.text_features(ids), ref_txt_nomask.pooler_output) <= 1e-5
        hidden = ours.text(ids, mask)[0]
        real = mask.bool()
        assert torch.isfinite(hidden).all()
        assert rel_err(hidden[real], ref_hidden[real]) <= 1e-5


def test_pooling_rules_pick_different_tokens(tmp_path):
    """The two rules disagree when the eos id is not the largest id in a row: make sure each follows its own."""
    ref, folder = hf_clip(tmp_path, eos_token_id=50)
    ours = CLIP.from_pretrained(folder)
    ids = torch.tensor([[97, 10, 50, 80, 50, 1]])
    with torch.no_grad():
        first = ours.text_features(ids)
        assert rel_err(first, ref.get_text_features(input_ids=ids).pooler_output) <= 1e-5
        hidden = ours.text(ids)[0]
        # first-eos rule reads position 2; the argmax rule would read position 0 (id 97).
        assert torch.allclose(first, ours.text_projection(hidden[:, 2]))
        assert not torch.allclose(first, ours.text_projection(hidden[:, 0]))


def test_presets_and_config_spellings():
    l14 = CLIPConfig.preset("vit-l-14")
    v = l14.vision
    assert (v.hidden_size, v.num_layers, v.num_heads, v.patch_size, v.image_size) == (1024, 24, 16, 14, 224)
    assert (l14.text.hidden_size, l14.text.num_layers, l14.text.max_positions, l14.projection_dim) == (768, 12, 77, 768)
    assert l14.text.pools_at_argmax
    assert CLIPConfig.preset("longclip-l").text.max_positions == 248
    with pytest.raises(ValueError, match="unknown CLIP preset"):
        CLIPConfig.preset("vit-h-14")
    # Old config.json files carry `text_config_dict`, which transformers lets override `text_config`.
    cfg = CLIPConfig.from_hf({"model_type": "clip", "projection_dim": 768,
                              "text_config": {"hidden_size": 512, "eos_token_id": 49407},
                              "text_config_dict": {"hidden_size": 768, "eos_token_id": 2},
                              "vision_config_dict": {"hidden_size": 1024, "patch_size": 14}})
    assert cfg.text.hidden_size == 768 and cfg.text.pools_at_argmax
    assert cfg.vision.hidden_size == 1024 and cfg.vision.patch_size == 14
    with pytest.raises(ValueError, match="model_type"):
        CLIPConfig.from_hf({"model_type": "siglip"})
    with pytest.raises(ValueError, match="eos_token_id"):
        CLIPConfig.from_hf({"text_config": {"eos_token_id": [2, 3]}})


# ----------------------------------------------------------------------------------------------------- LongCLIP

def to_openai_layout(ref, pos_first, pos_res):
    """HF CLIPModel -> OpenAI/LongCLIP state dict names, written independently of model/clip.py."""
    sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    out = {"logit_scale": sd["logit_scale"],
           "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": pos_first, "positional_embedding_res": pos_res,
           "ln_final.weight": sd["text_model.final_layer_norm.weight"],
           "ln_final.bias": sd["text_model.final_layer_norm.bias"],
           "text_projection": sd["text_projection.weight"].t().contiguous(),
           "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
           "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
           "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
           "visual.ln_pre.weight": sd["vision_model.pre_layrnorm.weight"],
           "visual.ln_pre.bias": sd["vision_model.pre_layrnorm.bias"],
           "visual.ln_post.weight": sd["vision_model.post_layernorm.weight"],
           "visual.ln_post.bias": sd["vision_model.post_layernorm.bias"],
           "visual.proj": sd["visual_projection.weight"].t().contiguous()}
    for hf, oa in (("text_model", "transformer"), ("vision_model", "visual.transformer")):
        for i in range(2):
            h, o = f"{hf}.encoder.layers.{i}.", f"{oa}.resblocks.{i}."
            for part in ("weight", "bias"):
                out[o + f"attn.in_proj_{part}"] = torch.cat([sd[h + f"self_attn.{p}_proj.{part}"] for p in "qkv"])
                out[o + f"attn.out_proj.{part}"] = sd[h + f"self_attn.out_proj.{part}"]
                out[o + f"ln_1.{part}"] = sd[h + f"layer_norm1.{part}"]
                out[o + f"ln_2.{part}"] = sd[h + f"layer_norm2.{part}"]
                out[o + f"mlp.c_fc.{part}"] = sd[h + f"mlp.fc1.{part}"]
                out[o + f"mlp.c_proj.{part}"] = sd[h + f"mlp.fc2.{part}"]
    return out


def test_longclip_pickle_and_safetensors_match_transformers(tmp_path):
    # 128-wide towers: OpenAI's build_model rule (64-wide heads) gives 2 heads, so the q/k/v split is exercised.
    ref, _ = hf_clip(tmp_path, eos_token_id=2, width=128, heads=2, positions=30, image_size=28, patch=14)
    torch.manual_seed(3)
    # The official release is stored in fp16: round the reference to fp16 too, then compare in fp32.
    pos_first, pos_res = (torch.randn(30, 128) * 0.1).half().float(), (torch.randn(30, 128) * 0.1).half().float()
    with torch.no_grad():
        ref.half().float()
        ref.text_model.embeddings.position_embedding.weight.copy_(torch.cat([pos_first[:20], pos_res[20:]]))
    state = {k: v.half() for k, v in to_openai_layout(ref, pos_first, pos_res).items()}
    state["context_length"] = 30  # scalar entries some OpenAI-layout files carry
    torch.save(state, tmp_path / "longclip.pt")
    save_file({k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, tmp_path / "longclip.safetensors")

    torch.manual_seed(4)
    pixels = torch.randn(2, 3, 28, 28)
    ids, _ = padded_ids(98, [30, 21, 9], 30, pad=0)  # LongCLIP pads with 0 after the end-of-text token
    with torch.no_grad():
        ref_img = ref.get_image_features(pixel_values=pixels).pooler_output
        ref_txt = ref.get_text_features(input_ids=ids).pooler_output
        ref_txt_short = ref.get_text_features(input_ids=ids[:, :25]).pooler_output
        for src in ("longclip.pt", "longclip.safetensors"):
            ours = CLIP.from_longclip(tmp_path / src)
            assert ours.cfg.text.max_positions == 30 and ours.cfg.vision.num_heads == 2
            assert rel_err(ours.image_features(pixels), ref_img) <= 1e-5
            assert rel_err(ours.text_features(ids), ref_txt) <= 1e-5
            assert rel_err(ours.text_features(ids[:, :25]), ref_txt_short) <= 1e-5


def test_longclip_position_rule_uses_both_tables():
    a, b = torch.randn(30, 8), torch.randn(30, 8)
    merged = openai_to_clip_state_dict({"positional_embedding": a, "positional_embedding_res": b})
    assert torch.equal(merged["text.position_embedding"][:20], a[:20])
    assert torch.equal(merged["text.position_embedding"][20:], b[20:])
    with pytest.raises(CheckpointError, match="positional_embedding_res"):
        openai_to_clip_state_dict({"positional_embedding": a, "positional_embedding_res": b[:29]})


def test_longclip_bad_files(tmp_path):
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="expected a state dict"):
        CLIP.from_longclip(tmp_path / "list.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="junk.pt"):
        CLIP.from_longclip(tmp_path / "junk.pt")
    save_file({"visual.proj": torch.zeros(4, 4)}, tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointError, match="visual.conv1.weight"):
        CLIP.from_longclip(tmp_path / "partial.safetensors")
    save_file({"visual.conv1.weight": torch.zeros(4, 3, 2, 2)}, tmp_path / "resnet.safetensors")
    with pytest.raises(CheckpointError, match="ViT"):
        CLIP.from_longclip(tmp_path / "resnet.safetensors")


# ----------------------------------------------------------------------------------------------------- bad input

def test_bad_checkpoints_and_inputs(tmp_path):
    ref, folder = hf_clip(tmp_path)
    ours = CLIP.from_pretrained(folder)
    with pytest.raises(ValueError, match=r"pixel_values must be \[B, 3, 30, 30\]"):
        ours.image_features(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="pixel_values"):
        ours.image_features(torch.zeros(3, 30, 30))
    with pytest.raises(ValueError, match="21 positions"):
        ours.text_features(torch.full((1, 21), 98))
    with pytest.raises(ValueError, match="end-of-text token 98"):
        ours.text_features(torch.tensor([[97, 5, 6], [97, 5, 98]]))
    with pytest.raises(ValueError, match="attention_mask"):
        ours.text_features(torch.tensor([[97, 98]]), torch.ones(1, 3))

    weights = load_file(folder / "model.safetensors")
    del weights["vision_model.post_layernorm.bias"]
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="vision.ln_post.bias"):
        CLIP.from_pretrained(folder)

    _, folder = hf_clip(tmp_path / "b")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["text_config"]["hidden_size"] = 40
    cfg["text_config"]["num_attention_heads"] = 4
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        CLIP.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="config.json"):
        CLIP.from_pretrained(tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------------------- tokenizer

def tiny_tokenizer(tmp_path):
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in alphabet + [c + "</w>" for c in alphabet] + ["he", "ll", "hell", "hello</w>", "te", "st</w>"]:
        vocab.setdefault(token, len(vocab))
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o</w>"), ("t", "e"), ("s", "t</w>")]
    tok = transformers.CLIPTokenizer(vocab=vocab, merges=merges)
    tok.save_pretrained(tmp_path / "tok")
    return tok, tmp_path / "tok"


def test_tokenizer_matches_transformers(tmp_path):
    ref, folder = tiny_tokenizer(tmp_path)
    texts = ["Hello  WORLD!", "it's a test, café", "", "hello " * 20, "test\n\ttest"]
    for max_length in (12, 77):
        ours = CLIPTokenizer.from_pretrained(folder, max_length=max_length)
        ids, mask = ours(texts)
        want = ref(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        assert torch.equal(ids, want["input_ids"])
        assert torch.equal(mask, want["attention_mask"])
    ids, mask = CLIPTokenizer.from_pretrained(folder / "tokenizer.json", max_length=12)("hello " * 20)
    assert ids.shape == (1, 12) and ids[0, 0] == 0 and ids[0, -1] == 1 and mask.all()
    with pytest.raises(TypeError, match="texts"):
        ours([1, 2])
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        CLIPTokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="max_length"):
        CLIPTokenizer.from_pretrained(folder, max_length=1)


# ------------------------------------------------------------------------------------------------- preprocessing

def sample_images(seed=0):
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (157, 301, 3), dtype=np.uint8))
    tall = Image.fromarray(rng.integers(0, 256, (203, 97), dtype=np.uint8), "L")
    rgba = Image.fromarray(rng.integers(0, 256, (231, 229, 4), dtype=np.uint8), "RGBA")
    palette = rgb.resize((83, 61)).convert("P", palette=Image.Palette.ADAPTIVE, colors=17)
    transparent = palette.copy()
    transparent.info["transparency"] = 3
    small = Image.fromarray(rng.integers(0, 256, (50, 80, 3), dtype=np.uint8))
    return {"rgb": rgb, "gray": tall, "rgba": rgba, "palette": palette, "palette_transparency": transparent,
            "small": small}


@pytest.mark.parametrize("name", list(sample_images()))
def test_clip_preprocess_matches_processor(name):
    image = sample_images()[name]
    want = transformers.CLIPImageProcessorPil()(image, return_tensors="pt")["pixel_values"][0]
    got = clip_preprocess(image)
    assert got.shape == (3, 224, 224) and got.dtype == torch.float32
    assert (got - want).abs().max() <= 1e-5


def test_clip_preprocess_scales_16_bit_and_float_images():
    """PIL's convert("RGB") clips a 16-bit image (mode I;16) to white and a [0, 1] float image (mode F) to black; the
    preprocessing sees their 8-bit levels instead."""
    deep = np.random.default_rng(3).integers(0, 65536, (61, 83), dtype=np.uint16)
    eight = Image.fromarray(np.rint(deep / 257).astype(np.uint8), "L")
    want = clip_preprocess(eight)
    assert torch.equal(clip_preprocess(Image.fromarray(deep)), want)
    unit = Image.fromarray((np.asarray(eight) / np.float32(255)).astype(np.float32), "F")
    assert torch.equal(clip_preprocess(unit), want)
    assert (want - clip_preprocess(Image.new("L", (83, 61), 255))).abs().max() > 1


def test_clip_preprocess_tensor_approximates_pil_path():
    """Photo-like (smooth) images: downscaled, grey, and upscaled from below 224."""
    rng = np.random.default_rng(5)
    coarse = Image.fromarray(rng.integers(0, 256, (9, 17, 3), dtype=np.uint8))
    images = {"down": coarse.resize((301, 157), Image.Resampling.BICUBIC),
              "gray": coarse.convert("L").resize((97, 203), Image.Resampling.BILINEAR),
              "up": coarse.resize((80, 50), Image.Resampling.BILINEAR)}
    for name, image in images.items():
        image = load_rgb(image)
        pil = clip_preprocess(image)
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255
        for rng, t in (((0, 1), x), ((-1, 1), x * 2 - 1)):
            got = clip_preprocess_tensor(t.requires_grad_(), input_range=rng)[0]
            gap = (got - pil).abs()
            # PIL rounds its resize to uint8: one level is 1/255/std ~ 0.015 after normalisation.
            assert gap.max() <= 0.03 and gap.mean() <= 0.006, (name, gap.max(), gap.mean())
    got.sum().backward()
    assert t.grad is not None and t.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="images must be"):
        clip_preprocess_tensor(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="input_range"):
        clip_preprocess_tensor(torch.zeros(1, 3, 32, 32), input_range=(0, 255))


def test_unreadable_image(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="broken.png"):
        clip_preprocess(bad)
    with pytest.raises(TypeError, match="PIL image"):
        clip_preprocess(np.zeros((4, 4, 3)))
    good = tmp_path / "good.png"
    sample_images()["rgba"].save(good)
    assert torch.equal(clip_preprocess(good), clip_preprocess(sample_images()["rgba"]))


def test_identical_images_have_cosine_one(tmp_path):
    _, folder = hf_clip(tmp_path, image_size=224, patch=32)
    ours = CLIP.from_pretrained(folder)
    image = sample_images()["rgb"]
    pixels = torch.stack([clip_preprocess(image), clip_preprocess(image.copy()),
                          clip_preprocess(sample_images(seed=1)["rgb"])])
    with torch.no_grad():
        f = ours.image_features(pixels)
    cos = F.cosine_similarity(f[0:1], f[1:], dim=-1)
    assert abs(cos[0].item() - 1) <= 1e-6
    assert cos[1].item() < 0.999


@pytest.mark.parametrize("eos_token_id,act", [(2, "quick_gelu"), (49407, "gelu")])
def test_text_encoder_with_projection_matches_transformers(tmp_path, eos_token_id, act):
    """SD3's text_encoder / text_encoder_2 folders (CLIPTextModelWithProjection): text_embeds."""
    from transformers import CLIPTextConfig as HFTextConfig
    from transformers import CLIPTextModelWithProjection

    from model.clip import CLIPTextEncoder

    torch.manual_seed(0)
    vocab = 60 if eos_token_id == 2 else 49408
    cfg = HFTextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=16, projection_dim=20, hidden_act=act,
                       eos_token_id=eos_token_id, bos_token_id=0 if eos_token_id == 2 else 49406)
    ref = CLIPTextModelWithProjection(cfg).eval()
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = CLIPTextEncoder.from_pretrained(tmp_path)
    eos = vocab - 1 if eos_token_id == 2 else eos_token_id
    ids = torch.randint(1, min(vocab, 50), (3, 11))
    ids[:, 5] = eos
    with torch.no_grad():
        want = ref(input_ids=ids).text_embeds
        got = ours.text_features(ids)
    assert rel_err(got, want) <= 1e-5


def test_tiny_preset_is_initialised_and_finite():
    torch.manual_seed(0)
    model = CLIP(CLIPConfig.preset("tiny"))
    x = torch.randn(2, 3, 224, 224)
    f = model.image_features(x)
    assert f.shape == (2, 24) and torch.isfinite(f).all() and f.std() > 0
    assert model.vision.position_embedding.abs().max() < 0.2
