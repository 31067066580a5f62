"""train/sft_captioner.py (supervised captioner training): a random tiny LVLM learns to caption, the loss against a
direct log_softmax computation, LoRA vs full-parameter training and the handoff of full LVLM weights to a later stage
and to the eval tools, resume, 2 processes == 1, option errors.
"""
import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train.grpo_encoder as ge
import train.sft_captioner as sc
from eval.model_args import add_model_args, load_model
from model.handoff import read_handoff
from model.lora import load_lora, lora_disabled
from model.uae import CAPTION_PROMPT, UAE
from tests.run_helpers import one_thread  # noqa: F401 (an autouse fixture)
from tests.run_helpers import adapter, last_ckpt, model_file, rows, run_stage, torchrun_two, trained, without_time
from train.common import UsageError
from train.data import procedural_scene

ROOT = Path(__file__).resolve().parents[1]
# Two procedural scenes whose captions differ in length (60 and 142 tokens, then <|im_end|>): every batch is padded.
FAST = ["--batch-size", "2", "--procedural-images", "2", "--logprob", "naive", "--device", "cpu"]


def eval_model(run) -> UAE:
    """The model `eval --run` builds from a run of the tiny preset."""
    p = argparse.ArgumentParser()
    add_model_args(p)
    return load_model(p.parse_args(["--tiny", "--device", "cpu", "--dtype", "fp32", "--run", str(run)]))


