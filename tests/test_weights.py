"""weights.py: reading single files, folders and sharded folders; strict loading; bad files; loaded weights that
own their memory; JSON configs that name their file when broken."""
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file
from torch import nn

from model.clip import CLIP, CLIPTextEncoder, CLIPTokenizer
from model.dino import DINOv2, DINOv3
from model.mmdit import MMDiT, MMDiTConfig
from model.qwen2_5_vl import Qwen25VL
from model.qwen2_5_vl_processor import Qwen25VLProcessor
from model.vae import VAE
from weights import CheckpointError, load_module, load_state_dict, open_checkpoint, read_json, save_safetensors

ROOT = Path(__file__).resolve().parents[1]


class TinyLM(nn.Module):
    def __init__(self, tie: bool = True):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 11, bias=False)
        if tie:
            self.head.weight = self.embed.weight
        self.register_buffer("inv_freq", torch.empty(3), persistent=False)

    def reset_non_persistent_buffers(self):
        self.inv_freq = 1.0 / (10000 ** (torch.arange(3, device=self.embed.weight.device) / 3))


def _tensors(prefix="model."):
    g = torch.Generator().manual_seed(0)
    return {f"{prefix}embed.weight": torch.randn(11, 6, generator=g),
            f"{prefix}norm.weight": torch.randn(6, generator=g),
            f"{prefix}norm.bias": torch.randn(6, generator=g)}


TABLE = [(r"model\.(.*)", r"\1")]


def _meta(tie=True):
    with torch.device("meta"):
        return TinyLM(tie)


def test_single_file_folder_and_shards_read_the_same(tmp_path):
    t = _tensors()
    save_file(t, tmp_path / "one.safetensors")
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    keys = sorted(t)
    save_file({k: t[k] for k in keys[:1]}, shard_dir / "model-00001-of-00002.safetensors")
    save_file({k: t[k] for k in keys[1:]}, shard_dir / "model-00002-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {k: f"model-0000{1 if i < 1 else 2}-of-00002.safetensors"
                                            for i, k in enumerate(keys)}}
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    for src in (tmp_path / "one.safetensors", shard_dir, shard_dir / "model.safetensors.index.json"):
        sd = load_state_dict(src)
        assert sorted(sd) == keys
        for k in keys:
            assert torch.equal(sd[k], t[k])
    ckpt = open_checkpoint(shard_dir)
    assert ckpt.shape(keys[0]) == tuple(t[keys[0]].shape)
    assert ckpt.file_of(keys[1]).name == "model-00002-of-00002.safetensors"


def test_load_module_tied_dtype_and_buffers(tmp_path):
    t = _tensors()
    save_file(t, tmp_path / "m.safetensors")
    m = load_module(_meta(), tmp_path, table=TABLE, dtype=torch.bfloat16)
    assert m.head.weight is m.embed.weight, "tie must survive assign-loading"
    assert m.embed.weight.dtype == torch.bfloat16
    assert torch.equal(m.norm.bias, t["model.norm.bias"].bfloat16())
    assert not m.inv_freq.is_meta and torch.allclose(m.inv_freq[0], torch.tensor(1.0))
    # Both tied names present and equal: accepted.
    t2 = dict(t, **{"model.head.weight": t["model.embed.weight"].clone()})
    save_file(t2, tmp_path / "both.safetensors")
    load_module(_meta(), tmp_path / "both.safetensors", table=TABLE)
    # Untied model needs the head.
    with pytest.raises(CheckpointError, match="missing key 'head.weight'"):
        load_module(_meta(tie=False), tmp_path / "m.safetensors", table=TABLE)


