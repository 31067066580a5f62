"""model/qwen2_5_vl_processor.py against transformers' Qwen2_5_VLProcessor (PIL image processor) on a tiny tokenizer:
chat template strings, pixel_values / image_grid_thw, token ids and padding, decoding, folder layouts, bad input."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2_5_VLProcessor, Qwen2Tokenizer, Qwen2VLImageProcessorPil

from model.qwen2_5_vl_processor import Qwen25VLImageConfig, Qwen25VLProcessor, smart_resize
from tests.tiny_qwen_tokenizer import (QWEN25_VL_CHAT_TEMPLATE, TINY_SPECIAL_IDS, TINY_VOCAB_SIZE,
                                       build_tiny_qwen_tokenizer_dir)

SMALL_MAX_PIXELS = 28 * 28 * 24  # low enough that ordinary test images take smart_resize's downscaling branch


class _ImageOnlyReference(Qwen2_5_VLProcessor):
    """transformers' processor without its video processor, which needs torchvision (not installed here)."""

    @classmethod
    def get_attributes(cls):
        return ["image_processor", "tokenizer"]


def _reference(folder) -> Qwen2_5_VLProcessor:
    return _ImageOnlyReference(image_processor=Qwen2VLImageProcessorPil.from_pretrained(folder),
                               tokenizer=Qwen2Tokenizer.from_pretrained(folder), chat_template=QWEN25_VL_CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    folder = build_tiny_qwen_tokenizer_dir(tmp_path_factory.mktemp("official"))
    return _reference(folder), Qwen25VLProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    folder = build_tiny_qwen_tokenizer_dir(tmp_path_factory.mktemp("small"), max_pixels=SMALL_MAX_PIXELS)
    return _reference(folder), Qwen25VLProcessor.from_pretrained(folder)


def _image(mode: str, width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    if mode == "RGB":
        return rgb
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))
    if mode in ("RGBA", "LA"):
        channels = 4 if mode == "RGBA" else 2
        return Image.fromarray(rng.integers(0, 256, (height, width, channels), dtype=np.uint8), mode=mode)
    if mode == "P":
        return rgb.quantize(16)
    if mode == "P+transparency":
        image = rgb.quantize(16)
        image.info["transparency"] = 3
        return image
    raise AssertionError(mode)


def _assert_same_batch(ours: dict, ref) -> None:
    assert set(ours) == set(ref.keys())
    for key, value in ours.items():
        assert value.dtype == ref[key].dtype, key
        assert torch.equal(value, ref[key]), key


def _ref_call(ref, texts, images, padding_side="left"):
    return ref(text=texts, images=images, padding=True, padding_side=padding_side, return_tensors="pt")


# ------------------------------------------------------------------------------------------- chat template
MESSAGES = [
    [{"role": "user", "content": "Hello there."}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}],
    [{"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image"},
                                  {"type": "text", "text": " and "}, {"image": "x.png"}, {"image_url": "http://x"}]},
     {"role": "assistant", "content": "They differ.\n"},
     {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "and this clip?"}]},
     {"role": "system", "content": "A system turn in the middle."}],
    [{"role": "generate", "content": [{"type": "text", "text": "a red cat on a wooden table"}]}],
    [{"role": "user", "content": [{"type": "text", "text": "Caption: "}, {"type": "image"}]},
     {"role": "generate", "content": "A photo of a dog."}],
]


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("add_vision_id", [False, True])
@pytest.mark.parametrize("index", range(len(MESSAGES)))
def test_chat_template_matches_official_jinja(official, index, add_generation_prompt, add_vision_id):
    ref, ours = official
    messages = MESSAGES[index]
    expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                       add_vision_id=add_vision_id)
    got = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, add_vision_id=add_vision_id)
    assert got == expected


