"""train/grpo_decoder.py (Flow-GRPO on the decoder): shortened tiny runs, in-process, and one 2-process torchrun run.

Invariants: ratio == 1 and zero KL before the first update; noise level 0 makes the rollout the Euler ODE trajectory;
the adapters-off reference is the frozen base; metrics.jsonl fields; --help; resume == uninterrupted run; a checkpoint
of other options is refused; a save killed part-way never leaves a checkpoint that loads wrong; 2 processes == 1.
"""
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import train.grpo_decoder as gd
from model.flow import flow_sigmas, guided_velocity, sample_ode
from model.lora import apply_lora, load_lora, lora_disabled, lora_layers
from model.uae import DIT_LORA_TARGETS, UAE
from tests.run_helpers import one_thread  # noqa: F401 (an autouse fixture)
from tests.run_helpers import adapter, last_ckpt, rows, torchrun_two, trained, without_time
from train.common import Dist

ROOT = Path(__file__).resolve().parents[1]
# Small and fast: 1 image x G 4, 4 denoising steps (3 trained), tiny LoRA, the KL penalty on (so KL is logged).
FAST = ["--images-per-step", "1", "--group-size", "4", "--sample-steps", "4", "--procedural-images", "2",
        "--lora-rank", "4", "--lora-alpha", "8", "--lr", "1e-2", "--beta", "0.04", "--size", "64", "--device", "cpu"]


def test_help_lists_options_with_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        gd.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag, default in [("--group-size", "64"), ("--noise-level", "0.7"), ("--beta", "0.0"),
                          ("--clip-eps", "0.0001"), ("--ema-decay", "0.95"), ("--resume", "False")]:
        entry = re.split(r"\n  " + flag + r"[ ,]", text, maxsplit=1)[1].split("\n  --", 1)[0]  # its help entry
        assert f"(default: {default})" in " ".join(entry.split()), (flag, entry)
    assert "--sde-window" in text and "--lora-targets" in text


def test_first_step_invariants_and_metrics_fields(tmp_path):
    out = tmp_path / "run"
    gd.main(FAST + ["--steps", "2", "--out", str(out)])
    r = rows(out)
    assert [x["step"] for x in r] == [1, 2]
    for key in ("loss", "reward_mean", "reward_std", "kl", "clip_frac", "ratio_mean", "ratio_min", "ratio_max",
                "grad_norm", "s_per_step", "policy_loss", "approx_kl"):
        assert key in r[0], key
    # Before the first update the policy is the sampling policy and the adapters (B = 0) change nothing.
    assert r[0]["ratio_min"] == pytest.approx(1.0, abs=1e-6) and r[0]["ratio_max"] == pytest.approx(1.0, abs=1e-6)
    assert r[0]["clip_frac"] == 0.0 and r[0]["kl"] == 0.0
    # One optimizer step later the adapters moved: nonzero KL to the reference.
    assert r[1]["kl"] > 0
    assert 0 < r[0]["reward_mean"] <= 1 and r[0]["reward_std"] > 0
    assert last_ckpt(out).name == "step_00000002"
    # The EMA adapter is a real average: neither the trained adapter nor the initial one.
    a, e = adapter(trained(out, "dit")), adapter(trained(out, "dit", ema=True))
    assert a.keys() == e.keys()
    b_keys = [k for k in a if "lora_B" in k]
    assert any(not torch.equal(a[k], e[k]) for k in b_keys) and any(e[k].abs().max() > 0 for k in b_keys)


def test_default_run_raises_the_reward(tmp_path):
    # The no-argument tiny preset, shortened from 60 to 30 steps (~25 s on one thread). Each logged reward_mean is
    # the mean of G=64 rewards (std ~0.022), so a 5-step window mean has a standard error of ~0.0013 and the
    # first-5 -> last-5 difference ~0.0018. Measured rises: seed 0 (this test) 0.016 (~9 SE); seeds 1 and 2 (other
    # random tiny models and rewards) 0.006 and 0.008. The margin 0.008 is ~4.5 SE and half the seed-0 rise.
    out = tmp_path / "run"
    gd.main(["--steps", "30", "--device", "cpu", "--save-every", "1000", "--out", str(out)])
    m = [r["reward_mean"] for r in rows(out)]
    first, last = sum(m[:5]) / 5, sum(m[-5:]) / 5
    assert last - first > 0.008, (first, last, m)


