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
from .attention import AttnProcessor
from .checkpoint import CheckpointMismatchError, image_proj_from_state_dict, load_into, read_checkpoint
from .encoders import image_features, unconditional_image_features
from .faceid import MLPProjModel as FaceIDProjModel
from .projection import ImageProjModel, Resampler, is_plus, num_tokens_of

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


def keep_image_branch(unet, layers) -> nn.ModuleList:
    """Keep the image branch only in the attention layers named in `layers` (module paths such as
    'up_blocks.1.attentions.0', or whole blocks such as 'mid_block'); every other IP-Adapter
    processor becomes a plain `AttnProcessor`. Returns the new `adapter_modules`, in
    `unet.attn_processors` order as always, so the kept layers keep their checkpoint keys
    (`9.to_k_ip.weight` stays 9): a file saved from it is the original format, holding only the kept layers.
    """
    layers = list(layers)
    processors = ip_processors(unet)
    kept = {n for n in processors if any(n == w or n.startswith(w + ".") for w in layers)}
    unused = [w for w in layers if not any(n == w or n.startswith(w + ".") for n in processors)]
    if unused or not kept:
        raise ValueError(f"no IP-Adapter processor under {unused or layers}; this UNet's are under "
                         f"{sorted({_layer_of(n) for n in processors})}")
    unet.set_attn_processor({n: (p if n in kept or n not in processors else AttnProcessor())
                             for n, p in unet.attn_processors.items()})
    return nn.ModuleList(unet.attn_processors.values())


def lora_rank_of(state) -> int | None:
    """The rank of a FaceID checkpoint's LoRA (the rows of any `{i}.to_q_lora.down.weight`), None without one."""
    for key, tensor in state["ip_adapter"].items():
        if key.endswith(".to_q_lora.down.weight"):
            return int(tensor.shape[0])
    return None


def load_adapter(pipe, checkpoint, scale: float = 1.0, partial: bool = False) -> nn.Module:
    """Put a trained IP-Adapter into `pipe.unet` with our processors; return the image projection.

    `checkpoint`: a `.safetensors`/`.bin` path or the dict `{"image_proj": ..., "ip_adapter": ...}`.
    Steps: build the projection from the checkpoint's shapes; replace every attention processor
    (`install_ip_adapter`, with the projection's number of tokens); load `to_k_ip`/`to_v_ip` and
    the projection strictly (one error lists every missing, unexpected or mis-shaped key); a FaceID
    checkpoint (LoRA keys) gets the LoRA processors everywhere (notebook 8); move
    the projection to the pipeline's device and dtype. An adapter already in the UNet is
    replaced. On any error the UNet is left with plain attention, never half-loaded.
    `partial=True` loads an adapter trained in some layers only (notebook 9, `keep_image_branch`):
    the image branch goes only where the checkpoint has `to_k_ip` weights, and those load strictly.
    """
    state = read_checkpoint(checkpoint)
    image_proj_model = image_proj_from_state_dict(state["image_proj"])
    unet = pipe.unet
    width = unet.config.cross_attention_dim
    norm = getattr(image_proj_model, "norm", None)
    out = norm.normalized_shape[0] if norm is not None else image_proj_model.proj_out.out_features
    if out != width:
        raise CheckpointMismatchError(
            f"the checkpoint's projection makes {out}-wide tokens, but this UNet's cross_attention_dim "
            f"is {width}: the adapter was trained for another base model")
    encoder = getattr(pipe, "image_encoder", None)
    if encoder is not None and isinstance(image_proj_model, (ImageProjModel, Resampler)):  # FaceID reads no CLIP
        plus = is_plus(image_proj_model)
        have = encoder.config.hidden_size if plus else encoder.config.projection_dim
        need = image_proj_model.embedding_dim if plus else image_proj_model.clip_embeddings_dim
        if have != need:
            raise CheckpointMismatchError(
                f"the checkpoint's projection reads {need}-wide image features, but the pipeline's image "
                f"encoder gives {have} ({'hidden_size' if plus else 'projection_dim'}): wrong image encoder")
    remove_adapter(pipe)
    try:
        adapter_modules = install_ip_adapter(unet, num_tokens=num_tokens_of(image_proj_model), scale=scale,
                                             lora_rank=lora_rank_of(state))
        if partial:
            names = list(unet.attn_processors)
            have = {int(k.split(".")[0]) for k in state["ip_adapter"] if k.split(".")[0].isdigit()}
            adapter_modules = keep_image_branch(unet, [_layer_of(names[i]) for i in sorted(have) if i < len(names)])
        load_into(state, image_proj_model, adapter_modules)
    except BaseException:
        remove_adapter(pipe)
        raise
    return image_proj_model.to(device=unet.device, dtype=unet.dtype)


