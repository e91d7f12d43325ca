"""Notebook 08, the IP-Adapter family: FaceID's LoRA layer, and what a FaceID adapter trains.

`lora_linear_layer`: the learner builds `LoRALinearLayer` (down then up, no biases, up at zero);
the checker compares it with `ipa_lab.attention_faceid.LoRALinearLayer` given the same weights,
and the notebook then uses the learner's layer. `faceid_trainable`: the learner counts a FaceID
adapter's trainable parameters from a UNet's layout; the checker compares with
`ipa_lab.family` on the toy, SD 1.5 and SDXL, and names the part left out.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from .core import CheckFailed, LearnerRaised, builds, checker, expect, expect_close, first_line, learner_code, tr


def _build(cls, in_features: int, out_features: int, rank: int, seed: int) -> nn.Module:
    with torch.random.fork_rng():  # the learner's random init must not move the notebook's seed
        torch.manual_seed(seed)
        try:
            layer = cls(in_features, out_features, rank)
        except LearnerRaised as e:
            raise CheckFailed(tr(f"building LoRALinearLayer({in_features}, {out_features}, rank={rank}) raised "
                                 f"{first_line(e.error)}: __init__ takes (in_features, out_features, rank)",
                                 f"构建 LoRALinearLayer({in_features}, {out_features}, rank={rank}) 时抛出了 "
                                 f"{first_line(e.error)}：__init__ 应接受 (in_features, out_features, rank)")) from None
    expect(isinstance(layer, nn.Module), tr(f"LoRALinearLayer(...) gave {type(layer).__name__}, not an nn.Module",
                                            f"LoRALinearLayer(...) 得到的是 {type(layer).__name__}，不是 nn.Module"))
    return layer


@builds("attention_faceid.LoRALinearLayer")
def lora_linear_layer(cls) -> str:
    """cls(in_features, out_features, rank): x -> up(down(x)), down in -> rank, up rank -> out, no biases, up zero at first.

    中文：cls(in_features, out_features, rank)：x -> up(down(x))，down 为 in -> rank，up 为 rank -> out，无偏置，up 初始为零。"""
    from ..attention_faceid import LoRALinearLayer

    gen = torch.Generator().manual_seed(0)
    for seed, (fan_in, fan_out, rank) in enumerate(((64, 64, 8), (64, 128, 4), (768, 320, 128))):
        layer = _build(cls, fan_in, fan_out, rank, seed)
        got = {n: tuple(p.shape) for n, p in layer.named_parameters()}
        want = {"down.weight": (rank, fan_in), "up.weight": (fan_out, rank)}
        sizes = tr(f"with in_features={fan_in}, out_features={fan_out}, rank={rank}",
                   f"当 in_features={fan_in}、out_features={fan_out}、rank={rank} 时")
        biases = [n for n in got if n.endswith("bias")]
        expect(not biases, tr(f"{sizes}, your layer has biases {biases}: a LoRA update is two bias-free linears "
                              "(bias=False), so that it is exactly the matrix B A added to W",
                              f"{sizes}，你的层有偏置 {biases}：LoRA 更新是两个无偏置的线性层（bias=False），"
                              "这样它恰好是加到 W 上的矩阵 B A"))
        expect(got.get("down.weight") != (fan_in, rank), tr(
            f"{sizes}, down.weight has shape {got.get('down.weight')}: nn.Linear(in_features, out_features) takes the "
            "input width first, so down = nn.Linear(in_features, rank, bias=False)",
            f"{sizes}，down.weight 的形状是 {got.get('down.weight')}：nn.Linear(in_features, out_features) "
            "先写输入宽度，所以 down = nn.Linear(in_features, rank, bias=False)"))
        expect(got == want, tr(f"{sizes}, your parameters are {got}; expected exactly {want} (the original's names: "
                               "its checkpoints and diffusers' loader look for down.weight and up.weight)",
                               f"{sizes}，你的参数是 {got}；应恰好是 {want}（原版的名字：它的检查点和 diffusers "
                               "的加载器都找 down.weight 和 up.weight）"))
        x = torch.randn(2, 5, fan_in, generator=gen)
        out = learner_code(layer, owner=cls)(x)
        expect(isinstance(out, torch.Tensor) and tuple(out.shape) == (2, 5, fan_out), tr(
            f"{sizes}, the output for a (2, 5, {fan_in}) input should be (2, 5, {fan_out}), got "
            f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}",
            f"{sizes}，输入 (2, 5, {fan_in}) 的输出应为 (2, 5, {fan_out})，实际是 "
            f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}"))
        expect(torch.count_nonzero(layer.up.weight) == 0, tr(
            f"{sizes}, up.weight does not start at zero: with up = 0 the update is 0 at step 0, so the model starts "
            "exactly as it was (nn.init.zeros_(self.up.weight))",
            f"{sizes}，up.weight 初始不为零：up = 0 时第 0 步的更新为 0，模型的起点与原来完全一样"
            "（nn.init.zeros_(self.up.weight)）"))
        std = float(layer.down.weight.detach().std())
        expect(0.5 / rank < std < 2 / rank, tr(
            f"{sizes}, down.weight has standard deviation {std:.3g}; the original draws it from a normal "
            f"distribution with std 1/rank = {1 / rank:.3g} (nn.init.normal_(self.down.weight, std=1 / rank)): "
            "with down at zero too, no gradient would ever reach up",
            f"{sizes}，down.weight 的标准差是 {std:.3g}；原版从标准差为 1/rank = {1 / rank:.3g} 的正态分布中采样"
            "（nn.init.normal_(self.down.weight, std=1 / rank)）：如果 down 也是零，梯度永远到不了 up"))
        reference = LoRALinearLayer(fan_in, fan_out, rank)
        with torch.no_grad():
            reference.up.weight.normal_(generator=gen)
            layer.up.weight.copy_(reference.up.weight)
            layer.down.weight.copy_(reference.down.weight)
        got_out = learner_code(layer, owner=cls)(x)
        expect_close(got_out, reference(x), tr(f"the output {sizes}", f"{sizes}的输出"), atol=1e-4)
        expect(got_out.requires_grad, tr("your output carries no gradient: the LoRA is what FaceID trains",
                                         "你的输出不带梯度：LoRA 正是 FaceID 要训练的部分"))
    return tr("down (random, std 1/rank) then up (zero): an update of rank r that is exactly 0 at step 0, "
              "with the original's parameter names.",
              "先 down（随机，标准差 1/rank）再 up（零）：秩为 r 的更新，第 0 步恰好为 0，参数名与原版相同。")


@functools.lru_cache(maxsize=None)
def _unet(name: str):
    from ..configs import build_unet

    return build_unet(name)


def _parts(unet_name: str, rank: int, id_dim: int, tokens: int) -> dict[str, int]:
    """The reference, built and counted: the processors (`ipa_lab.family`) and FaceID's projection (meta)."""
    from ..adapter import count_parameters
    from ..faceid import MLPProjModel
    from ..family import attention_counts

    cross = _unet(unet_name).config.cross_attention_dim
    counts = dict(attention_counts(unet_name, rank))
    counts.pop("layers")
    with torch.device("meta"):
        counts["projection"] = count_parameters(MLPProjModel(cross, id_dim, tokens))
    return counts


