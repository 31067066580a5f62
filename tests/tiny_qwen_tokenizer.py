"""A tiny Qwen2.5-VL tokenizer/processor folder laid out like the official release, for tests.

The tokenizer has Qwen2's pipeline (`qwen_tokenizer`: NFC, the Qwen split regex, byte-level BPE without a prefix
space; transformers 5 `Qwen2Tokenizer` rebuilds its own copy of that pipeline around the file's vocab and merges, so a
wrong pipeline here shows up as a parity failure) with merges trained on a few sentences; any text encodes through the
256 byte symbols. The special tokens follow in the official order, at the same offsets from `TINY_BASE_VOCAB` as the
real ones from 151643.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, pre_tokenizers
from tokenizers.trainers import BpeTrainer

from model.qwen2_5_vl_processor import QWEN_SPECIAL_TOKENS, qwen_tokenizer

# Official Qwen2.5-VL chat template (chat_template.json of Qwen/Qwen2.5-VL-3B-Instruct).
QWEN25_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == "
    "'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

TINY_BASE_VOCAB = 320
TINY_VOCAB_SIZE = TINY_BASE_VOCAB + len(QWEN_SPECIAL_TOKENS)
TINY_SPECIAL_IDS = {token: TINY_BASE_VOCAB + i for i, token in enumerate(QWEN_SPECIAL_TOKENS)}

_CORPUS = [
    "You are a helpful assistant.",
    "Describe this image in detail. The picture shows a red cat sitting on a wooden table next to a window.",
    "A photo of a dog running across the green grass in the park, with trees and a blue sky behind it.",
    "generate an image of the following caption: a small house on a hill at sunset.",
    "system user assistant generate 0123456789 the of and in on with a an is are",
]


def build_tiny_qwen_tokenizer(base_vocab: int = TINY_BASE_VOCAB) -> Tokenizer:
    tokenizer = qwen_tokenizer()
    trainer = BpeTrainer(vocab_size=base_vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                         show_progress=False, min_frequency=1)
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    if tokenizer.get_vocab_size() != base_vocab:
        raise RuntimeError(f"tiny corpus yields {tokenizer.get_vocab_size()} tokens, expected {base_vocab}")
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    return tokenizer


def build_tiny_qwen_tokenizer_dir(path, *, min_pixels: int = 3136, max_pixels: int = 12845056) -> Path:
    """Write tokenizer.json, tokenizer_config.json, chat_template.json and preprocessor_config.json as the official
    Qwen2.5-VL-3B-Instruct release spells them (pixel limits overridable). Token ids: `TINY_SPECIAL_IDS`; an embedding
    table of `TINY_VOCAB_SIZE` rows covers them all."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_qwen_tokenizer()
    tokenizer.save(str(path / "tokenizer.json"))
    added = {str(TINY_SPECIAL_IDS[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                        "single_word": False, "special": True} for t in QWEN_SPECIAL_TOKENS}
    tokenizer_config = {
        "add_prefix_space": False, "added_tokens_decoder": added,
        "additional_special_tokens": [t for t in QWEN_SPECIAL_TOKENS if t != "<|endoftext|>"],
        "bos_token": None, "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "model_max_length": 131072, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (path / "chat_template.json").write_text(json.dumps({"chat_template": QWEN25_VL_CHAT_TEMPLATE}, indent=2))
    preprocessor_config = {
        "min_pixels": min_pixels, "max_pixels": max_pixels, "patch_size": 14, "temporal_patch_size": 2,
        "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
    }
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor_config, indent=2))
    return path
