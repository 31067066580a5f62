"""train/grpo_encoder.py (GRPO on the captioner): shortened tiny runs, in-process, and one 2-process torchrun run.

Invariants: ratio == 1 and zero KL before the first update; the adapters-off reference is the frozen base; metrics
fields incl. caption length; --help; resume == uninterrupted run; a checkpoint of other options is refused; 2 == 1.
"""
from pathlib import Path

import pytest
import torch

import train.grpo_encoder as ge
import train.sft_captioner as sft_captioner
from model.handoff import load_handoff, read_handoff
from model.layers import get_attention_backend, set_attention_backend
from model.lora import load_lora, lora_disabled
from model.uae import UAE
from tests.run_helpers import one_thread  # noqa: F401 (an autouse fixture)
from tests.run_helpers import adapter, last_ckpt, rows, torchrun_two, trained, without_time
from train.common import Dist
from train.data import procedural_scene

ROOT = Path(__file__).resolve().parents[1]
# The KL penalty is on (beta 0.04) so the reference forward runs and KL is logged.
FAST = ["--images-per-step", "1", "--group-size", "4", "--max-new-tokens", "8", "--gen-steps", "2", "--beta", "0.04",
        "--lora-rank", "4", "--lora-alpha", "8", "--lr", "1e-2", "--device", "cpu"]


def test_help_lists_options_with_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        ge.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for piece in ("--group-size GROUP_SIZE captions per image (G; paper: 8) (default: 32)", "(default: sequence_mean)",
                  "--clip-eps CLIP_EPS ratio clip range (default: 0.2)", "--resume, --no-resume"):
        assert piece in text, piece


def test_bad_loss_norm_is_refused():
    with pytest.raises(ValueError, match="loss-norm"):
        ge.main(["--loss-norm", "sum"])


def test_default_run_raises_the_reward(tmp_path):
    # The no-argument tiny preset, shortened from 60 to 20 steps (~30 s on one thread). The render noise is fixed, so
    # the reward is a deterministic function of the caption and each logged reward_mean (32 captions) moves by
    # ~0.0004 step to step from the caption sampling alone. Measured (seed 0, this test, inverse-CDF sampling from
    # one generator per caption): first-5 mean 0.9190, last-5 (steps 16-20) 0.9211, a rise of 0.0021. With the
    # earlier multinomial draws the rise was 0.0023 and held from step ~12 to 30; with lr 1e-2 or 3e-3 the policy
    # collapses and the reward falls back, and seeds 1 and 2 (other random tiny models and rewards) rose much less
    # (+0.0001 and +0.0005, first 5 vs steps 11-30). The margin 0.001 is half the seed-0 rise and >2x the
    # step-to-step noise.
    out = tmp_path / "run"
    ge.main(["--steps", "20", "--device", "cpu", "--save-every", "1000", "--out", str(out)])
    m = [r["reward_mean"] for r in rows(out)]
    first, last = sum(m[:5]) / 5, sum(m[-5:]) / 5
    assert last - first > 0.001, (first, last, m)


def test_bad_render_noise_is_refused():
    with pytest.raises(ValueError, match="render-noise"):
        ge.main(["--render-noise", "step"])
    with pytest.raises(ValueError, match="--text-encoder must be frozen or policy, got 'shared'"):
        ge.main(["--text-encoder", "shared"])


def test_first_step_invariants_and_metrics_fields(tmp_path):
    out = tmp_path / "run"
    ge.main(FAST + ["--steps", "2", "--out", str(out)])
    r = rows(out)
    for key in ("loss", "reward_mean", "reward_std", "kl", "clip_frac", "ratio_mean", "ratio_min", "ratio_max",
                "caption_len", "grad_norm", "s_per_step"):
        assert key in r[0], key
    assert r[0]["ratio_min"] == pytest.approx(1.0, abs=1e-6) and r[0]["ratio_max"] == pytest.approx(1.0, abs=1e-6)
    assert r[0]["clip_frac"] == 0.0 and r[0]["kl"] == 0.0
    assert r[1]["kl"] > 0  # the adapters moved after one update
    assert 1 <= r[0]["caption_len"] <= 8
    assert r[0]["grad_norm"] > 0


