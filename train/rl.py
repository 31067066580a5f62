"""The RL math shared by the training scripts: group-relative advantages, the clipped (PPO/GRPO) surrogate with its
two reductions, the k3 and Gaussian-mean KL penalties, the token-level GRPO loss of the captioner, the per-step
Flow-GRPO loss of the decoder, and an EMA of the trained parameters.

Every function is pure torch and works in the dtype it is given; call it on fp32 log-probabilities. Losses are to be
minimised (they are the negated GRPO objectives). Metrics come back as detached 0-d tensors so that a training step
pays for one device sync when it logs them, not one per value.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

REDUCTIONS = ("sequence_mean", "token_mean")


# ----------------------------------------------------------------------------------------------- advantages

def group_advantages(rewards: torch.Tensor, group_size: int | None = None, *, group_ids: torch.Tensor | None = None,
                     eps: float = 1e-4, clip: float | None = 5.0, global_std: bool = False) -> torch.Tensor:
    """A_i = (r_i - mean_g) / (std_g + eps), clamped to [-clip, clip] (Flow-GRPO, `PerPromptStatTracker`).

    Groups are either consecutive blocks of `group_size` rewards (the G samples of one prompt/image, in order) or
    given by integer `group_ids` [N]. std is the population std (ddof 0), as Flow-GRPO's `np.std`; with
    `global_std=True` every group's deviations are divided by the std of all N rewards (Flow-GRPO's
    `sample.global_std` option) while the mean stays per group. A group whose rewards are all equal gets exactly 0
    (never NaN and never a rounding residue divided by eps), so it contributes no policy gradient. Non-finite rewards
    are not rejected here: they propagate to the loss, where the training loop's non-finite guard skips the step.
    """
    if rewards.ndim != 1 or rewards.shape[0] == 0:
        raise ValueError(f"rewards must be 1-D [N] with N >= 1, got shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        raise ValueError(f"rewards must be a floating tensor, got {rewards.dtype}")
    n = rewards.shape[0]
    if (group_size is None) == (group_ids is None):
        raise ValueError("give exactly one of group_size and group_ids")
    if group_size is not None:
        if group_size < 1 or n % group_size:
            raise ValueError(f"group_size={group_size} must be >= 1 and divide the number of rewards {n}")
        inverse = torch.arange(n, device=rewards.device) // group_size
    else:
        if group_ids.shape != rewards.shape or group_ids.is_floating_point():
            raise ValueError(f"group_ids must be an integer tensor of shape {tuple(rewards.shape)}, "
                             f"got {group_ids.dtype} {tuple(group_ids.shape)}")
        inverse = torch.unique(group_ids.to(rewards.device), return_inverse=True)[1]
    if eps < 0 or (clip is not None and clip <= 0):
        raise ValueError(f"eps must be >= 0 and clip > 0 (or None), got eps={eps}, clip={clip}")

    r = rewards.double()
    groups = int(inverse.max()) + 1
    count = torch.zeros(groups, dtype=r.dtype, device=r.device).index_add_(0, inverse, torch.ones_like(r))
    mean = torch.zeros_like(count).index_add_(0, inverse, r) / count
    dev = r - mean[inverse]
    if global_std:
        std = r.std(correction=0).expand(n)
    else:
        std = (torch.zeros_like(count).index_add_(0, inverse, dev.square()) / count).sqrt()[inverse]
    hi = torch.full_like(count, -torch.inf).scatter_reduce_(0, inverse, r, "amax")
    lo = torch.full_like(count, torch.inf).scatter_reduce_(0, inverse, r, "amin")
    constant = (hi == lo)[inverse]
    adv = torch.where(constant, torch.zeros_like(dev), dev / (std + eps))
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv.to(rewards.dtype)


# ----------------------------------------------------------------------------------------------- reductions

def _check_pair(a: torch.Tensor, b: torch.Tensor, a_name: str, b_name: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{a_name} {tuple(a.shape)} and {b_name} {tuple(b.shape)} must have the same shape")
    if a.ndim not in (1, 2):
        raise ValueError(f"{a_name} must be [B] (one log-prob per sample) or [B, T] (per token), "
                         f"got shape {tuple(a.shape)}")


def _valid_mask(like: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The float mask of valid elements; all ones when no mask is given."""
    if mask is None:
        return torch.ones_like(like)
    if like.ndim != 2 or mask.shape != like.shape:
        raise ValueError(f"mask must be [B, T] like the per-token log-probs {tuple(like.shape)}, "
                         f"got {tuple(mask.shape)}")
    return mask.to(like.dtype)


