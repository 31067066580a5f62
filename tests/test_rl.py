"""train/rl.py: every expected value is computed here independently, with numpy or an explicit formula."""
import numpy as np
import pytest
import torch

from tests.numerics import rel_err
from train.rl import (EMA, clipped_policy_loss, flow_grpo_loss, group_advantages, grpo_loss, kl_gaussian_means,
                      kl_k3, masked_reduce)


def np_advantages(r: np.ndarray, g: int, eps=1e-4, clip=None, global_std=False) -> np.ndarray:
    out = np.empty_like(r)
    for s in range(0, len(r), g):
        grp = r[s:s + g]
        std = np.std(r) if global_std else np.std(grp)  # np.std: ddof 0, what Flow-GRPO uses
        out[s:s + g] = (grp - grp.mean()) / (std + eps)
    return out if clip is None else np.clip(out, -clip, clip)


# ----------------------------------------------------------------------------------------------- advantages

def test_group_advantages_match_numpy_population_std():
    torch.manual_seed(0)
    r = torch.randn(7 * 5, dtype=torch.float64)
    got = group_advantages(r, 7, clip=None)
    assert rel_err(got, np_advantages(r.numpy(), 7)) <= 1e-5
    got32 = group_advantages(r.float(), 7, clip=None)
    assert got32.dtype == torch.float32 and rel_err(got32, np_advantages(r.numpy(), 7)) <= 1e-5


def test_group_advantages_global_std():
    torch.manual_seed(1)
    r = torch.rand(3 * 4, dtype=torch.float64)
    got = group_advantages(r, 3, clip=None, global_std=True)
    assert rel_err(got, np_advantages(r.numpy(), 3, global_std=True)) <= 1e-5


def test_zero_variance_group_gives_exact_zeros():
    # 0.1 * 3 / 3 != 0.1 in floating point: a naive (r - mean) / (0 + eps) would give a rounding residue * 1e4.
    r = torch.tensor([0.1, 0.1, 0.1, 1.0, 2.0, 4.0, 7.0, 7.0, 7.0])
    adv = group_advantages(r, 3)
    assert torch.equal(adv[:3], torch.zeros(3)) and torch.equal(adv[6:], torch.zeros(3))
    assert torch.isfinite(adv).all() and adv[3:6].abs().min() > 0.1


def test_advantages_are_clamped():
    r = torch.zeros(50, dtype=torch.float64)
    r[7] = 1.0  # one outlier among 50: (1 - 0.02) / 0.14 = 7.0 > 5
    free = group_advantages(r, 50, clip=None)
    assert rel_err(free, np_advantages(r.numpy(), 50)) <= 1e-5 and free[7] > 6.9
    clamped = group_advantages(r, 50, clip=5.0)
    assert clamped[7].item() == 5.0 and torch.equal(clamped[r == 0], free[r == 0])
    r[7] = -1.0
    assert group_advantages(r, 50)[7].item() == -5.0


