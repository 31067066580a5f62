"""LoRA (low-rank adapters) for nn.Linear, with PEFT's maths and on-disk format but none of its machinery.

A wrapped linear computes  y = W x + b + (alpha / r) * B A dropout(x),  A [r, in], B [out, r], with B zero at init
so a fresh adapter leaves the model unchanged (peft 0.21 `LoraLayer.update_layer` / `reset_lora_parameters`):
  init="kaiming"  -> A ~ kaiming_uniform(a=sqrt(5)), peft's init_lora_weights=True (nn.Linear's default init)
  init="gaussian" -> A ~ N(0, std=1/r), peft's init_lora_weights="gaussian" (the UAE setting)

In-memory parameter names follow peft's (`<path>.base_layer.weight`, `<path>.lora_A.<adapter>.weight`) so whole-model
state dicts line up with a peft model's minus its `base_model.model.` prefix.

Stacked adapters. One adapter is active (trainable); any number of frozen ones may lie under it. `freeze_lora` makes
the active adapter part of the base, and the next `apply_lora` / `load_lora` wraps a frozen LoRALinear as it would the
nn.Linear at that path: active(frozen(frozen(Linear))) computes W x + b + s1 B1 A1 x + s2 B2 A2 x + s3 B3 A3 x, peft's
sum over several active adapters. A training stage thus starts from the release adapter and earlier stages' adapters
unmerged: merging into bf16 weights would round each delta to the weights' bf16 spacing, so the stage would not start
from the model that was trained. Only `freeze_lora`, `frozen_lora_layers` and `unwrap_lora` (fold or drop every level)
see frozen adapters; every other function acts on the active one (`lora_disabled`: the newest adapter off, older ones
on, the RL reference policy; `save_lora` writes the active adapter under the outer wrapper's path, so the file loads
with or without the frozen stack). Frozen levels' names gain one `base_layer.` per level above them
(`<path>.base_layer.lora_A.default.weight`, `<path>.base_layer.base_layer.weight`).

Target patterns (`targets`), as peft's `target_modules` (peft.tuners.tuners_utils.check_target_module_exists):
  - a list of names: a module matches when its dotted path equals a name or ends with "." + name
    (["to_q", "to_v"] hits every `...to_q`/`...to_v`; "blocks.0.attn.to_q" hits that one module);
  - one string: a regular expression that must match the whole dotted path (re.fullmatch).
  peft's special value "all-linear" is not supported. Every pattern must match at least one module, and every
  matched module must be an nn.Linear or a frozen LoRALinear; a frozen LoRALinear counts as the Linear at its path
  and its insides (`base_layer`, `lora_A.default`, ...) are never targets, so the same targets select the same
  paths with or without a frozen stack.

Files. `save_lora` writes a PEFT adapter folder: `adapter_config.json` + `adapter_model.safetensors` with keys
`base_model.model.<path>.lora_A.weight` / `.lora_B.weight` (peft's `get_peft_model_state_dict` drops the adapter
name). `load_lora` reads that, and also the diffusers layouts for an SD3 transformer's LoRA:
  - `save_lora_adapter` (diffusers.loaders.peft): `pytorch_lora_weights.safetensors`, keys `<path>.lora_A.weight`
    with no prefix, the LoraConfig as JSON under the safetensors metadata key "lora_adapter_metadata";
  - pipeline `save_lora_weights` (SD3LoraLoaderMixin): same file name, keys prefixed "transformer." (metadata keys
    too, when present).
With prefix=None the loader strips "base_model.model." or "transformer." when every key carries it; pass
prefix="transformer" to pick one component out of a pipeline file that also holds text-encoder keys (diffusers'
`load_lora_adapter(prefix=...)` filter), or prefix="" to strip nothing.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from weights import CheckpointError, open_checkpoint, read_json, save_safetensors

__all__ = [
    "LoRALinear", "apply_lora", "lora_layers", "set_lora_enabled", "lora_disabled", "lora_levels_disabled",
    "merge_lora", "unmerge_lora", "lora_parameters", "lora_state_dict", "save_lora", "load_lora", "freeze_lora",
    "frozen_lora_layers", "unwrap_lora",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
PEFT_PREFIX = "base_model.model."
AUTO_PREFIXES = (PEFT_PREFIX, "transformer.")
INITS = ("gaussian", "kaiming")

# LoraConfig fields whose non-default values change the maths or the key layout; we refuse them rather than
# load an adapter that would compute something else.
_UNSUPPORTED_FIELDS = ("use_dora", "use_rslora", "fan_in_fan_out", "lora_bias", "modules_to_save",
                       "layers_to_transform", "rank_pattern", "alpha_pattern", "exclude_modules", "target_parameters",
                       "trainable_token_indices")
_KEY = re.compile(r"(.+)\.lora_([AB])\.weight")


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus one low-rank adapter: y = base(x) + scaling * B(A(dropout(x))), scaling = alpha / r.

    The adapter weights live in `dtype` (default: the base weight's dtype, as peft does); the input is cast to it
    and the update cast back to the base output's dtype (peft's LoRA `Linear.forward`).

    `base` may also be a frozen LoRALinear (a stacked adapter, see the module docstring); `in_features`,
    `out_features` and `weight` are those of the innermost nn.Linear, so a frozen LoRALinear stands in for it.
    """

    def __init__(self, base: nn.Linear | LoRALinear, rank: int, alpha: float, dropout: float = 0.0,
                 init: str = "gaussian", adapter_name: str = "default", dtype: torch.dtype | None = None):
        super().__init__()
        _check_hparams(rank, alpha, dropout, init, adapter_name)
        if isinstance(base, LoRALinear):
            if not base.frozen:
                raise ValueError(f"base is an active LoRALinear ({base.extra_repr()}); freeze_lora it first to stack "
                                 "a new adapter on it")
        elif not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear or a frozen LoRALinear, got {type(base).__name__}")
        self.base_layer = base.requires_grad_(False)
        self.adapter_name = adapter_name
        self.rank, self.alpha, self.init = rank, alpha, init
        self.scaling = alpha / rank
        device = base.weight.device
        dtype = dtype or (base.weight.dtype if base.weight.is_floating_point() else torch.float32)
        self.lora_A = nn.ModuleDict({adapter_name: nn.Linear(base.in_features, rank, bias=False, device=device,
                                                             dtype=dtype)})
        self.lora_B = nn.ModuleDict({adapter_name: nn.Linear(rank, base.out_features, bias=False, device=device,
                                                             dtype=dtype)})
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True
        self.merged = False
        self.frozen = False
        self.reset_lora_parameters()

    @property
    def linear(self) -> nn.Linear:
        """The innermost nn.Linear, below every stacked level."""
        m = self.base_layer
        while isinstance(m, LoRALinear):
            m = m.base_layer
        return m

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    @property
    def weight(self) -> nn.Parameter:
        return self.linear.weight

    @property
    def A(self) -> nn.Linear:
        return self.lora_A[self.adapter_name]

    @property
    def B(self) -> nn.Linear:
        return self.lora_B[self.adapter_name]

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        if self.init == "kaiming":
            nn.init.kaiming_uniform_(self.A.weight, a=math.sqrt(5))
        else:
            nn.init.normal_(self.A.weight, std=1 / self.rank)
        nn.init.zeros_(self.B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged or not self.enabled:
            return out
        h = self.lora_dropout(x.to(self.A.weight.dtype))
        return out + (self.B(self.A(h)) * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in fp32 (peft upcasts low-precision weights for the product too)."""
        return (self.B.weight.float() @ self.A.weight.float()) * self.scaling

    # merge/unmerge touch the innermost weight: every level is linear in x, so a delta folded there adds the same
    # function whatever frozen levels lie between.
    @torch.no_grad()
    def merge(self) -> None:
        self._check_not_frozen("merge")
        if self.merged:
            raise ValueError("LoRA adapter is already merged into the base weight; unmerge first")
        if not self.enabled:
            raise ValueError("cannot merge a disabled LoRA adapter; enable it first")
        w = self.weight
        w += self.delta_weight().to(w.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        self._check_not_frozen("unmerge")
        if not self.merged:
            raise ValueError("LoRA adapter is not merged")
        w = self.weight
        w -= self.delta_weight().to(w.dtype)
        self.merged = False

    def freeze(self) -> None:
        """Make this adapter part of the base: it keeps computing its update, unmerged, and trains no more."""
        if self.frozen:
            raise ValueError("LoRA adapter is already frozen")
        if self.merged:
            raise ValueError("cannot freeze a merged LoRA adapter (its delta is already in the weight); "
                             "unmerge it first")
        if not self.enabled:
            raise ValueError("cannot freeze a disabled LoRA adapter (a frozen one is always on); enable it first")
        self.requires_grad_(False)
        self.frozen = True

    def _check_not_frozen(self, what: str) -> None:
        if self.frozen:
            raise ValueError(f"cannot {what} a frozen LoRA adapter: it is part of the base; "
                             "unwrap_lora(merge=True) folds every level")

    def extra_repr(self) -> str:
        return (f"adapter={self.adapter_name!r}, r={self.rank}, alpha={self.alpha}, init={self.init}"
                + (", frozen" if self.frozen else ""))


def _check_hparams(rank, alpha, dropout, init, adapter_name) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string without '.', got {adapter_name!r}")


def lora_layers(module: nn.Module) -> dict[str, LoRALinear]:
    """{dotted path: LoRALinear} for every active (not frozen) wrapped linear in `module`, in module order."""
    return {name: m for name, m in module.named_modules() if isinstance(m, LoRALinear) and not m.frozen}


def _visible_modules(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """named_modules() without the insides of LoRALinear stacks: the paths of the unwrapped model, each wrapped
    path yielding its outermost LoRALinear."""
    inside = None
    for name, sub in module.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        inside = None
        if isinstance(sub, LoRALinear):
            inside = name + "." if name else ""
        yield name, sub


def frozen_lora_layers(module: nn.Module) -> dict[str, LoRALinear]:
    """{dotted path: outermost frozen LoRALinear at that path} in module order. The path is where the nn.Linear sat
    (the path targets name), also when an active adapter wraps the frozen stack."""
    out = {}
    for name, sub in _visible_modules(module):
        while isinstance(sub, LoRALinear) and not sub.frozen:
            sub = sub.base_layer
        if isinstance(sub, LoRALinear):
            out[name] = sub
    return out


def _require_layers(module: nn.Module) -> dict[str, LoRALinear]:
    layers = lora_layers(module)
    if not layers:
        frozen = frozen_lora_layers(module)
        raise ValueError(f"{type(module).__name__} has no LoRA layers"
                         + (f" besides {len(frozen)} frozen one(s), which count as base weights" if frozen else "")
                         + "; call apply_lora or load_lora first")
    return layers


def _resolve_targets(module: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Dotted paths of the modules `targets` selects (peft's matching rules, see the module docstring)."""
    if isinstance(targets, str):
        try:
            regex = re.compile(targets)
        except re.error as e:
            raise ValueError(f"targets regex {targets!r} does not compile: {e}") from None
        patterns = [targets]
        matches = lambda name: [targets] if regex.fullmatch(name) else []  # noqa: E731
    else:
        patterns = list(targets)
        if not patterns or not all(isinstance(p, str) and p for p in patterns):
            raise ValueError(f"targets must be a regex string or a non-empty list of module names, got {targets!r}")
        matches = lambda name: [p for p in patterns if name == p or name.endswith("." + p)]  # noqa: E731
    hit: set[str] = set()
    names = []
    for name, sub in _visible_modules(module):
        found = matches(name) if name else []
        if not found:
            continue
        if isinstance(sub, LoRALinear) and not sub.frozen:
            raise ValueError(f"target pattern(s) {found} match {name!r}, which already has an active LoRA adapter; "
                             "freeze_lora first to stack a new one on it")
        if not isinstance(sub, (nn.Linear, LoRALinear)):
            raise ValueError(f"target pattern(s) {found} match module {name!r} of type {type(sub).__name__}; "
                             "LoRA wraps only nn.Linear (or a frozen LoRALinear)")
        hit.update(found)
        names.append(name)
    unmatched = [p for p in patterns if p not in hit]
    if unmatched:
        raise ValueError(f"target pattern(s) {unmatched} match no module of {type(module).__name__}")
    return names


def apply_lora(module: nn.Module, targets: str | Sequence[str], rank: int, alpha: float, dropout: float = 0.0,
               init: str = "gaussian", adapter_name: str = "default",
               dtype: torch.dtype | None = None) -> list[str]:
    """Wrap the nn.Linear modules `targets` selects in LoRALinear, in place, and freeze every other parameter of
    `module` (peft's `get_peft_model` leaves only adapter weights trainable). A frozen LoRALinear is wrapped as the
    Linear at its path would be (a stacked adapter). Returns the wrapped paths."""
    _check_hparams(rank, alpha, dropout, init, adapter_name)
    existing = lora_layers(module)
    if existing:
        raise ValueError(f"{type(module).__name__} already has LoRA layers ({next(iter(existing))!r}, ...); "
                         "one active adapter per model is supported: freeze_lora it to stack a new one on top")
    names = _resolve_targets(module, targets)
    module.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dropout, init, adapter_name, dtype))
    return names


