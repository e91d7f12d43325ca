"""The frozen encoders' outputs that IP-Adapter reads: text states, image features, "no image".

One home for what training (`ipa_lab.train`, `ipa_lab.cache`) and sampling (`ipa_lab.generate`)
both need, so that the adapter is fed at inference exactly what it saw in training:

* `encode_text`: the text encoder's last hidden states, (B, 77, D): the text tokens;
* `image_features`: what the image projection reads. Base IP-Adapter: the pooled, projected
  CLIP embedding `image_embeds` (B, projection_dim). Plus: the penultimate layer's patch
  features `hidden_states[-2]` (B, patches + 1, hidden_size), richer in spatial detail (the
  last layer is shaped for CLIP's contrastive loss);
* `unconditional_image_features`: what "no image" is, in training (a dropped image) and at
  inference (the unconditional branch of guidance): zeros for the base model, and for Plus the
  encoder's features of an all-zero input image, as in the original and in diffusers.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def encode_text(tokenizer, text_encoder, captions: list[str]) -> torch.Tensor:
    """Captions -> the text encoder's last hidden states, (B, model_max_length, D).

    Padded to the tokenizer's full length, as Stable Diffusion was trained."""
    ids = tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


@torch.no_grad()
def image_features(image_encoder, pixels: torch.Tensor, plus: bool) -> torch.Tensor:
    """Preprocessed CLIP pixels (B, 3, S, S) -> what the projection reads (see the module doc)."""
    pixels = pixels.to(device=image_encoder.device, dtype=image_encoder.dtype)
    if plus:
        return image_encoder(pixels, output_hidden_states=True).hidden_states[-2]
    return image_encoder(pixels).image_embeds


@torch.no_grad()
def unconditional_image_features(image_encoder, plus: bool) -> torch.Tensor:
    """The features of "no image", (1, ...): zeros (base), or the encoder on a zero image (Plus).

    The zero image has the encoder's own input size (`config.image_size`), which is also the
    size its feature extractor crops to."""
    if not plus:
        config = image_encoder.config
        return torch.zeros(1, config.projection_dim, device=image_encoder.device, dtype=image_encoder.dtype)
    size = image_encoder.config.image_size
    zeros = torch.zeros(1, 3, size, size, device=image_encoder.device, dtype=image_encoder.dtype)
    return image_features(image_encoder, zeros, plus=True)
