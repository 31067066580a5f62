"""A cache of VAE latents for the decoder's SFT (`train/sft_decoder.py --cache-latents DIR`): every image is encoded
once, by one pass split across the ranks, instead of at every step of every epoch.

What it holds: the VAE posterior of each image, its mean and its standard deviation (exp(logvar / 2)), as raw
latents (before the DiT's shift and scale), in the run's --dtype. SD3 trains on a posterior sample, so the mean
alone would change the training; with both, a step draws mean + std * eps from its own generator exactly as it does
without the cache. Not cached: the connector inputs (the frozen LVLM's states of each caption). The DiT has no text
mask, so a caption's states depend on the padding its batch gives it (the longest caption of the global batch), and
a cached per-caption tensor would not be what the step computes.

Layout: `latents-r{rank}-{k}.safetensors` shards ("mean", "std" [m, C, h, w] and "index" [m]: the dataset items they
hold, all of one bucket), written atomically by the rank that encoded them, and `index.json`, written last by rank 0,
so a folder without it is an interrupted pass and is rebuilt. `index.json` records what produced the cache (format,
the VAE's weights hash, image size, aspect-ratio buckets, dtype, the dataset's fingerprint and length), each item's
bucket (`bucket_of`, decided once here: the dataset's stored index of buckets) and the items that could not be
decoded (skipped at training time as without the cache); opening a cache made otherwise is an error naming the
field. The folder must be one every rank sees (a shared filesystem when the ranks span several machines).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from train.common import UsageError
from train.data import ImageTensors, _Fetching, _as_is, _name, assign_buckets
from weights import open_checkpoint, save_safetensors

FORMAT = 1
INDEX = "index.json"
SHARD_ITEMS = 512  # items per shard file (and held in memory before it is written): 512 MB at 1024 px in bf16


def vae_hash(vae: torch.nn.Module) -> str:
    """sha256 of the VAE's weights: every tensor of its state dict, in order, with its name, dtype and shape."""
    h = hashlib.sha256()
    for name, t in vae.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def identity(vae, dataset, size: int, dtype: torch.dtype, buckets: list[tuple[int, int]] | None) -> dict:
    return {"format": FORMAT, "dtype": str(dtype).removeprefix("torch."), "size": size,
            "buckets": [list(b) for b in buckets] if buckets else None, "vae_sha256": vae_hash(vae),
            "dataset_items": len(dataset), "dataset_fingerprint": dataset.fingerprint()}