def freeze_lora(module: nn.Module) -> list[str]:
    """Freeze every active adapter of `module` into the base (see the module docstring): it keeps computing its
    update unmerged, its A and B stop training, and from then on only frozen_lora_layers and unwrap_lora see it.
    Refuses merged or disabled adapters, freezing none. Returns the frozen paths ([] when there is no active one)."""
    layers = lora_layers(module)
    bad = [n for n, m in layers.items() if m.merged or not m.enabled]
    if bad:
        raise ValueError(f"cannot freeze merged or disabled LoRA layers {bad[:5]} (a frozen adapter stays unmerged "
                         "and on); unmerge_lora / set_lora_enabled(True) first; nothing was frozen")
    for m in layers.values():
        m.freeze()
    return list(layers)


@torch.no_grad()
def unwrap_lora(module: nn.Module, merge: bool) -> list[str]:
    """Replace every LoRALinear of `module` (active or frozen, every stacked level) by its innermost nn.Linear.

    merge=True folds every level's delta into the weight first, innermost level first, each formed and added in
    fp32 and the sum cast to the weight's dtype (peft's merge_and_unload with every level active and its default
    fp32 adapters, bit for bit): the model keeps its function up to one rounding per level (for full-parameter
    training from a model with adapters). Levels already merged are not added twice; a disabled level is refused.
    merge=False drops the adapters, undoing merged ones, leaving the base model (for loading full weights that
    already contain the adapters). requires_grad is left as it is (apply_lora froze every base weight).
    Returns the unwrapped paths.
    """
    stacks = {}
    for name, sub in _visible_modules(module):
        if isinstance(sub, LoRALinear):
            if not name:
                raise ValueError("the module itself is a LoRALinear; unwrap its parent, or take .linear")
            levels = [sub]
            while isinstance(levels[-1].base_layer, LoRALinear):
                levels.append(levels[-1].base_layer)
            stacks[name] = levels[::-1]  # innermost first
    if merge:
        bad = [n for n, levels in stacks.items() if any(not m.enabled and not m.merged for m in levels)]
        if bad:
            raise ValueError(f"cannot merge disabled LoRA layers {bad[:5]}; set_lora_enabled(True) first, or "
                             "unwrap_lora(merge=False) to drop the adapters; nothing was unwrapped")
    for name, levels in stacks.items():
        w = levels[0].weight
        for m in levels:
            if merge and not m.merged:
                w += m.delta_weight()  # an fp32 operand: the add runs in fp32 and rounds once into w's dtype
            elif not merge and m.merged:
                w -= m.delta_weight().to(w.dtype)  # exactly what LoRALinear.unmerge subtracts
        parent_name, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent_name), child, levels[0].linear)
    return list(stacks)


