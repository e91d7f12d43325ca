"""Notebook 09, which layers matter: per-block scale dicts in diffusers' format, read from a heat map.

`only_layers` builds the dict that turns the image on in given attention layers only (checked by
expanding it with `ipa_lab.generate.block_scales` on the toy UNet); `layers_for` picks from the heat
map's rows the layers that carry an attribute on their own.
"""
from __future__ import annotations

import functools

from .core import CheckFailed, checker, expect, toy_pipeline, tr

TOY_LAYERS = ("down_blocks.0.attentions.0", "down_blocks.1.attentions.0", "mid_block.attentions.0",
              "up_blocks.1.attentions.0", "up_blocks.1.attentions.1", "up_blocks.2.attentions.0",
              "up_blocks.2.attentions.1")


@functools.lru_cache(maxsize=1)
def _toy_unet():
    return toy_pipeline().unet  # only read: block_scales looks at its blocks


def _expand(spec) -> dict:
    """The learner's dict as one scale per layer, or a verdict naming what diffusers' format wants."""
    from ..generate import block_scales

    if not isinstance(spec, dict):
        raise CheckFailed(tr(f"return a dict in diffusers' format, such as {{'up': {{'block_1': [0.0, 1.0]}}}}, got {spec!r}",
                             f"应返回 diffusers 格式的 dict，例如 {{'up': {{'block_1': [0.0, 1.0]}}}}，实际得到 {spec!r}"))
    paths = [k for k in spec if isinstance(k, str) and k.endswith(("_blocks", "_block")) or "." in str(k)]
    expect(not paths, tr(
        f"the keys {paths} are module paths; diffusers' dict uses 'down', 'mid' and 'up', then 'block_<i>' "
        "inside 'down' and 'up'",
        f"键 {paths} 是模块路径；diffusers 的 dict 用 'down'、'mid' 和 'up'，'down' 和 'up' 里面再用 'block_<i>'"))
    for side in ("down", "up"):
        inner = spec.get(side)
        if isinstance(inner, dict):
            digits = [k for k in inner if isinstance(k, (int, str)) and str(k).isdigit()]
            expect(not digits, tr(f"inside '{side}', name the blocks 'block_<i>' (e.g. 'block_1'), not {digits}",
                                  f"在 '{side}' 里，块的名字写成 'block_<i>'（如 'block_1'），而不是 {digits}"))
    from ..generate import attention_blocks

    counts = attention_blocks(_toy_unet())
    unknown = [k for k in spec if k not in ("down", "mid", "up")]
    expect(not unknown, tr(f"unknown keys {unknown}: diffusers' dict takes 'down', 'mid' and 'up'",
                           f"未知的键 {unknown}：diffusers 的 dict 只接受 'down'、'mid' 和 'up'"))
    for side in ("down", "up"):
        inner = spec.get(side)
        for block, value in (inner.items() if isinstance(inner, dict) else ()):
            n = counts.get(f"{side}.{block}")
            expect(n is not None, tr(
                f"the toy UNet has no attention in {side}.{block}; its {side} blocks with attention are "
                f"{sorted(k.split('.')[1] for k in counts if k.startswith(side + '.'))}",
                f"玩具 UNet 的 {side}.{block} 里没有注意力层；它有注意力层的 {side} 块是 "
                f"{sorted(k.split('.')[1] for k in counts if k.startswith(side + '.'))}"))
            expect(not isinstance(value, list) or len(value) in (1, n), tr(
                f"{side}.{block} has {n} attention layer(s) in the toy UNet: expected {n} scales in its list, got {len(value) if isinstance(value, list) else 1}",
                f"玩具 UNet 的 {side}.{block} 有 {n} 个注意力层：它的列表应有 {n} 个 scale，实际有 {len(value) if isinstance(value, list) else 0} 个"))
    try:
        return block_scales(_toy_unet(), spec)
    except (ValueError, TypeError) as error:
        raise CheckFailed(tr(f"set_ip_adapter_scale refuses this dict: {error}",
                             f"set_ip_adapter_scale 不接受这个 dict：{error}")) from None