def test_strict_errors_name_key_and_file(tmp_path):
    t = _tensors()
    del t["model.norm.bias"]
    t["model.extra.weight"] = torch.zeros(2)
    t["model.embed.weight"] = torch.zeros(12, 6)
    save_file(t, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_module(_meta(), tmp_path / "bad.safetensors", table=TABLE)
    msg = str(e.value)
    assert "missing key 'norm.bias'" in msg
    assert "unexpected key 'model.extra.weight'" in msg and "bad.safetensors" in msg
    assert "shape mismatch for 'model.embed.weight'" in msg and "[12, 6]" in msg
    # Tied names stored with different values are refused.
    t = _tensors()
    t["model.head.weight"] = torch.zeros(11, 6)
    save_file(t, tmp_path / "untied.safetensors")
    with pytest.raises(CheckpointError, match="differ"):
        load_module(_meta(), tmp_path / "untied.safetensors", table=TABLE)


def test_bad_files(tmp_path):
    save_file(_tensors(), tmp_path / "good.safetensors")
    raw = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(raw[:-7])
    with pytest.raises(CheckpointError, match="trunc.safetensors: truncated"):
        open_checkpoint(tmp_path / "trunc.safetensors")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.safetensors: not a safetensors file"):
        open_checkpoint(tmp_path / "empty.safetensors")
    (tmp_path / "hdr.safetensors").write_bytes(struct.pack("<Q", 5) + b"{nope" + b"\0" * 8)
    with pytest.raises(CheckpointError, match="hdr.safetensors: safetensors header is not valid JSON"):
        open_checkpoint(tmp_path / "hdr.safetensors")
    (tmp_path / "huge.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(CheckpointError, match="bad safetensors header length"):
        open_checkpoint(tmp_path / "huge.safetensors")
    d = tmp_path / "idx"
    d.mkdir()
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match="shard 'gone.safetensors'"):
        open_checkpoint(d)
    (d / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="unreadable index"):
        open_checkpoint(d)
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(tmp_path / "missing")
    e = tmp_path / "emptydir"
    e.mkdir()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        open_checkpoint(e)


def test_index_must_match_shards(tmp_path):
    t = _tensors()
    save_file(t, tmp_path / "a.safetensors")
    wm = {k: "a.safetensors" for k in t}
    wm["model.ghost"] = "a.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(CheckpointError, match="does not contain it"):
        open_checkpoint(tmp_path)


def test_save_safetensors_is_atomic(tmp_path, monkeypatch):
    f = tmp_path / "out" / "w.safetensors"
    save_safetensors({"x": torch.arange(4.0)}, f)
    assert torch.equal(load_state_dict(f)["x"], torch.arange(4.0))

    import safetensors.torch as st

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(OSError):
        save_safetensors({"x": torch.zeros(4)}, f)
    assert torch.equal(load_state_dict(f)["x"], torch.arange(4.0)), "a failed save must leave the old file intact"
    assert sorted(p.name for p in f.parent.iterdir()) == ["w.safetensors"]


def test_subset_view_loads_one_part(tmp_path):
    t = _tensors()
    t["projector.0.weight"] = torch.zeros(3, 3)
    save_file(t, tmp_path / "combined.safetensors")
    ckpt = open_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="unexpected key 'projector.0.weight'"):
        load_module(_meta(), ckpt, table=TABLE)
    part = ckpt.subset(lambda k: not k.startswith("projector."))
    assert len(part) == 3 and "projector.0.weight" not in part
    m = load_module(_meta(), part, table=TABLE)
    assert torch.equal(m.norm.weight, t["model.norm.weight"])


# ------------------------------------------------------------------------------------------ edited headers