class LatentCache:
    """An opened cache: `posterior(i)` -> (mean, std) of dataset item i (raw latents), reading one row of its shard;
    an item that could not be decoded when the cache was made raises ValueError naming it."""

    def __init__(self, folder: Path, index: dict):
        self.folder = folder
        self.skipped = {int(k): v for k, v in index["skipped"].items()}
        self.bucket_of: list[int] | None = index.get("bucket_of")
        self.where: dict[int, tuple[int, int]] = {}
        self.shards = [s["file"] for s in index["shards"]]
        for n, s in enumerate(index["shards"]):
            for row, item in enumerate(s["items"]):
                self.where[item] = (n, row)
        self._open: dict[int, object] = {}  # opened per process (workers open their own after the fork)
        self._pid = os.getpid()

    def posterior(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i in self.skipped:
            raise ValueError(self.skipped[i])
        if i not in self.where:
            raise KeyError(f"latent cache {self.folder}: item {i} is missing from {INDEX}")
        if self._pid != os.getpid():
            self._open, self._pid = {}, os.getpid()
        n, row = self.where[i]
        if n not in self._open:
            self._open[n] = open_checkpoint(self.folder / self.shards[n])
        f = self._open[n]
        return f["mean"][row].clone(), f["std"][row].clone()


class CachedLatents:
    """What a worker makes of item i with the cache: ((mean, std), caption); the caption comes from the dataset
    (tar shards: read from the shard, images untouched)."""

    def __init__(self, cache: LatentCache, dataset):
        self.cache, self.dataset = cache, dataset

    def __call__(self, i: int):
        mean_std = self.cache.posterior(i)
        return mean_std, self.dataset.caption(i)


def _check(index: dict, want: dict, folder: Path) -> None:
    got = index.get("identity", {})
    for field in ("format", "dtype", "size", "buckets", "vae_sha256", "dataset_items", "dataset_fingerprint"):
        if got.get(field) != want[field]:
            raise UsageError(f"--cache-latents {folder} was made with another {field} ({got.get(field)!r}; this run: "
                             f"{want[field]!r}); pass another folder or delete this one to rebuild it")


def open_or_build(folder: str | Path, vae, dataset, size: int, dtype: torch.dtype, rank: int, world: int,
                  device: torch.device, batch_size: int, workers: int,
                  buckets: list[tuple[int, int]] | None = None) -> LatentCache:
    """The cache in `folder` if it is complete and was made by this VAE, size, buckets, dtype and dataset; else,
    when it has no index (new, or an interrupted pass), one pass over the dataset split across the ranks builds it.
    With aspect-ratio buckets the index also holds each item's bucket (`bucket_of`), decided once by the build.
    Every rank calls it (it holds collectives)."""
    import torch.distributed as dist

    folder = Path(folder)
    want = identity(vae, dataset, size, dtype, buckets)
    index_file = folder / INDEX
    build = [not index_file.is_file()]
    if dist.is_initialized() and world > 1:  # rank 0 decides, so no rank waits in a pass the others skip
        dist.broadcast_object_list(build, src=0)
    if build[0]:
        _build(folder, vae, dataset, size, dtype, rank, world, device, batch_size, workers, want, buckets)
    if dist.is_initialized() and world > 1:
        dist.barrier()
    try:
        index = json.loads(index_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"--cache-latents {folder}: unreadable {INDEX} ({e}); delete the folder to rebuild it")
    _check(index, want, folder)
    return LatentCache(folder, index)


@torch.no_grad()
def _build(folder: Path, vae, dataset, size, dtype, rank, world, device, batch_size, workers, want, buckets) -> None:
    import torch.distributed as dist

    folder.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        print(f"--cache-latents {folder}: encoding {len(dataset)} images once ({world} rank(s))", flush=True)
    bucket_of = assign_buckets(dataset, buckets, rank, world, workers) if buckets else None
    mine = list(range(rank, len(dataset), world))  # interleaved: every rank gets the same share of any region
    skipped = {}
    if bucket_of is not None:
        skipped = {i: f"{_name(dataset, i)}: unreadable image header" for i in mine if bucket_of[i] < 0}
        mine = [i for i in mine if bucket_of[i] >= 0]
    fetch = ImageTensors(dataset, size, bucket_of, buckets)
    loader = torch.utils.data.DataLoader(_Fetching(fetch), batch_size=None, sampler=mine,
                                         num_workers=workers, collate_fn=_as_is,
                                         prefetch_factor=max(2, batch_size // max(workers, 1)) if workers else None)
    shards = []
    # Per bucket (one shape each): images waiting for a VAE batch, latents waiting for a shard.
    pending: dict[int, list] = {}
    done: dict[int, dict[str, list]] = {}

    def encode(b: int) -> None:
        rows, pending[b] = pending[b], []
        images = ImageTensors.to_unit_range(torch.stack([image for _, image in rows])).to(device, dtype)
        mean, logvar = vae.encode_dist(images)
        d = done.setdefault(b, {"items": [], "mean": [], "std": []})
        d["items"] += [i for i, _ in rows]
        d["mean"].append(mean.to(dtype).cpu())
        d["std"].append(torch.exp(0.5 * logvar.float()).to(dtype).cpu())

    def write_shard(b: int) -> None:
        d = done.pop(b)
        name = f"latents-r{rank:05d}-{len(shards):05d}.safetensors"
        save_safetensors({"mean": torch.cat(d["mean"]), "std": torch.cat(d["std"]),
                          "index": torch.tensor(d["items"], dtype=torch.int64)}, folder / name)
        shards.append({"file": name, "items": d["items"]})

    for i, item, reason in loader:
        if reason is not None:
            skipped[i] = f"{_name(dataset, i)}: {reason}"
            print(f"warning: --cache-latents: skipping undecodable image {skipped[i]}", file=sys.stderr, flush=True)
            continue
        b = 0 if bucket_of is None else bucket_of[i]
        pending.setdefault(b, []).append((i, item[0]))
        if len(pending[b]) == batch_size:
            encode(b)
        if b in done and len(done[b]["items"]) >= SHARD_ITEMS:
            write_shard(b)
    for b in sorted(pending):
        if pending[b]:
            encode(b)
    for b in sorted(done):
        write_shard(b)
    part = {"shards": shards, "skipped": skipped}
    parts = [part]
    if dist.is_initialized() and world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, part)
    if rank == 0:
        index = {"identity": want, "stores": "VAE posterior mean and std (raw latents, before shift and scale)",
                 "shards": [s for p in parts for s in p["shards"]],
                 "skipped": {str(k): v for p in parts for k, v in sorted(p["skipped"].items())},
                 "bucket_of": bucket_of}
        if not index["shards"]:
            raise ValueError(f"--cache-latents {folder}: no image of the dataset could be decoded")
        tmp = folder / f".{INDEX}.tmp.{os.getpid()}"
        tmp.write_text(json.dumps(index))
        os.replace(tmp, folder / INDEX)
        print(f"--cache-latents {folder}: {sum(len(s['items']) for s in index['shards'])} latents in "
              f"{len(index['shards'])} shard(s), {len(index['skipped'])} undecodable", flush=True)
