"""model/flow.py: schedule and Euler steps against diffusers' FlowMatchEulerDiscreteScheduler, a CFG sampling loop
against a diffusers-driven loop, and the Flow-GRPO SDE / CPS steps against independent float64 formulas."""
import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

from model.flow import (cfg_combine, cps_step_with_logprob, euler_step, flow_sigmas, guided_velocity, sample_ode,
                        sample_sde_trajectory, sde_step_with_logprob, transition_log_prob)
from model.mmdit import MMDiT
from tests.numerics import rel_err


def sd3_scheduler(n: int, shift: float = 3.0) -> FlowMatchEulerDiscreteScheduler:
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(n)
    return scheduler


@pytest.mark.parametrize("n", [1, 2, 7, 28, 40])
def test_schedule_matches_diffusers(n):
    ref = sd3_scheduler(n)
    sigmas = flow_sigmas(n)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (n + 1,)
    assert torch.equal(sigmas, ref.sigmas)
    assert torch.equal(sigmas[:-1] * 1000, ref.timesteps)


@pytest.mark.parametrize("shift", [1.0, 5.5])
def test_schedule_other_shifts(shift):
    assert torch.equal(flow_sigmas(13, shift=shift), sd3_scheduler(13, shift).sigmas)


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_schedule_bad_steps(bad):
    with pytest.raises(ValueError, match="num_steps"):
        flow_sigmas(bad)


def test_euler_step_matches_scheduler_step():
    torch.manual_seed(0)
    n = 7
    ref = sd3_scheduler(n)
    sigmas = flow_sigmas(n)
    x = torch.randn(3, 16, 5, 7)
    for i, t in enumerate(ref.timesteps):
        v = torch.randn_like(x)
        expected = ref.step(v, t, x).prev_sample
        ours = euler_step(v, x, sigmas[i], sigmas[i + 1])
        assert torch.equal(ours, expected)
        x = expected
    # per-sample sigmas: each row takes its own step of the schedule
    steps = [0, 3, 6]
    v = torch.randn_like(x)
    ours = euler_step(v, x, sigmas[steps], sigmas[[s + 1 for s in steps]])
    for row, s in enumerate(steps):
        ref._step_index = s
        assert torch.equal(ours[row], ref.step(v[row:row + 1], ref.timesteps[s], x[row:row + 1]).prev_sample[0])


TINY_DIT = dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=20, caption_projection_dim=16, pooled_projection_dim=12,
                pos_embed_max_size=16, qk_norm="rms_norm")


@pytest.fixture(scope="module")
def dits(tmp_path_factory):
    """A tiny random diffusers SD3 transformer and our MMDiT loaded from its saved folder."""
    torch.manual_seed(0)
    ref = SD3Transformer2DModel(**TINY_DIT).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.2)
    folder = tmp_path_factory.mktemp("dit") / "transformer"
    ref.save_pretrained(folder, safe_serialization=True)
    return ref, MMDiT.from_pretrained(folder).eval()


@pytest.mark.parametrize("guidance", [4.5, None])
def test_cfg_ode_loop_matches_diffusers_loop(dits, guidance):
    ref, ours = dits
    torch.manual_seed(1)
    b, n = 2, 5
    noise = torch.randn(b, 16, 6, 10)
    # uncond + cond contexts of 7 tokens, the shorter captions right-padded with a repeated pad embedding
    context = torch.randn(2 * b, 7, 20)
    context[1, 4:] = context[3, 5:] = torch.randn(20)
    pooled = torch.randn(1, 12).expand(2 * b, 12)
    if guidance is None:
        context, pooled = context[b:], pooled[b:]

    scheduler = sd3_scheduler(n)
    latents = noise.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            inp = latents if guidance is None else torch.cat([latents] * 2)
            v = ref(hidden_states=inp, timestep=t.expand(inp.shape[0]), encoder_hidden_states=context,
                    pooled_projections=pooled).sample
            if guidance is not None:
                v_uncond, v_cond = v.chunk(2)
                v = v_uncond + guidance * (v_cond - v_uncond)
            latents = scheduler.step(v, t, latents).prev_sample

        seen = []

        def velocity_fn(x, timestep):
            seen.append(timestep)
            return ours(x, timestep, context, pooled)

        out = sample_ode(velocity_fn, noise, flow_sigmas(n), guidance_scale=guidance)
    assert rel_err(out, latents) <= 1e-5
    assert len(seen) == n and torch.equal(seen[0], scheduler.timesteps[0].expand(context.shape[0]))


