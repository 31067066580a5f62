"""UAE at the size of the toy world (train/world.py: 64 px scenes of 1-3 flat shapes on a 3x3 grid): model configs,
the world's tokenizer, a VAE and a CLIP trained on its renders, and `prepare_base`, which writes the world's base model
in the official layouts, so every loader and training script takes it as plain parts, as it takes official weights:

    folder/lvlm/                  Qwen2.5-VL, Hugging Face layout (config.json, model.safetensors, tokenizer.json,
                                  tokenizer_config.json, preprocessor_config.json); random init
    folder/sd3/                   diffusers layout: transformer/ (random MMDiT), vae/ (trained here),
                                  scheduler/scheduler_config.json, model_index.json
    folder/connector.safetensors  random connector, as `--connector` loads it
    folder/pooled.safetensors     the constant `pooled_projections` vector
    folder/clip/                  CLIP trained contrastively on the world, Hugging Face CLIPModel layout, with its
                                  tokenizer; the reward backbone (`--clip`)

    uae = UAE.from_pretrained(lvlm=folder / "lvlm", sd3=folder / "sd3", connector=folder / "connector.safetensors",
                              pooled=folder / "pooled.safetensors", dtype=torch.float32, settings=SETTINGS)

The sizes are small enough that the RL loops run on two CPU cores in minutes and large enough to learn the world;
`parameter_counts` lists them. The VAE and CLIP are trained here because they stay frozen in UAE: the decoder's
latent space and the reward must exist before the captioner and decoder learn anything.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import AddedToken, Tokenizer, pre_tokenizers
from tokenizers.trainers import BpeTrainer
from torch import nn

from model.clip import (CLIP, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, CLIPConfig, CLIPTextConfig, CLIPTokenizer,
                        CLIPVisionConfig, clip_preprocess_tensor)
from model.connector import POOLED_KEY, Connector, ConnectorConfig
from model.mmdit import MMDiT, MMDiTConfig
from model.qwen2_5_vl import Qwen25VL, Qwen25VLConfig, TextConfig, VisionConfig
from model.qwen2_5_vl_processor import (DEFAULT_SYSTEM_MESSAGE, QWEN_SPECIAL_TOKENS, Qwen25VLImageConfig,
                                        Qwen25VLProcessor, qwen_tokenizer)
from model.uae import CAPTION_PROMPT, NEGATIVE_PROMPT, UNIFIED_BENCH_PROMPT, UAESettings
from model.vae import VAE, VAEConfig
from train import world
from train.common import set_scheduled_lr
from weights import rename_keys, save_safetensors

__all__ = ["IMAGE_SIZE", "IMAGE_CONFIG", "LVLM_HIDDEN", "DIT_CONFIG", "CONNECTOR_CONFIG", "VAE_CONFIG",
           "SCHEDULER_SHIFT", "SETTINGS", "CLIP_MAX_TOKENS", "lvlm_config", "clip_config", "world_words",
           "world_bpe", "build_tokenizer", "clip_tokenizer", "train_vae", "vae_quality", "train_clip", "clip_quality",
           "save_lvlm", "save_dit", "save_vae", "save_clip", "prepare_base", "parameter_counts"]

IMAGE_SIZE = 64
# The captioner sees every image at 112 x 112 (min = max pixels): smart_resize alone would round 64 px to 56, 2 x 2
# merged tokens of 32 source px, each wider than a grid cell (21 px); at 112 px the 8 x 8 patches of 14 merge into
# 4 x 4 tokens of 16 source px, each inside at most 2 x 2 cells, for 16 visual tokens per prompt.
PROCESSOR_SIDE = 112
IMAGE_CONFIG = Qwen25VLImageConfig(min_pixels=PROCESSOR_SIDE ** 2, max_pixels=PROCESSOR_SIDE ** 2)

LVLM_HIDDEN = 96


def lvlm_config(vocab_size: int, special_ids: Mapping[str, int]) -> Qwen25VLConfig:
    """The world's Qwen2.5-VL: Qwen2.5-VL-3B's structure (GQA, tied embeddings, windowed vision blocks before a
    full-attention one, 2x2 merger) shrunk. Heads are 32 wide with the 3B's M-RoPE split (1 : 1.5 : 1.5 of the rotary
    pairs to t, h, w); RoPE base 1e4 as prompts stay under ~200 tokens. `special_ids`: the processor's
    `special_token_ids()`."""
    return Qwen25VLConfig(
        text=TextConfig(vocab_size=vocab_size, hidden_size=LVLM_HIDDEN, intermediate_size=256, num_hidden_layers=4,
                        num_attention_heads=3, num_key_value_heads=1, rope_theta=1e4, mrope_section=(4, 6, 6),
                        max_position_embeddings=4096, tie_word_embeddings=True),
        # A 56 px window holds 2 x 2 merged tokens: block 0 attends within quarters of the image, block 1 across it.
        vision=VisionConfig(depth=2, hidden_size=64, num_heads=2, intermediate_size=128, out_hidden_size=LVLM_HIDDEN,
                            window_size=56, fullatt_block_indexes=(1,)),
        **special_ids)


# 4x downsampling (three blocks): 64 px -> 16 x 16 x 4 latents, the compression of SD3's 8x / 16 channels (12 values
# per latent value), and 8 x 8 DiT tokens of 8 px, finer than the grid's cells. The scaling and shift factors are
# placeholders until `train_vae` measures them on its latents, as SD3's were. Widths: (16, 32, 64) costs twice as much
# per step and learns no faster per step; these reach ~30 dB held-out PSNR in 800 steps of 8 (~60 s on 2 cores).
VAE_CONFIG = VAEConfig(block_out_channels=(16, 16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                       scaling_factor=1.0, shift_factor=0.0)
# SD3.5-large's MMDiT (qk RMSNorm, no MMDiT-X blocks) at 4 heads of 32, 4 blocks (~0.2 s per training step of 16 on
# 2 cores); context and pooled widths are the connector's. The position table covers 16 x 16 patches: up to 128 px.
DIT_CONFIG = MMDiTConfig(sample_size=IMAGE_SIZE // 4, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=32,
                         num_attention_heads=4, joint_attention_dim=128, caption_projection_dim=128,
                         pooled_projection_dim=64, out_channels=4, pos_embed_max_size=16, qk_norm="rms_norm")
# The loader builds the connector with hidden = 2 x out (UAE's projector: 2048 -> 8192 -> 4096).
CONNECTOR_CONFIG = ConnectorConfig(in_dim=LVLM_HIDDEN, hidden_dim=2 * DIT_CONFIG.joint_attention_dim,
                                   out_dim=DIT_CONFIG.joint_attention_dim,
                                   pooled_dim=DIT_CONFIG.pooled_projection_dim)
# SD3's shift of 3 (sigma' = 3 sigma / (1 + 2 sigma)), which spends training and sampling steps near sigma 1: there a
# flat background's colour, the mean of ~1000 latent values, still shows through noise up to sigma ~0.95, so a
# decoder trained unshifted reads it from the noisy latent instead of the caption, and from pure noise draws any
# background (measured on the world, 2026-12-01: with shift 1, swapping "gray" and "black" in the captions changed the
# decoder SFT loss by < 0.1% at every sigma; with shift 3 it tripled it at sigma 0.7, and the full captions'
# reconstruction score rose from 0.12 to 0.21 at the same 600 steps).
SCHEDULER_SHIFT = 3.0
# Released sampling defaults except what the world's size changes: 64 px images, a 112 px captioner input, and
# caption room for the longest full description (31 tokens) with margin.
SETTINGS = UAESettings(caption_max_new_tokens=48, caption_max_pixels=PROCESSOR_SIDE ** 2, height=IMAGE_SIZE,
                       width=IMAGE_SIZE, shift=SCHEDULER_SHIFT)

# Longest full-detail caption: 31 world tokens; + start and end tokens, rounded up.
CLIP_MAX_TOKENS = 40


def clip_config(vocab_size: int, eos_token_id: int) -> CLIPConfig:
    """The reward CLIP: a ViT of 8 px patches at 64 px (8 x 8 patches, each inside one grid cell) and a text tower as
    long as the world's captions. The text tower pools at `eos_token_id` (any id but 2, see CLIPTextConfig)."""
    return CLIPConfig(
        vision=CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_layers=3, num_heads=4, patch_size=8,
                                image_size=IMAGE_SIZE),
        text=CLIPTextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4,
                            max_positions=CLIP_MAX_TOKENS, eos_token_id=eos_token_id),
        projection_dim=64)


