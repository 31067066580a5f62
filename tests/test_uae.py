"""model/uae.py and model/uae_release.py: the composed model, its conditioning, the cold-start path, and loading a
tiny fake UAE release written with transformers / diffusers / peft."""
import dataclasses

import pytest
import torch
from PIL import Image

from model import qwen2_5_vl_generation
from model.flow import flow_sigmas, guided_velocity, sample_ode
from model.lora import apply_lora, frozen_lora_layers, lora_layers, lora_parameters
from model.uae import NEGATIVE_PROMPT, UAE
from tests.fake_release import LLM_LORA_MODULES, build_fake_release
from tests.numerics import rel_err
from train.data import procedural_scene


@pytest.fixture(scope="module")
def tiny():
    return UAE.tiny(seed=0)


def test_tiny_reconstruction_runs_and_is_deterministic(tiny):
    images = [procedural_scene(i, size=64)[0] for i in range(2)]
    caps_a, rec_a = tiny.reconstruct(images, generator=torch.Generator().manual_seed(3))
    caps_b, rec_b = tiny.reconstruct(images, generator=torch.Generator().manual_seed(3))
    assert caps_a == caps_b and all(a.tobytes() == b.tobytes() for a, b in zip(rec_a, rec_b))
    assert len(caps_a) == 2 and all(im.size == (64, 64) for im in rec_a)
    _, rec_c = tiny.reconstruct(images, generator=torch.Generator().manual_seed(4))
    assert rec_c[0].tobytes() != rec_a[0].tobytes()


def test_generate_turn_ids_follow_the_released_convention(tiny):
    p = tiny.processor
    ids, mask = tiny.generate_turn_ids([NEGATIVE_PROMPT, "a cat"])
    expected = [p.encode(p.apply_chat_template([{"role": "generate", "content": t}], add_generation_prompt=True))
                for t in (NEGATIVE_PROMPT, "a cat")]
    assert ids[0].tolist() == expected[0]
    assert ids[1, :len(expected[1])].tolist() == expected[1]
    assert (ids[1, len(expected[1]):] == p.pad_token_id).all(), "right padding with the pad id"
    assert torch.equal(mask, ids.ne(p.pad_token_id).long())
    chat = p.apply_chat_template([{"role": "generate", "content": "a cat"}], add_generation_prompt=True)
    assert chat.endswith("<|im_start|>generate\na cat<|im_end|>\n<|im_start|>assistant\n")


def test_conditioning_and_guided_velocity(tiny):
    prompts = ["a red square", "two blue circles on a yellow background"]
    context, negative = tiny.condition(prompts, guidance_scale=4.0)
    ids, mask = tiny.generate_turn_ids([NEGATIVE_PROMPT] + prompts)
    with torch.no_grad():
        want = tiny.connector(tiny.lvlm.forward_hidden(ids, attention_mask=mask))
    torch.testing.assert_close(context, want[1:])
    torch.testing.assert_close(negative, want[:1].expand(2, -1, -1))
    x = torch.randn(2, 16, 8, 8)
    sigma = torch.tensor(0.7)
    t = torch.full((2,), 700.0)
    pooled = tiny.connector.pooled.expand(2, -1)
    with torch.no_grad():
        v = guided_velocity(tiny.velocity_fn(context, negative), x, sigma, 4.0)
        v_u = tiny.dit(x, t, negative, pooled)
        v_c = tiny.dit(x, t, context, pooled)
        # Contexts of different lengths take the two-call path; same result as padding them together here.
        v_split = guided_velocity(tiny.velocity_fn(context[:, :-1], negative), x, sigma, 4.0)
        v_c_short = tiny.dit(x, t, context[:, :-1], pooled)
        v_plain = tiny.velocity_fn(context)(x, t)
    torch.testing.assert_close(v, v_u + 4.0 * (v_c - v_u), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v_split, v_u + 4.0 * (v_c_short - v_u), rtol=1e-5, atol=1e-5)
    assert torch.equal(v_plain, v_c)
    with pytest.raises(ValueError, match="doubled batch"):
        tiny.velocity_fn(context, negative)(x, t)
    with pytest.raises(ValueError, match="multiples of 16"):
        tiny.latent_shape(1, 60, 64)