def flow_grpo_reference(v, x, sigma, sigma_next, a, eps, sigma_1, method):
    """Flow-GRPO's SDE / CPS transition written independently in float64 numpy: (mean, std, sample, std_dev_t), std
    the transition's standard deviation and std_dev_t what Flow-GRPO's step returns (its KL scale)."""
    v, x, eps = (t.double().numpy() for t in (v, x, eps))
    s = np.asarray(sigma, dtype=np.float64).reshape(-1, 1, 1, 1)
    sn = np.asarray(sigma_next, dtype=np.float64).reshape(-1, 1, 1, 1)
    dt = sn - s
    if method == "sde":
        std_dev_t = a * np.sqrt(s / (1 - np.where(s == 1, sigma_1, s)))
        mean = x * (1 + std_dev_t ** 2 / (2 * s) * dt) + v * (1 + std_dev_t ** 2 * (1 - s) / (2 * s)) * dt
        std = std_dev_t * np.sqrt(-dt)
    else:
        std = std_dev_t = sn * np.sin(a * np.pi / 2)
        mean = (x - s * v) * (1 - sn) + (x + (1 - s) * v) * np.sqrt(sn ** 2 - std ** 2)
    return mean, np.broadcast_to(std, s.shape), mean + std * eps, np.broadcast_to(std_dev_t, s.shape)


def test_sde_step_against_gaussian_density():
    torch.manual_seed(2)
    sigmas = flow_sigmas(10)
    x, v, eps = torch.randn(3, 3, 16, 5, 7).unbind(0)
    for sigma, sigma_next in [(sigmas[0], sigmas[1]), (sigmas[4], sigmas[5]), (sigmas[[0, 3, 8]], sigmas[[1, 4, 9]])]:
        prev, log_prob, mean, std, std_dev_t = sde_step_with_logprob(v, x, sigma, sigma_next, 0.7, noise=eps)
        ref_mean, ref_std, ref_prev, ref_std_dev_t = flow_grpo_reference(v, x, sigma, sigma_next, 0.7, eps,
                                                                         sigmas[1].item(), "sde")
        assert rel_err(mean, torch.from_numpy(ref_mean)) <= 1e-5
        assert rel_err(std, torch.from_numpy(ref_std.copy())) <= 1e-5
        # The KL scale has no sqrt(-dt): Flow-GRPO's step returns std_dev_t itself.
        assert rel_err(std_dev_t, torch.from_numpy(ref_std_dev_t.copy())) <= 1e-5
        assert (std_dev_t > std).all()
        assert rel_err(prev, torch.from_numpy(ref_prev)) <= 1e-5
        density = torch.distributions.Normal(torch.from_numpy(ref_mean), torch.from_numpy(ref_std.copy()))
        expected = density.log_prob(prev.double()).mean(dim=(1, 2, 3))
        assert log_prob.shape == (3,) and rel_err(log_prob, expected) <= 1e-5


def test_sde_sigma_1_replaces_sigma_at_one():
    torch.manual_seed(3)
    x, v = torch.randn(2, 2, 16, 4, 4).unbind(0)
    std_default = sde_step_with_logprob(v, x, 1.0, 0.9, 0.5).std
    std_explicit = sde_step_with_logprob(v, x, 1.0, 0.9, 0.5, sigma_1=0.96).std
    dt = 0.9 - 1.0
    assert math.isclose(std_default[0].item(), 0.5 * math.sqrt(1 / (1 - 0.9)) * math.sqrt(-dt), rel_tol=1e-6)
    assert math.isclose(std_explicit[0].item(), 0.5 * math.sqrt(1 / (1 - 0.96)) * math.sqrt(-dt), rel_tol=1e-6)