def _header(file: Path) -> tuple[int, dict]:
    """(where the data section starts, the parsed header) of a safetensors file."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return 8 + n, json.loads(raw[8:8 + n])


def _edit_header(file: Path, edit, extra: bytes = b"") -> None:
    """Rewrite `file`'s header as `edit(header)` returns it (valid JSON, any content), keeping the data bytes and
    appending `extra` -- what a hand-edited or badly converted file looks like."""
    start, header = _header(file)
    text = json.dumps(edit(header)).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + file.read_bytes()[start:] + extra)


def _set(key, field, value):
    """An edit replacing header[key][field] by value(old entry)."""
    def edit(h):
        h[key][field] = value(h[key])
        return h
    return edit


def _last(h):
    """The tensor stored last in the data section."""
    return max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])


def _shift_last(delta):
    def edit(h):
        k = _last(h)
        h[k]["data_offsets"] = [o + delta for o in h[k]["data_offsets"]]
        return h
    return edit


@pytest.mark.parametrize("edit,extra,match", [
    (_shift_last(-4), b"", r"key 'model\.norm\.weight' \(data_offsets \[284, 308\]\) overlaps 'model\.norm\.bias'"),
    (_shift_last(4), b"\0" * 4, r"4 bytes before key 'model\.norm\.weight' .* belong to no tensor"),
    (lambda h: h, b"\0" * 3, "3 bytes after the last tensor belong to no tensor"),
    (_set("model.norm.bias", "shape", lambda e: [5]), b"", r"\(24 bytes\), but F32 of shape \[5\] takes 20 bytes"),
    (_set("model.embed.weight", "dtype", lambda e: "F16"), b"", r"F16 of shape \[11, 6\] takes 132 bytes"),
    (_set("model.norm.bias", "dtype", lambda e: "F12"), b"", "key 'model.norm.bias' has unknown dtype 'F12'"),
    (_set("model.norm.bias", "data_offsets", lambda e: e["data_offsets"][::-1]), b"",
     r"data_offsets \[288, 264\] \(-24 bytes\)"),
    (_set("model.norm.bias", "data_offsets", lambda e: [e["data_offsets"][0], str(e["data_offsets"][1])]), b"",
     "malformed header entry for key 'model.norm.bias'"),
    (lambda h: dict(h, __metadata__={"format": 1}), b"", "'__metadata__' must be an object of string values"),
], ids=["overlap", "gap", "trailing-bytes", "shape", "dtype-size", "unknown-dtype", "reversed", "string-offset",
        "metadata"])
def test_edited_header_fails_at_open_naming_the_file(tmp_path, edit, extra, match):
    file = tmp_path / "edited.safetensors"
    save_file(_tensors(), file)
    _edit_header(file, lambda h: h)
    assert torch.equal(load_state_dict(file)["model.norm.bias"], _tensors()["model.norm.bias"]), "helper round trip"
    _edit_header(file, edit, extra)
    # Fails when opened, before any tensor is read, with the file named: safetensors would only fail at the first
    # read, with an error that names neither file nor key.
    with pytest.raises(CheckpointError, match=re.escape(str(file)) + ": .*" + match):
        open_checkpoint(file)
    with pytest.raises(CheckpointError, match=re.escape(str(file))):
        load_module(_meta(), file, table=TABLE)


def test_read_errors_name_file_and_key(tmp_path):
    file = tmp_path / "m.safetensors"
    save_file(_tensors(), file)
    ckpt = open_checkpoint(file)
    file.write_bytes(b"\0" * file.stat().st_size)  # replaced after its header was checked
    with pytest.raises(CheckpointError, match=re.escape(str(file)) + ": cannot read tensor 'model.norm.bias'"):
        ckpt["model.norm.bias"]


# ---------------------------------------------------------------------------------------- memory ownership

def _other_tensors():
    return {k: v + 1 for k, v in _tensors().items()}


def test_loaded_weights_survive_overwriting_the_file(tmp_path):
    file = tmp_path / "m.safetensors"
    save_file(_tensors(), file)
    m = load_module(_meta(), file, table=TABLE)
    sd = load_state_dict(file)
    file.write_bytes(save(_other_tensors()))  # in place: same inode, same layout, other values
    assert load_state_dict(file)["model.norm.bias"].equal(_other_tensors()["model.norm.bias"])
    for k, v in _tensors().items():
        assert torch.equal(m.state_dict()[k.removeprefix("model.")], v), f"{k} changed with the file"
        assert torch.equal(sd[k], v), f"{k} changed with the file"


TRUNCATE = """
import sys
import torch
from torch import nn
from weights import load_module
with torch.device("meta"):
    m = nn.Linear(300, 7)