def set_lora_enabled(module: nn.Module, enabled: bool) -> None:
    """Switch every active adapter of `module` on or off; off, the model computes exactly its base function (frozen
    adapters included)."""
    layers = _require_layers(module)
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise ValueError(f"cannot enable/disable merged LoRA layers ({merged[0]!r}, ...); unmerge_lora first")
    for m in layers.values():
        m.enabled = bool(enabled)


@contextlib.contextmanager
def lora_disabled(module: nn.Module) -> Iterator[nn.Module]:
    """Run with the active adapter off, frozen ones on (the RL reference policy); the previous state returns on
    exit."""
    layers = _require_layers(module)
    before = {n: m.enabled for n, m in layers.items()}
    set_lora_enabled(module, False)
    try:
        yield module
    finally:
        for n, m in layers.items():
            m.enabled = before[n]


@contextlib.contextmanager
def lora_levels_disabled(levels: Sequence[LoRALinear]) -> Iterator[None]:
    """Run with the given adapter levels off, frozen ones included (a level's update stops, the levels under and
    over it keep theirs); each level's previous state returns on exit. What a model with some adapters left out
    computes, e.g. the decoder's text encoding without the captioner-only adapters (model/uae.py)."""
    merged = [m.extra_repr() for m in levels if m.merged]
    if merged:
        raise ValueError(f"cannot disable merged LoRA levels ({merged[0]}, ...): their update is in the weight")
    before = [m.enabled for m in levels]
    for m in levels:
        m.enabled = False
    try:
        yield
    finally:
        for m, on in zip(levels, before):
            m.enabled = on