def test_no_reference_forward_at_beta_zero(tmp_path, monkeypatch):
    # TRL's GRPOTrainer skips the reference model at beta 0; so do we, and no KL is reported.
    monkeypatch.setattr(ge, "lora_disabled", lambda m: pytest.fail("reference forward at beta 0"))
    ge.main(FAST + ["--steps", "1", "--beta", "0", "--out", str(tmp_path / "run")])
    assert "kl" not in rows(tmp_path / "run")[0]


def test_adapters_off_reference_equals_frozen_base(tmp_path):
    out = tmp_path / "run"
    ge.main(FAST + ["--steps", "1", "--out", str(out)])
    base = UAE.tiny(0).requires_grad_(False)
    model = UAE.tiny(0).requires_grad_(False)
    load_lora(model.lvlm, trained(out, "lvlm"))
    image, caption = procedural_scene(3)
    inputs = base.caption_inputs([image])
    tokens = torch.tensor([base.processor.encode(caption)[:6]])
    mask = torch.ones_like(tokens, dtype=torch.bool)
    with torch.no_grad():
        lp_base = base.caption_logprobs(inputs, tokens, mask, 1.0)
        lp_on = model.caption_logprobs(inputs, tokens, mask, 1.0)
        with lora_disabled(model.lvlm):
            lp_off = model.caption_logprobs(inputs, tokens, mask, 1.0)
    assert torch.equal(lp_off, lp_base)
    assert (lp_on - lp_base).abs().max() > 1e-6


@pytest.mark.parametrize("text_encoder", ["frozen", "policy"])
def test_text_encoder_frozen_keeps_the_decoder_reading_as_before(tmp_path, monkeypatch, text_encoder):
    # frozen: the stage's adapter writes captions but the decoder encodes them without it, during the stage (the
    # rewards' renders) and after (the handoff marks the adapter captioner-only); policy: one LVLM writes and encodes.
    base = UAE.tiny(0).eval()
    texts = ["a red circle", "two blue squares on a grey ground"]
    with torch.no_grad():
        start = base.encode_text(texts)
    moved = []
    render = ge.render_captions

    def spy(uae, *args):
        with torch.no_grad():
            moved.append(float((uae.encode_text(texts) - start).abs().max()))
        return render(uae, *args)

    monkeypatch.setattr(ge, "render_captions", spy)
    out = tmp_path / "run"
    ge.main(FAST + ["--steps", "2", "--text-encoder", text_encoder, "--out", str(out)])
    assert len(moved) == 2 and moved[0] == 0  # the fresh adapter is zero at step 1
    assert (moved[1] == 0) if text_encoder == "frozen" else (moved[1] > 1e-6)

    h = read_handoff(last_ckpt(out))
    assert h.captioner_only == (["lvlm_adapter_0"] if text_encoder == "frozen" else [])
    model = UAE.tiny(0).eval()
    load_handoff(model, h)
    with torch.no_grad():
        after = float((model.encode_text(texts) - start).abs().max())
    assert (after == 0) if text_encoder == "frozen" else (after > 1e-6)


def test_a_full_parameter_captioner_stage_refuses_captioner_only_adapters(tmp_path):
    ge.main(FAST + ["--steps", "1", "--out", str(tmp_path / "stage2")])
    with pytest.raises(ValueError, match="captioner-only .* --lora-rank 0 would merge them"):
        sft_captioner.main(["--init", str(tmp_path / "stage2"), "--lora-rank", "0", "--batch-size", "2",
                            "--procedural-images", "2", "--steps", "1", "--device", "cpu",
                            "--out", str(tmp_path / "sft")])


