"""Image-image rewards. The reconstruction reward UAE optimises is the cosine similarity of frozen CLIP image features
of the source and the reconstruction (paper: CLIP ViT-L/14 image features; Unified-Bench adds LongCLIP, DINOv2, DINOv3).

A `Backbone` is a frozen feature extractor with its own preprocessing; `ReconstructionReward` scores batches of
(source, reconstruction) pairs with one backbone, from PIL images or, differentiably, from image tensors.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn


@dataclass
class Backbone:
    """A frozen image encoder: `preprocess(pil) -> [3,h,w]`, `features(pixels [B,3,h,w]) -> [B,D]`, and optionally
    a differentiable `preprocess_tensor(images [B,3,H,W] in [-1,1]) -> pixels` for gradient-carrying rewards."""
    name: str
    model: nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    features: Callable[[torch.Tensor], torch.Tensor]
    preprocess_tensor: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self):
        self.model.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def embed_pil(self, images: list[Image.Image], batch_size: int = 16) -> torch.Tensor:
        """L2-normalised fp32 features of PIL images, [N, D]."""
        out = []
        for i in range(0, len(images), batch_size):
            pixels = torch.stack([self.preprocess(im) for im in images[i:i + batch_size]])
            with torch.no_grad():
                out.append(self.features(pixels.to(self.device, self.dtype)).float())
        return F.normalize(torch.cat(out), dim=-1)

    def embed_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised fp32 features of image tensors in [-1, 1] [B,3,H,W]; differentiable w.r.t. `images`."""
        if self.preprocess_tensor is None:
            raise ValueError(f"backbone {self.name} has no differentiable preprocessing")
        pixels = self.preprocess_tensor(images.to(self.device))
        return F.normalize(self.features(pixels.to(self.dtype)).float(), dim=-1)


def clip_backbone(model, name: str = "clip") -> Backbone:
    """A CLIP / LongCLIP image tower with its preprocessing at the size its position table was trained for
    (`cfg.vision.image_size`: 224 for ViT-L/14, 336 for ViT-L/14-336)."""
    from model.clip import clip_preprocess, clip_preprocess_tensor

    size = model.cfg.vision.image_size
    return Backbone(name, model, lambda image: clip_preprocess(image, size), model.image_features,
                    lambda x: clip_preprocess_tensor(x, input_range=(-1, 1), size=size))


def dinov2_backbone(model) -> Backbone:
    from model.dino import dinov2_preprocess

    return Backbone("dinov2", model, dinov2_preprocess, model.features)


def dinov3_backbone(model) -> Backbone:
    from model.dino import dinov3_preprocess

    return Backbone("dinov3", model, dinov3_preprocess, model.features)


class ReconstructionReward:
    """r = cos(f(x), f(x~)) per pair with a frozen backbone f. No gradient by default; `differentiable=True` (tensor
    inputs only) keeps the graph to the reconstruction for the cold-start loss 1 - r."""

    def __init__(self, backbone: Backbone, batch_size: int = 16):
        self.backbone = backbone
        self.batch_size = batch_size  # PIL images per backbone forward

    def source_features(self, sources: list[Image.Image] | torch.Tensor) -> torch.Tensor:
        if isinstance(sources, torch.Tensor):
            with torch.no_grad():
                return self.backbone.embed_tensor(sources)
        return self.backbone.embed_pil(list(sources), self.batch_size)

    def __call__(self, sources: list[Image.Image] | torch.Tensor | None,
                 reconstructions: list[Image.Image] | torch.Tensor,
                 source_features: torch.Tensor | None = None, differentiable: bool = False) -> torch.Tensor:
        """Per-pair scores [N] (fp32). Pass `source_features` (from `source_features`) to reuse them across a group."""
        ref = source_features if source_features is not None else self.source_features(sources)
        if isinstance(reconstructions, torch.Tensor):
            if differentiable:
                rec = self.backbone.embed_tensor(reconstructions)
            else:
                with torch.no_grad():
                    rec = self.backbone.embed_tensor(reconstructions)
        else:
            if differentiable:
                raise ValueError("differentiable rewards need reconstructions as tensors, not PIL images")
            rec = self.backbone.embed_pil(list(reconstructions), self.batch_size)
        if ref.shape[0] != rec.shape[0]:
            raise ValueError(f"{ref.shape[0]} sources but {rec.shape[0]} reconstructions")
        return (ref.to(rec.device) * rec).sum(-1)
