"""Notebook 00, the overview: the shapes a Stable Diffusion pipeline passes around.

How big the latents of a VAE are, and how long the sequence is that the cross-attention reads once
image tokens are appended to the text tokens.
"""
from __future__ import annotations

from .core import CheckFailed, as_whole_number, checker, expect


def _frozen(config: dict):
    """A config that reads both ways, `cfg["key"]` and `cfg.key`, like diffusers' `model.config`."""
    from diffusers.configuration_utils import FrozenDict

    return FrozenDict(config)


def _as_int_tuple(value, what: str) -> tuple:
    """`value` as a tuple of ints: a tuple, list, torch.Size... of whole numbers, else the check fails.

    A string is refused even where int() would take it: "488" or ("4", "8", "8") is not a shape.
    """
    try:
        items = None if isinstance(value, (str, bytes)) else tuple(value)
    except TypeError:  # not a sequence at all: None, a single int...
        items = None
    ints = None if items is None else [as_whole_number(x) for x in items]
    if ints is None or None in ints:
        raise CheckFailed(f"{what} should be a tuple of ints, got {type(value).__name__} {value!r}")
    return tuple(ints)


@checker
def latent_shape(fn) -> str:
    """fn(height, width, vae_config) -> (channels, latent_height, latent_width)."""
    sd_vae = {"block_out_channels": [128, 256, 512, 512], "latent_channels": 4}
    cases = [
        ("the toy VAE, 32x32 px", {"block_out_channels": [32, 64, 64], "latent_channels": 4}, 32, 32, (4, 8, 8)),
        ("SD 1.5's VAE, 512x512 px", sd_vae, 512, 512, (4, 64, 64)),
        ("SD 1.5's VAE, 512 high x 768 wide", sd_vae, 512, 768, (4, 64, 96)),
        ("a VAE with 16 latent channels, 1024x1024 px",
         {"block_out_channels": [128, 256, 512, 512], "latent_channels": 16}, 1024, 1024, (16, 128, 128)),
    ]
    for what, config, height, width, want in cases:
        got = _as_int_tuple(fn(height, width, _frozen(config)), f"latent_shape for {what}")
        expect(len(got) == 3, f"for {what} you returned {len(got)} numbers {got}; expected 3: (channels, height, width)")
        expect(got[0] == want[0], f"for {what} you gave {got[0]} channels, expected {want[0]}: the number of "
               "channels is the config's latent_channels")
        factor = 2 ** (len(config["block_out_channels"]) - 1)
        expect(not (height != width and got[1:] == want[:0:-1]),
               f"for {what} you swapped height and width: {got}, expected {want}")
        expect(got[1:] == want[1:], f"for {what} you returned {got}, expected {want}: each encoder block but the "
               f"last halves the image, so the factor is 2 ** (len(block_out_channels) - 1) = {factor}")
    return "the VAE keeps latent_channels channels and shrinks each side by 2 ** (len(block_out_channels) - 1)."


@checker
def encoder_hidden_states_shape(fn) -> str:
    """fn(batch, text_tokens, image_tokens, cross_attention_dim) -> shape of [text tokens; image tokens]."""
    cases = [
        ("the toy (16 text tokens, 4 image tokens, width 64)", (1, 16, 4, 64), (1, 20, 64)),
        ("SD 1.5 + IP-Adapter (77 text tokens, 4 image tokens, width 768)", (2, 77, 4, 768), (2, 81, 768)),
        ("SD 1.5 + IP-Adapter Plus (77 text tokens, 16 image tokens)", (3, 77, 16, 768), (3, 93, 768)),
        ("SDXL + IP-Adapter (77 text tokens, 4 image tokens, width 2048)", (1, 77, 4, 2048), (1, 81, 2048)),
    ]
    for what, args, want in cases:
        got = _as_int_tuple(fn(*args), f"the shape for {what}")
        batch, text, image, dim = args
        expect(len(got) == 3, f"for {what} you returned {got}; expected 3 numbers: (batch, tokens, features)")
        expect(got != (batch, text, dim), f"for {what} you returned {got}: that is the text alone; the "
               f"{image} image tokens are appended after the text tokens")
        expect(got[2] == dim, f"for {what} the features are {got[2]}, expected {dim}: every token, text or "
               "image, is cross_attention_dim wide; the image tokens are concatenated along the sequence "
               "(dim 1), not along the features")
        expect(got == want, f"for {what} you returned {got}, expected {want}")
    return "the cross-attention reads text tokens + image tokens, all cross_attention_dim wide (77 + 4 = 81 for SD 1.5)."