def test_cold_start_gradients_reach_both_halves():
    uae = UAE.tiny(seed=1).requires_grad_(False)
    apply_lora(uae.lvlm.language_model, ["q_proj", "v_proj", "down_proj"], rank=2, alpha=4)
    apply_lora(uae.dit, ["to_q", "add_k_proj"], rank=2, alpha=4)
    uae.connector.requires_grad_(True)
    images = [procedural_scene(i, size=64)[0] for i in range(2)]
    _, inputs, out = uae.caption(images, max_new_tokens=6, generator=torch.Generator().manual_seed(0),
                                 return_output=True)
    context = uae.caption_context(inputs, out.new_tokens, out.mask)
    assert context.shape[:2] == out.new_tokens.shape and context.requires_grad
    with torch.no_grad():
        negative = uae.encode_text([NEGATIVE_PROMPT]).expand(2, -1, -1)
    x = sample_ode(uae.velocity_fn(context, negative), torch.randn(2, 16, 8, 8), flow_sigmas(2), guidance_scale=3.0)
    recon = uae.vae.decode(uae.vae.from_model_latents(x))
    recon.square().mean().backward()
    for half in (uae.lvlm, uae.dit):
        grads = [layer.B.weight.grad for layer in lora_layers(half).values()]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    assert uae.connector.fc1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in uae.lvlm.named_parameters() if "lora_" not in n)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("UAE")
    return root, build_fake_release(root)


def test_release_loads_every_part(release):
    root, refs = release
    uae = UAE.from_pretrained(root, dtype=torch.float32)
    # DiT + adapter == peft-wrapped diffusers transformer.
    g = torch.Generator().manual_seed(5)
    x, ctx, pooled = torch.randn(2, 16, 6, 10, generator=g), torch.randn(2, 7, 20, generator=g), torch.randn(2, 10)
    t = torch.tensor([700.0, 80.0])
    with torch.no_grad():
        want = refs["dit"](hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled).sample
        got = uae.dit(x, t, ctx, pooled)
    assert rel_err(got, want) <= 1e-5
    # LVLM + release LoRA == transformers' model with W + (alpha/r) B A written into the wrapped linears.
    qwen = refs["qwen"]
    ids = torch.randint(0, 300, (2, 9), generator=g)
    with torch.no_grad():
        for path, delta in refs["llm_delta"].items():
            qwen.get_submodule("model." + path).weight += delta
        want = qwen(input_ids=ids).logits
        for path, delta in refs["llm_delta"].items():
            qwen.get_submodule("model." + path).weight -= delta
        got = uae.lvlm(ids)
    assert rel_err(got, want) <= 1e-5
    # The release's adapters are part of the base: frozen, not trainable adapters.
    assert sorted(frozen_lora_layers(uae.lvlm)) == sorted(LLM_LORA_MODULES) and not lora_layers(uae.lvlm)
    assert sorted(frozen_lora_layers(uae.dit)) and not lora_layers(uae.dit)
    # Connector == the release's projector; pooled == SD3's CLIP-L + CLIP-G pooled embeddings of "" (77 tokens).
    assert torch.equal(uae.connector.fc1.weight, refs["projector"]["projector.0.weight"])
    assert torch.equal(uae.connector.fc2.bias, refs["projector"]["projector.2.bias"])
    pooled_ref = []
    for enc, pad in refs["encoders"]:
        ids = torch.full((1, 77), pad)
        ids[0, :2] = torch.tensor([49406, 49407])
        with torch.no_grad():
            pooled_ref.append(enc(input_ids=ids).text_embeds[0])
    torch.testing.assert_close(uae.connector.pooled, torch.cat(pooled_ref), rtol=1e-5, atol=1e-6)
    # And the whole loop runs on it.
    uae.settings.caption_max_new_tokens = 5
    captions, images = uae.reconstruct([Image.new("RGB", (40, 30), (200, 30, 30))], height=32, width=32, steps=2,
                                       generator=torch.Generator().manual_seed(0))
    assert len(captions) == 1 and images[0].size == (32, 32)


