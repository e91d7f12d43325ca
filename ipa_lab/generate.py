"""Inference with an image prompt: load a trained adapter into a pipeline and sample (notebook 5).

The whole trick of IP-Adapter at inference time fits in one line: the image prompt becomes a
few extra tokens appended after the text tokens,

    encoder_hidden_states = [text tokens (L) ; image tokens (4 for the base model, 16 for Plus)]

and every cross-attention layer's `IPAttnProcessor` splits them again at `L`. The pipeline
itself is untouched: we hand it those longer sequences as `prompt_embeds` (and, for
classifier-free guidance, the unconditional ones as `negative_prompt_embeds`), exactly as the
original `IPAdapter.generate` does. For guidance the image prompt has an "unconditional" version
too: the projection of a zero embedding (base) or of the encoder's view of an all-zero image
(Plus), which is also what the model saw in training whenever the image was dropped.

Two ways to the same images, so the course can prove they agree:
* ours: `load_adapter` + `generate` (our processors, our projection, our token concatenation);
* diffusers': `generate_with_diffusers`, which loads the very same checkpoint dict with
  `pipe.load_ip_adapter(...)` and passes `ip_adapter_image_embeds` to the stock pipeline.

Order of the outputs, everywhere: all samples of the first prompt, then of the second, ...
(index `i * num_samples + j` is sample j of prompt i).
"""
from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .adapter import install_ip_adapter
from .attention import IPAttnProcessor
from .checkpoint import PARTS, CheckpointMismatchError, load_into, load_ip_adapter
from .projection import ImageProjModel, Resampler

# Classifier-free guidance weight for the toy model. The paper samples SD 1.5 at 7.5; the toy
# UNet (trained with 10% empty captions) is sampled at a milder weight. Pass your own to compare.
DEFAULT_GUIDANCE_SCALE = 5.0
# The head width every IP-Adapter Plus checkpoint uses; a checkpoint stores heads * dim_head
# (the rows of to_q) but not the split, so loaders (diffusers' included) assume 64.
DIM_HEAD = 64


