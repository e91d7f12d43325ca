"""Inference with an image prompt: our path equals diffusers' path, scale 0 equals no adapter.

Everything runs on a Stable Diffusion built in the test from the toy configs with seeded random
weights (no files needed), with 2-3 prompt images and 3 denoising steps.
"""
from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch

from ipa_lab.adapter import install_ip_adapter
from ipa_lab.attention import IPAttnProcessor
from ipa_lab.checkpoint import (
    CheckpointMismatchError,
    checkpoint_state,
    image_proj_from_state_dict,
    read_checkpoint,
    save_ip_adapter,
)
from ipa_lab.data import random_spec, render_shape
from ipa_lab.diffusers_path import generate_with_diffusers
from ipa_lab.generate import generate, load_adapter, plain_attention, sample_generators, set_scale
from ipa_lab.projection import ImageProjModel, Resampler, num_tokens_of
from ipa_lab.runtime import quiet

quiet()
STEPS = 3
TOL = 1e-4


def build_random_pipeline(seed: int = 0):
    """The toy Stable Diffusion's architecture (pretrain.toy_configs) with seeded random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    from ipa_lab.pretrain import image_processor, scheduler_config, toy_configs
    from ipa_lab.tokenizer import caption_words
    from ipa_lab.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(caption_words())
    cfg = toy_configs(len(tokenizer))
    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**cfg["vae"]).eval(),
        text_encoder=CLIPTextModel(CLIPTextConfig(**cfg["text"])).eval(),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**cfg["unet"]).eval(),
        scheduler=DDIMScheduler.from_config(scheduler_config()),
        safety_checker=None, feature_extractor=image_processor(),
        image_encoder=CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg["vision"])).eval(),
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def _template():
    return build_random_pipeline()


@pytest.fixture
def pipe(_template):
    """A fresh copy for each test: loading an adapter changes the UNet's processors."""
    return copy.deepcopy(_template)