@pytest.mark.parametrize("step", [sde_step_with_logprob, cps_step_with_logprob])
def test_scoring_reproduces_the_drawn_sample(step):
    torch.manual_seed(4)
    sigmas = flow_sigmas(6)
    x, v = torch.randn(2, 4, 16, 3, 5).unbind(0)
    g = torch.Generator().manual_seed(7)
    prev, log_prob, mean, std, _ = step(v, x, sigmas[2], sigmas[3], 0.8, generator=g)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    assert torch.equal(prev, mean + std * eps)
    prev2, log_prob2, mean2, std2, _ = step(v, x, sigmas[2], sigmas[3], 0.8, prev_sample=prev)
    assert torch.equal(prev2, prev) and torch.equal(mean2, mean) and torch.equal(std2, std)
    assert torch.equal(log_prob2, log_prob)
    at_mode = step(v, x, sigmas[2], sigmas[3], 0.8, prev_sample=mean)[1]
    assert (at_mode > log_prob).all()  # the mean itself is the most likely sample


def test_cps_step_formulas():
    torch.manual_seed(5)
    sigmas = flow_sigmas(8)
    x, v, eps = torch.randn(3, 2, 16, 5, 3).unbind(0)
    for i in (0, 3, 6):
        prev, log_prob, mean, std, std_dev_t = cps_step_with_logprob(v, x, sigmas[i], sigmas[i + 1], 0.6, noise=eps)
        ref_mean, ref_std, ref_prev, _ = flow_grpo_reference(v, x, sigmas[i], sigmas[i + 1], 0.6, eps, None, "cps")
        assert rel_err(mean, torch.from_numpy(ref_mean)) <= 1e-5
        assert math.isclose(std.flatten()[0].item(), sigmas[i + 1].item() * math.sin(0.6 * math.pi / 2), rel_tol=1e-6)
        assert torch.equal(std_dev_t, std)
        assert rel_err(prev, torch.from_numpy(ref_prev)) <= 1e-5
        expected = -((torch.from_numpy(ref_prev) - torch.from_numpy(ref_mean)) ** 2).mean(dim=(1, 2, 3))
        assert rel_err(log_prob, expected) <= 1e-5
    # noise level 0: the CPS mean is the Euler step rearranged
    prev, log_prob, *_ = cps_step_with_logprob(v, x, sigmas[3], sigmas[4], 0.0)
    assert torch.allclose(prev, euler_step(v, x, sigmas[3], sigmas[4]), atol=1e-6)
    assert torch.equal(log_prob, torch.zeros(2))


def test_noise_level_zero_is_the_euler_step():
    torch.manual_seed(6)
    sigmas = flow_sigmas(5)
    x, v = torch.randn(2, 3, 16, 4, 6).unbind(0)
    for i in range(5):
        prev, log_prob, mean, *_ = sde_step_with_logprob(v, x, sigmas[i], sigmas[i + 1], 0.0)
        assert torch.equal(prev, euler_step(v, x, sigmas[i], sigmas[i + 1])) and torch.equal(mean, prev)
        assert torch.equal(log_prob, torch.zeros(3))


@pytest.mark.parametrize("step", [sde_step_with_logprob, cps_step_with_logprob])
def test_steps_compute_in_fp32_from_bf16(step):
    torch.manual_seed(7)
    x, v, eps = torch.randn(3, 2, 16, 4, 4).unbind(0)
    xb, vb = x.bfloat16(), v.bfloat16()
    sigmas = flow_sigmas(4)
    low = step(vb, xb, sigmas[1], sigmas[2], 0.7, noise=eps)
    high = step(vb.float(), xb.float(), sigmas[1], sigmas[2], 0.7, noise=eps)
    for a, b in zip(low, high):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    euler = euler_step(vb, xb, sigmas[1], sigmas[2])
    assert euler.dtype == torch.float32 and torch.equal(euler, euler_step(vb.float(), xb.float(), sigmas[1], sigmas[2]))


