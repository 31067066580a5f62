"""The connector: LVLM last-layer hidden states -> the MMDiT's text context, plus SD3's constant pooled vector.

UAE's projector (`Qwen2_5_VLWithLongContext.projector` in the public UAE code) is
    nn.Sequential(nn.Linear(2048, 4096 * 2), nn.GELU(), nn.Linear(4096 * 2, 4096))
applied to every token's final (post-norm) hidden state; the result is the DiT's `encoder_hidden_states`.
nn.GELU() is the exact erf form. The release stores it inside `llm_model/` next to the Qwen2.5-VL weights, as
`projector.0.{weight,bias}` and `projector.2.{weight,bias}`.

SD3's `pooled_projections` (2048) normally come from its CLIP text encoders; UAE uses one constant vector, the
pooled embedding of the empty prompt: run SD3's CLIP-L (`text_encoder`, 768) and CLIP-G (`text_encoder_2`, 1280)
`CLIPTextModelWithProjection` on "" (tokenized to 77 tokens, padded with max_length padding as the SD3 pipeline does)
and concatenate their `text_embeds` -> [1, 2048] (diffusers `StableDiffusion3Pipeline.encode_prompt`'s
`pooled_prompt_embeds`). It is computed once and stored in a .safetensors file under "pooled_projections"
(`load_pooled`), so the CLIP encoders are never needed at run time.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from weights import CheckpointError, open_checkpoint, load_module, save_safetensors

__all__ = ["ConnectorConfig", "Connector", "load_pooled", "KEY_TABLE", "POOLED_KEY"]

POOLED_KEY = "pooled_projections"

# Checkpoint key -> module key. Our own files use the module names (fc1/fc2/pooled) and pass through unmatched.
KEY_TABLE = [
    (r"projector\.0\.(weight|bias)", r"fc1.\1"),  # UAE release, inside llm_model/
    (r"projector\.2\.(weight|bias)", r"fc2.\1"),
    (POOLED_KEY, "pooled"),
    (r"(?:model|visual|lm_head)\..*", None),  # the Qwen2.5-VL weights sharing the release's llm_model/ files
]


@dataclass(frozen=True)
class ConnectorConfig:
    in_dim: int = 2048  # Qwen2.5-VL-3B hidden size
    hidden_dim: int = 8192
    out_dim: int = 4096  # SD3 joint_attention_dim
    pooled_dim: int = 2048  # SD3 pooled_projection_dim (CLIP-L 768 + CLIP-G 1280)

    def __post_init__(self):
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ConnectorConfig.{name} must be a positive int, got {value!r}")

    @classmethod
    def preset(cls, name: str) -> "ConnectorConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown connector preset {name!r}; known: {sorted(PRESETS)}")
        return PRESETS[name]


PRESETS = {
    "uae": ConnectorConfig(in_dim=2048, hidden_dim=8192, out_dim=4096, pooled_dim=2048),
    "tiny": ConnectorConfig(in_dim=12, hidden_dim=37, out_dim=20, pooled_dim=10),
}


class Connector(nn.Module):
    def __init__(self, config: ConnectorConfig):
        super().__init__()
        self.config = config
        self.fc1 = nn.Linear(config.in_dim, config.hidden_dim)
        self.fc2 = nn.Linear(config.hidden_dim, config.out_dim)
        self.register_buffer("pooled", torch.zeros(config.pooled_dim))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, L, in_dim] -> [B, L, out_dim], token by token."""
        if hidden.ndim != 3 or hidden.shape[-1] != self.config.in_dim:
            raise ValueError(f"hidden must be [batch, tokens, {self.config.in_dim}], got {list(hidden.shape)}")
        return self.fc2(F.gelu(self.fc1(hidden)))

    def pooled_batch(self, batch_size: int) -> torch.Tensor:
        """The constant pooled vector repeated for a batch: [batch_size, pooled_dim] (the DiT's pooled_projections)."""
        return self.pooled.unsqueeze(0).expand(batch_size, -1)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, config: ConnectorConfig | str = "uae",
                        pooled: torch.Tensor | str | os.PathLike | None = None, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu") -> "Connector":
        """Load from our own file (`save`) or the UAE release's `llm_model/` folder (projector.* keys; its Qwen
        weights are skipped unread). The release holds no pooled vector: pass `pooled` (a tensor, or a .safetensors
        file read by `load_pooled`); a given `pooled` overrides one stored in the checkpoint."""
        if isinstance(config, str):
            config = ConnectorConfig.preset(config)
        source = open_checkpoint(path)
        if pooled is not None:
            if not isinstance(pooled, torch.Tensor):
                pooled = load_pooled(pooled, config.pooled_dim)
            elif tuple(pooled.shape) != (config.pooled_dim,):
                raise ValueError(f"pooled must have shape [{config.pooled_dim}], got {list(pooled.shape)}")
            source = _WithPooled(source, pooled)
        elif POOLED_KEY not in source and "pooled" not in source:
            raise CheckpointError(f"{path}: holds no pooled vector ({POOLED_KEY!r}); pass pooled= (see load_pooled)")
        with torch.device("meta"):
            model = cls(config)
        return load_module(model, source, table=KEY_TABLE, dtype=dtype, device=device)

    def save(self, file: str | os.PathLike) -> None:
        """Write fc1/fc2 and the pooled vector (as "pooled_projections", so `load_pooled` reads it) atomically."""
        tensors = {k: v for k, v in self.state_dict().items() if k != "pooled"}
        tensors[POOLED_KEY] = self.pooled
        save_safetensors(tensors, file)


class _WithPooled(Mapping):
    """A checkpoint seen with its pooled vector replaced by a given one; other tensors stay lazily read."""

    def __init__(self, ckpt: Mapping[str, torch.Tensor], pooled: torch.Tensor):
        self._ckpt, self._pooled = ckpt, pooled
        self._keys = [k for k in ckpt if k not in (POOLED_KEY, "pooled")] + ["pooled"]

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._pooled if key == "pooled" else self._ckpt[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def load_pooled(file: str | os.PathLike, dim: int = 2048, key: str = POOLED_KEY) -> torch.Tensor:
    """Read the constant pooled vector from a .safetensors file; [dim] or the pipeline's [1, dim] -> [dim]."""
    ckpt = open_checkpoint(file)
    if key not in ckpt:
        raise CheckpointError(f"{file}: no key {key!r} (has {sorted(ckpt)[:10]})")
    shape = ckpt.shape(key)
    if shape not in ((dim,), (1, dim)):
        raise CheckpointError(f"{file}: {key!r} has shape {list(shape)}, expected [{dim}] or [1, {dim}]")
    return ckpt[key].reshape(dim).clone()  # owned, not mapped to the file (see weights.py)
