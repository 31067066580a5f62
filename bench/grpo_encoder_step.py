"""One GRPO stage-2 step (train/grpo_encoder.py's loop body), sequential vs batched, in the same run, random weights.

One source image, G captions sampled at temperature 1 (random weights rarely end a caption early, so every caption
runs to --max-new-tokens), each rendered by the frozen decoder with CFG and scored by a CLIP reward, then the policy
update: the log-prob forwards (policy, and reference at beta 0.04), backward, AdamW on the LM's LoRA.
  sequential: the step as it was before batching: per caption, the vision tower, the prompt prefill and a batch-1
              decode (`UAE.caption` of one image), then a batch-1 render; the old-policy, reference and policy
              forwards each re-run the vision tower and the prompt for every caption (pixel values per row)
  batched:    train/grpo_encoder.py's own functions: `sample_captions` (vision and prefill once per image, its KV
              cache copied to the G rows, one decode of batch G, one generator per row), `render_captions` (one
              DiT batch of G, per-row noise) and `policy_loss` (the image features reused, each prompt run once for
              its G captions, no old-policy forward: one optimizer step per rollout batch, as TRL)
Both variants run the same phases on the same model; the reported split is sample / render / reward / update, with
captions/s and rendered images/s. A short warm-up step of each variant runs first, then --repeats timed steps of
which the fastest counts. The last line is `speedup N.NN`: sequential step time over batched.

Configs: "cpu" (default off CUDA): the issue-14 size, a Qwen2.5-VL with text hidden 512 x 4 layers (8 heads, 2 KV
heads), a 2-block vision tower, a DiT of hidden 384 x 4 blocks, the tiny VAE and CLIP, 128 px renders, 4 steps, 48
caption tokens. "gpu": Qwen2.5-VL-3B, SD3.5-medium, the SD3 VAE and CLIP ViT-L/14 at 512 px, 10 steps, 128 caption
tokens, bf16.

    python bench/grpo_encoder_step.py --device cpu                 # the CPU comparison (~1.5 min on 2 cores)
    python bench/grpo_encoder_step.py                              # on a GPU: the "gpu" config
    python bench/grpo_encoder_step.py --smoke                      # tiny models on CPU
"""
from __future__ import annotations

import common  # noqa: F401  (puts the repository on sys.path)

common.interpret_if_smoke()

import dataclasses  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from common import on, sync  # noqa: E402
from eval.reward import ReconstructionReward, clip_backbone  # noqa: E402
from model.clip import CLIP, CLIPConfig  # noqa: E402
from model.connector import Connector, ConnectorConfig  # noqa: E402
from model.lora import apply_lora, lora_disabled, lora_parameters  # noqa: E402
from model.mmdit import MMDiT, MMDiTConfig  # noqa: E402
from model.qwen2_5_vl import Qwen25VL, Qwen25VLConfig, TextConfig, VisionConfig  # noqa: E402
from model.qwen2_5_vl_processor import Qwen25VLProcessor  # noqa: E402
from model.uae import LLM_LORA_TARGETS, UAE, UAESettings  # noqa: E402
from model.vae import VAE, VAEConfig  # noqa: E402
from train import grpo_encoder as ge  # noqa: E402
from train.data import pil_to_tensor, procedural_scene  # noqa: E402
from train.rl import group_advantages, grpo_loss  # noqa: E402

PHASES = ("sample_s", "render_s", "reward_s", "update_s")