@checker
def faceid_trainable(fn) -> str:
    """fn(unet, rank, id_embeddings_dim, num_tokens) -> the number of parameters a FaceID adapter trains on that UNet.

    中文：fn(unet, rank, id_embeddings_dim, num_tokens) -> FaceID 适配器在这个 UNet 上训练的参数个数。"""
    cases = [("toy_unet", 8, 512, 4, ("the toy, rank 8", "玩具模型，秩 8")),
             ("toy_unet", 8, 64, 2, ("the toy, rank 8, a 64-wide embedding, 2 tokens", "玩具模型，秩 8，64 维嵌入，2 个 token")),
             ("sd15_unet", 128, 512, 4, ("SD 1.5, rank 128 (FaceID)", "SD 1.5，秩 128（FaceID）")),
             ("sd15_unet", 4, 512, 4, ("SD 1.5, rank 4", "SD 1.5，秩 4")),
             ("sdxl_unet", 128, 512, 4, ("SDXL, rank 128", "SDXL，秩 128"))]
    for name, rank, id_dim, tokens, (what_en, what_zh) in cases:
        what = tr(what_en, what_zh)
        parts = _parts(name, rank, id_dim, tokens)
        want = sum(parts.values())
        got = fn(_unet(name), rank, id_dim, tokens)
        expect(isinstance(got, int) and not isinstance(got, bool) or (hasattr(got, "item") and float(got).is_integer()),
               tr(f"return a whole number of parameters, got {got!r}", f"应返回参数个数（整数），实际得到 {got!r}"))
        got = int(got)
        for part, (en, zh) in {"lora_self": ("the LoRA of the self-attention layers (attn1): they train now",
                                             "自注意力层（attn1）的 LoRA：它们现在也要训练"),
                               "lora_cross": ("the LoRA of the cross-attention layers (attn2)", "交叉注意力层（attn2）的 LoRA"),
                               "ip_branch": ("to_k_ip / to_v_ip of every cross-attention layer",
                                             "每个交叉注意力层的 to_k_ip / to_v_ip"),
                               "projection": ("the projection (MLPProjModel: id -> 2 id -> tokens x dim, LayerNorm)",
                                              "投影（MLPProjModel：id -> 2 id -> tokens x dim，LayerNorm）")}.items():
            expect(got != want - parts[part], tr(f"for {what} you count {got:,}: {want - got:,} short, exactly {en}",
                                                 f"对于{what}，你数出 {got:,}：少了 {want - got:,}，正好是{zh}"))
        expect(got == want, tr(f"for {what} expected {want:,} trainable parameters, got {got:,} (projection "
                               f"{parts['projection']:,}, to_k_ip/to_v_ip {parts['ip_branch']:,}, LoRA in attn1 "
                               f"{parts['lora_self']:,}, LoRA in attn2 {parts['lora_cross']:,})",
                               f"对于{what}，应有 {want:,} 个可训练参数，你得到 {got:,}（投影 {parts['projection']:,}，"
                               f"to_k_ip/to_v_ip {parts['ip_branch']:,}，attn1 的 LoRA {parts['lora_self']:,}，"
                               f"attn2 的 LoRA {parts['lora_cross']:,}）"))
    return tr("projection + image branch + a LoRA of rank r on q, k, v and out of every attention layer: "
              "the self-attention processors are no longer empty.",
              "投影 + 图像分支 + 每个注意力层 q、k、v、out 上秩为 r 的 LoRA：自注意力处理器不再是空的。")
