"""Rectified-flow sampling for the SD3 MMDiT: the shifted sigma schedule, the Euler ODE step, classifier-free
guidance, and the stochastic steps with log-probabilities that Flow-GRPO trains on.

Conventions. x_sigma = (1 - sigma) x_0 + sigma * noise, sigma runs from 1 (noise) down to 0 (data), the model
predicts the velocity v = noise - x_0 and sees timestep = sigma * 1000. Every step is computed in fp32 whatever the
dtype of its inputs and returns fp32 tensors (Flow-GRPO upcasts because bf16 overflows in the SDE mean).

velocity_fn(x, timestep) -> v is the only model interface: x [B', C, H, W] fp32, timestep [B'] fp32 (sigma*1000);
it casts to its model's dtype itself. With classifier-free guidance (`guidance_scale` not None) the samplers call
it once per step on the batch doubled as [x; x] and expect [v_uncond; v_cond] back (the diffusers SD3 pipeline's
order), so a caller conditioning the DiT on connector outputs closes over context = cat([negative, positive])
(`model.uae.dit_velocity` is that function for the UAE decoder).

This file is the one home of the sampling equations every script uses: CFG (`cfg_combine`), the Euler ODE sampler
(with or without gradients, `sample_ode`), the Flow-GRPO rollout with per-step log-probs (`sample_sde_trajectory`)
and the re-scoring of one recorded transition under the current policy (`transition_log_prob`, Flow-GRPO's
`compute_log_prob`), which returns what the policy ratio and the KL penalty need.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "NUM_TRAIN_TIMESTEPS", "flow_sigmas", "euler_step", "cfg_combine", "guided_velocity", "sample_ode",
    "StepOutput", "sde_step_with_logprob", "cps_step_with_logprob", "Trajectory", "sample_sde_trajectory",
    "transition_log_prob",
]

NUM_TRAIN_TIMESTEPS = 1000
VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Sigma = float | torch.Tensor


def flow_sigmas(num_steps: int, shift: float = 3.0, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """The N+1 sigmas (fp32, last one 0) of diffusers' FlowMatchEulerDiscreteScheduler(num_train_timesteps, shift)
    after set_timesteps(num_steps), bit for bit; model timesteps are sigmas[:-1] * num_train_timesteps.

    diffusers spaces the unshifted sigmas evenly in float64 numpy between sigma_max = 1 and the shifted sigma of its
    smallest training timestep (computed in float32 torch in the scheduler's __init__), then shifts them again:
    sigma' = s*sigma / (1 + (s-1)*sigma), and casts to float32.
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    train = torch.tensor([num_train_timesteps, 1.0], dtype=torch.float32) / num_train_timesteps
    sigma_max, sigma_min = (shift * train / (1 + (shift - 1) * train)).tolist()
    sigmas = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, num_steps)
    sigmas = sigmas / num_train_timesteps
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return torch.cat([torch.from_numpy(sigmas).float(), torch.zeros(1)])


def _per_sample(s: Sigma, like: torch.Tensor, name: str) -> torch.Tensor:
    """A scalar or [B] sigma as a fp32 [B, 1, ...] tensor that broadcasts against `like` [B, ...]."""
    batch = like.shape[0]
    t = torch.as_tensor(s, dtype=torch.float32, device=like.device)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.ndim != 1 or t.shape[0] != batch:
        raise ValueError(f"{name} must be a scalar or a [B={batch}] tensor, got shape {list(t.shape)}")
    return t.view(batch, *[1] * (like.ndim - 1))


def _check_step(velocity: torch.Tensor, sample: torch.Tensor, sigma: Sigma, sigma_next: Sigma):
    if velocity.shape != sample.shape:
        raise ValueError(f"velocity {list(velocity.shape)} and sample {list(sample.shape)} shapes differ")
    if sample.ndim < 2:
        raise ValueError(f"sample must be [B, ...], got {list(sample.shape)}")
    s = _per_sample(sigma, sample, "sigma")
    s_next = _per_sample(sigma_next, sample, "sigma_next")
    if bool(((s <= 0) | (s > 1)).any()):
        raise ValueError(f"sigma must lie in (0, 1], got {s.flatten().tolist()}")
    if bool(((s_next < 0) | (s_next >= s)).any()):
        raise ValueError(f"sigma_next must lie in [0, sigma), got sigma_next={s_next.flatten().tolist()} "
                         f"for sigma={s.flatten().tolist()}")
    return velocity.float(), sample.float(), s, s_next


