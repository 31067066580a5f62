"""Stage 0: long-caption text-to-image pretraining of the decoder (MMDiT + connector) with the rectified-flow loss.

The frozen LVLM encodes each caption (`generate` chat turn); the connector and the DiT are trained. Loss, as SD3's
reference training (diffusers train_dreambooth_sd3 / training_utils):
    sigma from the shifted schedule at index floor(u * 1000), u = sigmoid(N(logit_mean, logit_std)) ("logit_normal",
    SD3 paper section 3.1); x_sigma = (1 - sigma) x0 + sigma eps; the DiT predicts v = eps - x0;
    L = mean(w(sigma) * (v_pred - v)^2) with w = 1 for "logit_normal", 1/sigma^2 for "sigma_sqrt", and
    2 / (pi (1 - 2 sigma + 2 sigma^2)) for "cosmap".
x0 are VAE latents in the DiT's space ((z - shift) * scale).

When the model already carries LoRA adapters (the release's DiT adapter, or an --init run's), adapter training stacks
its new adapter on them; full-parameter training (--lora-rank 0) first merges them into the DiT weights it trains.

Launch:
    # tiny preset on procedurally generated (image, caption) pairs, one CPU process
    torchrun --nproc_per_node=1 train/sft_decoder.py
    # 1 GPU, official weights, LoRA on the DiT (--data: a JSONL of {"image": path, "caption": text} or a folder of
    # images with same-name .txt captions)
    torchrun --nproc_per_node=1 train/sft_decoder.py --uae ckpt/UAE --data data/pairs.jsonl --dtype bf16 \
        --size 1024 --batch-size 2 --lora-rank 64 --grad-checkpointing --steps 1000 --out runs/sft_decoder
    # 8 GPUs, full-parameter SFT of the 8B decoder sharded with FSDP2 (the pipeline's stage 0)
    torchrun --nproc_per_node=8 train/sft_decoder.py --uae ckpt/UAE --init runs/sft_captioner --data data/pairs.jsonl \
        --dtype bf16 --size 1024 --batch-size 16 --lora-rank 0 --fsdp --grad-checkpointing --steps 1000 \
        --out runs/sft_decoder
    # resume: the same command with --resume

Data: --data also takes folders of tar shards or JSONL manifests; --workers N processes per rank decode ahead of the
step; --cache-latents DIR encodes the images once and trains from the VAE posteriors it stores; --buckets auto trains
at several aspect ratios, one bucket per global batch (README, "Training data"). x0 is a posterior sample (mean +
std * eps, eps from the step's generator), as SD3's training samples latent_dist; --no-latent-sample takes the mean.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import asdict, dataclass

if __package__ in (None, ""):  # `torchrun train/sft_decoder.py` runs the file as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_optimizer_state_dict)

from model.lora import apply_lora, load_lora, lora_parameters, unwrap_lora
from model.uae import DIT_LORA_TARGETS, NEGATIVE_PROMPT
from train import latent_cache
from train.common import (BASE_KEYS, MetricsLogger, NonFiniteGuard, RunOptions, UsageError, average_gradients,
                          build_dataset, build_uae, encode_text_padded_over_ranks, finish_run, finite, init_distributed,
                          open_run_folder, option, parse_dtype, parse_options, reduce_stats, require, resume_loop,
                          rng_state, run_script, save_run_checkpoint, set_lr, split_for_rank, step_generator,
                          trained_adapter)
from train.data import (BatchLoader, BucketLoader, BucketSampler, ImageTensors, ResumableSampler, assign_buckets,
                        parse_buckets)


@dataclass
class Options(RunOptions):
    out: str = option("runs/sft_decoder", "run folder: metrics.jsonl, checkpoints (model/: the handoff)")
    steps: int = option(40, "optimizer steps")
    batch_size: int = option(4, "(image, caption) pairs per step (global)")
    weighting: str = option("logit_normal", "timestep sampling/weighting: logit_normal | sigma_sqrt | cosmap | uniform")
    logit_mean: float = option(0.0, "logit-normal mean")
    logit_std: float = option(1.0, "logit-normal std")
    lora_rank: int = option(32, "LoRA rank on the DiT; 0 = full-parameter training")
    train_connector: bool = option(True, "train the connector")
    fsdp: bool = option(False, "shard the DiT and connector with FSDP2 (full-parameter training only)")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    save_every: int = option(20, "checkpoint every N steps (and at the end)")
    workers: int = option(2, "data loader processes per rank that decode and resize ahead of the step (0: in the "
                             "training process); the batches do not depend on it")
    cache_latents: str = option("", "folder of a VAE latent cache: built by one pass over --data split across the "
                                    "ranks when it has no index.json, then read instead of encoding every step; a "
                                    "cache made by another VAE, --size, --dtype or dataset is refused")
    buckets: str = option("", "aspect-ratio buckets: empty = square --size; 'auto' = SD3-style shapes of about "
                              "--size^2 pixels (sides multiples of 64); or WxH,WxH,... Each image goes to the bucket "
                              "nearest its aspect ratio, decided once (kept in the --cache-latents index); a global "
                              "batch holds one bucket")
    latent_sample: bool = option(True, "train on a sample of the VAE posterior (SD3's training; mean + std * eps "
                                       "from the step's generator); --no-latent-sample: its mean")
    caption_dropout: float = option(0.0, "probability that a pair trains with UAE's negative prompt in place of its "
                                         "caption: the text classifier-free guidance's other branch reads "
                                         "(model/uae.py NEGATIVE_PROMPT), so guidance extrapolates from a prediction "
                                         "the decoder was trained to make (SD3 drops its captions likewise)")

    full_parameter_training = True  # --lora-rank 0

    def check(self) -> None:
        super().check()
        require(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        require(self.weighting in ("logit_normal", "sigma_sqrt", "cosmap", "uniform"),
                f"--weighting must be logit_normal, sigma_sqrt, cosmap or uniform, got {self.weighting!r}")
        require(finite(self.logit_mean), f"--logit-mean must be a finite number, got {self.logit_mean}")
        require(finite(self.logit_std) and self.logit_std > 0, f"--logit-std must be > 0, got {self.logit_std}")
        require(not (self.fsdp and self.lora_rank > 0),
                "--fsdp is for full-parameter training (--lora-rank 0); adapters train with DDP")
        require(self.workers >= 0, f"--workers must be >= 0, got {self.workers}")
        require(0 <= self.caption_dropout < 1, f"--caption-dropout must be in [0, 1), got {self.caption_dropout}")
        try:
            parse_buckets(self.buckets, self.size)
        except ValueError as e:
            raise UsageError(str(e)) from None
        require(not self.cache_latents or not os.path.isfile(self.cache_latents),
                f"--cache-latents {self.cache_latents} is a file; it takes a folder")


RESUME_KEYS = BASE_KEYS + ("data", "batch_size", "size", "lora_rank", "lora_alpha", "train_connector", "fsdp",
                           "seed")


def sample_sigmas(n: int, opts: Options, shift: float, generator: torch.Generator) -> torch.Tensor:
    """Training sigmas: u from the weighting scheme's density, index floor(u * 1000) into SD3's shifted training
    schedule sigma_i = s_i * shift / (1 + (shift - 1) s_i), s_i = (1000 - i) / 1000."""
    if opts.weighting == "logit_normal":
        u = torch.sigmoid(torch.randn(n, generator=generator) * opts.logit_std + opts.logit_mean)
    else:
        u = torch.rand(n, generator=generator)
    s = (1000 - (u * 1000).long().clamp(max=999)).float() / 1000
    return shift * s / (1 + (shift - 1) * s)


def loss_weight(sigmas: torch.Tensor, scheme: str) -> torch.Tensor:
    if scheme == "sigma_sqrt":
        return sigmas.pow(-2.0)
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    return torch.ones_like(sigmas)


def main(argv: list[str] | None = None) -> dict:
    opts = parse_options(Options, argv, description=__doc__.split("\n\n")[0])
    dist_env = init_distributed(opts.device)
    dtype = parse_dtype(opts.dtype)
    my_share = split_for_rank(opts.batch_size, dist_env, "batch_size")

    folder, state = open_run_folder(opts, RESUME_KEYS, dist_env.is_main)
    uae, inherited = build_uae(opts, dtype, dist_env.device, folder)
    if opts.lora_rank > 0:
        apply_lora(uae.dit, DIT_LORA_TARGETS.split(","), rank=opts.lora_rank, alpha=opts.lora_alpha, init="gaussian")
        params = lora_parameters(uae.dit)
    else:
        unwrap_lora(uae.dit, merge=True)  # every DiT weight trains: the adapters below become part of them
        uae.dit.requires_grad_(True)
        params = list(uae.dit.parameters())
    if opts.train_connector:
        uae.connector.requires_grad_(True)
        params += list(uae.connector.parameters())
    if dtype == torch.float32 or opts.lora_rank > 0:
        for p in params:
            p.data = p.data.float()
    uae.dit.gradient_checkpointing = opts.grad_checkpointing
    # What full-parameter training trains, under one module so FSDP2 state dicts get stable names.
    trained = torch.nn.ModuleDict({"dit": uae.dit, **({"connector": uae.connector} if opts.train_connector else {})})
    if opts.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(dist_env.device.type, (dist_env.world,))
        for block in uae.dit.transformer_blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(uae.dit, mesh=mesh)
        if opts.train_connector:  # sharded too, so FSDP reduces its gradients and every parameter is a DTensor
            fully_shard(uae.connector, mesh=mesh)
        params = list(trained.parameters())
    opt = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)

    dataset = build_dataset(opts, need_caption=True)
    buckets = parse_buckets(opts.buckets, opts.size)
    if state is not None and state["options"].get("buckets", "") != opts.buckets:
        raise UsageError(f"cannot resume from {folder}: it was written with --buckets "
                         f"{state['options'].get('buckets', '')!r}, this run has {opts.buckets!r}")
    bucket_of = None
    if opts.cache_latents:
        cache = latent_cache.open_or_build(opts.cache_latents, uae.vae, dataset, opts.size, dtype, dist_env.rank,
                                           dist_env.world, dist_env.device, max(1, opts.batch_size // dist_env.world),
                                           opts.workers, buckets)
        fetch, bucket_of = latent_cache.CachedLatents(cache, dataset), cache.bucket_of
    else:
        if buckets:
            bucket_of = assign_buckets(dataset, buckets, dist_env.rank, dist_env.world, opts.workers)
        fetch = ImageTensors(dataset, opts.size, bucket_of, buckets)
    if buckets:
        sampler = BucketSampler(dataset, bucket_of, len(buckets), seed=opts.seed)
        loader = BucketLoader(sampler, opts.batch_size, my_share, fetch, workers=opts.workers, device=dist_env.device)
    else:
        sampler = ResumableSampler(dataset, seed=opts.seed)
        loader = BatchLoader(sampler, opts.batch_size, my_share, fetch, workers=opts.workers, device=dist_env.device)
    if state is not None and opts.lora_rank > 0:  # trained DiT weights and connector came back with model/ (build_uae)
        load_lora(uae.dit, trained_adapter(folder, "dit"))

    def load_full_optimizer_state(optim_state: dict) -> None:  # FSDP: a full state, resharded onto this run's ranks
        set_optimizer_state_dict(trained, opt, optim_state_dict=optim_state,
                                 options=StateDictOptions(full_state_dict=True))

    start = resume_loop(state, opt, sampler, opts, dist_env.is_main, load_full_optimizer_state if opts.fsdp else None)
    log = MetricsLogger(os.path.join(opts.out, "metrics.jsonl"), opts.steps, dist_env.is_main, start_step=start)
    guard = NonFiniteGuard(opts.max_bad_steps)
    metrics: dict = {}

    for step in range(start + 1, opts.steps + 1):
        gen = step_generator(opts.seed, step)
        width = height = opts.size
        if buckets:
            bucket, pairs = loader.next_batch()  # this rank's share, one bucket for the global batch
            width, height = buckets[bucket]
        else:
            pairs = loader.next_batch()
        latent_shape = uae.latent_shape(opts.batch_size, height, width)
        noise = torch.randn(latent_shape, generator=gen)[my_share].to(dist_env.device)
        sigmas = sample_sigmas(opts.batch_size, opts, uae.settings.shift, gen)[my_share].to(dist_env.device)
        eps = torch.randn(latent_shape, generator=gen)[my_share].to(dist_env.device)  # the posterior sample's
        captions = [c for _, c in pairs]
        if opts.caption_dropout > 0:  # drawn after the rest, so a run without dropout draws what it always drew
            dropped = (torch.rand(opts.batch_size, generator=gen) < opts.caption_dropout)[my_share].tolist()
            captions = [NEGATIVE_PROMPT if d else c for c, d in zip(captions, dropped)]

        with torch.no_grad():
            if opts.cache_latents:
                mean = torch.stack([m for (m, _), _ in pairs]).to(dist_env.device)
                std = torch.stack([s for (_, s), _ in pairs]).to(dist_env.device)
            else:
                images = ImageTensors.to_unit_range(torch.stack([im for im, _ in pairs])).to(dist_env.device, dtype)
                mean, logvar = uae.vae.encode_dist(images)
                std = torch.exp(0.5 * logvar.float()).to(mean.dtype)
            z = (mean.float() + std.float() * eps) if opts.latent_sample else mean.float()
            x0 = uae.vae.to_model_latents(z)
        s = sigmas.view(-1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        target = noise - x0
        context = encode_text_padded_over_ranks(uae, captions)
        opt.zero_grad(set_to_none=True)
        lr = set_lr(opt, opts, step)
        pred = uae.velocity_fn(context)(x_t, sigmas * 1000)
        per_sample = ((pred - target) ** 2).flatten(1).mean(1)
        loss = (loss_weight(sigmas, opts.weighting) * per_sample).mean()
        loss.backward()
        if not opts.fsdp:  # FSDP2 reduce-scatters gradients itself
            average_gradients(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, opts.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a replicated DTensor
            grad_norm = grad_norm.full_tensor()
        step_stats = reduce_stats([{"loss": loss.detach(), "sigma_mean": sigmas.mean()}])  # global means
        if guard.bad(step, loss=step_stats["loss"], grad_norm=grad_norm):
            opt.zero_grad(set_to_none=True)
        else:
            opt.step()
        metrics = {**step_stats, "grad_norm": float(grad_norm), "lr": lr,
                   **({"bucket": f"{width}x{height}"} if buckets else {})}
        log.log(step, metrics)
        if step % opts.save_every == 0 or step == opts.steps:
            state = {"options": asdict(opts), "rng": rng_state(),
                     "sampler": sampler.state_dict() if buckets else asdict(sampler.state)}
            trains = ("dit_adapter" if opts.lora_rank > 0 else "dit_weights",) + (
                ("connector",) if opts.train_connector else ())
            full = {}
            if opts.fsdp:  # gathering the full state dicts is a collective: every rank takes part, rank 0 writes
                model_sd, optim_sd = get_state_dict(trained, opt, options=StateDictOptions(full_state_dict=True,
                                                                                           cpu_offload=True))
                state["optimizer"] = optim_sd
                full = {"dit_state": _sub(model_sd, "dit."),
                        "connector_state": _sub(model_sd, "connector.") if opts.train_connector else None}
            else:
                state["optimizer"] = opt.state_dict()
            if dist_env.is_main:
                save_run_checkpoint(opts, step, state, uae, stage="sft_decoder", trains=trains, inherited=inherited,
                                    **full)
    loader.close()
    finish_run(opts, log)
    return metrics


def _sub(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


if __name__ == "__main__":
    run_script(main)
