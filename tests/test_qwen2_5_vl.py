"""model/qwen2_5_vl.py against transformers 5.24 Qwen2_5_VLForConditionalGeneration (fp32, tiny random models saved
with save_pretrained): config parsing, vision tower, M-RoPE positions, logits / hidden states, teacher forcing over
shared prompts, loading (both key spellings, shards, bf16) and errors. Generation: test_qwen2_5_vl_generation.py."""
import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2_5_VLConfig
from transformers.vision_utils import get_vision_window_index

import kernels.attention
from model.layers import get_attention_backend, set_attention_backend
from model.qwen2_5_vl import Qwen25VL, Qwen25VLConfig, VisionConfig, mrope_positions, vision_attention_layout
from model.qwen2_5_vl_generation import GenerationConfig, generate
from tests import qwen_reference
from tests.numerics import rel_err
from tests.qwen_reference import (GRIDS, IM_END, IMAGE, PAD, TEXT_IDS, VIDEO, VOCAB, hf_kwargs, make_batch,
                                  ours_kwargs)
from weights import CheckpointError

untied, tied = qwen_reference.untied, qwen_reference.tied  # the module-scoped reference model fixtures

# Qwen/Qwen2.5-VL-3B-Instruct and -7B-Instruct config.json (official flat layout), the fields that matter.
OFFICIAL_3B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 128000,
    "max_window_layers": 70, "model_type": "qwen2_5_vl", "num_attention_heads": 16, "num_hidden_layers": 36,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 151936,
}
OFFICIAL_7B = {**OFFICIAL_3B, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
               "num_attention_heads": 28, "num_key_value_heads": 4, "tie_word_embeddings": False,
               "vocab_size": 152064, "vision_config": {**OFFICIAL_3B["vision_config"], "out_hidden_size": 3584}}


# ----------------------------------------------------------------------------------------------------------- config

def test_presets_match_official_configs_and_transformers_nested_layout(tmp_path):
    assert Qwen25VLConfig.from_json(OFFICIAL_3B) == Qwen25VLConfig.preset("3b")
    assert Qwen25VLConfig.from_json(OFFICIAL_7B) == Qwen25VLConfig.preset("7b")
    seven = Qwen25VLConfig.preset("7b")
    assert (seven.text.hidden_size, seven.text.num_hidden_layers, seven.text.num_attention_heads,
            seven.text.num_key_value_heads, seven.text.intermediate_size, seven.text.tie_word_embeddings,
            seven.vision.out_hidden_size) == (3584, 28, 28, 4, 18944, False, 3584)
    # transformers reads the flat file and writes its nested layout (text_config + rope_parameters).
    for name, flat in (("3b", OFFICIAL_3B), ("7b", OFFICIAL_7B)):
        Qwen2_5_VLConfig(**flat).save_pretrained(tmp_path / name)
        nested = json.loads((tmp_path / name / "config.json").read_text())
        assert "text_config" in nested and "rope_parameters" in nested["text_config"]
        assert Qwen25VLConfig.from_json(tmp_path / name) == Qwen25VLConfig.preset(name)
    with torch.device("meta"):
        model = Qwen25VL(Qwen25VLConfig.preset("3b"))
    assert model.lm_head.weight is model.language_model.embed_tokens.weight
    assert model.visual.patch_embed.weight.shape == (1280, 3, 2, 14, 14)
    ids = dict(image_token_id=7, video_token_id=8, vision_start_token_id=9, vision_end_token_id=10)
    tiny = Qwen25VLConfig.preset("tiny", vocab_size=500, **ids)
    assert (tiny.text.vocab_size, tiny.image_token_id, tiny.vision_end_token_id) == (500, 7, 10)
    with pytest.raises(ValueError, match="video_token_id 151656 is outside the vocabulary"):
        Qwen25VLConfig.preset("tiny", vocab_size=500, image_token_id=7)
    with pytest.raises(ValueError, match="unknown Qwen2.5-VL preset '2b'"):
        Qwen25VLConfig.preset("2b")
    with pytest.raises(ValueError, match=r"\['depth'\] are neither"):
        Qwen25VLConfig.preset("tiny", depth=3)