def test_group_ids_equal_contiguous_groups():
    torch.manual_seed(2)
    r = torch.randn(12, dtype=torch.float64)
    perm = torch.randperm(12)
    ids = (torch.arange(12) // 4)[perm]
    assert torch.allclose(group_advantages(r[perm], group_ids=ids * 10 + 3), group_advantages(r, 4)[perm],
                          rtol=1e-12, atol=0)


def test_group_advantages_bad_input():
    r = torch.rand(6)
    with pytest.raises(ValueError, match="rewards must be 1-D"):
        group_advantages(r.view(2, 3), 3)
    with pytest.raises(ValueError, match="group_size=4"):
        group_advantages(r, 4)
    with pytest.raises(ValueError, match="exactly one"):
        group_advantages(r)
    with pytest.raises(ValueError, match="exactly one"):
        group_advantages(r, 3, group_ids=torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages(r, group_ids=torch.zeros(6))
    with pytest.raises(ValueError, match="floating"):
        group_advantages(torch.arange(6), 3)


# ----------------------------------------------------------------------------------------------- policy loss

def np_policy_terms(logp_new, logp_old, adv, eps):
    with np.errstate(over="ignore"):  # the garbage in the padding overflows; those entries are never used
        r = np.exp(logp_new - logp_old)
    return np.maximum(-adv * r, -adv * np.clip(r, 1 - eps, 1 + eps)), r


def padded_batch(seed=3, lengths=(1, 5, 3), t=6):
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    mask = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    logp_old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    logp_new = logp_old + 0.5 * torch.randn(b, t, generator=g, dtype=torch.float64)
    logp_new[~mask] = 1e6  # garbage in the padding must not leak into the loss
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    return logp_new, logp_old, adv, mask


def test_ratio_one_gives_minus_mean_advantage_and_no_clipping():
    torch.manual_seed(4)
    logp = torch.randn(5, dtype=torch.float64)
    adv = torch.randn(5, dtype=torch.float64)
    loss, st = clipped_policy_loss(logp, logp.clone(), adv, 0.2)
    assert rel_err(loss, -adv.mean()) <= 1e-12
    assert st["clip_frac"] == 0 and st["ratio_mean"] == 1 and st["ratio_min"] == 1 and st["ratio_max"] == 1
    _, logp_old, adv, mask = padded_batch()
    for red in ("sequence_mean", "token_mean"):
        loss, st = clipped_policy_loss(logp_old.clone(), logp_old, adv, 0.2, mask, red)
        weights = mask.sum(1).double() if red == "token_mean" else torch.ones(3, dtype=torch.float64)
        assert rel_err(loss, -(adv * weights).sum() / weights.sum()) <= 1e-12
        assert st["clip_frac"] == 0


@pytest.mark.parametrize("adv,ratio,expected", [
    (1.0, 1.5, -1.2),   # A > 0, r above 1 + eps: clipped, no incentive to push r further up
    (1.0, 0.5, -0.5),   # A > 0, r below 1 - eps: unclipped, pessimistic -A r
    (-1.0, 1.5, 1.5),   # A < 0, r above 1 + eps: unclipped, pessimistic
    (-1.0, 0.5, 0.8),   # A < 0, r below 1 - eps: clipped
])
def test_clipping_on_both_signs(adv, ratio, expected):
    logp_old = torch.tensor([-2.0], dtype=torch.float64)
    logp_new = logp_old + np.log(ratio)
    loss, st = clipped_policy_loss(logp_new, logp_old, torch.tensor([adv], dtype=torch.float64), 0.2)
    assert abs(loss.item() - expected) <= 1e-12 and st["clip_frac"] == 1
    assert abs(st["ratio_max"].item() - ratio) <= 1e-12


def test_reductions_on_padded_batch():
    logp_new, logp_old, adv, mask = padded_batch()
    terms, r = np_policy_terms(logp_new.numpy(), logp_old.numpy(), adv.numpy()[:, None], 0.2)
    m = mask.numpy()
    seq = np.mean([terms[i, m[i]].mean() for i in range(3)])
    tok = terms[m].sum() / m.sum()
    got_seq, st = clipped_policy_loss(logp_new, logp_old, adv, 0.2, mask, "sequence_mean")
    got_tok, _ = clipped_policy_loss(logp_new, logp_old, adv, 0.2, mask, "token_mean")
    assert rel_err(got_seq, seq) <= 1e-5 and rel_err(got_tok, tok) <= 1e-5
    assert abs(seq - tok) > 1e-3  # the 1-token sequence weighs 1/3 in one reduction and 1/9 in the other
    assert rel_err(st["clip_frac"], (np.abs(r[m] - 1) > 0.2).mean()) <= 1e-12
    assert rel_err(st["ratio_max"], r[m].max()) <= 1e-12 and rel_err(st["ratio_min"], r[m].min()) <= 1e-12
    assert rel_err(st["approx_kl"], (0.5 * (logp_new.numpy() - logp_old.numpy())[m] ** 2).mean()) <= 1e-12


@pytest.mark.parametrize("reduction", ["sequence_mean", "token_mean"])
def test_gradient_matches_closed_form(reduction):
    logp_new, logp_old, adv, mask = padded_batch(seed=5)
    logp_new = logp_new.requires_grad_()
    loss, _ = clipped_policy_loss(logp_new, logp_old, adv, 0.2, mask, reduction)
    loss.backward()
    # d/dlogp of max(-A r, -A clip(r)) is -A r where the unclipped term is the max, 0 where the clip is active.
    with np.errstate(over="ignore"):
        r = np.exp(logp_new.detach().numpy() - logp_old.numpy())
    a = adv.numpy()[:, None]
    m = mask.numpy()
    active = ~(((a > 0) & (r > 1.2)) | ((a < 0) & (r < 0.8)))
    lengths = m.sum(1, keepdims=True)
    weight = 1.0 / (3 * lengths) if reduction == "sequence_mean" else np.full_like(r, 1.0 / m.sum())
    expected = np.where(m & active, -a * r * weight, 0.0)
    assert rel_err(logp_new.grad, expected) <= 1e-5
    assert (logp_new.grad[~mask] == 0).all()


def test_policy_loss_bad_input():
    logp_new, logp_old, adv, mask = padded_batch()
    with pytest.raises(ValueError, match="logp_old"):
        clipped_policy_loss(logp_new, logp_old[:, :3], adv, 0.2, mask)
    with pytest.raises(ValueError, match="advantages"):
        clipped_policy_loss(logp_new, logp_old, adv[:2], 0.2, mask)
    with pytest.raises(ValueError, match="mask"):
        clipped_policy_loss(logp_new, logp_old, adv, 0.2, mask[:, :2])
    with pytest.raises(ValueError, match="reduction"):
        clipped_policy_loss(logp_new, logp_old, adv, 0.2, mask, "sum")
    with pytest.raises(ValueError, match="clip_eps"):
        clipped_policy_loss(logp_new, logp_old, adv, 0.0, mask)
    with pytest.raises(ValueError, match=r"\[B\] .* or \[B, T\]"):
        clipped_policy_loss(logp_new[None], logp_old[None], adv, 0.2)


def test_masked_reduce_empty_sequence_contributes_zero():
    x = torch.tensor([[2.0, 4.0], [9.0, 9.0]])
    mask = torch.tensor([[True, True], [False, False]])
    assert masked_reduce(x, mask, "sequence_mean").item() == 1.5
    assert masked_reduce(x, mask, "token_mean").item() == 3.0


# ----------------------------------------------------------------------------------------------- KL

def test_kl_k3_nonnegative_zero_when_equal_and_formula():
    torch.manual_seed(6)
    logp = -torch.rand(4, 9, dtype=torch.float64) * 5
    ref = logp + torch.randn(4, 9, dtype=torch.float64)
    k = kl_k3(logp, ref)
    d = (ref - logp).numpy()
    assert rel_err(k, np.exp(d) - d - 1) <= 1e-5 and (k >= 0).all()
    assert torch.equal(kl_k3(logp, logp.clone()), torch.zeros_like(logp))
    tiny = kl_k3(torch.tensor([-1.0]), torch.tensor([-1.0 + 1e-4]))
    assert rel_err(tiny, 0.5e-8) <= 1e-3  # exp(d) - d - 1 ~ d^2 / 2, lost to cancellation without expm1
    with pytest.raises(ValueError, match="logp_ref"):
        kl_k3(logp, ref[:, :3])


def test_kl_gaussian_means_formula_and_std_shapes():
    torch.manual_seed(7)
    mean = torch.randn(3, 4, 5, 7, dtype=torch.float64)
    ref = mean + 0.1 * torch.randn(3, 4, 5, 7, dtype=torch.float64)
    std = torch.rand(3, dtype=torch.float64) + 0.1
    expected = ((mean - ref).numpy() ** 2).mean(axis=(1, 2, 3)) / (2 * std.numpy() ** 2)
    for s in (std, std.view(3, 1, 1, 1)):
        assert rel_err(kl_gaussian_means(mean, ref, s), expected) <= 1e-5
    scalar = kl_gaussian_means(mean, ref, 0.3)
    assert rel_err(scalar, ((mean - ref).numpy() ** 2).mean(axis=(1, 2, 3)) / (2 * 0.09)) <= 1e-5
    with pytest.raises(ValueError, match="std must be"):
        kl_gaussian_means(mean, ref, torch.ones(2))
    with pytest.raises(ValueError, match="mean_ref"):
        kl_gaussian_means(mean, ref[:, :2], std)


# ----------------------------------------------------------------------------------------------- combined losses

@pytest.mark.parametrize("reduction", ["sequence_mean", "token_mean"])
def test_grpo_loss_with_kl(reduction):
    logp_new, logp_old, adv, mask = padded_batch(seed=8)
    logp_ref = logp_old - 0.3 * torch.rand_like(logp_old)
    loss, met = grpo_loss(logp_new, logp_old, logp_ref, adv, mask, 0.2, 0.04, reduction=reduction)
    terms, _ = np_policy_terms(logp_new.numpy(), logp_old.numpy(), adv.numpy()[:, None], 0.2)
    d = logp_ref.numpy() - logp_new.numpy()
    m = mask.numpy()
    with np.errstate(over="ignore"):
        per_tok = terms + 0.04 * (np.exp(d) - d - 1)
    if reduction == "sequence_mean":
        expected = np.mean([per_tok[i, m[i]].mean() for i in range(3)])
    else:
        expected = per_tok[m].sum() / m.sum()
    assert rel_err(loss, expected) <= 1e-5
    assert rel_err(met["policy_loss"] + 0.04 * met["kl"], expected) <= 1e-5
    no_kl, met0 = grpo_loss(logp_new, logp_old, None, adv, mask, reduction=reduction)
    assert "kl" not in met0 and rel_err(no_kl, met["policy_loss"]) <= 1e-12


def test_grpo_loss_bad_input():
    logp_new, logp_old, adv, mask = padded_batch()
    with pytest.raises(ValueError, match="logp_ref"):
        grpo_loss(logp_new, logp_old, None, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="logp_ref"):
        grpo_loss(logp_new, logp_old, logp_old[:, :2], adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="per-token"):
        grpo_loss(logp_new[:, 0], logp_old[:, 0], None, adv)
    with pytest.raises(ValueError, match="beta"):
        grpo_loss(logp_new, logp_old, None, adv, mask, beta=-1.0)


def test_flow_grpo_loss_matches_formula():
    torch.manual_seed(9)
    b = 5
    logp_old = -torch.rand(b, dtype=torch.float64)
    logp_new = (logp_old + 2e-4 * torch.randn(b, dtype=torch.float64)).requires_grad_()
    adv = torch.randn(b, dtype=torch.float64)
    mean = torch.randn(b, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    mean_ref = mean.detach() + 0.01 * torch.randn(b, 4, 3, 5, dtype=torch.float64)
    std = (torch.rand(b, dtype=torch.float64) + 0.05).view(b, 1, 1, 1)
    loss, met = flow_grpo_loss(logp_new, logp_old, adv, mean, mean_ref, std, 1e-4, 0.04)
    terms, r = np_policy_terms(logp_new.detach().numpy(), logp_old.numpy(), adv.numpy(), 1e-4)
    kl = ((mean.detach() - mean_ref).numpy() ** 2).mean(axis=(1, 2, 3)) / (2 * std.view(b).numpy() ** 2)
    assert rel_err(loss, terms.mean() + 0.04 * kl.mean()) <= 1e-5
    assert rel_err(met["clip_frac"], (np.abs(r - 1) > 1e-4).mean()) <= 1e-12
    loss.backward()
    assert rel_err(mean.grad, 0.04 * (mean.detach() - mean_ref).numpy()
                   / (std.numpy() ** 2 * mean[0].numel() * b)) <= 1e-5
    with pytest.raises(ValueError, match="mean, mean_ref and std"):
        flow_grpo_loss(logp_new, logp_old, adv, beta=0.04)
    with pytest.raises(ValueError, match="one log-prob per sample"):
        flow_grpo_loss(logp_new[:, None], logp_old[:, None], adv)


# ----------------------------------------------------------------------------------------------- EMA

def test_ema_math_warmup_and_interval():
    p = torch.nn.Parameter(torch.tensor([0.0, 10.0]))
    ema = EMA([p], decay=0.9, warmup=False)
    expected = np.array([0.0, 10.0])
    for value in (1.0, 2.0, 3.0):
        p.data.fill_(value)
        ema.update()
        expected = 0.9 * expected + 0.1 * value
    assert rel_err(ema.shadow[0], expected) <= 1e-6

    q = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([q], decay=0.9, warmup=True, update_every=2)
    expected = np.zeros(3)
    for t in range(6):
        q.data.fill_(float(t + 1))
        ema.update()
        if (t + 1) % 2 == 0:
            d = min(0.9, (1 + t) / (10 + t))  # Flow-GRPO's warm-up
            expected = d * expected + (1 - d) * (t + 1)
    assert rel_err(ema.shadow[0], expected) <= 1e-6


def test_ema_keeps_fp32_of_low_precision_params():
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    ema = EMA([p], decay=0.999, warmup=False)
    p.data.fill_(2.0)
    ema.update()
    assert ema.shadow[0].dtype == torch.float32 and rel_err(ema.shadow[0], np.full(4, 1.001)) <= 1e-6


def test_ema_swap_restores_even_on_error():
    torch.manual_seed(10)
    lin = torch.nn.Linear(3, 2)
    trained = [t.detach().clone() for t in lin.parameters()]
    ema = EMA(lin.parameters(), decay=0.5, warmup=False)
    with torch.no_grad():
        for t in lin.parameters():
            t.add_(1.0)
    ema.update()
    after = [t.detach().clone() for t in lin.parameters()]
    with ema.swap():
        for t, base in zip(lin.parameters(), trained):
            assert torch.allclose(t, base + 0.5, rtol=0, atol=1e-6)
    assert all(torch.equal(t, a) for t, a in zip(lin.parameters(), after))
    with pytest.raises(RuntimeError, match="boom"):
        with ema.swap():
            raise RuntimeError("boom")
    assert all(torch.equal(t, a) for t, a in zip(lin.parameters(), after))


def test_ema_state_dict_roundtrip_and_errors():
    torch.manual_seed(11)
    a = [torch.nn.Parameter(torch.randn(2, 3)), torch.nn.Parameter(torch.randn(5))]
    ema = EMA(a, decay=0.8, update_every=3)
    for _ in range(4):
        with torch.no_grad():
            for p in a:
                p.add_(torch.randn_like(p))
        ema.update()
    b = [torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(5))]
    restored = EMA(b, decay=0.1)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_calls == 4 and restored.decay == 0.8 and restored.update_every == 3
    for p, q in zip(a, b):
        q.data.copy_(p.data)
    ema.update(), restored.update(), ema.update(), restored.update()
    assert all(torch.equal(x, y) for x, y in zip(ema.shadow, restored.shadow))
    with pytest.raises(ValueError, match="2 tensors"):
        EMA([torch.nn.Parameter(torch.zeros(1))]).load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match="tensor 1 has shape"):
        EMA([torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(4))]).load_state_dict(
            ema.state_dict())
    with pytest.raises(ValueError, match="missing"):
        EMA(a).load_state_dict({"shadow": []})
    with pytest.raises(ValueError, match="decay"):
        EMA(a, decay=1.0)