def _check_noise_level(noise_level: float) -> None:
    if not 0.0 <= noise_level < 1.0:
        raise ValueError(f"noise_level must lie in [0, 1), got {noise_level}")


def euler_step(velocity: torch.Tensor, sample: torch.Tensor, sigma: Sigma, sigma_next: Sigma) -> torch.Tensor:
    """x' = x + (sigma_next - sigma) v (FlowMatchEulerDiscreteScheduler.step), in fp32. sigma, sigma_next: scalars
    or [B]."""
    v, x, s, s_next = _check_step(velocity, sample, sigma, sigma_next)
    return x + (s_next - s) * v


def cfg_combine(v_uncond: torch.Tensor, v_cond: torch.Tensor, guidance_scale: float,
                detach_uncond: bool = False) -> torch.Tensor:
    """Classifier-free guidance v = v_u + g (v_c - v_u), in fp32.

    detach_uncond=True stops the gradient through the unconditional branch, as Flow-GRPO's training forward does
    (scripts/train_sd3.py `compute_log_prob`: `noise_pred_uncond = noise_pred_uncond.detach()`): the policy gradient
    then moves the conditional prediction only, with weight g. Sampling and the cold start keep both branches."""
    v_uncond, v_cond = v_uncond.float(), v_cond.float()
    if detach_uncond:
        v_uncond = v_uncond.detach()
    return v_uncond + guidance_scale * (v_cond - v_uncond)


def guided_velocity(velocity_fn: VelocityFn, x: torch.Tensor, sigma: torch.Tensor,
                    guidance_scale: float | None, detach_uncond: bool = False) -> torch.Tensor:
    """velocity_fn at x and sigma (0-dim), with CFG (`cfg_combine`) when guidance_scale is not None: one call on the
    doubled batch [x; x], which returns [v_uncond; v_cond]."""
    x = x.float()
    if guidance_scale is None:
        return velocity_fn(x, (sigma * NUM_TRAIN_TIMESTEPS).expand(x.shape[0])).float()
    v = velocity_fn(torch.cat([x, x]), (sigma * NUM_TRAIN_TIMESTEPS).expand(2 * x.shape[0])).float()
    if v.shape[0] != 2 * x.shape[0]:
        raise ValueError(f"with guidance, velocity_fn must return [v_uncond; v_cond] of batch {2 * x.shape[0]}, "
                         f"got {list(v.shape)}")
    v_uncond, v_cond = v.chunk(2)
    return cfg_combine(v_uncond, v_cond, guidance_scale, detach_uncond)


def _check_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(f"sigmas must be a 1-D schedule of N+1 >= 2 values, got shape {list(sigmas.shape)}")
    return sigmas.float()


def _check_grad_last_k(grad_last_k: int | None, grad: bool = True) -> None:
    if grad_last_k is not None and (not grad or isinstance(grad_last_k, bool) or not isinstance(grad_last_k, int)
                                    or grad_last_k < 1):
        raise ValueError(f"grad_last_k must be a positive integer used with grad=True, got {grad_last_k!r} "
                         f"(grad={grad})")


def sample_ode(velocity_fn: VelocityFn, noise: torch.Tensor, sigmas: torch.Tensor,
               guidance_scale: float | None = None, grad_last_k: int | None = None) -> torch.Tensor:
    """Euler ODE from `noise` (at sigmas[0]) along `sigmas` (e.g. flow_sigmas(n)) to the last sigma; fp32 latents.

    Runs under the caller's grad mode: under torch.no_grad() it is plain sampling; with gradients on, a loss on the
    result reaches velocity_fn's parameters through every step (UAE's cold start), or through the last
    `grad_last_k` steps only (truncated backprop: the earlier steps run under no_grad)."""
    _check_grad_last_k(grad_last_k)
    sigmas = _check_sigmas(sigmas).to(noise.device)
    n = sigmas.shape[0] - 1
    first_grad_step = 0 if grad_last_k is None else max(n - grad_last_k, 0)
    grad = torch.is_grad_enabled()
    x = noise.float()
    for i in range(n):
        with torch.set_grad_enabled(grad and i >= first_grad_step):
            v = guided_velocity(velocity_fn, x, sigmas[i], guidance_scale)
            x = euler_step(v, x, sigmas[i], sigmas[i + 1])
    return x


