"""Qwen2.5-VL: windowed ViT with 2-D RoPE -> patch merger -> Qwen2 decoder with 3-D M-RoPE.

UAE's captioner (Qwen2.5-VL-3B-Instruct) and the LVLM whose last-layer hidden states condition the DiT. Behaviour
follows transformers 5.24 `Qwen2_5_VLForConditionalGeneration` (fp32 parity is tested): vision tower
(`Qwen2_5_VisionTransformerPretrainedModel`), M-RoPE positions (`Qwen2_5_VLModel.get_rope_index`) and decoder
(`Qwen2_5_VLTextModel`). Generation (KV cache, prefill / decode step, sampling) lives in
model/qwen2_5_vl_generation.py; `TextModel.forward` writes into its cache when given one. Every attention goes through
`model.layers.attention`.

Weights: `Qwen25VL.from_pretrained(folder)` reads config.json (the official flat layout or the nested one
transformers 5 writes) and safetensors with either key spelling (`visual.*`/`model.layers.*` as on the hub and as
transformers 5.24 still saves, or the in-memory `model.visual.*`/`model.language_model.*`).
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kernels.logprob import token_logprobs as fused_token_logprobs
from kernels.logprob import token_logprobs_reference
from model.layers import RMSNorm, attention
from weights import Checkpoint, load_module, read_json

if TYPE_CHECKING:
    from model.qwen2_5_vl_generation import KVCache

__all__ = [
    "VisionConfig", "TextConfig", "Qwen25VLConfig", "Qwen25VL", "KEY_TABLE", "vision_attention_layout",
    "mrope_positions", "causal_mask",
]

# Vision RMSNorms have a fixed eps in transformers (Qwen2_5_VLVisionBlock / Qwen2_5_VLPatchMerger), not a config field.
VISION_NORM_EPS = 1e-6


# ----------------------------------------------------------------------------------------------------------- config

@dataclass(frozen=True)
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    num_heads: int = 16
    intermediate_size: int = 3420
    out_hidden_size: int = 2048
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112  # pixels; window_size / patch / merge merged tokens per window side
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    rope_theta: float = 10000.0

    def __post_init__(self):
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"vision hidden_size {self.hidden_size} must split into {self.num_heads} heads whose "
                             "size is a multiple of 4 (2-D RoPE uses head_dim/4 frequencies per axis)")
        unit = self.patch_size * self.spatial_merge_size
        if self.window_size < unit or self.window_size % unit:
            raise ValueError(f"vision window_size {self.window_size} must be a positive multiple of patch_size * "
                             f"spatial_merge_size = {unit}")
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"vision fullatt_block_indexes {bad} lie outside the {self.depth} blocks")

    @property
    def patch_dim(self) -> int:
        """Length of one pixel_values row: C x T x P x P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    mrope_section: tuple[int, int, int] = (16, 24, 24)  # rotary pairs given to the t, h, w position in turn
    max_position_embeddings: int = 128000
    tie_word_embeddings: bool = True

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if len(self.mrope_section) != 3 or 2 * sum(self.mrope_section) != self.head_dim:
            raise ValueError(f"mrope_section {list(self.mrope_section)} must be 3 sizes summing to head_dim / 2 = "
                             f"{self.head_dim // 2}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class Qwen25VLConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    def __post_init__(self):
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ValueError(f"vision out_hidden_size {self.vision.out_hidden_size} must equal the text hidden_size "
                             f"{self.text.hidden_size} (image features replace token embeddings)")
        for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            if not 0 <= getattr(self, name) < self.text.vocab_size:
                raise ValueError(f"{name} {getattr(self, name)} is outside the vocabulary [0, {self.text.vocab_size})")

    @classmethod
    def preset(cls, name: str, **overrides) -> "Qwen25VLConfig":
        """Real configs ("3b": Qwen2.5-VL-3B-Instruct, "7b": Qwen2.5-VL-7B-Instruct) and "tiny" (random CPU tests).
        `overrides` replace top-level fields (token ids) or text fields (e.g. vocab_size)."""
        presets = {
            "3b": cls(),
            "7b": cls(text=TextConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                      num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                      tie_word_embeddings=False),
                      vision=VisionConfig(out_hidden_size=3584)),
            # Width 12 matches ConnectorConfig.preset("tiny").in_dim (UAE.tiny).
            "tiny": cls(text=TextConfig(hidden_size=12, intermediate_size=24, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, mrope_section=(1, 1, 1),
                                        max_position_embeddings=4096),
                        vision=VisionConfig(depth=2, hidden_size=16, num_heads=2, intermediate_size=24,
                                            out_hidden_size=12, window_size=56, fullatt_block_indexes=(1,))),
        }
        if name not in presets:
            raise ValueError(f"unknown Qwen2.5-VL preset {name!r}; expected one of {sorted(presets)}")
        cfg = presets[name]
        top = {f.name for f in dataclasses.fields(cls)} - {"text", "vision"}
        text_fields = {f.name for f in dataclasses.fields(TextConfig)}
        unknown = sorted(set(overrides) - top - text_fields)
        if unknown:
            raise ValueError(f"preset overrides {unknown} are neither Qwen25VLConfig nor TextConfig fields")
        text = dataclasses.replace(cfg.text, **{k: v for k, v in overrides.items() if k in text_fields})
        return dataclasses.replace(cfg, text=text, **{k: v for k, v in overrides.items() if k in top})

    @classmethod
    def from_json(cls, source: str | os.PathLike | Mapping) -> "Qwen25VLConfig":
        """From a config.json path (or its folder, or the parsed dict): the official flat layout (text fields at top
        level, `rope_scaling={"type": "mrope", ...}`) or transformers 5's nested one (`text_config` with
        `rope_parameters`). Absent optional fields take transformers' defaults; values this implementation does not
        support, and flat/nested copies of one field that disagree, are errors."""
        if isinstance(source, Mapping):
            d, where = dict(source), "config"
        else:
            path = Path(source)
            path = path / "config.json" if path.is_dir() else path
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such config.json")
            d, where = read_json(path), str(path)
        if d.get("model_type", "qwen2_5_vl") != "qwen2_5_vl":
            raise ValueError(f"{where}: model_type {d.get('model_type')!r}, expected 'qwen2_5_vl'")
        ids = {k: d[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
               if k in d}
        return cls(text=_text_config_from_json(d, where), vision=_vision_config_from_json(d, where), **ids)


def _text_config_from_json(d: Mapping, where: str) -> TextConfig:
    """The text fields of a config.json dict `d`, flat or under `text_config` (both copies must agree)."""
    nested = d.get("text_config") or {}
    text_keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings", "hidden_act",
                 "use_sliding_window")
    t = {}
    for key in text_keys:
        if key in d and key in nested and d[key] != nested[key]:
            raise ValueError(f"{where}: {key} is {d[key]!r} at top level but {nested[key]!r} in text_config")
        if key in nested or key in d:
            t[key] = nested.get(key, d.get(key))
    missing = [k for k in text_keys[:5] if k not in t]
    if missing:
        raise ValueError(f"{where}: text fields {missing} are missing")
    if t.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: text hidden_act {t['hidden_act']!r} is not supported (only 'silu')")
    if t.get("use_sliding_window"):
        raise ValueError(f"{where}: use_sliding_window=true is not supported (Qwen2.5-VL checkpoints use full "
                         "attention in every layer)")
    section, theta = _mrope_from_json(d, nested, t, where)
    return TextConfig(
        vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
        num_hidden_layers=t["num_hidden_layers"], num_attention_heads=t["num_attention_heads"],
        num_key_value_heads=t.get("num_key_value_heads") or t["num_attention_heads"],
        rms_norm_eps=t.get("rms_norm_eps", 1e-5), rope_theta=theta, mrope_section=section,
        max_position_embeddings=t.get("max_position_embeddings", 32768),
        # transformers 5 ties when the root flag or (pre-v5 saves) text_config's flag is set.
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False) or nested.get("tie_word_embeddings", False)))


