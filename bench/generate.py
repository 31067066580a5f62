"""Caption generation speed: our `generate` (model/qwen2_5_vl_generation.py), eager and with CUDA-graph decode steps,
against transformers' Qwen2_5_VLForConditionalGeneration.generate, same run, same GPU.

Random-initialised models at the real Qwen2.5-VL-3B shapes in bf16 (weights differ between the two: speed does not
depend on them), text-only prompts of 64 random tokens, 256 sampled new tokens (temperature 0.7, no top-k/top-p), at
batch 1 and 8 (HF `generate` on one H100 measured 28 / 252 tok/s there). tok/s counts every row's generated tokens
(batch x steps). Also checks that greedy decoding with the graph gives exactly the eager tokens, and reports the
bandwidth the decode reaches on the language-model weights (bytes of the LM per step / time per step; H100 copy
ceiling ~3.0 TB/s).

    python bench/generate.py [--quick] [--out results.json]
    python bench/generate.py --smoke          # tiny models on CPU (no CUDA graph there)
"""
from __future__ import annotations

import common  # noqa: F401  (puts the repository on sys.path)

common.interpret_if_smoke()

import torch  # noqa: E402

from common import on  # noqa: E402
from model.qwen2_5_vl import Qwen25VL, Qwen25VLConfig  # noqa: E402
from model.qwen2_5_vl_generation import GenerationConfig, generate  # noqa: E402

SMOKE_VOCAB = 1000
SMOKE_IDS = dict(image_token_id=990, video_token_id=991, vision_start_token_id=992, vision_end_token_id=993)


def hf_config(smoke: bool):
    from transformers import Qwen2_5_VLConfig

    if smoke:
        text = dict(vocab_size=SMOKE_VOCAB, hidden_size=12, intermediate_size=24, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                    rope_scaling={"type": "mrope", "mrope_section": [1, 1, 1]}, rope_theta=1e6, rms_norm_eps=1e-6,
                    bos_token_id=0, eos_token_id=SMOKE_VOCAB - 1)
        vision = dict(depth=2, hidden_size=16, num_heads=2, intermediate_size=24, out_hidden_size=12,
                      window_size=56, fullatt_block_indexes=[1])
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, bos_token_id=0,
                                eos_token_id=SMOKE_VOCAB - 1, **SMOKE_IDS)
    # Qwen/Qwen2.5-VL-3B-Instruct config.json
    text = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000, rope_theta=1e6,
                rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, rms_norm_eps=1e-6)
    vision = dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=2048,
                  window_size=112, fullatt_block_indexes=[7, 15, 23, 31])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                            image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                            vision_end_token_id=151653)


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    p.add_argument("--new", type=int, default=256, help="new tokens")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers reference")
    args = common.parse(p, argv, __file__)
    device = common.device_for(args)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    prompt, new = (16, 8) if args.smoke else (args.prompt, args.new)
    batches = [int(b) for b in args.batches.split(",")]
    if args.smoke:
        batches = [1, 2]
    reps = 1 if args.quick or args.smoke else 2

    torch.manual_seed(0)
    cfg = Qwen25VLConfig.preset("tiny", vocab_size=SMOKE_VOCAB, **SMOKE_IDS) if args.smoke \
        else Qwen25VLConfig.preset("3b")
    ours = on(device, dtype, lambda: Qwen25VL(cfg)).eval()
    lm_bytes = sum(t.numel() * t.element_size() for t in ours.language_model.state_dict().values())
    hf = None
    if not args.no_hf:
        from transformers import Qwen2_5_VLForConditionalGeneration

        hf = on(device, dtype, lambda: Qwen2_5_VLForConditionalGeneration(hf_config(args.smoke))).eval()
    vocab, eos = cfg.text.vocab_size, cfg.text.vocab_size - 1
    sampling = dict(do_sample=True, temperature=0.7, top_k=0, top_p=1.0)

    def ours_gen(ids, n, cuda_graph, **kw):
        config = GenerationConfig(max_new_tokens=n, eos_token_id=eos, pad_token_id=0, **{**sampling, **kw})
        out = generate(ours, ids, config=config, cuda_graph=cuda_graph)
        return out.new_tokens.numel()

    def hf_gen(ids, n):
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          eos_token_id=eos, pad_token_id=0, **sampling)
        return (out.shape[1] - ids.shape[1]) * ids.shape[0]

    rows, targets = [], []
    for batch in batches:
        ids = torch.randint(0, vocab - 16, (batch, prompt), device=device)
        impls = {"ours eager": lambda: ours_gen(ids, new, False)}
        if cuda:
            impls["ours cuda-graph"] = lambda: ours_gen(ids, new, True)
            greedy = GenerationConfig(max_new_tokens=32, eos_token_id=eos)
            same = torch.equal(generate(ours, ids, config=greedy, cuda_graph=True).sequences,
                               generate(ours, ids, config=greedy, cuda_graph=False).sequences)
            rows.append(dict(impl="check: greedy graph == eager", batch=batch, new_tokens=32, match=same))
        if hf is not None:
            impls["hf generate"] = lambda: hf_gen(ids, new)
        tok_s = {}
        for name, run in impls.items():
            if name == "hf generate":
                hf_gen(ids, 4)  # warm-up
            elif name == "ours eager":
                ours_gen(ids, 4, False)
            else:
                run()  # records the graph for this (batch, max_len)
            seconds, tokens = common.wall_s(run, device, reps=1 if name == "hf generate" else reps)
            tok_s[name] = tokens / seconds
            step_s = seconds / (tokens / batch)
            rows.append(dict(impl=name, batch=batch, prompt=prompt, new_tokens=tokens // batch,
                             seconds=round(seconds, 3), tok_per_s=round(tok_s[name], 1),
                             ms_per_step=round(1e3 * step_s, 3),
                             lm_weight_GBps=None if name == "hf generate" else round(lm_bytes / step_s / 1e9, 1)))
        if "hf generate" in tok_s:
            goal = {1: 8.0, 8: 3.0}.get(batch)
            for name in ("ours cuda-graph", "ours eager"):
                if name in tok_s and goal is not None and (name == "ours cuda-graph" or not cuda):
                    targets.append(common.target(f"generate B{batch}: {name} tok/s / HF tok/s",
                                                 tok_s[name] / tok_s["hf generate"], goal, higher=True))
            if "ours eager" in tok_s and cuda:
                rows.append(dict(impl="ratio eager / hf", batch=batch,
                                 tok_per_s=round(tok_s["ours eager"] / tok_s["hf generate"], 2)))
    return common.report("generate", args, rows, targets)


if __name__ == "__main__":
    main()