def merge_lora(module: nn.Module) -> None:
    """Fold scaling * B A of the active adapter into every innermost base weight (forward then skips its branch;
    frozen levels keep theirs)."""
    layers = _require_layers(module)
    bad = [n for n, m in layers.items() if m.merged or not m.enabled]
    if bad:
        raise ValueError(f"LoRA layers already merged or disabled: {bad[:5]}; nothing was merged")
    for m in layers.values():
        m.merge()


def unmerge_lora(module: nn.Module) -> None:
    layers = _require_layers(module)
    bad = [n for n, m in layers.items() if not m.merged]
    if bad:
        raise ValueError(f"LoRA layers not merged: {bad[:5]}; nothing was unmerged")
    for m in layers.values():
        m.unmerge()


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter weights (A and B of every active layer), for the optimizer."""
    return [p for m in _require_layers(module).values() for p in (m.A.weight, m.B.weight)]


def lora_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Active adapter weights only, under their in-memory names (`<path>.lora_A.<adapter>.weight`)."""
    out = {}
    for name, m in _require_layers(module).items():
        out[f"{name}.lora_A.{m.adapter_name}.weight"] = m.A.weight.detach()
        out[f"{name}.lora_B.{m.adapter_name}.weight"] = m.B.weight.detach()
    return out


