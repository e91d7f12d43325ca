"""Notebook 06, IP-Adapter Plus: the Perceiver Resampler's attention, built by the learner.

The learner's `PerceiverAttention` gets the original's parameter names (so the Plus checkpoints
load into it) and, with the package's weights loaded, the package's outputs.
"""
from __future__ import annotations

import torch

from .core import CheckFailed, builds, checker, expect, expect_shape, learner_code, tr

# (what, keyword arguments): the toy Plus's size, and two small ones that catch hard-coded sizes
# (`what` is an (English, Chinese) pair, put through `tr` when the check runs)
_SIZES = ((("the toy Plus's size (dim 64, 12 heads of 64)", "按玩具版 Plus 的尺寸（dim 64，12 个头，每头 64）"),
           dict(dim=64, dim_head=64, heads=12)),
          (("dim 32, 4 heads of 8", "按 dim 32、4 个头（每头 8）"), dict(dim=32, dim_head=8, heads=4)),
          (("dim 48, 3 heads of 16", "按 dim 48、3 个头（每头 16）"), dict(dim=48, dim_head=16, heads=3)))

# What each parameter of the original is for, for the messages about names and shapes (English, Chinese).
_ROLES = {"norm1": ("the LayerNorm of the image features", "图像特征的 LayerNorm"),
          "norm2": ("the LayerNorm of the latents (the queries)", "latents（即查询）的 LayerNorm"),
          "to_q": ("the queries' Linear (dim -> heads * dim_head, no bias)",
                   "查询的 Linear（dim -> heads * dim_head，无偏置）"),
          "to_kv": ("ONE Linear for keys and values together (dim -> 2 * heads * dim_head, no bias)",
                    "键和值共用的一个 Linear（dim -> 2 * heads * dim_head，无偏置）"),
          "to_out": ("the output Linear (heads * dim_head -> dim, no bias)", "输出的 Linear（heads * dim_head -> dim，无偏置）")}


def _role(layer: str) -> str:
    return tr(*_ROLES[layer])


def _reference_module(kw: dict):
    """The package's PerceiverAttention with seeded weights; its LayerNorms get random scales and
    shifts too (default ones would hide norm1 / norm2 mix-ups)."""
    from ..projection import PerceiverAttention

    with torch.random.fork_rng():
        torch.manual_seed(6)
        module = PerceiverAttention(**kw)
        with torch.no_grad():
            for norm in (module.norm1, module.norm2):
                norm.weight.normal_(1.0, 0.3)
                norm.bias.normal_(0.0, 0.3)
    return module.eval()


def _check_names(mine: dict, want: dict, what: str) -> None:
    """The learner's state dict has exactly the original's names and shapes: the checkpoints load by name."""
    for name, tensor in want.items():
        layer = name.split(".")[0]
        if name not in mine:
            split = "to_k.weight" in mine or "to_v.weight" in mine
            expect(not (layer == "to_kv" and split), tr(
                f"at {what}: you have to_k and to_v: the original has "
                f"{_role('to_kv')}, and its checkpoints store to_kv.weight",
                f"{what}：你用了 to_k 和 to_v；原版用的是{_role('to_kv')}，它的检查点存的是 to_kv.weight"))
            raise CheckFailed(tr(f"at {what}: the parameter {name} is missing: it is {_role(layer)}. Use the "
                                 "original's names (norm1, norm2, to_q, to_kv, to_out) so its checkpoints load",
                                 f"{what}：缺少参数 {name}，它是{_role(layer)}。请使用原版的名字"
                                 "（norm1、norm2、to_q、to_kv、to_out），这样原版的检查点才能加载"))
        expect(tuple(mine[name].shape) == tuple(tensor.shape), tr(
            f"at {what}: {name} has shape "
            f"{tuple(mine[name].shape)}, expected {tuple(tensor.shape)}: it is {_role(layer)}",
            f"{what}：{name} 的形状是 {tuple(mine[name].shape)}，应为 {tuple(tensor.shape)}：它是{_role(layer)}"))
    extra = sorted(set(mine) - set(want))
    if extra:
        bias = [n for n in extra if n.endswith(".bias") and n.split(".")[0] in ("to_q", "to_kv", "to_out")]
        expect(not bias, tr(f"at {what}: your module has {', '.join(bias)}: the original's to_q, to_kv and to_out "
                            "are Linear(..., bias=False)",
                            f"{what}：你的模块有 {', '.join(bias)}；原版的 to_q、to_kv 和 to_out "
                            "都是 Linear(..., bias=False)"))
        raise CheckFailed(tr(f"at {what}: your module has parameters the original has not: {', '.join(extra)}",
                             f"{what}：你的模块有原版没有的参数：{', '.join(extra)}"))


