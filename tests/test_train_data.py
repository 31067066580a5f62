"""train/data.py: procedural scenes, folder/JSONL datasets, the resumable sampler."""
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from train.data import (BatchLoader, BucketLoader, BucketSampler, ImageCaptionDataset, ImageTensors, ProceduralDataset,
                        ResumableSampler, SamplerState, assign_buckets, auto_buckets, nearest_bucket, parse_buckets,
                        pil_to_tensor, procedural_scene, tensor_to_pil)


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


def _tar(path, members):
    """A tar file of (name, bytes) members."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _png(color, size=(12, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_tar_shards_are_indexed_and_damage_is_skipped_and_named(tmp_path, capsys):
    _tar(tmp_path / "a-000.tar", [("x/k1.png", _png((10, 0, 0))), ("x/k1.txt", b"one\n"),
                                   ("k2.jpg.txt", b"ignored: no image"), ("k3.png", _png((30, 0, 0))),
                                   ("k3.txt", b"three")])
    _tar(tmp_path / "a-001.tar", [("k4.png", b"not an image"), ("k4.txt", b"four"), ("k5.png", _png((50, 0, 0))),
                                   ("k5.txt", b"five"), ("k6.png", _png((60, 0, 0))), ("k6.txt", b"six")])
    data = (tmp_path / "a-001.tar").read_bytes()
    (tmp_path / "a-001.tar").write_bytes(data[:data.index(b"six") + 1])  # k6.txt cut short: a truncated tar
    (tmp_path / "a-002.tar").write_bytes(b"\x07" * 3000)  # not a tar at all
    _tar(tmp_path / "a-003.tar", [("k7.png", _png((70, 0, 0))), ("k7.txt", b"seven"), ("k8.png", _png((80, 0, 0))),
                                   ("k8.txt", b"eight")])
    data = bytearray((tmp_path / "a-003.tar").read_bytes())
    second = data.index(b"k7.txt")
    data[second:second + 512] = b"\x05" * 512  # a bad header in the middle: what is behind it is lost
    (tmp_path / "a-003.tar").write_bytes(bytes(data))

    ds = ImageCaptionDataset(tmp_path, need_caption=False)
    err = capsys.readouterr().err
    assert "a-001.tar:k6.txt: truncated member" in err and "a-002.tar: unreadable" in err
    assert "a-003.tar: unreadable header" in err and len(ds.damaged) == 3
    names = [ds.name(i) for i in range(len(ds))]
    assert names == ["a-000.tar:x/k1", "a-000.tar:k3", "a-001.tar:k4", "a-001.tar:k5", "a-001.tar:k6",
                     "a-003.tar:k7"]
    assert ds[0][1] == "one" and ds[0][0].getpixel((0, 0)) == (10, 0, 0) and ds[1][1] == "three"
    assert ds[4][1] is None and ds[5][1] is None  # captions lost with the damage
    assert ds[2] is None and "skipping undecodable image a-001.tar:k4" in capsys.readouterr().err
    assert ImageCaptionDataset(tmp_path, need_caption=False).fingerprint() == ds.fingerprint()
    with pytest.raises(ValueError, match="no caption.*a-001.tar:k6"):
        ImageCaptionDataset(tmp_path)

    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.tar").write_bytes(b"\x07" * 3000)
    with pytest.raises(ValueError, match="is empty.*x.tar"):
        ImageCaptionDataset(only_bad)


def test_folder_of_jsonl_manifests(tmp_path):
    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / f"im{i}.png")
    shards = tmp_path / "manifests"
    shards.mkdir()
    (shards / "b.jsonl").write_text(json.dumps({"image": "../im2.png", "caption": "c2"}) + "\n")
    (shards / "a.jsonl").write_text("".join(json.dumps({"image": f"../im{i}.png", "caption": f"c{i}"}) + "\n"
                                            for i in (0, 1)))
    ds = ImageCaptionDataset(shards)
    assert [ds[i][1] for i in range(3)] == ["c0", "c1", "c2"] and ds[2][0].getpixel((0, 0)) == (2, 0, 0)
    _tar(shards / "x.tar", [])
    with pytest.raises(ValueError, match="both tar shards and JSONL"):
        ImageCaptionDataset(shards)


def _folder_with_bad_images(tmp_path, n=11, bad=(3, 7)):
    for i in range(n):
        Image.new("RGB", (20 + i, 18), (i * 20, 0, 0)).save(tmp_path / f"im{i:02d}.png")
        (tmp_path / f"im{i:02d}.txt").write_text(f"caption {i}")
    for i in bad:
        (tmp_path / f"im{i:02d}.png").write_bytes(b"bad")
    return ImageCaptionDataset(tmp_path)


def test_batch_loader_equals_the_sampler_with_any_workers_and_resumes(tmp_path, capsys):
    ds = _folder_with_bad_images(tmp_path)
    reference = ResumableSampler(ds, seed=1)
    expected = [pil_to_tensor([im for im, _ in reference.next_batch(4)], 16) for _ in range(7)]
    states = []
    for workers in (0, 2):
        sampler = ResumableSampler(ds, seed=1)
        loader = BatchLoader(sampler, 4, slice(0, 4), ImageTensors(ds, 16), workers=workers)
        got = []
        for _ in range(7):
            got.append(ImageTensors.to_unit_range(torch.stack([t for t, _ in loader.next_batch()])))
            states.append(vars(sampler.state).copy())
        loader.close()
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), workers
        assert sampler.state == reference.state
    assert states[:7] == states[7:]
    assert "skipping undecodable image" in capsys.readouterr().err

    # Resume: a new loader from a saved state continues with the next unseen item.
    for cut in (2, 4):
        sampler = ResumableSampler(ds, seed=1)
        loader = BatchLoader(sampler, 4, slice(0, 4), ImageTensors(ds, 16), workers=2)
        for _ in range(cut):
            loader.next_batch()
        saved = SamplerState(**vars(sampler.state))
        loader.close()
        resumed = ResumableSampler(ds, seed=1, state=saved)
        loader = BatchLoader(resumed, 4, slice(0, 4), ImageTensors(ds, 16), workers=2)
        rest = [ImageTensors.to_unit_range(torch.stack([t for t, _ in loader.next_batch()])) for _ in range(7 - cut)]
        loader.close()
        assert all(torch.equal(a, b) for a, b in zip(rest, expected[cut:])), cut


def test_batch_loader_ranks_split_the_batch_of_one_process(tmp_path, monkeypatch):
    """Two ranks (threads here, their all-reduce a barrier) fetch only their halves, agree on every failure and
    together hand out exactly one process's batches."""
    import threading

    ds = _folder_with_bad_images(tmp_path, n=13, bad=(1, 4, 5, 9))
    reference = ResumableSampler(ds, seed=2)
    expected = [[c for _, c in reference.next_batch(4)] for _ in range(8)]
    barrier, shared = threading.Barrier(2), {}
    fetched = {0: [], 1: []}

    def all_reduce(self, flags):
        rank = self.share.start // 2
        shared[rank] = flags
        barrier.wait()
        total = shared[0] + shared[1]
        barrier.wait()
        return total

    monkeypatch.setattr(BatchLoader, "_failures", all_reduce)
    got, states = {}, {}

    def run(rank):
        sampler = ResumableSampler(ds, seed=2)

        def fetch(i, rank=rank):
            fetched[rank].append(i)
            return ImageTensors(ds, 8)(i)

        loader = BatchLoader(sampler, 4, slice(2 * rank, 2 * rank + 2), fetch, workers=0)
        got[rank] = [[c for _, c in loader.next_batch()] for _ in range(8)]
        states[rank] = sampler.state

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [a + b for a, b in zip(got[0], got[1])] == expected
    assert states[0] == states[1] == reference.state
    assert len(fetched[0]) + len(fetched[1]) < 2 * 8 * 4  # each fetched about its half, not the whole batch