# ---------------------------------------------------------------------------------------------
# Reading a checkpoint: the projection's sizes are written in its tensors' shapes
# ---------------------------------------------------------------------------------------------
def read_checkpoint(checkpoint) -> dict[str, dict[str, torch.Tensor]]:
    """A checkpoint in any form -> the nested dict {"image_proj": {...}, "ip_adapter": {...}}.

    Accepts a `.safetensors`/`.bin` path (read with `checkpoint.load_ip_adapter`), the nested
    dict itself, or a flat dict with `image_proj.` / `ip_adapter.` prefixed keys.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        return load_ip_adapter(checkpoint)
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"expected a checkpoint path or dict, got {type(checkpoint).__name__}")
    if all(part in checkpoint for part in PARTS):
        return {part: dict(checkpoint[part]) for part in PARTS}
    nested: dict[str, dict[str, torch.Tensor]] = {part: {} for part in PARTS}
    for key, value in checkpoint.items():
        part, _, rest = key.partition(".")
        if part not in nested or not rest:
            raise CheckpointMismatchError(
                f"not an IP-Adapter checkpoint: key {key!r} belongs to neither part; expected "
                "{'image_proj': {...}, 'ip_adapter': {...}} or flat keys 'image_proj.*' / 'ip_adapter.*'")
        nested[part][rest] = value
    missing = [part for part in PARTS if not nested[part]]
    if missing:
        raise CheckpointMismatchError(f"checkpoint has no {' and no '.join(map(repr, missing))} part")
    return nested


def _load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """load_state_dict(strict=True), but with every missing/unexpected/mis-shaped key in one message."""
    expected = module.state_dict()
    problems = [f"missing key {k}" for k in expected if k not in state]
    problems += [f"unexpected key {k}" for k in state if k not in expected]
    problems += [f"{k} has shape {tuple(state[k].shape)} in the checkpoint, {tuple(v.shape)} in the model"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if problems:
        raise CheckpointMismatchError(f"{what} does not fit the checkpoint:\n  " + "\n  ".join(problems))
    module.load_state_dict(dict(state), strict=True)


def image_proj_from_state_dict(state_dict: Mapping[str, torch.Tensor], dim_head: int = DIM_HEAD) -> nn.Module:
    """Build the image projection a checkpoint was trained with, sized from its tensors, and load it.

    Base IP-Adapter (`proj.weight` present) -> `ImageProjModel`:
        norm.weight (dim,)                      -> cross_attention_dim = dim
        proj.weight (tokens * dim, clip_dim)    -> clip_embeddings_dim, tokens = rows // dim
    IP-Adapter Plus (`latents` present) -> `Resampler`:
        latents (1, num_queries, dim), proj_in.weight (dim, embedding_dim),
        proj_out.weight (output_dim, dim), layers.{i}.* -> depth,
        layers.0.0.to_q.weight (heads * dim_head, dim) -> heads = rows // dim_head,
        layers.0.1.1.weight (dim * ff_mult, dim) -> ff_mult.
    The split of to_q's rows into heads x dim_head is not stored anywhere: like diffusers we take
    dim_head = 64. (diffusers also fixes depth = 4 and, for the base model, tokens = 4; we read
    both from the tensors.) Accepts the whole checkpoint too (uses its "image_proj" part).
    """
    if "image_proj" in state_dict and isinstance(state_dict["image_proj"], Mapping):
        state_dict = state_dict["image_proj"]
    sd = dict(state_dict)
    if "proj.weight" in sd:
        if "norm.weight" not in sd:
            raise CheckpointMismatchError("image_proj has proj.weight but no norm.weight: not an ImageProjModel")
        dim = sd["norm.weight"].shape[0]
        rows, clip_dim = sd["proj.weight"].shape
        if rows % dim:
            raise CheckpointMismatchError(
                f"image_proj.proj.weight has {rows} rows, not a multiple of the token width {dim} "
                "(norm.weight): it cannot be cut into tokens")
        model = ImageProjModel(cross_attention_dim=dim, clip_embeddings_dim=clip_dim,
                               clip_extra_context_tokens=rows // dim)
    elif "latents" in sd:
        for key in ("proj_in.weight", "proj_out.weight", "layers.0.0.to_q.weight", "layers.0.1.1.weight"):
            if key not in sd:
                raise CheckpointMismatchError(f"image_proj has latents but no {key}: not a Resampler")
        _, num_queries, dim = sd["latents"].shape
        depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k)))
        inner = sd["layers.0.0.to_q.weight"].shape[0]
        if inner % dim_head:
            raise CheckpointMismatchError(
                f"to_q has {inner} rows, not a multiple of dim_head={dim_head}: pass the dim_head "
                "the Resampler was built with")
        model = Resampler(dim=dim, depth=depth, dim_head=dim_head, heads=inner // dim_head,
                          num_queries=num_queries, embedding_dim=sd["proj_in.weight"].shape[1],
                          output_dim=sd["proj_out.weight"].shape[0],
                          ff_mult=sd["layers.0.1.1.weight"].shape[0] / dim)
    else:
        raise CheckpointMismatchError(
            "cannot tell the image projection from its keys: expected 'proj.weight' (ImageProjModel) "
            f"or 'latents' (Resampler), got {sorted(sd)[:6]}")
    first = next(iter(sd.values()))
    model.to(dtype=first.dtype)
    _load_strict(model, sd, type(model).__name__)
    return model.eval().requires_grad_(False)


def num_tokens_of(image_proj_model: nn.Module) -> int:
    """How many image tokens the projection produces (4 for the base model, 16 for Plus)."""
    if isinstance(image_proj_model, ImageProjModel):
        return image_proj_model.clip_extra_context_tokens
    if isinstance(image_proj_model, Resampler):
        return image_proj_model.latents.shape[1]
    raise TypeError(f"unknown image projection {type(image_proj_model).__name__}")


def is_plus(image_proj_model: nn.Module) -> bool:
    """Plus (Resampler) reads the encoder's patch features; the base model its pooled embedding."""
    return isinstance(image_proj_model, Resampler)


