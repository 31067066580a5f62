"""Checkpoint reading and strict loading of official safetensors into models built on the meta device.

A checkpoint is one `.safetensors` file, a folder of `*.safetensors` files, or a sharded folder described by
`*.safetensors.index.json` (`{"weight_map": {key: shard_file}}`). Headers are validated when a checkpoint is
opened, so a truncated or edited file fails there with its name; every later read error also names file and key.

Tensors are read one at a time through safetensors' `safe_open`, which maps the file into memory. `load_module` and
`load_state_dict` copy each tensor into memory of its own (once: a dtype or device conversion is that copy), so
loading never holds a second full copy of the weights, and the loaded weights neither change nor crash the process
(SIGBUS) when the file is later overwritten or truncated; fresh allocations are also aligned, so a model computes
the same bits whether it came from one file or from shards. `mmap=True` skips the copy and keeps tensors backed by
the file: less memory and a faster load for read-only inference from a file nothing rewrites meanwhile.
`Checkpoint[key]` always returns such a file-backed tensor.

Loading is strict: `load_module` maps checkpoint keys to module keys with one explicit regex table per model and
raises `CheckpointError` naming the key and the file for every missing, unexpected or mis-shaped tensor, before any
weight is assigned.

    with torch.device("meta"):
        model = Model(config)
    load_module(model, "ckpt_dir", table=KEY_TABLE, dtype=torch.bfloat16, device="cuda")
"""
from __future__ import annotations

import json
import math
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
    "save_safetensors", "read_json",
]

# (regex fully matching a checkpoint key, replacement template or None to drop the key on purpose).
KeyTable = Sequence[tuple[str, str | None]]

# The command-line names of the weight dtypes every script and tool takes (--dtype).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Bits per element of each safetensors dtype (F4 packs two values in a byte).
_DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8,
               "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8, "U16": 16, "U32": 32, "U64": 64, "F8_E8M0": 8, "F4": 4}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked: unreadable file, bad index, missing/unexpected/mis-shaped key."""


def read_json(file: str | os.PathLike) -> dict:
    """Read a JSON config or index file that must hold an object. Invalid JSON (with the error's position) and a
    top level that is not an object raise CheckpointError naming the file; a missing file raises OSError as usual."""
    file = Path(file)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


def _read_header(file: Path) -> dict:
    """Parse and validate a safetensors header as safetensors itself would, so that truncated or edited files fail
    here with the file's name rather than later inside safetensors or, worse, with garbage tensors."""
    try:
        with open(file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise CheckpointError(f"{file}: not a safetensors file ({size} bytes; a header needs at least 8)")
            (n,) = struct.unpack("<Q", f.read(8))
            if n == 0 or 8 + n > size:
                raise CheckpointError(f"{file}: bad safetensors header length {n} for a file of {size} bytes "
                                      "(truncated or not a safetensors file)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read ({e})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: safetensors header is not a JSON object")
    metadata = header.get("__metadata__")
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{file}: '__metadata__' must be an object of string values, got {metadata!r}")
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict) or not _naturals(info.get("shape")) or not _naturals(info.get("data_offsets"), 2):
            raise CheckpointError(f"{file}: malformed header entry for key {key!r} (needs dtype, shape and "
                                  f"data_offsets [begin, end] of non-negative integers): {info!r}")
        if info.get("dtype") not in _DTYPE_BITS:
            raise CheckpointError(f"{file}: key {key!r} has unknown dtype {info.get('dtype')!r} "
                                  f"(known: {', '.join(_DTYPE_BITS)})")
        begin, end = info["data_offsets"]
        bits = math.prod(info["shape"]) * _DTYPE_BITS[info["dtype"]]
        if end < begin or (end - begin) * 8 != bits:
            raise CheckpointError(f"{file}: key {key!r} has data_offsets [{begin}, {end}] ({end - begin} bytes), but "
                                  f"{info['dtype']} of shape {info['shape']} takes {bits / 8:g} bytes")
        spans.append((begin, end, key))
    # safetensors requires the tensors to tile the data section: in offset order each one starts where the previous
    # one ends, the first at 0, and the last ends at the end of the file.
    at, previous = 0, None
    for begin, end, key in sorted(spans):
        if begin < at:
            raise CheckpointError(f"{file}: key {key!r} (data_offsets [{begin}, {end}]) overlaps {previous!r}, "
                                  f"which ends at {at}")
        if begin > at:
            raise CheckpointError(f"{file}: {begin - at} bytes before key {key!r} (data_offsets [{begin}, {end}]) "
                                  "belong to no tensor")
        at, previous = end, key
    if 8 + n + at > size:
        raise CheckpointError(f"{file}: truncated: header describes {8 + n + at} bytes but the file has {size}")
    if 8 + n + at < size:
        raise CheckpointError(f"{file}: {size - 8 - n - at} bytes after the last tensor belong to no tensor "
                              f"(header describes {8 + n + at} bytes, the file has {size})")
    return header