# ----------------------------------------------------------------------------------------------------- tokenizer

def world_words() -> list[str]:
    """Every word of the world's captions (train.world.corpus), sorted."""
    return sorted({w for sentence in world.corpus() for w in re.findall(r"[A-Za-z]+", sentence)})


def world_bpe() -> Tokenizer:
    """A byte-level BPE with Qwen2's pipeline (`qwen_tokenizer`) trained on the world's captions, the caption and
    negative prompts and Qwen's system message, merged until every word of that text is one token: the vocabulary
    bound is never reached and one occurrence allows a merge. A line of all world words with a leading space covers
    the count words, which the captions only use first. Training is deterministic, so every call gives the same
    tokens and ids. No special tokens."""
    text = [DEFAULT_SYSTEM_MESSAGE, CAPTION_PROMPT, UNIFIED_BENCH_PROMPT, NEGATIVE_PROMPT,
            " " + " ".join(world_words()), *world.corpus()]
    tokenizer = qwen_tokenizer()
    trainer = BpeTrainer(vocab_size=1 << 20, min_frequency=1, show_progress=False,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(text, trainer=trainer)
    return tokenizer


def build_tokenizer(folder: str | os.PathLike) -> int:
    """Write the world's Qwen2.5-VL tokenizer and processor settings into `folder` as the official release spells
    them: tokenizer.json (`world_bpe` + the Qwen special tokens in the official order), tokenizer_config.json and
    preprocessor_config.json (`IMAGE_CONFIG`). Returns the vocabulary size, special tokens included."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = world_bpe()
    base = tokenizer.get_vocab_size()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    tokenizer.save(str(folder / "tokenizer.json"))
    added = {str(base + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False, "special": True} for i, t in enumerate(QWEN_SPECIAL_TOKENS)}
    _write_json(folder / "tokenizer_config.json", {
        "add_prefix_space": False, "added_tokens_decoder": added,
        "additional_special_tokens": [t for t in QWEN_SPECIAL_TOKENS if t != "<|endoftext|>"],
        "bos_token": None, "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "model_max_length": 4096, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None})
    cfg = IMAGE_CONFIG
    _write_json(folder / "preprocessor_config.json", {
        "min_pixels": cfg.min_pixels, "max_pixels": cfg.max_pixels, "patch_size": cfg.patch_size,
        "temporal_patch_size": cfg.temporal_patch_size, "merge_size": cfg.merge_size,
        "image_mean": list(cfg.image_mean), "image_std": list(cfg.image_std), "do_resize": True, "resample": 3,
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"})
    return tokenizer.get_vocab_size(with_added_tokens=True)


def clip_tokenizer() -> CLIPTokenizer:
    """The reward CLIP's tokenizer: `world_bpe` plus CLIP's start and end tokens (the end token pads), framing at
    most CLIP_MAX_TOKENS tokens."""
    tokenizer = world_bpe()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t in ("<|startoftext|>", "<|endoftext|>")])
    return CLIPTokenizer(tokenizer, max_length=CLIP_MAX_TOKENS)


# ----------------------------------------------------------------------------------------------------- training

def _images_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL RGB images of one size -> float32 [N, 3, H, W] in [-1, 1]."""
    if not images:
        raise ValueError("no images given")
    sizes = {im.size for im in images}
    if len(sizes) != 1:
        raise ValueError(f"images must share one size, got {sorted(sizes)}")
    x = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)
    return x.float() / 127.5 - 1