def _target_modules_spec(module: nn.Module, names: Sequence[str]) -> list[str] | str:
    """target_modules for adapter_config.json that selects exactly `names` under peft's rules: the short list of
    leaf names when it does, else a full-match regex of the exact paths."""
    wrapped = set(names)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    # the paths of the unwrapped model: what peft will match against, with or without our frozen stacks
    selected = {n for n, _ in _visible_modules(module)
                if n and any(n == p or n.endswith("." + p) for p in leaves)}
    if selected == wrapped:
        return leaves
    return _exact_regex(names)


def _exact_regex(names: Sequence[str]) -> str:
    """A full-match regex selecting exactly these dotted paths."""
    return "|".join(re.escape(n) for n in names)


def save_lora(module: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None) -> None:
    """Write the active adapter as a PEFT folder that `PeftModel.from_pretrained(base, directory)` and `load_lora`
    read; frozen adapters are not written (they belong to the base the adapter was trained on)."""
    layers = _require_layers(module)
    first = next(iter(layers.values()))
    for name, m in layers.items():
        if (m.rank, m.alpha, m.init, _dropout_p(m)) != (first.rank, first.alpha, first.init, _dropout_p(first)):
            raise ValueError(f"LoRA layer {name!r} has different hyper-parameters from the others; "
                             "one adapter_config.json cannot describe both")
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": first.rank,
        "lora_alpha": first.alpha,
        "lora_dropout": _dropout_p(first),
        "target_modules": _target_modules_spec(module, list(layers)),
        "bias": "none",
        "init_lora_weights": True if first.init == "kaiming" else "gaussian",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
        "revision": None,
    }
    tensors = {}
    for name, m in layers.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.A.weight
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.B.weight
    directory = Path(directory)
    save_safetensors(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    tmp = directory / f".{CONFIG_NAME}.tmp.{os.getpid()}"
    try:
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True))
        os.replace(tmp, directory / CONFIG_NAME)
    finally:
        if tmp.exists():
            tmp.unlink()


