"""The same images through diffusers' own IP-Adapter code: the comparison path (notebook 5).

`ipa_lab.generate` samples with our processors, our projection and our token concatenation.
This module gets the same images from the stock diffusers pipeline instead, so the course can
prove the two agree: the very same checkpoint dict goes into `pipe.load_ip_adapter(...)`, and
the image prompt into the pipeline as `ip_adapter_image_embeds`.

* `diffusers_ip_adapter(pipe, checkpoint)`: a `with` block in which diffusers' adapter is loaded;
* `diffusers_image_embeds`: one image prompt in diffusers' `ip_adapter_image_embeds` format;
* `generate_with_diffusers`: `generate`'s arguments, diffusers' code; same seed, same images.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from .checkpoint import read_checkpoint
from .generate import DEFAULT_GUIDANCE_SCALE, lora_rank_of, prompt_batch, sample_generators


def _is_plus_checkpoint(state) -> bool:
    """A Plus checkpoint's projection is a Resampler: it has learned queries, `latents`."""
    return "latents" in state["image_proj"]


@contextlib.contextmanager
def diffusers_ip_adapter(pipe, checkpoint):
    """Load the checkpoint with diffusers' `pipe.load_ip_adapter` for the duration of a `with`.

    diffusers accepts the checkpoint dict itself: `load_ip_adapter(state_dict, subfolder="",
    weight_name="", image_encoder_folder=None)` (subfolder/weight_name are required arguments but
    unused for a dict). It replaces the cross-attention processors with its own
    `IPAdapterAttnProcessor2_0` and puts the projection into `unet.encoder_hid_proj`.
    On exit `pipe.unload_ip_adapter()` removes them again; as it also drops `pipe.image_encoder`,
    we put the encoder back, and restore whatever processors were there before (ours included).
    A FaceID checkpoint's LoRA goes into the UNet's own linear layers through PEFT (adapter
    "faceid_0"); `unload_ip_adapter` leaves it there, so `unload_lora_weights()` takes it out too.
    """
    from diffusers.models.attention_processor import AttnProcessor2_0
    from diffusers.utils import USE_PEFT_BACKEND

    state = read_checkpoint(checkpoint)
    faceid = lora_rank_of(state) is not None  # its processors carry LoRA weights
    if faceid and not USE_PEFT_BACKEND:  # diffusers would only log a warning and skip the LoRA
        raise RuntimeError("this is a FaceID checkpoint: diffusers loads its LoRA through PEFT, which is not "
                           "installed; pip install peft (the course pins peft==0.21.2: pip install -e \".[course]\")")
    saved_processors = pipe.unet.attn_processors
    saved_encoder = getattr(pipe, "image_encoder", None)
    saved_features = getattr(pipe, "feature_extractor", None)
    try:
        # diffusers rebuilds each self-attention processor as `type(current)()`: start from plain ones
        pipe.unet.set_attn_processor(AttnProcessor2_0())
        pipe.load_ip_adapter(state, subfolder="", weight_name="", image_encoder_folder=None)
        yield state
    finally:
        if faceid:
            pipe.unload_lora_weights()
        pipe.unload_ip_adapter()
        pipe.register_modules(image_encoder=saved_encoder, feature_extractor=saved_features)
        pipe.unet.set_attn_processor(saved_processors)


def diffusers_image_embeds(pipe, plus: bool, image=None, guidance: bool = True) -> list[torch.Tensor]:
    """One image prompt in the format of diffusers' `ip_adapter_image_embeds`.

    A list with one tensor per loaded adapter, shaped (1, num_images, D) for the base model or
    (1, num_images, tokens, D) for Plus; num_images counts images *combined* into one prompt
    (here 1). With guidance it is cat([uncond, cond]) along dim 0 (the pipeline `chunk(2)`s it).
    These are raw encoder features from diffusers' own `pipe.encode_image` (zeros as the base
    model's uncond, the encoder on a zero image for Plus); the pipeline projects them.
    The pipeline repeats this tensor for every sample of the call (`batch_size *
    num_images_per_prompt` times): one image prompt per call. image=None gives "no image"
    (the uncond features in both halves).
    """
    device = pipe._execution_device
    if image is None:
        size = pipe.image_encoder.config.image_size
        _, uncond = pipe.encode_image(torch.zeros(1, 3, size, size), device, 1, plus)
        cond = uncond
    else:
        cond, uncond = pipe.encode_image(image, device, 1, plus)
    if cond.shape[0] != 1:
        raise ValueError(f"one image prompt per call, got {cond.shape[0]}")
    return [torch.cat([uncond, cond])[:, None] if guidance else cond[:, None]]