def _seeded_build(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """`build()` with the global RNG seeded (default initialisers draw from it), restored afterwards."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build()


# The posterior's initial log-variance. At diffusers' 0 (std 1) the sampled noise drowns the untrained encoder's means
# and the first hundreds of steps go to growing them past it; a narrow start lets reconstruction learn at once.
LOGVAR_INIT = -6.0


def train_vae(images: list[Image.Image], steps: int, seed: int, log: Callable[[str], None] = print, *,
              batch_size: int = 8, lr: float = 3e-3, kl_weight: float = 1e-5,
              config: VAEConfig = VAE_CONFIG) -> VAE:
    """A VAE of `config` trained from scratch as an autoencoder on `images`: MSE between the images and the decoding
    of a posterior sample, plus `kl_weight` x the mean KL to N(0, 1), which keeps the latents bounded and teaches the
    decoder to tolerate small latent errors (the DiT's). AdamW, warmup then cosine decay, seeded batches and noise.
    Afterwards shift_factor / scaling_factor are set to the mean and 1 / std of the posterior means of `images` (what
    the DiT is trained on), so the DiT sees unit-variance latents, as SD3's factors do for its VAE."""
    # channels_last: the small-channel convolutions run faster on CPU in that layout (~1.2x measured on 2 cores).
    x = _images_tensor(images).contiguous(memory_format=torch.channels_last)
    vae = _seeded_build(seed, lambda: VAE(config)).to(memory_format=torch.channels_last).train()
    with torch.no_grad():
        vae.encoder.conv_out.bias[config.latent_channels:].fill_(LOGVAR_INIT)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    warmup = max(1, steps // 20)
    start = time.perf_counter()
    for step in range(steps):
        set_scheduled_lr(opt, lr, step + 1, steps, warmup, "cosine")
        batch = x[torch.randint(len(x), (batch_size,), generator=g)]
        mean, logvar = vae.encode_dist(batch)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g)
        mse = F.mse_loss(vae.decode(z), batch)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        loss = mse + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step + 1}/{steps}: mse {mse.item():.5f} kl {kl.item():.3f} "
                f"({time.perf_counter() - start:.0f} s)")
    vae.to(memory_format=torch.contiguous_format).eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(x[i:i + 64]) for i in range(0, len(x), 64)])
    vae.config = dataclasses.replace(config, shift_factor=latents.mean().item(),
                                     scaling_factor=1.0 / latents.std().item())
    return vae


