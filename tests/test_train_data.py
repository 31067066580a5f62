"""train/data.py: procedural scenes, folder/JSONL datasets, the resumable sampler."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from train.data import (ImageCaptionDataset, ProceduralDataset, ResumableSampler, SamplerState, pil_to_tensor,
                        procedural_scene, tensor_to_pil)


def test_procedural_scene_is_deterministic_and_varied():
    a, ca = procedural_scene(5, size=48, seed=1)
    b, cb = procedural_scene(5, size=48, seed=1)
    assert ca == cb and a.tobytes() == b.tobytes() and a.size == (48, 48)
    captions = {procedural_scene(i, seed=1)[1] for i in range(20)}
    assert len(captions) > 10


def test_folder_and_jsonl_datasets(tmp_path, capsys):
    for i in range(3):
        Image.new("RGB", (8 + i, 9), (i * 50, 0, 0)).save(tmp_path / f"im{i}.png")
        (tmp_path / f"im{i}.txt").write_text(f"caption {i}\n")
    (tmp_path / "im1.png").write_bytes(b"not a png")
    ds = ImageCaptionDataset(tmp_path)
    assert len(ds) == 3 and ds[0][1] == "caption 0"
    assert ds[1] is None and "skipping undecodable image" in capsys.readouterr().err
    sampler = ResumableSampler(ds, seed=0)
    batch = sampler.next_batch(4)
    assert len(batch) == 4 and all(item is not None for item in batch)

    jl = tmp_path / "data.jsonl"
    jl.write_text("\n".join(json.dumps({"image": f"im{i}.png", "caption": f"c{i}"}) for i in (0, 2)) + "\n")
    ds = ImageCaptionDataset(jl)
    assert [ds[i][1] for i in range(2)] == ["c0", "c2"]
    jl.write_text('{"caption": "no image"}\n')
    with pytest.raises(ValueError, match="data.jsonl:1"):
        ImageCaptionDataset(jl)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty"):
        ImageCaptionDataset(empty)
    (tmp_path / "im0.txt").unlink()
    with pytest.raises(ValueError, match="no caption"):
        ImageCaptionDataset(tmp_path)
    assert len(ImageCaptionDataset(tmp_path, need_caption=False)) == 3


def test_sampler_resumes_exactly_and_crosses_epochs():
    ds = ProceduralDataset(7, size=16)
    full = ResumableSampler(ds, seed=3)
    expected = [c for _ in range(4) for _, c in full.next_batch(3)]
    first = ResumableSampler(ds, seed=3)
    got = [c for _ in range(2) for _, c in first.next_batch(3)]
    resumed = ResumableSampler(ds, seed=3, state=SamplerState(**vars(first.state)))
    got += [c for _ in range(2) for _, c in resumed.next_batch(3)]
    assert got == expected
    assert resumed.state.epoch == 1
    # Each epoch visits every item once.
    s = ResumableSampler(ds, seed=9)
    assert sorted(c for _, c in s.next_batch(7)) == sorted(ds[i][1] for i in range(7))


def test_image_tensor_round_trip():
    img = Image.new("RGB", (30, 20), (255, 0, 128))
    t = pil_to_tensor([img], 16)
    assert t.shape == (1, 3, 16, 16)
    assert torch.allclose(t[0, :, 5, 5], torch.tensor([1.0, -1.0, 128 / 127.5 - 1]), atol=1e-6)
    back = tensor_to_pil(t)[0]
    assert back.getpixel((5, 5)) == (255, 0, 128)


def test_16_bit_and_transparent_images_load_as_8_bit_rgb(tmp_path):
    """A 16-bit PNG reads as its 8-bit levels (PIL alone clips it to white), transparency lands on white."""
    deep = np.random.default_rng(0).integers(0, 65536, (20, 30), dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    Image.new("RGBA", (30, 20), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    ds = ImageCaptionDataset(tmp_path, need_caption=False)
    assert ds[0][0].getpixel((3, 3)) == (255, 255, 255)  # clear.png
    image, _ = ds[1]
    assert np.array_equal(np.asarray(image)[..., 1], np.rint(deep / 257).astype(np.uint8))
    t = pil_to_tensor([Image.fromarray(deep)], 20)
    assert torch.equal(t, pil_to_tensor([image], 20))