load_module(m, sys.argv[1])
want = m.weight.detach().clone()
open(sys.argv[1], "wb").close()  # truncate in place
print(torch.equal(m.weight, want))
"""


def test_loaded_weights_survive_truncating_the_file(tmp_path):
    # A mapped page past the end of a truncated file is SIGBUS: run in a child so that kills it, not pytest.
    file = tmp_path / "m.safetensors"
    save_file({"weight": torch.randn(7, 300), "bias": torch.randn(7)}, file)
    child = subprocess.run([sys.executable, "-c", TRUNCATE, str(file)], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
    assert (child.returncode, child.stdout.strip()) == (0, "True"), f"exit {child.returncode}: {child.stderr[-2000:]}"


def test_sharded_and_single_file_copies_compute_the_same_bits(tmp_path):
    # Odd widths put tensors at offsets that are not multiples of 16 bytes in the file; a mapped weight there sends
    # MKL's matrix-vector product (batch 1) down another SIMD path, which rounds differently.
    cfg = MMDiTConfig(sample_size=8, patch_size=1, in_channels=3, out_channels=3, num_layers=2, attention_head_dim=4,
                      num_attention_heads=3, joint_attention_dim=7, caption_projection_dim=12,
                      pooled_projection_dim=9, pos_embed_max_size=6)
    torch.manual_seed(0)
    state = MMDiT(cfg).state_dict()
    save_safetensors(state, tmp_path / "one" / "model.safetensors")
    keys = list(state)
    weight_map = {k: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, k in enumerate(keys)}
    for shard in sorted(set(weight_map.values())):
        save_safetensors({k: state[k] for k in keys if weight_map[k] == shard}, tmp_path / "shards" / shard)
    (tmp_path / "shards" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    start, header = _header(tmp_path / "one" / "model.safetensors")
    assert any((start + e["data_offsets"][0]) % 16 for k, e in header.items() if k != "__metadata__")

    one = MMDiT.from_pretrained(tmp_path / "one", config=cfg)
    shards = MMDiT.from_pretrained(tmp_path / "shards", config=cfg)
    for name, t in list(one.state_dict().items()) + list(shards.state_dict().items()):
        assert t.data_ptr() % 64 == 0, f"{name} is not in a fresh aligned allocation"
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(1, 3, 6, 6, generator=g), 500.0, torch.randn(1, 5, 7, generator=g),
            torch.randn(1, 9, generator=g))
    with torch.no_grad():
        assert torch.equal(one(*args), shards(*args))


def test_mmap_opt_in_keeps_the_file_mapping(tmp_path):
    file = tmp_path / "m.safetensors"
    save_file(_tensors(), file)
    ckpt = open_checkpoint(file)
    mapped = load_module(_meta(), ckpt, table=TABLE, mmap=True)
    owned = load_module(_meta(), ckpt, table=TABLE)
    # The same handle maps the file once, so a mapped parameter sits where the checkpoint's tensor does.
    assert mapped.norm.bias.data_ptr() == ckpt["model.norm.bias"].data_ptr()
    assert owned.norm.bias.data_ptr() != ckpt["model.norm.bias"].data_ptr()
    assert torch.equal(mapped.norm.bias, owned.norm.bias)
    assert load_state_dict(file, mmap=True)["model.norm.bias"].equal(owned.norm.bias)


def test_one_copy_per_tensor(tmp_path, monkeypatch):
    save_file(_tensors(), tmp_path / "m.safetensors")
    clones = []
    clone = torch.Tensor.clone
    monkeypatch.setattr(torch.Tensor, "clone", lambda t, *a, **k: clones.append(t.shape) or clone(t, *a, **k))
    load_module(_meta(), tmp_path, table=TABLE)
    assert len(clones) == 3, "each stored tensor is copied once (the tied embedding once for both names)"
    clones.clear()
    # A cast is already a copy: cloning the mapped tensor first would copy it twice.
    m = load_module(_meta(), tmp_path, table=TABLE, dtype=torch.float16)
    assert clones == [] and m.norm.bias.dtype == torch.float16


def test_dict_source_is_assigned_without_a_copy():
    # A state dict already in memory is the caller's: copying it would hold two full copies of the weights.
    state = {k: v.clone() for k, v in _tensors().items()}
    m = load_module(_meta(), state, table=TABLE)
    assert m.norm.bias.data_ptr() == state["model.norm.bias"].data_ptr()


# ----------------------------------------------------------------------------------------------- JSON configs

def _tiny_qwen_tokenizer(folder: Path) -> None:
    from tests.tiny_qwen_tokenizer import build_tiny_qwen_tokenizer_dir
    build_tiny_qwen_tokenizer_dir(folder)


# (loader, the JSON file it reads, what the folder needs before that file is read)
CONFIG_READERS = {
    "vae": (VAE.from_pretrained, "config.json", None),
    "mmdit": (MMDiT.from_pretrained, "config.json", None),
    "clip": (CLIP.from_pretrained, "config.json", None),
    "clip-text": (CLIPTextEncoder.from_pretrained, "config.json", None),
    "clip-tokenizer": (CLIPTokenizer.from_pretrained, "tokenizer_config.json",
                       lambda folder: (folder / "tokenizer.json").write_text("{}")),
    "dinov2": (DINOv2.from_pretrained, "config.json", None),
    "dinov3": (DINOv3.from_pretrained, "config.json", None),
    "qwen2.5-vl": (Qwen25VL.from_pretrained, "config.json", None),
    "qwen2.5-vl-processor": (Qwen25VLProcessor.from_pretrained, "tokenizer_config.json", _tiny_qwen_tokenizer),
}


@pytest.mark.parametrize("text,match", [("{not json", r"not valid JSON \(.*line 1 column 2"),
                                        ("[1, 2]", "expected a JSON object at the top level, got list")],
                         ids=["syntax", "list"])
@pytest.mark.parametrize("reader", list(CONFIG_READERS))
def test_bad_config_json_names_the_file(tmp_path, reader, text, match):
    load, name, prepare = CONFIG_READERS[reader]
    if prepare is not None:
        prepare(tmp_path)
    (tmp_path / name).write_text(text)
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / name)) + ": " + match):
        load(tmp_path)


def test_read_json(tmp_path):
    (tmp_path / "c.json").write_text('{"a": 1}')
    assert read_json(tmp_path / "c.json") == {"a": 1}
    (tmp_path / "c.json").write_bytes(b'{"a": "\xff"}')
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "c.json")) + ": not valid JSON .*position 7"):
        read_json(tmp_path / "c.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_json(tmp_path / "missing.json")
