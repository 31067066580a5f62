"""DINOv2 and DINOv3 ViT image encoders (Unified-Bench backbones) and their preprocessing.

Both follow transformers 5.24 (`Dinov2Model`, `DINOv3ViTModel`): calling the model on pixel values returns
`last_hidden_state` (after the final LayerNorm) and `features` is its CLS row (`pooler_output`). DINOv2 adds a
learned position table, resized bicubically to the input's patch grid; DINOv3 has no table but 2-D RoPE on the
patch tokens, plus register tokens between the CLS and the patches. Only the plain-MLP variants (ViT-S/B/L) are
built; the giant SwiGLU models are refused at config time. Inference only: DINOv3's train-time RoPE jitter is not
reproduced.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from model.clip import center_crop, normalize, resize_shortest_edge
from model.image_io import load_rgb
from model.layers import attention
from weights import load_module, read_json

__all__ = ["DINOv2Config", "DINOv2", "DINOv3Config", "DINOv3", "DINOV2_KEY_TABLE", "DINOV3_KEY_TABLE",
           "dinov2_preprocess", "dinov3_preprocess", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------------------- config

@dataclass(frozen=True)
class DINOv2Config:
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    mlp_ratio: int = 4
    patch_size: int = 14
    image_size: int = 518  # the position table is trained for 518 px (37 x 37 patches)
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    hidden_act: str = "gelu"

    @classmethod
    def preset(cls, name: str) -> "DINOv2Config":
        presets = {"dinov2-large": cls()}  # facebook/dinov2-large
        if name not in presets:
            raise ValueError(f"unknown DINOv2 preset {name!r}; expected one of {sorted(presets)}")
        return presets[name]

    @classmethod
    def from_hf(cls, cfg: Mapping) -> "DINOv2Config":
        """From a transformers Dinov2Model config.json dict; absent fields take transformers' defaults."""
        _check_type(cfg, "dinov2")
        if cfg.get("use_swiglu_ffn", False):
            raise ValueError("use_swiglu_ffn=True (DINOv2-giant) is not supported; use the ViT-S/B/L models")
        return cls(hidden_size=cfg.get("hidden_size", 768), num_layers=cfg.get("num_hidden_layers", 12),
                   num_heads=cfg.get("num_attention_heads", 12), mlp_ratio=cfg.get("mlp_ratio", 4),
                   patch_size=_single(cfg.get("patch_size", 14), "patch_size"),
                   image_size=_single(cfg.get("image_size", 224), "image_size"),
                   layer_norm_eps=cfg.get("layer_norm_eps", 1e-6), qkv_bias=cfg.get("qkv_bias", True),
                   hidden_act=cfg.get("hidden_act", "gelu"))


@dataclass(frozen=True)
class DINOv3Config:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    patch_size: int = 16
    num_register_tokens: int = 4
    rope_theta: float = 100.0
    layer_norm_eps: float = 1e-5
    query_bias: bool = True
    key_bias: bool = False
    value_bias: bool = True
    proj_bias: bool = True
    mlp_bias: bool = True
    hidden_act: str = "gelu"

    @classmethod
    def preset(cls, name: str) -> "DINOv3Config":
        presets = {"dinov3-vitl16": cls()}  # facebook/dinov3-vitl16-pretrain-lvd1689m
        if name not in presets:
            raise ValueError(f"unknown DINOv3 preset {name!r}; expected one of {sorted(presets)}")
        return presets[name]

    @classmethod
    def from_hf(cls, cfg: Mapping) -> "DINOv3Config":
        """From a transformers DINOv3ViTModel config.json dict; absent fields take transformers' defaults."""
        _check_type(cfg, "dinov3_vit")
        if cfg.get("use_gated_mlp", False):
            raise ValueError("use_gated_mlp=True (DINOv3 ViT-H+/7B) is not supported; use the ViT-S/B/L models")
        return cls(hidden_size=cfg.get("hidden_size", 384), intermediate_size=cfg.get("intermediate_size", 1536),
                   num_layers=cfg.get("num_hidden_layers", 12), num_heads=cfg.get("num_attention_heads", 6),
                   patch_size=_single(cfg.get("patch_size", 16), "patch_size"),
                   num_register_tokens=cfg.get("num_register_tokens", 0), rope_theta=cfg.get("rope_theta", 100.0),
                   layer_norm_eps=cfg.get("layer_norm_eps", 1e-5), query_bias=cfg.get("query_bias", True),
                   key_bias=cfg.get("key_bias", False), value_bias=cfg.get("value_bias", True),
                   proj_bias=cfg.get("proj_bias", True), mlp_bias=cfg.get("mlp_bias", True),
                   hidden_act=cfg.get("hidden_act", "gelu"))


