"""SD3 / SD3.5 VAE: the 16-channel KL autoencoder (diffusers `AutoencoderKL`) that maps images in [-1, 1] to the
latents the MMDiT denoises and back.

Built bottom-up: ResnetBlock -> mid-block attention -> Encoder / Decoder -> VAE. Module names follow the diffusers
layout (diffusers/models/autoencoders/{autoencoder_kl,vae}.py, resnet.py, unets/unet_2d_blocks.py) except where
`VAE_KEY_TABLE` renames them, so the official `vae/diffusion_pytorch_model.safetensors` loads strictly.

Latent conventions: `encode` / `decode` work on raw latents; the MMDiT sees `to_model_latents(z) = (z - shift) *
scale` (SD3 pipeline: `(latents - shift_factor) * scaling_factor`, and back `latents / scaling_factor + shift_factor`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.layers import attention
from weights import load_module, read_json

__all__ = ["VAEConfig", "VAE", "VAE_KEY_TABLE", "VAE_PRESETS"]


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2  # resnets per encoder block; decoder blocks have one more
    latent_channels: int = 16
    norm_num_groups: int = 32
    scaling_factor: float = 1.5305
    shift_factor: float = 0.0609
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    mid_block_add_attention: bool = True

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def preset(cls, name: str) -> "VAEConfig":
        if name not in VAE_PRESETS:
            raise ValueError(f"unknown VAE preset {name!r}; known: {sorted(VAE_PRESETS)}")
        return VAE_PRESETS[name]

    @classmethod
    def from_json(cls, config: dict) -> "VAEConfig":
        """Read a diffusers `vae/config.json`, rejecting the AutoencoderKL variants this module does not build."""
        n = len(config.get("block_out_channels", cls.block_out_channels))
        expected = {"down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n}
        for key, want in expected.items():
            if key in config and list(config[key]) != want:
                raise ValueError(f"vae config {key}={config[key]!r} is not supported (expected {want})")
        if config.get("act_fn", "silu") != "silu":
            raise ValueError(f"vae config act_fn={config['act_fn']!r} is not supported (expected 'silu')")
        for key in ("latents_mean", "latents_std"):
            if config.get(key) is not None:
                raise ValueError(f"vae config {key} is set; per-channel latent normalisation is not supported")
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in names}
        if "block_out_channels" in kwargs:
            kwargs["block_out_channels"] = tuple(kwargs["block_out_channels"])
        if kwargs.get("shift_factor") is None:
            kwargs["shift_factor"] = 0.0
        return cls(**kwargs)


# stabilityai/stable-diffusion-3-medium-diffusers and stable-diffusion-3.5-{medium,large} share this vae/config.json.
# "tiny": the same 8x downsampling with a few channels, for CPU tests and the tiny UAE.
VAE_PRESETS = {"sd3": VAEConfig(),
               "tiny": VAEConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4)}

# Checkpoint key -> module key. Attention projections were stored as query/key/value/proj_attn by diffusers before
# its attention refactor (`_from_deprecated_attn_block`); both spellings map to the same modules.
VAE_KEY_TABLE = [
    (r"(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.(weight|bias)", r"\1.mid_block.attn.norm.\2"),
    (r"(encoder|decoder)\.mid_block\.attentions\.0\.(?:to_q|query)\.(weight|bias)", r"\1.mid_block.attn.q.\2"),
    (r"(encoder|decoder)\.mid_block\.attentions\.0\.(?:to_k|key)\.(weight|bias)", r"\1.mid_block.attn.k.\2"),
    (r"(encoder|decoder)\.mid_block\.attentions\.0\.(?:to_v|value)\.(weight|bias)", r"\1.mid_block.attn.v.\2"),
    (r"(encoder|decoder)\.mid_block\.attentions\.0\.(?:to_out\.0|proj_attn)\.(weight|bias)",
     r"\1.mid_block.attn.out.\2"),
    (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", r"encoder.down_blocks.\1.downsample.\2"),
    (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", r"decoder.up_blocks.\1.upsample.\2"),
    # The rest keep their diffusers names.
    (r"((?:encoder|decoder)\.(?:down_blocks|up_blocks|mid_block)\.(?:\d+\.)?resnets\.\d+\."
     r"(?:norm1|conv1|norm2|conv2|conv_shortcut)\.(?:weight|bias))", r"\1"),
    (r"((?:encoder|decoder)\.(?:conv_in|conv_norm_out|conv_out)\.(?:weight|bias))", r"\1"),
    (r"((?:post_)?quant_conv\.(?:weight|bias))", r"\1"),
]

_EPS = 1e-6  # every GroupNorm of the SD VAE (diffusers passes resnet_eps=1e-6 and eps=1e-6 throughout)


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3, twice, plus a 1x1 conv shortcut when the width changes (ResnetBlock2D without
    a time embedding)."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=_EPS)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=_EPS)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class SpatialSelfAttention(nn.Module):
    """One head over all H*W positions, head width = channels, residual (diffusers Attention with
    `_from_deprecated_attn_block`, AttnProcessor2_0)."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=_EPS)
        self.q = nn.Linear(ch, ch)
        self.k = nn.Linear(ch, ch)
        self.v = nn.Linear(ch, ch)
        self.out = nn.Linear(ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        q, k, v = (proj(t).unsqueeze(1) for proj in (self.q, self.k, self.v))  # [B, 1, HW, C]
        o = attention(q, k, v).squeeze(1)
        return x + self.out(o).transpose(1, 2).reshape(b, c, h, w)


class MidBlock(nn.Module):
    def __init__(self, ch: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, groups), ResnetBlock(ch, ch, groups)])
        self.attn = SpatialSelfAttention(ch, groups) if add_attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attn is not None:
            x = self.attn(x)
        return self.resnets[1](x)


class DownBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, num_resnets: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups)
                                      for i in range(num_resnets)])
        self.downsample = nn.Conv2d(out_ch, out_ch, 3, stride=2) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsample is not None:
            # Downsample2D with padding=0 pads right/bottom only, then a stride-2 3x3 conv.
            x = self.downsample(F.pad(x, (0, 1, 0, 1)))
        return x


class UpBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, num_resnets: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups)
                                      for i in range(num_resnets)])
        self.upsample = nn.Conv2d(out_ch, out_ch, 3, padding=1) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsample is not None:
            x = self.upsample(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.block_out_channels
        g = cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, downsample=i < len(ch) - 1)
            for i in range(len(ch))])
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)  # mean and logvar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Mirror of the encoder; `up_blocks[0]` works at the lowest resolution and each up block has one resnet more
    than the matching down block."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = tuple(reversed(cfg.block_out_channels))
        g = cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList([
            UpBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, upsample=i < len(ch) - 1)
            for i in range(len(ch))])
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = (nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
                                if cfg.use_post_quant_conv else None)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> "VAE":
        """Load a diffusers VAE folder (`config.json` + safetensors) or a pipeline root that contains `vae/`."""
        path = Path(path)
        if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
            path = path / "vae"
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json (expected a diffusers vae/ folder or its parent)")
        cfg = VAEConfig.from_json(read_json(path / "config.json"))
        with torch.device("meta"):
            model = cls(cfg)
        load_module(model, path, table=VAE_KEY_TABLE, dtype=dtype, device=device)
        return model.eval()

    def _check(self, x: torch.Tensor, channels: int, name: str, multiple: int = 1) -> None:
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"{name} must be [B, {channels}, H, W], got {list(x.shape)}")
        if x.shape[2] % multiple or x.shape[3] % multiple:
            raise ValueError(f"{name} height and width must be multiples of {multiple} (the VAE downsampling "
                             f"factor), got {x.shape[2]}x{x.shape[3]}")

    def encode_dist(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior of raw latents for images in [-1, 1] (cast to the VAE's dtype): (mean, logvar), logvar clamped
        to [-30, 20] as diffusers' DiagonalGaussianDistribution does."""
        self._check(images, self.config.in_channels, "images", self.config.downsample_factor)
        moments = self.encoder(images.to(self.encoder.conv_in.weight.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Raw latents of images in [-1, 1]: the posterior mean, or a posterior sample when a generator is given
        (mean + std * eps, eps drawn on the generator's device like diffusers' randn_tensor)."""
        mean, logvar = self.encode_dist(images)
        if generator is None:
            return mean
        eps = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar) * eps.to(mean.device)

    def decode(self, latents: torch.Tensor, tile: int | None = None, overlap: int = 8) -> torch.Tensor:
        """Images (about [-1, 1], not clamped, in the VAE's dtype) from raw latents.

        tile: decode in overlapping latent tiles of tile x tile (e.g. 64 for 512 px pieces), blended linearly over
        `overlap` latent pixels, so memory no longer grows with the image. GroupNorm statistics and the mid-block
        attention then see one tile instead of the whole image, so the result differs slightly from an untiled
        decode (as with diffusers' tiled_decode); larger tiles and overlaps bring it closer.
        """
        self._check(latents, self.config.latent_channels, "latents")
        if tile is None or (latents.shape[2] <= tile and latents.shape[3] <= tile):
            return self._decode(latents)
        if not 0 <= overlap < tile:
            raise ValueError(f"overlap must be in [0, tile={tile}), got {overlap}")
        return tiled_apply(self._decode, latents, tile, overlap, self.config.downsample_factor)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        z = z.to(self.decoder.conv_in.weight.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def to_model_latents(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def from_model_latents(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.config.scaling_factor + self.config.shift_factor


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile origins covering [0, size) with at least `overlap` shared pixels; the last tile ends at the border."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, tile - overlap))
    return starts + [size - tile]


def _ramp(length: int, ramp: int, at_start: bool, at_end: bool) -> torch.Tensor:
    """Blend weights along one axis of a tile: rising over `ramp` pixels on sides that overlap a neighbour, flat 1
    on sides at the image border."""
    w = torch.ones(length)
    if ramp > 0:
        r = (torch.arange(ramp) + 0.5) / ramp
        if at_start:
            w[:ramp] = r
        if at_end:
            w[-ramp:] = torch.minimum(w[-ramp:], r.flip(0))
    return w


def tiled_apply(fn, z: torch.Tensor, tile: int, overlap: int, scale: int) -> torch.Tensor:
    """Apply `fn` (latent [B,C,h,w] -> image [B,C',h*scale,w*scale]) tile by tile and blend the overlaps with
    normalised linear weights."""
    b, _, h, w = z.shape
    rows, cols = _tile_starts(h, tile, overlap), _tile_starts(w, tile, overlap)
    out = weight = None
    for y in rows:
        for x in cols:
            piece = fn(z[:, :, y:y + tile, x:x + tile])
            th, tw = piece.shape[2], piece.shape[3]
            wy = _ramp(th, overlap * scale, y > 0, y + tile < h)
            wx = _ramp(tw, overlap * scale, x > 0, x + tile < w)
            wt = (wy[:, None] * wx[None, :]).to(piece.device, piece.dtype)
            if out is None:
                out = piece.new_zeros(b, piece.shape[1], h * scale, w * scale)
                weight = piece.new_zeros(h * scale, w * scale)
            out[:, :, y * scale:y * scale + th, x * scale:x * scale + tw] += piece * wt
            weight[y * scale:y * scale + th, x * scale:x * scale + tw] += wt
    return out / weight