def build(config: str, device: torch.device, dtype: torch.dtype) -> tuple[UAE, ReconstructionReward, dict]:
    """(UAE with LoRA r16 on the LM, reward, sizes) of `config`, random weights."""
    processor = Qwen25VLProcessor.tiny()
    ids = processor.special_token_ids()
    if config == "gpu":
        lvlm_cfg = Qwen25VLConfig.preset("3b", **ids)
        dit_cfg, vae_cfg, clip_cfg = MMDiTConfig.preset("sd3.5-medium"), VAEConfig(), CLIPConfig.preset("vit-l-14")
        sizes = dict(size=512, gen_steps=10, max_new_tokens=128, pixels=448 * 448)
    elif config == "cpu":
        lvlm_cfg = Qwen25VLConfig(
            text=TextConfig(vocab_size=processor.vocab_size, hidden_size=512, intermediate_size=1376,
                            num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                            mrope_section=(8, 12, 12), max_position_embeddings=4096),
            vision=VisionConfig(depth=2, hidden_size=256, num_heads=4, intermediate_size=512, out_hidden_size=512,
                                window_size=56, fullatt_block_indexes=(1,)), **ids)
        dit_cfg = MMDiTConfig(sample_size=16, patch_size=2, in_channels=16, num_layers=4, attention_head_dim=64,
                              num_attention_heads=6, joint_attention_dim=384, caption_projection_dim=384,
                              pooled_projection_dim=64, out_channels=16, pos_embed_max_size=32)
        vae_cfg, clip_cfg = VAEConfig.preset("tiny"), CLIPConfig.preset("tiny")
        sizes = dict(size=128, gen_steps=4, max_new_tokens=128, pixels=112 * 112)
    else:  # smoke
        lvlm_cfg = Qwen25VLConfig.preset("tiny", vocab_size=processor.vocab_size, **ids)
        dit_cfg, vae_cfg, clip_cfg = MMDiTConfig.preset("tiny"), VAEConfig.preset("tiny"), CLIPConfig.preset("tiny")
        sizes = dict(size=64, gen_steps=2, max_new_tokens=6, pixels=64 * 64)
    connector_cfg = ConnectorConfig(in_dim=lvlm_cfg.text.hidden_size, hidden_dim=2 * dit_cfg.joint_attention_dim,
                                    out_dim=dit_cfg.joint_attention_dim, pooled_dim=dit_cfg.pooled_projection_dim)
    parts = [on(device, dtype, lambda c=c, cls=cls: cls(c)) for cls, c in
             ((Qwen25VL, lvlm_cfg), (Connector, connector_cfg), (MMDiT, dit_cfg), (VAE, vae_cfg))]
    settings = UAESettings(caption_max_new_tokens=sizes["max_new_tokens"], caption_max_pixels=sizes["pixels"],
                           height=sizes["size"], width=sizes["size"], steps=sizes["gen_steps"], guidance_scale=5.0)
    uae = UAE(*parts[:1], processor, *parts[1:], settings=settings).eval().requires_grad_(False)
    apply_lora(uae.lvlm.language_model, LLM_LORA_TARGETS.split(","), rank=16, alpha=32.0, init="gaussian")
    for p in lora_parameters(uae.lvlm):
        p.data = p.data.float()
    reward = ReconstructionReward(clip_backbone(on(device, dtype, lambda: CLIP(clip_cfg)).eval()))
    return uae, reward, sizes