def make_checkpoint(pipe, plus: bool = False, seed: int = 1) -> dict:
    """A random but non-trivial adapter for `pipe` in the original checkpoint format."""
    torch.manual_seed(seed)
    dim = pipe.unet.config.cross_attention_dim
    encoder = pipe.image_encoder.config
    if plus:
        proj = Resampler(dim=dim, depth=4, dim_head=64, heads=max(1, dim // 64), num_queries=16,
                         embedding_dim=encoder.hidden_size, output_dim=dim, ff_mult=4)
    else:
        proj = ImageProjModel(cross_attention_dim=dim, clip_embeddings_dim=encoder.projection_dim)
    unet = copy.deepcopy(pipe.unet)
    modules = install_ip_adapter(unet, num_tokens=16 if plus else 4)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # move to_k_ip / to_v_ip away from their copied start
        for p in modules.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return checkpoint_state(proj, modules)


def prompt_images(n: int, seed: int = 0):
    rng = random.Random(seed)
    return [render_shape(random_spec(rng), rng) for _ in range(n)]


@pytest.mark.parametrize("plus", [False, True], ids=["base", "plus"])
def test_sizes_are_read_from_the_tensors(pipe, plus):
    state = make_checkpoint(pipe, plus)
    proj = image_proj_from_state_dict(state["image_proj"])
    assert isinstance(proj, Resampler if plus else ImageProjModel)
    assert num_tokens_of(proj) == (16 if plus else 4)
    assert all(torch.equal(proj.state_dict()[k], v) for k, v in state["image_proj"].items())
    if plus:
        assert len(proj.layers) == 4 and proj.layers[0][0].heads == 1 and proj.layers[0][0].dim_head == 64


@pytest.mark.parametrize("plus", [False, True], ids=["base", "plus"])
def test_ours_and_diffusers_give_the_same_images(pipe, plus):
    state = make_checkpoint(pipe, plus)
    images = prompt_images(2)
    args = dict(prompt=["a red circle", ""], num_samples=2, seed=3, num_inference_steps=STEPS, output_type="np")
    proj = load_adapter(pipe, state)
    ours = generate(pipe, proj, images, **args)
    theirs = generate_with_diffusers(pipe, state, images, **args)
    assert ours.shape == (4, 32, 32, 3)
    assert np.abs(ours - theirs).max() <= TOL
    # The image prompt matters (else the comparison would prove little) ...
    assert np.abs(ours - generate(pipe, proj, images, scale=0.0, **args)).max() > 1e-3
    # ... and the pipeline is as before: our processors back, image encoder still there.
    assert pipe.image_encoder is not None and pipe.unet.encoder_hid_proj is None
    assert sum(isinstance(p, IPAttnProcessor) for p in pipe.unet.attn_processors.values()) == 7
    assert np.abs(ours - generate(pipe, proj, images, **args)).max() == 0


def test_no_image_prompt_and_a_half_scale_agree_too(pipe):
    state = make_checkpoint(pipe)
    proj = load_adapter(pipe, state)
    args = dict(prompt=["a blue square", "a cyan triangle"], scale=0.5, num_samples=1,
                num_inference_steps=STEPS, output_type="np")
    ours = generate(pipe, proj, None, **args)
    theirs = generate_with_diffusers(pipe, state, None, **args)
    assert ours.shape == (2, 32, 32, 3)
    assert np.abs(ours - theirs).max() <= TOL


def test_scale_zero_is_the_plain_pipeline(pipe):
    prompts = ["a small red circle in the top left", "a large blue square in the bottom right"]
    plain = pipe(prompt=prompts, num_inference_steps=STEPS, guidance_scale=5.0, output_type="np",
                 generator=sample_generators(0, 2)).images
    proj = load_adapter(pipe, make_checkpoint(pipe))
    ours = generate(pipe, proj, prompt_images(2), prompt=prompts, scale=0.0, num_samples=1, seed=0,
                    num_inference_steps=STEPS, guidance_scale=5.0, output_type="np")
    assert np.abs(plain - ours).max() <= TOL
    with plain_attention(pipe.unet):  # the adapter set aside, then back
        again = pipe(prompt=prompts, num_inference_steps=STEPS, guidance_scale=5.0, output_type="np",
                     generator=sample_generators(0, 2)).images
    assert np.abs(plain - again).max() == 0
    assert set_scale(pipe.unet, 1.0) == 7


def test_seeded_and_independent_of_batching(pipe):
    proj = load_adapter(pipe, make_checkpoint(pipe))
    images = prompt_images(2)
    args = dict(num_samples=2, num_inference_steps=STEPS, output_type="np")
    both = generate(pipe, proj, images, seed=5, **args)
    assert np.abs(both - generate(pipe, proj, images, seed=5, **args)).max() == 0
    second = generate(pipe, proj, images[1:], seed=5 + 2, **args)  # samples 2, 3 of the first call
    assert np.abs(both[2:] - second).max() <= TOL


def test_load_adapter_from_a_file(pipe, tmp_path):
    state = make_checkpoint(pipe, plus=True)
    proj = image_proj_from_state_dict(state)
    unet = copy.deepcopy(pipe.unet)
    modules = install_ip_adapter(unet, num_tokens=16)
    modules.load_state_dict(state["ip_adapter"])
    path = save_ip_adapter(tmp_path / "ip_adapter.safetensors", proj, modules)
    assert read_checkpoint(path).keys() == state.keys()
    images = prompt_images(1)
    args = dict(num_samples=1, num_inference_steps=STEPS, output_type="np")
    from_file = generate(pipe, load_adapter(pipe, path), images, **args)
    from_dict = generate(pipe, load_adapter(pipe, state), images, **args)  # loading again replaces
    assert np.abs(from_file - from_dict).max() == 0


def test_a_missing_key_is_named_and_the_unet_left_plain(pipe):
    state = make_checkpoint(pipe)
    del state["ip_adapter"]["3.to_v_ip.weight"]
    with pytest.raises(CheckpointMismatchError, match=r"3\.to_v_ip\.weight"):
        load_adapter(pipe, state)
    assert not any(isinstance(p, IPAttnProcessor) for p in pipe.unet.attn_processors.values())
    with pytest.raises(RuntimeError, match="load_adapter"):
        set_scale(pipe.unet, 0.5)


def test_a_wrong_shape_is_named(pipe):
    state = make_checkpoint(pipe)
    state["ip_adapter"]["1.to_k_ip.weight"] = torch.zeros(64, 48)
    with pytest.raises(CheckpointMismatchError, match=r"1\.to_k_ip\.weight.*\(64, 48\)"):
        load_adapter(pipe, state)


def test_a_checkpoint_for_another_model_is_refused(pipe):
    state = make_checkpoint(pipe)
    other = ImageProjModel(cross_attention_dim=32, clip_embeddings_dim=32)
    state["image_proj"] = other.state_dict()
    with pytest.raises(CheckpointMismatchError, match="cross_attention_dim"):
        load_adapter(pipe, state)
    state["image_proj"] = ImageProjModel(cross_attention_dim=64, clip_embeddings_dim=16).state_dict()
    with pytest.raises(CheckpointMismatchError, match="projection_dim"):
        load_adapter(pipe, state)
    with pytest.raises(CheckpointMismatchError, match="proj.weight.*latents"):
        image_proj_from_state_dict({"weight": torch.zeros(2)})
    with pytest.raises(CheckpointMismatchError, match="neither part"):
        read_checkpoint({"unet.weight": torch.zeros(2)})


@pytest.mark.parametrize("plus", [False, True], ids=["base", "plus"])
def test_image_prompt_tokens_are_the_projected_encoder_features(pipe, plus):
    """The tokens `generate` appends, computed by hand: what training fed the adapter."""
    from ipa_lab.generate import encode_image_prompt, unconditional_image_tokens

    proj = load_adapter(pipe, make_checkpoint(pipe, plus))
    images = prompt_images(2)
    encoder = pipe.image_encoder
    with torch.no_grad():
        pixels = pipe.feature_extractor(images=images, return_tensors="pt").pixel_values
        size = encoder.config.image_size
        if plus:  # the penultimate layer's patch features; "no image" is the encoder on a zero image
            features = encoder(pixels, output_hidden_states=True).hidden_states[-2]
            none = encoder(torch.zeros(1, 3, size, size), output_hidden_states=True).hidden_states[-2]
        else:  # the pooled, projected embedding; "no image" is a zero embedding
            features, none = encoder(pixels).image_embeds, torch.zeros(1, encoder.config.projection_dim)
        want_cond, want_uncond = proj(features), proj(none)
    cond, uncond = encode_image_prompt(pipe, proj, images)
    assert cond.shape == (2, 16 if plus else 4, 64) and uncond.shape == cond.shape
    assert torch.equal(cond, want_cond) and torch.equal(uncond, want_uncond.expand_as(cond))
    assert torch.equal(unconditional_image_tokens(pipe, proj), want_uncond)


def test_no_image_needs_the_image_encoder_and_says_so(pipe):
    from ipa_lab.generate import unconditional_image_tokens

    proj = load_adapter(pipe, make_checkpoint(pipe))
    pipe.image_encoder = None
    with pytest.raises(ValueError, match="no image_encoder: load it with load_pipeline"):
        unconditional_image_tokens(pipe, proj)


def test_prompt_batch():
    from ipa_lab.generate import prompt_batch

    images = prompt_images(2)
    assert prompt_batch(images, "a", None) == (images, ["a", "a"], ["", ""])
    assert prompt_batch(images[0], ["a"], "b") == ([images[0]], ["a"], ["b"])
    assert prompt_batch(None, ["a", "b", "c"], "") == (None, ["a", "b", "c"], ["", "", ""])
    assert prompt_batch(None, "a", "") == (None, ["a"], [""])
    with pytest.raises(ValueError, match="got 3 prompts for 2 image prompts"):
        prompt_batch(images, ["a", "b", "c"], "")


def test_load_adapter_refuses_a_file_that_is_not_a_checkpoint(pipe, tmp_path):
    path = tmp_path / "ip_adapter.safetensors"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"cannot read the IP-Adapter checkpoint .*ip_adapter\.safetensors.*empty"):
        load_adapter(pipe, path)
    assert not any(isinstance(p, IPAttnProcessor) for p in pipe.unet.attn_processors.values())


def test_preprocessed_pixels_need_no_feature_extractor(pipe):
    from ipa_lab.generate import encode_image_prompt

    proj = load_adapter(pipe, make_checkpoint(pipe))
    pixels = pipe.feature_extractor(images=prompt_images(2), return_tensors="pt").pixel_values
    want, _ = encode_image_prompt(pipe, proj, prompt_images(2))
    pipe.feature_extractor = None
    assert torch.equal(encode_image_prompt(pipe, proj, pixels)[0], want)
    with pytest.raises(ValueError, match="no feature_extractor"):
        encode_image_prompt(pipe, proj, prompt_images(2))