# ---------------------------------------------------------------------------------------------
# The image branch's weight: one number, or one per block (InstantStyle), or one per adapter
# ---------------------------------------------------------------------------------------------
def attention_blocks(unet) -> dict[str, int]:
    """The UNet's blocks that hold attention, in diffusers' short names, with how many each holds.

    diffusers' scale dicts name blocks "down"/"up" + "block_<i>" and "mid": for the toy UNet
    {'down.block_0': 1, 'down.block_1': 1, 'mid': 1, 'up.block_1': 2, 'up.block_2': 2}; for SD 1.5
    down 0-2 (2 each), mid (1), up 1-3 (3 each). Blocks without attention (the toy's
    down_blocks.2 and up_blocks.0) cannot be named: they have no image branch.
    """
    found = {}
    for side in ("down", "up"):
        for i, block in enumerate(getattr(unet, f"{side}_blocks")):
            if getattr(block, "attentions", None) is not None:
                found[f"{side}.block_{i}"] = len(block.attentions)
    if getattr(getattr(unet, "mid_block", None), "attentions", None) is not None:
        found["mid"] = len(unet.mid_block.attentions)
    return found


def attention_layer(short: str, k: int) -> str:
    """diffusers' short name and attention index -> the layer's module path:
    ('up.block_1', 0) -> 'up_blocks.1.attentions.0', ('mid', 0) -> 'mid_block.attentions.0'."""
    if short == "mid":
        return f"mid_block.attentions.{k}"
    side, block = short.split(".")
    return f"{side}_blocks.{block[len('block_'):]}.attentions.{k}"


