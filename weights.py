"""Checkpoint reading and strict loading of official safetensors into models built on the meta device.

A checkpoint is one `.safetensors` file, a folder of `*.safetensors` files, or a sharded folder described by
`*.safetensors.index.json` (`{"weight_map": {key: shard_file}}`). Tensors are read lazily through safetensors'
mmap-backed `safe_open`, one at a time, so loading never holds a second full copy of the weights.

Loading is strict: `load_module` maps checkpoint keys to module keys with one explicit regex table per model and
raises `CheckpointError` naming the key and the file for every missing, unexpected or mis-shaped tensor, before any
weight is assigned.

    with torch.device("meta"):
        model = Model(config)
    load_module(model, "ckpt_dir", table=KEY_TABLE, dtype=torch.bfloat16, device="cuda")
"""
from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

__all__ = [
    "CheckpointError", "Checkpoint", "open_checkpoint", "load_state_dict", "rename_keys", "load_module",
    "save_safetensors",
]

# (regex fully matching a checkpoint key, replacement template or None to drop the key on purpose).
KeyTable = Sequence[tuple[str, str | None]]

_SAFETENSORS_DTYPES = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2",
                       "U16", "U32", "U64", "F8_E8M0", "F4"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked: unreadable file, bad index, missing/unexpected/mis-shaped key."""


def _read_header(file: Path) -> dict:
    """Parse and validate a safetensors header so that truncated or corrupt files fail here with the file's name
    rather than later inside safetensors or, worse, with garbage tensors."""
    size = file.stat().st_size
    if size < 8:
        raise CheckpointError(f"{file}: not a safetensors file ({size} bytes; a header needs at least 8)")
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n == 0 or 8 + n > size:
            raise CheckpointError(f"{file}: bad safetensors header length {n} for a file of {size} bytes "
                                  "(truncated or not a safetensors file)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: safetensors header is not a JSON object")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if (not isinstance(info, dict) or info.get("dtype") not in _SAFETENSORS_DTYPES
                or not isinstance(info.get("shape"), list) or not isinstance(info.get("data_offsets"), list)
                or len(info["data_offsets"]) != 2):
            raise CheckpointError(f"{file}: malformed header entry for key {key!r}: {info!r}")
        end = max(end, int(info["data_offsets"][1]))
    if 8 + n + end > size:
        raise CheckpointError(f"{file}: truncated: header describes {8 + n + end} bytes but the file has {size}")
    return header


class Checkpoint(Mapping):
    """Lazy read-only mapping key -> tensor over one or several safetensors files.

    `shape(key)` and `file_of(key)` answer from the headers without reading data; indexing reads one tensor.
    """

    def __init__(self, files: dict[str, Path]):
        self._file_of = files  # key -> file
        self._headers: dict[Path, dict] = {}
        self._handles: dict[Path, object] = {}
        for file in sorted(set(files.values())):
            self._headers[file] = _read_header(file)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Checkpoint":
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"{path}: no such file or folder")
        if path.is_file():
            if path.name.endswith(".index.json"):
                return cls._from_index(path)
            return cls._from_files([path])
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if len(indexes) > 1:
            raise CheckpointError(f"{path}: several index files ({', '.join(i.name for i in indexes)}); "
                                  "pass the one to use")
        if indexes:
            return cls._from_index(indexes[0])
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no *.safetensors or *.safetensors.index.json in this folder")
        return cls._from_files(files)

    @classmethod
    def _from_files(cls, files: list[Path]) -> "Checkpoint":
        key_file: dict[str, Path] = {}
        for file in files:
            for key in _read_header(file):
                if key == "__metadata__":
                    continue
                if key in key_file:
                    raise CheckpointError(f"key {key!r} appears in both {key_file[key]} and {file}")
                key_file[key] = file
        return cls(key_file)

    @classmethod
    def _from_index(cls, index: Path) -> "Checkpoint":
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: unreadable index file (needs a 'weight_map' object): {e!r}") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: 'weight_map' must be a non-empty object of key -> shard file")
        key_file = {}
        for key, shard in weight_map.items():
            file = index.parent / shard
            if not file.is_file():
                raise CheckpointError(f"{index}: shard {shard!r} (holding {key!r}) does not exist in {index.parent}")
            key_file[key] = file
        ckpt = cls(key_file)
        for file, header in ckpt._headers.items():
            for key in header:
                if key != "__metadata__" and key_file.get(key) != file:
                    raise CheckpointError(f"{file}: holds key {key!r} that {index.name} does not map to this shard")
        for key, file in key_file.items():
            if key not in ckpt._headers[file]:
                raise CheckpointError(f"{index}: maps {key!r} to {file.name}, which does not contain it")
        return ckpt

    def __getitem__(self, key: str) -> torch.Tensor:
        file = self.file_of(key)
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
        try:
            return handle.get_tensor(key)
        except Exception as e:  # safetensors raises its own error types; name the file and key
            raise CheckpointError(f"{file}: cannot read tensor {key!r}: {e}") from e

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)

    def file_of(self, key: str) -> Path:
        try:
            return self._file_of[key]
        except KeyError:
            raise KeyError(f"{key!r} is not in the checkpoint") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._headers[self.file_of(key)][key]["shape"])

    def subset(self, keep: Callable[[str], bool]) -> "Checkpoint":
        """A lazy view holding only the keys `keep` accepts (e.g. one model's part of a combined checkpoint)."""
        view = Checkpoint.__new__(Checkpoint)
        view._file_of = {k: f for k, f in self._file_of.items() if keep(k)}
        view._headers = self._headers
        view._handles = self._handles
        return view

    def metadata(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for header in self._headers.values():
            out.update(header.get("__metadata__") or {})
        return out


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a safetensors file, a folder of them, or a sharded folder / index file, lazily."""
    return Checkpoint.open(path)


def load_state_dict(path: str | os.PathLike, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read every tensor of a checkpoint file or folder; floating tensors are cast to `dtype` when given."""
    ckpt = open_checkpoint(path)
    return {k: _convert(ckpt[k], dtype, device) for k in ckpt}


def _convert(t: torch.Tensor, dtype: torch.dtype | None, device) -> torch.Tensor:
    if dtype is not None and t.is_floating_point():
        return t.to(device=device, dtype=dtype)
    return t.to(device=device)


def _source_name(source) -> Callable[[str], str]:
    if isinstance(source, Checkpoint):
        return lambda k: str(source.file_of(k))
    return lambda k: "<state dict>"


def rename_keys(keys: Sequence[str], table: KeyTable) -> dict[str, str]:
    """Map checkpoint keys through the table: the first regex that fully matches a key rewrites it (`re` template
    syntax); a replacement of None drops the key on purpose; keys no rule matches keep their name.
    Returns {module_key: checkpoint_key}; two checkpoint keys landing on one module key is an error."""
    compiled = [(re.compile(p), r) for p, r in table]
    out: dict[str, str] = {}
    for key in keys:
        new: str | None = key
        for pattern, repl in compiled:
            m = pattern.fullmatch(key)
            if m:
                new = None if repl is None else m.expand(repl)
                break
        if new is None:
            continue
        if new in out:
            raise CheckpointError(f"checkpoint keys {out[new]!r} and {key!r} both map to module key {new!r}")
        out[new] = key
    return out


def load_module(module: nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor], table: KeyTable = (),
                dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Strictly load `source` (path, Checkpoint or state dict) into `module`, typically built on the meta device.

    Every persistent parameter/buffer must come from exactly one checkpoint key after renaming; extra keys,
    missing keys and shape mismatches raise CheckpointError listing each offender with its file. Parameters tied
    in the module (the same Parameter under several names, e.g. `lm_head.weight` is `embed_tokens.weight`) need
    only one of their names in the checkpoint and stay tied after loading. Floating tensors are cast to `dtype`.
    Afterwards every submodule's `reset_non_persistent_buffers()` (if defined) is called to rebuild buffers that
    are not stored (RoPE tables), and a tensor still on the meta device is an error.
    """
    if not isinstance(source, Mapping):
        source = open_checkpoint(source)
    where = _source_name(source)
    mapping = rename_keys(list(source.keys()), table)

    expected = module.state_dict(keep_vars=True)
    # Group tied names: state_dict lists a shared Parameter under each of its names.
    alias_groups: dict[int, list[str]] = {}
    for name, t in expected.items():
        alias_groups.setdefault(id(t), []).append(name)

    errors: list[str] = []
    chosen: dict[str, str] = {}  # module key to read -> checkpoint key
    for names in alias_groups.values():
        present = [n for n in names if n in mapping]
        if not present:
            alias = f" (tied with {', '.join(names[1:])})" if len(names) > 1 else ""
            errors.append(f"missing key {names[0]!r}{alias}")
            continue
        chosen[present[0]] = mapping[present[0]]
        for extra in present[1:]:  # a tied weight stored twice must be the same tensor
            a, b = source[mapping[present[0]]], source[mapping[extra]]
            if a.shape != b.shape or not torch.equal(a, b):
                errors.append(f"tied keys {mapping[present[0]]!r} and {mapping[extra]!r} ({where(mapping[extra])}) "
                              "differ, but the module ties them")
    for mkey, ckey in mapping.items():
        if mkey not in expected:
            errors.append(f"unexpected key {ckey!r} in {where(ckey)}"
                          + (f" (renamed to {mkey!r})" if mkey != ckey else ""))
    for mkey, ckey in chosen.items():
        want = tuple(expected[mkey].shape)
        got = source.shape(ckey) if isinstance(source, Checkpoint) else tuple(source[ckey].shape)
        if got != want:
            errors.append(f"shape mismatch for {ckey!r} in {where(ckey)}: checkpoint {list(got)}, module {list(want)}"
                          " (does the config match the weights?)")
    if errors:
        head = f"cannot load {type(module).__name__}: {len(errors)} problem(s)"
        shown = errors[:50] + ([f"... and {len(errors) - 50} more"] if len(errors) > 50 else [])
        raise CheckpointError(head + "\n  " + "\n  ".join(shown))

    state: dict[str, torch.Tensor] = {}
    for names in alias_groups.values():
        mkey = next(n for n in names if n in chosen)
        t = source[chosen[mkey]]
        ref = expected[mkey]
        # Non-float tensors keep their own dtype; float buffers follow `dtype` like parameters do.
        t = _convert(t, dtype if dtype is not None else (ref.dtype if ref.is_floating_point() else None), device)
        for n in names:
            state[n] = t
    module.load_state_dict(state, strict=True, assign=True)
    _retie(module, alias_groups)
    for sub in module.modules():
        reset = getattr(sub, "reset_non_persistent_buffers", None)
        if callable(reset):
            reset()
    leftovers = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if leftovers:
        raise CheckpointError(f"{type(module).__name__}: tensors left on the meta device after loading "
                              f"(not stored and not rebuilt): {leftovers[:20]}")
    return module


def _retie(module: nn.Module, alias_groups: dict[int, list[str]]) -> None:
    """`load_state_dict(assign=True)` gives each name its own Parameter; point the aliases back at one."""
    for names in alias_groups.values():
        if len(names) < 2:
            continue
        owner, attr = _resolve(module, names[0])
        param = getattr(owner, attr)
        for n in names[1:]:
            o, a = _resolve(module, n)
            setattr(o, a, param)


def _resolve(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    *path, attr = name.split(".")
    for p in path:
        module = getattr(module, p)
    return module, attr


def save_safetensors(tensors: Mapping[str, torch.Tensor], file: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """Write tensors atomically (temp file + rename): a crash never leaves a half-written file under `file`."""
    from safetensors.torch import save_file

    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.tmp.{os.getpid()}")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, file)
    finally:
        if tmp.exists():
            tmp.unlink()