@checker
def only_layers(fn) -> str:
    """fn(layers) -> the scale dict, in diffusers' format, that sets 1.0 in those attention layers of the toy UNet and 0 elsewhere.

    中文：fn(layers) -> diffusers 格式的 scale dict：玩具 UNet 中这些注意力层为 1.0，其余为 0。"""
    cases = [["up_blocks.1.attentions.1"], ["mid_block.attentions.0"], ["down_blocks.1.attentions.0"],
             ["up_blocks.2.attentions.0", "up_blocks.2.attentions.1"],
             ["down_blocks.0.attentions.0", "mid_block.attentions.0", "up_blocks.1.attentions.0"],
             list(TOY_LAYERS)]
    for layers in cases:
        got = _expand(fn(list(layers)))
        on = {name for name, value in got.items() if value == 1.0}
        half = {name for name, value in got.items() if value not in (0.0, 1.0)}
        expect(not half, tr(f"for {layers} your dict gives {sorted(half)} a scale other than 0 or 1",
                            f"对于 {layers}，你的 dict 让 {sorted(half)} 的 scale 既不是 0 也不是 1"))
        extra, missing = sorted(on - set(layers)), sorted(set(layers) - on)
        sibling = [n for n in extra if n.rsplit(".", 1)[0] in {m.rsplit(".", 1)[0] for m in layers}]
        expect(not sibling, tr(
            f"for {layers} your dict also turns on {sibling}: a number for a block sets all its attentions; "
            "up blocks hold two here, so give a list with one scale per attention, e.g. [0.0, 1.0]",
            f"对于 {layers}，你的 dict 还打开了 {sibling}：给一个块一个数会设置它的所有注意力层；这里的 up 块各有两个，"
            "所以要给一个列表，每个注意力层一个 scale，例如 [0.0, 1.0]"))
        expect(not extra, tr(f"for {layers} your dict also turns on {extra}", f"对于 {layers}，你的 dict 还打开了 {extra}"))
        expect(not missing, tr(f"for {layers} your dict leaves {missing} at 0", f"对于 {layers}，你的 dict 让 {missing} 仍为 0"))
    return tr("a dict names blocks by side and index; a list gives each attention of a block its own scale; "
              "what it leaves out gets 0.",
              "dict 按方向和序号点名块；列表给块中每个注意力层各自的 scale；没写到的都是 0。")


def _rows():
    """A heat map in the shipped CSV's format, made up so that each rule of the exercise decides a case."""
    def row(layers, kind, condition, colour, shape):
        return {"layers": layers, "kind": kind, "condition": condition, "colour": colour, "shape": shape,
                "position": 0.25, "size": 0.5}
    return [row("down_blocks.0.attentions.0", "layer", "image only", 0.2, 0.4),
            row("mid_block.attentions.0", "layer", "image only", 0.95, 0.3),
            row("up_blocks.1.attentions.0", "layer", "image only", 0.9, 0.9),
            row("up_blocks.2.attentions.1", "layer", "image only", 0.85, 0.95),
            row("up_blocks.2", "block", "image only", 1.0, 1.0),
            row("all", "all", "image only", 1.0, 1.0),
            row("down_blocks.0.attentions.0", "layer", "image + other text", 0.99, 0.99)]


@checker
def layers_for(fn) -> str:
    """fn(rows, attribute, threshold) -> the single attention layers whose image-only agreement on `attribute` is at least threshold.

    中文：fn(rows, attribute, threshold) -> 只开单个注意力层、只给图像时，`attribute` 一致率不低于 threshold 的那些层。"""
    rows = _rows()
    cases = [("colour", 0.9, {"mid_block.attentions.0", "up_blocks.1.attentions.0"}),
             ("shape", 0.9, {"up_blocks.1.attentions.0", "up_blocks.2.attentions.1"}),
             ("colour", 0.5, {"mid_block.attentions.0", "up_blocks.1.attentions.0", "up_blocks.2.attentions.1"}),
             ("position", 0.5, set())]
    for attribute, threshold, want in cases:
        got = fn([dict(r) for r in rows], attribute, threshold)
        if isinstance(got, str) or not hasattr(got, "__iter__"):
            raise CheckFailed(tr(f"return a list (or set) of layer names, got {got!r}",
                                 f"应返回层名的列表（或集合），实际得到 {got!r}"))
        got = set(got)
        expect("up_blocks.2" not in got and "all" not in got, tr(
            "keep only the rows of kind 'layer': 'up_blocks.2' and 'all' are whole blocks, several layers at once",
            "只保留 kind 为 'layer' 的行：'up_blocks.2' 和 'all' 是整个块，一次开了好几层"))
        expect(not (attribute == "colour" and threshold == 0.9 and "down_blocks.0.attentions.0" in got), tr(
            "keep only the 'image only' rows: with a conflicting caption the text decides too",
            "只保留 'image only' 的行：给了一个矛盾的描述时，文本也在起作用"))
        expect(not (threshold == 0.9 and want - got == {"up_blocks.1.attentions.0"}), tr(
            f"for {attribute} at {threshold} you leave out up_blocks.1.attentions.0, which scores exactly {threshold}: "
            "'at least' is >=",
            f"对于 {attribute}、阈值 {threshold}，你漏掉了正好等于 {threshold} 的 up_blocks.1.attentions.0：“不低于”是 >="))
        expect(got == want, tr(f"for {attribute} at {threshold} expected {sorted(want)}, got {sorted(got)}",
                               f"对于 {attribute}、阈值 {threshold}，应为 {sorted(want)}，实际得到 {sorted(got)}"))
    return tr("one layer at a time, image alone: the layers that carry an attribute by themselves.",
              "一次一层、只给图像：能独自传递某个属性的层。")