def _attend(m, x, latents, *, kv="both", norms="right", q_power=-0.25, k_power=-0.25, softmax_dim=-1, heads=None,
            dim_head=None):
    """The attention of `m`'s weights, written out, with one knob per plausible mistake."""
    heads, dim_head = heads or m.heads, dim_head or m.dim_head
    if norms == "right":
        x, latents = m.norm1(x), m.norm2(latents)
    elif norms == "swapped":
        x, latents = m.norm2(x), m.norm1(latents)
    source = {"both": torch.cat([x, latents], -2), "x": x, "latents": latents}[kv]
    split = lambda t: t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
    q = split(m.to_q(latents))
    k, v = (split(t) for t in m.to_kv(source).chunk(2, dim=-1))
    weights = torch.softmax((q * dim_head ** q_power) @ (k * dim_head ** k_power).transpose(-2, -1), dim=softmax_dim)
    out = (weights @ v).transpose(1, 2).reshape(latents.shape[0], latents.shape[1], -1)
    return m.to_out(out)


_MISTAKES = (  # (knobs, (English, Chinese)): what the mistake is, said in the learner's language by `tr`
    (dict(kv="x"), ("the keys and values come from the image features alone: compute them from torch.cat([x, "
     "latents], dim=-2), so each query also attends to the latents (itself and the other queries)",
     "键和值只来自图像特征：应从 torch.cat([x, latents], dim=-2) 计算，让每个查询也关注 latents"
     "（它自己和其他查询）")),
    (dict(kv="latents"), ("the keys and values come from the latents alone: then the queries never see the image. "
     "Compute them from torch.cat([x, latents], dim=-2)",
     "键和值只来自 latents：这样查询永远看不到图像。应从 torch.cat([x, latents], dim=-2) 计算")),
    (dict(norms="none"), ("no LayerNorms: apply norm1 to the image features and norm2 to the latents first",
     "没有 LayerNorm：先对图像特征用 norm1，对 latents 用 norm2")),
    (dict(norms="swapped"), ("norm1 and norm2 are swapped: norm1 is for the image features x, norm2 for the latents",
     "norm1 和 norm2 用反了：norm1 用于图像特征 x，norm2 用于 latents")),
    (dict(k_power=0.0), ("only q is scaled: scale q AND k by dim_head ** -0.25 (the product then carries "
     "1/sqrt(dim_head))",
     "只缩放了 q：q 和 k 都要乘以 dim_head ** -0.25（二者的乘积就带上 1/sqrt(dim_head)）")),
    (dict(q_power=0.0, k_power=0.0), ("the scores are not scaled: scale q and k by dim_head ** -0.25 each, or "
     "the softmax saturates as dim_head grows",
     "注意力分数没有缩放：q 和 k 各乘以 dim_head ** -0.25，否则 dim_head 变大时 softmax 会饱和")),
    (dict(q_power=-0.5, k_power=-0.5), ("the scores are scaled by 1/dim_head: each of q and k gets "
     "dim_head ** -0.25, so that their product gets dim_head ** -0.5",
     "注意力分数被缩放成了 1/dim_head：q 和 k 各乘 dim_head ** -0.25，二者的乘积才是 dim_head ** -0.5")),
    (dict(softmax_dim=-2), ("the softmax runs over the queries (dim=-2): each query's weights over the keys must "
     "sum to 1, softmax(dim=-1)",
     "softmax 是在查询维度（dim=-2）上做的：每个查询对所有键的权重之和应为 1，即 softmax(dim=-1)")),
)


def _one_head_mistake(m, x, latents, got) -> bool:
    """Whether `got` is the attention with one head of width heads * dim_head (heads never split)."""
    inner = m.heads * m.dim_head
    return any(torch.allclose(got, _attend(m, x, latents, heads=1, dim_head=d), atol=1e-4) for d in (m.dim_head, inner))


