"""Shared by the Qwen2.5-VL tests (model, generation): tiny random transformers 5.24 reference models saved with
save_pretrained and loaded into ours (module-scoped fixtures), left-padded batches with images, and the inputs each
implementation takes."""
import math

import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from model.qwen2_5_vl import Qwen25VL

VOCAB = 300
PAD, IM_END, VISION_START, VISION_END, IMAGE, VIDEO = 280, 282, 283, 284, 285, 286
TEXT_IDS = 280  # ordinary tokens are drawn from [0, 280)
GRIDS = {"wide": (1, 6, 10), "tall": (1, 8, 4)}  # patches; merged 3x5 and 4x2 tokens, windows of 2x2 merged tokens


def hf_config(tie=False, **text):
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, max_position_embeddings=256,
                         **text),
        vision_config=dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                           window_size=56, fullatt_block_indexes=[1, 3]),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END, tie_word_embeddings=tie)


def build_hf(folder, tie, seed):
    """A random HF model with unit-gain weights: large enough that greedy decoding does not collapse onto one token
    (transformers' 0.02 init does), small enough that fp32 rounding stays near 1e-6 (at twice this gain our fp32 and
    transformers' fp32 both sit ~1e-5 from an fp64 forward). An untied head gives the special ids logit 0, so that
    generation (almost) never emits image tokens, which a sequence fed back through forward may not contain."""
    torch.manual_seed(seed)
    hf = Qwen2_5_VLForConditionalGeneration(hf_config(tie)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.uniform_(0.5, 1.5)
            elif p.ndim == 1:
                p.normal_(0, 0.1)
            elif "embed_tokens" in name:
                p.normal_(0, 1.0)
            else:
                p.normal_(0, 1 / math.sqrt(p[0].numel()))
        if not tie:
            hf.lm_head.weight[TEXT_IDS:] = 0
    hf.save_pretrained(folder, safe_serialization=True)
    return hf


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen_untied")
    hf = build_hf(folder, tie=False, seed=0)
    return hf, Qwen25VL.from_pretrained(folder), folder


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen_tied")
    hf = build_hf(folder, tie=True, seed=1)
    return hf, Qwen25VL.from_pretrained(folder), folder


def make_batch(rows, seed=0, right_pad_last=0):
    """rows: one list of image names per row plus a text length, e.g. (["wide"], 5). Left-padded input_ids with
    `<|vision_start|> image pads <|vision_end|>` per image, attention mask, pixel_values, image_grid_thw,
    mm_token_type_ids. right_pad_last > 0 appends that many masked pad tokens to every row (caption-style)."""
    g = torch.Generator().manual_seed(seed)
    seqs, grids = [], []
    for images, n_text in rows:
        ids = torch.randint(0, TEXT_IDS, (3,), generator=g).tolist()
        for name in images:
            t, h, w = GRIDS[name]
            grids.append([t, h, w])
            ids += [VISION_START] + [IMAGE] * (t * h * w // 4) + [VISION_END]
            ids += torch.randint(0, TEXT_IDS, (2,), generator=g).tolist()
        seqs.append(ids + torch.randint(0, TEXT_IDS, (n_text,), generator=g).tolist())
    length = max(map(len, seqs))
    input_ids = torch.full((len(rows), length + right_pad_last), PAD)
    mask = torch.zeros_like(input_ids)
    for i, s in enumerate(seqs):
        input_ids[i, length - len(s):length] = torch.tensor(s)
        mask[i, length - len(s):length] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if grids:
        grid = torch.tensor(grids)
        batch["pixel_values"] = torch.randn(int(grid.prod(-1).sum()), 1176, generator=g)
        batch["image_grid_thw"] = grid
    return batch


def hf_kwargs(hf, batch):
    """HF inputs: mm_token_type_ids so that it builds 3-D positions; text-only batches get the positions of its own
    get_rope_index (its forward would otherwise ignore the padding), and stale rope_deltas are cleared."""
    hf.model.rope_deltas = None
    kw = dict(batch)
    kw["mm_token_type_ids"] = (batch["input_ids"] == IMAGE).int()
    if "pixel_values" not in batch:
        kw["position_ids"], _ = hf.model.get_rope_index(batch["input_ids"], kw.pop("mm_token_type_ids"),
                                                        attention_mask=batch["attention_mask"])
    return kw


def ours_kwargs(batch):
    return {k: batch[k] for k in ("pixel_values", "image_grid_thw", "attention_mask") if k in batch}
