"""Notebook 02, decoupled cross-attention: a second key/value branch for the image.

Which width each attention layer of the UNet has, and the two-softmax attention IP-Adapter adds.
"""
from __future__ import annotations

import torch

from .core import CheckFailed, checker, expect, expect_close, expect_shape


@checker
def hidden_size_of(fn) -> str:
    """fn(processor_name, block_out_channels) -> the width of that attention layer."""
    tail = ".transformer_blocks.0.attn2.processor"
    sd15, toy, sdxl = [320, 640, 1280, 1280], [64, 128, 128], [320, 640, 1280]
    cases = [
        (f"down_blocks.0.attentions.0{tail}", sd15, 320),
        (f"down_blocks.2.attentions.1.transformer_blocks.0.attn1.processor", sd15, 1280),
        (f"up_blocks.1.attentions.2{tail}", sd15, 1280),
        (f"up_blocks.2.attentions.0{tail}", sd15, 640),
        (f"up_blocks.3.attentions.1{tail}", sd15, 320),
        (f"mid_block.attentions.0{tail}", sd15, 1280),
        (f"down_blocks.1.attentions.0{tail}", toy, 128),
        (f"up_blocks.2.attentions.1{tail}", toy, 64),
        (f"mid_block.attentions.0{tail}", toy, 128),
        ("down_blocks.1.attentions.0.transformer_blocks.1.attn2.processor", sdxl, 640),
        ("up_blocks.0.attentions.2.transformer_blocks.9.attn2.processor", sdxl, 1280),
        ("up_blocks.1.attentions.0.transformer_blocks.1.attn2.processor", sdxl, 640),
        ("mid_block.attentions.0.transformer_blocks.9.attn2.processor", sdxl, 1280),
    ]
    for name, widths, want in cases:
        got = fn(name, list(widths))
        where = f"{name!r} with block_out_channels {widths}"
        expect(isinstance(got, int) and not isinstance(got, bool), f"return an int, got {type(got).__name__} {got!r} for {where}")
        if name.startswith("up_blocks") and got != want and got == widths[int(name.split(".")[1])]:
            raise CheckFailed(f"{where}: got {got}, expected {want}. The up path mirrors the down path: "
                              "up_blocks.0 is the deepest, so index block_out_channels reversed")
        if name.startswith("mid_block"):
            expect(got == want, f"{where}: got {got}, expected {want}. The mid block sits at the bottom of the U "
                   "and runs at the deepest width, block_out_channels[-1]")
        expect(got == want, f"{where}: got {got}, expected {want}")
    return "down_blocks.i -> block_out_channels[i], up_blocks.i -> reversed(...)[i], mid_block -> block_out_channels[-1]."


def _softmax_attention(q, k, v, scaled: bool = True):
    scores = q @ k.transpose(-2, -1)
    if scaled:
        scores = scores / q.shape[-1] ** 0.5
    return torch.softmax(scores, dim=-1) @ v


@checker
def decoupled_attention(fn) -> str:
    """fn(q, k, v, k_ip, v_ip, scale) -> Attn(q, k, v) + scale * Attn(q, k_ip, v_ip), multi-head tensors."""
    gen = torch.Generator().manual_seed(0)
    batch, heads, n_query, n_text, n_image, head_dim = 2, 2, 16, 7, 4, 8
    q = torch.randn(batch, heads, n_query, head_dim, generator=gen)
    k, v = (torch.randn(batch, heads, n_text, head_dim, generator=gen) for _ in range(2))
    k_ip, v_ip = (torch.randn(batch, heads, n_image, head_dim, generator=gen) * 1.5 for _ in range(2))
    text = _softmax_attention(q, k, v)
    image = _softmax_attention(q, k_ip, v_ip)
    for scale in (1.0, 0.5, 0.0):
        got = fn(q, k, v, k_ip, v_ip, scale)
        want = text + scale * image
        what = f"Z with scale={scale}"
        expect_shape(got, want.shape, what)
        if torch.allclose(got, want, atol=1e-5):
            continue
        joint = _softmax_attention(q, torch.cat([k, k_ip], -2), torch.cat([v, v_ip], -2))
        expect(not torch.allclose(got, joint, atol=1e-5), f"{what}: you ran one softmax over the concatenated "
               "[text; image] keys. That is plain cross-attention on more tokens; decoupled cross-attention "
               "runs two softmaxes, one per branch, and adds the results")
        expect(not torch.allclose(got, scale * text + image, atol=1e-5), f"{what}: the scale multiplies the text "
               "branch; it belongs on the image branch: Attn(q, k, v) + scale * Attn(q, k_ip, v_ip)")
        expect(not torch.allclose(got, text + image, atol=1e-5), f"{what}: the scale is ignored; multiply the "
               "image branch by it")
        unscaled = _softmax_attention(q, k, v, False) + scale * _softmax_attention(q, k_ip, v_ip, False)
        expect(not torch.allclose(got, unscaled, atol=1e-5), f"{what}: the scores lack the 1/sqrt(head_dim) "
               "factor (q @ k^T / sqrt(d) before the softmax)")
        expect_close(got, want, what)
    return "two softmaxes with one query, the image branch weighted by scale; scale=0 leaves the text branch alone."