def test_generate_role_renders_like_any_role(official):
    _, ours = official
    text = ours.apply_chat_template([{"role": "generate", "content": [{"type": "text", "text": "T"}]}],
                                    add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>generate\nT<|im_end|>\n"
                    "<|im_start|>assistant\n")


@pytest.mark.parametrize("messages, match", [
    ("hello", "list"),
    ([], "non-empty list"),
    ({"role": "user", "content": "hi"}, "list"),
    ([{"content": "hi"}], r"messages\[0\]"),
    ([{"role": "user", "content": "hi"}, "hi"], r"messages\[1\]"),
    ([{"role": "user", "content": None}], r"messages\[0\]\['content'\]"),
    ([{"role": "user", "content": ["hi"]}], r"messages\[0\]\['content'\]\[0\]"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "audio"}]}], r"\['content'\]\[1\]"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], r"\['content'\]\[0\]"),
])
def test_chat_template_bad_messages(official, messages, match):
    with pytest.raises(ValueError, match=match):
        official[1].apply_chat_template(messages)


# ------------------------------------------------------------------------------------------- tokenizer
def test_special_ids_vocab_and_pad(official):
    ref, ours = official
    assert ours.vocab_size == TINY_VOCAB_SIZE == len(ref.tokenizer)
    assert ours.pad_token_id == ref.tokenizer.pad_token_id == TINY_SPECIAL_IDS["<|endoftext|>"]
    assert ours.im_start_id == TINY_SPECIAL_IDS["<|im_start|>"]
    assert ours.im_end_id == ref.tokenizer.eos_token_id == TINY_SPECIAL_IDS["<|im_end|>"]
    assert ours.image_token_id == ref.image_token_id == TINY_SPECIAL_IDS["<|image_pad|>"]
    assert ours.special_token_ids() == {
        "image_token_id": TINY_SPECIAL_IDS["<|image_pad|>"], "video_token_id": TINY_SPECIAL_IDS["<|video_pad|>"],
        "vision_start_token_id": TINY_SPECIAL_IDS["<|vision_start|>"],
        "vision_end_token_id": TINY_SPECIAL_IDS["<|vision_end|>"]}


TEXTS = ["Héllo wörld, 世界!  \n\n\tTabs and   spaces; numbers 12345 and it's done.",
         "<|im_start|>user\nDescribe a cat.<|im_end|>\n<|im_start|>assistant\n",
         "emoji 🙂 <|box_start|>(1,2)<|box_end|> café\r\n"]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_match_reference(official, text):
    ref, ours = official
    ids = ours.encode(text)
    assert ids == ref.tokenizer.encode(text)
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == ref.tokenizer.decode(ids, skip_special_tokens=skip)
    assert ours.decode(ids, skip_special_tokens=False) == text


def test_decode_random_ids_match_reference(official):
    ref, ours = official
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, TINY_VOCAB_SIZE, (3, 41), generator=g)
    for skip in (False, True):
        assert ours.batch_decode(batch, skip_special_tokens=skip) == ref.batch_decode(batch, skip_special_tokens=skip)
        assert ours.decode(batch[0], skip_special_tokens=skip) == ref.tokenizer.decode(batch[0].tolist(),
                                                                                        skip_special_tokens=skip)


def test_tiny_processor_is_a_qwen2_tokenizer(tmp_path):
    tiny = Qwen25VLProcessor.tiny()
    assert tiny.vocab_size == 270 and tiny.image_token_id == 268 and tiny.pad_token_id == 256
    tiny.tokenizer.save(str(tmp_path / "tokenizer.json"))
    ref = Qwen2Tokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert tiny.encode(text) == ref.encode(text)
        assert tiny.decode(tiny.encode(text)) == ref.decode(ref.encode(text), skip_special_tokens=True)