def test_minibatches_split_by_global_index(tmp_path):
    # Several optimizer steps per rollout: the ratio leaves 1 after the first minibatch, and a bad split is an error.
    out = tmp_path / "run"
    gd.main(FAST + ["--steps", "1", "--minibatches", "2", "--inner-epochs", "2", "--clip-eps", "0.2",
                    "--out", str(out)])
    r = rows(out)[0]
    assert r["ratio_max"] > 1 or r["ratio_min"] < 1
    with pytest.raises(ValueError, match="minibatches"):
        gd.main(FAST + ["--steps", "1", "--minibatches", "3", "--out", str(tmp_path / "bad")])


def test_sde_steps_window():
    o = gd.Options(sample_steps=10)
    assert gd.sde_steps_of(o) == list(range(9))
    assert gd.sde_steps_of(replace(o, sde_window="2:5")) == [2, 3, 4]
    for bad in ("5:2", "0:10", "x", "3"):
        with pytest.raises(ValueError, match="sde-window"):
            gd.sde_steps_of(replace(o, sde_window=bad))
    with pytest.raises(ValueError, match="sample-steps must be >= 2"):
        gd.sde_steps_of(replace(o, sample_steps=1))


def tiny_setup(lora=True):
    uae = UAE.tiny(0).requires_grad_(False)
    if lora:
        apply_lora(uae.dit, DIT_LORA_TARGETS.split(","), rank=4, alpha=8.0, init="gaussian")
        with torch.no_grad():  # non-zero adapters: the policy differs from the base
            for m in lora_layers(uae.dit).values():
                m.B.weight.normal_(0, 0.05)
    context, negative = uae.condition(["a red circle", "a blue square"], 4.5)
    return uae, context, negative


def test_noise_level_zero_rollout_is_the_ode_trajectory():
    uae, context, negative = tiny_setup()
    o = gd.Options(sample_steps=5, noise_level=0.0)
    sigmas = flow_sigmas(5, shift=uae.settings.shift)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, *uae.latent_shape(1, 64, 64)[1:], generator=g)
    step_noise = torch.randn(2, 5, *noise.shape[1:], generator=g)
    velocity = uae.velocity_fn(context, negative)
    traj = gd.rollout(velocity, noise, step_noise, sigmas, o, gd.sde_steps_of(o), 4.5)
    with torch.no_grad():
        ode = sample_ode(velocity, noise, sigmas, guidance_scale=4.5)
    torch.testing.assert_close(traj.latents[:, -1], ode, rtol=1e-5, atol=1e-5)
    # With the default noise level the same draws give a different (stochastic) endpoint.
    sde = gd.rollout(velocity, noise, step_noise, sigmas, replace(o, noise_level=0.7), gd.sde_steps_of(o), 4.5)
    assert (sde.latents[:, -1] - ode).abs().max() > 1e-2
    assert traj.latents.shape[1] == 6 and traj.log_probs.shape == (2, 5) and torch.all(traj.log_probs[:, -1] == 0)


def test_kl_is_on_flow_grpo_scale_and_skipped_at_beta_zero(monkeypatch):
    # Flow-GRPO's KL: mean_CHW |mu - mu_ref|^2 / (2 std_dev_t^2), std_dev_t = a sqrt(sigma / (1 - sigma)) without
    # the sqrt(-dt) of the transition std (scripts/train_sd3.py); the means recomputed here from the SDE formula.
    uae, context, negative = tiny_setup()
    o = gd.Options(sample_steps=4, noise_level=0.7, beta=0.04)
    sigmas = flow_sigmas(4, shift=uae.settings.shift)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(2, *uae.latent_shape(1, 64, 64)[1:], generator=g)
    velocity = uae.velocity_fn(context, negative)
    steps = gd.sde_steps_of(o)
    traj = gd.rollout(velocity, noise, torch.randn(2, 4, *noise.shape[1:], generator=g), sigmas, o, steps, 4.5)
    stats = gd.train_minibatch(uae.dit, velocity, traj, torch.arange(2), torch.tensor([1.0, -1.0]), o, steps, 4.5)
    for j, st in zip(steps, stats):
        x, s, s_next = traj.latents[:, j], sigmas[j].double(), sigmas[j + 1].double()
        with torch.no_grad():
            v = guided_velocity(velocity, x, sigmas[j], 4.5).double()
            with lora_disabled(uae.dit):
                v_ref = guided_velocity(velocity, x, sigmas[j], 4.5).double()
        std_dev_t = 0.7 * torch.sqrt(s / (1 - (sigmas[1].double() if s == 1 else s)))
        # mean - mean_ref = (v - v_ref) (1 + std_dev_t^2 (1 - s) / (2 s)) dt
        d_mean = (v - v_ref) * (1 + std_dev_t ** 2 * (1 - s) / (2 * s)) * (s_next - s)
        want = (d_mean.square().mean(dim=(1, 2, 3)) / (2 * std_dev_t ** 2)).mean()
        assert float(st["kl"]) == pytest.approx(float(want), rel=1e-4), j
    # beta 0: the reference forward does not run and no KL is reported.
    calls = []
    monkeypatch.setattr(gd, "lora_disabled", lambda m: calls.append(m) or pytest.fail("reference forward at beta 0"))
    stats = gd.train_minibatch(uae.dit, velocity, traj, torch.arange(2), torch.tensor([1.0, -1.0]),
                               replace(o, beta=0.0), steps, 4.5)
    assert not calls and all("kl" not in st for st in stats)