def _dropout_p(m: LoRALinear) -> float:
    return m.lora_dropout.p if isinstance(m.lora_dropout, nn.Dropout) else 0.0


def _strip_prefix(keys: Sequence[str], prefix: str | None, where: Path) -> dict[str, str]:
    """{stripped key: file key}; see the module docstring for the prefix rules."""
    if prefix is None:
        for cand in AUTO_PREFIXES:
            if keys and all(k.startswith(cand) for k in keys):
                return {k[len(cand):]: k for k in keys}
        return {k: k for k in keys}
    if not prefix:
        return {k: k for k in keys}
    p = prefix.rstrip(".") + "."
    out = {k[len(p):]: k for k in keys if k.startswith(p)}
    if not out:
        raise CheckpointError(f"{where}: no key starts with prefix {p!r} (keys look like {sorted(keys)[:3]})")
    return out


def _read_config(config_file: Path | None, metadata: dict[str, str], prefix: str | None, where: Path) -> dict | None:
    if config_file is not None:
        try:
            return read_json(config_file)
        except (OSError, CheckpointError) as e:  # both name the file
            raise CheckpointError(f"unreadable adapter config: {e}") from None
    raw = metadata.get(DIFFUSERS_METADATA_KEY)
    if raw is None:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{where}: metadata {DIFFUSERS_METADATA_KEY!r} is not JSON: {e}") from None
    # A pipeline-level file prefixes its metadata keys with the component name, like its tensor keys.
    for p in ([prefix.rstrip(".") + "."] if prefix else []) + ["transformer."]:
        if any(k.startswith(p) for k in config):
            return {k[len(p):]: v for k, v in config.items() if k.startswith(p)}
    return config


def _check_config(config: dict, where: Path) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{where}: peft_type {config['peft_type']!r} is not LORA")
    missing = [f for f in ("r", "lora_alpha", "target_modules") if config.get(f) is None]
    if missing:
        raise ValueError(f"{where}: adapter config lacks {missing}")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{where}: bias={config['bias']!r} is not supported (only 'none')")
    used = [f"{f}={config[f]!r}" for f in _UNSUPPORTED_FIELDS if config.get(f)]
    if used:
        raise ValueError(f"{where}: unsupported LoRA config field(s): {', '.join(used)}")


def _adapter_files(path: Path) -> tuple[Path, Path | None]:
    if path.is_file():
        return path, None
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or folder")
    for name in (WEIGHTS_NAME, DIFFUSERS_WEIGHTS_NAME):
        if (path / name).is_file():
            config = path / CONFIG_NAME
            return path / name, config if config.is_file() else None
    raise CheckpointError(f"{path}: holds neither {WEIGHTS_NAME} nor {DIFFUSERS_WEIGHTS_NAME}")


