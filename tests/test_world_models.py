"""train/world_models.py: the toy world's tokenizer, its trained VAE and CLIP, and the base model folders, which must
load through the same loaders (and training scripts) as official weights. One quick `prepare_base` serves the module.
"""
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from eval.reward import clip_backbone
from model.clip import CLIP, CLIPTokenizer
from model.connector import load_pooled
from model.qwen2_5_vl_processor import QWEN_SPECIAL_TOKENS, Qwen25VLProcessor
from model.uae import UAE
from model.vae import VAE
from tests.run_helpers import one_thread  # noqa: F401 (an autouse fixture)
from train import world
from train import world_models as wm

SEED = 0


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("world") / "base"
    report = wm.prepare_base(folder, SEED, quick=True, log=lambda line: None)
    return folder, report


def parts(folder) -> dict:
    return dict(lvlm=folder / "lvlm", sd3=folder / "sd3", connector=folder / "connector.safetensors",
                pooled=folder / "pooled.safetensors")


def test_tokenizer_world_words_single_tokens_round_trip(base, tmp_path):
    vocab_size = wm.build_tokenizer(tmp_path)
    processor = Qwen25VLProcessor.from_pretrained(tmp_path)
    assert processor.vocab_size == vocab_size
    # Training is deterministic: the base folder's tokenizer (another call) is the same file.
    assert (tmp_path / "tokenizer.json").read_bytes() == (base[0] / "lvlm" / "tokenizer.json").read_bytes()
    words = wm.world_words()
    assert {"red", "triangle", "large", "bottom", "center", "gray", "three", "objects"} <= set(words)
    split = {w: processor.tokenizer.encode(" " + w).tokens for w in words}
    assert {w: t for w, t in split.items() if len(t) != 1} == {}
    captions = [world.describe(s, level) for s in world.scenes("heldout", 40, SEED) for level in range(world.LEVELS)]
    for caption in captions:
        ids = processor.encode(caption)
        assert processor.decode(ids) == caption
        assert len(ids) <= 31  # a full description is about one token per word
    # Special tokens follow the BPE in the official order, and the processor reads the world's image settings.
    first = processor.tokenizer.token_to_id(QWEN_SPECIAL_TOKENS[0])
    assert [processor.tokenizer.token_to_id(t) for t in QWEN_SPECIAL_TOKENS] == list(
        range(first, first + len(QWEN_SPECIAL_TOKENS)))
    assert first + len(QWEN_SPECIAL_TOKENS) == vocab_size
    assert processor.image_config == wm.IMAGE_CONFIG
    inputs = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"],
                       images=[world.render(world.scenes("train", 1, SEED)[0])])
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert int(inputs["mm_token_type_ids"].sum()) == 16


def test_base_loads_as_plain_parts_and_runs_at_64px(base):
    folder, report = base
    uae = UAE.from_pretrained(**parts(folder), dtype=torch.float32)
    assert uae.settings.shift == wm.SCHEDULER_SHIFT  # read from sd3/scheduler/scheduler_config.json
    assert uae.vae.config.downsample_factor == 4 and uae.dit.config == wm.DIT_CONFIG
    assert uae.lvlm.config == wm.lvlm_config(uae.processor.vocab_size, uae.processor.special_token_ids())
    assert report["parameters"]["lvlm"] == sum(p.numel() for p in uae.lvlm.parameters())
    torch.testing.assert_close(uae.connector.pooled, load_pooled(folder / "pooled.safetensors", 64), rtol=0, atol=0)
    scenes = world.scenes("heldout", 2, SEED)
    uae.settings = wm.SETTINGS
    g = torch.Generator().manual_seed(0)
    images = uae.generate([world.describe(s, 4) for s in scenes], steps=2, guidance_scale=2.0, generator=g)
    assert [im.size for im in images] == [(64, 64)] * 2
    texts, inputs, out = uae.caption([world.render(s) for s in scenes], max_new_tokens=6, generator=g,
                                     return_output=True)
    assert len(texts) == 2 and out.new_tokens.shape == (2, 6)
    assert int((inputs["input_ids"] == uae.processor.image_token_id).sum()) == 2 * 16


