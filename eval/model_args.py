"""Command-line options that pick a UAE model, shared by the eval tools: a release folder, plain parts or the tiny
preset, optionally with a training run's result on top (`--run`: the `model/` handoff of its latest checkpoint,
model/handoff.py; the EMA of its newest DiT adapter unless --no-ema)."""
from __future__ import annotations

import argparse
import sys

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32", choices=sorted(DTYPES))
    g.add_argument("--seed", type=int, default=0)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """Decoder sampling options; None keeps the model's UAESettings (the release: 1024 px, 40 steps, CFG 5)."""
    g = p.add_argument_group("sampling (default: the model's settings)")
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--steps", type=int, default=None)
    g.add_argument("--guidance-scale", type=float, default=None)


def add_prompt_arg(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--prompt", default=default,
                   help="caption prompt: 'bench' (Unified-Bench's: an accurate, comprehensive description a generator "
                        "can redraw the image from), 'demo' (the released demo's), or the prompt text itself")


def caption_prompt(name: str) -> str:
    from model.uae import CAPTION_PROMPT, UNIFIED_BENCH_PROMPT

    return {"bench": UNIFIED_BENCH_PROMPT, "demo": CAPTION_PROMPT}.get(name, name)


def load_model(args):
    """Build the UAE the options describe, with --run's result on top; a missing or broken part, or a run trained
    on another base model, exits with the loader's message."""
    from model.handoff import BASE_PARTS, base_identity, load_handoff, read_handoff
    from model.uae import UAE
    from weights import CheckpointError

    parts = {k: getattr(args, k) for k in BASE_PARTS if k != "uae"}
    if args.tiny:
        if args.uae or any(parts.values()):
            sys.exit("error: --tiny takes no weights")
    elif not args.uae and not args.lvlm:
        sys.exit("error: give --uae RELEASE_FOLDER, or --lvlm and --sd3, or --tiny")
    handoff = None
    if args.run:
        try:
            handoff = read_handoff(args.run)
            handoff.check_base(base_identity(tiny_seed=args.seed if args.tiny else None, uae=args.uae, **parts),
                               what="these options")
        except (FileNotFoundError, CheckpointError, ValueError) as e:
            sys.exit(f"error: cannot use --run {args.run}: {e}")
    elif args.no_ema:
        sys.exit("error: --no-ema needs --run")
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


def open_image(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError:
        sys.exit(f"error: image {path} does not exist")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        sys.exit(f"error: cannot decode image {path}: {e}")