@pytest.mark.parametrize("change, match", [
    (lambda d: d.update(model_type="qwen2_vl"), "model_type 'qwen2_vl'"),
    (lambda d: d.update(hidden_act="gelu"), "text hidden_act 'gelu'"),
    (lambda d: d["vision_config"].update(hidden_act="gelu"), "vision hidden_act 'gelu'"),
    (lambda d: d.update(use_sliding_window=True), "use_sliding_window"),
    (lambda d: d.update(rope_scaling={"type": "yarn", "factor": 2.0}), "only M-RoPE"),
    (lambda d: d.update(rope_scaling={"type": "mrope", "mrope_section": [16, 24, 16]}), "mrope_section"),
    (lambda d: d.update(text_config={"hidden_size": 1024}), "hidden_size is 2048 at top level but 1024"),
    (lambda d: d.update(text_config={"rope_parameters": {"rope_type": "default", "mrope_section": [8, 28, 28]}}),
     r"contradictory RoPE settings: mrope_section \[\(8, 28, 28\), \(16, 24, 24\)\]"),
    (lambda d: d.update(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
     r"rope_theta \[10000.0, 1000000.0\]"),
    (lambda d: d.pop("vision_config"), "vision_config is missing"),
    (lambda d: d["vision_config"].pop("depth"), "vision_config.depth is missing"),
    (lambda d: d.pop("num_hidden_layers"), r"\['num_hidden_layers'\] are missing"),
    (lambda d: d["vision_config"].update(fullatt_block_indexes=[7, 32]), r"fullatt_block_indexes \[32\]"),
    (lambda d: d["vision_config"].update(spatial_patch_size=16), "spatial_patch_size 16 disagrees"),
    (lambda d: d["vision_config"].update(window_size=100), "window_size 100"),
    (lambda d: d["vision_config"].update(out_hidden_size=1024), "out_hidden_size 1024 must equal"),
    (lambda d: d.update(image_token_id=200000), "image_token_id 200000 is outside"),
    (lambda d: d.update(num_key_value_heads=3), "not a multiple of num_key_value_heads 3"),
])
def test_config_errors(change, match):
    d = json.loads(json.dumps(OFFICIAL_3B))
    change(d)
    with pytest.raises(ValueError, match=match):
        Qwen25VLConfig.from_json(d)


# ----------------------------------------------------------------------------------------------------------- vision

def test_window_layout_matches_transformers():
    grid = torch.tensor([GRIDS["wide"], GRIDS["tall"], (2, 4, 4)])
    vis = VisionConfig(depth=4, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64, window_size=56,
                       fullatt_block_indexes=(1, 3))
    window_index, cu_window, cu_full = vision_attention_layout(grid, vis)
    ref_index, ref_cu = get_vision_window_index(grid, spatial_merge_size=2, window_size=56, patch_size=14)
    assert torch.equal(window_index, ref_index) and torch.equal(cu_window, ref_cu)
    assert cu_full.tolist() == [0, 60, 92, 108, 124]  # one segment per frame


def test_vision_tower_matches_hf(untied):
    hf, ours, _ = untied
    torch.manual_seed(3)
    grid = torch.tensor([GRIDS["wide"], GRIDS["tall"]])
    pixels = torch.randn(int(grid.prod(-1).sum()), 1176)
    with torch.no_grad():
        got = ours.visual(pixels, grid)
        want = hf.model.visual(pixels, grid_thw=grid).pooler_output
    assert got.shape == (23, 64)
    assert rel_err(got, want) <= 1e-5


# ----------------------------------------------------------------------------------------------------------- text

def test_mrope_positions_match_get_rope_index(untied):
    hf, ours, _ = untied
    batch = make_batch([(["wide", "tall"], 4), ([], 9), (["tall"], 2)], seed=4)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    positions, delta = mrope_positions(ids, mask, batch["image_grid_thw"], ours.config)
    ref, ref_delta = hf.model.get_rope_index(ids, (ids == IMAGE).int(), image_grid_thw=batch["image_grid_thw"],
                                             attention_mask=mask)
    assert torch.equal(positions, ref)
    # ours counts from the padded column T; transformers from the number of real tokens.
    assert torch.equal(delta + ids.shape[1], ref_delta[:, 0] + mask.sum(1))


CASES = {
    "text": [([], 11)],
    "one_image": [(["wide"], 5)],
    "two_images": [(["wide", "tall"], 3)],
    "padded_batch": [(["tall"], 2), ([], 6), (["wide", "tall"], 1), ([], 30)],
    "padded_text": [([], 3), ([], 12)],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_hidden_match_hf(untied, case):
    hf, ours, _ = untied
    batch = make_batch(CASES[case], seed=len(case))
    with torch.no_grad():
        logits = ours(batch["input_ids"], **ours_kwargs(batch))
        hidden = ours.forward_hidden(batch["input_ids"], **ours_kwargs(batch))
        ref = hf(**hf_kwargs(hf, batch))
        ref_hidden = hf.model(**hf_kwargs(hf, batch)).last_hidden_state
    keep = batch["attention_mask"].bool()
    assert logits.shape == (*batch["input_ids"].shape, VOCAB)
    assert rel_err(logits[keep], ref.logits[keep]) <= 1e-5
    assert rel_err(hidden[keep], ref_hidden[keep]) <= 1e-5


def test_right_padding_positions_match_hf(untied):
    """Caption-style batches (left-padded prompt, right-padded tail) feed the hidden states of the right pads to the
    DiT: those must match transformers too, not only the real tokens."""
    hf, ours, _ = untied
    batch = make_batch([(["tall"], 4), ([], 1)], seed=5, right_pad_last=4)
    batch["attention_mask"][0, -4:-1] = 1  # row 0: three more real tokens, then one right pad
    batch["input_ids"][0, -4:-1] = torch.tensor([5, 6, 7])
    with torch.no_grad():
        hidden = ours.forward_hidden(batch["input_ids"], **ours_kwargs(batch))
        ref = hf.model(**hf_kwargs(hf, batch)).last_hidden_state
    mask = batch["attention_mask"]
    not_left_pad = mask.cumsum(1) > 0
    assert (not_left_pad & (mask == 0)).sum() == 5
    assert rel_err(hidden[not_left_pad], ref[not_left_pad]) <= 1e-5
    assert torch.isfinite(hidden).all()


def test_tied_model_matches_hf(tied):
    hf, ours, folder = tied
    assert "lm_head.weight" not in load_file(folder / "model.safetensors")
    assert ours.lm_head.weight is ours.language_model.embed_tokens.weight
    batch = make_batch([(["wide"], 3), ([], 7)], seed=6)
    with torch.no_grad():
        got, want = ours(batch["input_ids"], **ours_kwargs(batch)), hf(**hf_kwargs(hf, batch)).logits
    keep = batch["attention_mask"].bool()
    assert rel_err(got[keep], want[keep]) <= 1e-5


def test_gradient_checkpointing_same_values_and_grads(untied):
    _, ours, _ = untied
    batch = make_batch([([], 7), ([], 3)], seed=12)
    grads = []
    for flag in (False, True):
        ours.gradient_checkpointing = flag
        ours.zero_grad()
        h = ours.forward_hidden(batch["input_ids"], attention_mask=batch["attention_mask"])
        ours.token_logprobs(h[:, :-1], batch["input_ids"][:, 1:]).sum().backward()
        grads.append(ours.language_model.layers[0].self_attn.q_proj.weight.grad.clone())
    ours.gradient_checkpointing = False
    ours.zero_grad(set_to_none=True)
    assert rel_err(grads[1], grads[0]) <= 1e-6


# ----------------------------------------------------------------------------------------------------------- kernels

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU tensors: Triton's interpreter (conftest.py)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls into the Triton attention kernels, so a test can show the kernel path actually ran."""
    if KERNEL_DEVICE == "cpu" and not kernels.attention._INTERPRET:
        pytest.skip("no CUDA and triton was imported without TRITON_INTERPRET=1")
    calls = {"flash_attention": 0, "flash_attention_varlen": 0}
    for name in calls:
        original = getattr(kernels.attention, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernels.attention, name, counted)
    previous = get_attention_backend()
    yield calls
    set_attention_backend(previous)


def test_vision_tower_varlen_kernel_matches_sdpa(untied, kernel_calls):
    """Window and frame blocks as packed sequences through one varlen kernel launch each == SDPA over the
    block-diagonal mask: features, and gradients to the pixels and to a block's qkv weight."""
    ours = copy.deepcopy(untied[1]).to(KERNEL_DEVICE)
    torch.manual_seed(13)
    grid = torch.tensor([GRIDS["wide"], GRIDS["tall"]], device=KERNEL_DEVICE)
    pixels = torch.randn(int(grid.prod(-1).sum()), 1176, device=KERNEL_DEVICE)
    weight = torch.randn(23, 64, device=KERNEL_DEVICE)
    results = {}
    for backend in ("sdpa", "triton"):
        set_attention_backend(backend)
        x = pixels.clone().requires_grad_()
        qkv = ours.visual.blocks[1].attn.qkv.weight
        out = ours.visual(x, grid)
        results[backend] = (out, *torch.autograd.grad((out * weight).sum(), (x, qkv)))
    assert kernel_calls["flash_attention_varlen"] == ours.config.vision.depth
    for got, want in zip(results["triton"], results["sdpa"]):
        assert rel_err(got, want) <= 1e-5


def test_log_prob_path_without_pad_states(untied, kernel_calls):
    """pad_states=False (GRPO's log-prob forward): a right-padded batch runs unmasked causal attention, i.e. the
    flash kernels, and real tokens keep the masked path's values; log-prob gradients agree across backends; a
    left-padded batch keeps the mask. The fused and naive log-prob paths agree in values and gradients."""
    ours = copy.deepcopy(untied[1]).to(KERNEL_DEVICE)
    batch = make_batch([(["tall"], 4), (["tall"], 4)], seed=14, right_pad_last=3)
    batch["attention_mask"][0, -3:-1] = 1
    batch = {k: v.to(KERNEL_DEVICE) for k, v in batch.items()}
    ids, mask = batch["input_ids"], batch["attention_mask"]
    images = {k: batch[k] for k in ("pixel_values", "image_grid_thw")}
    real = mask.bool()
    targets = ids[:, 1:]
    with torch.no_grad():
        want = ours.forward_hidden(ids, attention_mask=mask, **images)
    q_proj = ours.language_model.layers[1].self_attn.q_proj.weight
    results = {}
    for backend in ("sdpa", "triton"):
        set_attention_backend(backend)
        hidden = ours.forward_hidden(ids, attention_mask=mask, pad_states=False, **images)
        assert rel_err(hidden[real], want[real]) <= 1e-5, backend
        results[backend] = {}
        for fused in (True, False):
            ours.fused_logprobs = fused
            lp = ours.token_logprobs(hidden[:, :-1], targets)
            grad = torch.autograd.grad((lp * real[:, 1:]).sum(), q_proj, retain_graph=True)[0]
            results[backend][fused] = (lp[real[:, 1:]], grad)
        ours.fused_logprobs = True
    assert kernel_calls["flash_attention"] == ours.config.text.num_hidden_layers  # the one triton forward
    for backend, fused in (("sdpa", False), ("triton", True), ("triton", False)):
        for got, ref in zip(results[backend][fused], results["sdpa"][True]):
            assert rel_err(got, ref) <= 1e-5, (backend, fused)

    left = {k: v.to(KERNEL_DEVICE) for k, v in make_batch([(["tall"], 4), ([], 2)], seed=15).items()}
    not_left_pad = left["attention_mask"].cumsum(1) > 0
    with torch.no_grad():
        a = ours.forward_hidden(left["input_ids"], **ours_kwargs(left))
        b = ours.forward_hidden(left["input_ids"], pad_states=False, **ours_kwargs(left))
    assert torch.equal(a[not_left_pad], b[not_left_pad])


# ----------------------------------------------------------------------------------------------------------- loading

def test_transformers5_key_spelling_and_sharded_checkpoint(untied, tmp_path):
    hf, ours, folder = untied
    state = load_file(folder / "model.safetensors")
    assert any(k.startswith("visual.") for k in state) and any(k.startswith("model.layers.") for k in state)
    renamed = {("model." + k if k.startswith("visual.") else k.replace("model.", "model.language_model.", 1)
                if k.startswith("model.") else k): v for k, v in state.items()}
    (tmp_path / "v5").mkdir()
    save_file(renamed, tmp_path / "v5" / "model.safetensors")
    shutil.copy(folder / "config.json", tmp_path / "v5" / "config.json")
    hf.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    batch = make_batch([(["tall"], 3), ([], 5)], seed=13)
    with torch.no_grad():
        want = ours(batch["input_ids"], **ours_kwargs(batch))
        for sub in ("v5", "sharded"):
            got = Qwen25VL.from_pretrained(tmp_path / sub)(batch["input_ids"], **ours_kwargs(batch))
            assert torch.equal(got, want), sub


def test_bf16_load(untied):
    _, ours, folder = untied
    model = Qwen25VL.from_pretrained(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    batch = make_batch([(["wide"], 3), ([], 4)], seed=14)
    with torch.no_grad():
        got = model(batch["input_ids"], **ours_kwargs(batch))
        want = ours(batch["input_ids"], **ours_kwargs(batch))
        out = generate(model, batch["input_ids"], config=GenerationConfig(max_new_tokens=4, eos_token_id=IM_END,
                                                                          pad_token_id=PAD),
                       return_hidden=True, **ours_kwargs(batch))
    keep = batch["attention_mask"].bool()
    assert got.dtype == torch.bfloat16 and rel_err(got[keep], want[keep]) < 0.1
    assert out.logprobs.dtype == torch.float32 and out.hidden.dtype == torch.bfloat16


def edit_folder(src, dst, config=None, tensors=None):
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    if config:
        config(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    state = load_file(src / "model.safetensors")
    if tensors:
        tensors(state)
    save_file(state, dst / "model.safetensors")
    return dst


def test_checkpoint_errors(untied, tmp_path):
    _, _, folder = untied
    wrong_config = edit_folder(folder, tmp_path / "a", config=lambda c: c["text_config"].update(intermediate_size=80))
    with pytest.raises(CheckpointError, match=r"shape mismatch for 'model\.layers\.0\.mlp\.gate_proj\.weight'.*"
                                              r"checkpoint \[96, 64\], module \[80, 64\]"):
        Qwen25VL.from_pretrained(wrong_config)
    missing = edit_folder(folder, tmp_path / "b", tensors=lambda s: s.pop("visual.blocks.2.attn.qkv.bias"))
    with pytest.raises(CheckpointError, match=r"missing key 'visual\.blocks\.2\.attn\.qkv\.bias'"):
        Qwen25VL.from_pretrained(missing)
    no_head = edit_folder(folder, tmp_path / "c", tensors=lambda s: s.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match=r"missing key 'lm_head\.weight'"):
        Qwen25VL.from_pretrained(no_head)
    extra = edit_folder(folder, tmp_path / "d", tensors=lambda s: s.update({"model.layers.0.extra": torch.ones(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected key 'model\.layers\.0\.extra'"):
        Qwen25VL.from_pretrained(extra)
    with pytest.raises(FileNotFoundError, match="config.json"):
        Qwen25VL.from_pretrained(tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------------------------- bad input

def test_bad_inputs(untied):
    _, ours, _ = untied
    batch = make_batch([(["wide"], 2), ([], 6)], seed=15)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pixels, grid = batch["pixel_values"], batch["image_grid_thw"]
    cases = [
        (dict(image_grid_thw=torch.tensor([GRIDS["tall"]])), r"hold 15 image tokens .* needs 8"),
        (dict(pixel_values=pixels[:, :100]), r"pixel_values shape \[60, 100\], expected \[60, 1176\]"),
        (dict(pixel_values=None), "must be given together"),
        (dict(image_grid_thw=torch.tensor([[1, 6, 9]])), "multiples of spatial_merge_size"),
        (dict(attention_mask=mask[:, 1:]), "attention_mask shape"),
        (dict(attention_mask=mask * 2), "only 0 and 1"),
        (dict(input_ids=ids.float()), "integer tensor"),
        (dict(input_ids=ids.index_put((torch.tensor(1), torch.tensor(-1)), torch.tensor(VOCAB))),
         r"must lie in \[0, 300\)"),
        (dict(input_ids=ids.index_put((torch.tensor(1), torch.tensor(-1)), torch.tensor(VIDEO))), "video tokens"),
    ]
    for change, match in cases:
        kw = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_grid_thw": grid, **change}
        with pytest.raises(ValueError, match=match):
            ours.forward_hidden(**kw)
    no_images = make_batch([(["wide"], 2)], seed=15)["input_ids"]
    with pytest.raises(ValueError, match="15 image tokens but no pixel_values"):
        ours(no_images)
    split = make_batch([(["tall", "tall"], 2)], seed=16)
    split["input_ids"][0, (split["input_ids"][0] == IMAGE).nonzero()[3]] = 5  # a gap inside the first image
    split["input_ids"][0, -1] = IMAGE
    with pytest.raises(ValueError, match=r"image 0 \(image_grid_thw \[1, 8, 4\]\) needs 8 consecutive .* has 3"):
        ours(split["input_ids"], split["pixel_values"], split["image_grid_thw"])
    with pytest.raises(ValueError, match="all zeros"):
        ours(ids, attention_mask=torch.zeros_like(mask))
    with pytest.raises(ValueError, match="leading dimensions"):
        ours.token_logprobs(torch.zeros(2, 3, 64), torch.zeros(2, 4, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------------- groups

@pytest.mark.parametrize("checkpointing", [False, True])
def test_forward_after_prompts_equals_one_forward_per_row(untied, checkpointing):
    # Teacher forcing over shared prompts (left-padded: the two images differ in size) equals forward_hidden over
    # each prompt + row, in values and in the gradients of every weight, whatever the rows' padding.
    _, ours, _ = untied
    batch = make_batch([(["wide"], 2), (["tall"], 5)], seed=22)
    prompts, prompt_mask = batch["input_ids"], batch["attention_mask"]
    rows = torch.tensor([1, 0, 1])
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, TEXT_IDS, (3, 6), generator=g)
    lengths = torch.tensor([6, 3, 1])
    mask = torch.arange(6)[None] < lengths[:, None]
    tokens = tokens.masked_fill(~mask, PAD)
    grids, pixels = batch["image_grid_thw"], batch["pixel_values"].split(batch["image_grid_thw"].prod(-1).tolist())
    weights = [p for p in ours.parameters() if p.ndim == 2 and not p.shape[0] == ours.config.text.vocab_size]
    ours.gradient_checkpointing = checkpointing
    try:
        h = ours.forward_hidden_after_prompts(prompts, prompt_mask, tokens, rows, **{
            k: batch[k] for k in ("pixel_values", "image_grid_thw")})
        lp = ours.token_logprobs(h, tokens)[mask]
        got = torch.autograd.grad(lp.sum(), weights)
        want_h, want_lp = [], []
        for r, i in enumerate(rows.tolist()):
            keep = prompt_mask[i].bool()
            ids = torch.cat([prompts[i, keep], tokens[r]])[None]
            attn = torch.cat([torch.ones(int(keep.sum()), dtype=torch.long), mask[r].long()])[None]
            full = ours.forward_hidden(ids, pixels[i], grids[i:i + 1], attn, pad_states=False)
            p = int(keep.sum())
            want_h.append(full[0, p - 1:p - 1 + 6])
            want_lp.append(ours.token_logprobs(want_h[-1][None], tokens[r:r + 1])[0][mask[r]])
        want_lp = torch.cat(want_lp)
        want = torch.autograd.grad(want_lp.sum(), weights)
    finally:
        ours.gradient_checkpointing = False
    assert rel_err(lp, want_lp) <= 1e-5
    for r in range(3):
        n = int(lengths[r])
        assert rel_err(h[r, :n], want_h[r][:n]) <= 1e-5
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-4
    with pytest.raises(ValueError, match="prompt index in"):
        ours.forward_hidden_after_prompts(prompts, prompt_mask, tokens, [0, 1], **{
            k: batch[k] for k in ("pixel_values", "image_grid_thw")})


def test_image_features_replace_pixel_values(untied):
    _, ours, _ = untied
    batch = make_batch([(["wide"], 2), (["tall"], 3)], seed=23)
    with torch.no_grad():
        features = ours.visual(batch["pixel_values"], batch["image_grid_thw"])
        a = ours.forward_hidden(batch["input_ids"], attention_mask=batch["attention_mask"], **{
            k: batch[k] for k in ("pixel_values", "image_grid_thw")})
        b = ours.forward_hidden(batch["input_ids"], attention_mask=batch["attention_mask"],
                                image_grid_thw=batch["image_grid_thw"], image_features=features)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="image_features shape"):
        ours.forward_hidden(batch["input_ids"], attention_mask=batch["attention_mask"],
                            image_grid_thw=batch["image_grid_thw"], image_features=features[1:])
    with pytest.raises(ValueError, match="not both"):
        ours.forward_hidden(batch["input_ids"], attention_mask=batch["attention_mask"], image_features=features,
                            **{k: batch[k] for k in ("pixel_values", "image_grid_thw")})