def test_training_forward_detaches_the_unconditional_branch():
    # A scale u on the unconditional half of the CFG batch: the training loss must not reach it (Flow-GRPO detaches
    # noise_pred_uncond), while the adapters get their gradient through the conditional half.
    uae, context, negative = tiny_setup()
    o = gd.Options(sample_steps=3)
    sigmas = flow_sigmas(3, shift=uae.settings.shift)
    noise = torch.randn(2, *uae.latent_shape(1, 64, 64)[1:], generator=torch.Generator().manual_seed(2))
    velocity = uae.velocity_fn(context, negative)
    traj = gd.rollout(velocity, noise, torch.randn(2, 3, *noise.shape[1:]), sigmas, o, gd.sde_steps_of(o), 4.5)
    u = torch.ones((), requires_grad=True)

    def scaled(x, t):
        v = velocity(x, t)
        b = x.shape[0] // 2
        return torch.cat([u * v[:b], v[b:]])

    gd.train_minibatch(uae.dit, scaled, traj, torch.arange(2), torch.tensor([1.0, -1.0]), o, gd.sde_steps_of(o), 4.5)
    assert u.grad is None or u.grad == 0
    assert any(m.B.weight.grad is not None and m.B.weight.grad.abs().sum() > 0 for m in lora_layers(uae.dit).values())