def test_kl_is_reported_without_entering_the_loss_at_beta_zero():
    g = torch.Generator().manual_seed(0)
    logp, old, adv = torch.randn(4, generator=g), torch.randn(4, generator=g), torch.randn(4, generator=g)
    mean, mean_ref = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    loss0, m0 = flow_grpo_loss(logp, old, adv, mean, mean_ref, 0.5, clip_eps=0.2, beta=0.0)
    loss1, m1 = flow_grpo_loss(logp, old, adv, mean, mean_ref, 0.5, clip_eps=0.2, beta=0.1)
    kl = ((mean - mean_ref) ** 2).mean(dim=(1, 2, 3)) / (2 * 0.25)
    torch.testing.assert_close(m0["kl"], kl.mean())
    torch.testing.assert_close(loss0, m0["policy_loss"])
    torch.testing.assert_close(loss1, loss0 + 0.1 * kl.mean())
    tok_new, tok_old, tok_ref = (torch.randn(3, 5, generator=g) for _ in range(3))
    loss, m = grpo_loss(tok_new, tok_old, tok_ref, torch.randn(3, generator=g), beta=0.0)
    k3 = torch.exp(tok_ref - tok_new) - (tok_ref - tok_new) - 1
    torch.testing.assert_close(m["kl"], k3.mean(1).mean())
    torch.testing.assert_close(loss, m["policy_loss"])
