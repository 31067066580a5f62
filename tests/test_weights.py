"""weights.py: reading single files, folders and sharded folders; strict loading; bad files."""
import json
import struct

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from weights import CheckpointError, load_module, load_state_dict, open_checkpoint, save_safetensors


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