def logits(uae, inputs) -> torch.Tensor:
    """LVLM logits of processor `inputs` (which hold more than the LVLM takes)."""
    return uae.lvlm(**{k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")})


@torch.no_grad()
def probe(uae) -> torch.Tensor:
    """LVLM logits on an image prompt: through the vision tower, the merger and the LM."""
    return logits(uae, uae.caption_inputs([procedural_scene(5)[0]]))


def test_a_random_captioner_learns_to_caption_and_stop(tmp_path):
    # Full-parameter training of the random tiny LVLM on two images with short captions that differ only in what the
    # image shows. Measured (seeds 0, 1, 2 of the tiny model): 120 steps at lr 1e-2 take the loss from ~12 to < 0.01
    # and every token right; greedy captions then match exactly (80 steps: one of the two still goes wrong).
    pairs = []
    for i in range(2):
        image, caption = procedural_scene(i)
        image.save(tmp_path / f"{i}.png")
        pairs.append({"image": f"{i}.png", "caption": caption.split(" with")[0] + "."})  # "A purple background."
    assert pairs[0]["caption"] != pairs[1]["caption"]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    out = tmp_path / "run"
    sc.main(FAST[:2] + FAST[4:] + ["--data", str(tmp_path / "pairs.jsonl"), "--steps", "120", "--lr", "1e-2",
                                   "--save-every", "1000", "--out", str(out)])
    r = rows(out)
    assert {"loss", "token_acc", "caption_tokens", "grad_norm", "s_per_step"} <= set(r[0])
    assert r[0]["loss"] > 5 and r[-1]["loss"] < 0.05 and r[-1]["token_acc"] == 1.0, (r[0], r[-1])
    assert r[0]["caption_tokens"] == len(sc.caption_targets(UAE.tiny().processor, pairs[0]["caption"]))
    # Greedy captions of the trained model (as the eval tools load it) are the training captions, ended by the
    # <|im_end|> it learned to write: the captioner tells the images apart and stops.
    uae = eval_model(out)
    for i, p in enumerate(pairs):
        assert uae.caption([procedural_scene(i)[0]], do_sample=False, max_new_tokens=40) == [p["caption"]]


def test_loss_and_accuracy_equal_a_direct_computation(tmp_path):
    # Step 1's loss is the first model's: recompute it from the LVLM's logits on each chat written out in full (the
    # prompt, the caption as the assistant's turn, <|im_end|>), one unpadded sequence per pair, with log_softmax.
    # The run uses the fused log-prob kernel (the default) on a padded batch.
    out = tmp_path / "run"
    sc.main(FAST[:4] + ["--device", "cpu", "--steps", "1", "--out", str(out)])
    uae = UAE.tiny(0)
    nll, hits, n = 0.0, 0, []
    for i in range(2):
        image, caption = procedural_scene(i)
        user = {"role": "user", "content": [{"type": "text", "text": CAPTION_PROMPT}, {"type": "image"}]}
        prompt = uae.processor.apply_chat_template([user], add_generation_prompt=True)
        chat = uae.processor.apply_chat_template([user, {"role": "assistant", "content": caption}])
        assert chat == prompt + caption + "<|im_end|>\n"
        inputs = uae.processor(text=[chat], images=[image])  # 64 px: below the tiny model's caption pixel cap
        start = uae.processor(text=[prompt], images=[image])["input_ids"].shape[1]
        ids = inputs["input_ids"][0]
        targets = ids[start:-1]  # the caption and <|im_end|>, not the newline after it
        assert targets[-1] == uae.processor.im_end_id
        with torch.no_grad():
            z = logits(uae, inputs)[0, start - 1:-2].float()
        nll -= z.log_softmax(-1).gather(1, targets[:, None]).sum().item()
        hits += int((z.argmax(-1) == targets).sum())
        n.append(len(targets))
    assert n[0] != n[1]  # the batch was padded
    row = rows(out)[0]
    assert row["caption_tokens"] == sum(n) / 2
    assert row["loss"] == pytest.approx(nll / sum(n), rel=1e-5)
    assert row["token_acc"] == pytest.approx(hits / sum(n), rel=1e-5)


def write_texts(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


TEXTS = ["a red circle at the top left", "two small blue squares", "one large green triangle on a white background",
         "an orange circle"]


def test_text_objective_equals_a_direct_computation(tmp_path):
    # Step 1 with --text-data: the caption loss is the run's without it, the text loss the token mean of the LM's
    # log_softmax over each generate-turn chat written out in full (every token after the first), and the loss their
    # weighted sum. The two texts differ in length: the text batch was padded.
    texts = write_texts(tmp_path / "texts.jsonl", TEXTS[:2])
    sc.main(FAST + ["--steps", "1", "--out", str(tmp_path / "plain")])
    sc.main(FAST + ["--steps", "1", "--text-data", str(texts), "--text-batch-size", "2", "--text-weight", "0.5",
                    "--out", str(tmp_path / "text")])
    uae = UAE.tiny(0)
    nll, n = 0.0, []
    for text in TEXTS[:2]:  # the text sampler's first epoch holds both: their order does not change the mean
        chat = uae.processor.apply_chat_template([{"role": "generate", "content": [{"type": "text", "text": text}]}],
                                                 add_generation_prompt=True)
        ids = torch.tensor([uae.processor.encode(chat)])
        with torch.no_grad():
            z = uae.lvlm(input_ids=ids, attention_mask=torch.ones_like(ids))[0, :-1].float()
        nll -= z.log_softmax(-1).gather(1, ids[0, 1:, None]).sum().item()
        n.append(ids.shape[1] - 1)
    assert n[0] != n[1]
    plain, row = rows(tmp_path / "plain")[0], rows(tmp_path / "text")[0]
    assert row["caption_loss"] == pytest.approx(plain["loss"], rel=1e-6)
    assert row["text_loss"] == pytest.approx(nll / sum(n), rel=1e-5)
    assert row["loss"] == pytest.approx(row["caption_loss"] + 0.5 * row["text_loss"], rel=1e-6)


def test_lora_trains_only_the_adapter(tmp_path):
    out = tmp_path / "run"
    sc.main(FAST + ["--lora-rank", "4", "--lora-alpha", "8", "--steps", "2", "--out", str(out)])
    h = read_handoff(out)
    assert (h.trained, h.lvlm_adapters, h.lvlm_weights) == (["lvlm_adapter"], ["lvlm_adapter_0"], None)
    base, model = UAE.tiny(0), UAE.tiny(0)
    load_lora(model.lvlm, trained(out, "lvlm"))
    with lora_disabled(model.lvlm):
        assert torch.equal(probe(model), probe(base))  # the base weights did not move
    assert (probe(model) - probe(base)).abs().max() > 1e-6  # the adapter did


def test_full_parameter_weights_reach_the_next_stage_and_eval(tmp_path):
    sft = tmp_path / "sft"
    first = run_stage(sc, FAST + ["--steps", "2", "--out", str(sft)], probe)
    h = read_handoff(sft)
    assert (h.trained, h.lvlm_weights, h.lvlm_adapters) == (["lvlm_weights"], "lvlm.safetensors", [])
    trained_weights, base = model_file(sft, "lvlm.safetensors"), UAE.tiny(0).lvlm.state_dict()
    for part in ("visual.", "language_model."):  # the vision tower and merger train too, not only the LM
        assert any(not torch.equal(t, base[k]) for k, t in trained_weights.items() if k.startswith(part)), part
    assert not torch.equal(first["last"], probe(UAE.tiny(0)))
    # GRPO on the captioner started with --init: its first forward is the SFT run's last, bit for bit.
    second = run_stage(ge, ["--device", "cpu", "--steps", "1", "--group-size", "2", "--max-new-tokens", "4",
                            "--gen-steps", "1", "--lora-rank", "4", "--lora-alpha", "8", "--init", str(sft),
                            "--out", str(tmp_path / "grpo")], probe)
    assert torch.equal(second["first"], first["last"])
    assert torch.equal(probe(eval_model(sft)), first["last"])


@pytest.mark.parametrize("lora_rank", ["4", "0"])
def test_resume_matches_uninterrupted_run(tmp_path, lora_rank):
    # With the text objective: its sampler (3 texts, 2 a step: a new epoch at step 2) resumes too; and with a
    # learning-rate schedule, whose rate at the resumed step is taken up.
    full, part = tmp_path / "full", tmp_path / "part"
    texts = write_texts(tmp_path / "texts.jsonl", TEXTS[:3])
    common = FAST + ["--procedural-images", "4", "--lora-rank", lora_rank, "--lora-alpha", "8", "--save-every", "1",
                     "--text-data", str(texts), "--text-batch-size", "2", "--lr-schedule", "cosine", "--warmup-steps",
                     "1"]
    sc.main(common + ["--steps", "3", "--out", str(full)])
    sc.main(common + ["--steps", "1", "--out", str(part)])
    sc.main(common + ["--steps", "3", "--out", str(part), "--resume"])
    assert without_time(rows(part)) == without_time(rows(full))
    lr = sc.Options().lr
    assert [r["lr"] for r in rows(full)] == pytest.approx([lr, lr, lr * (0.1 + 0.45 * (1 + math.cos(math.pi / 2)))])
    a, b = ((model_file(full, "lvlm.safetensors"), model_file(part, "lvlm.safetensors")) if lora_rank == "0" else
            (adapter(trained(full, "lvlm")), adapter(trained(part, "lvlm"))))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.load(last_ckpt(part) / "state.pt", weights_only=True)["step"] == 3
    with pytest.raises(UsageError, match="batch_size"):
        sc.main(common + ["--batch-size", "4", "--steps", "4", "--out", str(part), "--resume"])


def test_two_processes_equal_one(tmp_path):
    # Full-parameter, one pair and one text per rank: the ranks hold captions (and texts) of different lengths, so a
    # per-rank token mean would differ from the global one.
    texts = write_texts(tmp_path / "texts.jsonl", TEXTS[:2])
    args = FAST + ["--steps", "2", "--save-every", "2", "--lr", "1e-3", "--text-data", str(texts),
                   "--text-batch-size", "2"]
    sc.main(args + ["--out", str(tmp_path / "one")])
    torchrun_two("sft_captioner.py", args, tmp_path / "two")
    a, b = model_file(tmp_path / "one", "lvlm.safetensors"), model_file(tmp_path / "two", "lvlm.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5)
    for x, y in zip(rows(tmp_path / "one"), rows(tmp_path / "two"), strict=True):
        for k in ("loss", "caption_loss", "text_loss", "token_acc", "caption_tokens", "grad_norm"):
            assert y[k] == pytest.approx(x[k], rel=1e-5), k


def test_help_and_bad_options(tmp_path, capsys):
    with pytest.raises(SystemExit):
        sc.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--lora-rank LORA_RANK LoRA rank on the LM; 0 = full-parameter training of the whole LVLM" in text
    assert "(no FSDP;" in text
    assert "(default: demo)" in text and "(default: runs/sft_captioner)" in text
    for args, message in ((["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
                          (["--prompt", " "], "--prompt is empty"),
                          (["--logprob", "chunked"], "--logprob must be fused or naive"),
                          (["--lora-rank", "-1"], "--lora-rank must be >= 0"),
                          (["--text-data", str(tmp_path / "none.jsonl")], "--text-data .*none.jsonl: no such file"),
                          (["--text-batch-size", "0"], "--text-batch-size must be >= 1, got 0"),
                          (["--text-weight", "-1"], "--text-weight must be >= 0, got -1")):
        with pytest.raises(UsageError, match=message):
            sc.main(args + ["--out", str(tmp_path / "x")])
    proc = subprocess.run([sys.executable, str(ROOT / "train" / "sft_captioner.py"), "--batch-size", "0",
                           "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["sft_captioner.py: error: --batch-size must be >= 1, got 0"]
    assert not (tmp_path / "x").exists()  # nothing started
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a red circle"}\n{"caption": "a blue square"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected a JSON object with a 'text' field"):
        sc.main(FAST + ["--text-data", str(bad), "--out", str(tmp_path / "y")])
    bad.write_text("\n")
    with pytest.raises(ValueError, match=r"--text-data .*bad.jsonl holds no texts"):
        sc.main(FAST + ["--text-data", str(bad), "--out", str(tmp_path / "z")])


def test_caption_targets_end_the_turn_and_refuse_special_tokens():
    p = UAE.tiny().processor
    assert sc.caption_targets(p, " a red circle\n").tolist() == p.encode("a red circle") + [p.im_end_id]
    with pytest.raises(ValueError, match=r"'a <\|image_pad\|> cat' holds the special token\(s\) <\|image_pad\|>"):
        sc.caption_targets(p, "a <|image_pad|> cat")