def _gaussian_noise(shape, like: torch.Tensor, noise: torch.Tensor | None,
                    generator: torch.Generator | None) -> torch.Tensor:
    if noise is not None:
        if noise.shape != shape:
            raise ValueError(f"noise shape {list(noise.shape)} does not match sample {list(shape)}")
        return noise.float()
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(like.device)


def _mean_over_sample(t: torch.Tensor) -> torch.Tensor:
    return t.mean(dim=tuple(range(1, t.ndim)))


class StepOutput(NamedTuple):
    """One stochastic step. prev_sample, mean: [B, ...] fp32; log_prob [B]; std: the transition's standard deviation,
    [B, 1, ..., 1] (prev_sample = mean + std * eps); std_dev_t: Flow-GRPO's `std_dev_t`, the scale its KL penalty
    divides by (see `train.rl.kl_gaussian_means`), [B, 1, ..., 1]."""
    prev_sample: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    std_dev_t: torch.Tensor


def _draw_or_score(mean: torch.Tensor, std: torch.Tensor, noise, prev_sample, generator) -> torch.Tensor:
    if prev_sample is None:
        return mean + std * _gaussian_noise(mean.shape, mean, noise, generator)
    if prev_sample.shape != mean.shape:
        raise ValueError(f"prev_sample shape {list(prev_sample.shape)} does not match sample {list(mean.shape)}")
    return prev_sample.float()


def sde_step_with_logprob(velocity: torch.Tensor, sample: torch.Tensor, sigma: Sigma, sigma_next: Sigma,
                          noise_level: float, noise: torch.Tensor | None = None,
                          prev_sample: torch.Tensor | None = None, generator: torch.Generator | None = None,
                          sigma_1: Sigma | None = None) -> StepOutput:
    """One Flow-GRPO SDE step from sigma to sigma_next (flow_grpo/diffusers_patch/sd3_sde_with_logprob.py):

        std_dev_t = a * sqrt(sigma / (1 - sigma))      (1 - sigma_1 in the denominator where sigma == 1)
        mean      = x (1 + std_dev_t^2 / (2 sigma) dt) + v (1 + std_dev_t^2 (1 - sigma) / (2 sigma)) dt,
        x'        = mean + std_dev_t sqrt(-dt) eps,    dt = sigma_next - sigma < 0

    sigma_1 defaults to sigma_next, which for the first step of a schedule is sigmas[1], Flow-GRPO's choice.
    With prev_sample given, that sample is scored instead of drawing one; `noise` fixes eps. log_prob is the Gaussian
    log-density of prev_sample under N(mean, (std_dev_t sqrt(-dt))^2), averaged (not summed) over all but the batch
    dimension, with prev_sample detached as in Flow-GRPO (gradients reach log_prob through the mean only).
    Returns StepOutput: std = std_dev_t sqrt(-dt) is the transition std; std_dev_t itself (no sqrt(-dt)) is what
    Flow-GRPO returns and divides its KL term by. noise_level 0 is exactly the Euler step, with log_prob 0.
    """
    _check_noise_level(noise_level)
    v, x, s, s_next = _check_step(velocity, sample, sigma, sigma_next)
    s_1 = s_next if sigma_1 is None else _per_sample(sigma_1, x, "sigma_1")
    if bool((s_1 >= 1).any()):
        raise ValueError(f"sigma_1 must be < 1 (it replaces sigma in 1 - sigma when sigma == 1), got "
                         f"{s_1.flatten().tolist()}")
    dt = s_next - s
    std_dev_t = noise_level * torch.sqrt(s / (1 - torch.where(s == 1, s_1, s)))
    mean = x * (1 + std_dev_t ** 2 / (2 * s) * dt) + v * (1 + std_dev_t ** 2 * (1 - s) / (2 * s)) * dt
    std = std_dev_t * torch.sqrt(-dt)
    prev_sample = _draw_or_score(mean, std, noise, prev_sample, generator)
    if noise_level == 0:
        log_prob = torch.zeros(x.shape[0], device=x.device)
    else:
        log_prob = _mean_over_sample(-(prev_sample.detach() - mean) ** 2 / (2 * std ** 2) - torch.log(std)
                                     - 0.5 * math.log(2 * math.pi))
    return StepOutput(prev_sample, log_prob, mean, std, std_dev_t)