def _check_type(cfg: Mapping, model_type: str) -> None:
    if cfg.get("model_type", model_type) != model_type:
        raise ValueError(f"config.json has model_type {cfg.get('model_type')!r}, expected {model_type!r}")


def _single(value, name: str) -> int:
    """Square sizes only; transformers also accepts [h, w] pairs, which no released DINO uses."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{name} must be square, got {value!r}")
        value = value[0]
    return int(value)


def _read_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model folder)")
    return read_json(config_file)


# ----------------------------------------------------------------------------------------------------------- model

def _activation(name: str):
    if name == "gelu":
        return F.gelu
    raise ValueError(f"unsupported hidden_act {name!r}; the plain-MLP DINO models use 'gelu'")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, q_bias: bool, k_bias: bool, v_bias: bool, o_bias: bool):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not a multiple of the number of heads {num_heads}")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim, bias=q_bias)
        self.k_proj = nn.Linear(dim, dim, bias=k_bias)
        self.v_proj = nn.Linear(dim, dim, bias=v_bias)
        self.o_proj = nn.Linear(dim, dim, bias=o_bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = (p(x).view(B, L, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        if rope is not None:
            # DINOv3 rotates the patch tokens only; CLS and registers (the leading tokens) keep no position.
            cos, sin = rope
            n = L - cos.shape[0]
            q = torch.cat([q[:, :, :n], q[:, :, n:] * cos + rotate_half(q[:, :, n:]) * sin], dim=2)
            k = torch.cat([k[:, :, :n], k[:, :, n:] * cos + rotate_half(k[:, :, n:]) * sin], dim=2)
        return self.o_proj(attention(q, k, v).transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    """Pre-LayerNorm block with LayerScale on both residual branches (Dinov2Layer / DINOv3ViTLayer)."""

    def __init__(self, dim: int, hidden: int, num_heads: int, eps: float, act: str, *, q_bias: bool, k_bias: bool,
                 v_bias: bool, o_bias: bool, mlp_bias: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, q_bias, k_bias, v_bias, o_bias)
        self.ls1 = nn.Parameter(torch.empty(dim))
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, hidden, bias=mlp_bias)
        self.fc2 = nn.Linear(hidden, dim, bias=mlp_bias)
        self.ls2 = nn.Parameter(torch.empty(dim))
        self.act = _activation(act)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope) * self.ls1
        return x + self.fc2(self.act(self.fc1(self.norm2(x)))) * self.ls2


def _check_pixels(pixel_values: torch.Tensor, patch: int) -> None:
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
        raise ValueError(f"pixel_values must be [B, 3, H, W], got {list(pixel_values.shape)}")
    if pixel_values.shape[2] < patch or pixel_values.shape[3] < patch:
        raise ValueError(f"pixel_values {list(pixel_values.shape)} is smaller than one {patch}x{patch} patch")


class DINOv2(nn.Module):
    def __init__(self, cfg: DINOv2Config):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        grid = cfg.image_size // cfg.patch_size
        self.patch_embed = nn.Conv2d(3, D, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.empty(1, 1, D))
        self.pos_embed = nn.Parameter(torch.empty(1, grid * grid + 1, D))
        self.blocks = nn.ModuleList(
            Block(D, D * cfg.mlp_ratio, cfg.num_heads, cfg.layer_norm_eps, cfg.hidden_act, q_bias=cfg.qkv_bias,
                  k_bias=cfg.qkv_bias, v_bias=cfg.qkv_bias, o_bias=True, mlp_bias=True)
            for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)

    def position_table(self, height: int, width: int) -> torch.Tensor:
        """The stored table, resized for an input of height x width pixels exactly as transformers 5.24's
        Dinov2Embeddings.interpolate_pos_encoding: kept as is when the patch count matches and the input is square,
        otherwise the patch part is resized bicubically (align_corners=False, computed in fp32) to
        (height // patch, width // patch). (5.24 passes `size`; the original +0.1 / scale-factor form is gone.)"""
        stored = self.pos_embed.shape[1] - 1
        new_h, new_w = height // self.cfg.patch_size, width // self.cfg.patch_size
        if new_h * new_w == stored and height == width:
            return self.pos_embed
        side = math.isqrt(stored)
        patch_pos = self.pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos.float(), size=(new_h, new_w), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.to(self.pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, new_h * new_w, -1)
        return torch.cat([self.pos_embed[:, :1], patch_pos], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] -> last_hidden_state [B, 1 + (H//p)*(W//p), D] (after the final LayerNorm)."""
        _check_pixels(pixel_values, self.cfg.patch_size)
        H, W = pixel_values.shape[-2:]
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.position_table(H, W)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLS row of last_hidden_state, [B, D] (transformers' pooler_output)."""
        return self(pixel_values)[:, 0]

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> "DINOv2":
        """Load a Hugging Face Dinov2Model folder (config.json + safetensors)."""
        path = Path(path)
        with torch.device("meta"):
            model = cls(DINOv2Config.from_hf(_read_config(path)))
        load_module(model, path, table=DINOV2_KEY_TABLE, dtype=dtype, device=device)
        return model.eval()


# Hugging Face Dinov2Model checkpoint key -> module key. The on-disk names are the pre-5.0 ones
# (attention.attention.query, attention.output.dense); transformers 5 renames them on load and back on save.
DINOV2_KEY_TABLE = [
    (r"embeddings\.cls_token", r"cls_token"),
    (r"embeddings\.position_embeddings", r"pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.\1"),
    (r"embeddings\.mask_token", None),  # read by masked-image pretraining only
    (r"encoder\.layer\.(\d+)\.attention\.attention\.query\.(weight|bias)", r"blocks.\1.attn.q_proj.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.key\.(weight|bias)", r"blocks.\1.attn.k_proj.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.value\.(weight|bias)", r"blocks.\1.attn.v_proj.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"blocks.\1.attn.o_proj.\2"),
    (r"encoder\.layer\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"blocks.\1.\2.\3"),
    (r"encoder\.layer\.(\d+)\.norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (r"encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1", r"blocks.\1.ls\2"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
]


class DINOv3(nn.Module):
    def __init__(self, cfg: DINOv3Config):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        if D % (4 * cfg.num_heads):
            raise ValueError(f"head size {D // cfg.num_heads} must be a multiple of 4 for DINOv3's 2-D RoPE")
        self.patch_embed = nn.Conv2d(3, D, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.empty(1, 1, D))
        self.register_tokens = nn.Parameter(torch.empty(1, cfg.num_register_tokens, D))
        self.blocks = nn.ModuleList(
            Block(D, cfg.intermediate_size, cfg.num_heads, cfg.layer_norm_eps, cfg.hidden_act, q_bias=cfg.query_bias,
                  k_bias=cfg.key_bias, v_bias=cfg.value_bias, o_bias=cfg.proj_bias, mlp_bias=cfg.mlp_bias)
            for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)

    def rope(self, grid_h: int, grid_w: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [grid_h*grid_w, head_dim] as DINOv3ViTRopePositionEmbedding (eval mode): patch centres normalised
        to [-1, 1] per axis, angles 2*pi*coord*theta^(-4i/head_dim) for (y, x) interleaved per frequency, the
        head_dim/2 angles tiled twice for rotate_half; computed in fp32, cast to the activation dtype."""
        head_dim = self.cfg.hidden_size // self.cfg.num_heads
        inv_freq = 1 / self.cfg.rope_theta ** torch.arange(0, 1, 4 / head_dim, dtype=torch.float32, device=device)
        ys = torch.arange(0.5, grid_h, dtype=torch.float32, device=device) / grid_h
        xs = torch.arange(0.5, grid_w, dtype=torch.float32, device=device) / grid_w
        coords = 2.0 * torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1) - 1.0
        angles = (2 * math.pi * coords[:, :, None] * inv_freq[None, None, :]).flatten(1, 2).tile(2)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] -> last_hidden_state [B, 1 + registers + (H//p)*(W//p), D] (after the final LayerNorm)."""
        _check_pixels(pixel_values, self.cfg.patch_size)
        pixel_values = pixel_values.to(self.patch_embed.weight.dtype)
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        B = x.shape[0]
        x = torch.cat([self.cls_token.expand(B, -1, -1), self.register_tokens.expand(B, -1, -1), x], dim=1)
        p = self.cfg.patch_size
        rope = self.rope(pixel_values.shape[2] // p, pixel_values.shape[3] // p, x.device, x.dtype)
        for block in self.blocks:
            x = block(x, rope)
        return self.norm(x)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLS row of last_hidden_state, [B, D] (transformers' pooler_output)."""
        return self(pixel_values)[:, 0]

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> "DINOv3":
        """Load a Hugging Face DINOv3ViTModel folder (config.json + safetensors)."""
        path = Path(path)
        with torch.device("meta"):
            model = cls(DINOv3Config.from_hf(_read_config(path)))
        load_module(model, path, table=DINOV3_KEY_TABLE, dtype=dtype, device=device)
        return model.eval()


# Hugging Face DINOv3ViTModel checkpoint key -> module key (on disk the blocks are `layer.{i}`; transformers 5.24
# nests them under `model.` in memory only).
DINOV3_KEY_TABLE = [
    (r"embeddings\.cls_token", r"cls_token"),
    (r"embeddings\.register_tokens", r"register_tokens"),
    (r"embeddings\.patch_embeddings\.(weight|bias)", r"patch_embed.\1"),
    (r"embeddings\.mask_token", None),  # read by masked-image pretraining only
    (r"layer\.(\d+)\.attention\.(q_proj|k_proj|v_proj|o_proj)\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
    (r"layer\.(\d+)\.mlp\.up_proj\.(weight|bias)", r"blocks.\1.fc1.\2"),
    (r"layer\.(\d+)\.mlp\.down_proj\.(weight|bias)", r"blocks.\1.fc2.\2"),
    (r"layer\.(\d+)\.norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (r"layer\.(\d+)\.layer_scale([12])\.lambda1", r"blocks.\1.ls\2"),
    (r"norm\.(weight|bias)", r"norm.\1"),
]


# --------------------------------------------------------------------------------------------------- preprocessing

def dinov2_preprocess(image: Image.Image | str | os.PathLike, resize: int = 256, crop: int = 224) -> torch.Tensor:
    """The DINOv2 processor (BitImageProcessor as configured in facebook/dinov2-*: shortest side 256 with PIL
    bicubic, centre crop 224, ImageNet mean/std, convert_rgb) on its PIL path. -> float32 [3, crop, crop]."""
    if crop > resize:
        raise ValueError(f"crop {crop} is larger than the resized shortest side {resize}")
    image = resize_shortest_edge(load_rgb(image), resize)
    return normalize(center_crop(np.asarray(image), crop, crop), IMAGENET_MEAN, IMAGENET_STD)


def dinov3_preprocess(image: Image.Image | str | os.PathLike, size: int = 224) -> torch.Tensor:
    """transformers' DINOv3ViTImageProcessor defaults (its only backend is torchvision): rescale by 1/255 first, then
    resize the float image to size x size with antialiased bilinear interpolation (what torchvision's resize runs on
    float tensors), then ImageNet mean/std; no crop. Transparency is composited onto white as for the other
    backbones (the DINOv3 processor does no RGB conversion; RGB inputs are unaffected). -> float32 [3, size, size]."""
    x = torch.from_numpy(np.array(load_rgb(image))).permute(2, 0, 1)[None] * (1 / 255)
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std)[0]
