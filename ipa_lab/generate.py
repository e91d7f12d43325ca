"""Inference with an image prompt: load a trained adapter into a pipeline and sample (notebook 5).

The whole trick of IP-Adapter at inference time fits in one line: the image prompt becomes a
few extra tokens appended after the text tokens,

    encoder_hidden_states = [text tokens (L) ; image tokens (4 for the base model, 16 for Plus)]

and every cross-attention layer's `IPAttnProcessor` splits them again at `L`. The pipeline
itself is untouched: we hand it those longer sequences as `prompt_embeds` (and, for
classifier-free guidance, the unconditional ones as `negative_prompt_embeds`), exactly as the
original `IPAdapter.generate` does. For guidance the image prompt has an "unconditional" version
too: the projection of "no image" (`ipa_lab.encoders.unconditional_image_features`: a zero
embedding for the base model, the encoder's view of an all-zero image for Plus), which is also
what the model saw in training whenever the image was dropped.

Here: `load_adapter` (checkpoint -> our processors and projection in `pipe.unet`), `set_scale`,
`encode_image_prompt` / `unconditional_image_tokens` (the image prompt as tokens) and
`generate`. The same images through diffusers' own IP-Adapter code, to prove the two agree:
`ipa_lab.diffusers_path.generate_with_diffusers`.

Order of the outputs, everywhere: all samples of the first prompt, then of the second, ...
(index `i * num_samples + j` is sample j of prompt i).
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from .adapter import install_ip_adapter, ip_processors
from .checkpoint import CheckpointMismatchError, image_proj_from_state_dict, load_into, read_checkpoint
from .encoders import image_features, unconditional_image_features
from .projection import ImageProjModel, is_plus, num_tokens_of

# Classifier-free guidance weight for the toy model. The paper samples SD 1.5 at 7.5; the toy
# UNet (trained with 10% empty captions) is sampled at a milder weight. Pass your own to compare.
DEFAULT_GUIDANCE_SCALE = 5.0


# ---------------------------------------------------------------------------------------------
# Putting the adapter into a pipeline, and taking it out again
# ---------------------------------------------------------------------------------------------
def remove_adapter(pipe) -> None:
    """Give the UNet back its plain attention (diffusers' default processors), adapter or not.

    Also clears what diffusers' `load_ip_adapter` adds to the UNet (`encoder_hid_proj`).
    The image encoder and feature extractor stay in the pipeline.
    """
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe.unet.set_attn_processor(AttnProcessor2_0())
    if getattr(pipe.unet.config, "encoder_hid_dim_type", None) == "ip_image_proj":
        pipe.unet.encoder_hid_proj = None
        pipe.unet.config.encoder_hid_dim_type = None


@contextlib.contextmanager
def plain_attention(unet):
    """Run the UNet without its adapter for a while: `with plain_attention(pipe.unet): pipe(...)`.

    The adapter's processors are set aside (weights intact) and put back on exit.
    """
    from diffusers.models.attention_processor import AttnProcessor2_0

    saved = unet.attn_processors
    unet.set_attn_processor(AttnProcessor2_0())
    try:
        yield unet
    finally:
        unet.set_attn_processor(saved)


def set_scale(unet, scale: float) -> int:
    """Set the image branch's weight (lambda) in every IP-Adapter processor; return how many.

    scale 0 gives the original model back exactly; 1 is what the adapter was trained with.
    Works on our IPAttnProcessor (a float) and on diffusers' processors (a list, one per adapter).
    """
    processors = list(ip_processors(unet).values())
    if not processors:
        raise RuntimeError("this UNet has no IP-Adapter processors: call load_adapter(pipe, checkpoint) first")
    for p in processors:
        p.scale = [float(scale)] * len(p.scale) if isinstance(p.scale, list) else float(scale)
    return len(processors)


def load_adapter(pipe, checkpoint, scale: float = 1.0) -> nn.Module:
    """Put a trained IP-Adapter into `pipe.unet` with our processors; return the image projection.

    `checkpoint`: a `.safetensors`/`.bin` path or the dict `{"image_proj": ..., "ip_adapter": ...}`.
    Steps: build the projection from the checkpoint's shapes; replace every attention processor
    (`install_ip_adapter`, with the projection's number of tokens); load `to_k_ip`/`to_v_ip` and
    the projection strictly (one error lists every missing, unexpected or mis-shaped key); move
    the projection to the pipeline's device and dtype. An adapter already in the UNet is
    replaced. On any error the UNet is left with plain attention, never half-loaded.
    """
    state = read_checkpoint(checkpoint)
    image_proj_model = image_proj_from_state_dict(state["image_proj"])
    unet = pipe.unet
    width = unet.config.cross_attention_dim
    out = image_proj_model.norm.normalized_shape[0] if isinstance(image_proj_model, ImageProjModel) \
        else image_proj_model.proj_out.out_features
    if out != width:
        raise CheckpointMismatchError(
            f"the checkpoint's projection makes {out}-wide tokens, but this UNet's cross_attention_dim "
            f"is {width}: the adapter was trained for another base model")
    encoder = getattr(pipe, "image_encoder", None)
    if encoder is not None:
        plus = is_plus(image_proj_model)
        have = encoder.config.hidden_size if plus else encoder.config.projection_dim
        need = image_proj_model.embedding_dim if plus else image_proj_model.clip_embeddings_dim
        if have != need:
            raise CheckpointMismatchError(
                f"the checkpoint's projection reads {need}-wide image features, but the pipeline's image "
                f"encoder gives {have} ({'hidden_size' if plus else 'projection_dim'}): wrong image encoder")
    remove_adapter(pipe)
    try:
        adapter_modules = install_ip_adapter(unet, num_tokens=num_tokens_of(image_proj_model), scale=scale)
        load_into(state, image_proj_model, adapter_modules)
    except BaseException:
        remove_adapter(pipe)
        raise
    return image_proj_model.to(device=unet.device, dtype=unet.dtype)


# ---------------------------------------------------------------------------------------------
# The image prompt as tokens
# ---------------------------------------------------------------------------------------------
def _image_encoder(pipe):
    """The pipeline's image encoder, or an error that says how to get one."""
    if getattr(pipe, "image_encoder", None) is None:
        raise ValueError("this pipeline has no image_encoder: load it with load_pipeline(..., image_encoder=<folder>)")
    return pipe.image_encoder


def _clip_pixels(pipe, images) -> torch.Tensor:
    """PIL images (or arrays) -> the image encoder's input, with the pipeline's own preprocessing.

    A 4-D tensor is taken as already preprocessed (like diffusers' `encode_image`).
    """
    encoder = _image_encoder(pipe)
    if not (isinstance(images, torch.Tensor) and images.ndim == 4):
        if getattr(pipe, "feature_extractor", None) is None:
            raise ValueError("this pipeline has no feature_extractor (the image encoder's preprocessing): load it "
                             "with load_pipeline(..., image_encoder=<folder>), or pass preprocessed (B, 3, S, S) pixels")
        images = pipe.feature_extractor(images=list(images), return_tensors="pt").pixel_values
    return images.to(device=encoder.device, dtype=encoder.dtype)


def _project(image_proj_model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Run the projection on features, moved to the projection's device and dtype."""
    param = next(image_proj_model.parameters())
    return image_proj_model(features.to(device=param.device, dtype=param.dtype))


@torch.no_grad()
def unconditional_image_tokens(pipe, image_proj_model: nn.Module) -> torch.Tensor:
    """The "no image" tokens, (1, num_tokens, dim): the projection of the features of "no image"
    (`encoders.unconditional_image_features`: a zero embedding for the base model, the encoder's
    features of an all-zero input image for Plus), as in the original and in diffusers.
    These are also what the model saw in training whenever the image prompt was dropped."""
    features = unconditional_image_features(_image_encoder(pipe), is_plus(image_proj_model))
    return _project(image_proj_model, features)


@torch.no_grad()
def encode_image_prompt(pipe, image_proj_model: nn.Module, images) -> tuple[torch.Tensor, torch.Tensor]:
    """Images -> (cond_tokens, uncond_tokens), each (batch, num_tokens, cross_attention_dim).

    CLIP preprocessing (`pipe.feature_extractor`), the frozen image encoder (`image_embeds` for
    the base model, `hidden_states[-2]` for Plus: `encoders.image_features`), then the trained
    projection. The unconditional tokens are the same for every image (see
    `unconditional_image_tokens`).
    """
    pixels = _clip_pixels(pipe, images)
    cond = _project(image_proj_model, image_features(pipe.image_encoder, pixels, is_plus(image_proj_model)))
    uncond = unconditional_image_tokens(pipe, image_proj_model).expand_as(cond)
    return cond, uncond


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------
def _as_image_list(image):
    """None, one image, a list of images, or a 4-D tensor of preprocessed CLIP pixels."""
    if image is None or isinstance(image, torch.Tensor):
        return image
    if isinstance(image, Sequence) and not isinstance(image, (str, bytes)):
        return list(image)
    if hasattr(image, "ndim") and getattr(image, "ndim") == 4:  # a batch of arrays
        return list(image)
    return [image]


def _broadcast(texts, n: int, what: str) -> list[str]:
    """One text per prompt: a string is repeated, a list must have one entry per prompt."""
    if texts is None:
        texts = ""
    if isinstance(texts, str):
        return [texts] * n
    texts = list(texts)
    if len(texts) != n:
        raise ValueError(f"got {len(texts)} {what}s for {n} image prompts; give one per image, or a single string")
    return texts


def prompt_batch(image, prompt, negative_prompt) -> tuple[list | torch.Tensor | None, list[str], list[str]]:
    """A call's arguments -> (images or None, prompts, negative prompts), one entry per prompt.

    The batch is the number of image prompts, or without an image the number of text prompts
    (a single string counts as one). A string prompt is repeated for every image; a list must
    have one entry per image. Both sampling paths (ours and diffusers') start here.
    """
    images = _as_image_list(image)
    if images is not None:
        batch = len(images)
    else:
        batch = 1 if isinstance(prompt, str) or prompt is None else len(prompt)
    return images, _broadcast(prompt, batch, "prompt"), _broadcast(negative_prompt, batch, "negative prompt")


def sample_generators(seed: int, n: int) -> list[torch.Generator]:
    """One CPU generator per sample: sample k starts from the noise of seed `seed + k`.

    On the CPU whatever the pipeline's device, so a seed means the same noise everywhere; one
    per sample, so sample k is the same image however the samples are split into calls (the
    evaluation batches them, `ipa_lab.diffusers_path` makes one call per image prompt).
    """
    return [torch.Generator("cpu").manual_seed(seed + k) for k in range(n)]


@torch.no_grad()
def generate(pipe, image_proj_model: nn.Module, image=None, prompt="", negative_prompt="", scale: float = 1.0,
             num_samples: int = 4, seed: int = 0, num_inference_steps: int = 25,
             guidance_scale: float = DEFAULT_GUIDANCE_SCALE, output_type: str = "pil"):
    """Sample `num_samples` images for each image prompt (and/or text), the original's way.

    image: one image, a list (one batch of prompts), or None for no image prompt. With None, the
        unconditional image tokens fill both the conditional and the unconditional branch: the
        processors still get their `num_tokens` tokens, and the model sees "no image" exactly as
        it did in training when the image was dropped (the adapter stays on at `scale`). Use
        scale=0 instead to get the plain backbone back.
    prompt / negative_prompt: a string for all prompts, or a list with one per image.
    seed: sample k (prompt-major order) starts from the noise of `seed + k` (`sample_generators`).
    Returns `pipe(...).images` (`output_type` "pil", "np" or "pt"), prompt-major order.
    """
    images, prompts, negatives = prompt_batch(image, prompt, negative_prompt)
    batch = len(prompts)
    set_scale(pipe.unet, scale)
    cfg = guidance_scale > 1.0

    # Text: (batch * num_samples, L, dim), each prompt repeated num_samples times in a row.
    text, negative_text = pipe.encode_prompt(prompts, pipe._execution_device, num_samples, cfg, negatives)
    # Image: (batch, T, dim), repeated the same way, then appended after the text tokens.
    if images is None:
        uncond = unconditional_image_tokens(pipe, image_proj_model).expand(batch, -1, -1)
        cond = uncond
    else:
        cond, uncond = encode_image_prompt(pipe, image_proj_model, images)
    cond = cond.repeat_interleave(num_samples, dim=0).to(text.dtype)
    uncond = uncond.repeat_interleave(num_samples, dim=0).to(text.dtype)
    prompt_embeds = torch.cat([text, cond], dim=1)
    negative_embeds = torch.cat([negative_text, uncond], dim=1) if cfg else None
    return pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds,
                guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                generator=sample_generators(seed, len(prompt_embeds)), output_type=output_type).images


@torch.no_grad()
def sampling_loop(unet, scheduler, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor,
                  latents: torch.Tensor, num_inference_steps: int, guidance_scale: float) -> torch.Tensor:
    """The denoising loop of `StableDiffusionPipeline.__call__`, with only what IP-Adapter needs
    (notebook 5's exercise; the pipeline computes exactly this, bit for bit).

    `latents` is the starting noise; `prompt_embeds` / `negative_prompt_embeds` already end with
    the image tokens and the "no image" tokens. Both branches of classifier-free guidance run in
    one UNet call on a doubled batch, unconditional half first, as the pipeline does.
    Returns the final latents (decode them with the VAE)."""
    scheduler.set_timesteps(num_inference_steps, device=latents.device)
    latents = latents * scheduler.init_noise_sigma
    embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        noise_uncond, noise_cond = unet(model_input, t, encoder_hidden_states=embeds).sample.chunk(2)
        noise_pred = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
        latents = scheduler.step(noise_pred, t, latents).prev_sample
    return latents