def cps_step_with_logprob(velocity: torch.Tensor, sample: torch.Tensor, sigma: Sigma, sigma_next: Sigma,
                          noise_level: float, noise: torch.Tensor | None = None,
                          prev_sample: torch.Tensor | None = None, generator: torch.Generator | None = None,
                          sigma_1: Sigma | None = None) -> StepOutput:
    """One coefficients-preserving (CPS) step (Flow-GRPO's 'cps' branch): with x0 = x - sigma v and
    x1 = x + (1 - sigma) v the predicted data and noise,

        std  = sigma_next sin(a pi / 2)
        mean = x0 (1 - sigma_next) + x1 sqrt(sigma_next^2 - std^2),   x' = mean + std eps

    so x' keeps the marginal coefficients of x_{sigma_next}. log_prob follows Flow-GRPO: -(x' - mean)^2 averaged
    over all but the batch dimension, i.e. the Gaussian log-density without its constants and without the
    1 / (2 std^2) factor. Same signature and StepOutput as sde_step_with_logprob (std_dev_t = std here, what
    Flow-GRPO returns for CPS; sigma_1 is accepted and unused).
    """
    _check_noise_level(noise_level)
    v, x, s, s_next = _check_step(velocity, sample, sigma, sigma_next)
    std = s_next * math.sin(noise_level * math.pi / 2)
    x0 = x - s * v
    x1 = x + (1 - s) * v
    mean = x0 * (1 - s_next) + x1 * torch.sqrt(s_next ** 2 - std ** 2)
    prev_sample = _draw_or_score(mean, std, noise, prev_sample, generator)
    log_prob = _mean_over_sample(-(prev_sample.detach() - mean) ** 2)
    return StepOutput(prev_sample, log_prob, mean, std, std)


_STEPS = {"sde": sde_step_with_logprob, "cps": cps_step_with_logprob}


@dataclass
class Trajectory:
    """A sampled denoising trajectory of N steps (fp32).

    latents [B, N+1, C, H, W]: latents[:, 0] the start noise, latents[:, -1] the final latents.
    log_probs [B, N], stds [B, N] (the transition std of each step): 0 on ODE steps. means [B, N, C, H, W]: the
    Gaussian mean of each step (the next latent itself on ODE steps). sigmas [N+1], timesteps [N] = sigmas[:-1] * 1000.
    sde_mask [N] bool: the stochastic steps, the ones a policy-gradient loss trains on.
    """
    latents: torch.Tensor
    log_probs: torch.Tensor
    means: torch.Tensor
    stds: torch.Tensor
    sigmas: torch.Tensor
    timesteps: torch.Tensor
    sde_mask: torch.Tensor


