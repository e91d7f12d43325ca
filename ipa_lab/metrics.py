"""Measure what a picture shows: a pixel classifier for the shapes data, and CLIP scores.

The classifier reads colour, shape, position and size from pixels alone (no learned model), so
"the adapter carried the colour of the prompt" becomes a number anyone can check by hand:
- foreground = pixels far from the plain background (`foreground`);
- colour   = nearest palette colour to the median of the clearly coloured pixels;
- position = quadrant of the foreground's centre of mass;
- size     = foreground area against the midpoint of the small and large areas;
- shape    = how much of its bounding box the shape fills (square ~1, circle ~0.79, triangle ~0.5).
`agreement` turns classified attributes into fractions of agreement with the expected ones.

With a scoring CLIP (the paper uses CLIP ViT-L/14; the course the toy CLIP in data/toy-clip):
- CLIP-I (`clip_score` of image embeddings): cosine of a sample with its prompt image;
- CLIP-T (`clip_score` of image vs text embeddings): cosine of a sample with its caption.

What to generate and how to put the numbers together (the miniature Table 1) is the
evaluation protocol, in `ipa_lab.evaluate`.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .data import BACKGROUND, COLOURS, SIZES

_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)
_NAMES = list(COLOURS)
_FOREGROUND = 60.0  # RGB distance from the background above which a pixel belongs to the shape
_FILL = {"circle": np.pi / 4, "square": 0.85**2, "triangle": 0.5}  # area / extent**2, as drawn


def _as_array(image) -> np.ndarray:
    """PIL image, (3,H,W) tensor in [-1,1], or (H,W,3) uint8 array -> (H,W,3) float32 in [0,255]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    if isinstance(image, torch.Tensor):
        x = image.detach().float().cpu()
        if x.ndim != 3 or x.shape[0] != 3:
            raise ValueError(f"expected a (3, H, W) tensor in [-1, 1], got shape {tuple(x.shape)}")
        return ((x.clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).numpy()
    a = np.asarray(image, dtype=np.float32)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {a.shape}")
    return a


def _background_distance(a: np.ndarray) -> np.ndarray:
    """(H,W,3) float pixels -> (H,W): each pixel's RGB distance from the plain background."""
    return np.linalg.norm(a - np.array(BACKGROUND, dtype=np.float32), axis=2)


def foreground(image) -> np.ndarray:
    """The shape's pixels: an (H, W) bool mask, True where a pixel is far (> 60 in RGB units)
    from the plain background. The mask `classify` reads position, size and shape from."""
    return _background_distance(_as_array(image)) > _FOREGROUND


def classify(image) -> dict:
    """Name the colour, shape, position and size of the one shape in `image`.

    Returns a dict with those four keys; each value is None when no shape is visible.
    """
    a = _as_array(image)
    h, w, _ = a.shape
    dist = _background_distance(a)
    mask = dist > _FOREGROUND
    if mask.sum() < 4:
        return {"colour": None, "shape": None, "position": None, "size": None}
    core = dist > 0.6 * dist.max()
    rgb = np.median(a[core], axis=0)
    colour = _NAMES[int(np.argmin(np.linalg.norm(_PALETTE - rgb, axis=1)))]
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean() / h, xs.mean() / w
    position = f"{'top' if cy < 0.5 else 'bottom'} {'left' if cx < 0.5 else 'right'}"
    fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    shape = "square" if fill > 0.88 else "circle" if fill > 0.64 else "triangle"
    # The drawn shape's area (fraction of the image) at each size, for the shape just found.
    area = {k: _FILL[shape] * v**2 for k, v in SIZES.items()}
    size = "small" if mask.sum() / (h * w) < (area["small"] + area["large"]) / 2 else "large"
    return {"colour": colour, "shape": shape, "position": position, "size": size}


def agreement(predicted: list[dict], expected: list[dict], attributes=("colour", "shape", "position", "size")) -> dict:
    """Fraction of images whose classified attribute equals the expected one, per attribute."""
    if len(predicted) != len(expected):
        raise ValueError(f"{len(predicted)} predictions for {len(expected)} expectations")
    return {a: float(np.mean([p[a] == e[a] for p, e in zip(predicted, expected)])) for a in attributes}


# ---------------------------------------------------------------------------------------------
# Scoring with the toy CLIP (CLIP-I, CLIP-T)
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def clip_image_embeds(clip, processor, images, batch_size: int = 256) -> torch.Tensor:
    """Unit-length projected image embeddings of the scoring CLIP, (N, projection_dim)."""
    device = next(clip.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        pixels = processor(images=list(images[i : i + batch_size]), return_tensors="pt").pixel_values
        out.append(clip.get_image_features(pixel_values=pixels.to(device)).pooler_output.float().cpu())
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)


@torch.no_grad()
def clip_text_embeds(clip, tokenizer, texts, batch_size: int = 256) -> torch.Tensor:
    """Unit-length projected text embeddings of the scoring CLIP, (N, projection_dim).

    Padded to the tokenizer's full length, as the toy CLIP was trained.
    """
    device = next(clip.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        ids = tokenizer(list(texts[i : i + batch_size]), padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        out.append(clip.get_text_features(input_ids=ids.to(device)).pooler_output.float().cpu())
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)


def clip_score(embeds: torch.Tensor, references: torch.Tensor) -> float:
    """Mean cosine similarity of paired unit-length embeddings, row i with row i.

    CLIP-I: samples' image embeddings vs their prompt images'; CLIP-T: vs their captions'.
    """
    if embeds.shape != references.shape:
        raise ValueError(f"{tuple(embeds.shape)} embeddings for {tuple(references.shape)} references: "
                         "expected one reference per embedding, as wide")
    return float((embeds * references).sum(-1).mean())