def _naturals(value, length: int | None = None) -> bool:
    """A JSON list of non-negative integers (of `length` items when given); JSON true/false do not count."""
    return (isinstance(value, list) and (length is None or len(value) == length)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value))


class Checkpoint(Mapping):
    """Lazy read-only mapping key -> tensor over one or several safetensors files.

    `shape(key)` and `file_of(key)` answer from the headers without reading data; indexing reads one tensor, backed
    by the file's memory mapping (see the module docstring): copy it to keep it past a rewrite of the file.
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
            weight_map = read_json(index).get("weight_map")
        except OSError as e:
            raise CheckpointError(f"{index}: cannot read the index file ({e})") from None
        if (not isinstance(weight_map, dict) or not weight_map
                or not all(isinstance(shard, str) for shard in weight_map.values())):
            raise CheckpointError(f"{index}: unreadable index file: needs a non-empty 'weight_map' object of "
                                  f"key -> shard file name, got {weight_map!r:.200}")
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
        try:
            handle = self._handles.get(file)
            if handle is None:
                handle = self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
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


def load_state_dict(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    mmap: bool = False) -> dict[str, torch.Tensor]:
    """Read every tensor of a checkpoint file or folder into memory of its own (file-backed with `mmap=True`, see
    the module docstring); floating tensors are cast to `dtype` when given."""
    ckpt = open_checkpoint(path)
    return {k: _convert(ckpt[k], dtype, device, own=not mmap) for k in ckpt}


def _convert(t: torch.Tensor, dtype: torch.dtype | None, device, own: bool) -> torch.Tensor:
    """Cast/move `t`; with `own`, the result never shares memory with `t`, which may be backed by a checkpoint file.
    `Tensor.to` returns `t` itself when it has nothing to do, and a copy otherwise: clone only in the first case."""
    out = t.to(device=device, dtype=dtype) if dtype is not None and t.is_floating_point() else t.to(device=device)
    return out.clone() if own and out is t else out


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
                dtype: torch.dtype | None = None, device: str | torch.device = "cpu", mmap: bool = False) -> nn.Module:
    """Strictly load `source` (path, Checkpoint or state dict) into `module`, typically built on the meta device.

    Every persistent parameter/buffer must come from exactly one checkpoint key after renaming; extra keys,
    missing keys and shape mismatches raise CheckpointError listing each offender with its file. Parameters tied
    in the module (the same Parameter under several names, e.g. `lm_head.weight` is `embed_tokens.weight`) need
    only one of their names in the checkpoint and stay tied after loading. Floating tensors are cast to `dtype`.
    Afterwards every submodule's `reset_non_persistent_buffers()` (if defined) is called to rebuild buffers that
    are not stored (RoPE tables), and a tensor still on the meta device is an error.

    Tensors read from a file (a path, a Checkpoint, or a lazy Mapping over one such as a renaming view) are copied
    into memory the module owns unless `mmap=True` (see the module docstring). A plain dict holds tensors the caller
    already has in memory: they are assigned as they are (cast or moved when asked), so loading it copies nothing.
    """
    own = not mmap and not isinstance(source, dict)
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
        t = _convert(t, dtype if dtype is not None else (ref.dtype if ref.is_floating_point() else None), device, own)
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
