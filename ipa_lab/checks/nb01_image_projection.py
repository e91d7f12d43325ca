"""Notebook 01, the image projection: an image embedding becomes a few tokens.

The learner builds `ImageProjModel` (Linear -> reshape -> LayerNorm) as an `nn.Module`; the
checker builds it at several sizes, checks that its parameters carry the original's names (so
the original checkpoints load into it), gives it the weights of diffusers' `ImageProjection`
and compares the two outputs.
"""
from __future__ import annotations

import torch
from torch import nn

from .core import (CheckFailed, LearnerFunction, LearnerRaised, builds, checker, expect, expect_close, expect_shape,
                   first_line, learner_code, tr, zh_word)

# (cross_attention_dim, clip_embeddings_dim, clip_extra_context_tokens, what): the notebook's toy
# first, then sizes where a hard-coded 64, 32 or 4 shows, then SD 1.5 with ViT-H/14. `what` is
# (English, Chinese), picked by `tr` when a check runs.
_SIZES = [(64, 32, 4, ("the toy (32 -> 4 tokens x 64)", "玩具模型（32 -> 4 个 token x 64）")),
          (16, 48, 6, ("48 -> 6 tokens x 16", "48 -> 6 个 token x 16")),
          (768, 1024, 4, ("SD 1.5 with ViT-H/14 (1024 -> 4 tokens x 768)", "SD 1.5 配 ViT-H/14（1024 -> 4 个 token x 768）"))]
_ARGS = "cross_attention_dim, clip_embeddings_dim, clip_extra_context_tokens"


def _build(cls: LearnerFunction, dim: int, embed_dim: int, tokens: int, seed: int):
    """The learner's module at one size, built with keyword arguments as the original is."""
    with torch.random.fork_rng():  # the learner's random init must not move the notebook's seed
        torch.manual_seed(seed)
        try:
            model = cls(cross_attention_dim=dim, clip_embeddings_dim=embed_dim, clip_extra_context_tokens=tokens)
        except LearnerRaised as e:
            if isinstance(e.error, TypeError) and "argument" in str(e.error):
                raise CheckFailed(tr(f"building ImageProjModel({_args(dim, embed_dim, tokens)}) raised "
                                     f"{first_line(e.error)}: __init__ takes the keyword arguments {_ARGS}, "
                                     "the original's names",
                                     f"构建 ImageProjModel({_args(dim, embed_dim, tokens)}) 时抛出了 "
                                     f"{first_line(e.error)}：__init__ 应接受关键字参数 {_ARGS}"
                                     "（原版的参数名）")) from None
            raise
    expect(isinstance(model, nn.Module), tr(f"ImageProjModel(...) gave {type(model).__name__}, not an nn.Module: "
                                            "subclass nn.Module and call super().__init__() first",
                                            f"ImageProjModel(...) 得到的是 {type(model).__name__}，不是 nn.Module："
                                            "请继承 nn.Module，并先调用 super().__init__()"))
    return model


def _args(dim: int, embed_dim: int, tokens: int) -> str:
    return f"cross_attention_dim={dim}, clip_embeddings_dim={embed_dim}, clip_extra_context_tokens={tokens}"


def _expected_shapes(dim: int, embed_dim: int, tokens: int) -> dict:
    """The original's parameters: one Linear (all tokens at once) and one LayerNorm (per token)."""
    return {"proj.weight": (tokens * dim, embed_dim), "proj.bias": (tokens * dim,),
            "norm.weight": (dim,), "norm.bias": (dim,)}