@torch.no_grad()
def load_lora(module: nn.Module, path: str | os.PathLike, *, prefix: str | None = None,
              adapter_name: str = "default", dtype: torch.dtype | None = None) -> list[str]:
    """Load a PEFT / diffusers LoRA adapter (folder or .safetensors file) into `module`, strictly.

    Without active LoRA layers, `module` is first wrapped with the file's config (r, lora_alpha, target_modules,
    lora_dropout), stacking on frozen ones where the targets hit them; with them, the file must fit the existing
    layers. Every wrapped layer needs its A and B, every file key must land on a wrapped layer, shapes must agree;
    otherwise CheckpointError names each offender.
    `adapter_name` and `dtype` apply when the module gets wrapped here. Returns the wrapped paths.
    """
    weights_file, config_file = _adapter_files(Path(path))
    ckpt = open_checkpoint(weights_file)
    keys = _strip_prefix(list(ckpt), prefix, weights_file)
    config = _read_config(config_file, ckpt.metadata(), prefix, weights_file)
    if config is not None:
        _check_config(config, config_file or weights_file)

    layers = lora_layers(module)
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise ValueError(f"cannot load into merged LoRA layers ({merged[0]!r}, ...); unmerge_lora first")
    if layers:
        ranks = {n: m.rank for n, m in layers.items()}
        if config is not None:
            wrong = [n for n, m in layers.items() if m.alpha != config["lora_alpha"]]
            if wrong:
                raise ValueError(f"{weights_file}: lora_alpha {config['lora_alpha']} differs from the applied "
                                 f"adapter's ({layers[wrong[0]].alpha} on {wrong[0]!r})")
        bases = {n: m.base_layer for n, m in layers.items()}
    else:
        if config is None:
            raise ValueError(f"{weights_file}: no {CONFIG_NAME} or {DIFFUSERS_METADATA_KEY!r} metadata to say "
                             "which modules to wrap; call apply_lora with the training settings first")
        names = _resolve_targets(module, config["target_modules"])
        ranks = {n: int(config["r"]) for n in names}
        bases = {n: module.get_submodule(n) for n in names}

    errors, found = [], {}
    for key, file_key in keys.items():
        m = _KEY.fullmatch(key)
        if m is None or m.group(1) not in bases:
            errors.append(f"unexpected key {file_key!r}" + ("" if m is None else " (no such LoRA target in the model)"))
            continue
        name, which = m.groups()
        base, r = bases[name], ranks[name]
        want = (r, base.in_features) if which == "A" else (base.out_features, r)
        got = ckpt.shape(file_key)
        if got != want:
            errors.append(f"shape mismatch for {file_key!r}: file {list(got)}, model {list(want)} (rank {r}, "
                          f"{name!r} is Linear({base.in_features}, {base.out_features}))")
        found[(name, which)] = file_key
    errors += [f"missing key for {n!r} lora_{w}" for n in bases for w in "AB" if (n, w) not in found]
    if errors:
        shown = errors[:50] + ([f"... and {len(errors) - 50} more"] if len(errors) > 50 else [])
        raise CheckpointError(f"cannot load LoRA adapter {weights_file} into {type(module).__name__}: "
                              f"{len(errors)} problem(s)\n  " + "\n  ".join(shown))

    if not layers:
        init = "gaussian" if config.get("init_lora_weights") == "gaussian" else "kaiming"
        apply_lora(module, _exact_regex(list(bases)), int(config["r"]), config["lora_alpha"],
                   float(config.get("lora_dropout") or 0.0), init, adapter_name, dtype)
        layers = lora_layers(module)
    for name, m in layers.items():
        for which, lin in (("A", m.A), ("B", m.B)):
            lin.weight.copy_(ckpt[found[(name, which)]])
    return list(layers)