def _check_outputs(module, m, kw: dict, what: str, cls) -> None:
    """The learner's forward, with the package's weights loaded, against the package's output.

    `cls` is the wrapper around the learner's class: the forward's output is reported as its answer."""
    gen = torch.Generator().manual_seed(7)
    x, latents = torch.randn(2, 17, kw["dim"], generator=gen), torch.randn(2, 16, kw["dim"], generator=gen)
    with torch.no_grad():
        want = m(x, latents)
        got = learner_code(module, owner=cls)(x.clone(), latents.clone())
        expect(isinstance(got, torch.Tensor), tr(f"at {what}: forward returned {type(got).__name__}: return a tensor",
                                                 f"{what}：forward 返回了 {type(got).__name__}，应返回一个张量"))
        inner = kw["heads"] * kw["dim_head"]
        expect(tuple(got.shape) != (2, kw["heads"], 16, kw["dim_head"]), tr(
            f"at {what}: the output has shape "
            f"{tuple(got.shape)}: merge the heads back, (batch, heads, n, d) -> (batch, n, heads * d), then to_out",
            f"{what}：输出的形状是 {tuple(got.shape)}：先把各个头合并回去，(batch, heads, n, d) -> "
            "(batch, n, heads * d)，再接 to_out"))
        expect(tuple(got.shape) != (2, 16, inner) or inner == kw["dim"], tr(
            f"at {what}: the output has shape "
            f"{tuple(got.shape)}: apply to_out after merging the heads",
            f"{what}：输出的形状是 {tuple(got.shape)}：合并各个头之后还要经过 to_out"))
        expect_shape(got, want.shape, tr(f"at {what}: the output for 16 latents", f"{what}：16 个 latents 的输出"))
        if torch.allclose(got, want, atol=1e-5):
            return
        for knobs, message in _MISTAKES:
            expect(not torch.allclose(got, _attend(m, x, latents, **knobs), atol=1e-4),
                   tr(f"at {what}: {message[0]}", f"{what}：{message[1]}"))
        expect(not _one_head_mistake(m, x, latents, got), tr(
            f"at {what}: the heads are not split: view q, k and v as "
            "(batch, heads, n, dim_head) before the scores, so each head attends on its own",
            f"{what}：没有拆分多头：计算注意力分数之前，把 q、k、v 变形为 (batch, heads, n, dim_head)，"
            "让每个头各自做注意力"))
        diff = (got - want).abs().max().item()
    raise CheckFailed(tr(f"at {what}: your output differs from the original's by up to {diff:.3g} (same weights)",
                         f"{what}：你的输出与原版相差最多 {diff:.3g}（权重相同）"))


@builds("projection.PerceiverAttention")
def perceiver_attention(cls) -> str:
    """cls(*, dim, dim_head, heads): a module whose forward(x, latents) is the Resampler's attention.

    中文：cls(*, dim, dim_head, heads)：一个模块，它的 forward(x, latents) 就是 Resampler 的注意力。"""
    for (what_en, what_zh), kw in _SIZES:
        what = tr(what_en, what_zh)
        m = _reference_module(kw)
        with torch.random.fork_rng():
            torch.manual_seed(6)
            module = cls(**kw)
        expect(isinstance(module, torch.nn.Module), tr(
            f"at {what}: PerceiverAttention(...) should build a "
            f"torch.nn.Module, got {type(module).__name__}",
            f"{what}：PerceiverAttention(...) 应构建一个 torch.nn.Module，实际得到 {type(module).__name__}"))
        want = m.state_dict()
        _check_names(module.state_dict(), want, what)
        module.load_state_dict(want)
        module.eval()
        _check_outputs(module, m, kw, what, cls)
    return tr("queries from the latents, keys and values from [features; latents], q and k each scaled by "
              "dim_head ** -0.25, softmax over the keys; the original's parameter names, so the Plus checkpoints load.",
              "查询来自 latents，键和值来自 [图像特征; latents]，q 和 k 各乘 dim_head ** -0.25，softmax 在键上做；"
              "参数名与原版一致，所以 Plus 的检查点能加载。")


def _resampler_parts(dim, depth, dim_head, heads, num_queries, embedding_dim, output_dim, ff_mult) -> dict[str, int]:
    inner = dim_head * heads
    attention = 2 * 2 * dim + dim * inner + dim * 2 * inner + inner * dim  # norm1, norm2, to_q, to_kv, to_out
    hidden = int(dim * ff_mult)
    feed_forward = 2 * dim + dim * hidden + hidden * dim  # LayerNorm, two linears without bias
    return {"latents": num_queries * dim, "proj_in": embedding_dim * dim + dim, "proj_out": dim * output_dim + output_dim,
            "norm_out": 2 * output_dim, "layers": depth * (attention + feed_forward), "attention": depth * attention,
            "norms": depth * (2 * 2 * dim + 2 * dim)}