def stage2_step(uae: UAE, reward, opt, image: Image.Image, o: ge.Options, batched: bool) -> dict:
    """One step of G captions of `image`; returns the seconds of each phase."""
    device, g = uae.device, o.group_size
    image_of, seeds = [0] * g, list(range(1, 2 * g + 1))
    cap_seeds, render_seeds = seeds[:g], seeds[g:]
    times = {}

    def lap(name, t0):
        sync(device)
        times[name] = time.perf_counter() - t0

    t0 = time.perf_counter()  # 1. captions
    if batched:
        tokens, masks, texts, inputs = ge.sample_captions(uae, [image], image_of, cap_seeds, o)
    else:
        rows = [uae.caption([image], do_sample=True, temperature=o.temperature, max_new_tokens=o.max_new_tokens,
                            generator=torch.Generator().manual_seed(s), return_output=True)[2] for s in cap_seeds]
        n_max, pad = max(r.new_tokens.shape[1] for r in rows), uae.processor.pad_token_id
        tokens = torch.cat([torch.nn.functional.pad(r.new_tokens, (0, n_max - r.new_tokens.shape[1]), value=pad)
                            for r in rows])
        masks = torch.cat([torch.nn.functional.pad(r.mask, (0, n_max - r.mask.shape[1]), value=False) for r in rows])
        texts = [t.strip() for t in uae.processor.batch_decode(tokens.masked_fill(~masks, pad).tolist())]
        inputs = uae.caption_inputs([image] * g)  # pixel values per row: the vision tower runs per caption
    lap("sample_s", t0)

    t0 = time.perf_counter()  # 2. renders
    with torch.no_grad():
        if batched:
            recon = ge.render_captions(uae, texts, render_seeds, o)
        else:
            recon = torch.cat([uae.generate([t], o.size, o.size, o.gen_steps, o.guidance_scale,
                                            torch.Generator().manual_seed(s), output_type="tensor")
                               for t, s in zip(texts, render_seeds)])
    lap("render_s", t0)

    t0 = time.perf_counter()  # 3. reward and advantages
    with torch.no_grad():
        rewards = reward(pil_to_tensor([image] * g, o.size).to(device), recon)
        advantages = group_advantages(rewards.float(), g, clip=o.adv_clip)
    lap("reward_s", t0)

    t0 = time.perf_counter()  # 4. log-probs, backward, AdamW
    opt.zero_grad(set_to_none=True)
    if batched:
        loss, _ = ge.policy_loss(uae, inputs, tokens, masks, advantages, o)
    else:  # the old policy's forward too, as the step did before taking the policy's own log-probs, detached
        with torch.no_grad():
            old_logp = uae.caption_logprobs(inputs, tokens, masks, o.temperature)
            with lora_disabled(uae.lvlm):
                ref_logp = uae.caption_logprobs(inputs, tokens, masks, o.temperature)
        logp = uae.caption_logprobs(inputs, tokens, masks, o.temperature)
        loss, _ = grpo_loss(logp, old_logp, ref_logp, advantages, masks, o.clip_eps, o.beta)
    loss.backward()
    opt.step()
    lap("update_s", t0)
    times["caption_tokens"] = int(masks.sum())
    times["finite"] = bool(torch.isfinite(rewards).all() and torch.isfinite(loss))
    return times


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--device", default="", help="cpu or cuda (default: cuda if there is one)")
    p.add_argument("--config", default="", help="cpu | gpu (default: gpu on CUDA, cpu otherwise)")
    p.add_argument("--group-size", type=int, default=8, help="captions per image (G)")
    p.add_argument("--cuda-graph", action="store_true", help="batched decode steps as CUDA graphs")
    p.add_argument("--max-new-tokens", type=int, default=0, help="caption tokens (default: the config's)")
    p.add_argument("--repeats", type=int, default=2, help="timed steps per variant; the fastest is reported")
    args = common.parse(p, argv, __file__)
    if args.device:
        device = torch.device(args.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    elif args.smoke:
        device = torch.device("cpu")
    else:
        raise SystemExit("no CUDA GPU: pass --device cpu (the CPU comparison) or --smoke")
    config = "smoke" if args.smoke else args.config or ("gpu" if device.type == "cuda" else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    uae, reward, sizes = build(config, device, dtype)
    if args.max_new_tokens:
        sizes["max_new_tokens"] = args.max_new_tokens
    opt = torch.optim.AdamW(lora_parameters(uae.lvlm), lr=1e-5)
    o = ge.Options(group_size=args.group_size, size=sizes["size"], gen_steps=sizes["gen_steps"],
                   max_new_tokens=sizes["max_new_tokens"], guidance_scale=5.0, temperature=1.0, beta=0.04,
                   cuda_graph=args.cuda_graph)
    image = procedural_scene(0, sizes["size"])[0]
    short = dataclasses.replace(o, gen_steps=1, max_new_tokens=4)
    rows = []
    for batched in (False, True):
        stage2_step(uae, reward, opt, image, short, batched)  # warm-up: allocator, kernels, graphs
        # The faster of --repeats timed steps (a shared CPU's neighbours slow single runs by up to ~20%).
        t = min((stage2_step(uae, reward, opt, image, o, batched) for _ in range(args.repeats)),
                key=lambda t: sum(t[k] for k in PHASES))
        step = sum(t[k] for k in PHASES)
        rows.append(dict(variant="batched" if batched else "sequential", config=config, G=o.group_size,
                         px=o.size, steps=o.gen_steps, caption_tokens=t["caption_tokens"],
                         **{k: round(t[k], 3) for k in PHASES}, step_s=round(step, 3),
                         captions_per_s=round(o.group_size / t["sample_s"], 3),
                         images_per_s=round(o.group_size / t["render_s"], 3), finite=t["finite"]))
    speedup = rows[0]["step_s"] / rows[1]["step_s"]
    sample_speedup = rows[0]["sample_s"] / rows[1]["sample_s"]
    targets = [common.target("stage-2 step, batched over sequential (CPU goal 3x at G 8)", speedup, 3.0, True),
               common.target("caption sampling, batched over sequential (GPU goal 5x at G 8)", sample_speedup,
                             5.0, True)]
    result = common.report("grpo_encoder_step", args, rows, targets)
    print(f"speedup {speedup:.2f}")
    return result


if __name__ == "__main__":
    main()
