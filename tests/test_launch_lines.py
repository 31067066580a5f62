"""Every launch line with official weights in the training scripts' docstrings runs as written against a tiny fake
UAE release (tests/fake_release.py) laid out as the lines expect: `ckpt/UAE`, `ckpt/clip-vit-large-patch14`,
`data/images/`, `data/pairs.jsonl`, runs under `runs/`. The 1-GPU lines run in-process from the release; the 8-GPU
lines run as the pipeline they spell out (each stage's --init is the previous stage's run) under torchrun on 2 CPU
processes.

What a CPU cannot run is scaled down, the same way for every line, by options appended after the line's own (argparse
keeps the last value): 2 steps; 64 px images; captions of at most 24 new tokens; on 2 processes instead of N, the
global batch options (--images-per-step, --batch-size) divided by N / 2, so each rank holds what it would on N GPUs.
Everything else, --dtype bf16 and the paper's hyper-parameters included, runs as written.
"""
import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import train.cold_start as cs
import train.grpo_decoder as gd
import train.grpo_encoder as ge
import train.sft_captioner as sc
import train.sft_decoder as sd
from tests.fake_release import build_fake_release, save_tiny_clip
from tests.run_helpers import one_thread  # noqa: F401 (an autouse fixture)
from tests.run_helpers import rows
from train.data import procedural_scene

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = [sc, sd, cs, ge, gd]  # stage order: each stage's N-GPU line starts from the previous one's run
CPU_SCALE = ["--steps", "2", "--save-every", "2", "--size", "64", "--device", "cpu"]
CAPTION_CAP = {cs: ["--max-new-tokens", "24"], ge: ["--max-new-tokens", "24"], gd: ["--caption-tokens", "24"],
               sd: [], sc: []}
BATCH_OPTIONS = ("--images-per-step", "--batch-size")


def launch_lines(script) -> list[tuple[int, list[str]]]:
    """(nproc_per_node, script arguments) of each docstring launch line that uses the release (--uae)."""
    text = script.__doc__.split("Launch:", 1)[1]
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        if not line.strip().startswith("torchrun "):
            continue
        words = shlex.split(line.strip())
        if "--uae" not in words:
            continue
        nproc = int(words[1].split("=")[1])
        assert words[2] == f"train/{Path(script.__file__).name}", words[:3]
        out.append((nproc, words[3:]))
    return out


