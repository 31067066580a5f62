"""model/uae.py and model/uae_release.py: the composed model, its conditioning, the cold-start path, and loading a
tiny fake UAE release written with transformers / diffusers / peft."""
import json
import math

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from model.flow import euler_step, flow_sigmas
from model.lora import apply_lora, lora_layers
from model.uae import NEGATIVE_PROMPT, UAE
from tests.tiny_qwen_tokenizer import TINY_SPECIAL_IDS, TINY_VOCAB_SIZE, build_tiny_qwen_tokenizer_dir
from train.data import procedural_scene


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.fixture(scope="module")
def tiny():
    return UAE.tiny(seed=0)


def test_tiny_reconstruction_runs_and_is_deterministic(tiny):
    images = [procedural_scene(i, size=64)[0] for i in range(2)]
    caps_a, rec_a = tiny.reconstruct(images, generator=torch.Generator().manual_seed(3))
    caps_b, rec_b = tiny.reconstruct(images, generator=torch.Generator().manual_seed(3))
    assert caps_a == caps_b and all(a.tobytes() == b.tobytes() for a, b in zip(rec_a, rec_b))
    assert len(caps_a) == 2 and all(im.size == (64, 64) for im in rec_a)
    _, rec_c = tiny.reconstruct(images, generator=torch.Generator().manual_seed(4))
    assert rec_c[0].tobytes() != rec_a[0].tobytes()


def test_generate_ids_follow_the_released_convention(tiny):
    p = tiny.processor
    ids, mask = tiny.generate_ids([NEGATIVE_PROMPT, "a cat"])
    expected = [p.encode(p.apply_chat_template([{"role": "generate", "content": t}], add_generation_prompt=True))
                for t in (NEGATIVE_PROMPT, "a cat")]
    assert ids[0].tolist() == expected[0]
    assert ids[1, :len(expected[1])].tolist() == expected[1]
    assert (ids[1, len(expected[1]):] == p.pad_token_id).all(), "right padding with the pad id"
    assert torch.equal(mask, ids.ne(p.pad_token_id).long())
    chat = p.apply_chat_template([{"role": "generate", "content": "a cat"}], add_generation_prompt=True)
    assert chat.endswith("<|im_start|>generate\na cat<|im_end|>\n<|im_start|>assistant\n")


def test_conditioning_and_guided_velocity(tiny):
    prompts = ["a red square", "two blue circles on a yellow background"]
    context, negative = tiny.condition(prompts, guidance_scale=4.0)
    ids, mask = tiny.generate_ids([NEGATIVE_PROMPT] + prompts)
    with torch.no_grad():
        want = tiny.connector(tiny.lvlm.forward_hidden(ids, attention_mask=mask))
    torch.testing.assert_close(context, want[1:])
    torch.testing.assert_close(negative, want[:1].expand(2, -1, -1))
    x = torch.randn(2, 16, 8, 8)
    t = torch.tensor([900.0, 300.0])
    pooled = tiny.connector.pooled.expand(2, -1)
    with torch.no_grad():
        v = tiny.velocity_fn(context, negative, 4.0)(x, t)
        v_u = tiny.dit(x, t, negative, pooled)
        v_c = tiny.dit(x, t, context, pooled)
        # Contexts of different lengths take the two-call path; same result as padding them together here.
        v_split = tiny.velocity_fn(context[:, :-1], negative, 4.0)(x, t)
        v_c_short = tiny.dit(x, t, context[:, :-1], pooled)
    torch.testing.assert_close(v, v_u + 4.0 * (v_c - v_u), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v_split, v_u + 4.0 * (v_c_short - v_u), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="multiples of 16"):
        tiny.latent_shape(1, 60, 64)


def test_cold_start_gradients_reach_both_halves():
    uae = UAE.tiny(seed=1).requires_grad_(False)
    apply_lora(uae.lvlm.language_model, ["q_proj", "v_proj", "down_proj"], rank=2, alpha=4)
    apply_lora(uae.dit, ["to_q", "add_k_proj"], rank=2, alpha=4)
    uae.connector.requires_grad_(True)
    images = [procedural_scene(i, size=64)[0] for i in range(2)]
    _, inputs, out = uae.caption(images, max_new_tokens=6, generator=torch.Generator().manual_seed(0),
                                 return_output=True)
    context = uae.caption_context(inputs, out.new_tokens, out.mask)
    assert context.shape[:2] == out.new_tokens.shape and context.requires_grad
    with torch.no_grad():
        negative = uae.encode_text([NEGATIVE_PROMPT]).expand(2, -1, -1)
    velocity = uae.velocity_fn(context, negative, 3.0)
    sigmas = flow_sigmas(2)
    x = torch.randn(2, 16, 8, 8)
    for i in range(2):
        x = euler_step(velocity(x, (sigmas[i] * 1000).expand(2)), x, sigmas[i], sigmas[i + 1])
    recon = uae.vae.decode(uae.vae.from_model_latents(x))
    recon.square().mean().backward()
    for half in (uae.lvlm, uae.dit):
        grads = [layer.B.weight.grad for layer in lora_layers(half).values()]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    assert uae.connector.fc1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in uae.lvlm.named_parameters() if "lora_" not in n)