def _mrope_from_json(d: Mapping, nested: Mapping, text: Mapping, where: str) -> tuple[tuple[int, ...], float]:
    """(mrope_section, rope_theta). RoPE settings may sit in rope_scaling (flat, pre-v5) and/or rope_parameters (v5),
    at either level; every copy must describe unscaled M-RoPE (v5 rewrites type "mrope" as rope_type "default") and
    agree."""
    ropes = [r for src in (nested, d) for r in (src.get("rope_parameters"), src.get("rope_scaling")) if r]
    for rope in ropes:
        if rope.get("type", "mrope") != "mrope" or rope.get("rope_type", "default") not in ("mrope", "default"):
            raise ValueError(f"{where}: rope {rope!r} is not supported (only M-RoPE without scaling)")
    sections = {tuple(r["mrope_section"]) for r in ropes if "mrope_section" in r}
    thetas = {float(r["rope_theta"]) for r in ropes if "rope_theta" in r} | (
        {float(text["rope_theta"])} if "rope_theta" in text else set())
    if len(sections) > 1 or len(thetas) > 1:
        raise ValueError(f"{where}: contradictory RoPE settings: mrope_section {sorted(sections)}, rope_theta "
                         f"{sorted(thetas)}")
    return sections.pop() if sections else (16, 24, 24), thetas.pop() if thetas else 1e6