def scaled(script, args: list[str], nproc: int, procs: int) -> list[str]:
    extra = CPU_SCALE + CAPTION_CAP[script]
    for opt in BATCH_OPTIONS:
        if opt in args:
            n = int(args[args.index(opt) + 1])
            assert n * procs % nproc == 0, (opt, n, nproc)
            extra += [opt, str(n * procs // nproc)]
    return args + extra


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A folder laid out as the launch lines expect."""
    root = tmp_path_factory.mktemp("world")
    build_fake_release(root / "ckpt" / "UAE")
    save_tiny_clip(root / "ckpt" / "clip-vit-large-patch14")
    (root / "data" / "images").mkdir(parents=True)
    pairs = []
    for i in range(4):
        image, caption = procedural_scene(i, 80)
        image.save(root / "data" / "images" / f"{i}.png")
        pairs.append({"image": f"images/{i}.png", "caption": caption})
    (root / "data" / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return root


def workdir(world: Path, name: str) -> Path:
    d = world / name
    d.mkdir()
    for sub in ("ckpt", "data"):
        (d / sub).symlink_to(world / sub)
    return d


def test_every_script_documents_its_release_lines():
    for script in PIPELINE:
        lines = launch_lines(script)
        assert [n for n, _ in lines] == [1, 8], script.__name__
        assert "--init" not in lines[0][1] or script is sd, script.__name__
        if script is not PIPELINE[0]:
            prev = PIPELINE[PIPELINE.index(script) - 1].__name__.split(".")[-1]
            assert lines[1][1][lines[1][1].index("--init") + 1] == f"runs/{prev}", script.__name__
    # The paper's settings: two optimizer steps per sampling epoch (Flow-GRPO), and stage 2's rewards rendered as the
    # released recipe renders (512 px, 10 steps, CFG 5).
    for _, args in launch_lines(gd):
        assert args[args.index("--minibatches") + 1] == "2"
    for _, args in launch_lines(ge):
        assert [args[args.index(o) + 1] for o in ("--size", "--gen-steps", "--guidance-scale")] == ["512", "10", "5"]


def test_one_gpu_lines_run_from_the_release(world, monkeypatch):
    monkeypatch.chdir(workdir(world, "one_gpu"))
    for script in PIPELINE:
        (nproc, args), = [line for line in launch_lines(script) if line[0] == 1]
        script.main(scaled(script, args, nproc, 1))
        out = Path(args[args.index("--out") + 1])
        assert [r["step"] for r in rows(out)] == [1, 2], script.__name__
        assert all(v == v for r in rows(out) for v in r.values() if isinstance(v, float)), "NaN in metrics"
    # Flow-GRPO's second minibatch is off-policy: the ratio left 1 and the clip acted.
    assert any(r["clip_frac"] > 0 for r in rows("runs/grpo_decoder"))


def torchrun(cwd: Path, script, args: list[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master-addr=127.0.0.1", f"--master-port={port}", str(ROOT / "train" / Path(script.__file__).name),
           *args]
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script.__name__} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}"


def test_multi_gpu_lines_run_as_the_pipeline(world):
    cwd = workdir(world, "eight_gpu")
    for script in PIPELINE:
        (nproc, args), = [line for line in launch_lines(script) if line[0] > 1]
        torchrun(cwd, script, scaled(script, args, nproc, 2))
        out = cwd / args[args.index("--out") + 1]
        assert [r["step"] for r in rows(out)] == [1, 2], script.__name__
    handoff = json.loads((cwd / "runs" / "grpo_decoder" / "step_00000002" / "model" / "handoff.json").read_text())
    assert [s["stage"] for s in handoff["stages"]] == ["sft_captioner", "sft_decoder", "cold_start", "grpo_encoder",
                                                       "grpo_decoder"]
    # Both full-parameter SFT stages' weights reach the last stage, on the release as the base.
    assert (handoff["dit_weights"], handoff["lvlm_weights"]) == ("dit.safetensors", "lvlm.safetensors")
    assert handoff["base"]["uae"] == str(world / "ckpt" / "UAE")


def test_readme_pipeline_is_the_scripts_lines():
    # The README's pipeline block spells out each stage's N-GPU launch line; they must not drift apart.
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## The pipeline", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [shlex.split(c) for c in re.sub(r"\\\n\s*", " ", block).splitlines() if c.startswith("torchrun ")]
    assert [c[2] for c in commands] == [f"train/{Path(s.__file__).name}" for s in PIPELINE]
    for script, command in zip(PIPELINE, commands):
        (nproc, args), = [line for line in launch_lines(script) if line[0] > 1]
        assert command[1] == f"--nproc_per_node={nproc}" and command[3:] == args, script.__name__


def test_plain_parts_train_and_hand_on(world, monkeypatch):
    # The same stages from plain parts (a Qwen2.5-VL folder, an SD3 folder, a transformer and its LoRA) instead of
    # the release folder; the handoff records that base, and a stage on the release is refused naming the options.
    monkeypatch.chdir(workdir(world, "plain_parts"))
    parts = ["--lvlm", "ckpt/UAE/llm_model", "--sd3", "ckpt/UAE/SD3", "--dit", "ckpt/UAE/dit",
             "--dit-lora", "ckpt/UAE/dit_lora", "--clip", "ckpt/clip-vit-large-patch14", "--data", "data/images/"]
    small = ["--steps", "1", "--save-every", "1", "--size", "32", "--device", "cpu", "--lora-rank", "4"]
    gd.main(parts + small + ["--group-size", "4", "--sample-steps", "3", "--caption-tokens", "8",
                             "--out", "runs/decoder"])
    ge.main(parts + small + ["--group-size", "2", "--max-new-tokens", "8", "--gen-steps", "2",
                             "--init", "runs/decoder", "--out", "runs/encoder"])
    handoff = json.loads(Path("runs/encoder/step_00000001/model/handoff.json").read_text())
    assert handoff["base"]["lvlm"] == str(world / "ckpt" / "UAE" / "llm_model") and handoff["base"]["uae"] is None
    assert (handoff["lvlm_adapters"], handoff["dit_adapters"]) == (["lvlm_adapter_0"], ["dit_adapter_0"])
    with pytest.raises(ValueError, match="--uae: None there, .* for this run; --lvlm: "):
        ge.main(["--uae", "ckpt/UAE", "--clip", "ckpt/clip-vit-large-patch14", "--data", "data/images/"] + small
                + ["--init", "runs/decoder", "--out", "runs/other"])