@torch.no_grad()
def vae_quality(vae: VAE, images: list[Image.Image], clip: CLIP | None = None) -> dict[str, float]:
    """Reconstruction through the posterior mean (as the pipeline encodes), clamped to [-1, 1]: MSE, PSNR in dB
    (peak-to-peak 2, the same number as 8-bit PSNR), and `mean_colour_mse`, the MSE of predicting every pixel with
    its image's mean colour (what a VAE that kept no shape would reach). With `clip`, also `clip_cos`: the mean
    reward (CLIP image cosine) of the reconstructions, the most a decoder drawing through this VAE can earn."""
    x = _images_tensor(images)
    recon = torch.cat([vae.decode(vae.encode(x[i:i + 64])).clamp(-1, 1) for i in range(0, len(x), 64)])
    mse = F.mse_loss(recon, x).item()
    baseline = F.mse_loss(x.mean((2, 3), keepdim=True).expand_as(x), x).item()
    out = {"mse": mse, "psnr": 10 * math.log10(4 / mse), "mean_colour_mse": baseline}
    if clip is not None:
        out["clip_cos"] = (_image_embeddings(clip, x) * _image_embeddings(clip, recon)).sum(-1).mean().item()
    return out


def _clip_pixels(x: torch.Tensor, size: int) -> torch.Tensor:
    """The reward's differentiable preprocessing (eval.reward.clip_backbone) of images in [-1, 1]."""
    return clip_preprocess_tensor(x, input_range=(-1.0, 1.0), size=size)