def _check_parameters(model: nn.Module, dim: int, embed_dim: int, tokens: int, what: str) -> None:
    """Exactly proj.weight, proj.bias, norm.weight, norm.bias, each with the original's shape."""
    got = {name: tuple(p.shape) for name, p in model.named_parameters()}
    want = _expected_shapes(dim, embed_dim, tokens)
    missing, extra = [n for n in want if n not in got], [n for n in got if n not in want]
    sizes = tr(f"with {_args(dim, embed_dim, tokens)}", f"当 {_args(dim, embed_dim, tokens)} 时")
    expect(missing != ["proj.bias"], tr(f"{sizes}, proj has no bias: keep nn.Linear's bias (bias=True, the "
                                        "default); the original has proj.bias, and its checkpoints would not load without it",
                                        f"{sizes}，proj 没有偏置：保留 nn.Linear 的偏置（bias=True，默认值）；"
                                        "原版有 proj.bias，缺了它，原版的检查点（checkpoint）就加载不进来"))
    expect(not (missing == ["norm.weight", "norm.bias"] and not extra),
           tr(f"{sizes}, your module has no LayerNorm: "
              "add self.norm = nn.LayerNorm(cross_attention_dim), applied to each token after the reshape",
              f"{sizes}，你的模块没有 LayerNorm：请添加 self.norm = nn.LayerNorm(cross_attention_dim)，"
              "在 reshape 之后对每个 token 应用"))
    if not missing and extra:
        count = sum(model.get_parameter(n).numel() for n in extra)
        listed = ", ".join(f"{n} {got[n]}" for n in extra[:4])
        raise CheckFailed(tr(f"{sizes}, your module has parameters the original has not: {listed} (+{count:,} "
                             "parameters). ImageProjModel is one nn.Linear and one nn.LayerNorm, nothing more",
                             f"{sizes}，你的模块有原版没有的参数：{listed}（多出 {count:,} 个参数）。"
                             "ImageProjModel 只有一个 nn.Linear 和一个 nn.LayerNorm，别无其他"))
    if missing:
        raise CheckFailed(tr(f"your parameters are named {', '.join(got) or 'nothing'}; expected exactly "
                             f"{', '.join(want)}: call the layers self.proj and self.norm, so checkpoints of the "
                             "original IP-Adapter load into your module",
                             f"你的参数名是 {', '.join(got) or '（无）'}；应恰好是 {', '.join(want)}："
                             "把两层命名为 self.proj 和 self.norm，这样原版 IP-Adapter 的检查点才能加载进你的模块"))
    _check_shapes(got, want, dim, embed_dim, tokens, sizes)


def _check_shapes(got: dict, want: dict, dim: int, embed_dim: int, tokens: int, sizes: str) -> None:
    """Each parameter's shape, naming the usual reasons it is off."""
    toy = _expected_shapes(*_SIZES[0][:3])
    listed = ", ".join(f"{n} {s}" for n, s in got.items())
    expect(not (got != want and got == toy), tr(f"{sizes}, your parameters have the toy's shapes "
                                                f"({listed}): you hard-coded 64, 32 or 4; use the arguments",
                                                f"{sizes}，你的参数是玩具模型的形状（{listed}）："
                                                "你把 64、32 或 4 写死了；请使用构造参数"))
    expect(got["norm.weight"] != (tokens * dim,), tr(f"{sizes}, the LayerNorm is {tokens * dim} wide "
                                                     f"(num_tokens x dim): it normalises each token on its own, "
                                                     "so nn.LayerNorm(cross_attention_dim)",
                                                     f"{sizes}，LayerNorm 的宽度是 {tokens * dim}（num_tokens x dim）："
                                                     "它对每个 token 单独做归一化，所以应是 nn.LayerNorm(cross_attention_dim)"))
    expect(got["proj.weight"] != want["proj.weight"][::-1],
           tr(f"{sizes}, proj.weight has shape "
              f"{got['proj.weight']}, expected {want['proj.weight']}: nn.Linear(in_features, out_features) takes "
              "the input width first, nn.Linear(clip_embeddings_dim, clip_extra_context_tokens * cross_attention_dim)",
              f"{sizes}，proj.weight 的形状是 {got['proj.weight']}，应为 {want['proj.weight']}："
              "nn.Linear(in_features, out_features) 先写输入宽度，"
              "即 nn.Linear(clip_embeddings_dim, clip_extra_context_tokens * cross_attention_dim)"))
    for name, shape in want.items():
        expect(got[name] == shape, tr(f"{sizes}, {name} has shape {got[name]}, expected {shape}",
                                      f"{sizes}，{name} 的形状是 {got[name]}，应为 {shape}"))


def _diffusers_twin(model: nn.Module, dim: int, embed_dim: int, tokens: int, seed: int):
    """diffusers' ImageProjection at the same size, its weights copied into the learner's module.

    The LayerNorm gets a weight and bias away from 1 and 0, so a missing norm shows."""
    from diffusers.models.embeddings import ImageProjection

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        twin = ImageProjection(image_embed_dim=embed_dim, cross_attention_dim=dim, num_image_text_embeds=tokens)
        with torch.no_grad():
            twin.norm.weight.add_(torch.randn(dim) * 0.3)
            twin.norm.bias.add_(torch.randn(dim) * 0.3)
    weights = {"proj.weight": twin.image_embeds.weight, "proj.bias": twin.image_embeds.bias,
               "norm.weight": twin.norm.weight, "norm.bias": twin.norm.bias}
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(weights[name])
    return twin