def _vision_config_from_json(d: Mapping, where: str) -> VisionConfig:
    """`vision_config` of a config.json dict `d`, with the old spellings (in_chans, spatial_patch_size) checked."""
    v = d.get("vision_config")
    if not isinstance(v, Mapping):
        raise ValueError(f"{where}: vision_config is missing")
    for key in ("depth", "hidden_size", "num_heads", "intermediate_size", "out_hidden_size"):
        if key not in v:
            raise ValueError(f"{where}: vision_config.{key} is missing")
    if v.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: vision hidden_act {v['hidden_act']!r} is not supported (only 'silu')")
    in_channels = v.get("in_channels", v.get("in_chans", 3))
    if v.get("in_chans", in_channels) != in_channels:
        raise ValueError(f"{where}: vision in_chans {v['in_chans']} disagrees with in_channels {in_channels}")
    patch = v.get("patch_size", 14)
    if v.get("spatial_patch_size", patch) != patch:
        raise ValueError(f"{where}: vision spatial_patch_size {v['spatial_patch_size']} disagrees with "
                         f"patch_size {patch}")
    vrope = v.get("rope_parameters") or {}
    if vrope.get("rope_type", "axial") != "axial":
        raise ValueError(f"{where}: vision rope {vrope!r} is not supported (only axial 2-D RoPE)")
    return VisionConfig(
        depth=v["depth"], hidden_size=v["hidden_size"], num_heads=v["num_heads"],
        intermediate_size=v["intermediate_size"], out_hidden_size=v["out_hidden_size"], in_channels=in_channels,
        patch_size=patch, temporal_patch_size=v.get("temporal_patch_size", 2),
        spatial_merge_size=v.get("spatial_merge_size", 2), window_size=v.get("window_size", 112),
        fullatt_block_indexes=tuple(v.get("fullatt_block_indexes", (7, 15, 23, 31))),
        rope_theta=float(vrope.get("rope_theta", 10000.0)))


# ----------------------------------------------------------------------------------------------------------- vision

