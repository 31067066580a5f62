"""Command-line options that pick a UAE model, shared by the eval tools: a release folder, plain parts or the tiny
preset, optionally with a training run's result on top (`--run`: the `model/` handoff of its latest checkpoint,
model/handoff.py; the EMA of its newest DiT adapter unless --no-ema)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from eval.cli import at_least, device
from model.handoff import BASE_PARTS
from weights import DTYPES



def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (a release folder, plain parts, or --tiny)")
    g.add_argument("--uae", default=None, help="UAE release folder (llm_model/, llm_lora/, dit/, dit_lora/, SD3/)")
    g.add_argument("--lvlm", default=None, help="Qwen2.5-VL folder (overrides the release's)")
    g.add_argument("--sd3", default=None, help="SD3/SD3.5 diffusers folder with transformer/ and vae/")
    g.add_argument("--dit", default=None, help="transformer folder replacing --sd3's")
    g.add_argument("--connector", default=None, help="connector file (default: the projector inside --lvlm)")
    g.add_argument("--pooled", default=None, help=".safetensors with 'pooled_projections' (else from SD3's CLIPs)")
    g.add_argument("--llm-lora", default=None, help="LVLM LoRA (release llm_lora/ layout)")
    g.add_argument("--dit-lora", default=None, help="DiT LoRA (PEFT adapter folder)")
    g.add_argument("--tiny", action="store_true", help="the tiny random model (CPU demo; output is noise)")
    g.add_argument("--run", default=None, help="a training run folder (its latest checkpoint) or a checkpoint "
                                               "folder: the model that run ended with, on the base model the "
                                               "options above give (the same as the run's)")
    g.add_argument("--no-ema", action="store_true", help="with --run: the trained DiT adapter itself instead of "
                                                         "its EMA (runs of train/grpo_decoder.py keep both)")
    g.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device of the model")
    g.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32", choices=sorted(DTYPES),
                   help="weight dtype")
    g.add_argument("--seed", type=int, default=0, help="input i is sampled with seed + i (and the tiny model's "
                                                       "weights are drawn with it)")


def check_model_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """The model options' combinations and paths, before anything loads: a one-line usage error naming the option."""
    parts = [k for k in BASE_PARTS if getattr(a, k)]
    if a.tiny and parts:
        p.error(f"--tiny takes no weights, but --{parts[0].replace('_', '-')} is given")
    if not a.tiny and "uae" not in parts and "lvlm" not in parts:
        p.error("give --uae RELEASE_FOLDER, or --lvlm and --sd3, or --tiny")
    if a.no_ema and not a.run:
        p.error("--no-ema needs --run")
    for key in (*parts, "run"):
        path = getattr(a, key)
        if path and not Path(path).exists():
            p.error(f"argument --{key.replace('_', '-')}: {path} does not exist")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """Decoder sampling options; None keeps the model's UAESettings (the release's, or the tiny model's)."""
    from model.uae import UAESettings

    s = UAESettings()
    g = p.add_argument_group(f"sampling (default: the model's settings; the release: {s.height} px, {s.steps} steps, "
                             f"CFG {s.guidance_scale:g})")
    g.add_argument("--height", type=at_least(1), default=None,
                   help="image height in px: a multiple of the model's latent patch (16 px), at most what its DiT's "
                        "position table holds (SD3.5-large: 3072 px; the tiny model: 512 px)")
    g.add_argument("--width", type=at_least(1), default=None, help="image width in px, as --height")
    g.add_argument("--steps", type=at_least(1), default=None, help="sampling steps")
    g.add_argument("--guidance-scale", type=at_least(1.0, float), default=None,
                   help="classifier-free guidance scale; 1 = no guidance")


def check_size(p: argparse.ArgumentParser, a: argparse.Namespace, uae) -> None:
    """--height / --width against the loaded model: multiples of the VAE factor x the DiT patch, within the DiT's
    position table (larger latents have no position embedding)."""
    factor = uae.vae.config.downsample_factor * uae.dit.config.patch_size
    limit = uae.dit.config.pos_embed_max_size * factor
    for option, value in (("--height", a.height), ("--width", a.width)):
        if value is not None and value % factor:
            p.error(f"argument {option}: {value} is not a multiple of {factor} (the model's VAE factor "
                    f"{uae.vae.config.downsample_factor} x DiT patch {uae.dit.config.patch_size})")
        if value is not None and value > limit:
            p.error(f"argument {option}: {value} exceeds the model's limit of {limit} px (its DiT position table "
                    f"holds {uae.dit.config.pos_embed_max_size} patches of {factor} px per side)")


def add_prompt_arg(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--prompt", default=default, type=_prompt,
                   help="caption prompt: 'bench' (Unified-Bench's: an accurate, comprehensive description a generator "
                        "can redraw the image from), 'demo' (the released demo's), or the prompt text itself")


def _prompt(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("the caption prompt is empty")
    return text


def caption_prompt(name: str) -> str:
    from model.uae import CAPTION_PROMPT, UNIFIED_BENCH_PROMPT

    return {"bench": UNIFIED_BENCH_PROMPT, "demo": CAPTION_PROMPT}.get(name, name)


def load_model(args):
    """Build the UAE the options describe (checked by `check_model_args`), with --run's result on top; a broken part,
    or a run trained on another base model, exits with the loader's message."""
    from model.handoff import base_identity, load_handoff, read_handoff
    from model.uae import UAE
    from weights import CheckpointError

    parts = {k: getattr(args, k) for k in BASE_PARTS if k != "uae"}
    handoff = None
    if args.run:
        try:
            handoff = read_handoff(args.run)
            handoff.check_base(base_identity(tiny_seed=args.seed if args.tiny else None, uae=args.uae, **parts),
                               what="these options")
        except (FileNotFoundError, CheckpointError, ValueError) as e:
            sys.exit(f"error: cannot use --run {args.run}: {e}")
    if args.tiny:
        uae = UAE.tiny(seed=args.seed, dtype=DTYPES[args.dtype], device=args.device)
    else:
        print("loading model ...", file=sys.stderr, flush=True)
        try:
            uae = UAE.from_pretrained(args.uae, dtype=DTYPES[args.dtype], device=args.device, **parts)
        except (FileNotFoundError, CheckpointError, ValueError) as e:
            sys.exit(f"error: cannot load the model: {e}")
    if handoff is not None:
        try:
            load_handoff(uae, handoff, ema=not args.no_ema)
        except (FileNotFoundError, CheckpointError, ValueError) as e:
            sys.exit(f"error: cannot load --run {args.run}: {e}")
    return uae