def test_connector_starts_at_the_scale_of_the_captioners_states(base):
    # At normal(0, 0.02) the connector's two layers shrank the states ~30x and the decoder SFT learned little of a
    # caption's objects from them (train/world_models.py `prepare_base`); each layer now keeps its input's scale.
    uae = UAE.from_pretrained(**parts(base[0]), dtype=torch.float32)
    captions = [world.describe(s, 4) for s in world.scenes("heldout", 6, SEED)]
    ids, mask = uae.generate_turn_ids(captions)
    with torch.no_grad():
        hidden = uae.lvlm.forward_hidden(ids, attention_mask=mask)
        context = uae.connector(hidden)
    keep = mask.bool()
    ratio = (context[keep].pow(2).mean() / hidden[keep].pow(2).mean()).sqrt().item()
    assert 0.2 < ratio < 2.0, f"connector output RMS / input RMS = {ratio:.3f}"


def test_vae_reconstructs_better_than_mean_colour(base):
    folder, report = base
    vae = VAE.from_pretrained(folder / "sd3" / "vae")
    images = [world.render(s) for s in world.scenes("heldout", 32, SEED + 1)]
    quality = wm.vae_quality(vae, images)
    assert quality["mse"] < quality["mean_colour_mse"], quality
    assert report["vae"]["mse"] < report["vae"]["mean_colour_mse"]
    # The measured factors bring the DiT's latents to about zero mean and unit variance.
    x = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2)
    with torch.no_grad():
        latents = vae.to_model_latents(vae.encode(x.float() / 127.5 - 1))
    assert abs(latents.mean().item()) < 0.3 and 0.7 < latents.std().item() < 1.3


def test_clip_is_the_reward_backbone_and_separates_scenes(base):
    folder, report = base
    clip = CLIP.from_pretrained(folder / "clip")
    assert clip.cfg.vision.image_size == wm.IMAGE_SIZE
    backbone = clip_backbone(clip)
    scenes = world.scenes("heldout", 8, SEED + 2)
    renders = [world.render(s) for s in scenes]
    # Renders are deterministic: the same scene drawn twice is the render and a copy with noise of ~12/255 std.
    g = torch.Generator().manual_seed(0)
    noisy = [Image.fromarray((torch.from_numpy(np.array(r)).float() + 12 * torch.randn(64, 64, 3, generator=g))
                             .clamp(0, 255).round().to(torch.uint8).numpy()) for r in renders]
    f, f_noisy = backbone.embed_pil(renders), backbone.embed_pil(noisy)
    same = (f * f_noisy).sum(-1).mean().item()
    different = (f @ f.T)[~torch.eye(len(scenes), dtype=torch.bool)].mean().item()
    # An untrained CLIP maps every render to nearly one feature (cosines within 1e-5 of each other).
    assert different < same - 0.1, (same, different)
    assert report["clip"]["cos_different"] < report["clip"]["cos_same"]
    # What the reward pays per attribute: a cosine for each one a caption states, none of them NaN.
    changes = report["clip"]["cos_change"]
    assert set(changes) == {"colour", "shape", "size", "position"}
    assert all(-1.0 <= c <= report["clip"]["cos_same"] + 1e-3 for c in changes.values()), changes
    # The folder's tokenizer is the one the text tower was trained with, and the tower pools at its end token.
    tokenizer = CLIPTokenizer.from_pretrained(folder / "clip", max_length=clip.cfg.text.max_positions)
    ids, mask = tokenizer([world.describe(scenes[0], 4)])
    assert torch.equal(ids, wm.clip_tokenizer()([world.describe(scenes[0], 4)])[0])
    assert ids[0, 0].item() == tokenizer.bos_id and tokenizer.eos_id == clip.cfg.text.eos_token_id
    assert clip.text_features(ids, mask).shape == (1, clip.cfg.projection_dim)
    saved = json.loads((folder / "prepare.json").read_text())
    assert saved["clip"] == report["clip"] and set(saved["seconds"]) == {"lvlm", "dit_connector", "vae", "clip"}


