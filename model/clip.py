"""CLIP and LongCLIP (ViT image tower + causal text tower), their tokenizer and image preprocessing.

CLIP ViT-L/14 image features are UAE's reconstruction reward (cosine of the source's and the reconstruction's
features); LongCLIP-L is one of the four Unified-Bench backbones. Behaviour follows transformers 5.24 `CLIPModel`:
`image_features` equals `get_image_features(...).pooler_output` and `text_features` equals
`get_text_features(...).pooler_output` (projected, not normalised).

Weights: `CLIP.from_pretrained` reads a Hugging Face CLIPModel folder (config.json + safetensors);
`CLIP.from_longclip` reads the OpenAI-layout state dict LongCLIP releases (`longclip-L.pt`, a torch pickle loaded
with weights_only=True) or a safetensors conversion of it with the same key names.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from model.image_io import load_rgb
from model.layers import attention
from weights import CheckpointError, load_module, load_state_dict, read_json, rename_keys

__all__ = [
    "CLIPVisionConfig", "CLIPTextConfig", "CLIPConfig", "CLIP", "CLIPTextEncoder", "CLIPTokenizer", "KEY_TABLE",
    "OPENAI_KEY_TABLE",
    "openai_to_clip_state_dict", "clip_preprocess", "clip_preprocess_tensor",
    "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# LongCLIP keeps the first 20 positions of CLIP's table and learns the rest in a second table
# (model_longclip.py: mask1 selects rows [:20] of positional_embedding, mask2 rows [20:] of positional_embedding_res).
LONGCLIP_KEPT_POSITIONS = 20


# ----------------------------------------------------------------------------------------------------------- config

@dataclass(frozen=True)
class CLIPVisionConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 224
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_positions: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    # transformers keeps the pre-#24773 rule for configs whose eos_token_id is 2 (the OpenAI releases): pool at the
    # argmax of the ids (the end-of-text token has the highest id). Any other value pools at its first occurrence.
    eos_token_id: int = 2

    @property
    def pools_at_argmax(self) -> bool:
        return self.eos_token_id == 2


@dataclass(frozen=True)
class CLIPConfig:
    vision: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)
    text: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    projection_dim: int = 768

    @classmethod
    def preset(cls, name: str) -> "CLIPConfig":
        presets = {
            "vit-l-14": cls(),  # openai/clip-vit-large-patch14
            "longclip-l": cls(text=CLIPTextConfig(max_positions=248)),  # BeichenZhang/LongCLIP-L
            # Random-initialised reward for CPU tests and the tiny training runs.
            "tiny": cls(vision=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                                                patch_size=32),
                        text=CLIPTextConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=2,
                                            num_heads=2),
                        projection_dim=24),
        }
        if name not in presets:
            raise ValueError(f"unknown CLIP preset {name!r}; expected one of {sorted(presets)}")
        return presets[name]

    @classmethod
    def from_hf(cls, cfg: Mapping) -> "CLIPConfig":
        """From a transformers CLIPModel config.json dict. Missing fields take transformers' class defaults;
        the legacy `text_config_dict` / `vision_config_dict` entries override `text_config` / `vision_config`
        as transformers does."""
        if cfg.get("model_type", "clip") != "clip":
            raise ValueError(f"config.json has model_type {cfg.get('model_type')!r}, expected 'clip' (a CLIPModel)")
        text = {**(cfg.get("text_config") or {}), **(cfg.get("text_config_dict") or {})}
        vision = {**(cfg.get("vision_config") or {}), **(cfg.get("vision_config_dict") or {})}
        # transformers' CLIPTextConfig / CLIPVisionConfig defaults (the ViT-B/32 sizes) for absent fields.
        return cls(
            vision=CLIPVisionConfig(
                hidden_size=vision.get("hidden_size", 768), intermediate_size=vision.get("intermediate_size", 3072),
                num_layers=vision.get("num_hidden_layers", 12), num_heads=vision.get("num_attention_heads", 12),
                patch_size=vision.get("patch_size", 32), image_size=vision.get("image_size", 224),
                layer_norm_eps=vision.get("layer_norm_eps", 1e-5), hidden_act=vision.get("hidden_act", "quick_gelu")),
            text=text_config_from_hf(text),
            projection_dim=cfg.get("projection_dim", 512),
        )

    @classmethod
    def from_openai_state_dict(cls, state: Mapping[str, torch.Tensor]) -> "CLIPConfig":
        """Sizes read off an OpenAI-layout state dict the way OpenAI's / LongCLIP's `build_model` does: 64-wide
        heads, 4x MLP, layer counts from the block keys; pooling at the argmax of the ids (`text.argmax(-1)`)."""
        if "visual.proj" not in state:
            raise CheckpointError("OpenAI-layout checkpoint without 'visual.proj': only ViT image towers are "
                                  "supported (not the ResNet CLIPs)")
        for key in ("visual.conv1.weight", "visual.positional_embedding", "text_projection", "positional_embedding",
                    "token_embedding.weight", "ln_final.weight"):
            if key not in state:
                raise CheckpointError(f"OpenAI-layout checkpoint is missing {key!r}")

        def count(prefix):
            return len({k.split(".")[len(prefix.split("."))] for k in state if k.startswith(prefix + ".")})

        width = state["visual.conv1.weight"].shape[0]
        patch = state["visual.conv1.weight"].shape[-1]
        grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        text_width = state["ln_final.weight"].shape[0]
        return cls(
            vision=CLIPVisionConfig(hidden_size=width, intermediate_size=4 * width,
                                    num_layers=count("visual.transformer.resblocks"), num_heads=width // 64,
                                    patch_size=patch, image_size=patch * grid),
            text=CLIPTextConfig(vocab_size=state["token_embedding.weight"].shape[0], hidden_size=text_width,
                                intermediate_size=4 * text_width, num_layers=count("transformer.resblocks"),
                                num_heads=text_width // 64, max_positions=state["positional_embedding"].shape[0],
                                eos_token_id=2),
            projection_dim=state["text_projection"].shape[1],
        )


def text_config_from_hf(text: Mapping) -> CLIPTextConfig:
    """A transformers CLIPTextConfig dict (CLIPModel's `text_config`, or a CLIPTextModelWithProjection config.json);
    absent fields take transformers' class defaults."""
    eos = text.get("eos_token_id", 49407)
    if not isinstance(eos, int):
        raise ValueError(f"text_config.eos_token_id must be one integer, got {eos!r}")
    return CLIPTextConfig(
        vocab_size=text.get("vocab_size", 49408), hidden_size=text.get("hidden_size", 512),
        intermediate_size=text.get("intermediate_size", 2048), num_layers=text.get("num_hidden_layers", 12),
        num_heads=text.get("num_attention_heads", 8), max_positions=text.get("max_position_embeddings", 77),
        layer_norm_eps=text.get("layer_norm_eps", 1e-5), hidden_act=text.get("hidden_act", "quick_gelu"),
        eos_token_id=eos)


def init_clip_weights(module: nn.Module, std: float = 0.02) -> None:
    """Initialise a model built from scratch (embeddings are allocated with torch.empty): normal(0, std) for
    embeddings, position tables and linear/conv weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        for name, p in m.named_parameters(recurse=False):
            if name in ("class_embedding", "position_embedding"):
                nn.init.normal_(p, std=std)


# ----------------------------------------------------------------------------------------------------------- model

def _activation(name: str):
    if name == "quick_gelu":  # OpenAI's QuickGELU, transformers' "quick_gelu"
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name == "gelu":
        return F.gelu
    raise ValueError(f"unsupported hidden_act {name!r}; CLIP uses 'quick_gelu' or 'gelu'")


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not a multiple of the number of heads {num_heads}")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, *, causal: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = (p(x).view(B, L, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(attention(q, k, v, causal=causal, mask=mask).transpose(1, 2).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = _activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LayerNorm residual block (CLIPEncoderLayer / OpenAI ResidualAttentionBlock)."""

    def __init__(self, dim: int, hidden: int, num_heads: int, eps: float, act: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.ln_2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, hidden, act)

    def forward(self, x: torch.Tensor, *, causal: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal, mask=mask)
        return x + self.mlp(self.ln_2(x))


class VisionTower(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        grid = cfg.image_size // cfg.patch_size
        self.patch_embedding = nn.Conv2d(3, D, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(D))
        self.position_embedding = nn.Parameter(torch.empty(grid * grid + 1, D))
        self.ln_pre = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.blocks = nn.ModuleList(Block(D, cfg.intermediate_size, cfg.num_heads, cfg.layer_norm_eps, cfg.hidden_act)
                                    for _ in range(cfg.num_layers))
        self.ln_post = nn.LayerNorm(D, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values [B,3,S,S] (S = image_size) -> (last_hidden_state [B,1+N,D], pooled [B,D]), as transformers'
        CLIPVisionModel: the last hidden state is not post-normed, the pooled CLS is."""
        S = self.cfg.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, S, S):
            raise ValueError(f"pixel_values must be [B, 3, {S}, {S}], got {list(pixel_values.shape)}")
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.position_embedding
        x = self.ln_pre(x)
        for block in self.blocks:
            x = block(x)
        return x, self.ln_post(x[:, 0])


class TextTower(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.token_embedding = nn.Embedding(cfg.vocab_size, D)
        self.position_embedding = nn.Parameter(torch.empty(cfg.max_positions, D))
        self.blocks = nn.ModuleList(Block(D, cfg.intermediate_size, cfg.num_heads, cfg.layer_norm_eps, cfg.hidden_act)
                                    for _ in range(cfg.num_layers))
        self.ln_final = nn.LayerNorm(D, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [B,L] (L <= max_positions), attention_mask [B,L] (1 = token, 0 = padding) ->
        (last_hidden_state [B,L,D] after the final LayerNorm, pooled [B,D] at the end-of-text token)."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, L], got {list(input_ids.shape)}")
        B, L = input_ids.shape
        if L > self.cfg.max_positions:
            raise ValueError(f"input_ids has {L} positions but the model has {self.cfg.max_positions}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {list(attention_mask.shape)} must match input_ids "
                             f"{list(input_ids.shape)}")
        if not self.cfg.pools_at_argmax and not (input_ids == self.cfg.eos_token_id).any(-1).all():
            raise ValueError(f"every row of input_ids needs the end-of-text token {self.cfg.eos_token_id} "
                             "(the pooled feature is read there)")
        x = self.token_embedding(input_ids) + self.position_embedding[:L]
        mask = None
        if attention_mask is not None:
            # Causal and key-padding mask as transformers builds it; the diagonal is always kept so that rows of
            # padding queries are never empty (an empty row gives NaN in SDPA, and NaN values leak through a
            # zero attention weight). Rows of real tokens already attend to themselves, so they are unchanged.
            pos = torch.arange(L, device=input_ids.device)
            causal = pos[None, :] <= pos[:, None]
            mask = (causal & attention_mask.bool()[:, None, None, :]) | (pos[None, :] == pos[:, None])
        for block in self.blocks:
            x = block(x, causal=mask is None, mask=mask)
        x = self.ln_final(x)
        if self.cfg.pools_at_argmax:
            at = input_ids.argmax(-1)
        else:
            at = (input_ids == self.cfg.eos_token_id).int().argmax(-1)
        return x, x[torch.arange(B, device=x.device), at]


# Hugging Face CLIPModel checkpoint key -> module key.
KEY_TABLE = [
    (r"vision_model\.embeddings\.class_embedding", r"vision.class_embedding"),
    (r"vision_model\.embeddings\.patch_embedding\.weight", r"vision.patch_embedding.weight"),
    (r"vision_model\.embeddings\.position_embedding\.weight", r"vision.position_embedding"),
    (r"vision_model\.pre_layrnorm\.(weight|bias)", r"vision.ln_pre.\1"),
    (r"vision_model\.post_layernorm\.(weight|bias)", r"vision.ln_post.\1"),
    (r"text_model\.embeddings\.token_embedding\.weight", r"text.token_embedding.weight"),
    (r"text_model\.embeddings\.position_embedding\.weight", r"text.position_embedding"),
    (r"text_model\.final_layer_norm\.(weight|bias)", r"text.ln_final.\1"),
    (r"(vision|text)_model\.encoder\.layers\.(\d+)\.layer_norm([12])\.(weight|bias)", r"\1.blocks.\2.ln_\3.\4"),
    (r"(vision|text)_model\.encoder\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|out_proj)\.(weight|bias)",
     r"\1.blocks.\2.attn.\3.\4"),
    (r"(vision|text)_model\.encoder\.layers\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"\1.blocks.\2.mlp.\3.\4"),
    # Stored as persistent buffers by transformers < 4.31; rebuilt from arange, never read.
    (r"(vision|text)_model\.embeddings\.position_ids", None),
    # The contrastive temperature plays no part in features.
    (r"logit_scale", None),
]


class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTower(cfg.vision)
        self.text = TextTower(cfg.text)
        self.visual_projection = nn.Linear(cfg.vision.hidden_size, cfg.projection_dim, bias=False)
        self.text_projection = nn.Linear(cfg.text.hidden_size, cfg.projection_dim, bias=False)
        if not any(p.is_meta for p in self.parameters()):
            init_clip_weights(self)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B,3,S,S] preprocessed pixels -> [B, projection_dim], not normalised."""
        return self.visual_projection(self.vision(pixel_values)[1])

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B,L] token ids (+ optional [B,L] padding mask) -> [B, projection_dim], not normalised."""
        return self.text_projection(self.text(input_ids, attention_mask)[1])

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> "CLIP":
        """Load a Hugging Face CLIPModel folder (config.json + model.safetensors or shards)."""
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face CLIPModel folder)")
        cfg = CLIPConfig.from_hf(read_json(config_file))
        with torch.device("meta"):
            model = cls(cfg)
        load_module(model, path, table=KEY_TABLE, dtype=dtype, device=device)
        return model.eval()

    @classmethod
    def from_longclip(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu") -> "CLIP":
        """Load an OpenAI-layout CLIP state dict: LongCLIP's `longclip-L.pt` (torch pickle, read with
        weights_only=True so no code runs), or a `.safetensors` file/folder with the same key names. A plain OpenAI
        CLIP state dict (one position table) loads too."""
        path = Path(path)
        if path.is_file() and path.suffix in (".pt", ".pth", ".bin"):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # pickle / zip / weights_only errors come in several types; name the file
                raise CheckpointError(f"{path}: cannot read as a torch state dict ({type(e).__name__}: {e})") from e
            if not isinstance(state, Mapping):
                raise CheckpointError(f"{path}: holds a {type(state).__name__}, expected a state dict")
        else:
            state = load_state_dict(path)
        cfg = CLIPConfig.from_openai_state_dict(state)
        with torch.device("meta"):
            model = cls(cfg)
        load_module(model, openai_to_clip_state_dict(state), dtype=dtype, device=device)
        return model.eval()


class CLIPTextEncoder(nn.Module):
    """transformers' CLIPTextModelWithProjection (SD3's `text_encoder/` CLIP-L and `text_encoder_2/` CLIP-G):
    `text_features` = projected pooled output (its `text_embeds`)."""

    def __init__(self, cfg: CLIPTextConfig, projection_dim: int):
        super().__init__()
        self.cfg = cfg
        self.text = TextTower(cfg)
        self.text_projection = nn.Linear(cfg.hidden_size, projection_dim, bias=False)
        if not any(p.is_meta for p in self.parameters()):
            init_clip_weights(self)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.text_projection(self.text(input_ids, attention_mask)[1])

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> "CLIPTextEncoder":
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{path}: no config.json (expected a CLIPTextModelWithProjection folder)")
        cfg = read_json(config_file)
        if cfg.get("model_type", "clip_text_model") != "clip_text_model":
            raise ValueError(f"{config_file}: model_type {cfg.get('model_type')!r}, expected 'clip_text_model'")
        with torch.device("meta"):
            model = cls(text_config_from_hf(cfg), cfg.get("projection_dim", 512))
        load_module(model, path, table=KEY_TABLE, dtype=dtype, device=device)
        return model.eval()


# OpenAI / LongCLIP key -> module key, applied after `openai_to_clip_state_dict` has split the fused q/k/v
# projections (`attn.{q,k,v}_proj` under the OpenAI block prefix), transposed the projections and merged LongCLIP's
# position tables.
OPENAI_KEY_TABLE = [
    (r"visual\.conv1\.weight", r"vision.patch_embedding.weight"),
    (r"visual\.class_embedding", r"vision.class_embedding"),
    (r"visual\.positional_embedding", r"vision.position_embedding"),
    (r"visual\.(ln_pre|ln_post)\.(weight|bias)", r"vision.\1.\2"),
    (r"visual\.proj", r"visual_projection.weight"),
    (r"token_embedding\.weight", r"text.token_embedding.weight"),
    (r"positional_embedding", r"text.position_embedding"),
    (r"ln_final\.(weight|bias)", r"text.ln_final.\1"),
    (r"text_projection", r"text_projection.weight"),
    (r"visual\.transformer\.resblocks\.(\d+)\.(ln_[12]|attn\.[qkv]_proj|attn\.out_proj)\.(weight|bias)",
     r"vision.blocks.\1.\2.\3"),
    (r"visual\.transformer\.resblocks\.(\d+)\.mlp\.c_fc\.(weight|bias)", r"vision.blocks.\1.mlp.fc1.\2"),
    (r"visual\.transformer\.resblocks\.(\d+)\.mlp\.c_proj\.(weight|bias)", r"vision.blocks.\1.mlp.fc2.\2"),
    (r"transformer\.resblocks\.(\d+)\.(ln_[12]|attn\.[qkv]_proj|attn\.out_proj)\.(weight|bias)",
     r"text.blocks.\1.\2.\3"),
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_fc\.(weight|bias)", r"text.blocks.\1.mlp.fc1.\2"),
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_proj\.(weight|bias)", r"text.blocks.\1.mlp.fc2.\2"),
    # Scalars some releases store, and the contrastive temperature, which plays no part in features.
    (r"input_resolution|context_length|vocab_size|logit_scale", None),
]


def openai_to_clip_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI / LongCLIP state dict -> this module's keys: fused `attn.in_proj_*` split into q/k/v, `[in, out]`
    projections transposed into Linear weights, LongCLIP's two position tables merged into the one it uses, then
    renamed through OPENAI_KEY_TABLE. Keys the table does not know pass through, so the strict loader reports them."""
    state = dict(state)
    for key in [k for k in state if k.endswith((".attn.in_proj_weight", ".attn.in_proj_bias"))]:
        prefix, part = key.rsplit(".in_proj_", 1)
        for proj, t in zip(("q_proj", "k_proj", "v_proj"), state.pop(key).chunk(3, dim=0)):
            state[f"{prefix}.{proj}.{part}"] = t
    for key in ("visual.proj", "text_projection"):
        if key in state:
            state[key] = state[key].T.contiguous()
    if "positional_embedding_res" in state:
        base, res = state.get("positional_embedding"), state.pop("positional_embedding_res")
        if base is None or base.shape != res.shape:
            raise CheckpointError("LongCLIP checkpoint: 'positional_embedding_res' "
                                  f"{list(res.shape)} needs a 'positional_embedding' of the same shape, got "
                                  f"{None if base is None else list(base.shape)}")
        k = LONGCLIP_KEPT_POSITIONS
        state["positional_embedding"] = torch.cat([base[:k], res[k:]], dim=0)
    return {module_key: state[key] for module_key, key in rename_keys(list(state), OPENAI_KEY_TABLE).items()}