class LinearVelocity(torch.nn.Module):
    """v = w * x + c: cheap, deterministic, with parameters to differentiate."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.7))
        self.c = torch.nn.Parameter(torch.randn(16, 1, 1))
        self.grad_enabled = []

    def forward(self, x, timestep):
        self.grad_enabled.append(torch.is_grad_enabled())
        return self.w * x * (1 + timestep.view(-1, 1, 1, 1) / 1000) + self.c


def cfg_velocity(model):
    """uncond rows see c = 0: [v_uncond; v_cond] for a batch doubled by the sampler."""
    def fn(x, timestep):
        v = model(x, timestep)
        b = x.shape[0] // 2
        return torch.cat([v[:b] - model.c, v[b:]])
    return fn


@pytest.mark.parametrize("method", ["sde", "cps"])
def test_trajectory_window_and_rescoring(method):
    torch.manual_seed(8)
    model = LinearVelocity()
    sigmas = flow_sigmas(6)
    noise = torch.randn(2, 16, 3, 5)
    fn = cfg_velocity(model)
    traj = sample_sde_trajectory(fn, noise, sigmas, noise_level=0.7, guidance_scale=3.0, sde_window=(1, 3),
                                 method=method, generator=torch.Generator().manual_seed(0))
    assert traj.latents.shape == (2, 7, 16, 3, 5) and traj.means.shape == (2, 6, 16, 3, 5)
    assert traj.log_probs.shape == (2, 6) and traj.stds.shape == (2, 6)
    assert traj.sde_mask.tolist() == [False, True, True, False, False, False]
    assert torch.equal(traj.timesteps, sigmas[:-1] * 1000) and torch.equal(traj.latents[:, 0], noise)
    assert not traj.latents.requires_grad
    step = sde_step_with_logprob if method == "sde" else cps_step_with_logprob
    for i in range(6):
        x = traj.latents[:, i]
        with torch.no_grad():
            v_u, v_c = fn(torch.cat([x, x]), (sigmas[i] * 1000).expand(4)).chunk(2)
        v = v_u + 3.0 * (v_c - v_u)
        if traj.sde_mask[i]:
            _, log_prob, mean, std, _ = step(v, x, sigmas[i], sigmas[i + 1], 0.7, prev_sample=traj.latents[:, i + 1])
            assert torch.allclose(log_prob, traj.log_probs[:, i], rtol=1e-5, atol=1e-6)
            assert torch.allclose(mean, traj.means[:, i], atol=1e-6) and (traj.stds[:, i] > 0).all()
            assert not torch.allclose(traj.latents[:, i + 1], euler_step(v, x, sigmas[i], sigmas[i + 1]))
        else:
            assert torch.allclose(traj.latents[:, i + 1], euler_step(v, x, sigmas[i], sigmas[i + 1]), atol=1e-6)
            assert torch.equal(traj.log_probs[:, i], torch.zeros(2)) and torch.equal(traj.stds[:, i], torch.zeros(2))


def test_trajectory_default_window_ends_with_an_ode_step():
    torch.manual_seed(9)
    traj = sample_sde_trajectory(LinearVelocity(), torch.randn(1, 16, 2, 2), flow_sigmas(4),
                                 generator=torch.Generator().manual_seed(1))
    assert traj.sde_mask.tolist() == [True, True, True, False]
    assert torch.isfinite(traj.log_probs).all() and traj.log_probs[0, -1] == 0


def test_gradients_through_the_sampler():
    torch.manual_seed(10)
    noise = torch.randn(2, 16, 3, 3)
    sigmas = flow_sigmas(5)
    model = LinearVelocity()
    traj = sample_sde_trajectory(model, noise, sigmas, generator=torch.Generator().manual_seed(2), grad=True)
    traj.latents[:, -1].square().mean().backward()
    assert model.w.grad is not None and model.w.grad != 0 and model.c.grad.abs().sum() > 0

    model = LinearVelocity()
    traj = sample_sde_trajectory(model, noise, sigmas, generator=torch.Generator().manual_seed(2))
    assert not traj.latents.requires_grad and not any(model.grad_enabled)
    # grad=True works even when the caller is under no_grad
    with torch.no_grad():
        traj = sample_sde_trajectory(model, noise, sigmas, generator=torch.Generator().manual_seed(2), grad=True)
    assert traj.latents[:, -1].requires_grad


def test_truncated_backprop_matches_detached_prefix():
    torch.manual_seed(11)
    noise = torch.randn(2, 16, 3, 3)
    sigmas = flow_sigmas(5)
    model = LinearVelocity()
    traj = sample_sde_trajectory(model, noise, sigmas, noise_level=0.5, generator=torch.Generator().manual_seed(3),
                                 grad=True, grad_last_k=2)
    assert model.grad_enabled == [False, False, False, True, True]
    traj.latents[:, -1].sum().backward()
    # The last two steps replayed by hand from the stored latent, with the noise the SDE step drew.
    expected_model = LinearVelocity()
    expected_model.load_state_dict(model.state_dict())
    eps = ((traj.latents[:, 4] - traj.means[:, 3]) / traj.stds[:, 3].view(-1, 1, 1, 1)).detach()
    x = traj.latents[:, 3].detach()
    x = sde_step_with_logprob(expected_model(x, (sigmas[3] * 1000).expand(2)), x, sigmas[3], sigmas[4], 0.5,
                              noise=eps)[0]
    x = euler_step(expected_model(x, (sigmas[4] * 1000).expand(2)), x, sigmas[4], sigmas[5])
    assert torch.allclose(x, traj.latents[:, -1], atol=1e-5)
    x.sum().backward()
    assert torch.allclose(model.w.grad, expected_model.w.grad, rtol=1e-4)
    assert torch.allclose(model.c.grad, expected_model.c.grad, rtol=1e-4)


def test_sample_ode_grad_last_k_truncates_the_graph():
    torch.manual_seed(12)
    noise, sigmas = torch.randn(1, 16, 2, 2), flow_sigmas(4)
    model = LinearVelocity()
    x = sample_ode(model, noise, sigmas, grad_last_k=1)
    assert model.grad_enabled == [False, False, False, True] and x.requires_grad
    model.grad_enabled.clear()
    full = sample_ode(model, noise, sigmas)
    assert model.grad_enabled == [True] * 4
    with torch.no_grad():
        plain = sample_ode(model, noise, sigmas)
    assert torch.equal(plain, full.detach()) and torch.equal(plain, x.detach())


def test_step_noise_fixes_each_steps_draw_whatever_the_batch():
    # A trajectory of rows [0, 2] with their rows of a global step_noise equals those rows of the full batch.
    torch.manual_seed(13)
    model, sigmas = LinearVelocity(), flow_sigmas(5)
    noise, step_noise = torch.randn(4, 16, 3, 3), torch.randn(4, 5, 16, 3, 3)
    full = sample_sde_trajectory(model, noise, sigmas, step_noise=step_noise)
    part = sample_sde_trajectory(model, noise[[0, 2]], sigmas, step_noise=step_noise[[0, 2]])
    assert torch.equal(part.latents, full.latents[[0, 2]]) and torch.equal(part.log_probs, full.log_probs[[0, 2]])
    eps = (full.latents[:, 2] - full.means[:, 1]) / full.stds[:, 1].view(-1, 1, 1, 1)
    torch.testing.assert_close(eps, step_noise[:, 1], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="step_noise"):
        sample_sde_trajectory(model, noise, sigmas, step_noise=step_noise[:, :4])


def test_cfg_combine_detached_unconditional_branch():
    v_u = torch.randn(2, 16, 3, 3, requires_grad=True)
    v_c = torch.randn(2, 16, 3, 3, requires_grad=True)
    out = cfg_combine(v_u, v_c, 4.5)
    torch.testing.assert_close(out, v_u + 4.5 * (v_c - v_u))
    out.sum().backward()
    torch.testing.assert_close(v_u.grad, torch.full_like(v_u, 1 - 4.5))
    v_u.grad = v_c.grad = None
    out_d = cfg_combine(v_u, v_c, 4.5, detach_uncond=True)
    assert torch.equal(out_d, out.detach())
    out_d.sum().backward()
    assert v_u.grad is None and torch.equal(v_c.grad, torch.full_like(v_c, 4.5))


def test_transition_log_prob_rescores_the_rollout_with_the_unconditional_branch_detached():
    # Flow-GRPO's compute_log_prob: re-scoring a sampled step under the sampling policy gives its log-prob back, and
    # with CFG the gradient reaches only the conditional branch (train_sd3.py detaches noise_pred_uncond).
    torch.manual_seed(14)
    model, sigmas = LinearVelocity(), flow_sigmas(6)
    fn = cfg_velocity(model)
    traj = sample_sde_trajectory(fn, torch.randn(2, 16, 3, 5), sigmas, guidance_scale=3.0,
                                 generator=torch.Generator().manual_seed(0))
    j = 2
    out = transition_log_prob(fn, traj.latents[:, j], traj.latents[:, j + 1], sigmas[j], sigmas[j + 1], 0.7, 3.0)
    torch.testing.assert_close(out.log_prob, traj.log_probs[:, j], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.mean, traj.means[:, j], rtol=1e-5, atol=1e-5)

    def branch_grads(detach_uncond):
        # A parameter that only the unconditional half sees: its gradient measures that branch alone.
        u = torch.zeros((), requires_grad=True)

        def velocity(x, t):
            v = fn(x, t)
            b = x.shape[0] // 2
            return torch.cat([v[:b] + u * x[:b], v[b:]])

        r = transition_log_prob(velocity, traj.latents[:, j], traj.latents[:, j + 1], sigmas[j], sigmas[j + 1], 0.7,
                                3.0, detach_uncond=detach_uncond)
        r.log_prob.sum().backward()
        return 0.0 if u.grad is None else abs(u.grad.item())

    assert branch_grads(detach_uncond=True) == 0
    assert branch_grads(detach_uncond=False) > 0  # what the previous code let through
    v = guided_velocity(fn, traj.latents[:, j], sigmas[j], 3.0, detach_uncond=True)
    assert torch.equal(v, guided_velocity(fn, traj.latents[:, j], sigmas[j], 3.0))


def test_bad_inputs():
    x = torch.zeros(2, 16, 4, 4)
    sigmas = flow_sigmas(3)
    fn = LinearVelocity()
    for step in (sde_step_with_logprob, cps_step_with_logprob):
        for level in (-0.1, 1.0, 1.5):
            with pytest.raises(ValueError, match="noise_level"):
                step(x, x, 1.0, 0.5, level)
        with pytest.raises(ValueError, match="prev_sample shape"):
            step(x, x, 1.0, 0.5, 0.5, prev_sample=x[:1])
        with pytest.raises(ValueError, match="noise shape"):
            step(x, x, 1.0, 0.5, 0.5, noise=x[..., :2])
    with pytest.raises(ValueError, match="sigma_1"):
        sde_step_with_logprob(x, x, 1.0, 0.5, 0.5, sigma_1=1.0)
    with pytest.raises(ValueError, match="sigma_next must lie"):
        euler_step(x, x, 0.5, 0.5)
    with pytest.raises(ValueError, match="sigma must lie"):
        euler_step(x, x, 1.2, 0.5)
    with pytest.raises(ValueError, match="sigma must lie"):
        sde_step_with_logprob(x, x, 0.0, 0.0, 0.5)
    with pytest.raises(ValueError, match=r"sigma must be a scalar or a \[B=2\]"):
        euler_step(x, x, torch.ones(3), 0.5)
    with pytest.raises(ValueError, match="shapes differ"):
        euler_step(x[:, :3], x, 1.0, 0.5)
    with pytest.raises(ValueError, match="sigmas must be"):
        sample_ode(fn, x, torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"\[v_uncond; v_cond\]"):
        sample_ode(lambda x, t: x[: x.shape[0] // 2], x, sigmas, guidance_scale=2.0)
    with pytest.raises(ValueError, match="noise_level"):
        sample_sde_trajectory(fn, x, sigmas, noise_level=1.0)
    with pytest.raises(ValueError, match="method"):
        sample_sde_trajectory(fn, x, sigmas, method="ddim")
    for window in ((0, 4), (2, 1), (-1, 2), (0.5, 2)):
        with pytest.raises(ValueError, match="sde_window"):
            sample_sde_trajectory(fn, x, sigmas, sde_window=window)
    with pytest.raises(ValueError, match="grad_last_k"):
        sample_sde_trajectory(fn, x, sigmas, grad_last_k=2)
    with pytest.raises(ValueError, match="grad_last_k"):
        sample_sde_trajectory(fn, x, sigmas, grad=True, grad_last_k=0)