# ------------------------------------------------------------------------------------------- a fake release

QWEN_TEXT = dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-6, rope_theta=10000.0,
                 rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}, max_position_embeddings=512)
SD3 = dict(sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
           joint_attention_dim=20, caption_projection_dim=16, pooled_projection_dim=10, out_channels=16,
           pos_embed_max_size=32, qk_norm="rms_norm")
VAE = dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4, latent_channels=16,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
LLM_LORA_MODULES = ["language_model.layers.0.self_attn.q_proj", "language_model.layers.1.mlp.down_proj"]


def _randomise(module, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale / math.sqrt(max(p[0].numel(), 1) if p.ndim > 1 else 10))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from peft import LoraConfig, get_peft_model
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, Qwen2_5_VLConfig,
                              Qwen2_5_VLForConditionalGeneration)

    root = tmp_path_factory.mktemp("UAE")
    refs = {}
    # llm_model/: Qwen2.5-VL + projector + tokenizer.
    qcfg = Qwen2_5_VLConfig(text_config=QWEN_TEXT, vision_config=dict(depth=2, hidden_size=16, intermediate_size=24,
                                                                      num_heads=2, out_hidden_size=16, window_size=56,
                                                                      fullatt_block_indexes=[1]),
                            image_token_id=TINY_SPECIAL_IDS["<|image_pad|>"],
                            video_token_id=TINY_SPECIAL_IDS["<|video_pad|>"],
                            vision_start_token_id=TINY_SPECIAL_IDS["<|vision_start|>"],
                            vision_end_token_id=TINY_SPECIAL_IDS["<|vision_end|>"], tie_word_embeddings=True)
    torch.manual_seed(0)
    qwen = Qwen2_5_VLForConditionalGeneration(qcfg).eval()
    _randomise(qwen, 0)
    qwen.save_pretrained(root / "llm_model", safe_serialization=True)
    build_tiny_qwen_tokenizer_dir(root / "llm_model")
    shard = next((root / "llm_model").glob("*.safetensors"))
    tensors = load_file(shard)
    g = torch.Generator().manual_seed(1)
    refs["projector"] = {"projector.0.weight": torch.randn(40, 16, generator=g) * 0.2,
                         "projector.0.bias": torch.randn(40, generator=g) * 0.1,
                         "projector.2.weight": torch.randn(20, 40, generator=g) * 0.2,
                         "projector.2.bias": torch.randn(20, generator=g) * 0.1}
    save_file({**tensors, **refs["projector"]}, shard, metadata={"format": "pt"})
    refs["qwen"] = qwen
    # llm_lora/: sharded state dict of the peft-wrapped model; LoRA tensors plus base weights the loader ignores.
    lora = {}
    for i, path in enumerate(LLM_LORA_MODULES):
        base = qwen.get_submodule("model." + path)
        a = torch.randn(4, base.in_features, generator=g) * 0.3
        b = torch.randn(base.out_features, 4, generator=g) * 0.3
        lora[f"model.base_model.model.{path}.lora_A.default.weight"] = a
        lora[f"model.base_model.model.{path}.lora_B.default.weight"] = b
        lora[f"model.base_model.model.{path}.base_layer.weight"] = base.weight.detach().clone()
        refs.setdefault("llm_delta", {})[path] = (64.0 / 4) * b @ a
    (root / "llm_lora").mkdir()
    keys = sorted(lora)
    save_file({k: lora[k] for k in keys[:3]}, root / "llm_lora" / "model-00001-of-00002.safetensors")
    save_file({k: lora[k] for k in keys[3:]}, root / "llm_lora" / "model-00002-of-00002.safetensors")
    # SD3/: vae, scheduler, the two CLIP text encoders; dit/: the transformer; dit_lora/: a peft adapter.
    torch.manual_seed(2)
    dit = SD3Transformer2DModel(**SD3).eval()
    _randomise(dit, 2)
    dit.save_pretrained(root / "dit", safe_serialization=True)
    vae = AutoencoderKL(**VAE).eval()
    _randomise(vae, 3)
    vae.save_pretrained(root / "SD3" / "vae", safe_serialization=True)
    (root / "SD3" / "scheduler").mkdir(parents=True)
    (root / "SD3" / "scheduler" / "scheduler_config.json").write_text(json.dumps({"shift": 3.0}))
    encoders = []
    for sub, proj, pad in (("text_encoder", 4, 49407), ("text_encoder_2", 6, 0)):
        enc = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                                         num_attention_heads=2, projection_dim=proj,
                                                         hidden_act="gelu", eos_token_id=2)).eval()
        _randomise(enc, 4 + proj)
        enc.save_pretrained(root / "SD3" / sub, safe_serialization=True)
        encoders.append((enc, pad))
    refs["encoders"] = encoders
    peft_dit = get_peft_model(dit, LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "add_v_proj"],
                                              init_lora_weights="gaussian"))
    with torch.no_grad():
        for n, p in peft_dit.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    peft_dit.save_pretrained(root / "dit_lora")
    refs["dit"] = peft_dit.eval()
    return root, refs