def test_release_with_a_part_missing(release, tmp_path):
    root, _ = release
    partial = tmp_path / "UAE"
    partial.mkdir()
    for part in ("llm_model", "dit", "SD3"):
        (partial / part).symlink_to(root / part)
    with pytest.raises(FileNotFoundError, match="lacks llm_lora, dit_lora"):
        UAE.from_pretrained(partial)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        UAE.from_pretrained(tmp_path / "nowhere")
    # Plain parts: Qwen folder + SD3 folder (+ dit) without adapters load too.
    uae = UAE.from_pretrained(lvlm=root / "llm_model", sd3=root / "SD3", dit=root / "dit", dtype=torch.float32)
    assert not lora_layers(uae.lvlm) and not lora_layers(uae.dit)


def test_caption_inputs_cap_pixels_through_smart_resize(tiny):
    from model.qwen2_5_vl_processor import smart_resize

    cfg = tiny.processor.image_config
    inputs = tiny.caption_inputs([Image.new("RGB", (300, 200), (1, 2, 3))])
    _, h, w = inputs["image_grid_thw"][0].tolist()
    want_h, want_w = smart_resize(200, 300, 28, cfg.min_pixels, tiny.settings.caption_max_pixels)
    assert (h * 14, w * 14) == (want_h, want_w) and want_h * want_w <= tiny.settings.caption_max_pixels
    assert tiny.processor.image_config.max_pixels == cfg.max_pixels, "the shared processor is left untouched"


def test_pad_to_extends_the_right_padding(tiny):
    ids, mask = tiny.generate_turn_ids(["a cat", "a much longer caption about a cat"])
    ids2, mask2 = tiny.generate_turn_ids(["a cat", "a much longer caption about a cat"], pad_to=ids.shape[1] + 3)
    assert torch.equal(ids2[:, :ids.shape[1]], ids) and (ids2[:, ids.shape[1]:] == tiny.processor.pad_token_id).all()
    assert mask2[:, ids.shape[1]:].sum() == 0
    with pytest.raises(ValueError, match="shorter than the longest text"):
        tiny.generate_turn_ids(["a much longer caption about a cat"], pad_to=2)


def test_captions_end_before_a_sampled_placeholder(tiny, monkeypatch):
    # A sampled <|image_pad|> / <|video_pad|> cannot be re-encoded with the image (the LVLM counts image tokens
    # against its patches): the caption ends before the first one, in the text and in the mask the cold start uses.
    p = tiny.processor
    real = qwen2_5_vl_generation.generate

    def with_placeholders(*a, **k):
        out = real(*a, **k)
        tokens = out.new_tokens.clone()
        tokens[0, 2], tokens[1, 3] = p.image_token_id, p.video_token_id
        return dataclasses.replace(out, new_tokens=tokens)

    monkeypatch.setattr(qwen2_5_vl_generation, "generate", with_placeholders)
    images = [procedural_scene(i, size=64)[0] for i in range(2)]
    texts, inputs, out = tiny.caption(images, max_new_tokens=6, do_sample=False, return_output=True)
    assert out.mask.sum(1).tolist() == [2, 3] and not out.mask[:, 3:].any()
    assert texts == [p.batch_decode([out.new_tokens[i, :n].tolist()])[0].strip() for i, n in enumerate([2, 3])]
    context = tiny.caption_context(inputs, out.new_tokens, out.mask)  # raised "... image tokens ..." before
    assert context.shape[:2] == out.new_tokens.shape