def _number(value, where: str):
    """A scale is a number (or, for masked image prompts through diffusers, a list of numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"the scale for {where} must be a number, got {value!r}")
    return float(value)


def block_scales(unet, scale) -> dict[str, float]:
    """One adapter's scale spec, in the format of diffusers' `set_ip_adapter_scale`, -> one scale
    per attention layer of the UNet: {'down_blocks.0.attentions.0': 0.0, ..., 'mid_block.attentions.0': 1.0}.

    - a number: every layer gets it;
    - a dict with keys among "down", "mid", "up": "down"/"up" take a number (all their blocks) or
      a dict {"block_<i>": number or list}, a list holding one number per attention of the block
      (a one-element list counts for all of them); "mid" takes a number or a one-element list.
      **Everything not listed gets 0.0**: the InstantStyle way, inject the image only where named.
    This is what diffusers' `_maybe_expand_lora_scales(..., default_scale=0.0)` computes, with one
    difference: a block name this UNet has no attention in ("block_7", or the toy's "down.block_2")
    is an error here, where diffusers ignores it silently. Every error is raised before any
    processor is touched.
    """
    blocks = attention_blocks(unet)
    layers = {attention_layer(short, k): 0.0 for short, n in blocks.items() for k in range(n)}
    if not isinstance(scale, dict):
        value = _number(scale, "every layer")
        return {name: value for name in layers}
    unknown = set(scale) - {"down", "mid", "up"}
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)} in the scale dict: use 'down', 'mid' and 'up'")
    for side, value in scale.items():
        if side == "mid":
            if isinstance(value, list):
                if len(value) != 1:
                    raise ValueError(f"'mid' has one attention: expected 1 scale, got {len(value)}")
                value = value[0]
            if "mid" not in blocks:
                raise ValueError("this UNet's mid block has no attention: 'mid' cannot be set")
            layers["mid_block.attentions.0"] = _number(value, "mid")
            continue
        own = {short.split(".")[1]: n for short, n in blocks.items() if short.startswith(side + ".")}
        per_block = value if isinstance(value, dict) else {name: value for name in own}
        for name, block_value in per_block.items():
            if name not in own:
                raise ValueError(f"'{side}' has no block {name!r} with attention; this UNet's {side} blocks with "
                                 f"attention are {sorted(own)}")
            n = own[name]
            values = block_value if isinstance(block_value, list) else [block_value]
            if len(values) == 1:
                values = values * n
            if len(values) != n:
                raise ValueError(f"{side}.{name} has {n} attention layer(s): expected {n} scales "
                                 f"(or one for all), got {len(values)}")
            for k, v in enumerate(values):
                layers[attention_layer(f"{side}.{name}", k)] = _number(v, f"{side}.{name}[{k}]")
    return layers


def _layer_of(processor_name: str) -> str:
    """'up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor' -> 'up_blocks.1.attentions.0'."""
    parts = processor_name.split(".")
    return ".".join(parts[:3] if parts[0] == "mid_block" else parts[:4])


def set_scale(unet, scale) -> int:
    """Set the image branch's weight (lambda) in every IP-Adapter processor; return how many.

    `scale` is what diffusers' `pipe.set_ip_adapter_scale` takes: a number for every layer; a dict
    by block (`block_scales`: {"down": {"block_1": 1.0}, "up": {"block_1": [0.0, 1.0]}}, everything
    unlisted at 0); or a list of those, one per loaded adapter (several adapters: only diffusers'
    processors hold more than one). scale 0 gives the original model back exactly; 1 is what the
    adapter was trained with. Works on our IPAttnProcessor (a float) and on diffusers' processors
    (a list, one per adapter). Every spec is checked before any processor changes.
    """
    processors = ip_processors(unet)
    if not processors:
        raise RuntimeError("this UNet has no IP-Adapter processors: call load_adapter(pipe, checkpoint) first")
    specs = scale if isinstance(scale, list) else [scale]
    if not specs:
        raise ValueError("an empty list of scales: give one per loaded adapter")
    # A list of plain numbers inside a list is diffusers' per-image scale for masked prompts.
    per_adapter = [s if isinstance(s, list) else block_scales(unet, s) for s in specs]
    adapters = {len(p.scale) if isinstance(p.scale, list) else 1 for p in processors.values()}
    count = adapters.pop()
    if len(per_adapter) not in (1, count):
        raise ValueError(f"{len(per_adapter)} scale specs for {count} loaded adapter(s): give one, or one per adapter")
    per_adapter = per_adapter * count if len(per_adapter) == 1 else per_adapter
    for name, p in processors.items():
        values = [[_number(v, f"masked image {j}") for j, v in enumerate(spec)] if isinstance(spec, list)
                  else spec[_layer_of(name)] for spec in per_adapter]
        if isinstance(p.scale, list):
            p.scale = values
        elif isinstance(values[0], list):
            raise TypeError("a list of per-image scales needs diffusers' processors (masked image prompts)")
        else:
            p.scale = values[0]
    return len(processors)


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
    if isinstance(image_proj_model, FaceIDProjModel):  # FaceID's "no image": a zero identity embedding
        return _project(image_proj_model, torch.zeros(1, image_proj_model.id_embeddings_dim))
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
    if isinstance(image_proj_model, FaceIDProjModel):
        raise ValueError("a FaceID adapter reads identity embeddings, not images: pass "
                         "image_embeds=ipa_lab.recognition.identity_embeds(recognizer, images) (for the real "
                         "FaceID, InsightFace's normed_embedding) instead of image")
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
def generate(pipe, image_proj_model: nn.Module, image=None, prompt="", negative_prompt="", scale=1.0,
             num_samples: int = 4, seed: int = 0, num_inference_steps: int = 25,
             guidance_scale: float = DEFAULT_GUIDANCE_SCALE, output_type: str = "pil", image_embeds=None):
    """Sample `num_samples` images for each image prompt (and/or text), the original's way.

    image: one image, a list (one batch of prompts), or None for no image prompt. With None, the
        unconditional image tokens fill both the conditional and the unconditional branch: the
        processors still get their `num_tokens` tokens, and the model sees "no image" exactly as
        it did in training when the image was dropped (the adapter stays on at `scale`). Use
        scale=0 instead to get the plain backbone back.
    prompt / negative_prompt: a string for all prompts, or a list with one per image.
    scale: a number, or a dict by block in diffusers' format (`set_scale`, `block_scales`).
    seed: sample k (prompt-major order) starts from the noise of `seed + k` (`sample_generators`).
    image_embeds: instead of `image`, the features the projection reads, (batch, D): FaceID's
        identity embeddings (notebook 8). "No image" is then a zero embedding, as in the original.
    Returns `pipe(...).images` (`output_type` "pil", "np" or "pt"), prompt-major order.
    """
    if image_embeds is not None:
        if image is not None or is_plus(image_proj_model):
            raise ValueError("pass either `image` or `image_embeds` (pooled embeddings, (batch, D)), not both; "
                             "Plus reads patch features of an image: pass `image`")
        image = list(image_embeds)  # one prompt per row, for the batch size
    images, prompts, negatives = prompt_batch(image, prompt, negative_prompt)
    batch = len(prompts)
    set_scale(pipe.unet, scale)
    cfg = guidance_scale > 1.0

    # Text: (batch * num_samples, L, dim), each prompt repeated num_samples times in a row.
    text, negative_text = pipe.encode_prompt(prompts, pipe._execution_device, num_samples, cfg, negatives)
    # Image: (batch, T, dim), repeated the same way, then appended after the text tokens.
    if image_embeds is not None:
        cond = _project(image_proj_model, image_embeds)
        uncond = _project(image_proj_model, torch.zeros_like(image_embeds))
    elif images is None:
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