@checker
def resampler_parameters(fn) -> str:
    """fn(dim, depth, dim_head, heads, num_queries, embedding_dim, output_dim, ff_mult) -> the Resampler's parameter count.

    中文：fn(dim, depth, dim_head, heads, num_queries, embedding_dim, output_dim, ff_mult) -> Resampler 的参数个数。"""
    cases = [((64, 4, 64, 12, 16, 64, 64, 4), ("the toy", "玩具模型")),
             ((768, 4, 64, 12, 16, 1280, 768, 4), ("SD 1.5 Plus", "SD 1.5 Plus")),
             ((1280, 4, 64, 20, 16, 1280, 2048, 4), ("SDXL Plus", "SDXL Plus")),
             ((32, 2, 16, 2, 8, 48, 24, 2), ("a small one (dim 32, 2 layers, 2 heads of 16, 8 queries)",
                                            "一个小的（dim 32，2 层，2 个宽 16 的头，8 个查询）"))]
    for args, (what_en, what_zh) in cases:
        what = tr(what_en, what_zh)
        parts = _resampler_parts(*args)
        want = parts["latents"] + parts["proj_in"] + parts["proj_out"] + parts["norm_out"] + parts["layers"]
        got = fn(*args)
        expect(isinstance(got, int) and not isinstance(got, bool), tr(
            f"return a whole number (int), got {got!r}", f"应返回整数（int），实际得到 {got!r}"))
        dim, depth, dim_head, heads = args[:4]
        missing = {"latents": ("the learned queries, latents (num_queries x dim)", "可学习的查询 latents（num_queries x dim）"),
                   "norms": ("the LayerNorms inside the layers (two in each attention, one in each feed-forward)",
                             "层内的 LayerNorm（每个注意力层两个，每个前馈层一个）"),
                   "norm_out": ("norm_out, the final LayerNorm", "norm_out，最后的 LayerNorm")}
        for part, (en, zh) in missing.items():
            expect(got != want - parts[part], tr(f"for {what} you count {got:,}: {parts[part]:,} short, exactly {en}",
                                                 f"对于{what}，你数出 {got:,}：少了 {parts[part]:,}，正好是{zh}"))
        narrow = dim * dim + dim * 2 * dim + dim * dim  # attention projections as if inner were dim
        wide = dim * dim_head * heads * 4
        expect(dim_head * heads == dim or got != want - depth * (wide - narrow), tr(
            f"for {what} you count {got:,}: the attention's inner width is heads x dim_head = {dim_head * heads}, "
            f"not dim = {dim}",
            f"对于{what}，你数出 {got:,}：注意力的内部宽度是 heads x dim_head = {dim_head * heads}，而不是 dim = {dim}"))
        inner, hidden = dim_head * heads, int(dim * args[7])
        expect(got not in (want + depth * (hidden + dim), want + depth * (3 * inner + dim),
                           want + depth * (hidden + dim + 3 * inner + dim)),
               tr(f"for {what} you count {got:,}: the linears inside the layers (to_q, to_kv, to_out and the "
                  "feed-forward's two) have no bias (bias=False)",
                  f"对于{what}，你数出 {got:,}：层内的线性层（to_q、to_kv、to_out 和前馈层的两个）没有偏置（bias=False）"))
        expect(got == want, tr(f"for {what} expected {want:,}, got {got:,} (latents {parts['latents']:,}, proj_in "
                               f"{parts['proj_in']:,}, {depth} layers {parts['layers']:,} of which attention "
                               f"{parts['attention']:,}, proj_out {parts['proj_out']:,}, norm_out {parts['norm_out']:,})",
                               f"对于{what}，应为 {want:,}，你得到 {got:,}（latents {parts['latents']:,}，proj_in "
                               f"{parts['proj_in']:,}，{depth} 层共 {parts['layers']:,}，其中注意力 {parts['attention']:,}，"
                               f"proj_out {parts['proj_out']:,}，norm_out {parts['norm_out']:,}）"))
    return tr("the attention, heads x dim_head wide inside, is most of it; the queries, the norms and the "
              "projections in and out come on top.",
              "大部分参数在注意力里（内部宽度 heads x dim_head）；查询、各个 norm 以及输入输出投影另算。")