# ------------------------------------------------------------------------------------------- images
@pytest.mark.parametrize("size", [(37, 53), (53, 37), (301, 97), (640, 33), (70, 98), (42, 42), (1, 1), (3, 500)])
def test_pixel_values_match_reference(official, size):
    ref, ours = official
    image = _image("RGB", *size, seed=sum(size))
    expected = ref.image_processor(images=[image], return_tensors="pt")
    pixel_values, grid = ours.preprocess_images([image])
    assert torch.equal(grid, expected["image_grid_thw"]) and grid.dtype == torch.int64
    assert pixel_values.dtype == torch.float32
    assert torch.equal(pixel_values, expected["pixel_values"])


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "LA", "P", "P+transparency"])
def test_color_modes_match_reference(official, mode):
    ref, ours = official
    image = _image(mode, 45, 31, seed=7)
    assert image.mode == mode.split("+")[0]
    expected = ref.image_processor(images=[image], return_tensors="pt")
    pixel_values, grid = ours.preprocess_images([image])
    assert torch.equal(grid, expected["image_grid_thw"])
    assert torch.equal(pixel_values, expected["pixel_values"])


def test_downscaling_branch_matches_reference(small):
    ref, ours = small
    images = [_image("RGB", 301, 197, seed=1), _image("RGBA", 97, 640, seed=2)]
    expected = ref.image_processor(images=images, return_tensors="pt")
    pixel_values, grid = ours.preprocess_images(images)
    assert (grid.prod(-1) * 14 * 14 <= SMALL_MAX_PIXELS).all()
    assert torch.equal(grid, expected["image_grid_thw"])
    assert torch.equal(pixel_values, expected["pixel_values"])