def test_resume_matches_uninterrupted_run(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    # A linear decay after a one-step warmup: the interrupted run's first step has the full run's rate (1 x --lr),
    # and the resumed steps take theirs from the step count, not from the restored optimizer's groups.
    common = FAST + ["--save-every", "1", "--lr-schedule", "linear", "--warmup-steps", "1"]
    ge.main(common + ["--steps", "3", "--out", str(full)])
    ge.main(common + ["--steps", "1", "--out", str(part)])
    ge.main(common + ["--steps", "3", "--out", str(part), "--resume"])
    assert without_time(rows(part)) == without_time(rows(full))
    lrs = [r["lr"] for r in rows(full)]
    assert lrs[0] > 0 and lrs == pytest.approx([lrs[0], lrs[0], lrs[0] / 2], rel=1e-12)
    a, b = adapter(trained(full, "lvlm")), adapter(trained(part, "lvlm"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="lora_rank"):
        ge.main(FAST[:-6] + ["--lora-rank", "8", "--lora-alpha", "8", "--lr", "1e-2", "--device", "cpu",
                             "--steps", "4", "--out", str(part), "--resume"])


def test_group_that_does_not_divide_across_ranks_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(ge, "init_distributed", lambda device: Dist(0, 2, 0, torch.device("cpu")))
    monkeypatch.setattr(ge, "build_uae", lambda *a: pytest.fail("must fail before building models"))
    with pytest.raises(ValueError, match="does not divide across 2 ranks"):
        ge.main(["--images-per-step", "1", "--group-size", "3", "--out", str(tmp_path)])


def test_two_processes_equal_one(tmp_path):
    args = FAST + ["--steps", "2", "--save-every", "2", "--lr", "1e-3"]
    ge.main(args + ["--out", str(tmp_path / "one")])
    torchrun_two("grpo_encoder.py", args, tmp_path / "two")
    a, b = adapter(trained(tmp_path / "one", "lvlm")), adapter(trained(tmp_path / "two", "lvlm"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5)
    for x, y in zip(rows(tmp_path / "one"), rows(tmp_path / "two")):
        for k in ("reward_mean", "reward_std", "loss", "kl", "caption_len", "grad_norm"):
            assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-6), k


def test_kernel_paths_give_the_same_run(tmp_path):
    """--attention triton (every model's attention through kernels/attention.py, the interpreter here) and
    --logprob naive (logits + log_softmax) train the same as the defaults (SDPA, fused log-probs)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter (conftest.py)
    # beta 0: with the KL on, entries of near-zero gradient (rounding-level differences between the paths) would be
    # scaled to ~lr by Adam at the second step, see below.
    args = FAST[:-2] + ["--device", device, "--steps", "2", "--save-every", "2", "--beta", "0"]
    ge.main(args + ["--out", str(tmp_path / "default")])
    try:
        ge.main(args + ["--attention", "triton", "--logprob", "naive", "--out", str(tmp_path / "kernels")])
        assert get_attention_backend() == "triton"
    finally:
        set_attention_backend("sdpa")
    for x, y in zip(rows(tmp_path / "default"), rows(tmp_path / "kernels"), strict=True):
        for k in ("reward_mean", "reward_std", "loss", "caption_len", "grad_norm"):
            assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-6), k
    # Adam scales each update to about lr (1e-2) whatever the gradient's size, so the ~1e-6 relative differences of
    # the kernels' sums move near-zero-gradient entries by up to ~6e-4 after two steps (measured); a wrong kernel
    # moves ~lr.
    a, b = adapter(trained(tmp_path / "default", "lvlm")), adapter(trained(tmp_path / "kernels", "lvlm"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=2e-3)


def test_bad_logprob_path_is_refused():
    with pytest.raises(ValueError, match="--logprob must be fused or naive"):
        ge.main(["--logprob", "chunked"])


def test_a_group_whose_captions_all_end_at_once(tmp_path, monkeypatch, capsys):
    # Every sampled caption is the end-of-turn token alone: the empty texts render, the group's rewards are equal,
    # every advantage is 0 (warned), and the update is a finite no-op on the loss.
    import model.qwen2_5_vl_generation as generation

    end = UAE.tiny(0).processor.im_end_id
    real = generation.process_logits

    def only_the_end(logits, *args, **kwargs):
        scores = real(logits, *args, **kwargs)
        return torch.full_like(scores, -float("inf")).index_fill_(1, torch.tensor([end]), 0.0)

    monkeypatch.setattr(generation, "process_logits", only_the_end)
    out = tmp_path / "run"
    ge.main(FAST + ["--steps", "1", "--out", str(out)])
    (r,) = rows(out)
    assert r["caption_len"] == 1 and r["reward_std"] == 0 and r["loss"] == 0.0 and r["kl"] == 0.0
    assert "advantage" in capsys.readouterr().err.lower()


def _caption_rows(uae, ends: list[bool], length: int = 6):
    """Caption rows for the tiny captioner: row r holds `length` word tokens, the last replaced by im_end where
    ends[r] (a caption that ended), else cut at the limit. Returns (inputs, tokens, masks)."""
    p = uae.processor
    words = p.encode("a red circle and a blue square on a grey ground")[:length]
    tokens = torch.tensor([words[:-1] + [p.im_end_id] if e else words for e in ends])
    image, _ = procedural_scene(3)
    return uae.caption_inputs([image] * len(ends)), tokens, torch.ones_like(tokens, dtype=torch.bool)


def test_ended_tells_captions_that_ended_from_cut_ones():
    uae = UAE.tiny(0)
    p = uae.processor
    a, b = p.encode("red circle")[:2]
    tokens = torch.tensor([[a, b, p.im_end_id, p.pad_token_id],  # ended
                           [a, p.pad_token_id, p.pad_token_id, p.pad_token_id],  # pad is an end id too
                           [a, b, a, b],  # cut at the limit
                           [a, p.image_token_id, p.im_end_id, p.pad_token_id]])  # cut before a sampled placeholder
    masks = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    assert ge.ended(uae, tokens, masks).tolist() == [True, True, False, False]


@pytest.mark.parametrize("loss_norm", ["sequence_mean", "token_mean"])
def test_mask_truncated_completions_leaves_cut_captions_out_of_the_loss(loss_norm):
    # TRL's mask_truncated_completions: a cut caption's advantage no longer moves the loss; with sequence_mean it
    # still counts in the 1/G (so the loss is the ended rows' loss times their share), with token_mean its tokens
    # leave the count (the ended rows' loss alone).
    uae = UAE.tiny(0).eval()
    ends = [True, False, True, False]
    inputs, tokens, masks = _caption_rows(uae, ends)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    other = torch.tensor([1.0, 3.0, 0.5, 2.0])  # only the cut rows' advantages differ
    opts = ge.Options(mask_truncated_completions=True, loss_norm=loss_norm)
    with torch.no_grad():
        loss, _ = ge.policy_loss(uae, inputs, tokens, masks, adv, opts)
        loss_other, _ = ge.policy_loss(uae, inputs, tokens, masks, other, opts)
        kept, kept_tokens, kept_masks = _caption_rows(uae, [True, True])
        loss_kept, _ = ge.policy_loss(uae, kept, kept_tokens, kept_masks, adv[[0, 2]], opts)
        unmasked, _ = ge.policy_loss(uae, inputs, tokens, masks, adv, ge.Options(loss_norm=loss_norm))
        unmasked_other, _ = ge.policy_loss(uae, inputs, tokens, masks, other, ge.Options(loss_norm=loss_norm))
    assert loss == loss_other and loss != 0
    share = 0.5 if loss_norm == "sequence_mean" else 1.0
    torch.testing.assert_close(loss, share * loss_kept, rtol=1e-6, atol=0)
    assert abs(float(unmasked - unmasked_other)) > 0.1


def test_a_step_whose_captions_are_all_cut_trains_nothing_with_the_mask(tmp_path, monkeypatch):
    # The end tokens are never sampled, so every caption runs to --max-new-tokens: logged as truncated_frac 1; with
    # --mask-truncated-completions the loss and the gradient are 0, without it the step trains (its loss, the mean
    # advantage at ratio 1, is 0 up to rounding either way).
    import model.qwen2_5_vl_generation as generation

    p = UAE.tiny(0).processor
    real = generation.process_logits

    def never_end(logits, *args, **kwargs):
        return real(logits, *args, **kwargs).index_fill(1, torch.tensor([p.im_end_id, p.pad_token_id]), -float("inf"))

    monkeypatch.setattr(generation, "process_logits", never_end)
    for flag, trains in (([], True), (["--mask-truncated-completions"], False)):
        out = tmp_path / f"run{len(flag)}"
        ge.main(FAST + ["--steps", "1", "--beta", "0", "--out", str(out)] + flag)
        (r,) = rows(out)
        assert r["truncated_frac"] == 1.0 and r["caption_len"] == 8
        assert (r["grad_norm"] > 0) == trains
        assert trains or r["loss"] == 0.0
        assert ("ratio_min" in r) == trains  # no token in the loss: no ratio statistics (not +-inf)