def _zero_padding(mask: torch.Tensor | None, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Put 0 in every padded position, so that whatever the padding holds (a huge or -inf log-prob) can neither
    overflow exp() nor send NaN through 0 * inf into the loss or its gradient."""
    if mask is None:
        return xs
    valid = mask.bool()
    return tuple(torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device)) for x in xs)


def masked_reduce(x: torch.Tensor, mask: torch.Tensor | None = None,
                  reduction: str = "sequence_mean") -> torch.Tensor:
    """Reduce per-element values x [B] or [B, T] to a scalar.

    "sequence_mean": 1/G sum_i 1/|o_i| sum_t x_it, the GRPO paper's objective (every sequence weighs the same);
    "token_mean": sum_it x_it / sum_i |o_i|, DAPO's token-level mean (every token weighs the same, so long sequences
    weigh more). For x [B] (one value per sample, Flow-GRPO) both are the plain mean. A sequence with no valid token
    contributes 0 to the sequence mean (its 1/|o_i| is taken as 1).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    m = _valid_mask(x, mask)
    if x.ndim == 1:
        return x.mean()
    (x,) = _zero_padding(mask, x)
    if reduction == "token_mean":
        return x.sum() / m.sum().clamp(min=1)
    return (x.sum(1) / m.sum(1).clamp(min=1)).mean()


def _stats_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return ((x * m).sum() / m.sum().clamp(min=1)).detach()


# ----------------------------------------------------------------------------------------------- policy loss