def train_clip(images: list[Image.Image], captions: list[str], steps: int, seed: int,
               log: Callable[[str], None] = print, *, batch_size: int = 64, lr: float = 1e-3,
               noise: float = 0.1) -> CLIP:
    """A CLIP (`clip_config`, `clip_tokenizer`) trained from scratch on (image, caption) pairs with CLIP's objective:
    symmetric InfoNCE over a batch at a learnable temperature (`logit_scale`, init log(1/0.07), capped at log 100, a
    parameter of the returned model as in transformers' CLIPModel). Batches are drawn without replacement from the
    pool, so pass distinct scenes with their full descriptions (a batch then holds no false negatives). Images get
    Gaussian noise of a random std up to `noise` (image values in [-1, 1]) so that image features hold the scene,
    not the exact pixels: the reward compares renders with imperfect reconstructions. AdamW, warmup then cosine
    decay. Random scenes in a batch are told apart by their backgrounds and colours, so the CLIP learns little of
    shapes and nothing of positions (clip_quality's cos_change measures what it pays for each attribute)."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if len(images) < batch_size:
        raise ValueError(f"the pool holds {len(images)} pairs, fewer than batch_size {batch_size}")
    tokenizer = clip_tokenizer()
    ids, mask = tokenizer(captions)
    lengths = [len(e.ids) + 2 for e in tokenizer.tokenizer.encode_batch(captions, add_special_tokens=False)]
    too_long = [c for c, n in zip(captions, lengths) if n > CLIP_MAX_TOKENS]
    if too_long:
        raise ValueError(f"{len(too_long)} captions exceed CLIP_MAX_TOKENS ({CLIP_MAX_TOKENS} tokens with start and "
                         f"end), e.g. {too_long[0]!r}")
    x = _images_tensor(images)
    cfg = clip_config(tokenizer.tokenizer.get_vocab_size(with_added_tokens=True), tokenizer.eos_id)
    if x.shape[-1] != cfg.vision.image_size or x.shape[-2] != cfg.vision.image_size:
        raise ValueError(f"images are {x.shape[-1]}x{x.shape[-2]}, the CLIP takes {cfg.vision.image_size} px")
    clip = _seeded_build(seed, lambda: CLIP(cfg)).train()
    clip.register_parameter("logit_scale", nn.Parameter(torch.tensor(math.log(1 / 0.07))))
    decay = [p for p in clip.parameters() if p.ndim >= 2]
    rest = [p for p in clip.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=lr)
    g = torch.Generator().manual_seed(seed)
    warmup = max(1, steps // 10)
    order, at = torch.randperm(len(x), generator=g), 0
    labels = torch.arange(batch_size)
    start = time.perf_counter()
    for step in range(steps):
        set_scheduled_lr(opt, lr, step + 1, steps, warmup, "cosine")
        if at + batch_size > len(order):
            order, at = torch.randperm(len(x), generator=g), 0
        index, at = order[at:at + batch_size], at + batch_size
        batch = x[index]
        std = noise * torch.rand(batch_size, 1, 1, 1, generator=g)
        batch = batch + std * torch.randn(batch.shape, generator=g)
        image = F.normalize(clip.image_features(_clip_pixels(batch, cfg.vision.image_size)), dim=-1)
        text = F.normalize(clip.text_features(ids[index], mask[index]), dim=-1)
        logits = clip.logit_scale.exp() * image @ text.T
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))
        if step % 100 == 0 or step == steps - 1:
            accuracy = (logits.argmax(1) == labels).float().mean().item()
            log(f"clip step {step + 1}/{steps}: loss {loss.item():.3f} batch top-1 {accuracy:.2f} "
                f"temperature {1 / clip.logit_scale.exp().item():.3f} ({time.perf_counter() - start:.0f} s)")
    return clip.eval()


@torch.no_grad()
def _image_embeddings(clip: CLIP, x: torch.Tensor) -> torch.Tensor:
    size = clip.cfg.vision.image_size
    return torch.cat([F.normalize(clip.image_features(_clip_pixels(x[i:i + 128], size)), dim=-1)
                      for i in range(0, len(x), 128)])


# The attributes `_one_change` changes; cos_one_change draws from the first three (as before position was measured,
# so its numbers compare across worlds), cos_change reports each.
_CHANGES = ("colour", "shape", "size", "position")


@torch.no_grad()
def clip_quality(clip: CLIP, scenes: list[world.Scene], seed: int = 0, noise: float = 0.05) -> dict:
    """How well the CLIP tells `scenes` (distinct world scenes) apart, by the numbers the reward depends on:
    top1: image -> text retrieval among the scenes' full descriptions; cos_same: image features of a render and of
    the render with Gaussian noise of std `noise` (about 6 of 255 levels at 0.05; renders are deterministic, so this
    stands for "the same scene drawn again"); cos_one_change: a render and the render of the scene with one
    attribute (colour, shape or size) of one object changed; cos_change: the same per attribute, position among them
    (one object moved to a free cell): what the reward pays for each attribute a caption can state; cos_different:
    renders of two different scenes of the list."""
    g = torch.Generator().manual_seed(seed)
    size = clip.cfg.vision.image_size
    x = _images_tensor([world.render(s, size) for s in scenes])
    image = _image_embeddings(clip, x)
    ids, mask = clip_tokenizer()([world.describe(s, 4) for s in scenes])
    text = torch.cat([F.normalize(clip.text_features(ids[i:i + 128], mask[i:i + 128]), dim=-1)
                      for i in range(0, len(ids), 128)])
    top1 = ((image @ text.T).argmax(1) == torch.arange(len(scenes))).float().mean().item()
    noisy = _image_embeddings(clip, (x + noise * torch.randn(x.shape, generator=g)).clamp(-1, 1))

    def cos_after(change: Callable[[world.Scene], world.Scene]) -> float:
        changed = _image_embeddings(clip, _images_tensor([world.render(change(s), size) for s in scenes]))
        return (image * changed).sum(-1).mean().item()

    one_change = cos_after(lambda s: _one_change(s, g, _CHANGES[:3]))
    per_attribute = {a: cos_after(lambda s, a=a: _one_change(s, g, (a,))) for a in _CHANGES}
    pairs = image @ image.T
    off_diagonal = ~torch.eye(len(scenes), dtype=torch.bool)
    return {"top1": top1, "cos_same": (image * noisy).sum(-1).mean().item(), "cos_one_change": one_change,
            "cos_change": per_attribute, "cos_different": pairs[off_diagonal].mean().item()}


def _one_change(scene: world.Scene, g: torch.Generator, attributes: Sequence[str]) -> world.Scene:
    """`scene` with one of `attributes` (from _CHANGES) of one of its objects replaced by another value; a changed
    position is a cell no object holds."""
    objects = list(scene.objects)
    k = int(torch.randint(len(objects), (), generator=g))
    attribute = attributes[int(torch.randint(len(attributes), (), generator=g))]
    values = {"colour": tuple(world.COLOURS), "shape": world.SHAPES, "size": world.SIZES,
              "position": tuple(p for p in world.POSITIONS if p not in {o.position for o in objects})}[attribute]
    others = [v for v in values if v != getattr(objects[k], attribute)]
    objects[k] = dataclasses.replace(objects[k], **{attribute: others[int(torch.randint(len(others), (),
                                                                                          generator=g))]})
    return world.Scene(scene.background, tuple(objects))


# ----------------------------------------------------------------------------------------------------- saving

# Module key -> official checkpoint key: the inverses of the loaders' tables (model/*.py KEY_TABLE), so every file
# written here loads strictly through them; keys no rule matches keep their names.
_QWEN_SAVE_TABLE = [
    (r"visual\.patch_embed\.weight", r"visual.patch_embed.proj.weight"),
    (r"(visual\..+)", r"\1"),
    (r"language_model\.(.+)", r"model.\1"),
    (r"lm_head\.weight", None),  # tied to the embedding: transformers saves it once, as model.embed_tokens.weight
]
_VAE_SAVE_TABLE = [
    (r"(encoder|decoder)\.mid_block\.attn\.norm\.(weight|bias)", r"\1.mid_block.attentions.0.group_norm.\2"),
    (r"(encoder|decoder)\.mid_block\.attn\.([qkv])\.(weight|bias)", r"\1.mid_block.attentions.0.to_\2.\3"),
    (r"(encoder|decoder)\.mid_block\.attn\.out\.(weight|bias)", r"\1.mid_block.attentions.0.to_out.0.\2"),
    (r"encoder\.down_blocks\.(\d+)\.downsample\.(weight|bias)", r"encoder.down_blocks.\1.downsamplers.0.conv.\2"),
    (r"decoder\.up_blocks\.(\d+)\.upsample\.(weight|bias)", r"decoder.up_blocks.\1.upsamplers.0.conv.\2"),
]
_CLIP_SAVE_TABLE = [
    (r"vision\.class_embedding", r"vision_model.embeddings.class_embedding"),
    (r"vision\.patch_embedding\.weight", r"vision_model.embeddings.patch_embedding.weight"),
    (r"vision\.position_embedding", r"vision_model.embeddings.position_embedding.weight"),
    (r"vision\.ln_pre\.(weight|bias)", r"vision_model.pre_layrnorm.\1"),
    (r"vision\.ln_post\.(weight|bias)", r"vision_model.post_layernorm.\1"),
    (r"text\.token_embedding\.weight", r"text_model.embeddings.token_embedding.weight"),
    (r"text\.position_embedding", r"text_model.embeddings.position_embedding.weight"),
    (r"text\.ln_final\.(weight|bias)", r"text_model.final_layer_norm.\1"),
    (r"(vision|text)\.blocks\.(\d+)\.ln_([12])\.(weight|bias)", r"\1_model.encoder.layers.\2.layer_norm\3.\4"),
    (r"(vision|text)\.blocks\.(\d+)\.attn\.(\w+)\.(weight|bias)", r"\1_model.encoder.layers.\2.self_attn.\3.\4"),
    (r"(vision|text)\.blocks\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"\1_model.encoder.layers.\2.mlp.\3.\4"),
]


def _write_json(file: Path, data: dict) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(data, indent=2) + "\n")


def _save_weights(module: nn.Module, file: Path, table: list[tuple[str, str | None]]) -> None:
    state = module.state_dict()
    renamed = rename_keys(list(state), table)
    save_safetensors({key: state[module_key] for key, module_key in renamed.items()}, file,
                     metadata={"format": "pt"})


def save_lvlm(model: Qwen25VL, folder: str | os.PathLike, processor: Qwen25VLProcessor) -> None:
    """config.json (the official flat Qwen2.5-VL layout; bos / eos are `processor`'s <|endoftext|> / <|im_end|>, as
    in the release) and model.safetensors (hub key names) into `folder`."""
    folder = Path(folder)
    cfg, text, vision = model.config, model.config.text, model.config.vision
    _write_json(folder / "config.json", {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "bos_token_id": processor.tokenizer.token_to_id("<|endoftext|>"), "eos_token_id": processor.im_end_id,
        "vocab_size": text.vocab_size, "hidden_size": text.hidden_size, "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers, "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads, "rms_norm_eps": text.rms_norm_eps,
        "rope_theta": text.rope_theta, "max_position_embeddings": text.max_position_embeddings,
        "rope_scaling": {"type": "mrope", "mrope_section": list(text.mrope_section)}, "hidden_act": "silu",
        "use_sliding_window": False, "tie_word_embeddings": text.tie_word_embeddings, "torch_dtype": "float32",
        "image_token_id": cfg.image_token_id, "video_token_id": cfg.video_token_id,
        "vision_start_token_id": cfg.vision_start_token_id, "vision_end_token_id": cfg.vision_end_token_id,
        "vision_config": {
            "depth": vision.depth, "hidden_size": vision.hidden_size, "num_heads": vision.num_heads,
            "intermediate_size": vision.intermediate_size, "out_hidden_size": vision.out_hidden_size,
            "in_chans": vision.in_channels, "patch_size": vision.patch_size,
            "temporal_patch_size": vision.temporal_patch_size, "spatial_merge_size": vision.spatial_merge_size,
            "window_size": vision.window_size, "fullatt_block_indexes": list(vision.fullatt_block_indexes),
            "hidden_act": "silu"}})
    _save_weights(model, folder / "model.safetensors", _QWEN_SAVE_TABLE)


def save_dit(model: MMDiT, folder: str | os.PathLike) -> None:
    """A diffusers `transformer/` folder: config.json and diffusion_pytorch_model.safetensors (our module names are
    diffusers')."""
    folder = Path(folder)
    cfg = dataclasses.asdict(model.config)
    cfg["dual_attention_layers"] = list(cfg["dual_attention_layers"])
    _write_json(folder / "config.json", {"_class_name": "SD3Transformer2DModel", **cfg})
    _save_weights(model, folder / "diffusion_pytorch_model.safetensors", [])


def save_vae(model: VAE, folder: str | os.PathLike) -> None:
    """A diffusers AutoencoderKL `vae/` folder: config.json and diffusion_pytorch_model.safetensors."""
    folder = Path(folder)
    cfg = model.config
    n = len(cfg.block_out_channels)
    _write_json(folder / "config.json", {
        "_class_name": "AutoencoderKL", "act_fn": "silu", "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels, "block_out_channels": list(cfg.block_out_channels),
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "layers_per_block": cfg.layers_per_block, "latent_channels": cfg.latent_channels,
        "norm_num_groups": cfg.norm_num_groups, "sample_size": IMAGE_SIZE, "scaling_factor": cfg.scaling_factor,
        "shift_factor": cfg.shift_factor, "latents_mean": None, "latents_std": None, "force_upcast": True,
        "use_quant_conv": cfg.use_quant_conv, "use_post_quant_conv": cfg.use_post_quant_conv,
        "mid_block_add_attention": cfg.mid_block_add_attention})
    _save_weights(model, folder / "diffusion_pytorch_model.safetensors", _VAE_SAVE_TABLE)


def save_clip(model: CLIP, folder: str | os.PathLike) -> None:
    """A Hugging Face CLIPModel folder: config.json, model.safetensors (with `logit_scale` when the model has one),
    the `clip_tokenizer` files and a CLIPImageProcessor config at the vision tower's size."""
    folder = Path(folder)
    cfg, tokenizer = model.cfg, clip_tokenizer()
    special = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    _write_json(folder / "config.json", {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": cfg.projection_dim,
        "logit_scale_init_value": math.log(1 / 0.07), "torch_dtype": "float32",
        "text_config": {"vocab_size": cfg.text.vocab_size, "hidden_size": cfg.text.hidden_size,
                        "intermediate_size": cfg.text.intermediate_size, "num_hidden_layers": cfg.text.num_layers,
                        "num_attention_heads": cfg.text.num_heads, "max_position_embeddings": cfg.text.max_positions,
                        "layer_norm_eps": cfg.text.layer_norm_eps, "hidden_act": cfg.text.hidden_act,
                        "projection_dim": cfg.projection_dim, **special},
        "vision_config": {"hidden_size": cfg.vision.hidden_size, "intermediate_size": cfg.vision.intermediate_size,
                          "num_hidden_layers": cfg.vision.num_layers, "num_attention_heads": cfg.vision.num_heads,
                          "image_size": cfg.vision.image_size, "patch_size": cfg.vision.patch_size,
                          "layer_norm_eps": cfg.vision.layer_norm_eps, "hidden_act": cfg.vision.hidden_act,
                          "num_channels": 3, "projection_dim": cfg.projection_dim}})
    _save_weights(model, folder / "model.safetensors", _CLIP_SAVE_TABLE)
    tokenizer.tokenizer.save(str(folder / "tokenizer.json"))
    _write_json(folder / "tokenizer_config.json", {
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "model_max_length": CLIP_MAX_TOKENS, "tokenizer_class": "CLIPTokenizer"})
    size = cfg.vision.image_size
    _write_json(folder / "preprocessor_config.json", {
        "crop_size": {"height": size, "width": size}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD), "resample": 3, "rescale_factor": 1 / 255, "size": {"shortest_edge": size},
        "image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor"})