@pytest.mark.parametrize("attribute", ["colour", "shape", "size", "position"])
def test_one_change_changes_one_attribute_of_one_object(attribute):
    g = torch.Generator().manual_seed(0)
    for scene in world.scenes("heldout", 40, SEED):
        changed = wm._one_change(scene, g, (attribute,))
        assert changed.background == scene.background and len(changed.objects) == len(scene.objects)
        # Objects hold distinct cells, so sets compare them (a scene keeps them in reading order: a move reorders).
        gone, new = set(scene.objects) - set(changed.objects), set(changed.objects) - set(scene.objects)
        assert len(gone) == len(new) == 1
        (before,), (after,) = gone, new
        assert getattr(before, attribute) != getattr(after, attribute)
        assert dataclasses.replace(after, **{attribute: getattr(before, attribute)}) == before
        # A moved object goes to a cell no object held: the scene stays one of the world's.
        assert len({o.position for o in changed.objects}) == len(changed.objects)


def test_training_is_seeded_and_deterministic():
    scenes = world.scenes("train", 8, SEED)
    images = [world.render(s) for s in scenes]
    one, two = (wm.train_vae(images, 2, 3, log=lambda line: None, batch_size=2) for _ in range(2))
    assert one.config == two.config
    for (name, p), q in zip(one.state_dict().items(), two.state_dict().values()):
        assert torch.equal(p, q), name
    captions = [world.describe(s, 4) for s in scenes]
    one, two = (wm.train_clip(images, captions, 2, 3, log=lambda line: None, batch_size=4) for _ in range(2))
    for (name, p), q in zip(one.state_dict().items(), two.state_dict().values()):
        assert torch.equal(p, q), name
    other = wm.train_clip(images, captions, 2, 4, log=lambda line: None, batch_size=4)
    assert not torch.equal(other.visual_projection.weight, one.visual_projection.weight)


def test_prepare_base_refuses_an_existing_folder(base):
    with pytest.raises(FileExistsError, match="already exists"):
        wm.prepare_base(base[0], SEED, quick=True)


def test_sft_decoder_takes_the_world_parts(base, tmp_path):
    import train.sft_decoder as sd

    folder = base[0]
    args = [f"--{k}={v}" for k, v in parts(folder).items()]
    out = tmp_path / "run"
    sd.main(args + ["--size", "64", "--steps", "1", "--batch-size", "2", "--lora-rank", "0", "--device", "cpu",
                    "--out", str(out)])
    assert (out / "metrics.jsonl").read_text().count("\n") == 1


def test_official_libraries_read_the_folders_as_ours_do(base):
    """transformers and diffusers load each folder (their own layouts, strictly) and compute what ours compute."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPModel, Qwen2_5_VLForConditionalGeneration

    folder = base[0]
    uae = UAE.from_pretrained(**parts(folder), dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        clip = CLIPModel.from_pretrained(folder / "clip").eval()
        theirs = clip.get_image_features(pixel_values=x)
        torch.testing.assert_close(CLIP.from_pretrained(folder / "clip").image_features(x),
                                   getattr(theirs, "pooler_output", theirs))
        vae = AutoencoderKL.from_pretrained(folder / "sd3" / "vae").eval()
        assert (vae.config.scaling_factor, vae.config.shift_factor) == (uae.vae.config.scaling_factor,
                                                                        uae.vae.config.shift_factor)
        z = uae.vae.encode(x)
        torch.testing.assert_close(z, vae.encode(x).latent_dist.mean, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(uae.vae.decode(z), vae.decode(z).sample, rtol=1e-4, atol=1e-4)
        dit = SD3Transformer2DModel.from_pretrained(folder / "sd3" / "transformer").eval()
        latents, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 128, generator=g)
        pooled, t = torch.randn(2, 64, generator=g), torch.tensor([500.0, 20.0])
        torch.testing.assert_close(uae.dit(latents, t, ctx, pooled), dit(latents, ctx, pooled, t).sample)
        qwen = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder / "lvlm").eval()
        assert qwen.config.text_config.eos_token_id == uae.processor.im_end_id
        inputs = uae.caption_inputs([world.render(world.scenes("train", 1, SEED)[0])])
        ours = uae.lvlm.forward_hidden(inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                       pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
        theirs = qwen(**inputs, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