def vision_attention_layout(grid_thw: torch.Tensor, cfg: VisionConfig) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
    """(window_index, cu_window_seqlens, cu_seqlens) for images of `grid_thw` [n, 3] (patches per t, h, w).

    window_index permutes merged tokens (groups of merge^2 patches) so that each window of
    window_size / patch / merge merged tokens per side is contiguous, windows row-major within each frame, windows
    cut off at the right and bottom edge (transformers' `get_vision_window_index`). cu_window_seqlens / cu_seqlens
    are cumulative patch counts of the windows / of the frames (full-attention blocks attend within a frame), the
    layout a varlen attention kernel takes."""
    merge, unit = cfg.spatial_merge_size, cfg.spatial_merge_size ** 2
    side = cfg.window_size // merge // cfg.patch_size
    index, lengths, offset = [], [], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        ids = torch.arange(t * gh * gw).view(t, gh, gw)
        # transformers pads by a whole extra window when the size divides evenly; such windows are empty and
        # dropped, so padding up to the next multiple gives the same layout.
        pad_h, pad_w = -gh % side, -gw % side
        nh, nw = (gh + pad_h) // side, (gw + pad_w) // side
        windows = F.pad(ids, (0, pad_w, 0, pad_h), value=-1).view(t, nh, side, nw, side)
        windows = windows.permute(0, 1, 3, 2, 4).reshape(t * nh * nw, side * side)
        keep = windows >= 0
        index.append(windows[keep] + offset)
        lengths.append(keep.sum(1) * unit)
        offset += t * gh * gw
    lengths = torch.cat(lengths)
    cu_window = F.pad(lengths[lengths > 0].cumsum(0), (1, 0)).to(torch.int32)
    frames = (grid_thw[:, 1] * grid_thw[:, 2]).repeat_interleave(grid_thw[:, 0]).cpu()
    cu_seqlens = F.pad(frames.cumsum(0), (1, 0)).to(torch.int32)
    device = grid_thw.device
    return torch.cat(index).to(device), cu_window.to(device), cu_seqlens.to(device)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = (T, P, P) over one patch, i.e. a matmul of each flattened (C, T, P, P) row with
    the flattened kernel. The weight keeps the checkpoint's Conv3d shape."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.hidden_size, cfg.in_channels, cfg.temporal_patch_size,
                                               cfg.patch_size, cfg.patch_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Conv3d's default, for randomly built models

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.linear(pixels.to(self.weight.dtype), self.weight.flatten(1))


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor,
                max_seqlen: int) -> torch.Tensor:
        n, dim = x.shape
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, -1).permute(1, 2, 0, 3).unbind(0)  # [H, N, D] each
        # transformers applies the vision RoPE in fp32 and casts back (apply_rotary_pos_emb_vision).
        qf, kf = q.float(), k.float()
        q = (qf * cos + rotate_half(qf) * sin).to(v.dtype)
        k = (kf * cos + rotate_half(kf) * sin).to(v.dtype)
        out = attention(q[None], k[None], v[None], cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)[0]
        return self.proj(out.transpose(0, 1).reshape(n, dim))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, VISION_NORM_EPS)
        self.attn = VisionAttention(cfg)
        self.norm2 = RMSNorm(cfg.hidden_size, VISION_NORM_EPS)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=True)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen):
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens, max_seqlen)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """RMSNorm, then each merge^2 consecutive patches (one merged token) -> Linear -> exact GELU -> Linear."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.merged_dim = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.ln_q = RMSNorm(cfg.hidden_size, VISION_NORM_EPS)
        self.mlp = nn.Sequential(nn.Linear(self.merged_dim, self.merged_dim), nn.GELU(),
                                 nn.Linear(self.merged_dim, cfg.out_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.merged_dim))


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)

    def rope(self, grid_thw: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos/sin [N, head_dim] of each patch in processor order (merge blocks row-major, patches row-major
        within a block): head_dim/4 frequencies of the row index, then of the column index, twice over."""
        cfg, merge = self.config, self.config.spatial_merge_size
        rows, cols = [], []
        for t, h, w in grid_thw.tolist():
            hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            block = (h // merge, merge, w // merge, merge)
            rows.append(hh.reshape(block).transpose(1, 2).flatten().repeat(t))
            cols.append(ww.reshape(block).transpose(1, 2).flatten().repeat(t))
        pos = torch.stack([torch.cat(rows), torch.cat(cols)], dim=-1).to(device)  # [N, 2]
        spatial = cfg.hidden_size // cfg.num_heads // 2
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, spatial, 2, dtype=torch.float, device=device) / spatial)
        freqs = (pos[..., None].float() * inv_freq).flatten(1)  # [N, (row freqs, col freqs)]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values [sum(t*h*w), C*T*P*P] -> merged image features [sum(t*h*w)/merge^2, out_hidden_size]."""
        unit = self.config.spatial_merge_size ** 2
        window_index, cu_window, cu_full = vision_attention_layout(grid_thw, self.config)
        x = self.patch_embed(pixel_values)
        n = x.shape[0]

        def to_windows(t: torch.Tensor) -> torch.Tensor:
            return t.view(n // unit, unit, -1)[window_index].view(n, -1)

        x = to_windows(x)
        cos, sin = (to_windows(t) for t in self.rope(grid_thw, x.device))
        # Window blocks attend within each window, full blocks within each frame: packed sequences for the one
        # attention function (one varlen kernel launch per block, or a block-diagonal mask under SDPA).
        max_window, max_frame = (int((cu[1:] - cu[:-1]).max()) for cu in (cu_window, cu_full))
        for i, block in enumerate(self.blocks):
            full = i in self.config.fullatt_block_indexes
            x = block(x, cos, sin, cu_full if full else cu_window, max_frame if full else max_window)
        return self.merger(x)[torch.argsort(window_index)]


# ----------------------------------------------------------------------------------------------------------- text

def mrope_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_grid_thw: torch.Tensor | None,
                    cfg: Qwen25VLConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE positions [3, B, T] (t, h, w) and rope_delta [B] as transformers' `get_rope_index`, over the tokens
    the mask keeps: text tokens count up (p, p, p); an image of merged grid (t, h, w) starting at position s takes
    (s + frame, s + row, s + col) and the text after it resumes at s + max(h, w). Masked tokens get 0.
    rope_delta[b] = max position + 1 - T: the position of cache column c >= T is c + rope_delta[b]."""
    merge = cfg.vision.spatial_merge_size
    grids = image_grid_thw.tolist() if image_grid_thw is not None else []
    ids_all, keep_all = input_ids.cpu(), attention_mask.bool().cpu()
    batch, length = input_ids.shape
    positions = torch.zeros(3, batch, length, dtype=torch.long)
    deltas, g = [], 0
    for b in range(batch):
        cols = keep_all[b].nonzero().flatten()
        is_image = (ids_all[b, cols] == cfg.image_token_id).tolist()
        n_tokens = len(is_image)
        pieces, cursor, start = [], 0, 0
        while True:
            nxt = is_image.index(True, cursor) if True in is_image[cursor:] else n_tokens
            pieces.append(torch.arange(nxt - cursor).expand(3, -1) + start)
            start += nxt - cursor
            if nxt == n_tokens:
                break
            if g == len(grids):
                raise ValueError(f"input_ids row {b} has more images than image_grid_thw's {len(grids)}")
            t, h, w = grids[g][0], grids[g][1] // merge, grids[g][2] // merge
            run = t * h * w
            if not all(is_image[nxt:nxt + run]) or nxt + run > n_tokens:
                got = next((i for i, im in enumerate(is_image[nxt:] + [False]) if not im))
                raise ValueError(f"image {g} (image_grid_thw {grids[g]}) needs {run} consecutive image tokens "
                                 f"(id {cfg.image_token_id}) but input_ids row {b} has {got}")
            frame, row, col = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
            pieces.append(torch.stack([frame, row, col]).view(3, -1) + start)
            start += max(h, w)
            cursor, g = nxt + run, g + 1
        pos = torch.cat(pieces, dim=1)
        positions[:, b, cols] = pos
        deltas.append(int(pos.max()) + 1 - length)
    if g != len(grids):
        raise ValueError(f"image_grid_thw describes {len(grids)} images but input_ids hold image tokens for {g}")
    device = input_ids.device
    return positions.to(device), torch.tensor(deltas, dtype=torch.long, device=device)


def mrope_cos_sin(positions: torch.Tensor, cfg: TextConfig, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, T, head_dim] for positions [3, B, T]: rotary pair i uses the t, h or w position according to
    mrope_section, frequencies 1/theta^(2i/head_dim) (Qwen2_5_VLRotaryEmbedding), cast to the activation dtype."""
    dim = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=positions.device).float()
                                        / dim)
    freqs = positions[..., None].float() * inv_freq  # [3, B, T, dim/2]
    freqs = torch.cat([part[i] for i, part in enumerate(freqs.split(list(cfg.mrope_section), dim=-1))], dim=-1)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def causal_mask(key_valid: torch.Tensor, query_columns: torch.Tensor) -> torch.Tensor:
    """Bool [B, 1, Tq, L]: query at column c sees valid keys at columns <= c. A query with no visible key (a left
    pad) sees itself instead, so that no attention row is empty; its output is never used."""
    columns = torch.arange(key_valid.shape[1], device=key_valid.device)
    causal = columns[None, :] <= query_columns[:, None]
    mask = causal[None] & key_valid[:, None, :]
    mask = mask | ((columns[None, :] == query_columns[:, None])[None] & ~mask.any(-1, keepdim=True))
    return mask[:, None]