def test_buckets_shapes_and_crops():
    assert auto_buckets(64) == [(64, 64), (48, 80), (80, 48)]
    for w, h in auto_buckets(1024):
        assert w * h <= 1024 * 1024 and w % 64 == 0 and h % 64 == 0 and max(w / h, h / w) <= 2
        assert (h, w) in auto_buckets(1024)
    assert parse_buckets("", 64) is None and parse_buckets("32x48,64x64", 64) == [(32, 48), (64, 64)]
    with pytest.raises(ValueError, match="'30x48'"):
        parse_buckets("30x48", 64)
    buckets = auto_buckets(64)
    assert [nearest_bucket(w, h, buckets) for w, h in ((100, 100), (50, 90), (200, 110), (10, 100))] == [0, 1, 2, 1]
    im = Image.new("RGB", (90, 40), (0, 0, 0))
    im.paste((255, 0, 0), (0, 0, 10, 40))  # a red band at the left edge: cropped away by the 5:3 centre crop
    t = ImageTensors(_Named([(im, "c")]), 64, [2], buckets)(0)[0]
    assert t.shape == (3, 48, 80) and int(t[0, :, 0].max()) < 40


class _Named:
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def load(self, i):
        return self.items[i]


def test_bucket_loader_never_mixes_buckets_and_resumes(tmp_path):
    shapes = [(40, 40), (30, 60), (60, 30), (44, 40), (30, 62), (64, 30), (40, 42), (28, 60), (66, 30), (40, 40),
              (30, 58), (70, 34), (41, 41), (30, 60)]
    for i, (w, h) in enumerate(shapes):
        Image.new("RGB", (w, h), (i * 10, 0, 0)).save(tmp_path / f"im{i:02d}.png")
        (tmp_path / f"im{i:02d}.txt").write_text(f"{w}x{h}")
    (tmp_path / "im04.png").write_bytes(b"bad")
    ds = ImageCaptionDataset(tmp_path)
    buckets = auto_buckets(64)
    bucket_of = assign_buckets(ds, buckets)
    assert bucket_of[4] == -1 and bucket_of[:3] == [0, 1, 2]

    def run(workers, steps, state=None):
        sampler = BucketSampler(ds, bucket_of, len(buckets), seed=5)
        if state is not None:
            sampler.load_state_dict(state)
        loader = BucketLoader(sampler, 2, slice(0, 2), ImageTensors(ds, 64, bucket_of, buckets), workers=workers)
        out = []
        for _ in range(steps):
            k, items = loader.next_batch()
            assert all(t.shape[1:] == (buckets[k][1], buckets[k][0]) for t, _ in items)
            out.append((k, [c for _, c in items]))
        loader.close()
        return out, sampler.state_dict()

    full, end = run(0, 16)
    assert {k for k, _ in full} == {0, 1, 2}
    assert run(2, 16) == (full, end)
    first, middle = run(2, 7)
    rest, end2 = run(2, 9, middle)
    assert first + rest == full and end2 == end