# ---------------------------------------------------------------------------------------------
# Putting the adapter into a pipeline, and taking it out again
# ---------------------------------------------------------------------------------------------
def _ip_processors(unet) -> list:
    return [p for p in unet.attn_processors.values()
            if isinstance(p, IPAttnProcessor) or "IPAdapter" in type(p).__name__]


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
    processors = _ip_processors(unet)
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
def _clip_pixels(pipe, images) -> torch.Tensor:
    """PIL images (or arrays) -> the image encoder's input, with the pipeline's own preprocessing.

    A 4-D tensor is taken as already preprocessed (like diffusers' `encode_image`).
    """
    if getattr(pipe, "image_encoder", None) is None or getattr(pipe, "feature_extractor", None) is None:
        raise ValueError("this pipeline has no image_encoder/feature_extractor: load it with "
                         "load_pipeline(..., image_encoder=<folder>)")
    encoder = pipe.image_encoder
    if not (isinstance(images, torch.Tensor) and images.ndim == 4):
        images = pipe.feature_extractor(images=list(images), return_tensors="pt").pixel_values
    return images.to(device=encoder.device, dtype=encoder.dtype)


def _image_features(encoder, pixels: torch.Tensor, plus: bool) -> torch.Tensor:
    """What the projection reads: the pooled, projected embedding (base) or the penultimate
    layer's patch features (Plus: richer, spatial detail; the last layer is shaped for the
    contrastive loss)."""
    if plus:
        return encoder(pixels, output_hidden_states=True).hidden_states[-2]
    return encoder(pixels).image_embeds


@torch.no_grad()
def unconditional_image_tokens(pipe, image_proj_model: nn.Module) -> torch.Tensor:
    """The "no image" tokens, (1, num_tokens, dim): the projection of a zero embedding (base), or of
    the encoder's features of an all-zero input image (Plus), as in the original and in diffusers.
    These are also what the model saw in training whenever the image prompt was dropped."""
    dtype = next(image_proj_model.parameters()).dtype
    if is_plus(image_proj_model):
        encoder = pipe.image_encoder
        size = encoder.config.image_size
        zeros = torch.zeros(1, 3, size, size, device=encoder.device, dtype=encoder.dtype)
        features = _image_features(encoder, zeros, plus=True)
    else:
        features = torch.zeros(1, image_proj_model.clip_embeddings_dim)
    device = next(image_proj_model.parameters()).device
    return image_proj_model(features.to(device=device, dtype=dtype))


@torch.no_grad()
def encode_image_prompt(pipe, image_proj_model: nn.Module, images) -> tuple[torch.Tensor, torch.Tensor]:
    """Images -> (cond_tokens, uncond_tokens), each (batch, num_tokens, cross_attention_dim).

    CLIP preprocessing (`pipe.feature_extractor`), the frozen image encoder (`image_embeds` for
    the base model, `hidden_states[-2]` for Plus), then the trained projection. The unconditional
    tokens are the same for every image (see `unconditional_image_tokens`).
    """
    pixels = _clip_pixels(pipe, images)
    features = _image_features(pipe.image_encoder, pixels, is_plus(image_proj_model))
    param = next(image_proj_model.parameters())
    cond = image_proj_model(features.to(device=param.device, dtype=param.dtype))
    uncond = unconditional_image_tokens(pipe, image_proj_model).expand_as(cond)
    return cond, uncond


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


def _batch_size(images, prompt) -> int:
    if images is not None:
        return len(images)
    return 1 if isinstance(prompt, str) or prompt is None else len(prompt)