# ------------------------------------------------------------------------------------------------------- tokenizer

class CLIPTokenizer:
    """CLIP's byte-level BPE through `tokenizers`, framed and padded like OpenAI's `clip.tokenize(truncate=True)` and
    transformers' CLIPTokenizerFast(padding="max_length", truncation=True): `<|startoftext|>` + at most
    max_length-2 tokens + `<|endoftext|>`, then padding. LongCLIP uses the same vocabulary with max_length=248."""

    def __init__(self, tokenizer, max_length: int = 77, pad_token: str | None = None):
        if max_length < 2:
            raise ValueError(f"max_length must leave room for the start and end tokens, got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.bos_id = self._id("<|startoftext|>")
        self.eos_id = self._id("<|endoftext|>")
        self.pad_id = self._id(pad_token) if pad_token is not None else self.eos_id

    def _id(self, token: str) -> int:
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise ValueError(f"token {token!r} is not in the tokenizer's vocabulary")
        return i

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, max_length: int = 77) -> "CLIPTokenizer":
        """`path`: a tokenizer.json, or a folder holding one (the pad token is read from a tokenizer_config.json
        beside it when present; transformers' default, `<|endoftext|>`, otherwise)."""
        from tokenizers import Tokenizer

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json")
        pad = None
        config = file.parent / "tokenizer_config.json"
        if config.is_file():
            pad = read_json(config).get("pad_token")
            pad = pad.get("content") if isinstance(pad, dict) else pad
        return cls(Tokenizer.from_file(str(file)), max_length=max_length, pad_token=pad)

    def __call__(self, texts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (input_ids [B, max_length] int64, attention_mask [B, max_length] int64)."""
        if isinstance(texts, str):
            texts = [texts]
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a string or a list of strings")
        ids = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), self.max_length), dtype=torch.long)
        for row, enc in enumerate(self.tokenizer.encode_batch(texts, add_special_tokens=False)):
            tokens = [self.bos_id, *enc.ids[:self.max_length - 2], self.eos_id]
            ids[row, :len(tokens)] = torch.tensor(tokens)
            mask[row, :len(tokens)] = 1
        return ids, mask


# --------------------------------------------------------------------------------------------------- preprocessing

def resize_shortest_edge(image: Image.Image, size: int, resample=Image.Resampling.BICUBIC) -> Image.Image:
    """Shortest side -> size, the other side int(size * long / short) (truncated), as transformers'
    get_resize_output_image_size(default_to_square=False)."""
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)
    return image.resize((size, new_long) if w <= h else (new_long, size), resample=resample)


def center_crop(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """[H,W,C] -> centre [height,width,C] with floor offsets (transformers' numpy center_crop)."""
    H, W = array.shape[:2]
    if height > H or width > W:
        raise ValueError(f"cannot crop {height}x{width} out of a {H}x{W} image")
    top, left = (H - height) // 2, (W - width) // 2
    return array[top:top + height, left:left + width]


def normalize(array: np.ndarray, mean, std) -> torch.Tensor:
    """uint8 [H,W,3] -> float32 [3,H,W]: rescale by 1/255 in float64 then cast, then (x - mean) / std in float32, the
    order and precision of transformers' numpy rescale + normalize."""
    x = (array.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def clip_preprocess(image: Image.Image | str | os.PathLike, size: int = 224) -> torch.Tensor:
    """transformers' CLIPImageProcessor PIL path: RGB (alpha onto white), shortest side -> size with PIL bicubic,
    centre crop size x size, /255, OpenAI mean/std. -> float32 [3, size, size]."""
    image = resize_shortest_edge(load_rgb(image), size)
    return normalize(center_crop(np.asarray(image), size, size), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


def clip_preprocess_tensor(images: torch.Tensor, input_range: tuple[float, float] = (-1.0, 1.0),
                           size: int = 224) -> torch.Tensor:
    """Differentiable counterpart of `clip_preprocess` for image tensors [B,3,H,W] with values in `input_range`,
    (-1, 1) (VAE decoder output) or (0, 1). Shortest side -> size by bicubic interpolation with antialiasing (torch's
    antialiased bicubic uses PIL's a=-0.5 kernel and support), clamp to [0, 1] as PIL's uint8 output is, centre crop
    with floor offsets, OpenAI mean/std. It approximates the PIL path, which resizes in two separable passes with
    uint8 rounding and clipping after each: on photo-like images the gap is about one uint8 level (<= 0.02 after
    normalisation, tested); on white noise, where bicubic overshoot gets clipped between PIL's passes, single pixels
    differ by up to ~0.3."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {list(images.shape)}")
    if tuple(input_range) not in ((-1.0, 1.0), (0.0, 1.0)):
        raise ValueError(f"input_range must be (-1, 1) or (0, 1), got {input_range!r}")
    x = images.float()
    if input_range[0] == -1.0:
        x = (x + 1) / 2
    H, W = x.shape[-2:]
    short, long = min(H, W), max(H, W)
    new_long = int(size * long / short)
    new_hw = (new_long, size) if W <= H else (size, new_long)
    x = F.interpolate(x, size=new_hw, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = (new_hw[0] - size) // 2, (new_hw[1] - size) // 2
    x = x[..., top:top + size, left:left + size]
    mean = torch.tensor(OPENAI_CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
