"""Qwen2.5-VL processor: chat template, image preprocessing and prompt tokenization, without transformers.

Reproduces transformers 5.24 `Qwen2_5_VLProcessor` with the PIL image processor (`Qwen2VLImageProcessorPil`):
    chat messages --apply_chat_template--> prompt with one `<|image_pad|>` per image
    images --RGB, smart_resize, BICUBIC, rescale, normalise, patchify--> pixel_values [sum(t*h*w), 3*T*P*P],
        image_grid_thw [N, 3]
    prompts --each `<|image_pad|>` repeated h*w/merge^2 times, tokenize, pad--> input_ids, attention_mask,
        mm_token_type_ids

A folder is read the way the official release and transformers 5 `save_pretrained` write it: `tokenizer.json`,
`tokenizer_config.json` (pad token), and the image settings from `preprocessor_config.json` or from the
`image_processor` entry of `processor_config.json`. Videos are not supported: a `<|video_pad|>` in a prompt is an error.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from model.image_io import load_rgb
from weights import read_json

__all__ = ["Qwen25VLImageConfig", "Qwen25VLProcessor", "smart_resize", "qwen_tokenizer", "QWEN_SPECIAL_TOKENS"]

# In the official id order: `<|endoftext|>` is 151643, each next token +1 up to `<|video_pad|>` at 151656.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)

# transformers models/qwen2/tokenization_qwen2.py PRETOKENIZE_REGEX.
QWEN_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                          r"""\s*[\r\n]+|\s+(?!\S)|\s+""")

DEFAULT_SYSTEM_MESSAGE = "You are a helpful assistant."
PIL_BICUBIC = 3  # PILImageResampling.BICUBIC, the only `resample` Qwen2-VL uses


@dataclass(frozen=True)
class Qwen25VLImageConfig:
    """Image preprocessing settings. Defaults: Qwen2.5-VL-3B/7B-Instruct `preprocessor_config.json` (transformers'
    class default max_pixels is lower, 28*28*1280 = 1003520; the released file says 12845056)."""
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 16384
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    rescale_factor: float = 1 / 255

    def __post_init__(self):
        for name in ("min_pixels", "patch_size", "temporal_patch_size", "merge_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"image config: {name} must be a positive int, got {value!r}")
        if not isinstance(self.max_pixels, int) or self.max_pixels < self.min_pixels:
            raise ValueError(f"image config: max_pixels ({self.max_pixels!r}) must be an int >= min_pixels "
                             f"({self.min_pixels})")
        for name in ("image_mean", "image_std"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"image config: {name} needs 3 values (RGB), got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, d: Mapping) -> "Qwen25VLImageConfig":
        """Read a `preprocessor_config.json` dict. As in transformers, `size` {shortest_edge, longest_edge} sets the
        pixel range and top-level `min_pixels` / `max_pixels` override it. Switches that would change the pipeline
        (`do_resize` false, another `resample`, ...) are rejected rather than silently ignored."""
        for key in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if d.get(key, True) is not True:
                raise ValueError(f"image config: {key}={d[key]!r} is not supported (only true)")
        if d.get("resample", PIL_BICUBIC) != PIL_BICUBIC:
            raise ValueError(f"image config: resample={d['resample']!r} is not supported (only 3, BICUBIC)")
        kw = {}
        size = d.get("size") or {}
        if set(size) - {"shortest_edge", "longest_edge"}:
            raise ValueError(f"image config: size must have keys shortest_edge/longest_edge, got {sorted(size)}")
        if "shortest_edge" in size:
            kw["min_pixels"] = size["shortest_edge"]
        if "longest_edge" in size:
            kw["max_pixels"] = size["longest_edge"]
        for key in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size", "rescale_factor"):
            if d.get(key) is not None:
                kw[key] = d[key]
        for key in ("image_mean", "image_std"):
            if d.get(key) is not None:
                kw[key] = tuple(d[key])
        return cls(**kw)


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, area within [min_pixels, max_pixels], aspect ratio kept as
    closely as possible (transformers qwen2_vl `smart_resize`). `round` is Python's half-to-even, as there."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got height={height} width={width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got "
                         f"{max(height, width) / min(height, width)} for height={height} width={width}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _load_rgb(image, index: int) -> Image.Image:
    """An RGB PIL image, converted as transformers does: a file path is opened, EXIF-transposed and its alpha dropped
    (image_utils.load_image); an in-memory image's transparency is composited onto white
    (image_transforms.convert_to_rgb). Unlike transformers, 16-bit and float images are scaled to 8 bits, not
    clipped (model/image_io.py)."""
    is_path = isinstance(image, (str, os.PathLike))
    if not is_path and not isinstance(image, Image.Image):
        raise TypeError(f"images[{index}]: expected a PIL image or a file path, got {type(image).__name__}")
    try:
        rgb = load_rgb(image, alpha="drop" if is_path else "white")
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"images[{index}]: {e}") from None
    if rgb.width == 0 or rgb.height == 0:
        raise ValueError(f"images[{index}]: empty image of size {rgb.width}x{rgb.height}")
    return rgb


def qwen_tokenizer() -> Tokenizer:
    """A byte-level BPE with Qwen2's pipeline (transformers Qwen2Tokenizer: NFC, the Qwen split regex, byte-level
    without prefix space, byte-level decoder): the 256 byte symbols (sorted, so ids are the same in every process), no
    merges, no special tokens. Training it (tokenizers' BpeTrainer) keeps the pipeline."""
    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=[], unk_token=None, continuing_subword_prefix="",
                              end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


class Qwen25VLProcessor:
    """Tokenizer (a `tokenizers.Tokenizer` with the Qwen special tokens) + image settings; see the module docstring.
    The chat template is the official one whatever the folder's chat template file says."""

    image_token = "<|image_pad|>"
    video_token = "<|video_pad|>"

    def __init__(self, tokenizer: Tokenizer, image_config: Qwen25VLImageConfig | None = None,
                 pad_token: str = "<|endoftext|>"):
        self.tokenizer = tokenizer
        # Padding and truncation are done here, as transformers does, whatever tokenizer.json says.
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.image_config = image_config or Qwen25VLImageConfig()

        def token_id(token: str) -> int:
            i = tokenizer.token_to_id(token)
            if i is None:
                raise ValueError(f"tokenizer has no token {token!r}")
            return i

        self.pad_token_id = token_id(pad_token)
        self.im_start_id = token_id("<|im_start|>")
        self.im_end_id = token_id("<|im_end|>")
        self.vision_start_id = token_id("<|vision_start|>")
        self.vision_end_id = token_id("<|vision_end|>")
        self.image_token_id = token_id(self.image_token)
        self.video_token_id = token_id(self.video_token)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Qwen25VLProcessor":
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json")
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        pad_token = "<|endoftext|>"
        if (path / "tokenizer_config.json").is_file():
            pad = read_json(path / "tokenizer_config.json").get("pad_token")
            if pad is not None:
                pad_token = pad["content"] if isinstance(pad, dict) else pad
        image_config = Qwen25VLImageConfig()
        if (path / "preprocessor_config.json").is_file():
            image_config = Qwen25VLImageConfig.from_dict(read_json(path / "preprocessor_config.json"))
        elif (path / "processor_config.json").is_file():
            image_config = Qwen25VLImageConfig.from_dict(
                read_json(path / "processor_config.json").get("image_processor", {}))
        return cls(tokenizer, image_config, pad_token)

    @classmethod
    def tiny(cls) -> "Qwen25VLProcessor":
        """Byte-level tokenizer (256 byte symbols, no merges) plus the Qwen special tokens at ids 256..269, default
        image settings: any text and image work, and `vocab_size` is 270."""
        tokenizer = qwen_tokenizer()
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
        return cls(tokenizer)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def special_token_ids(self) -> dict[str, int]:
        """The vision token ids under their Qwen2_5_VLConfig names."""
        return {"image_token_id": self.image_token_id, "video_token_id": self.video_token_id,
                "vision_start_token_id": self.vision_start_id, "vision_end_token_id": self.vision_end_id}

    # ------------------------------------------------------------------------------------------- text
    def apply_chat_template(self, messages: Sequence[Mapping], add_generation_prompt: bool = False,
                            add_vision_id: bool = False) -> str:
        """The official Qwen2.5-VL chat template (chat_template.json), rendered in Python. Any role renders the same
        way (`<|im_start|>{role}\\n...<|im_end|>\\n`), e.g. UAE's `generate`; a first message that is not a system
        turn gets the default system turn before it. Content items that the template would drop silently (none of
        image / image_url / video / text) are an error here."""
        if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence) or not messages:
            raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r}")
        out = []
        n_images = n_videos = 0
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
                raise ValueError(f"messages[{i}] must be a dict with a str 'role', got {message!r}")
            role, content = message["role"], message.get("content")
            if i == 0 and role != "system":
                out.append(f"<|im_start|>system\n{DEFAULT_SYSTEM_MESSAGE}<|im_end|>\n")
            out.append(f"<|im_start|>{role}\n")
            if isinstance(content, str):
                out.append(content)
            elif isinstance(content, Sequence):
                for j, item in enumerate(content):
                    if not isinstance(item, Mapping):
                        raise ValueError(f"messages[{i}]['content'][{j}] must be a dict, got {type(item).__name__}")
                    if item.get("type") == "image" or "image" in item or "image_url" in item:
                        n_images += 1
                        out.append(f"Picture {n_images}: " if add_vision_id else "")
                        out.append("<|vision_start|><|image_pad|><|vision_end|>")
                    elif item.get("type") == "video" or "video" in item:
                        n_videos += 1
                        out.append(f"Video {n_videos}: " if add_vision_id else "")
                        out.append("<|vision_start|><|video_pad|><|vision_end|>")
                    elif isinstance(item.get("text"), str):
                        out.append(item["text"])
                    else:
                        raise ValueError(f"messages[{i}]['content'][{j}] is not an image, video or text item "
                                         f"(text must be a str): {item!r}")
            else:
                raise ValueError(f"messages[{i}]['content'] must be a str or a list of dicts, "
                                 f"got {type(content).__name__}")
            out.append("<|im_end|>\n")
        if add_generation_prompt:
            out.append("<|im_start|>assistant\n")
        return "".join(out)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, batch: Sequence[Sequence[int]] | torch.Tensor,
                     skip_special_tokens: bool = True) -> list[str]:
        if isinstance(batch, torch.Tensor):
            batch = batch.tolist()
        return self.tokenizer.decode_batch([list(ids) for ids in batch], skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------------------------------- images
    def preprocess_images(self, images: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
        """PIL images or file paths -> (pixel_values [sum(t*h*w), 3*T*P*P] float32, image_grid_thw [N, 3] int64).

        Each image is resized (BICUBIC, on uint8) to `smart_resize`'s size, rescaled in float64 then cast to float32,
        normalised in float32 (transformers' numpy order of operations, so results are bit-identical), repeated T times
        along time, and cut into P x P patches ordered merge-block-major: the merge*merge patches that the vision
        merger fuses into one token are consecutive rows."""
        cfg = self.image_config
        p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
        mean = np.asarray(cfg.image_mean, dtype=np.float32)
        std = np.asarray(cfg.image_std, dtype=np.float32)
        rows, grids = [], []
        for index, image in enumerate(images):
            image = _load_rgb(image, index)
            try:
                height, width = smart_resize(image.height, image.width, p * m, cfg.min_pixels, cfg.max_pixels)
            except ValueError as e:
                raise ValueError(f"images[{index}]: {e}") from None
            x = np.asarray(image.resize((width, height), resample=Image.Resampling.BICUBIC))
            x = (x.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
            x = torch.from_numpy((x - mean) / std).permute(2, 0, 1)  # [3, H, W]
            gh, gw = height // p, width // p
            x = x.reshape(3, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)  # [gh/m, gw/m, m, m, 3, p, p]
            x = x.unsqueeze(5).expand(*x.shape[:5], t, p, p)  # a still image is T identical frames
            rows.append(x.reshape(gh * gw, 3 * t * p * p))
            grids.append((1, gh, gw))
        return torch.cat(rows), torch.tensor(grids, dtype=torch.int64)

    # ------------------------------------------------------------------------------------------- batch
    def __call__(self, text: str | Sequence[str], images: Sequence | None = None, *, padding_side: str = "left",
                 return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        """Batch of prompts (and the images their `<|image_pad|>` placeholders stand for, in order across the batch)
        -> `input_ids`, `attention_mask`, `mm_token_type_ids` (1 on image tokens) [B, L] int64, padded to the longest
        prompt with the pad id, plus `pixel_values` and `image_grid_thw` when images are given."""
        if return_tensors != "pt":
            raise ValueError(f"return_tensors must be 'pt', got {return_tensors!r}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(s, str) for s in texts):
            raise ValueError("text must be a str or a non-empty list of str")
        if isinstance(images, (Image.Image, str, os.PathLike)):
            images = [images]
        images = list(images) if images is not None else []
        n_placeholders = sum(s.count(self.image_token) for s in texts)
        if n_placeholders != len(images):
            raise ValueError(f"the prompts hold {n_placeholders} {self.image_token} placeholders but {len(images)} "
                             "images were given")
        n_videos = sum(s.count(self.video_token) for s in texts)
        if n_videos:
            raise ValueError(f"the prompts hold {n_videos} {self.video_token} placeholders; videos are not supported")

        out = {}
        if images:
            pixel_values, grid_thw = self.preprocess_images(images)
            counts = iter((grid_thw.prod(-1) // self.image_config.merge_size ** 2).tolist())

            def expand(prompt: str) -> str:
                first, *rest = prompt.split(self.image_token)
                return first + "".join(self.image_token * next(counts) + part for part in rest)

            texts = [expand(s) for s in texts]
            out = {"pixel_values": pixel_values, "image_grid_thw": grid_thw}

        encodings = self.tokenizer.encode_batch(texts)
        length = max(len(e.ids) for e in encodings)
        input_ids = torch.full((len(texts), length), self.pad_token_id, dtype=torch.int64)
        attention_mask = torch.zeros((len(texts), length), dtype=torch.int64)
        for row, e in enumerate(encodings):
            span = slice(length - len(e.ids), length) if padding_side == "left" else slice(0, len(e.ids))
            input_ids[row, span] = torch.tensor(e.ids, dtype=torch.int64)
            attention_mask[row, span] = 1
        mm_token_type_ids = input_ids.eq(self.image_token_id).long()
        return {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm_token_type_ids,
                **out}