def sample_generators(seed: int, n: int) -> list[torch.Generator]:
    """One CPU generator per sample: sample k starts from the noise of seed `seed + k`.

    On the CPU whatever the pipeline's device, so a seed means the same noise everywhere; one
    per sample, so sample k is the same image however the samples are split into calls (the
    evaluation batches them, diffusers' path below makes one call per image prompt).
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
    images = _as_image_list(image)
    batch = _batch_size(images, prompt)
    prompts = _broadcast(prompt, batch, "prompt")
    negatives = _broadcast(negative_prompt, batch, "negative prompt")
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


# ---------------------------------------------------------------------------------------------
# The same images through diffusers' own loader
# ---------------------------------------------------------------------------------------------
def _is_plus_checkpoint(state) -> bool:
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
    """
    state = read_checkpoint(checkpoint)
    saved_processors = pipe.unet.attn_processors
    saved_encoder = getattr(pipe, "image_encoder", None)
    saved_features = getattr(pipe, "feature_extractor", None)
    pipe.load_ip_adapter(state, subfolder="", weight_name="", image_encoder_folder=None)
    try:
        yield state
    finally:
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


def _concat(outputs: list, output_type: str):
    if output_type == "pil":
        return [im for out in outputs for im in out]
    if output_type == "np":
        import numpy as np

        return np.concatenate(outputs)
    return torch.cat(outputs)


@torch.no_grad()
def _diffusers_call(pipe, plus: bool, image, prompt, negative_prompt, scale, num_samples, seed,
                    num_inference_steps, guidance_scale, output_type):
    """Sample through the stock pipeline with a diffusers-loaded adapter (see generate_with_diffusers).

    Without an image prompt all prompts share the same (uncond) image features: one call.
    With image prompts, one call per image: the pipeline gives one image prompt to its whole batch.
    """
    images = _as_image_list(image)
    batch = _batch_size(images, prompt)
    prompts = _broadcast(prompt, batch, "prompt")
    negatives = _broadcast(negative_prompt, batch, "negative prompt")
    cfg = guidance_scale > 1.0
    pipe.set_ip_adapter_scale(scale)

    def call(image_i, prompts_i, negatives_i, first):
        return pipe(prompt=prompts_i, negative_prompt=negatives_i if cfg else None, num_images_per_prompt=num_samples,
                    ip_adapter_image_embeds=diffusers_image_embeds(pipe, plus, image_i, cfg),
                    guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                    generator=sample_generators(seed + first, len(prompts_i) * num_samples),
                    output_type=output_type).images

    if images is None:
        return call(None, prompts, negatives, 0)
    outputs = [call(images[i : i + 1], prompts[i : i + 1], negatives[i : i + 1], i * num_samples)
               for i in range(batch)]
    return _concat(outputs, output_type)


def generate_with_diffusers(pipe, checkpoint, image=None, prompt="", negative_prompt="", scale: float = 1.0,
                            num_samples: int = 4, seed: int = 0, num_inference_steps: int = 25,
                            guidance_scale: float = DEFAULT_GUIDANCE_SCALE, output_type: str = "pil"):
    """The same as `generate`, through diffusers' own IP-Adapter code instead of ours.

    `checkpoint`: the path or dict that `load_adapter` takes. The adapter is loaded with
    `pipe.load_ip_adapter`, the images go in as `ip_adapter_image_embeds` (see
    `diffusers_image_embeds`; one pipeline call per image prompt, since the stock pipeline
    shares one image prompt across its batch), `pipe.set_ip_adapter_scale(scale)` sets lambda,
    and the adapter is unloaded afterwards, so the pipeline (and any adapter of ours in it) is
    as before.
    Same arguments, same seed -> the same images as `generate`, up to float rounding.
    """
    with diffusers_ip_adapter(pipe, checkpoint) as state:
        return _diffusers_call(pipe, _is_plus_checkpoint(state), image, prompt, negative_prompt, scale,
                               num_samples, seed, num_inference_steps, guidance_scale, output_type)