def sample_sde_trajectory(velocity_fn: VelocityFn, noise: torch.Tensor, sigmas: torch.Tensor,
                          noise_level: float = 0.7, guidance_scale: float | None = None,
                          sde_window: tuple[int, int] | None = None, method: str = "sde",
                          generator: torch.Generator | None = None, step_noise: torch.Tensor | None = None,
                          grad: bool = False, grad_last_k: int | None = None) -> Trajectory:
    """Sample from `noise` along `sigmas`, stochastic (method 'sde' or 'cps') on the steps in
    sde_window = (start, end) (half-open step indices; None = all) and Euler ODE elsewhere. The last step, to
    sigma 0, is always ODE: its CPS Gaussian is degenerate and Flow-GRPO does not train it.

    The stochastic steps draw eps from `generator`, or take it from step_noise [B, N, C, H, W] (step i uses
    step_noise[:, i]; a caller that draws every eps of a global batch up front and slices its rows gets the same
    trajectories whatever the batch split). grad=False samples under no_grad (RL rollouts). grad=True keeps the
    graph through every step, velocity_fn and the drawn noise included, so a loss on the final latents reaches
    velocity_fn's parameters; grad_last_k = K keeps it through the last K steps only (earlier steps run under
    no_grad).
    """
    if method not in _STEPS:
        raise ValueError(f"method must be one of {sorted(_STEPS)}, got {method!r}")
    _check_noise_level(noise_level)
    sigmas = _check_sigmas(sigmas).to(noise.device)
    n = sigmas.shape[0] - 1
    start, end = (0, n) if sde_window is None else sde_window
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= n):
        raise ValueError(f"sde_window must be (start, end) with 0 <= start <= end <= {n} steps, got {sde_window!r}")
    _check_grad_last_k(grad_last_k, grad)
    if step_noise is not None and (step_noise.ndim != noise.ndim + 1 or step_noise.shape[0] != noise.shape[0]
                                   or step_noise.shape[1] != n or step_noise.shape[2:] != noise.shape[1:]):
        raise ValueError(f"step_noise must be [B, N, ...] = {[noise.shape[0], n, *noise.shape[1:]]}, "
                         f"got {list(step_noise.shape)}")
    first_grad_step = 0 if grad_last_k is None else max(n - grad_last_k, 0)
    sde_mask = torch.zeros(n, dtype=torch.bool)
    sde_mask[start:min(end, n - 1)] = True
    step = _STEPS[method]

    x = noise.float()
    latents, log_probs, means, stds = [x], [], [], []
    for i in range(n):
        with torch.set_grad_enabled(grad and i >= first_grad_step):
            v = guided_velocity(velocity_fn, x, sigmas[i], guidance_scale)
            if sde_mask[i]:
                eps = None if step_noise is None else step_noise[:, i]
                x, log_prob, mean, std, _ = step(v, x, sigmas[i], sigmas[i + 1], noise_level, noise=eps,
                                                 generator=generator)
                std = std.flatten()
            else:
                x = euler_step(v, x, sigmas[i], sigmas[i + 1])
                mean, log_prob, std = x, x.new_zeros(x.shape[0]), x.new_zeros(x.shape[0])
        latents.append(x)
        log_probs.append(log_prob)
        means.append(mean)
        stds.append(std)
    with torch.set_grad_enabled(grad):
        return Trajectory(latents=torch.stack(latents, 1), log_probs=torch.stack(log_probs, 1),
                          means=torch.stack(means, 1), stds=torch.stack(stds, 1), sigmas=sigmas,
                          timesteps=sigmas[:-1] * NUM_TRAIN_TIMESTEPS, sde_mask=sde_mask)


def transition_log_prob(velocity_fn: VelocityFn, sample: torch.Tensor, prev_sample: torch.Tensor,
                        sigma: torch.Tensor, sigma_next: torch.Tensor, noise_level: float,
                        guidance_scale: float | None = None, method: str = "sde",
                        detach_uncond: bool = True) -> StepOutput:
    """Re-score one recorded stochastic transition sample -> prev_sample (sigma -> sigma_next, 0-dim) under
    velocity_fn: Flow-GRPO's `compute_log_prob` (scripts/train_sd3.py). The velocity is recomputed with gradients
    (under the caller's grad mode), with CFG whose unconditional branch is detached by default as in Flow-GRPO's
    training forward; the step is the one the rollout sampled with. Returns the StepOutput: log_prob for the policy
    ratio, mean and std_dev_t for the KL penalty to a reference scored the same way."""
    if method not in _STEPS:
        raise ValueError(f"method must be one of {sorted(_STEPS)}, got {method!r}")
    v = guided_velocity(velocity_fn, sample, sigma, guidance_scale, detach_uncond=detach_uncond)
    return _STEPS[method](v, sample, sigma, sigma_next, noise_level, prev_sample=prev_sample)