def clipped_policy_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, clip_eps: float,
                        mask: torch.Tensor | None = None,
                        reduction: str = "sequence_mean") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The PPO/GRPO clipped surrogate, negated: L = reduce(max(-A r, -A clip(r, 1-eps, 1+eps))), r = exp(logp_new -
    logp_old) (Flow-GRPO's `torch.maximum(unclipped_loss, clipped_loss)`; GRPO eq. 3 per token).

    logp_new / logp_old: [B] (one per sample, a Flow-GRPO step) or [B, T] (per token, the captioner) with `mask`
    [B, T] marking real tokens; advantages: [B] (broadcast over tokens) or the shape of logp_new.
    Returns (loss, stats): clip_frac (share of valid elements with |r - 1| > eps, Flow-GRPO's `clipfrac`), ratio
    mean/min/max over valid elements, approx_kl = mean 0.5 (logp_new - logp_old)^2 (Flow-GRPO's `approx_kl`).
    """
    _check_pair(logp_new, logp_old, "logp_new", "logp_old")
    if clip_eps <= 0:
        raise ValueError(f"clip_eps must be > 0, got {clip_eps}")
    if advantages.shape == logp_new.shape[:1] and logp_new.ndim == 2:
        advantages = advantages[:, None].expand_as(logp_new)
    elif advantages.shape != logp_new.shape:
        raise ValueError(f"advantages must be [B]={tuple(logp_new.shape[:1])} or {tuple(logp_new.shape)}, "
                         f"got {tuple(advantages.shape)}")
    m = _valid_mask(logp_new, mask)
    logp_new, logp_old, advantages = _zero_padding(mask, logp_new, logp_old.detach(), advantages.detach())
    log_ratio = logp_new - logp_old
    ratio = log_ratio.exp()
    per_elem = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps))
    loss = masked_reduce(per_elem, mask, reduction)

    with torch.no_grad():
        valid = m > 0
        r = ratio.detach()
        stats = {
            "clip_frac": _stats_mean(((r - 1).abs() > clip_eps).to(m.dtype), m),
            "ratio_mean": _stats_mean(r, m),
            "ratio_min": torch.where(valid, r, torch.inf).amin(),
            "ratio_max": torch.where(valid, r, -torch.inf).amax(),
            "approx_kl": _stats_mean(0.5 * log_ratio.detach().square(), m),
        }
    return loss, stats


# ----------------------------------------------------------------------------------------------- KL penalties

def kl_k3(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Per-element k3 estimator of KL(pi || pi_ref) (Schulman 2020; GRPO eq. 4): exp(d) - d - 1 with d = logp_ref -
    logp. It is >= 0 and exactly 0 where the two agree; expm1 keeps it accurate for the tiny d of early training."""
    if logp.shape != logp_ref.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and logp_ref {tuple(logp_ref.shape)} must have the same shape")
    d = logp_ref.detach() - logp
    return torch.expm1(d) - d


def kl_gaussian_means(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """Flow-GRPO's KL penalty of one denoising step, per sample [B]:

        KL_i = mean over C,H,W of (mean_i - mean_ref_i)^2 / (2 std^2)

    (scripts/train_sd3.py: `((prev_sample_mean - prev_sample_mean_ref) ** 2).mean(dim=(1,2,3)) / (2 * std_dev_t ** 2)`).
    Pass std = the step's `std_dev_t` (`StepOutput.std_dev_t` of model/flow.py, a sqrt(sigma / (1 - sigma)) for the
    SDE step), NOT the transition std std_dev_t sqrt(-dt): Flow-GRPO divides by std_dev_t^2 without the |dt| factor,
    so this is the exact Gaussian KL scaled by 1/|dt|, and its beta (0.04 in its configs) is tuned for that scale.
    std: a float, a 0-d tensor, [B], or [B, 1, ..., 1]; the reference mean and std are treated as constants."""
    if mean.shape != mean_ref.shape or mean.ndim < 2:
        raise ValueError(f"mean {tuple(mean.shape)} and mean_ref {tuple(mean_ref.shape)} must have the same shape "
                         f"[B, ...]")
    b = mean.shape[0]
    std = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
    if std.numel() == 1:
        std = std.reshape(()).expand(b)
    elif std.shape[0] == b and std.numel() == b:
        std = std.reshape(b)
    else:
        raise ValueError(f"std must be a scalar, [B] or [B, 1, ...] with B={b}, got shape {tuple(std.shape)}")
    sq = (mean - mean_ref.detach()).square().mean(dim=tuple(range(1, mean.ndim)))
    return sq / (2 * std.detach().square())


# ----------------------------------------------------------------------------------------------- combined losses

def grpo_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, logp_ref: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor | None = None, clip_eps: float = 0.2, beta: float = 0.0,
              reduction: str = "sequence_mean") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-level GRPO loss of the captioner, -J with
    J = 1/G sum_i 1/|o_i| sum_t [min(r A_i, clip(r, 1-eps, 1+eps) A_i) - beta KL_t] (GRPO eq. 3) and KL_t = k3;
    `reduction="token_mean"` replaces the per-sequence average by one over all tokens (DAPO).
    logp_new / logp_old / logp_ref: [B, T] per-token log-probs of the sampled tokens under the policy, the sampling
    policy and the reference (may be None when beta == 0); advantages [B]; mask [B, T] True on caption tokens.
    Returns (loss, metrics): the policy stats plus policy_loss and kl (reduced like the loss, whenever logp_ref is
    given)."""
    if logp_new.ndim != 2:
        raise ValueError(f"logp_new must be per-token [B, T], got shape {tuple(logp_new.shape)}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    policy, stats = clipped_policy_loss(logp_new, logp_old, advantages, clip_eps, mask, reduction)
    metrics = {"policy_loss": policy.detach(), **stats}
    if logp_ref is None:
        if beta > 0:
            raise ValueError("beta > 0 needs logp_ref, the reference model's per-token log-probs")
        return policy, metrics
    _check_pair(logp_new, logp_ref, "logp_new", "logp_ref")
    # Reported whenever the reference is given (drift monitoring); part of the loss only with beta > 0.
    kl = masked_reduce(kl_k3(*_zero_padding(mask, logp_new, logp_ref)), mask, reduction)
    metrics["kl"] = kl.detach()
    return (policy + beta * kl if beta > 0 else policy), metrics


def flow_grpo_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor,
                   mean: torch.Tensor | None = None, mean_ref: torch.Tensor | None = None,
                   std: torch.Tensor | float | None = None, clip_eps: float = 1e-4,
                   beta: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Flow-GRPO loss of one denoising step j: L = mean_i max(-A_i r_i, -A_i clip(r_i, 1-eps, 1+eps))
    + beta mean_i KL_i, with r_i = exp(log p_theta(x_{j+1}|x_j) - log p_old(...)) and KL_i the Gaussian-mean KL to
    the reference policy, the new adapter off (`kl_gaussian_means`). logp_*: [B]; advantages [B]; mean / mean_ref:
    the step's predicted means [B, C, H, W] with and without the adapter; std: the step's std_dev_t (see
    kl_gaussian_means).
    Returns (loss, metrics): the policy stats plus policy_loss and kl (whenever the reference means are given)."""
    if logp_new.ndim != 1:
        raise ValueError(f"logp_new must be one log-prob per sample [B], got shape {tuple(logp_new.shape)}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    policy, stats = clipped_policy_loss(logp_new, logp_old, advantages, clip_eps)
    metrics = {"policy_loss": policy.detach(), **stats}
    if mean is None or mean_ref is None or std is None:
        if beta > 0:
            raise ValueError("beta > 0 needs mean, mean_ref and std of the step for the KL term")
        return policy, metrics
    if mean.shape[0] != logp_new.shape[0]:
        raise ValueError(f"mean has batch {mean.shape[0]} but logp_new has {logp_new.shape[0]}")
    # The KL is reported whenever the reference is given (drift monitoring); it enters the loss only with beta > 0.
    kl = kl_gaussian_means(mean, mean_ref, std).mean()
    metrics["kl"] = kl.detach()
    return (policy + beta * kl if beta > 0 else policy), metrics


# ----------------------------------------------------------------------------------------------- EMA

class EMA:
    """Exponential moving average of a list of parameters, kept in fp32 (Flow-GRPO evaluates with an EMA of the
    LoRA adapters, `EMAModuleWrapper`).

    update(): every `update_every`-th call, ema += (1 - d) (p - ema) with d = min(decay, (1 + t) / (10 + t)) when
    `warmup` (Flow-GRPO's `get_current_decay`, t = calls to update() before this one), else d = decay; Flow-GRPO uses
    decay 0.9 every 8 steps. `with ema.swap():` puts the averages into the parameters and restores the trained
    values on exit, also on an exception.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], decay: float = 0.9, update_every: int = 1,
                 warmup: bool = True):
        self.params = list(params)
        if not self.params:
            raise ValueError("EMA needs at least one parameter")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {update_every}")
        self.decay = decay
        self.update_every = update_every
        self.warmup = warmup
        self.num_calls = 0
        self.shadow = [p.detach().float().clone() for p in self.params]

    def current_decay(self) -> float:
        t = self.num_calls
        return min(self.decay, (1 + t) / (10 + t)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self) -> None:
        d = self.current_decay()
        self.num_calls += 1
        if self.num_calls % self.update_every:
            return
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().float(), 1.0 - d)

    @contextlib.contextmanager
    def swap(self):
        with torch.no_grad():
            trained = [p.detach().clone() for p in self.params]
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield self
        finally:
            with torch.no_grad():
                for p, t in zip(self.params, trained):
                    p.copy_(t)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "update_every": self.update_every, "warmup": self.warmup,
                "num_calls": self.num_calls, "shadow": [s.clone() for s in self.shadow]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        missing = {"decay", "update_every", "warmup", "num_calls", "shadow"} - set(state)
        if missing:
            raise ValueError(f"EMA state is missing {sorted(missing)}")
        shadow = state["shadow"]
        if len(shadow) != len(self.shadow):
            raise ValueError(f"EMA state has {len(shadow)} tensors, this EMA tracks {len(self.shadow)} parameters")
        for i, (mine, theirs) in enumerate(zip(self.shadow, shadow)):
            if mine.shape != theirs.shape:
                raise ValueError(f"EMA state tensor {i} has shape {tuple(theirs.shape)}, "
                                 f"parameter {i} has {tuple(mine.shape)}")
        for mine, theirs in zip(self.shadow, shadow):
            mine.copy_(theirs)
        self.decay, self.update_every = float(state["decay"]), int(state["update_every"])
        self.warmup, self.num_calls = bool(state["warmup"]), int(state["num_calls"])
