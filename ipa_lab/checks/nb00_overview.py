"""Notebook 00, the overview: the shapes a Stable Diffusion pipeline passes around.

How big the latents of a VAE are, and how long the sequence is that the cross-attention reads once
image tokens are appended to the text tokens.
"""
from __future__ import annotations

from .core import CheckFailed, as_whole_number, checker, expect, tr, zh_word


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
        raise CheckFailed(tr(f"{what} should be a tuple of ints, got {type(value).__name__} {value!r}",
                             f"{zh_word(what)}应为由整数组成的元组，实际是 {type(value).__name__} {value!r}"))
    return tuple(ints)


def _zh_for(what: str) -> str:
    """ "for <case>" in Chinese: 对于 + `what`, with a space when `what` begins with a Latin word."""
    return f"对于 {what}" if what[:1].isascii() else f"对于{what}"


@checker
def latent_shape(fn) -> str:
    """fn(height, width, vae_config) -> (channels, latent_height, latent_width).

    中文：fn(height, width, vae_config) -> (通道数, 潜变量高, 潜变量宽)。"""
    sd_vae = {"block_out_channels": [128, 256, 512, 512], "latent_channels": 4}
    cases = [
        (tr("the toy VAE, 32x32 px", "玩具模型的 VAE（32x32 像素）"),
         {"block_out_channels": [32, 64, 64], "latent_channels": 4}, 32, 32, (4, 8, 8)),
        (tr("SD 1.5's VAE, 512x512 px", "SD 1.5 的 VAE（512x512 像素）"), sd_vae, 512, 512, (4, 64, 64)),
        (tr("SD 1.5's VAE, 512 high x 768 wide", "SD 1.5 的 VAE（高 512、宽 768）"), sd_vae, 512, 768, (4, 64, 96)),
        (tr("a VAE with 16 latent channels, 1024x1024 px", "潜变量有 16 个通道的 VAE（1024x1024 像素）"),
         {"block_out_channels": [128, 256, 512, 512], "latent_channels": 16}, 1024, 1024, (16, 128, 128)),
    ]
    for what, config, height, width, want in cases:
        got = _as_int_tuple(fn(height, width, _frozen(config)), tr(f"latent_shape for {what}", f"{what}的 latent_shape"))
        expect(len(got) == 3, tr(f"for {what} you returned {len(got)} numbers {got}; expected 3: (channels, height, width)",
                                 f"{_zh_for(what)}，你返回了 {len(got)} 个数 {got}；应为 3 个：(通道数, 高, 宽)"))
        expect(got[0] == want[0], tr(f"for {what} you gave {got[0]} channels, expected {want[0]}: the number of "
                                     "channels is the config's latent_channels",
                                     f"{_zh_for(what)}，你给出了 {got[0]} 个通道，应为 {want[0]}：通道数就是配置中的 "
                                     "latent_channels"))
        factor = 2 ** (len(config["block_out_channels"]) - 1)
        expect(not (height != width and got[1:] == want[:0:-1]),
               tr(f"for {what} you swapped height and width: {got}, expected {want}",
                  f"{_zh_for(what)}，你把高和宽弄反了：{got}，应为 {want}"))
        expect(got[1:] == want[1:], tr(f"for {what} you returned {got}, expected {want}: each encoder block but the "
                                       f"last halves the image, so the factor is 2 ** (len(block_out_channels) - 1) = {factor}",
                                       f"{_zh_for(what)}，你返回了 {got}，应为 {want}：除最后一个外，每个编码器块都把图像边长减半，"
                                       f"所以缩小倍数是 2 ** (len(block_out_channels) - 1) = {factor}"))
    return tr("the VAE keeps latent_channels channels and shrinks each side by 2 ** (len(block_out_channels) - 1).",
              "VAE 保留 latent_channels 个通道，并把每条边缩小 2 ** (len(block_out_channels) - 1) 倍。")


@checker
def encoder_hidden_states_shape(fn) -> str:
    """fn(batch, text_tokens, image_tokens, cross_attention_dim) -> shape of [text tokens; image tokens].

    中文：fn(batch, text_tokens, image_tokens, cross_attention_dim) -> [文本 token; 图像 token] 的形状。"""
    cases = [
        (tr("the toy (16 text tokens, 4 image tokens, width 64)", "玩具模型（16 个文本 token、4 个图像 token，宽 64）"),
         (1, 16, 4, 64), (1, 20, 64)),
        (tr("SD 1.5 + IP-Adapter (77 text tokens, 4 image tokens, width 768)",
            "SD 1.5 + IP-Adapter（77 个文本 token、4 个图像 token，宽 768）"), (2, 77, 4, 768), (2, 81, 768)),
        (tr("SD 1.5 + IP-Adapter Plus (77 text tokens, 16 image tokens)",
            "SD 1.5 + IP-Adapter Plus（77 个文本 token、16 个图像 token）"), (3, 77, 16, 768), (3, 93, 768)),
        (tr("SDXL + IP-Adapter (77 text tokens, 4 image tokens, width 2048)",
            "SDXL + IP-Adapter（77 个文本 token、4 个图像 token，宽 2048）"), (1, 77, 4, 2048), (1, 81, 2048)),
    ]
    for what, args, want in cases:
        got = _as_int_tuple(fn(*args), tr(f"the shape for {what}", f"{what}的形状"))
        batch, text, image, dim = args
        expect(len(got) == 3, tr(f"for {what} you returned {got}; expected 3 numbers: (batch, tokens, features)",
                                 f"{_zh_for(what)}，你返回了 {got}；应为 3 个数：(批大小, token 数, 特征数)"))
        expect(got != (batch, text, dim), tr(f"for {what} you returned {got}: that is the text alone; the "
                                             f"{image} image tokens are appended after the text tokens",
                                             f"{_zh_for(what)}，你返回了 {got}：这只是文本部分；"
                                             f"{image} 个图像 token 要接在文本 token 之后"))
        expect(got[2] == dim, tr(f"for {what} the features are {got[2]}, expected {dim}: every token, text or "
                                 "image, is cross_attention_dim wide; the image tokens are concatenated along the sequence "
                                 "(dim 1), not along the features",
                                 f"{_zh_for(what)}，特征数是 {got[2]}，应为 {dim}：每个 token（无论文本还是图像）都是 "
                                 "cross_attention_dim 宽；图像 token 沿序列维（dim 1）拼接，而不是沿特征维"))
        expect(got == want, tr(f"for {what} you returned {got}, expected {want}", f"{_zh_for(what)}，你返回了 {got}，应为 {want}"))
    return tr("the cross-attention reads text tokens + image tokens, all cross_attention_dim wide (77 + 4 = 81 for SD 1.5).",
              "交叉注意力读取文本 token + 图像 token，它们都是 cross_attention_dim 宽（SD 1.5 中为 77 + 4 = 81）。")
