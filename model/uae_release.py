"""Loading UAE from the official release folder or from plain parts.

Release layout (HF `zhiyuanyan1/UAE`, as its public inference code reads it):
    llm_model/     Qwen2.5-VL-3B weights + config + the projector (`projector.0/2.*`, our connector)
    llm_model_preprocessor/ (optional) tokenizer.json, preprocessor_config.json; else they sit in llm_model/
    llm_lora/      sharded state dict (`model-0000{i}-of-00003.safetensors`) of the peft-wrapped LVLM; only its
                   `lora_A` / `lora_B` tensors are read (the release applies r 32, alpha 64
                   [model.uae.LORA_RANK, LORA_ALPHA], gaussian init)
    dit/           the SD3.5-large transformer (diffusers folder)
    dit_lora/      a PEFT adapter of the transformer
    SD3/           the SD3.5-large diffusers folder: vae/, scheduler/, text_encoder/, text_encoder_2/
The pooled vector (SD3's CLIP-L + CLIP-G pooled embeddings of "") is read from `pooled.safetensors` when given or
present in the release folder, else computed once from SD3/text_encoder{,_2} with our CLIP text towers.

The release's LoRA adapters (and any given as plain parts) are loaded unmerged, as its inference code runs them with
peft, and frozen (`model.lora.freeze_lora`): they are part of the model the release is, so a training stage puts its
own adapter on top of them and its reference policy (its adapter off) is the release itself.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from model.uae import LORA_ALPHA
from weights import CheckpointError, open_checkpoint, read_json

RELEASE_PARTS = ("llm_model", "llm_lora", "dit", "dit_lora", "SD3")
POOLED_FILE = "pooled.safetensors"


@dataclass
class UAEParts:
    lvlm: Path
    processor: Path
    dit: Path
    vae: Path
    connector: Path | None = None  # None: the projector inside the lvlm checkpoint
    llm_lora: Path | None = None
    dit_lora: Path | None = None
    pooled: Path | None = None
    sd3: Path | None = None


def _first_with(candidates: list[Path], name: str, what: str) -> Path:
    for c in candidates:
        if (c / name).exists():
            return c
    raise FileNotFoundError(f"no {what}: looked for {name} in {', '.join(map(str, candidates))}")


def resolve_parts(release=None, *, lvlm=None, dit=None, sd3=None, connector=None, llm_lora=None, dit_lora=None,
                  pooled=None) -> UAEParts:
    """Where each part lives; explicit arguments override the release's. A missing part is an error naming it."""
    paths = {k: Path(v) if v else None for k, v in dict(lvlm=lvlm, dit=dit, sd3=sd3, connector=connector,
                                                       llm_lora=llm_lora, dit_lora=dit_lora, pooled=pooled).items()}
    if release:
        root = Path(release)
        if not root.is_dir():
            raise FileNotFoundError(f"UAE release folder {root} does not exist")
        missing = [p for p in RELEASE_PARTS if not (root / p).exists()]
        if missing:
            raise FileNotFoundError(f"UAE release folder {root} lacks {', '.join(missing)} "
                                    f"(expected {', '.join(RELEASE_PARTS)})")
        defaults = dict(lvlm=root / "llm_model", dit=root / "dit", sd3=root / "SD3", llm_lora=root / "llm_lora",
                        dit_lora=root / "dit_lora",
                        pooled=root / POOLED_FILE if (root / POOLED_FILE).exists() else None)
        paths = {k: v if v is not None else defaults.get(k) for k, v in paths.items()}
    if paths["lvlm"] is None or paths["sd3"] is None and paths["dit"] is None:
        raise ValueError("UAE.from_pretrained needs a release folder, or lvlm= and sd3= "
                         "(an SD3/SD3.5 diffusers folder)")
    for name, p in paths.items():
        if p is not None and not p.exists():
            raise FileNotFoundError(f"{name} path {p} does not exist")
    lvlm_dir = paths["lvlm"]
    processor_dirs = [lvlm_dir, lvlm_dir.parent / "llm_model_preprocessor"]
    sd3_dir = paths["sd3"]
    dit_dir = paths["dit"] or sd3_dir / "transformer"
    vae_dir = (sd3_dir / "vae") if sd3_dir is not None else None
    if vae_dir is None or not vae_dir.exists():
        raise FileNotFoundError(f"no VAE: expected {vae_dir} (give sd3= an SD3/SD3.5 diffusers folder)")
    return UAEParts(lvlm=lvlm_dir, processor=_first_with(processor_dirs, "tokenizer.json", "Qwen2.5-VL tokenizer"),
                    dit=dit_dir, vae=vae_dir, connector=paths["connector"], llm_lora=paths["llm_lora"],
                    dit_lora=paths["dit_lora"], pooled=paths["pooled"], sd3=sd3_dir)