def test_release_loads_every_part(release):
    root, refs = release
    uae = UAE.from_pretrained(root, dtype=torch.float32)
    # DiT + adapter == peft-wrapped diffusers transformer.
    g = torch.Generator().manual_seed(5)
    x, ctx, pooled = torch.randn(2, 16, 6, 10, generator=g), torch.randn(2, 7, 20, generator=g), torch.randn(2, 10)
    t = torch.tensor([700.0, 80.0])
    with torch.no_grad():
        want = refs["dit"](hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled).sample
        got = uae.dit(x, t, ctx, pooled)
    assert rel_err(got, want) <= 1e-5
    # LVLM + release LoRA == transformers' model with W + (alpha/r) B A written into the wrapped linears.
    qwen = refs["qwen"]
    ids = torch.randint(0, 300, (2, 9), generator=g)
    with torch.no_grad():
        for path, delta in refs["llm_delta"].items():
            qwen.get_submodule("model." + path).weight += delta
        want = qwen(input_ids=ids).logits
        for path, delta in refs["llm_delta"].items():
            qwen.get_submodule("model." + path).weight -= delta
        got = uae.lvlm(ids)
    assert rel_err(got, want) <= 1e-5
    assert sorted(lora_layers(uae.lvlm)) == sorted(LLM_LORA_MODULES)
    # Connector == the release's projector; pooled == SD3's CLIP-L + CLIP-G pooled embeddings of "" (77 tokens).
    assert torch.equal(uae.connector.fc1.weight, refs["projector"]["projector.0.weight"])
    assert torch.equal(uae.connector.fc2.bias, refs["projector"]["projector.2.bias"])
    pooled_ref = []
    for enc, pad in refs["encoders"]:
        ids = torch.full((1, 77), pad)
        ids[0, :2] = torch.tensor([49406, 49407])
        with torch.no_grad():
            pooled_ref.append(enc(input_ids=ids).text_embeds[0])
    torch.testing.assert_close(uae.connector.pooled, torch.cat(pooled_ref), rtol=1e-5, atol=1e-6)
    # And the whole loop runs on it.
    uae.settings.caption_max_new_tokens = 5
    captions, images = uae.reconstruct([Image.new("RGB", (40, 30), (200, 30, 30))], height=32, width=32, steps=2,
                                       generator=torch.Generator().manual_seed(0))
    assert len(captions) == 1 and images[0].size == (32, 32)


def test_release_with_a_part_missing(release, tmp_path):
    root, _ = release
    partial = tmp_path / "UAE"
    partial.mkdir()
    for part in ("llm_model", "dit", "SD3"):
        (partial / part).symlink_to(root / part)
    with pytest.raises(FileNotFoundError, match="lacks llm_lora, dit_lora"):
        UAE.from_pretrained(partial)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        UAE.from_pretrained(tmp_path / "nowhere")
    # Plain parts: Qwen folder + SD3 folder (+ dit) without adapters load too.
    uae = UAE.from_pretrained(lvlm=root / "llm_model", sd3=root / "SD3", dit=root / "dit", dtype=torch.float32)
    assert not lora_layers(uae.lvlm) and not lora_layers(uae.dit)


def test_caption_inputs_cap_pixels_through_smart_resize(tiny):
    from model.qwen2_5_vl_processor import smart_resize

    cfg = tiny.processor.image_config
    inputs = tiny.caption_inputs([Image.new("RGB", (300, 200), (1, 2, 3))])
    _, h, w = inputs["image_grid_thw"][0].tolist()
    want_h, want_w = smart_resize(200, 300, 28, cfg.min_pixels, tiny.settings.caption_max_pixels)
    assert (h * 14, w * 14) == (want_h, want_w) and want_h * want_w <= tiny.settings.caption_max_pixels
    assert tiny.processor.image_config.max_pixels == cfg.max_pixels, "the shared processor is left untouched"


def test_pad_to_extends_the_right_padding(tiny):
    ids, mask = tiny.generate_ids(["a cat", "a much longer caption about a cat"])
    ids2, mask2 = tiny.generate_ids(["a cat", "a much longer caption about a cat"], pad_to=ids.shape[1] + 3)
    assert torch.equal(ids2[:, :ids.shape[1]], ids) and (ids2[:, ids.shape[1]:] == tiny.processor.pad_token_id).all()
    assert mask2[:, ids.shape[1]:].sum() == 0
    with pytest.raises(ValueError, match="shorter than the longest text"):
        tiny.generate_ids(["a much longer caption about a cat"], pad_to=2)