def test_adapters_off_reference_equals_frozen_base(tmp_path):
    # Train for real, then load the saved adapter into a fresh tiny UAE: adapters off must be the untouched base.
    out = tmp_path / "run"
    gd.main(FAST + ["--steps", "2", "--out", str(out)])
    base, context, negative = tiny_setup(lora=False)
    model = UAE.tiny(0).requires_grad_(False)
    load_lora(model.dit, trained(out, "dit"))
    x = torch.randn(2, *model.latent_shape(1, 64, 64)[1:], generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor(0.7)
    with torch.no_grad():
        v_base = guided_velocity(base.velocity_fn(context, negative), x, sigma, 4.5)
        v_on = guided_velocity(model.velocity_fn(context, negative), x, sigma, 4.5)
        with lora_disabled(model.dit):
            v_off = guided_velocity(model.velocity_fn(context, negative), x, sigma, 4.5)
    assert torch.equal(v_off, v_base)
    assert (v_on - v_base).abs().max() > 1e-6  # the trained adapters do change the policy


def test_resume_matches_uninterrupted_run(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    # A linear decay after a one-step warmup: the interrupted run's first step has the full run's rate (1 x --lr),
    # and the resumed steps take theirs from the step count, not from the restored optimizer's groups.
    common = FAST + ["--save-every", "1", "--lr-schedule", "linear", "--warmup-steps", "1"]
    gd.main(common + ["--steps", "3", "--out", str(full)])
    gd.main(common + ["--steps", "1", "--out", str(part)])
    gd.main(common + ["--steps", "3", "--out", str(part), "--resume"])
    assert without_time(rows(part)) == without_time(rows(full))
    lrs = [r["lr"] for r in rows(full)]
    assert lrs[0] > 0 and lrs == pytest.approx([lrs[0], lrs[0], lrs[0] / 2], rel=1e-12)
    for ema in (False, True):
        a, b = adapter(trained(full, "dit", ema)), adapter(trained(part, "dit", ema))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), ema
    sa = torch.load(last_ckpt(full) / "state.pt", weights_only=True)
    sb = torch.load(last_ckpt(part) / "state.pt", weights_only=True)
    assert sa["sampler"] == sb["sampler"] and sa["step"] == sb["step"] == 3
    for x, y in zip(sa["ema"]["shadow"], sb["ema"]["shadow"]):
        assert torch.equal(x, y)

    # A checkpoint written with other options is refused, and nothing is overwritten.
    with pytest.raises(ValueError, match="group_size"):
        gd.main(common[:2] + ["--group-size", "2"] + common[4:] + ["--steps", "4", "--out", str(part), "--resume"])
    assert last_ckpt(part).name == "step_00000003"


def test_run_folder_rerun_overwrite_and_resume_with_new_lr(tmp_path, capsys):
    out = tmp_path / "run"
    args = FAST + ["--save-every", "1", "--out", str(out)]
    gd.main(args + ["--steps", "2"])
    first = rows(out)
    # The same command again would truncate the metrics and leave step 2 behind: refused, nothing touched.
    with pytest.raises(ValueError, match="already holds a run .*pass --resume to continue it or --overwrite"):
        gd.main(args + ["--steps", "1"])
    assert rows(out) == first and (out / "step_00000002").is_dir()
    # --overwrite starts over: the old run's rows and later checkpoints are gone.
    gd.main(args + ["--steps", "1", "--overwrite"])
    assert [r["step"] for r in rows(out)] == [1] and not (out / "step_00000002").exists()
    assert without_time(rows(out)) == without_time(first[:1])
    # A resumed run takes this command's --lr and --weight-decay (the optimizer state keeps only its moments).
    capsys.readouterr()
    gd.main(args + ["--steps", "2", "--resume", "--lr", "3e-3", "--weight-decay", "0"])
    assert "resume: lr 0.01 -> 0.003 (--lr)" in capsys.readouterr().out
    group = torch.load(last_ckpt(out) / "state.pt", weights_only=True)["optimizer"]["param_groups"][0]
    assert (group["lr"], group["weight_decay"]) == (3e-3, 0.0)
    # Nothing left to do is said, not silent.
    gd.main(args + ["--steps", "2", "--resume"])
    assert "nothing left to train" in capsys.readouterr().out


def test_group_size_one_and_a_constant_reward_are_warned(tmp_path, capsys, monkeypatch):
    gd.main(FAST[:2] + ["--group-size", "1"] + FAST[4:] + ["--steps", "1", "--out", str(tmp_path / "a")])
    assert "--group-size 1: each reward is compared only with itself" in capsys.readouterr().err
    class ConstantReward:  # the interface train.common.group_rewards uses
        def source_features(self, sources):
            return torch.zeros(len(sources), 4)

        def __call__(self, sources, recon, source_features=None):
            return torch.ones(len(recon))

    monkeypatch.setattr(gd, "build_reward", lambda *a: ConstantReward())
    gd.main(FAST + ["--steps", "1", "--out", str(tmp_path / "b")])
    assert "step 1: every sample of each group got the same reward" in capsys.readouterr().err


def test_killed_save_never_leaves_a_checkpoint_that_loads_wrong(tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = FAST + ["--save-every", "1", "--out", str(out)]
    import model.lora

    real = model.lora.save_lora
    calls = {"n": 0}

    def dies_on_second_checkpoint(module, folder, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # checkpoint 2: its adapter is written, then the process dies mid-save
            real(module, folder, *a, **k)
            raise KeyboardInterrupt
        return real(module, folder, *a, **k)

    monkeypatch.setattr(model.lora, "save_lora", dies_on_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        gd.main(args + ["--steps", "3"])
    monkeypatch.setattr(model.lora, "save_lora", real)
    assert last_ckpt(out).name == "step_00000001"
    assert not (out / "step_00000002").exists()
    # Resuming from it continues exactly like a run that was never interrupted.
    gd.main(args + ["--steps", "3", "--resume"])
    ref = tmp_path / "ref"
    gd.main(FAST + ["--save-every", "1", "--out", str(ref), "--steps", "3"])
    assert without_time(rows(out)) == without_time(rows(ref))
    a, b = adapter(trained(out, "dit")), adapter(trained(ref, "dit"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_group_that_does_not_divide_across_ranks_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(gd, "init_distributed", lambda device: Dist(0, 2, 0, torch.device("cpu")))
    monkeypatch.setattr(gd, "build_uae", lambda *a: pytest.fail("must fail before building models"))
    with pytest.raises(ValueError, match="images_per_step \\* group_size=3 does not divide across 2 ranks"):
        gd.main(FAST[:2] + ["--group-size", "3"] + FAST[4:] + ["--steps", "1", "--out", str(tmp_path)])


def test_two_processes_equal_one(tmp_path):
    # lr 1e-3: Adam's first steps are ~lr * g / (|g| + eps), so entries whose gradient is near eps turn fp32
    # reduction-order differences (batch 2 vs 4, per-rank sums) into differences proportional to lr.
    # 3 images x G 2 over 2 ranks: a group straddles the ranks, and ranks hold captions of different lengths
    # (padding must follow the global batch: the DiT has no text mask).
    args = FAST + ["--steps", "2", "--save-every", "2", "--lr", "1e-3", "--images-per-step", "3", "--group-size", "2",
                   "--procedural-images", "3"]
    gd.main(args + ["--out", str(tmp_path / "one")])
    torchrun_two("grpo_decoder.py", args, tmp_path / "two")
    a, b = adapter(trained(tmp_path / "one", "dit")), adapter(trained(tmp_path / "two", "dit"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5)
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)  # the adapters did train
    r1, r2 = rows(tmp_path / "one"), rows(tmp_path / "two")
    for x, y in zip(r1, r2):
        for k in ("reward_mean", "reward_std", "loss", "kl", "ratio_min", "ratio_max", "grad_norm"):
            assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-6), k


def test_dataset_captions_replace_the_captioner(tmp_path, monkeypatch):
    from model.uae import NEGATIVE_PROMPT
    from train.data import procedural_scene

    seen = []
    real_encode = UAE.encode_text

    def refuse(*a, **k):
        raise AssertionError("the captioner must not run with --dataset-captions")

    def record(self, texts, *a, **k):
        seen.extend(t for t in texts if t != NEGATIVE_PROMPT)
        return real_encode(self, texts, *a, **k)

    monkeypatch.setattr(UAE, "caption", refuse)
    monkeypatch.setattr(UAE, "encode_text", record)
    gd.main(FAST + ["--steps", "1", "--out", str(tmp_path / "run"), "--dataset-captions", "--save-every", "100"])
    scenes = {procedural_scene(i, 64, 0)[1] for i in range(2)}
    assert seen and set(seen) <= scenes


def test_adv_std_global_divides_by_the_std_of_all_rewards(tmp_path, monkeypatch):
    # --adv-std global is Flow-GRPO's sample.global_std: group means, one std over the step's rewards.
    seen = []
    real = gd.group_advantages

    def spy(rewards, group_size, **k):
        seen.append((rewards, k["global_std"]))
        return real(rewards, group_size, **k)

    monkeypatch.setattr(gd, "group_advantages", spy)
    args = FAST + ["--images-per-step", "2", "--steps", "1", "--save-every", "9"]
    gd.main(args + ["--out", str(tmp_path / "group")])
    gd.main(args + ["--adv-std", "global", "--out", str(tmp_path / "global")])
    assert [g for _, g in seen] == [False, True] and torch.equal(seen[0][0], seen[1][0])
    r1, r2 = rows(tmp_path / "group")[0], rows(tmp_path / "global")[0]
    assert r1["grad_norm"] != pytest.approx(r2["grad_norm"], rel=1e-3)  # other advantages, another gradient
    with pytest.raises(ValueError, match="--adv-std must be group or global"):
        gd.main(args + ["--adv-std", "batch", "--out", str(tmp_path / "bad")])


def test_init_noise_group_shares_the_starting_noise_within_a_group(tmp_path, monkeypatch):
    # --init-noise group is DanceGRPO's --init_same_noise: an image's G trajectories start from one noise draw and
    # differ only by the SDE steps' noise; the default draws one per trajectory (Flow-GRPO).
    starts = []
    real = gd.rollout

    def spy(velocity_fn, noise, *a, **k):
        starts.append(noise.clone())
        return real(velocity_fn, noise, *a, **k)

    monkeypatch.setattr(gd, "rollout", spy)
    args = FAST + ["--images-per-step", "2", "--steps", "1", "--save-every", "9"]
    gd.main(args + ["--out", str(tmp_path / "trajectory")])
    gd.main(args + ["--init-noise", "group", "--out", str(tmp_path / "group")])
    per_trajectory, per_group = starts
    distinct = {tuple(row.flatten().tolist()) for row in per_trajectory}
    assert len(distinct) == 8
    groups = per_group.view(2, 4, -1)
    assert torch.equal(groups, groups[:, :1].expand_as(groups)) and not torch.equal(groups[0, 0], groups[1, 0])
    assert rows(tmp_path / "group")[0]["reward_std"] > 0  # the SDE steps still spread a group's rewards
    with pytest.raises(ValueError, match="--init-noise must be trajectory or group"):
        gd.main(args + ["--init-noise", "image", "--out", str(tmp_path / "bad")])


def _held_out_jsonl(folder: Path, n: int) -> Path:
    """n procedural scenes (not the training ones: another seed) as an image-caption JSONL."""
    import json

    from train.data import procedural_scene

    folder.mkdir(parents=True)
    lines = []
    for i in range(n):
        image, caption = procedural_scene(i, 64, 7)
        image.save(folder / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "caption": caption}))
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "data.jsonl"


def test_evaluate_redraws_each_image_alone_from_its_own_seed(tmp_path):
    from train.common import build_reward
    from train.data import pil_to_tensor

    data = _held_out_jsonl(tmp_path / "held", 4)
    opts = replace(gd.Options(), eval_data=str(data), eval_images=4, dataset_captions=True, size=64, sample_steps=3,
                   guidance_scale=2.0)
    items = gd.held_out_items(opts)
    uae = UAE.tiny(seed=3)
    reward_fn = build_reward("", True, 0, torch.float32, torch.device("cpu"))
    expected = []
    for i, (image, caption) in enumerate(items):
        recon = uae.generate([caption], 64, 64, 3, 2.0, torch.Generator().manual_seed(gd.EVAL_SEED + i),
                             output_type="tensor")
        source = reward_fn.source_features(pil_to_tensor([image], 64))
        expected.append(float(reward_fn(None, recon, source_features=source)))
    alone = gd.evaluate(uae, reward_fn, items, opts, Dist(0, 1, 0, torch.device("cpu")))
    # The second of two processes draws images 2 and 3 exactly as one process does (no all-gather without a group).
    second = gd.evaluate(uae, reward_fn, items, opts, Dist(1, 2, 0, torch.device("cpu")))
    assert alone.tolist() == pytest.approx(expected, abs=1e-6)
    assert second.tolist() == pytest.approx(expected[2:], abs=1e-6)
    assert len(set(round(x, 4) for x in expected)) == 4  # the scores tell the images apart

    m = gd.eval_metrics(alone + 0.1, alone)
    assert m["eval_gain"] == pytest.approx(0.1) and m["eval_gain_stderr"] == pytest.approx(0.0, abs=1e-6)
    assert m["eval_reward"] == pytest.approx(float(alone.mean()) + 0.1)
    assert m["eval_reward_stderr"] == pytest.approx(float(alone.std()) / 2)

    # More images than the data holds, or a count that does not divide across the processes: clear errors.
    with pytest.raises(gd.UsageError, match="--eval-images 5: --eval-data .*holds only 4"):
        gd.held_out_items(replace(opts, eval_images=5))
    with pytest.raises(gd.UsageError, match="--eval-images=3 does not divide across 2 ranks"):
        gd.evaluate(uae, reward_fn, items[:3], opts, Dist(1, 2, 0, torch.device("cpu")))


def test_held_out_evaluation_rows_and_resume(tmp_path):
    import json

    data = _held_out_jsonl(tmp_path / "held", 2)
    common = FAST + ["--save-every", "1", "--eval-data", str(data), "--eval-every", "2", "--eval-images", "2"]
    full, part = tmp_path / "full", tmp_path / "part"
    gd.main(common + ["--steps", "3", "--out", str(full)])

    def evals(out):
        return [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]

    e = evals(full)
    assert [r["step"] for r in e] == [0, 2, 3]
    assert e[0]["eval_gain"] == 0.0 and len(e[0]["eval_rewards"]) == 2
    for r in e:
        assert r["eval_reward"] == pytest.approx(sum(r["eval_rewards"]) / 2)
        assert r["eval_gain"] == pytest.approx(r["eval_reward"] - e[0]["eval_reward"], abs=1e-6)
    assert e[2]["eval_rewards"] != e[0]["eval_rewards"]  # the EMA adapter moved the images
    # A run of 1 step (evaluated at its end), resumed to 3, logs what the uninterrupted run logged, its gains still
    # from step 0.
    gd.main(common + ["--steps", "1", "--out", str(part)])
    gd.main(common + ["--steps", "3", "--out", str(part), "--resume"])
    assert [r["step"] for r in evals(part)] == [0, 1, 2, 3] and [r for r in evals(part) if r["step"] != 1] == e
    with pytest.raises(gd.UsageError, match="--eval-every must be >= 1, got 0"):
        gd.main(FAST + ["--eval-every", "0", "--out", str(tmp_path / "bad")])