def load(cls, parts: UAEParts, dtype: torch.dtype, device, settings=None):
    from model.connector import Connector, ConnectorConfig, load_pooled
    from model.lora import freeze_lora, load_lora
    from model.mmdit import MMDiT
    from model.qwen2_5_vl import Qwen25VL
    from model.qwen2_5_vl_processor import Qwen25VLProcessor
    from model.vae import VAE

    processor = Qwen25VLProcessor.from_pretrained(parts.processor)
    lvlm_ckpt = open_checkpoint(parts.lvlm)
    is_projector = re.compile(r"projector\..*").fullmatch
    lvlm = Qwen25VL.from_pretrained(parts.lvlm, dtype=dtype, device=device,
                                    source=lvlm_ckpt.subset(lambda k: not is_projector(k)))
    if parts.llm_lora is not None:
        load_release_llm_lora(lvlm, parts.llm_lora)
        freeze_lora(lvlm)
    dit = MMDiT.from_pretrained(parts.dit, dtype=dtype, device=device)
    if parts.dit_lora is not None:
        load_lora(dit, parts.dit_lora)
        freeze_lora(dit)
    vae = VAE.from_pretrained(parts.vae, dtype=dtype, device=device)

    cfg = ConnectorConfig(in_dim=lvlm.config.text.hidden_size, out_dim=dit.config.joint_attention_dim,
                          hidden_dim=2 * dit.config.joint_attention_dim, pooled_dim=dit.config.pooled_projection_dim)
    pooled = (load_pooled(parts.pooled, cfg.pooled_dim) if parts.pooled is not None
              else pooled_from_sd3(parts.sd3, cfg.pooled_dim))
    if parts.connector is None and not len(lvlm_ckpt.subset(lambda k: bool(is_projector(k)))):
        raise CheckpointError(f"{parts.lvlm}: no projector.* keys; pass connector= a connector file")
    connector = Connector.from_pretrained(parts.connector or parts.lvlm, cfg, pooled=pooled, dtype=dtype,
                                          device=device)
    model = cls(lvlm, processor, connector, dit, vae, settings)
    scheduler = parts.sd3 / "scheduler" / "scheduler_config.json" if parts.sd3 is not None else None
    if settings is None and scheduler is not None and scheduler.exists():
        model.settings.shift = float(read_json(scheduler).get("shift", 3.0))
    return model.eval()


def load_release_llm_lora(lvlm, folder: str | os.PathLike, alpha: float = LORA_ALPHA) -> list[str]:
    """Apply and load the release's LVLM LoRA: keys `...<module path>.lora_{A,B}[.default].weight` of the peft-wrapped
    transformers model, in either transformers 4 or 5 spelling, mapped onto our module names with the Qwen key
    table. Base weights that the shards may also hold are ignored; every LoRA tensor must land on a Linear."""
    from model.lora import apply_lora, lora_layers
    from model.qwen2_5_vl import KEY_TABLE
    from weights import rename_keys

    ckpt = open_checkpoint(folder)
    lora_key = re.compile(r"(?:model\.)?(?:base_model\.model\.)?(.*)\.(lora_[AB])(?:\.default)?\.weight")
    found: dict[str, dict[str, str]] = {}
    for key in ckpt:
        m = lora_key.fullmatch(key)
        if m:
            found.setdefault(m.group(1), {})[m.group(2)] = key
    if not found:
        raise CheckpointError(f"{folder}: no lora_A/lora_B tensors")
    # The wrapped module's path, spelled as a checkpoint weight key, renames through the model's own key table.
    renamed = rename_keys([_transformers_key(p) + ".weight" for p in found], KEY_TABLE)
    module_of = {ckpt_key[:-len(".weight")]: module_key[:-len(".weight")] for module_key, ckpt_key in renamed.items()}
    targets, ranks = [], set()
    for path, pair in found.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise CheckpointError(f"{folder}: {path} has only {sorted(pair)}")
        targets.append(module_of[_transformers_key(path)])
        ranks.add(ckpt.shape(pair["lora_A"])[0])
    if len(ranks) != 1:
        raise CheckpointError(f"{folder}: LoRA ranks differ across modules: {sorted(ranks)}")
    rank = ranks.pop()
    apply_lora(lvlm, r"|".join(re.escape(t) for t in targets), rank=rank, alpha=alpha)
    layers = lora_layers(lvlm)
    for path, pair in found.items():
        layer = layers[module_of[_transformers_key(path)]]
        for which, key in pair.items():
            target = layer.A if which == "lora_A" else layer.B
            t = ckpt[key]
            if t.shape != target.weight.shape:
                raise CheckpointError(f"{ckpt.file_of(key)}: {key} has shape {list(t.shape)}, "
                                      f"module wants {list(target.weight.shape)}")
            with torch.no_grad():
                target.weight.copy_(t)
    return targets


def _transformers_key(path: str) -> str:
    """A peft-wrapped `Qwen2_5_VLModel` path (`language_model.layers.0...` in transformers >= 4.52, `layers.0...` in
    older releases, `visual.blocks...`) spelled as a full-model checkpoint key, which the Qwen key table maps."""
    return path if path.startswith(("model.", "visual.", "lm_head")) else "model." + path


def pooled_from_sd3(sd3: Path | None, dim: int) -> torch.Tensor:
    """SD3's pooled embedding of the empty prompt: CLIP-L and CLIP-G text towers' projected pooled outputs of "",
    concatenated (diffusers StableDiffusion3Pipeline.encode_prompt). The empty prompt is [BOS, EOS] + padding; the
    pooled token is the EOS at position 1 and the towers are causal, so the padding never reaches it and [BOS, EOS]
    alone gives the same vector."""
    from model.clip import CLIPTextEncoder

    if sd3 is None or not (sd3 / "text_encoder").exists() or not (sd3 / "text_encoder_2").exists():
        raise FileNotFoundError(f"pooled vector: give pooled= a .safetensors file ('pooled_projections') or an SD3 "
                                f"folder with text_encoder/ and text_encoder_2/ (got {sd3})")
    parts = []
    for sub in ("text_encoder", "text_encoder_2"):
        tower = CLIPTextEncoder.from_pretrained(sd3 / sub, dtype=torch.float32)
        with torch.no_grad():  # CLIP's <|startoftext|>, <|endoftext|> ids in SD3's tokenizers
            parts.append(tower.text_features(torch.tensor([[49406, 49407]]))[0])
    pooled = torch.cat(parts)
    if pooled.shape[0] != dim:
        raise ValueError(f"pooled vector from {sd3} has {pooled.shape[0]} channels, the DiT wants {dim}")
    return pooled
