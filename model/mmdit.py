"""SD3 / SD3.5 MMDiT (Esser et al. 2024, "Scaling Rectified Flow Transformers"): the UAE decoder.

Image tokens (2x2 latent patches plus a stored position table) and context tokens (the connector's output) keep
separate weights but attend jointly in every block; a timestep + pooled-text vector modulates every LayerNorm
(adaLN-Zero). SD3.5-medium (MMDiT-X) adds a second, image-only attention to its first blocks.

The reference is diffusers 0.42 `SD3Transformer2DModel` (transformer_sd3.py, attention.py `JointTransformerBlock`,
attention_processor.py `JointAttnProcessor2_0`, embeddings.py, normalization.py). Module and parameter names equal
diffusers', so a `transformer/` folder loads through an identity table and PEFT adapters trained on diffusers
(UAE's `dit_lora/`) address the same Linears. Stability AI's single-file checkpoints load through
`StabilityCheckpoint`, a lazy renaming view.

    model = MMDiT.from_pretrained("stable-diffusion-3.5-large/transformer", dtype=torch.bfloat16, device="cuda")
    v = model(latents, sigmas * 1000, context, pooled)   # velocity, [B, 16, H, W]
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.layers import RMSNorm, attention
from weights import CheckpointError, load_module, open_checkpoint, read_json

__all__ = ["MMDiTConfig", "MMDiT", "JointBlock", "StabilityCheckpoint", "KEY_TABLE", "STABILITY_KEY_TABLE",
           "timestep_embedding"]


# ------------------------------------------------------------------------------------------------------ config

@dataclass(frozen=True)
class MMDiTConfig:
    """Fields and defaults of diffusers' `SD3Transformer2DModel.__init__`, so a `transformer/config.json` that
    omits a key means what it means to diffusers."""
    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int = 16
    pos_embed_max_size: int = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None

    def __post_init__(self):
        if self.out_channels is None:  # diffusers: None means "same as in_channels"
            object.__setattr__(self, "out_channels", self.in_channels)
        object.__setattr__(self, "dual_attention_layers", tuple(self.dual_attention_layers))
        for name in ("patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
                     "joint_attention_dim", "pooled_projection_dim", "out_channels", "pos_embed_max_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"MMDiTConfig.{name} must be a positive int, got {value!r}")
        if self.caption_projection_dim != self.inner_dim:
            # The projected context enters blocks built with width heads * head_dim (diffusers does the same).
            raise ValueError(f"MMDiTConfig.caption_projection_dim ({self.caption_projection_dim}) must equal "
                             f"num_attention_heads * attention_head_dim ({self.inner_dim})")
        if self.qk_norm not in (None, "rms_norm"):
            raise ValueError(f"MMDiTConfig.qk_norm must be None or 'rms_norm' (SD3 / SD3.5), got {self.qk_norm!r}")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"MMDiTConfig.dual_attention_layers {bad} outside 0..{self.num_layers - 1}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_json(cls, source: str | os.PathLike | Mapping) -> "MMDiTConfig":
        """Read diffusers' `transformer/config.json` (a file, its folder, or the parsed dict). Keys starting with
        an underscore (`_class_name`, `_diffusers_version`) are bookkeeping; any other unknown key is an error."""
        if isinstance(source, Mapping):
            raw = dict(source)
        else:
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            try:
                raw = read_json(path)
            except (OSError, CheckpointError) as e:  # both name the file
                raise CheckpointError(f"cannot read an MMDiT config: {e}") from None
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in raw if k not in known and not k.startswith("_"))
        if unknown:
            raise ValueError(f"unknown SD3Transformer2DModel config key(s) {unknown}; known: {sorted(known)}")
        return cls(**{k: v for k, v in raw.items() if k in known})

    @classmethod
    def preset(cls, name: str) -> "MMDiTConfig":
        """The released configs "sd3-medium", "sd3.5-medium", "sd3.5-large", and "tiny" for tests."""
        if name not in _PRESETS:
            raise ValueError(f"unknown MMDiT preset {name!r}; choose one of {sorted(_PRESETS)}")
        return replace(cls(), **_PRESETS[name])


# Values of the official `transformer/config.json` files (stabilityai/stable-diffusion-3-medium-diffusers,
# stable-diffusion-3.5-medium, stable-diffusion-3.5-large); fields not listed equal the defaults above
# (sample_size 128, patch 2, 16 latent channels, head dim 64, joint_attention_dim 4096, pooled 2048).
_PRESETS = {
    "sd3-medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192),
    "sd3.5-medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
                         dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
    "sd3.5-large": dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192,
                        qk_norm="rms_norm"),
    # Random-weight model for CPU tests of the whole UAE loop: every block kind, widths of the tiny connector.
    "tiny": dict(sample_size=32, num_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=20,
                 caption_projection_dim=16, pooled_projection_dim=10, pos_embed_max_size=32,
                 dual_attention_layers=(0,), qk_norm="rms_norm"),
}


# ------------------------------------------------------------------------------------------------- embeddings

def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of diffusers' `Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)`:
    frequencies exp(-ln(max_period) * i / (dim/2)), cos half first. fp32, [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


def sincos_position_table(dim: int, size: int, base_size: int) -> torch.Tensor:
    """[1, size*size, dim] 2-D sin-cos table, diffusers `get_2d_sincos_pos_embed(dim, size, base_size=base_size)`:
    positions scaled by base_size / size; the first half of the channels encodes the column, the second the row,
    each as [sin, cos] of position / 10000^(2i/(dim/2))."""
    if torch.get_default_device().type == "meta":
        return torch.zeros(1, size * size, dim)
    pos = (torch.arange(size, dtype=torch.float32) / (size / base_size)).double()  # fp32 grid, as diffusers
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def embed_1d(p: torch.Tensor) -> torch.Tensor:
        out = torch.outer(p.reshape(-1), omega)
        return torch.cat([out.sin(), out.cos()], dim=1)

    rows, cols = torch.meshgrid(pos, pos, indexing="ij")
    return torch.cat([embed_1d(cols), embed_1d(rows)], dim=1).float().unsqueeze(0)


class PatchEmbed(nn.Module):
    """p x p latent patches -> tokens, plus the stored position table centre-cropped to the token grid
    (diffusers `PatchEmbed.cropped_pos_embed`: top = (S - h) // 2, left = (S - w) // 2)."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.patch_size, self.max_size = cfg.patch_size, cfg.pos_embed_max_size
        self.proj = nn.Conv2d(cfg.in_channels, cfg.inner_dim, cfg.patch_size, stride=cfg.patch_size)
        # A persistent buffer in diffusers and a tensor in Stability's files: loaded from checkpoints; a model built
        # from scratch starts from diffusers' initial sin-cos table.
        self.register_buffer("pos_embed", sincos_position_table(cfg.inner_dim, self.max_size,
                                                                base_size=cfg.sample_size // cfg.patch_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        tokens = self.proj(x).flatten(2).transpose(1, 2)
        top, left = (self.max_size - h) // 2, (self.max_size - w) // 2
        table = self.pos_embed.view(self.max_size, self.max_size, -1)[top:top + h, left:left + w]
        return tokens + table.reshape(1, h * w, -1).to(tokens.dtype)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear (diffusers `TimestepEmbedding` and `PixArtAlphaTextProjection(act_fn="silu")`)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbed(nn.Module):
    """The conditioning vector: embedded timestep + embedded pooled text (`CombinedTimestepTextProjEmbeddings`)."""

    def __init__(self, dim: int, pooled_dim: int):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, dim)
        self.text_embedder = MLPEmbedder(pooled_dim, dim)

    def forward(self, timestep: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return self.timestep_embedder(timestep_embedding(timestep).to(pooled.dtype)) + self.text_embedder(pooled)


# ----------------------------------------------------------------------------------------------------- blocks

def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    """Every MMDiT LayerNorm: no affine parameters (adaLN supplies them), eps 1e-6."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


class Modulation(nn.Module):
    """adaLN projection SiLU(c) -> n vectors [B, 1, dim]: the `.linear` of diffusers' AdaLayerNormZero (n=6),
    SD35AdaLayerNormZeroX (n=9) and AdaLayerNormContinuous (n=2)."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n = n
        self.linear = nn.Linear(dim, n * dim)

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(c))[:, None].chunk(self.n, dim=-1)


class GELUProj(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """Linear(dim, 4 dim) -> tanh-GELU -> Linear(4 dim, dim). Slot 1 stands where diffusers keeps its dropout, so
    the Linears are named `net.0.proj` and `net.2` as in checkpoints and adapters."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleList([GELUProj(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class Attention(nn.Module):
    """Projections of one diffusers `Attention`: the image stream (to_q/k/v, to_out.0) and, for the joint
    attention, the context stream (add_q/k/v_proj, to_add_out). Optional per-head q/k RMSNorm, eps 1e-6."""

    def __init__(self, dim: int, heads: int, qk_norm: str | None, joint: bool, context_out: bool):
        super().__init__()
        self.heads = heads
        head_dim = dim // heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm_q = RMSNorm(head_dim, eps=1e-6) if qk_norm else None
        self.norm_k = RMSNorm(head_dim, eps=1e-6) if qk_norm else None
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # a list so the name is diffusers' `to_out.0`
        if joint:
            self.add_q_proj, self.add_k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.add_v_proj = nn.Linear(dim, dim)
            self.norm_added_q = RMSNorm(head_dim, eps=1e-6) if qk_norm else None
            self.norm_added_k = RMSNorm(head_dim, eps=1e-6) if qk_norm else None
            self.to_add_out = nn.Linear(dim, dim) if context_out else None

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B, L, H*D] -> [B, H, L, D]

    def _qkv(self, x, to_q, to_k, to_v, norm_q, norm_k):
        q, k, v = (self._split_heads(p(x)) for p in (to_q, to_k, to_v))
        if norm_q is not None:
            q, k = norm_q(q), norm_k(k)
        return q, k, v

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)

    def context_qkv(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._qkv(c, self.add_q_proj, self.add_k_proj, self.add_v_proj, self.norm_added_q, self.norm_added_k)

    def out(self, o: torch.Tensor) -> torch.Tensor:
        return self.to_out[0](o.transpose(1, 2).flatten(2))

    def context_out(self, o: torch.Tensor) -> torch.Tensor:
        return self.to_add_out(o.transpose(1, 2).flatten(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image-only self-attention (MMDiT-X's second attention)."""
        return self.out(attention(*self.qkv(x)))


class JointBlock(nn.Module):
    """One MMDiT block (diffusers `JointTransformerBlock`), split into pre_attention / joint_attention /
    post_attention so that callers (and kernels) can act between the stages.

    `context_pre_only` (the last block): the context stream only feeds keys and values; its queries are still
    computed and its attention output dropped, as in diffusers, and its norm is AdaLayerNormContinuous, whose
    two modulation vectors come in (scale, shift) order. `dual_attention` (SD3.5-medium, MMDiT-X): a second,
    image-only attention on the same normalised input with its own (shift, scale, gate)."""

    def __init__(self, cfg: MMDiTConfig, context_pre_only: bool, dual_attention: bool):
        super().__init__()
        dim, heads = cfg.inner_dim, cfg.num_attention_heads
        self.context_pre_only = context_pre_only
        self.norm1 = Modulation(dim, 9 if dual_attention else 6)
        self.norm1_context = Modulation(dim, 2 if context_pre_only else 6)
        self.attn = Attention(dim, heads, cfg.qk_norm, joint=True, context_out=not context_pre_only)
        self.attn2 = Attention(dim, heads, cfg.qk_norm, joint=False, context_out=False) if dual_attention else None
        self.ff = FeedForward(dim)
        self.ff_context = None if context_pre_only else FeedForward(dim)

    def pre_attention(self, x: torch.Tensor, c: torch.Tensor, temb: torch.Tensor):
        """adaLN-modulate both streams and project them. Returns (image q, k, v), (context q, k, v), each
        [B, H, L, D], and `saved` (the image stream's plain LayerNorm output and both streams' modulation
        vectors) for post_attention."""
        x_mod = self.norm1(temb)  # shift, scale, gate, shift_mlp, scale_mlp, gate_mlp[, shift2, scale2, gate2]
        xn = _layer_norm(x)
        x_in = xn * (1 + x_mod[1]) + x_mod[0]
        c_mod = self.norm1_context(temb)
        if self.context_pre_only:
            scale, shift = c_mod
            c_in = _layer_norm(c) * (1 + scale) + shift
        else:
            c_in = _layer_norm(c) * (1 + c_mod[1]) + c_mod[0]
        return self.attn.qkv(x_in), self.attn.context_qkv(c_in), (xn, x_mod, c_mod)

    @staticmethod
    def joint_attention(x_qkv, c_qkv) -> tuple[torch.Tensor, torch.Tensor]:
        """One attention over the concatenated [image, context] tokens, split back into the two streams."""
        n = x_qkv[0].shape[2]
        q, k, v = (torch.cat([a, b], dim=2) for a, b in zip(x_qkv, c_qkv))
        o = attention(q, k, v)
        return o[:, :, :n], o[:, :, n:]

    def post_attention(self, x: torch.Tensor, c: torch.Tensor, x_attn: torch.Tensor, c_attn: torch.Tensor,
                       saved) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Output projections, gated residuals and the MLPs; the context comes back None after the last block."""
        xn, x_mod, c_mod = saved
        _, _, gate, shift_mlp, scale_mlp, gate_mlp = x_mod[:6]
        x = x + gate * self.attn.out(x_attn)
        if self.attn2 is not None:
            shift2, scale2, gate2 = x_mod[6:]
            x = x + gate2 * self.attn2(xn * (1 + scale2) + shift2)
        x = x + gate_mlp * self.ff(_layer_norm(x) * (1 + scale_mlp) + shift_mlp)
        if self.context_pre_only:
            return x, None
        _, _, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = c_mod
        c = c + c_gate * self.attn.context_out(c_attn)
        c = c + c_gate_mlp * self.ff_context(_layer_norm(c) * (1 + c_scale_mlp) + c_shift_mlp)
        return x, c

    def forward(self, x: torch.Tensor, c: torch.Tensor, temb: torch.Tensor):
        x_qkv, c_qkv, saved = self.pre_attention(x, c, temb)
        x_attn, c_attn = self.joint_attention(x_qkv, c_qkv)
        return self.post_attention(x, c, x_attn, c_attn, saved)


# ------------------------------------------------------------------------------------------------------ model

class MMDiT(nn.Module):
    """latents [B, in_channels, H, W], timestep [B] or scalar (sigma * 1000), context [B, L, joint_attention_dim],
    pooled [B, pooled_projection_dim] -> velocity [B, out_channels, H, W], computed in the parameter dtype.

    `gradient_checkpointing = True` recomputes each block in backward (torch.utils.checkpoint, non-reentrant)."""

    def __init__(self, config: MMDiTConfig, gradient_checkpointing: bool = False):
        super().__init__()
        self.config = config
        dim, p = config.inner_dim, config.patch_size
        self.pos_embed = PatchEmbed(config)
        self.time_text_embed = TimeTextEmbed(dim, config.pooled_projection_dim)
        self.context_embedder = nn.Linear(config.joint_attention_dim, config.caption_projection_dim)
        self.transformer_blocks = nn.ModuleList(
            JointBlock(config, context_pre_only=i == config.num_layers - 1,
                       dual_attention=i in config.dual_attention_layers)
            for i in range(config.num_layers))
        self.norm_out = Modulation(dim, 2)  # AdaLayerNormContinuous: (scale, shift)
        self.proj_out = nn.Linear(dim, p * p * config.out_channels)
        self.gradient_checkpointing = gradient_checkpointing

    def _check_inputs(self, x, timestep, context, pooled) -> torch.Tensor:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"latents x must be [B, {cfg.in_channels}, H, W], got {list(x.shape)}")
        B, _, H, W = x.shape
        if H % cfg.patch_size or W % cfg.patch_size:
            raise ValueError(f"latent height and width ({H}x{W}) must be multiples of patch_size {cfg.patch_size}")
        if max(H, W) // cfg.patch_size > cfg.pos_embed_max_size:
            raise ValueError(f"latents {H}x{W} exceed the position table: at most "
                             f"{cfg.pos_embed_max_size * cfg.patch_size} per side (pos_embed_max_size "
                             f"{cfg.pos_embed_max_size} x patch_size {cfg.patch_size})")
        if context.ndim != 3 or context.shape[0] != B or context.shape[2] != cfg.joint_attention_dim:
            raise ValueError(f"context must be [B={B}, L, joint_attention_dim={cfg.joint_attention_dim}], "
                             f"got {list(context.shape)}")
        if pooled.ndim != 2 or pooled.shape[0] != B or pooled.shape[1] != cfg.pooled_projection_dim:
            raise ValueError(f"pooled must be [B={B}, pooled_projection_dim={cfg.pooled_projection_dim}], "
                             f"got {list(pooled.shape)}")
        timestep = torch.as_tensor(timestep, device=x.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(B)
        if timestep.shape != (B,):
            raise ValueError(f"timestep must be a scalar or [B={B}], got shape {list(timestep.shape)}")
        return timestep

    def forward(self, x: torch.Tensor, timestep: torch.Tensor | float, context: torch.Tensor,
                pooled: torch.Tensor) -> torch.Tensor:
        timestep = self._check_inputs(x, timestep, context, pooled)
        dtype = self.pos_embed.proj.weight.dtype  # a Conv2d: never wrapped by LoRA, unlike the linears
        B, _, H, W = x.shape
        p, h, w = self.config.patch_size, H // self.config.patch_size, W // self.config.patch_size

        temb = self.time_text_embed(timestep, pooled.to(dtype))
        img = self.pos_embed(x.to(dtype))
        ctx = self.context_embedder(context.to(dtype))
        for block in self.transformer_blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                img, ctx = checkpoint(block, img, ctx, temb, use_reentrant=False)
            else:
                img, ctx = block(img, ctx, temb)
        scale, shift = self.norm_out(temb)
        out = self.proj_out(_layer_norm(img) * (1 + scale) + shift)
        # [B, h*w, p*p*C] with (p, q, C) minor -> [B, C, h*p, w*p]
        out = out.view(B, h, w, p, p, -1).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(B, -1, h * p, w * p)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", config: MMDiTConfig | str | None = None) -> "MMDiT":
        """Load a diffusers `transformer/` folder (single file or shards + index), the model root holding it, a
        `.safetensors` file, or a Stability AI single file (`model.diffusion_model.*`; its VAE / text-encoder keys
        are skipped). `config` (an MMDiTConfig or a preset name) replaces `config.json`; Stability files have none.
        """
        path = Path(path)
        if path.is_dir() and (path / "transformer").is_dir():
            path = path / "transformer"
        if config is None:
            config_file = (path if path.is_dir() else path.parent) / "config.json"
            if not config_file.is_file():
                raise ValueError(f"{path}: no config.json next to the weights; pass config=MMDiTConfig(...) or a "
                                 f"preset name ({', '.join(sorted(_PRESETS))})")
            config = MMDiTConfig.from_json(config_file)
        elif isinstance(config, str):
            config = MMDiTConfig.preset(config)
        ckpt = open_checkpoint(path)
        source = StabilityCheckpoint(ckpt, config.num_layers) if StabilityCheckpoint.detect(ckpt) else ckpt
        with torch.device("meta"):
            model = cls(config)
        load_module(model, source, table=KEY_TABLE, dtype=dtype, device=device)
        return model


# ---------------------------------------------------------------------------------------------- checkpoints

# diffusers `transformer/` keys -> module keys. The module names are diffusers' own, so every family maps to
# itself; load_module rejects anything outside these families as unexpected, and reports each missing tensor.
KEY_TABLE = [
    (r"(pos_embed\.(?:pos_embed|proj\.weight|proj\.bias))", r"\1"),
    (r"(time_text_embed\.(?:timestep|text)_embedder\.linear_[12]\.(?:weight|bias))", r"\1"),
    (r"(context_embedder\.(?:weight|bias))", r"\1"),
    (r"(transformer_blocks\.\d+\.(?:attn2?|norm1|norm1_context|ff|ff_context)\..+)", r"\1"),
    (r"((?:norm_out\.linear|proj_out)\.(?:weight|bias))", r"\1"),
]

# Stability AI single-file names (after the `model.diffusion_model.` prefix) -> diffusers names, after diffusers'
# `convert_sd3_transformer_checkpoint_to_diffusers`. A `{}` in the target stands for q, k, v: the source is a
# fused [q; k; v] projection split into three along dim 0.
STABILITY_KEY_TABLE = [
    (r"pos_embed", r"pos_embed.pos_embed"),
    (r"x_embedder\.proj\.(weight|bias)", r"pos_embed.proj.\1"),
    (r"t_embedder\.mlp\.0\.(weight|bias)", r"time_text_embed.timestep_embedder.linear_1.\1"),
    (r"t_embedder\.mlp\.2\.(weight|bias)", r"time_text_embed.timestep_embedder.linear_2.\1"),
    (r"y_embedder\.mlp\.0\.(weight|bias)", r"time_text_embed.text_embedder.linear_1.\1"),
    (r"y_embedder\.mlp\.2\.(weight|bias)", r"time_text_embed.text_embedder.linear_2.\1"),
    (r"context_embedder\.(weight|bias)", r"context_embedder.\1"),
    (r"joint_blocks\.(\d+)\.x_block\.attn\.qkv\.(weight|bias)", r"transformer_blocks.\1.attn.to_{}.\2"),
    (r"joint_blocks\.(\d+)\.x_block\.attn\.ln_(q|k)\.weight", r"transformer_blocks.\1.attn.norm_\2.weight"),
    (r"joint_blocks\.(\d+)\.x_block\.attn\.proj\.(weight|bias)", r"transformer_blocks.\1.attn.to_out.0.\2"),
    (r"joint_blocks\.(\d+)\.x_block\.attn2\.qkv\.(weight|bias)", r"transformer_blocks.\1.attn2.to_{}.\2"),
    (r"joint_blocks\.(\d+)\.x_block\.attn2\.ln_(q|k)\.weight", r"transformer_blocks.\1.attn2.norm_\2.weight"),
    (r"joint_blocks\.(\d+)\.x_block\.attn2\.proj\.(weight|bias)", r"transformer_blocks.\1.attn2.to_out.0.\2"),
    (r"joint_blocks\.(\d+)\.x_block\.adaLN_modulation\.1\.(weight|bias)", r"transformer_blocks.\1.norm1.linear.\2"),
    (r"joint_blocks\.(\d+)\.x_block\.mlp\.fc1\.(weight|bias)", r"transformer_blocks.\1.ff.net.0.proj.\2"),
    (r"joint_blocks\.(\d+)\.x_block\.mlp\.fc2\.(weight|bias)", r"transformer_blocks.\1.ff.net.2.\2"),
    (r"joint_blocks\.(\d+)\.context_block\.attn\.qkv\.(weight|bias)", r"transformer_blocks.\1.attn.add_{}_proj.\2"),
    (r"joint_blocks\.(\d+)\.context_block\.attn\.ln_(q|k)\.weight",
     r"transformer_blocks.\1.attn.norm_added_\2.weight"),
    (r"joint_blocks\.(\d+)\.context_block\.attn\.proj\.(weight|bias)", r"transformer_blocks.\1.attn.to_add_out.\2"),
    (r"joint_blocks\.(\d+)\.context_block\.adaLN_modulation\.1\.(weight|bias)",
     r"transformer_blocks.\1.norm1_context.linear.\2"),
    (r"joint_blocks\.(\d+)\.context_block\.mlp\.fc1\.(weight|bias)", r"transformer_blocks.\1.ff_context.net.0.proj.\2"),
    (r"joint_blocks\.(\d+)\.context_block\.mlp\.fc2\.(weight|bias)", r"transformer_blocks.\1.ff_context.net.2.\2"),
    (r"final_layer\.linear\.(weight|bias)", r"proj_out.\1"),
    (r"final_layer\.adaLN_modulation\.1\.(weight|bias)", r"norm_out.linear.\1"),
]


class StabilityCheckpoint(Mapping):
    """Diffusers-named, lazy view of a Stability AI single-file MMDiT checkpoint: fused qkv projections are split
    and the two-vector modulations (final layer, last block's context) have their halves swapped, because the
    original code chunks them as (shift, scale) where diffusers' AdaLayerNormContinuous reads (scale, shift).
    A tensor is read only when asked for. Keys outside `model.diffusion_model.` (VAE, text encoders bundled in
    the same file) are skipped; unknown MMDiT keys pass through unchanged so the strict loader names them."""

    PREFIX = "model.diffusion_model."

    def __init__(self, ckpt: Mapping[str, torch.Tensor], num_layers: int):
        self._ckpt = ckpt
        prefixed = any(k.startswith(self.PREFIX) for k in ckpt)
        swapped = {f"{m}.linear.{p}" for m in ("norm_out", f"transformer_blocks.{num_layers - 1}.norm1_context")
                   for p in ("weight", "bias")}
        rules = [(re.compile(pattern), target) for pattern, target in STABILITY_KEY_TABLE]
        self._sources: dict[str, tuple[str, int | None, bool]] = {}  # name -> (key, q/k/v part, swap halves)
        for key in ckpt:
            if prefixed and not key.startswith(self.PREFIX):
                continue
            inner = key[len(self.PREFIX):] if prefixed else key
            name = next((m.expand(t) for r, t in rules if (m := r.fullmatch(inner))), inner)
            if "{}" in name:
                for part, letter in enumerate("qkv"):
                    self._add(name.format(letter), (key, part, False))
            else:
                self._add(name, (key, None, name in swapped))

    def _add(self, name: str, source: tuple[str, int | None, bool]) -> None:
        if name in self._sources:
            raise CheckpointError(f"checkpoint keys {self._sources[name][0]!r} and {source[0]!r} both map to {name!r}")
        self._sources[name] = source

    @classmethod
    def detect(cls, ckpt: Mapping) -> bool:
        """True when the keys are Stability's (`joint_blocks.*`, with or without `model.diffusion_model.`)."""
        return any(k.startswith(("joint_blocks.", cls.PREFIX + "joint_blocks.")) for k in ckpt)

    def __getitem__(self, name: str) -> torch.Tensor:
        key, part, swap = self._sources[name]
        t = self._ckpt[key]
        if part is not None:
            t = t.chunk(3, dim=0)[part].contiguous()
        if swap:
            shift, scale = t.chunk(2, dim=0)
            t = torch.cat([scale, shift], dim=0)
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)