def _forward(cls: LearnerFunction, model: nn.Module, x: torch.Tensor, dim: int, tokens: int) -> torch.Tensor:
    """The learner's forward; a crash away from the toy's sizes is most likely a hard-coded size."""
    try:
        return learner_code(model, owner=cls)(x)
    except LearnerRaised as e:
        if (dim, tokens) == (64, 4):  # the notebook's own sizes: a plain crash
            raise
        raise CheckFailed(tr(f"with clip_extra_context_tokens={tokens} and cross_attention_dim={dim} your forward "
                             f"raised {first_line(e.error)}. Did you hard-code 4 tokens or 64 features? Keep the "
                             "constructor's sizes as attributes and reshape with those",
                             f"当 clip_extra_context_tokens={tokens}、cross_attention_dim={dim} 时，你的 forward "
                             f"抛出了 {first_line(e.error)}。是不是把 4 个 token 或 64 个特征写死了？"
                             "把构造参数里的尺寸存为属性，reshape 时用它们")) from None


def _check_output(got, twin: nn.Module, x: torch.Tensor, dim: int, tokens: int, what: str) -> None:
    """Compare with diffusers' output; name the plausible mistakes before the bare difference."""
    batch = x.shape[0]
    expect(isinstance(got, torch.Tensor), tr(f"forward should return a torch.Tensor, got {type(got).__name__}",
                                             f"forward 应返回 torch.Tensor，实际是 {type(got).__name__}"))
    expect(tuple(got.shape) != (batch, tokens * dim),
           tr(f"{what} has shape {tuple(got.shape)}: one long vector per "
              f"image; reshape it into (batch, clip_extra_context_tokens, cross_attention_dim) = {(batch, tokens, dim)}",
              f"{zh_word(what)}的形状是 {tuple(got.shape)}：每张图像是一条长向量；请把它 reshape 成 "
              f"(batch, clip_extra_context_tokens, cross_attention_dim) = {(batch, tokens, dim)}"))
    with torch.no_grad():
        want = twin(x)
        flat = twin.image_embeds(x)
        no_norm = flat.reshape(batch, tokens, dim)
        wrong_order = twin.norm(flat.reshape(batch, dim, tokens).transpose(1, 2))
    expect_shape(got, want.shape, what)
    expect(got.dtype == want.dtype, tr(f"{what} has dtype {got.dtype}, expected {want.dtype}, the input's",
                                       f"{zh_word(what)}的 dtype 是 {got.dtype}，应为输入的 dtype {want.dtype}"))
    expect(not torch.allclose(got, no_norm, atol=1e-5),
           tr(f"{what} is the reshaped linear output without the "
              "LayerNorm: apply self.norm to the tokens after the reshape",
              f"{zh_word(what)}是 reshape 后的线性层输出，少了 LayerNorm：请在 reshape 之后对 token 应用 self.norm"))
    expect(not torch.allclose(got, wrong_order, atol=1e-5),
           tr(f"{what} is cut into tokens in the wrong order: token i "
              "is the i-th run of cross_attention_dim consecutive outputs, so reshape to (batch, tokens, dim) directly",
              f"{zh_word(what)}切分 token 的顺序不对：第 i 个 token 是第 i 段连续的 cross_attention_dim 个输出，"
              "所以直接 reshape 成 (batch, tokens, dim)"))
    expect_close(got, want, what, atol=1e-5)
    expect(got.requires_grad, tr("your output carries no gradient (torch.no_grad() or .detach() in forward?): the "
                                 "projection is what IP-Adapter trains, so its forward must let gradients through",
                                 "你的输出不带梯度（forward 里用了 torch.no_grad() 或 .detach()？）："
                                 "图像投影正是 IP-Adapter 要训练的部分，它的 forward 必须让梯度通过"))


