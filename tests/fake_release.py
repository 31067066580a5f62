"""A tiny fake UAE release, written with transformers / diffusers / peft in the official layouts (llm_model/ with the
projector, llm_lora/ as a sharded peft state dict, dit/, dit_lora/ as a peft adapter, SD3/ with vae/, scheduler/ and
the two CLIP text encoders), and a tiny CLIP ViT folder for the reward. Shared by the loader tests, the launch-line
tests and the pipeline test."""
import json
import math

import torch
from safetensors.torch import load_file, save_file

from tests.tiny_qwen_tokenizer import TINY_SPECIAL_IDS, TINY_VOCAB_SIZE, build_tiny_qwen_tokenizer_dir

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


def build_fake_release(root):
    """Write the release into `root` (a new folder); returns the reference models and tensors (`refs`)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from peft import LoraConfig, get_peft_model
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, Qwen2_5_VLConfig,
                              Qwen2_5_VLForConditionalGeneration)

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
    return refs


def save_tiny_clip(path):
    """A tiny transformers CLIPModel (ViT) saved as a CLIP folder; returns the model."""
    from transformers import CLIPConfig as HFConfig
    from transformers import CLIPModel

    torch.manual_seed(0)
    cfg = HFConfig(text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=20),
                   vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                      image_size=224, patch_size=32),
                   projection_dim=16)
    model = CLIPModel(cfg).eval()
    model.save_pretrained(path, safe_serialization=True)
    return model
