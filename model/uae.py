"""UAE: the auto-encoder view of a unified multimodal model.

    image --Qwen2.5-VL (encoder)--> long caption --Qwen2.5-VL last hidden states--> connector --> MMDiT + VAE (decoder)
    --> reconstruction

The caption is re-encoded text-only in a chat turn whose role is `generate`; every token's post-norm last-layer hidden
state goes through the connector and the sequence is the MMDiT's `context`; `pooled` is one constant vector (SD3's
CLIP-L + CLIP-G pooled embeddings of the empty prompt). Classifier-free guidance uses UAE's negative prompt through the
same path, positive and negative right-padded together with the pad id (the released inference code's convention; the
DiT gets no text mask).

The captioner and the text encoder are one LVLM. `captioner_only` lists LVLM adapter levels the text encoding leaves
off: GRPO on the captioner (train/grpo_encoder.py) trains its adapter against a frozen decoder, and the decoder's
text path is the LVLM, so the captions that adapter writes are read by the LVLM as it was before the stage (the
handoff records the adapter as captioner-only, model/handoff.py).

Loading: the official release folder (`llm_model/`, `llm_lora/`, `dit/`, `dit_lora/`, `SD3/`) or any combination of a
plain Qwen2.5-VL folder, an SD3/SD3.5 diffusers folder and a connector file. `UAE.tiny(seed)` builds every part small
and random so the whole loop runs on a CPU in seconds.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn

from model import qwen2_5_vl_generation
from model.connector import Connector, ConnectorConfig
from model.flow import flow_sigmas, sample_ode
from model.lora import LoRALinear, lora_levels_disabled
from model.mmdit import MMDiT, MMDiTConfig
from model.qwen2_5_vl import Qwen25VL, Qwen25VLConfig
from model.qwen2_5_vl_generation import GenerationConfig
from model.qwen2_5_vl_processor import Qwen25VLProcessor
from model.vae import VAE, VAEConfig

# The released demo's caption prompt (text before the image, as in the released inference code, demo.py).
CAPTION_PROMPT = (
    "You are an expert vision-language model.  \n"
    "Your task is: Given an input image, generate a **textual description** of the image. "
    "If there is text in the image, transcribe it inside double quotes \"\".  \n"
    "Now, carefully analyze the input image and output the full description. "
)
# Unified-Bench's caption prompt. The paper describes it (the model is asked for an accurate, comprehensive
# description from which a generation model can recreate the image) but the release does not include its wording;
# this is that request in our words. `eval.unified_bench run --prompt demo` uses CAPTION_PROMPT instead.
UNIFIED_BENCH_PROMPT = (
    "Describe this image accurately and comprehensively, so that a text-to-image model could recreate it from your "
    "description alone. Cover every object with its attributes (count, colour, shape, size, material, texture), its "
    "position and its spatial relations to the others; the background and setting; the composition, viewpoint, "
    "lighting and style. If there is text in the image, transcribe it inside double quotes \"\"."
)
NEGATIVE_PROMPT = "Generate a random, low quality, ugly, blur, bad and anime, cartoon image."
# LoRA targets of the training stages: every linear layer of the LVLM's text decoder (the release's LLM LoRA is
# peft's 'all-linear' on it) and the 8 attention projections of every MMDiT block (Flow-GRPO's SD3 targets).
LLM_LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
DIT_LORA_TARGETS = "to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out"
# LoRA size of the release's LLM adapter (its inference code applies LoraConfig(r=32, lora_alpha=64); the adapter
# files do not store alpha), and the training stages' default.
LORA_RANK = 32
LORA_ALPHA = 64.0


@dataclass
class UAESettings:
    """Released inference defaults (the UAE release's demo.py and processor config): captions sampled at temperature
    0.7, up to 512 new tokens, from an image capped at 65536 pixels; images at 1024 px, 40 steps, CFG 5."""
    caption_max_new_tokens: int = 512
    caption_temperature: float = 0.7
    caption_max_pixels: int = 65536
    height: int = 1024
    width: int = 1024
    steps: int = 40
    guidance_scale: float = 5.0
    shift: float = 3.0


class UAE(nn.Module):
    def __init__(self, lvlm: Qwen25VL, processor: Qwen25VLProcessor, connector: Connector, dit: MMDiT, vae: VAE,
                 settings: UAESettings | None = None):
        super().__init__()
        self.lvlm, self.connector, self.dit, self.vae = lvlm, connector, dit, vae
        self.processor = processor
        self.settings = settings or UAESettings()
        # LVLM adapter levels `encode_text` runs without (model/handoff.py `captioner_only`): plain list, not
        # registered, as the modules already live in self.lvlm.
        self.captioner_only: list[LoRALinear] = []

    @property
    def device(self) -> torch.device:
        return self.connector.pooled.device

    # ------------------------------------------------------------------------------------------- understanding
    def _caption_processor(self) -> Qwen25VLProcessor:
        """The processor with max_pixels capped at `settings.caption_max_pixels` (released: 65536), so smart_resize
        does the downscaling exactly as the release's processor config does."""
        cfg = self.processor.image_config
        cap = min(cfg.max_pixels, self.settings.caption_max_pixels)
        if cap == cfg.max_pixels:
            return self.processor
        processor = copy.copy(self.processor)
        processor.image_config = dataclasses.replace(cfg, max_pixels=cap, min_pixels=min(cfg.min_pixels, cap))
        return processor

    def caption_inputs(self, images: list[Image.Image], prompt: str = CAPTION_PROMPT) -> dict[str, torch.Tensor]:
        """Processor inputs for captioning `images` (one image per prompt, left-padded batch)."""
        messages = [{"role": "user", "content": [{"type": "text", "text": prompt}, {"type": "image"}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = self._caption_processor()(text=[text] * len(images), images=list(images))
        return {k: v.to(self.device) for k, v in inputs.items()}

    def caption_rows(self, inputs: dict[str, torch.Tensor], image_of: Sequence[int],
                     features: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Inputs for captions of recurring images (G captions of an image, for GRPO): `inputs` (`caption_inputs`,
        one prompt per image) with `image_of` [R] (row r captions image image_of[r]) and the vision tower's output
        `image_features` in place of pixel_values (computed here unless `features` is given). `caption_hidden`
        and `caption_logprobs` then run the vision tower and each prompt once per image, not once per caption
        (`Qwen25VL.forward_hidden_after_prompts`), for the policy and reference forwards alike. Runs under the
        caller's grad mode."""
        index = torch.as_tensor(list(image_of), dtype=torch.long)
        n = inputs["input_ids"].shape[0]
        if index.ndim != 1 or index.numel() == 0 or int(index.min()) < 0 or int(index.max()) >= n:
            raise ValueError(f"image_of must list, for each row, an image index in [0, {n}), got {index.tolist()}")
        if features is None:
            features = self.lvlm.visual(inputs["pixel_values"], inputs["image_grid_thw"])
        return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
                "image_grid_thw": inputs["image_grid_thw"], "image_features": features,
                "image_of": index.to(inputs["input_ids"].device)}

    def _one_row_per_caption(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`caption_rows` inputs as one prompt (with its image features) per row; other inputs as they are."""
        if "image_of" not in inputs:
            return inputs
        rows, grid = inputs["image_of"], inputs["image_grid_thw"]
        per_image = inputs["image_features"].split(
            (grid.prod(-1) // self.lvlm.config.vision.spatial_merge_size ** 2).tolist())
        return {"input_ids": inputs["input_ids"][rows], "attention_mask": inputs["attention_mask"][rows],
                "image_grid_thw": grid[rows], "image_features": torch.cat([per_image[i] for i in rows.tolist()])}

    @torch.no_grad()
    def caption(self, images: list[Image.Image], prompt: str = CAPTION_PROMPT, max_new_tokens: int | None = None,
                do_sample: bool = True, temperature: float | None = None, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | Sequence[torch.Generator] | None = None, return_output: bool = False,
                image_of: Sequence[int] | None = None, cuda_graph: bool = False):
        """Caption each image, or with `image_of` each row r an image images[image_of[r]] (e.g. G captions per image
        for GRPO): every image's vision features and prompt are computed once and the rows decode as one batch.
        Sampling follows the released defaults (temperature 0.7, 512 new tokens); `generator`: one for the batch,
        or one per row, so a row's caption does not depend on the rows beside it (`qwen2_5_vl_generation.draw_tokens`).
        With return_output, also the rows' inputs (`caption_rows`: image features in place of pixel values) and the
        GenerationOutput, whose `mask` marks the caption's tokens (ended before any sampled image/video
        placeholder, as the texts are). cuda_graph: decode steps replayed as CUDA graphs (model/graph_decode.py)."""
        if not images:
            raise ValueError("caption() needs at least one image")
        inputs = self.caption_inputs(images, prompt)
        features = self.lvlm.visual(inputs["pixel_values"], inputs["image_grid_thw"])
        config = GenerationConfig(
            max_new_tokens=max_new_tokens or self.settings.caption_max_new_tokens, do_sample=do_sample,
            temperature=temperature if temperature is not None else self.settings.caption_temperature,
            top_k=top_k, top_p=top_p, eos_token_id=(self.processor.im_end_id, self.processor.pad_token_id),
            pad_token_id=self.processor.pad_token_id)
        out = qwen2_5_vl_generation.generate(
            self.lvlm, inputs["input_ids"], inputs["attention_mask"], image_grid_thw=inputs["image_grid_thw"],
            config=config, generator=generator, prompt_of_row=image_of, image_features=features,
            cuda_graph=cuda_graph)
        # A sampled image/video placeholder cannot be re-encoded (the LVLM counts placeholders against the image's
        # patches, and a text-only caption has none): the caption ends before the first one. They are rare below
        # temperature 1, but long captions from a release or an early RL policy do sample them.
        p = self.processor
        placeholder = (out.new_tokens == p.image_token_id) | (out.new_tokens == p.video_token_id)
        before_first = placeholder.long().cumsum(1) == 0
        out = dataclasses.replace(out, mask=out.mask & before_first)
        texts = p.batch_decode(out.new_tokens.masked_fill(~out.mask, p.pad_token_id).tolist())
        texts = [t.strip() for t in texts]
        if not return_output:
            return texts
        return texts, self.caption_rows(inputs, range(len(images)) if image_of is None else image_of, features), out

    def caption_hidden(self, inputs: dict[str, torch.Tensor], tokens: torch.Tensor,
                       mask: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: the LVLM's last hidden states [B, N, d] that predict each of the caption `tokens` [B, N]
        (right-padded; `mask` marks the real ones) written after the image prompt `inputs`: from one forward over
        prompt + caption per row (`caption_inputs`), or with each prompt run once for its rows (`caption_rows`).
        Rows' padding positions hold unspecified values (callers mask them)."""
        if "image_of" in inputs:  # each prompt once, its rows after it
            return self.lvlm.forward_hidden_after_prompts(
                inputs["input_ids"], inputs["attention_mask"], tokens.masked_fill(~mask, self.processor.pad_token_id),
                inputs["image_of"], image_grid_thw=inputs["image_grid_thw"], image_features=inputs["image_features"])
        prompt_len = inputs["input_ids"].shape[1]
        ids = torch.cat([inputs["input_ids"], tokens.masked_fill(~mask, self.processor.pad_token_id)], dim=1)
        attn = torch.cat([inputs["attention_mask"], mask.long()], dim=1)
        hidden = self.lvlm.forward_hidden(ids, attention_mask=attn, pixel_values=inputs.get("pixel_values"),
                                          image_grid_thw=inputs["image_grid_thw"], pad_states=False,
                                          image_features=inputs.get("image_features"))
        # Position p predicts token p+1: the caption's N tokens are predicted from positions prompt_len-1 ... +N-2.
        return hidden[:, prompt_len - 1: prompt_len - 1 + tokens.shape[1]]

    def caption_logprobs(self, inputs: dict[str, torch.Tensor], tokens: torch.Tensor, mask: torch.Tensor,
                         temperature: float = 1.0) -> torch.Tensor:
        """Per-token log-probs [B, N] (fp32, differentiable) of caption `tokens` given the image prompt `inputs` under
        the LVLM as it is (adapters as they are set): `caption_hidden` -> `lvlm.token_logprobs`, where the fused
        log-prob kernel plugs in. GRPO's policy, old policy and reference all come from this one path."""
        return self.lvlm.token_logprobs(self.caption_hidden(inputs, tokens, mask), tokens, temperature=temperature)

    # ------------------------------------------------------------------------------------------- conditioning
    def generate_turn_ids(self, texts: list[str], pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids of each text in the `generate` chat turn, right-padded with the pad id (released convention) to
        the longest text, or to `pad_to` tokens when given (the DiT has no text mask, so the pad tokens a text gets
        change its image: distributed training pads every rank to the global batch's longest text)."""
        pad = self.processor.pad_token_id
        rows = []
        for t in texts:
            chat = self.processor.apply_chat_template([{"role": "generate", "content": [{"type": "text", "text": t}]}],
                                                      add_generation_prompt=True)
            rows.append(torch.tensor(self.processor.encode(chat), dtype=torch.long))
        ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad)
        if pad_to is not None:
            if pad_to < ids.shape[1]:
                raise ValueError(f"pad_to={pad_to} is shorter than the longest text ({ids.shape[1]} tokens)")
            ids = torch.nn.functional.pad(ids, (0, pad_to - ids.shape[1]), value=pad)
        ids = ids.to(self.device)
        return ids, ids.ne(pad).long()

    def encode_text(self, texts: list[str], pad_to: int | None = None) -> torch.Tensor:
        """DiT context [B, L, joint_attention_dim]: connector(last hidden states) of the `generate` turn, with the
        captioner-only adapter levels off."""
        ids, mask = self.generate_turn_ids(texts, pad_to)
        with lora_levels_disabled(self.captioner_only):
            hidden = self.lvlm.forward_hidden(ids, attention_mask=mask)
        return self.connector(hidden.to(self.connector.fc1.weight.dtype))

    def condition(self, prompts: list[str], guidance_scale: float,
                  pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(context, negative_context or None). With guidance the negative prompt is padded together with the
        positives so both share one length, as the released code pads them together."""
        if guidance_scale > 1.0:
            ctx = self.encode_text([NEGATIVE_PROMPT] + list(prompts), pad_to)
            return ctx[1:], ctx[:1].expand(len(prompts), -1, -1)
        return self.encode_text(list(prompts), pad_to), None

    def pooled(self, batch: int) -> torch.Tensor:
        return self.connector.pooled_batch(batch).to(self.dit_dtype)

    @property
    def dit_dtype(self) -> torch.dtype:
        return next(self.dit.parameters()).dtype

    def velocity_fn(self, context: torch.Tensor, negative_context: torch.Tensor | None = None):
        """The DiT's velocity_fn for model/flow.py's samplers (`dit_velocity` with the constant pooled vector)."""
        return dit_velocity(self.dit, context, self.pooled(context.shape[0]), negative_context)

    # ------------------------------------------------------------------------------------------- generation
    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        f = self.vae.config.downsample_factor * self.dit.config.patch_size
        if height % f or width % f:
            raise ValueError(f"height {height} and width {width} must be multiples of {f}")
        d = self.vae.config.downsample_factor
        return batch, self.vae.config.latent_channels, height // d, width // d

    @torch.no_grad()
    def generate(self, prompts: list[str], height: int | None = None, width: int | None = None,
                 steps: int | None = None, guidance_scale: float | None = None,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None, output_type: str = "pil",
                 pad_to: int | None = None):
        """Images from text prompts (CFG Euler ODE sampling on the SD3 shifted schedule), as one batch. `generator`:
        one for the batch's noise, or one per prompt (image i's noise then does not depend on the batch). The DiT
        has no text mask: the prompts (and the negative prompt) are padded together, to `pad_to` tokens if given
        (`condition`), so an image depends on the longest text of its batch unless pad_to fixes the length."""
        s = self.settings
        height, width = height or s.height, width or s.width
        g = s.guidance_scale if guidance_scale is None else guidance_scale
        context, negative = self.condition(prompts, g, pad_to)
        shape = self.latent_shape(len(prompts), height, width)
        if generator is None or isinstance(generator, torch.Generator):
            noise = torch.randn(shape, generator=generator)
        elif len(generator) != len(prompts):
            raise ValueError(f"one generator per prompt: got {len(generator)} for {len(prompts)} prompts")
        else:
            noise = torch.cat([torch.randn((1, *shape[1:]), generator=gen, device=gen.device).cpu()
                               for gen in generator])
        noise = noise.to(self.device)
        sigmas = flow_sigmas(steps or s.steps, shift=s.shift).to(self.device)
        latents = sample_ode(self.velocity_fn(context, negative), noise, sigmas,
                             guidance_scale=g if negative is not None else None)
        images = self.vae.decode(self.vae.from_model_latents(latents.to(next(self.vae.parameters()).dtype)))
        return _to_pil(images) if output_type == "pil" else images.float()

    @torch.no_grad()
    def generate_each_alone(self, prompts: list[str], seeds: Sequence[int], height: int | None = None,
                            width: int | None = None, steps: int | None = None, guidance_scale: float | None = None,
                            output_type: str = "pil"):
        """`generate` of each prompt as if drawn alone, image i from the noise of generator seed seeds[i] (evaluation:
        a score then depends neither on the batch nor on the rest of the prompts). The DiT has no text mask, so only
        prompts of one token length share a batch, where none is padded; images come back in the prompts' order."""
        if len(seeds) != len(prompts):
            raise ValueError(f"one seed per prompt: got {len(seeds)} for {len(prompts)} prompts")
        by_length: dict[int, list[int]] = {}
        for i, prompt in enumerate(prompts):
            by_length.setdefault(self.generate_turn_ids([prompt])[0].shape[1], []).append(i)
        out: list = [None] * len(prompts)
        for rows in by_length.values():
            images = self.generate([prompts[i] for i in rows], height, width, steps, guidance_scale,
                                   [torch.Generator().manual_seed(seeds[i]) for i in rows], output_type=output_type)
            for i, image in zip(rows, images):
                out[i] = image
        return out if output_type == "pil" else torch.stack(out)

    @torch.no_grad()
    def reconstruct(self, images: list[Image.Image], height: int | None = None, width: int | None = None,
                    steps: int | None = None, guidance_scale: float | None = None,
                    generator: torch.Generator | None = None, **caption_kwargs) -> tuple[list[str], list[Image.Image]]:
        """image -> caption -> image, end to end."""
        captions = self.caption(images, generator=generator, **caption_kwargs)
        return captions, self.generate(captions, height, width, steps, guidance_scale, generator)

    # ------------------------------------------------------------------------------------------- cold start
    def caption_context(self, inputs: dict[str, torch.Tensor], caption_ids: torch.Tensor,
                        caption_mask: torch.Tensor) -> torch.Tensor:
        """Cold-start conditioning: the hidden states of the caption tokens computed with the image in context,
        through the connector, differentiable to the LVLM and connector.

        `inputs` are `caption_inputs(...)` (left-padded prompts with images) or `caption_rows(...)`;
        `caption_ids/mask [B, N]` the caption tokens (e.g. `GenerationOutput.new_tokens/mask`). Row i's context is
        the hidden states at its N caption positions; positions after its caption are pad tokens, as with the
        right-padded generation path."""
        inputs = self._one_row_per_caption(inputs)
        ids = torch.cat([inputs["input_ids"], caption_ids], dim=1)
        mask = torch.cat([inputs["attention_mask"], caption_mask.long()], dim=1)
        ids = ids.masked_fill(mask == 0, self.processor.pad_token_id)
        hidden = self.lvlm.forward_hidden(ids, attention_mask=mask, pixel_values=inputs.get("pixel_values"),
                                          image_grid_thw=inputs["image_grid_thw"],
                                          image_features=inputs.get("image_features"))
        return self.connector(hidden[:, inputs["input_ids"].shape[1]:].to(self.connector.fc1.weight.dtype))

    # ------------------------------------------------------------------------------------------- construction
    @classmethod
    def tiny(cls, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> "UAE":
        """Every component small and random (seeded): the whole loop runs on a CPU in seconds. Image size 64 px."""
        torch.manual_seed(seed)
        processor = Qwen25VLProcessor.tiny()
        lvlm = Qwen25VL(Qwen25VLConfig.preset("tiny", vocab_size=processor.vocab_size,
                                              **processor.special_token_ids()))
        connector = Connector(ConnectorConfig.preset("tiny"))
        dit = MMDiT(MMDiTConfig.preset("tiny"))
        vae = VAE(VAEConfig.preset("tiny"))
        settings = UAESettings(caption_max_new_tokens=24, caption_max_pixels=64 * 64, height=64, width=64, steps=4)
        model = cls(lvlm, processor, connector, dit, vae, settings)
        return model.to(device=device, dtype=dtype).eval()

    @classmethod
    def from_pretrained(cls, release: str | os.PathLike | None = None, *, lvlm: str | os.PathLike | None = None,
                        dit: str | os.PathLike | None = None, sd3: str | os.PathLike | None = None,
                        connector: str | os.PathLike | None = None, llm_lora: str | os.PathLike | None = None,
                        dit_lora: str | os.PathLike | None = None, pooled: str | os.PathLike | None = None,
                        dtype: torch.dtype = torch.bfloat16,
                        device: str | torch.device = "cpu", settings: UAESettings | None = None) -> "UAE":
        """Load the official UAE release folder, or plain parts.

        release: folder with `llm_model/` (Qwen2.5-VL + projector), `llm_lora/`, `dit/`, `dit_lora/`, `SD3/`
        (VAE, scheduler); a processor may live in `llm_model/` or `llm_model_preprocessor/`.
        Otherwise: `lvlm` (Qwen2.5-VL folder), `sd3` (SD3/SD3.5 diffusers folder: transformer/, vae/), optional `dit`
        (a transformer folder replacing sd3's), `connector` (a connector file; default: the projector inside `lvlm`),
        optional `llm_lora` / `dit_lora` adapters, `pooled` (a .safetensors holding 'pooled_projections'; default:
        computed from sd3's text encoders). Explicit parts override the release's."""
        from model import uae_release

        parts = uae_release.resolve_parts(release, lvlm=lvlm, dit=dit, sd3=sd3, connector=connector,
                                          llm_lora=llm_lora, dit_lora=dit_lora, pooled=pooled)
        return uae_release.load(cls, parts, dtype=dtype, device=device, settings=settings)


def dit_velocity(dit: MMDiT, context: torch.Tensor, pooled: torch.Tensor,
                 negative_context: torch.Tensor | None = None):
    """velocity_fn(x, timestep) of `dit` conditioned on `context` [B, L, D] (connector outputs) and `pooled` [B, P],
    in model/flow.py's convention: without a negative context, x is [B, ...] and v is [B, ...]; with one, x is the
    doubled batch [x; x] and the result is [v_uncond; v_cond], the unconditional half conditioned on
    `negative_context`. Both halves run as one DiT batch when the contexts have one length (the released pipeline
    pads positive and negative together); otherwise (the cold start's caption contexts) as two calls, since the DiT
    has no text mask and padding a context would change its output. Inputs are cast to the DiT's dtype, the output
    is fp32."""
    dtype = next(dit.parameters()).dtype
    context, pooled = context.to(dtype), pooled.to(dtype)

    def velocity(x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        if negative_context is None:
            return dit(x.to(dtype), timestep, context, pooled).float()
        b = context.shape[0]
        if x.shape[0] != 2 * b:
            raise ValueError(f"with a negative context, x must be the doubled batch [x; x] of {2 * b} rows, "
                             f"got {x.shape[0]}")
        negative = negative_context.to(dtype)
        if negative.shape[1] == context.shape[1]:
            return dit(x.to(dtype), timestep, torch.cat([negative, context]), torch.cat([pooled, pooled])).float()
        x_u, x_c = x.to(dtype).chunk(2)
        t_u, t_c = timestep.chunk(2)
        return torch.cat([dit(x_u, t_u, negative, pooled), dit(x_c, t_c, context, pooled)]).float()

    return velocity


def _to_pil(images: torch.Tensor) -> list[Image.Image]:
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
    return [Image.fromarray(a.numpy()) for a in x]


__all__ = ["UAE", "UAESettings", "CAPTION_PROMPT", "UNIFIED_BENCH_PROMPT", "NEGATIVE_PROMPT", "LLM_LORA_TARGETS",
           "DIT_LORA_TARGETS", "LORA_RANK", "LORA_ALPHA", "dit_velocity"]