class TextAttention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, kv_cache=None, cache_position=None, prefix_kv=None, return_kv=False):
        """kv_cache: (keys, values) of a preallocated cache, written in place at columns `cache_position` and
        attended whole (generation). prefix_kv: (keys, values) [B, Hkv, P, D] of earlier positions (differentiable)
        that x's queries attend before x's own keys, which `mask` [B, 1, T, P + T] covers. return_kv: also return
        x's (keys, values) after RoPE."""
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if kv_cache is not None:
            k_cache, v_cache = kv_cache
            k_cache.index_copy_(2, cache_position, k)
            v_cache.index_copy_(2, cache_position, v)
            k, v = k_cache, v_cache
        own = (k, v)
        if prefix_kv is not None:
            k, v = torch.cat([prefix_kv[0], k], dim=2), torch.cat([prefix_kv[1], v], dim=2)
        out = self.o_proj(attention(q, k, v, mask=mask, causal=mask is None).transpose(1, 2).reshape(batch, length, -1))
        return (out, own) if return_kv else out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = TextAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=False)

    def forward(self, x, cos, sin, mask, kv_cache=None, cache_position=None, prefix_kv=None, return_kv=False):
        out = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, cache_position, prefix_kv, return_kv)
        out, kv = out if return_kv else (out, None)
        x = x + out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return (x, kv) if return_kv else x


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None = None, cache_position: torch.Tensor | None = None,
                gradient_checkpointing: bool = False) -> torch.Tensor:
        """Embeddings [B, T, d] at M-RoPE positions [3, B, T] -> final-norm hidden states; mask None = plain causal.
        With a cache, keys and values are written at columns `cache_position` [T] and `mask` [B, 1, T, max_len]
        spans the whole cache."""
        cos, sin = mrope_cos_sin(positions, self.config, x.dtype)
        for i, layer in enumerate(self.layers):
            if cache is not None:
                x = layer(x, cos, sin, mask, (cache.keys[i], cache.values[i]), cache_position)
            elif gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask)
        return self.norm(x)

    def forward_after_prefix(self, prefix: torch.Tensor, prefix_positions: torch.Tensor, prefix_mask: torch.Tensor,
                             x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, prefix_of_row: torch.Tensor,
                             gradient_checkpointing: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows that continue shared prefixes, differentiably: `prefix` [B, P, d] runs once, and row r of `x`
        [R, T, d] attends, in every layer, to the keys and values of prefix prefix_of_row[r] (gathered, so their
        gradients sum over the rows) then to its own. Masks: prefix_mask [B, 1, P, P], mask [R, 1, T, P + T].
        Returns the final-norm hidden states (prefix [B, P, d], rows [R, T, d]): those of one forward over each
        prefix + row, with each prefix computed once (the G captions of an image share its prompt)."""
        cos_p, sin_p = mrope_cos_sin(prefix_positions, self.config, prefix.dtype)
        cos, sin = mrope_cos_sin(positions, self.config, x.dtype)
        ckpt = gradient_checkpointing and torch.is_grad_enabled()
        for layer in self.layers:
            if ckpt:
                prefix, (k, v) = checkpoint(layer, prefix, cos_p, sin_p, prefix_mask, None, None, None, True,
                                            use_reentrant=False)
                x = checkpoint(layer, x, cos, sin, mask, None, None, (k[prefix_of_row], v[prefix_of_row]),
                               use_reentrant=False)
            else:
                prefix, (k, v) = layer(prefix, cos_p, sin_p, prefix_mask, return_kv=True)
                x = layer(x, cos, sin, mask, prefix_kv=(k[prefix_of_row], v[prefix_of_row]))
        return self.norm(prefix), self.norm(x)


# ----------------------------------------------------------------------------------------------------------- model

# Checkpoint key -> module key. Hub checkpoints (and transformers 5.24's save_pretrained, which converts back) use
# `visual.*` and `model.{embed_tokens,layers,norm}.*`; transformers 5's in-memory names are `model.visual.*` and
# `model.language_model.*`. `lm_head.weight` is absent from tied checkpoints (3B).
KEY_TABLE = [
    (r"(?:model\.)?visual\.patch_embed\.proj\.weight", r"visual.patch_embed.weight"),
    (r"(?:model\.)?visual\.(.+)", r"visual.\1"),
    (r"model\.language_model\.(.+)", r"language_model.\1"),
    (r"model\.((?:embed_tokens|layers|norm)\..+)", r"language_model.\1"),
]


class Qwen25VL(nn.Module):
    def __init__(self, config: Qwen25VLConfig):
        super().__init__()
        self.config = config
        self.visual = VisionTower(config.vision)
        self.language_model = TextModel(config.text)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        if config.text.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight
        self.gradient_checkpointing = False  # recompute decoder layers in backward (uncached forwards only)
        self.fused_logprobs = True  # token_logprobs through kernels/logprob.py; False = logits + log_softmax

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", config: Qwen25VLConfig | None = None,
                        source: Checkpoint | Mapping[str, torch.Tensor] | None = None) -> "Qwen25VL":
        """Load a Qwen2.5-VL folder (config.json + safetensors, sharded or not). `config` overrides config.json;
        `source` (a checkpoint view or state dict) replaces the folder's weights, e.g. a subset of a combined file."""
        config = config or Qwen25VLConfig.from_json(path)
        with torch.device("meta"):
            model = cls(config)
        load_module(model, path if source is None else source, table=KEY_TABLE, dtype=dtype, device=device)
        return model.eval()

    # ------------------------------------------------------------------------------------------- inputs
    def _check_inputs(self, input_ids, attention_mask, pixel_values, image_grid_thw,
                      image_features=None) -> torch.Tensor:
        """Validate a batch; returns the attention mask (all ones when None)."""
        cfg = self.config
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.dtype not in (torch.long,
                                                                                                    torch.int):
            raise ValueError(f"input_ids must be an integer tensor [B, T], got "
                             f"{getattr(input_ids, 'dtype', type(input_ids))} {list(getattr(input_ids, 'shape', []))}")
        if input_ids.numel() and not (0 <= int(input_ids.min()) and int(input_ids.max()) < cfg.text.vocab_size):
            raise ValueError(f"input_ids must lie in [0, {cfg.text.vocab_size}), got [{int(input_ids.min())}, "
                             f"{int(input_ids.max())}]")
        if input_ids.shape[1] > cfg.text.max_position_embeddings:
            raise ValueError(f"input_ids length {input_ids.shape[1]} exceeds max_position_embeddings "
                             f"{cfg.text.max_position_embeddings}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {list(attention_mask.shape)} != input_ids shape "
                             f"{list(input_ids.shape)}")
        if not ((attention_mask == 0) | (attention_mask == 1)).all():
            raise ValueError("attention_mask must hold only 0 and 1")
        if not attention_mask.bool().any(1).all():
            raise ValueError("attention_mask has a row with no token (all zeros)")
        if (input_ids == cfg.video_token_id).any():
            raise ValueError(f"input_ids contain video tokens (id {cfg.video_token_id}); videos are not supported")
        is_image = input_ids == cfg.image_token_id
        if (is_image & ~attention_mask.bool()).any():
            raise ValueError("attention_mask masks out image tokens")
        if pixel_values is not None and image_features is not None:
            raise ValueError("give pixel_values or image_features, not both")
        images = pixel_values if image_features is None else image_features
        if (images is None) != (image_grid_thw is None):
            raise ValueError("pixel_values (or image_features) and image_grid_thw must be given together")
        if images is None:
            if is_image.any():
                raise ValueError(f"input_ids contain {int(is_image.sum())} image tokens but no pixel_values were given")
            return attention_mask
        vis = cfg.vision
        if image_grid_thw.ndim != 2 or image_grid_thw.shape[1] != 3 or image_grid_thw.is_floating_point():
            raise ValueError(f"image_grid_thw must be an integer tensor [n_images, 3], got {image_grid_thw.dtype} "
                             f"{list(image_grid_thw.shape)}")
        if (image_grid_thw < 1).any() or (image_grid_thw[:, 1:] % vis.spatial_merge_size).any():
            raise ValueError(f"image_grid_thw {image_grid_thw.tolist()}: t must be >= 1 and h, w positive multiples "
                             f"of spatial_merge_size {vis.spatial_merge_size}")
        n_patches = int(image_grid_thw.prod(-1).sum())
        n_tokens = n_patches // vis.spatial_merge_size ** 2
        if int(is_image.sum()) != n_tokens:
            raise ValueError(f"input_ids hold {int(is_image.sum())} image tokens (id {cfg.image_token_id}) but "
                             f"image_grid_thw {image_grid_thw.tolist()} needs {n_tokens}")
        if image_features is not None:
            if image_features.shape != (n_tokens, vis.out_hidden_size):
                raise ValueError(f"image_features shape {list(image_features.shape)}, expected [{n_tokens}, "
                                 f"{vis.out_hidden_size}] (one row per image token of image_grid_thw)")
            return attention_mask
        if pixel_values.ndim != 2 or pixel_values.shape != (n_patches, vis.patch_dim):
            raise ValueError(f"pixel_values shape {list(pixel_values.shape)}, expected [{n_patches}, {vis.patch_dim}] "
                             f"(sum of t*h*w over image_grid_thw, C*T*P*P)")
        return attention_mask

    def embed(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, image_features=None):
        """(input embeddings [B, T, d] with image features in place of the image tokens, M-RoPE positions [3, B, T],
        rope_delta [B], attention mask [B, T]). `image_features` [n_image_tokens, d] (the vision tower's output,
        `self.visual(pixel_values, image_grid_thw)`, in the order of the image tokens) replace pixel_values when the
        same images recur: G captions of one image, or the policy and reference forwards of one step."""
        attention_mask = self._check_inputs(input_ids, attention_mask, pixel_values, image_grid_thw, image_features)
        x = self.language_model.embed_tokens(input_ids)
        if pixel_values is not None:
            image_features = self.visual(pixel_values, image_grid_thw)
        if image_features is not None:
            x = x.masked_scatter((input_ids == self.config.image_token_id)[..., None], image_features.to(x.dtype))
        positions, rope_delta = mrope_positions(input_ids, attention_mask, image_grid_thw, self.config)
        return x, positions, rope_delta, attention_mask

    # ------------------------------------------------------------------------------------------- forward
    def forward_hidden(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                       image_grid_thw: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                       pad_states: bool = True, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Last-layer hidden states after the final norm, [B, T, d]. Left-padding positions hold unspecified values;
        right-padding positions attend to every earlier real token, as in transformers (UAE's text conditioning
        reads them).

        pad_states=False: the caller ignores every padding position (log-prob paths). A batch with right padding
        only then runs plain causal attention without a mask, which the flash kernels (ours, SDPA's) take; real
        tokens get the same values, right pads then also see earlier pads. `image_features`: see `embed`."""
        x, positions, _, attention_mask = self.embed(input_ids, attention_mask, pixel_values, image_grid_thw,
                                                     image_features)
        valid = attention_mask.bool()
        if not pad_states and bool((valid[:, 1:] <= valid[:, :-1]).all()):
            mask = None
        else:
            mask = causal_mask(valid, torch.arange(x.shape[1], device=x.device))
        return self.language_model(x, positions, mask, gradient_checkpointing=self.gradient_checkpointing)

    def forward_hidden_after_prompts(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor | None,
                                     tokens: torch.Tensor, prompt_of_row: Sequence[int] | torch.Tensor,
                                     pixel_values: torch.Tensor | None = None,
                                     image_grid_thw: torch.Tensor | None = None,
                                     image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing over shared prompts: the last-layer hidden states [R, N, d] that predict each of `tokens`
        [R, N] written after prompt prompt_of_row[r] of the left-padded `prompt_ids` [B, P] (their images given by
        pixel_values or image_features). Position j's state predicts token j: j = 0 is the prompt's last state,
        j > 0 the state at token j - 1. Each prompt runs once (`TextModel.forward_after_prefix`), not once per row:
        the values (and gradients) are those of `forward_hidden` over each prompt + row with `pad_states=False`.
        Rows are right-padded; states at and after a row's padding are unspecified (callers mask them)."""
        x_p, pos_p, rope_delta, prompt_mask = self.embed(prompt_ids, prompt_mask, pixel_values, image_grid_thw,
                                                         image_features)
        rows = torch.as_tensor(prompt_of_row, dtype=torch.long, device=x_p.device)
        n_prompts, prompt_len = prompt_ids.shape
        if rows.ndim != 1 or rows.shape[0] != tokens.shape[0] or (rows.numel() and not (
                0 <= int(rows.min()) and int(rows.max()) < n_prompts)):
            raise ValueError(f"prompt_of_row must give, for each of the {tokens.shape[0]} rows, a prompt index in "
                             f"[0, {n_prompts}), got {rows.tolist()}")
        valid = prompt_mask.bool()
        prompt_causal = causal_mask(valid, torch.arange(prompt_len, device=x_p.device))
        n = tokens.shape[1] - 1  # the last token is predicted, never read
        if n == 0:
            return self.language_model(x_p, pos_p, prompt_causal,
                                       gradient_checkpointing=self.gradient_checkpointing)[rows, -1:]
        x = self.language_model.embed_tokens(tokens[:, :-1])
        columns = prompt_len + torch.arange(n, device=x.device)
        # Text after the prompt: position = cache column + rope_delta (as generation places it).
        positions = (columns[None] + rope_delta[rows][:, None]).expand(3, -1, -1)
        key_valid = torch.cat([valid[rows], torch.ones(rows.shape[0], n, dtype=torch.bool, device=x.device)], 1)
        h_p, h = self.language_model.forward_after_prefix(
            x_p, pos_p, prompt_causal, x, positions, causal_mask(key_valid, columns), rows,
            gradient_checkpointing=self.gradient_checkpointing)
        return torch.cat([h_p[rows, -1:], h], dim=1)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] in the model dtype."""
        return self.lm_head(self.forward_hidden(input_ids, pixel_values, image_grid_thw, attention_mask))

    def token_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """log softmax(lm_head(hidden) / temperature)[target] for hidden [..., d] and targets [...] -> fp32 [...],
        differentiable. With `fused_logprobs` (default) the vocabulary-chunked kernel (kernels/logprob.py) never
        materialises the [N, V] logits; otherwise they are computed in fp32 and log-softmaxed (the naive path)."""
        if hidden.shape[:-1] != targets.shape:
            raise ValueError(f"hidden {list(hidden.shape)} and targets {list(targets.shape)} must share their "
                             "leading dimensions")
        impl = fused_token_logprobs if self.fused_logprobs else token_logprobs_reference
        flat = impl(hidden.reshape(-1, hidden.shape[-1]), self.lm_head.weight, targets.reshape(-1), temperature)
        return flat.view(targets.shape)