# ----------------------------------------------------------------------------------------------------- base

def _init_normal(module: nn.Module, std: float | None = 0.02) -> nn.Module:
    """The random parts' initialisation, the one transformers gives a model built from scratch (initializer_range
    0.02): normal weights for every matrix, convolution and embedding, zero biases, norms left at one. std None draws
    each weight from normal(0, 1 / fan_in) instead, so that each layer keeps the scale of its input."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, p[0].numel() ** -0.5 if std is None else std)
            elif name.endswith("bias"):
                p.zero_()
    return module


# Part sizes of prepare_base: (VAE training scenes, steps, batch), (CLIP pool scenes, steps, batch), held-out scenes.
# Full: ~60 s + ~70 s on two idle cores (~30 dB PSNR, top-1 ~0.7 among 256); quick: ~15 s, for tests. The VAE's
# 800 steps rather than 1000 (until WORLD_VERSION 6: 31.4 dB, against 29.6): the world's preparation then fits its 15
# minutes.
_FULL = {"vae": (2048, 800, 8), "clip": (4096, 800, 64), "heldout": 256}
_QUICK = {"vae": (256, 120, 8), "clip": (512, 120, 32), "heldout": 64}


def prepare_base(folder: str | os.PathLike, seed: int, quick: bool = False,
                 log: Callable[[str], None] = print) -> dict:
    """Write the world's base model into `folder` (see the module docstring) and return what was measured:
    `vae` (vae_quality on held-out renders, with the trained CLIP: the reward ceiling), `clip` (clip_quality on
    held-out scenes), `parameters` (parameter_counts) and `seconds` per part. The same numbers go to
    folder/prepare.json. Everything is seeded by `seed`. `quick` trains the VAE and CLIP briefly (for tests: the
    layouts are the same, the quality is not).

    The folder is built under `<folder>.partial` and renamed into place at the end, so an existing `folder` is
    complete; an existing one is refused rather than replaced."""
    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"{folder} already exists; prepare_base writes a new folder")
    partial = folder.with_name(folder.name + ".partial")
    if partial.exists():  # left by an interrupted run of this function
        shutil.rmtree(partial)
    sizes = _QUICK if quick else _FULL
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(part: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[part] = round(now - clock, 2)
        clock = now

    build_tokenizer(partial / "lvlm")
    processor = Qwen25VLProcessor.from_pretrained(partial / "lvlm")
    lvlm = _seeded_build(seed, lambda: _init_normal(Qwen25VL(lvlm_config(processor.vocab_size,
                                                                           processor.special_token_ids()))))
    save_lvlm(lvlm, partial / "lvlm", processor)
    lap("lvlm")

    dit = _seeded_build(seed + 1, lambda: _init_normal(MMDiT(DIT_CONFIG)))
    save_dit(dit, partial / "sd3" / "transformer")
    _write_json(partial / "sd3" / "scheduler" / "scheduler_config.json", {
        "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": SCHEDULER_SHIFT})
    _write_json(partial / "sd3" / "model_index.json", {
        "_class_name": "StableDiffusion3Pipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": [None, None], "text_encoder_2": [None, None], "text_encoder_3": [None, None],
        "tokenizer": [None, None], "tokenizer_2": [None, None], "tokenizer_3": [None, None]})
    # The connector starts at the scale of its input (std None): at normal(0, 0.02) its two layers shrank the
    # captioner's states ~30x, and the decoder SFT learned from them the background word and little of the objects (at
    # sigma 0.97, where a layout is decided, a held-out velocity loss of 0.63 after 1000 steps against 0.51 for knowing
    # the background alone; one linear layer in its place 0.53). Started so, the world's start decoder put 18% of the
    # captions' objects in their cells instead of 8% (README, run J).
    connector = _seeded_build(seed + 2, lambda: _init_normal(Connector(CONNECTOR_CONFIG), std=None))
    # SD3's pooled vector is CLIP-L + CLIP-G's embedding of "", which the world has no text encoders for: a fixed
    # unit-variance random vector plays its part (it is one constant for every prompt either way).
    pooled = torch.randn(CONNECTOR_CONFIG.pooled_dim, generator=torch.Generator().manual_seed(seed + 3))
    connector.pooled.copy_(pooled)
    connector.save(partial / "connector.safetensors")
    save_safetensors({POOLED_KEY: pooled}, partial / "pooled.safetensors", metadata={"format": "pt"})
    lap("dit_connector")

    n, steps, batch = sizes["vae"]
    train = world.scenes("train", n, seed)
    vae = train_vae([world.render(s, IMAGE_SIZE) for s in train], steps, seed + 4, log, batch_size=batch)
    save_vae(vae, partial / "sd3" / "vae")
    lap("vae")

    n, steps, batch = sizes["clip"]
    pool = world.scenes("train", n, seed + 5)
    clip = train_clip([world.render(s, IMAGE_SIZE) for s in pool], [world.describe(s, 4) for s in pool], steps,
                      seed + 6, log, batch_size=batch)
    heldout = world.scenes("heldout", sizes["heldout"], seed)
    clip_numbers = clip_quality(clip, heldout, seed)
    per_attribute = ", ".join(f"{a} {c:.3f}" for a, c in clip_numbers["cos_change"].items())
    log(f"clip: held-out top-1 {clip_numbers['top1']:.3f} among {len(heldout)}; cos same (noisy) "
        f"{clip_numbers['cos_same']:.3f}, one change {clip_numbers['cos_one_change']:.3f} ({per_attribute}), "
        f"different {clip_numbers['cos_different']:.3f}")
    save_clip(clip, partial / "clip")
    lap("clip")
    vae_numbers = vae_quality(vae, [world.render(s, IMAGE_SIZE) for s in heldout], clip)
    log(f"vae: held-out PSNR {vae_numbers['psnr']:.2f} dB (mse {vae_numbers['mse']:.5f}; mean-colour mse "
        f"{vae_numbers['mean_colour_mse']:.5f}); reward of its reconstructions {vae_numbers['clip_cos']:.4f}")

    report = {"vae": vae_numbers, "clip": clip_numbers, "seconds": seconds,
              "parameters": parameter_counts(lvlm=lvlm, dit=dit, connector=connector, vae=vae, clip=clip),
              "seed": seed, "quick": quick}
    _write_json(partial / "prepare.json", report)
    os.replace(partial, folder)
    return report


def parameter_counts(**modules: nn.Module) -> dict[str, int]:
    """Parameters per named module; the LVLM's tied embedding counts once (parameters() lists shared ones once)."""
    return {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}