def _embeds_prompt(embeds: torch.Tensor, guidance: bool) -> list[torch.Tensor]:
    """One precomputed embedding (D,) as diffusers' `ip_adapter_image_embeds`: [(2, 1, D)] with
    guidance (a zero embedding first: FaceID's "no image"), [(1, 1, D)] without."""
    cond = embeds.reshape(1, 1, -1)
    return [torch.cat([torch.zeros_like(cond), cond]) if guidance else cond]


def _concat(outputs: list, output_type: str):
    """The outputs of several pipeline calls as one, in the type the pipeline returns."""
    if output_type == "pil":
        return [im for out in outputs for im in out]
    if output_type == "np":
        return np.concatenate(outputs)
    return torch.cat(outputs)


@torch.no_grad()
def _diffusers_call(pipe, plus: bool, image, prompt, negative_prompt, scale, num_samples, seed,
                    num_inference_steps, guidance_scale, output_type, image_embeds=None):
    """Sample through the stock pipeline with a diffusers-loaded adapter (see generate_with_diffusers).

    Without an image prompt all prompts share the same (uncond) image features: one call.
    With image prompts, one call per image: the pipeline gives one image prompt to its whole batch.
    """
    images, prompts, negatives = prompt_batch(image if image_embeds is None else list(image_embeds), prompt,
                                              negative_prompt)
    cfg = guidance_scale > 1.0
    pipe.set_ip_adapter_scale(scale)

    def call(image_i, prompts_i, negatives_i, first):
        embeds = (diffusers_image_embeds(pipe, plus, image_i, cfg) if image_embeds is None
                  else _embeds_prompt(image_i[0], cfg))
        return pipe(prompt=prompts_i, negative_prompt=negatives_i if cfg else None, num_images_per_prompt=num_samples,
                    ip_adapter_image_embeds=embeds,
                    guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                    generator=sample_generators(seed + first, len(prompts_i) * num_samples),
                    output_type=output_type).images

    if images is None:
        return call(None, prompts, negatives, 0)
    outputs = [call(images[i : i + 1], prompts[i : i + 1], negatives[i : i + 1], i * num_samples)
               for i in range(len(prompts))]
    return _concat(outputs, output_type)


def generate_with_diffusers(pipe, checkpoint, image=None, prompt="", negative_prompt="", scale: float = 1.0,
                            num_samples: int = 4, seed: int = 0, num_inference_steps: int = 25,
                            guidance_scale: float = DEFAULT_GUIDANCE_SCALE, output_type: str = "pil",
                            image_embeds=None):
    """The same as `generate`, through diffusers' own IP-Adapter code instead of ours.

    `checkpoint`: the path or dict that `load_adapter` takes. The adapter is loaded with
    `pipe.load_ip_adapter`, the images go in as `ip_adapter_image_embeds` (see
    `diffusers_image_embeds`; one pipeline call per image prompt, since the stock pipeline
    shares one image prompt across its batch), `pipe.set_ip_adapter_scale(scale)` sets lambda,
    and the adapter is unloaded afterwards, so the pipeline (and any adapter of ours in it) is
    as before.
    `image_embeds` (FaceID): precomputed embeddings, one prompt per row, as for `generate`.
    Same arguments, same seed -> the same images as `generate`, up to float rounding.
    """
    with diffusers_ip_adapter(pipe, checkpoint) as state:
        return _diffusers_call(pipe, _is_plus_checkpoint(state), image, prompt, negative_prompt, scale,
                               num_samples, seed, num_inference_steps, guidance_scale, output_type, image_embeds)