def test_file_paths_match_reference(official, tmp_path):
    """A path goes through transformers' load_image: EXIF transpose, alpha dropped (not composited)."""
    ref, ours = official
    rgba = _image("RGBA", 50, 29, seed=3)
    rgba.save(tmp_path / "a.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    _image("RGB", 61, 40, seed=4).save(tmp_path / "b.jpg", exif=exif)
    paths = [str(tmp_path / "a.png"), str(tmp_path / "b.jpg")]
    text = ["<|vision_start|><|image_pad|><|vision_end|> and <|vision_start|><|image_pad|><|vision_end|>"]
    _assert_same_batch(ours(text, paths), _ref_call(ref, text, paths))


def test_16_bit_images_are_scaled_not_clipped(official, tmp_path):
    """transformers clips a 16-bit greyscale image (PIL mode I;16) to white; ours scales it to the 8-bit levels
    round(v / 257), in memory and from a PNG file alike."""
    _, ours = official
    deep = np.random.default_rng(7).integers(0, 65536, (37, 45), dtype=np.uint16)
    eight = Image.fromarray(np.rint(deep / 257).astype(np.uint8), "L")
    Image.fromarray(deep).save(tmp_path / "deep.png")
    eight.save(tmp_path / "eight.png")
    want = ours.preprocess_images([eight])[0]
    assert torch.equal(ours.preprocess_images([Image.fromarray(deep)])[0], want)
    assert torch.equal(ours.preprocess_images([tmp_path / "deep.png"])[0],
                       ours.preprocess_images([tmp_path / "eight.png"])[0])
    white = ours.preprocess_images([Image.new("L", (45, 37), 255)])[0]
    assert not torch.equal(want, white)


def test_patch_layout_is_merge_block_major(official):
    """Row r of pixel_values is patch (r // 4 -> merged token, r % 4 -> position in its 2x2 block); each row is
    (C, T, 14, 14) with both frames equal."""
    _, ours = official
    image = _image("RGB", 56, 84, seed=5)
    pixel_values, grid = ours.preprocess_images([image])
    _, gh, gw = grid[0].tolist()
    rows = pixel_values.view(gh // 2, gw // 2, 2, 2, 3, 2, 14, 14)
    assert torch.equal(rows[:, :, :, :, :, 0], rows[:, :, :, :, :, 1])
    mean = torch.tensor(ours.image_config.image_mean).view(3, 1, 1)
    std = torch.tensor(ours.image_config.image_std).view(3, 1, 1)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).double() / 255
    full = rows[..., 0, :, :].permute(4, 0, 2, 5, 1, 3, 6).reshape(3, gh * 14, gw * 14)
    assert (full * std + mean - pixels).abs().max() < 1e-5


# ------------------------------------------------------------------------------------------- whole batch
def _prompts(ours):
    two = [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"},
           {"type": "text", "text": "differ how?"}]
    one = [{"type": "text", "text": "Describe this image in detail please, every object."}, {"type": "image"}]
    return [ours.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True) for c in (two, one)]


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_matches_reference(official, padding_side):
    ref, ours = official
    texts = _prompts(ours)
    images = [_image("RGB", 37, 53, seed=11), _image("L", 301, 97, seed=12), _image("RGBA", 640, 33, seed=13)]
    got = ours(texts, images, padding_side=padding_side)
    _assert_same_batch(got, _ref_call(ref, texts, images, padding_side))
    assert got["mm_token_type_ids"].sum() == (got["image_grid_thw"].prod(-1) // 4).sum()
    first_pad_col = 0 if padding_side == "left" else -1
    assert got["attention_mask"][:, first_pad_col].tolist().count(0) == 1


def test_text_only_batch_matches_reference(official):
    ref, ours = official
    texts = ["short", ours.apply_chat_template([{"role": "generate", "content": "a much longer caption text here"}])]
    got = ours(texts)
    assert set(got) == {"input_ids", "attention_mask", "mm_token_type_ids"}
    _assert_same_batch(got, _ref_call(ref, texts, None))
    _assert_same_batch(ours(texts[1]), _ref_call(ref, texts[1], None))


def test_single_prompt_and_single_image(official):
    ref, ours = official
    text = _prompts(ours)[1]
    image = _image("RGB", 100, 61, seed=31)
    _assert_same_batch(ours(text, image), _ref_call(ref, text, image))


def test_folder_saved_by_transformers_loads_the_same(small, tmp_path):
    ref, ours = small
    ref.save_pretrained(tmp_path)
    assert not (tmp_path / "preprocessor_config.json").exists()  # transformers 5 nests it in processor_config.json
    reloaded = Qwen25VLProcessor.from_pretrained(tmp_path)
    assert reloaded.image_config == ours.image_config
    assert reloaded.image_config.max_pixels == SMALL_MAX_PIXELS
    texts = _prompts(ours)
    images = [_image("RGB", 300, 200, seed=21), _image("P", 33, 90, seed=22), _image("RGB", 90, 90, seed=23)]
    _assert_same_batch(reloaded(texts, images), _ref_call(ref, texts, images))


# ------------------------------------------------------------------------------------------- bad input
def test_unreadable_and_empty_images_name_their_index(official, tmp_path):
    _, ours = official
    good = _image("RGB", 30, 30)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(ValueError, match=r"images\[1\]: cannot read image"):
        ours.preprocess_images([good, str(tmp_path / "broken.png")])
    with pytest.raises(ValueError, match=r"images\[0\]: no such file"):
        ours.preprocess_images([tmp_path / "missing.png"])
    for empty in (Image.new("RGB", (0, 12)), Image.new("RGBA", (12, 0))):
        with pytest.raises(ValueError, match=r"images\[1\]: empty image"):
            ours.preprocess_images([good, empty])
    with pytest.raises(TypeError, match=r"images\[0\]"):
        ours.preprocess_images([np.zeros((28, 28, 3), np.uint8)])


def test_extreme_aspect_ratio_rejected_like_reference(official):
    ref, ours = official
    image = _image("RGB", 402, 2)
    with pytest.raises(ValueError, match="aspect ratio"):
        ref.image_processor(images=[image])
    with pytest.raises(ValueError, match=r"images\[1\]: absolute aspect ratio must be smaller than 200"):
        ours.preprocess_images([_image("RGB", 30, 30), image])
    assert ours.preprocess_images([_image("RGB", 400, 2)])[1].tolist() == \
        ref.image_processor(images=[_image("RGB", 400, 2)])["image_grid_thw"].tolist()


def test_smart_resize_bounds_and_bad_sizes():
    g = torch.Generator().manual_seed(0)
    for h, w in torch.randint(1, 3000, (200, 2), generator=g).tolist():
        if max(h, w) / min(h, w) > 200:
            continue
        rh, rw = smart_resize(h, w, 28, 3136, 28 * 28 * 1280)
        assert rh % 28 == 0 and rw % 28 == 0 and rh >= 28 and rw >= 28
        assert rh * rw <= 28 * 28 * 1280 or min(rh, rw) == 28
        assert rh * rw >= 3136
    assert smart_resize(70, 98) == (56, 112)  # half-way cases round to even, as Python's round in transformers
    for h, w in ((0, 10), (10, 0), (-3, 5)):
        with pytest.raises(ValueError, match="image size must be positive"):
            smart_resize(h, w)


@pytest.mark.parametrize("texts, n_images, match", [
    (["<|image_pad|><|image_pad|>"], 1, "2 <\\|image_pad\\|> placeholders but 1 images"),
    (["<|image_pad|>", "no image"], 0, "1 <\\|image_pad\\|> placeholders but 0 images"),
    (["no image"], 1, "0 <\\|image_pad\\|> placeholders but 1 images"),
])
def test_placeholder_count_mismatch_rejected_like_reference(official, texts, n_images, match):
    ref, ours = official
    images = [_image("RGB", 30, 30, seed=i) for i in range(n_images)] or None
    with pytest.raises(ValueError):
        ref(text=texts, images=images, padding=True, return_tensors="pt")
    with pytest.raises(ValueError, match=match):
        ours(texts, images)


def test_bad_call_arguments(official):
    _, ours = official
    with pytest.raises(ValueError, match="videos are not supported"):
        ours(["<|vision_start|><|video_pad|><|vision_end|>"])
    with pytest.raises(ValueError, match="return_tensors"):
        ours(["hi"], return_tensors="np")
    with pytest.raises(ValueError, match="padding_side"):
        ours(["hi"], padding_side="middle")
    for bad in ([], ["hi", 3]):
        with pytest.raises(ValueError, match="text must be"):
            ours(bad)


def test_bad_folders_and_configs(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Qwen25VLProcessor.from_pretrained(tmp_path)
    folder = build_tiny_qwen_tokenizer_dir(tmp_path / "ok")
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["content"] != "<|image_pad|>"]
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ValueError, match=r"no token '<\|image_pad\|>'"):
        Qwen25VLProcessor.from_pretrained(folder)
    folder = build_tiny_qwen_tokenizer_dir(tmp_path / "badjson")
    (folder / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="preprocessor_config.json: not valid JSON"):
        Qwen25VLProcessor.from_pretrained(folder)
    for config, match in [({"do_resize": False}, "do_resize"), ({"resample": 2}, "resample"),
                          ({"size": {"height": 224, "width": 224}}, "size"), ({"min_pixels": 0}, "min_pixels"),
                          ({"min_pixels": 5000, "max_pixels": 4000}, "max_pixels"),
                          ({"patch_size": 0}, "patch_size"), ({"image_mean": [0.5, 0.5]}, "image_mean")]:
        with pytest.raises(ValueError, match=match):
            Qwen25VLImageConfig.from_dict(config)
    config = Qwen25VLImageConfig.from_dict({"size": {"shortest_edge": 100, "longest_edge": 9000}, "max_pixels": 8000})
    assert (config.min_pixels, config.max_pixels) == (100, 8000)
    assert Qwen25VLImageConfig().max_pixels == 12845056 and math.isclose(Qwen25VLImageConfig().rescale_factor, 1 / 255)