@builds("projection.ImageProjModel")
def image_proj_model(cls) -> str:
    """cls(cross_attention_dim, clip_embeddings_dim, clip_extra_context_tokens): a module, embeddings -> tokens.

    中文：cls(cross_attention_dim, clip_embeddings_dim, clip_extra_context_tokens)：一个模块，图像嵌入 -> token。

    Built with keyword arguments; forward maps (batch, clip_embeddings_dim) image embeddings to
    (batch, clip_extra_context_tokens, cross_attention_dim) tokens."""
    gen = torch.Generator().manual_seed(0)
    for seed, (dim, embed_dim, tokens, (what_en, what_zh)) in enumerate(_SIZES):
        what = tr(what_en, what_zh)
        model = _build(cls, dim, embed_dim, tokens, seed)
        _check_parameters(model, dim, embed_dim, tokens, what)
        twin = _diffusers_twin(model, dim, embed_dim, tokens, seed)
        x = torch.randn(2 + seed % 2, embed_dim, generator=gen)  # batches of 2 and 3
        got = _forward(cls, model, x, dim, tokens)
        _check_output(got, twin, x, dim, tokens, tr(f"the output for {what}", f"{what}输出"))
    return tr("proj -> reshape to (batch, tokens, dim) -> norm per token, with the original's parameter names "
              "(its checkpoints load); checked against diffusers' ImageProjection with the same weights.",
              "proj -> reshape 成 (batch, tokens, dim) -> 对每个 token 做 norm，参数名与原版一致（原版检查点可以加载）；"
              "已与使用相同权重的 diffusers ImageProjection 对照。")


@checker
def image_proj_parameters(fn) -> str:
    """fn(clip_embeddings_dim, cross_attention_dim, num_tokens) -> the number of parameters of ImageProjModel at those sizes.

    中文：fn(clip_embeddings_dim, cross_attention_dim, num_tokens) -> 这些尺寸下 ImageProjModel 的参数个数。"""
    cases = [(32, 64, 4, ("the toy", "玩具模型")), (1024, 768, 4, ("SD 1.5 with ViT-H/14", "SD 1.5 配 ViT-H/14")),
             (1280, 2048, 4, ("SDXL with ViT-bigG/14", "SDXL 配 ViT-bigG/14")), (48, 16, 6, ("48 -> 6 x 16", "48 -> 6 x 16"))]
    for embed_dim, dim, tokens, (what_en, what_zh) in cases:
        what = tr(what_en, what_zh)
        weight, bias, norm = embed_dim * tokens * dim, tokens * dim, 2 * dim
        want = weight + bias + norm
        got = fn(embed_dim, dim, tokens)
        expect(isinstance(got, int) and not isinstance(got, bool), tr(
            f"return a whole number (int), got {got!r}", f"应返回整数（int），实际得到 {got!r}"))
        sizes = tr(f"for {what} ({embed_dim} -> {tokens} x {dim})", f"对于{what}（{embed_dim} -> {tokens} x {dim}）")
        expect(got != want - bias, tr(f"{sizes} you count {got:,}: proj's bias is missing ({bias:,} = num_tokens x "
                                      "cross_attention_dim, one per output of the linear layer)",
                                      f"{sizes}你数出 {got:,}：漏了 proj 的偏置（{bias:,} = num_tokens x "
                                      "cross_attention_dim，线性层每个输出一个）"))
        expect(got not in (want - norm, want - norm // 2), tr(
            f"{sizes} you count {got:,}: the LayerNorm's weight and bias are missing or half counted (2 x "
            f"cross_attention_dim = {norm:,})",
            f"{sizes}你数出 {got:,}：LayerNorm 的权重和偏置漏了或只算了一半（2 x cross_attention_dim = {norm:,}）"))
        expect(got != weight + bias + 2 * tokens * dim or tokens == 1, tr(
            f"{sizes} you count {got:,}: the LayerNorm is one per token width, shared by all tokens: 2 x "
            "cross_attention_dim, not 2 x num_tokens x cross_attention_dim",
            f"{sizes}你数出 {got:,}：LayerNorm 按单个 token 的宽度计，由所有 token 共享：是 2 x cross_attention_dim，"
            "而不是 2 x num_tokens x cross_attention_dim"))
        expect(got == want, tr(f"{sizes} expected {want:,} (proj.weight {weight:,} + proj.bias {bias:,} + norm {norm:,}), "
                               f"got {got:,}",
                               f"{sizes}应为 {want:,}（proj.weight {weight:,} + proj.bias {bias:,} + norm {norm:,}），"
                               f"你得到 {got:,}"))
    return tr("D x T x C + T x C + 2 C: almost all of it proj.weight.",
              "D x T x C + T x C + 2 C：几乎全部在 proj.weight 里。")