def test_group_captions_share_the_prefill_and_rows_keep_their_seeds(tiny):
    # G captions per image in one batch (UAE.caption with image_of): each equals the caption of its image alone
    # from the same seed, and the rows' inputs (vision once per image, prompts shared) give the log-probs and
    # gradients of one full forward per caption.
    images = [procedural_scene(i, size=64)[0] for i in range(2)]
    image_of, seeds = [0, 1, 1, 0, 1], [5, 6, 7, 8, 9]
    texts, rows, out = tiny.caption(images, max_new_tokens=10, temperature=1.0, image_of=image_of,
                                    generator=[torch.Generator().manual_seed(s) for s in seeds], return_output=True)
    for text, i, s in zip(texts, image_of, seeds):
        assert tiny.caption([images[i]], max_new_tokens=10, temperature=1.0,
                            generator=[torch.Generator().manual_seed(s)]) == [text]
    model = UAE.tiny(seed=0)
    apply_lora(model.lvlm.language_model, ["q_proj", "v_proj"], rank=2, alpha=4.0, init="gaussian")
    with torch.no_grad():  # B starts at zero, which would leave A without a gradient to compare
        for b in lora_parameters(model.lvlm)[1::2]:
            b.normal_(0, 0.1, generator=torch.Generator().manual_seed(b.numel()))
    rows = model.caption_rows(model.caption_inputs(images), image_of)
    per_caption = model.caption_inputs([images[i] for i in image_of])
    grads = []
    for inputs in (rows, per_caption):
        lp = model.caption_logprobs(inputs, out.new_tokens, out.mask)[out.mask]
        grads.append((lp, torch.autograd.grad(lp.sum(), lora_parameters(model.lvlm))))
    assert rel_err(grads[0][0], grads[1][0]) <= 1e-5
    for a, b in zip(grads[0][1], grads[1][1]):
        assert rel_err(a, b) <= 1e-4
    # A group whose captions end at once (one token: the end of turn) takes the prompt-only path.
    ends = torch.full((2, 1), tiny.processor.im_end_id)
    one = tiny.caption_rows(tiny.caption_inputs(images[:1]), [0, 0])
    full = tiny.caption_inputs(images[:1] * 2)
    mask = torch.ones_like(ends, dtype=torch.bool)
    assert rel_err(tiny.caption_logprobs(one, ends, mask), tiny.caption_logprobs(full, ends, mask)) <= 1e-5
    with pytest.raises(ValueError, match="image index in"):
        tiny.caption_rows(tiny.caption_inputs(images[:1]), [0, 1])


def test_generate_with_a_generator_per_prompt_matches_each_alone(tiny):
    prompts = ["a red circle", "a much longer caption: two blue squares on a green background"]
    pad_to = tiny.generate_turn_ids([NEGATIVE_PROMPT] + prompts)[0].shape[1]
    both = tiny.generate(prompts, steps=2, generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
                         output_type="tensor", pad_to=pad_to)
    for i, s in enumerate((1, 2)):
        alone = tiny.generate(prompts[i:i + 1], steps=2, generator=torch.Generator().manual_seed(s),
                              output_type="tensor", pad_to=pad_to)
        assert rel_err(both[i], alone[0]) <= 1e-5
    with pytest.raises(ValueError, match="one generator per prompt"):
        tiny.generate(prompts, steps=1, generator=[torch.Generator()])


def test_generate_each_alone_batches_only_unpadded_prompts(tiny):
    # Prompts of one token length share a batch; every image equals its prompt drawn alone (no padding, the same
    # seed), in the prompts' order, whatever the other prompts are.
    prompts = ["a red circle", "two blue squares on a green background", "a red square", ""]
    lengths = [tiny.generate_turn_ids([p])[0].shape[1] for p in prompts]
    assert lengths[0] == lengths[2] and len(set(lengths)) == 3  # one shared batch, two alone
    seeds = [7, 3, 11, 5]
    each = tiny.generate_each_alone(prompts, seeds, steps=2, output_type="tensor")
    assert each.shape[0] == 4
    for p, s, image in zip(prompts, seeds, each):
        alone = tiny.generate([p], steps=2, generator=torch.Generator().manual_seed(s), output_type="tensor")
        assert rel_err(image, alone[0]) <= 1e-5
    assert len(tiny.generate_each_alone(prompts[:2], seeds[:2], steps=1)) == 2  # PIL images
    with pytest.raises(ValueError, match="one seed per prompt: got 1 for 2 prompts"):
        tiny.generate_each_alone(prompts[:2], [1], steps=1)
