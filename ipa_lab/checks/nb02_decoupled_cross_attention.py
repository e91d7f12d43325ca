"""Notebook 02, decoupled cross-attention: a second key/value branch for the image.

Which width each attention layer of the UNet has, and the two-softmax attention IP-Adapter adds.
"""
from __future__ import annotations

import copy
import functools
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from .core import (CheckFailed, LearnerRaised, builds, checker, expect, expect_close, expect_shape, first_line,
                   learner_code, toy_pipeline, tr, zh_word)


@checker
def hidden_size_of(fn) -> str:
    """fn(processor_name, block_out_channels) -> the width of that attention layer.

    中文：fn(processor_name, block_out_channels) -> 该注意力层的宽度。"""
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
        where = tr(f"{name!r} with block_out_channels {widths}", f"{name!r}（block_out_channels 为 {widths}）")
        # numbers.Integral: an int, and numpy's integers too (np.int64 from an array of widths)
        expect(isinstance(got, numbers.Integral) and not isinstance(got, bool),
               tr(f"return an int, got {type(got).__name__} {got!r} for {where}",
                  f"应返回 int，但对 {where} 得到的是 {type(got).__name__} {got!r}"))
        if name.startswith("up_blocks") and got != want and got == widths[int(name.split(".")[1])]:
            raise CheckFailed(tr(f"{where}: got {got}, expected {want}. The up path mirrors the down path: "
                                 "up_blocks.0 is the deepest, so index block_out_channels reversed",
                                 f"{where}：得到 {got}，应为 {want}。上采样路径与下采样路径镜像对称："
                                 "up_blocks.0 是最深的一层，所以要按反转后的 block_out_channels 取下标"))
        if name.startswith("mid_block"):
            expect(got == want, tr(f"{where}: got {got}, expected {want}. The mid block sits at the bottom of the U "
                                   "and runs at the deepest width, block_out_channels[-1]",
                                   f"{where}：得到 {got}，应为 {want}。中间块位于 U 形的底部，"
                                   "宽度是最深处的 block_out_channels[-1]"))
        expect(got == want, tr(f"{where}: got {got}, expected {want}", f"{where}：得到 {got}，应为 {want}"))
    return tr("down_blocks.i -> block_out_channels[i], up_blocks.i -> reversed(...)[i], mid_block -> block_out_channels[-1].",
              "down_blocks.i 的宽度是 block_out_channels[i]，up_blocks.i 是 reversed(...)[i]，"
              "mid_block 是 block_out_channels[-1]。")


def _softmax_attention(q, k, v, scaled: bool = True, dim: int = -1):
    """softmax(q k^T / sqrt(d)) v, with the mistakes as options: no 1/sqrt(d), softmax over `dim`."""
    scores = q @ k.transpose(-2, -1)
    if scaled:
        scores = scores / q.shape[-1] ** 0.5
    return torch.softmax(scores, dim=dim) @ v


def _expect_softmax_over_keys(got, q, k, v, k_ip, v_ip, scale: float, what: str) -> None:
    """Name a softmax over dim -2 (the queries) in either branch or both."""
    for text_dim, image_dim in [(-2, -2), (-2, -1), (-1, -2)]:
        wrong = (_softmax_attention(q, k, v, dim=text_dim)
                 + scale * _softmax_attention(q, k_ip, v_ip, dim=image_dim))
        expect(not torch.allclose(got, wrong, atol=1e-5),
               tr(f"{what}: the softmax runs over dim=-2, the queries; "
                  "each query's weights over the keys must sum to 1, so softmax over the last dimension of "
                  "q @ k^T (dim=-1)",
                  f"{what}：softmax 是沿 dim=-2（查询）做的；每个查询在所有键上的权重之和必须为 1，"
                  "所以要沿 q @ k^T 的最后一维（dim=-1）做 softmax"))


@checker
def decoupled_attention(fn) -> str:
    """fn(q, k, v, k_ip, v_ip, scale) -> Attn(q, k, v) + scale * Attn(q, k_ip, v_ip), multi-head tensors.

    中文：fn(q, k, v, k_ip, v_ip, scale) -> Attn(q, k, v) + scale * Attn(q, k_ip, v_ip)，输入为多头张量。"""
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
        what = tr(f"Z with scale={scale}", f"scale={scale} 时的 Z")
        expect_shape(got, want.shape, what)
        if torch.allclose(got, want, atol=1e-5):
            continue
        joint = _softmax_attention(q, torch.cat([k, k_ip], -2), torch.cat([v, v_ip], -2))
        expect(not torch.allclose(got, joint, atol=1e-5),
               tr(f"{what}: you ran one softmax over the concatenated "
                  "[text; image] keys. That is plain cross-attention on more tokens; decoupled cross-attention "
                  "runs two softmaxes, one per branch, and adds the results",
                  f"{what}：你对拼接后的 [文本; 图像] 键只做了一次 softmax。这只是在更多 token 上做普通的交叉注意力；"
                  "解耦交叉注意力做两次 softmax，每个分支一次，再把结果相加"))
        expect(not torch.allclose(got, scale * text + image, atol=1e-5),
               tr(f"{what}: the scale multiplies the text "
                  "branch; it belongs on the image branch: Attn(q, k, v) + scale * Attn(q, k_ip, v_ip)",
                  f"{what}：scale 乘在了文本分支上；它应该乘在图像分支上：Attn(q, k, v) + scale * Attn(q, k_ip, v_ip)"))
        expect(not torch.allclose(got, text + image, atol=1e-5),
               tr(f"{what}: the scale is ignored; multiply the image branch by it",
                  f"{what}：忽略了 scale；请用它乘图像分支"))
        unscaled = _softmax_attention(q, k, v, False) + scale * _softmax_attention(q, k_ip, v_ip, False)
        expect(not torch.allclose(got, unscaled, atol=1e-5),
               tr(f"{what}: the scores lack the 1/sqrt(head_dim) "
                  "factor (q @ k^T / sqrt(d) before the softmax)",
                  f"{what}：注意力分数缺少 1/sqrt(head_dim) 因子（softmax 之前应为 q @ k^T / sqrt(d)）"))
        # k_ip * scale (or q * scale) in the image branch: the weights still sum to 1, only sharper or flatter
        on_keys = text + _softmax_attention(q, k_ip * scale, v_ip)
        expect(not torch.allclose(got, on_keys, atol=1e-5),
               tr(f"{what}: the scale multiplies the image keys "
                  "(k_ip * scale). Inside the softmax it only flattens the image weights, which still sum to 1, so "
                  "scale=0 would not switch the image off; multiply the image branch's output: "
                  "Attn(q, k, v) + scale * Attn(q, k_ip, v_ip)",
                  f"{what}：scale 乘在了图像的键上（k_ip * scale）。在 softmax 里面它只会让图像权重更平坦，"
                  "权重之和仍为 1，所以 scale=0 关不掉图像；请乘图像分支的输出："
                  "Attn(q, k, v) + scale * Attn(q, k_ip, v_ip)"))
        _expect_softmax_over_keys(got, q, k, v, k_ip, v_ip, scale, what)
        expect_close(got, want, what)
    return tr("two softmaxes with one query, the image branch weighted by scale; scale=0 leaves the text branch alone.",
              "同一个查询做两次 softmax，图像分支乘以 scale；scale=0 时只剩文本分支。")


# ---------------------------------------------------------------------------------------------
# IPAttnProcessor: the decoupled cross-attention as a processor of a diffusers Attention layer.
# ---------------------------------------------------------------------------------------------
_PROCESSOR_ARGS = "__init__(self, hidden_size, cross_attention_dim=None, scale=1.0, num_tokens=4)"
_FORWARD_ARGS = "forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None)"


def _attention_layer(hidden: int, cross: int, heads: int, seed: int):
    """A diffusers cross-attention layer as the UNet's transformer blocks have them (to_out keeps its bias)."""
    from diffusers.models.attention_processor import Attention

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Attention(query_dim=hidden, cross_attention_dim=cross, heads=heads, dim_head=hidden // heads).eval()


def _build_processor(cls, hidden: int, cross: int, scale: float, num_tokens: int):
    """The learner's processor, built as install_ip_adapter builds it."""
    call = f"IPAttnProcessor({hidden}, {cross}, scale={scale}, num_tokens={num_tokens})"
    with torch.random.fork_rng():
        try:
            processor = cls(hidden, cross, scale=scale, num_tokens=num_tokens)
        except LearnerRaised as e:
            if isinstance(e.error, TypeError) and "argument" in str(e.error):
                raise CheckFailed(tr(f"{call} raised {first_line(e.error)}: keep the signature {_PROCESSOR_ARGS}",
                                     f"{call} 抛出了 {first_line(e.error)}：请保持签名 {_PROCESSOR_ARGS}")) from None
            raise
    expect(isinstance(processor, nn.Module),
           tr(f"{call} gave {type(processor).__name__}, not an nn.Module: subclass "
              "nn.Module, so nn.ModuleList can hold the processors and the optimizer finds to_k_ip/to_v_ip",
              f"{call} 得到的是 {type(processor).__name__}，不是 nn.Module：请继承 nn.Module，"
              "这样 nn.ModuleList 才能装下这些处理器，优化器也才能找到 to_k_ip/to_v_ip"))
    return processor


def _check_branch_layers(processor: nn.Module, hidden: int, cross: int, scale: float, num_tokens: int) -> None:
    """Exactly to_k_ip.weight and to_v_ip.weight, (hidden_size, cross_attention_dim), and the two attributes."""
    got = {name: tuple(p.shape) for name, p in processor.named_parameters()}
    want = {"to_k_ip.weight": (hidden, cross), "to_v_ip.weight": (hidden, cross)}
    extra = [n for n in got if n not in want]
    expect(not (extra and all(n.endswith(".bias") for n in extra) and set(want) <= set(got)),
           tr(f"your processor has {', '.join(extra)}: to_k_ip and to_v_ip have no bias, nn.Linear(..., bias=False), "
              "like the layer's to_k/to_v (the original's checkpoints hold weights only)",
              f"你的处理器有 {', '.join(extra)}：to_k_ip 和 to_v_ip 没有偏置，即 nn.Linear(..., bias=False)，"
              "与该层的 to_k/to_v 一样（原版的检查点只存权重）"))
    expect(set(want) <= set(got),
           tr(f"your processor's parameters are {', '.join(got) or 'none'}; expected "
              "to_k_ip.weight and to_v_ip.weight: name the layers self.to_k_ip and self.to_v_ip, the names in "
              "checkpoints of the original (1.to_k_ip.weight, ...)",
              f"你的处理器的参数是 {', '.join(got) or '（无）'}；应为 to_k_ip.weight 和 to_v_ip.weight："
              "把两层命名为 self.to_k_ip 和 self.to_v_ip，即原版检查点里的名字（1.to_k_ip.weight, ...）"))
    expect(not extra, tr(f"your processor has parameters besides to_k_ip/to_v_ip: {', '.join(extra)}. It adds only "
                         "those two; to_q, to_k, to_v and to_out belong to the layer (attn) and stay frozen",
                         f"你的处理器除了 to_k_ip/to_v_ip 还有别的参数：{', '.join(extra)}。它只新增这两个；"
                         "to_q、to_k、to_v 和 to_out 属于该层（attn），保持冻结"))
    for name, shape in want.items():
        expect(got[name] != shape[::-1] or hidden == cross,
               tr(f"{name} has shape {got[name]}, expected {shape}: "
                  "nn.Linear(cross_attention_dim, hidden_size): it reads the image tokens, it writes the layer's width",
                  f"{name} 的形状是 {got[name]}，应为 {shape}：nn.Linear(cross_attention_dim, hidden_size)："
                  "它读入图像 token，输出该层的宽度"))
        expect(got[name] == shape, tr(f"with hidden_size={hidden} and cross_attention_dim={cross}, {name} has shape "
                                      f"{got[name]}, expected {shape}",
                                      f"当 hidden_size={hidden}、cross_attention_dim={cross} 时，{name} 的形状是 "
                                      f"{got[name]}，应为 {shape}"))
    for attribute, value in (("scale", scale), ("num_tokens", num_tokens)):
        expect(getattr(processor, attribute, None) == value,
               tr(f"keep {attribute} as an attribute, self.{attribute} = "
                  f"{attribute} (got {getattr(processor, attribute, 'nothing')!r}, expected {value!r}): "
                  "set_scale and the checkpoint tools read processor.scale and processor.num_tokens",
                  f"请把 {attribute} 存为属性，self.{attribute} = {attribute}"
                  + (f"（得到 {getattr(processor, attribute)!r}，应为 {value!r}）：" if hasattr(processor, attribute)
                     else f"（现在没有这个属性，应为 {value!r}）：") +
                  "set_scale 和检查点工具会读取 processor.scale 和 processor.num_tokens"))


def _image_weights(hidden: int, cross: int, seed: int) -> dict:
    """Random to_k_ip/to_v_ip weights, not copies of to_k/to_v, so swapped branches show; large enough
    that the softmax is far from uniform."""
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(hidden, cross, generator=gen) * (2.0 / cross ** 0.5) for name in ("to_k_ip", "to_v_ip")}


def _heads_attention(q, k, v, heads: int):
    """Multi-head attention on (batch, n, heads * d) tensors; `heads=1` is the forgot-to-split mistake."""
    def split(x):
        return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)


def _processor_mistakes(attn, weights: dict, hidden_states, states, scale: float, num_tokens: int) -> dict:
    """What the plausible wrong processors return, each next to the message that names the mistake."""
    def k_ip(x):
        return x @ weights["to_k_ip"].T

    def v_ip(x):
        return x @ weights["to_v_ip"].T

    end = states.shape[1] - num_tokens
    text, image = states[:, :end], states[:, end:]
    q = attn.to_q(hidden_states)

    def branch(tokens, to_k, to_v, heads=attn.heads):
        return _heads_attention(q, to_k(tokens), to_v(tokens), heads)

    def out(x):
        return attn.to_out[1](attn.to_out[0](x))

    t, i = branch(text, attn.to_k, attn.to_v), branch(image, k_ip, v_ip)
    four = states.shape[1] - 4
    mistakes = {
        tr("the text keys include the image tokens: cut encoder_hidden_states at L - num_tokens and give only the "
           "text part to to_k/to_v",
           "文本的键里混进了图像 token：在 L - num_tokens 处切开 encoder_hidden_states，"
           "只把文本部分交给 to_k/to_v"): out(branch(states, attn.to_k, attn.to_v) + scale * i),
        tr("you took the image tokens from the front: they come last, [text; image], so the image is "
           "encoder_hidden_states[:, -num_tokens:]",
           "你从开头取了图像 token：它们在最后，[文本; 图像]，所以图像部分是 "
           "encoder_hidden_states[:, -num_tokens:]"): out(branch(states[:, num_tokens:], attn.to_k, attn.to_v)
                                                          + scale * branch(states[:, :num_tokens], k_ip, v_ip)),
        tr("the branches are swapped: the text goes through the layer's to_k/to_v, the image tokens through "
           "to_k_ip/to_v_ip",
           "两个分支接反了：文本走该层的 to_k/to_v，图像 token 走 to_k_ip/to_v_ip"):
            out(branch(text, k_ip, v_ip) + scale * branch(image, attn.to_k, attn.to_v)),
        tr("you ran one softmax over the concatenated [text; image] keys; decoupled cross-attention runs two, "
           "one per branch, and adds them",
           "你对拼接后的 [文本; 图像] 键只做了一次 softmax；解耦交叉注意力做两次，每个分支一次，再相加"):
            out(_heads_attention(q, torch.cat([attn.to_k(text), k_ip(image)], 1),
                                 torch.cat([attn.to_v(text), v_ip(image)], 1), attn.heads)),
        tr("attn.to_out is not applied: end with attn.to_out[0] (the output projection) and attn.to_out[1] "
           "(dropout)",
           "没有应用 attn.to_out：最后要经过 attn.to_out[0]（输出投影）和 attn.to_out[1]（dropout）"): t + scale * i,
        tr("the heads are not split: attention runs per head, split_heads(x, attn.heads) before it and "
           "merge_heads after",
           "没有拆分注意力头：注意力按头计算，之前先 split_heads(x, attn.heads)，之后再 merge_heads"):
            out(branch(text, attn.to_k, attn.to_v, 1) + scale * branch(image, k_ip, v_ip, 1)),
        tr("the scale multiplies the text branch; it belongs on the image branch: text + scale * image",
           "scale 乘在了文本分支上；它应该乘在图像分支上：text + scale * image"): out(scale * t + i),
        tr("the scale is ignored: multiply the image branch by self.scale",
           "忽略了 scale：请用 self.scale 乘图像分支"): out(t + i),
    }
    if num_tokens != 4:
        mistakes[tr(f"with num_tokens={num_tokens} you took the last 4 tokens as the image: use self.num_tokens, "
                    "not 4",
                    f"当 num_tokens={num_tokens} 时，你把最后 4 个 token 当成了图像：请用 self.num_tokens，"
                    "而不是 4")] = out(branch(states[:, :four], attn.to_k, attn.to_v)
                                      + scale * branch(states[:, four:], k_ip, v_ip))
    return mistakes


def _run_layer(attn, processor, hidden_states, states, learner=None):
    """attn(hidden_states, encoder_hidden_states=states) with `processor` set, as the UNet calls it.

    `learner`: the LearnerFunction around the learner's class, when `processor` is theirs."""
    attn.set_processor(processor)
    if learner is None:
        return attn(hidden_states, encoder_hidden_states=states)
    try:
        return learner_code(attn, owner=learner)(hidden_states, encoder_hidden_states=states)
    except LearnerRaised as e:
        if isinstance(e.error, TypeError) and "argument" in str(e.error):
            raise CheckFailed(tr(f"your processor raised {first_line(e.error)}. diffusers calls it as "
                                 "processor(attn, hidden_states, encoder_hidden_states=..., attention_mask=...): keep "
                                 f"the signature {_FORWARD_ARGS}",
                                 f"你的处理器抛出了 {first_line(e.error)}。diffusers 以 "
                                 "processor(attn, hidden_states, encoder_hidden_states=..., attention_mask=...) "
                                 f"的方式调用它：请保持签名 {_FORWARD_ARGS}")) from None
        raise


def _compare_processor(got, want, mistakes: dict, what: str) -> None:
    """Equal to the reference, or the first mistake that explains the difference, or the difference."""
    expect(isinstance(got, torch.Tensor), tr(f"{what}: the processor returned {type(got).__name__}, expected a tensor",
                                             f"{what}：处理器返回了 {type(got).__name__}，应返回张量"))
    expect_shape(got, want.shape, what)
    expect(got.dtype == want.dtype, tr(f"{what} has dtype {got.dtype}, expected {want.dtype}, the input's",
                                       f"{zh_word(what)}的 dtype 是 {got.dtype}，应为输入的 dtype {want.dtype}"))
    if torch.allclose(got, want, atol=1e-5):
        return
    for message, wrong in mistakes.items():
        expect(wrong.shape != got.shape or not torch.allclose(got, wrong, atol=1e-5),
               tr(f"{what}: {message}", f"{what}：{message}"))
    expect_close(got, want, what)


def _reference(weights: dict, hidden: int, cross: int, scale: float, num_tokens: int):
    """ipa_lab's IPAttnProcessor with the given to_k_ip/to_v_ip weights."""
    from ..attention import IPAttnProcessor

    with torch.random.fork_rng():  # its random init must not move the notebook's seed
        reference = IPAttnProcessor(hidden, cross, scale=scale, num_tokens=num_tokens)
    with torch.no_grad():
        for name, w in weights.items():
            getattr(reference, name).weight.copy_(w)
    return reference


def _learner_processor(cls, weights: dict, hidden: int, cross: int, scale: float, num_tokens: int):
    """The learner's processor, its layers checked, then given the same weights as the reference."""
    processor = _build_processor(cls, hidden, cross, scale, num_tokens)
    _check_branch_layers(processor, hidden, cross, scale, num_tokens)
    with torch.no_grad():
        for name, w in weights.items():
            getattr(processor, name).weight.copy_(w)
    return processor


# (hidden_size, cross_attention_dim, heads, num_tokens, scales): the first scale is given to the
# constructor, the others are set afterwards (processor.scale = ...), as set_scale does.
_PROCESSOR_CASES = [(48, 32, 3, 4, (0.5, 1.0, 0.0)), (64, 40, 4, 6, (1.0, 0.5))]


@builds("attention.IPAttnProcessor")
def ip_attn_processor(cls) -> str:
    """cls(hidden_size, cross_attention_dim, scale=1.0, num_tokens=4): a processor for diffusers' Attention.

    中文：cls(hidden_size, cross_attention_dim, scale=1.0, num_tokens=4)：diffusers Attention 层的注意力处理器。

    Its forward(attn, hidden_states, encoder_hidden_states, ...) computes decoupled cross-attention
    on [text; image] tokens with the layer's to_q/to_k/to_v/to_out and its own to_k_ip/to_v_ip."""
    for seed, (hidden, cross, heads, num_tokens, scales) in enumerate(_PROCESSOR_CASES):
        attn = _attention_layer(hidden, cross, heads, seed)
        weights = _image_weights(hidden, cross, seed)
        gen = torch.Generator().manual_seed(seed)
        hidden_states = torch.randn(2, 16, hidden, generator=gen) * 2
        states = torch.randn(2, 7 + num_tokens, cross, generator=gen) * 2
        processor = _learner_processor(cls, weights, hidden, cross, scales[0], num_tokens)
        previous = None
        for scale in scales:
            processor.scale = scale  # a no-op for the first scale, which the constructor got
            with torch.no_grad():
                want = _run_layer(attn, _reference(weights, hidden, cross, scale, num_tokens), hidden_states, states)
                mistakes = _processor_mistakes(attn, weights, hidden_states, states, scale, num_tokens)
                if previous is not None:  # what a scale fixed at construction gives
                    mistakes = {tr(f"setting processor.scale = {scale} after building it changed nothing: read "
                                   "self.scale in forward (set_scale changes it on installed processors)",
                                   f"构建之后设置 processor.scale = {scale} 没有任何效果：请在 forward 里读取 "
                                   "self.scale（set_scale 改的正是已安装处理器的这个属性）"): previous,
                                **mistakes}
            got = _run_layer(attn, processor, hidden_states, states, learner=cls)
            _compare_processor(got, want, mistakes,
                               tr(f"the layer's output (hidden_size {hidden}, {heads} heads, "
                                  f"num_tokens={num_tokens}, scale={scale})",
                                  f"该层的输出（hidden_size {hidden}，{heads} 个头，"
                                  f"num_tokens={num_tokens}，scale={scale}）"))
            previous = want
    return tr("text through the layer's to_k/to_v, the last num_tokens tokens through to_k_ip/to_v_ip, two softmaxes "
              "added with the image branch times scale, then to_out; equal to ipa_lab's IPAttnProcessor in a diffusers "
              "Attention layer.",
              "文本走该层的 to_k/to_v，最后 num_tokens 个 token 走 to_k_ip/to_v_ip，两次 softmax 的结果相加"
              "（图像分支乘以 scale），再经过 to_out；在 diffusers 的 Attention 层中与 ipa_lab 的 IPAttnProcessor 一致。")


# ---------------------------------------------------------------------------------------------
# install_ip_adapter: every processor of the toy UNet replaced, the image branch on attn2 only.
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _install_case():
    """Fixed UNet inputs and the outputs to compare with: the plain UNet on the text alone, and the
    UNet with ipa_lab's adapter on [text; 4 image tokens]. Computed once: the toy UNet is shared."""
    from ..adapter import install_ip_adapter as reference_install

    unet = toy_pipeline().unet
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, unet.config.in_channels, 8, 8, generator=gen)
    text = torch.randn(1, 8, unet.config.cross_attention_dim, generator=gen)
    image = torch.randn(1, 4, unet.config.cross_attention_dim, generator=gen) * 2
    states = torch.cat([text, image], dim=1)
    timestep = torch.tensor([500])
    installed = copy.deepcopy(unet)  # never install into the shared UNet
    reference_install(installed)
    with torch.no_grad():
        plain = unet(latents, timestep, text).sample
        with_adapter = installed(latents, timestep, states).sample
    return latents, timestep, states, plain, with_adapter


def _layer_at_crash(error: BaseException, names) -> str | None:
    """The processor name the learner's loop was at when it raised, read from the traceback's
    local variables (`name`, `layer`, ...); None when no frame holds one."""
    found, tb = None, error.__traceback__
    while tb is not None:
        for value in tb.tb_frame.f_locals.values():
            if isinstance(value, str) and (value in names or value + ".processor" in names):
                found = value.removesuffix(".processor")
        tb = tb.tb_next
    return found


def _explain_crash(e: LearnerRaised, unet) -> CheckFailed | None:
    """A shape error in the learner's loop, explained with the layer it happened at (None: no such)."""
    from ..adapter import hidden_size_of as width_of

    text = str(e.error)
    detail = next((line.strip() for line in text.splitlines() if "size mismatch" in line or "must match" in line), None)
    if detail is None:
        return None
    shown = "" if detail in text.splitlines()[0] else tr(f" ({detail})", f"（{detail}）")
    said = tr(f"your code raised {first_line(e.error)}", f"你的代码抛出了 {first_line(e.error)}") + shown
    layer = _layer_at_crash(e.error, unet.attn_processors)
    if layer is None:
        return CheckFailed(tr(f"{said}: a processor's to_k_ip/to_v_ip were built with another width than the layer's "
                              "to_k/to_v. attn1 layers take AttnProcessor(); for attn2 check the widths (the up path "
                              "runs block_out_channels in reverse)",
                              f"{said}：某个处理器的 to_k_ip/to_v_ip 的宽度与该层的 to_k/to_v 不同。"
                              "attn1 层用 AttnProcessor()；attn2 层请检查宽度（上采样路径按反转的 block_out_channels 排列）"))
    if layer.endswith("attn1"):
        return CheckFailed(tr(f"{said} at {layer}: a self-attention layer (attn1) reads no image tokens, so it gets "
                              "AttnProcessor(), no image branch; build IPAttnProcessor for attn2 layers only",
                              f"{said}，位置在 {layer}：自注意力层（attn1）不读图像 token，所以它用 AttnProcessor()，"
                              "没有图像分支；只为 attn2 层构建 IPAttnProcessor"))
    width = width_of(layer, unet.config)
    block = layer.split(".attentions")[0]
    to_k = tuple(unet.get_submodule(layer).to_k.weight.shape)
    return CheckFailed(tr(f"{said} at {layer}: {block} is {width} wide (its to_k is "
                          f"{to_k}), so build its processor with "
                          f"hidden_size={width}. The up path runs block_out_channels in reverse: up_blocks.0 is the "
                          "deepest",
                          f"{said}，位置在 {layer}：{block} 的宽度是 {width}（它的 to_k 是 {to_k}），"
                          f"所以要用 hidden_size={width} 构建它的处理器。上采样路径按反转的 block_out_channels 排列："
                          "up_blocks.0 是最深的一层"))


def _run_install(fn, unet, num_tokens: int):
    """The learner's install on a private copy of the toy UNet; shape errors explained."""
    from ..adapter import is_ip_processor

    try:
        with torch.random.fork_rng():  # the processors' random init must not move the notebook's seed
            return fn(unet, num_tokens=num_tokens)
    except LearnerRaised as e:
        if isinstance(e.error, TypeError) and "is not a Module subclass" in str(e.error):
            said = tr(f"your code raised {first_line(e.error)}: nn.ModuleList holds nn.Modules only",
                      f"你的代码抛出了 {first_line(e.error)}：nn.ModuleList 只能装 nn.Module")
            expect(any(is_ip_processor(p) for p in unet.attn_processors.values()),
                   tr(f"{said}, and the UNet still "
                      "runs diffusers' own processors (plain classes): call unet.set_attn_processor(processors) "
                      "before reading unet.attn_processors",
                      f"{said}，而 UNet 仍在用 diffusers 自己的处理器（普通类）："
                      "请先调用 unet.set_attn_processor(processors)，再读取 unet.attn_processors"))
            raise CheckFailed(tr(f"{said}, and diffusers' own processors are plain classes; give attn1 layers "
                                 "ipa_lab.attention's AttnProcessor(), an nn.Module with no weights",
                                 f"{said}，而 diffusers 自己的处理器是普通类；请给 attn1 层用 "
                                 "ipa_lab.attention 的 AttnProcessor()，一个没有权重的 nn.Module")) from None
        explained = _explain_crash(e, unet)
        if explained is None:
            raise
        raise explained from None


def _check_returned(returned, unet) -> None:
    """An nn.ModuleList of the processors now in the UNet, in unet.attn_processors order."""
    from ..adapter import is_ip_processor

    installed = list(unet.attn_processors.values())
    expect(returned is not None,
           tr("your function returned None: return nn.ModuleList(unet.attn_processors.values()), "
              "what the optimizer trains and the checkpoint stores",
              "你的函数返回了 None：请返回 nn.ModuleList(unet.attn_processors.values())，"
              "它就是优化器要训练、检查点要保存的部分"))
    expect(isinstance(returned, nn.ModuleList),
           tr(f"return an nn.ModuleList (got {type(returned).__name__}): "
              "nn.ModuleList(unet.attn_processors.values()), so .parameters() reaches every to_k_ip/to_v_ip",
              f"请返回 nn.ModuleList（得到的是 {type(returned).__name__}）："
              "nn.ModuleList(unet.attn_processors.values())，这样 .parameters() 才能覆盖每个 to_k_ip/to_v_ip"))
    if not any(is_ip_processor(p) for p in installed):
        expect(not any(is_ip_processor(m) for m in returned),
               tr("your processors are built but the UNet still runs "
                  "its old ones: call unet.set_attn_processor(processors) with the dict of new processors",
                  "你的处理器已经构建好，但 UNet 仍在用旧的：请用新处理器组成的字典调用 "
                  "unet.set_attn_processor(processors)"))
        raise CheckFailed(tr("the UNet has no processor with to_k_ip/to_v_ip: nothing was installed. Build a dict "
                             "{name: processor} over unet.attn_processors and call unet.set_attn_processor on it",
                             "UNet 里没有带 to_k_ip/to_v_ip 的处理器：什么都没装上。请遍历 unet.attn_processors "
                             "构建字典 {name: processor}，再用它调用 unet.set_attn_processor"))
    expect(len(returned) == len(installed),
           tr(f"your ModuleList holds {len(returned)} modules, expected "
              f"{len(installed)}: one per entry of unet.attn_processors, attn1 ones included, as the original's "
              "checkpoints number them (1.to_k_ip.weight, 3.to_k_ip.weight, ...)",
              f"你的 ModuleList 有 {len(returned)} 个模块，应为 {len(installed)} 个："
              "unet.attn_processors 的每一项一个，attn1 的也算在内，与原版检查点的编号方式一致"
              "（1.to_k_ip.weight, 3.to_k_ip.weight, ...）"))
    ids = [id(m) for m in returned]
    expect(set(ids) == {id(p) for p in installed},
           tr("the modules you return are not the processors installed in the "
              "UNet: return nn.ModuleList(unet.attn_processors.values()) after set_attn_processor",
              "你返回的模块不是装在 UNet 里的处理器：请在 set_attn_processor 之后返回 "
              "nn.ModuleList(unet.attn_processors.values())"))
    expect(ids == [id(p) for p in installed],
           tr("your ModuleList has the processors in another order: follow "
              "unet.attn_processors, so checkpoint keys (1.to_k_ip.weight, ...) mean the same layers as the original's",
              "你的 ModuleList 中处理器的顺序不对：请按 unet.attn_processors 的顺序，"
              "这样检查点的键（1.to_k_ip.weight, ...）才与原版指向同样的层"))


def _check_processors(unet, num_tokens: int) -> None:
    """attn1: no parameters; attn2: to_k_ip/to_v_ip, copies of the layer's to_k/to_v; num_tokens passed on."""
    from ..adapter import is_ip_processor

    for name, processor in unet.attn_processors.items():
        layer_name = name.removesuffix(".processor")
        if layer_name.endswith("attn1"):
            expect(not any(True for _ in processor.parameters()),
                   tr(f"{layer_name} (self-attention) got parameters: "
                      "attn1 layers read no image tokens, give them AttnProcessor() (no weights); the image branch "
                      "goes on attn2 only",
                      f"{layer_name}（自注意力）有了参数：attn1 层不读图像 token，给它们用 AttnProcessor()（没有权重）；"
                      "图像分支只加在 attn2 上"))
            continue
        layer = unet.get_submodule(layer_name)
        expect(is_ip_processor(processor),
               tr(f"{layer_name} runs {type(processor).__name__}, without to_k_ip/to_v_ip: "
                  "every cross-attention layer (attn2) gets an IPAttnProcessor",
                  f"{layer_name} 用的是 {type(processor).__name__}，没有 to_k_ip/to_v_ip："
                  "每个交叉注意力层（attn2）都要用 IPAttnProcessor"))
        for branch, own in (("to_k_ip", "to_k"), ("to_v_ip", "to_v")):
            _check_copy(getattr(processor, branch).weight, getattr(layer, own).weight, layer, layer_name, branch, own)
        built = getattr(processor, "num_tokens", None)
        expect(built == num_tokens,
               tr(f"install_ip_adapter(unet, num_tokens="
                  f"{num_tokens}) built {layer_name}'s processor with num_tokens={built}: "
                  "pass num_tokens on to IPAttnProcessor",
                  f"install_ip_adapter(unet, num_tokens={num_tokens}) 构建 {layer_name} 的处理器时用了 "
                  f"num_tokens={built}：请把 num_tokens 传给 IPAttnProcessor"))


def _check_copy(weight, source, layer, layer_name: str, branch: str, own: str) -> None:
    """`weight` holds the values of the layer's `source` (the paper's initialisation), in its own tensor."""
    expect(tuple(weight.shape) == tuple(source.shape),
           tr(f"{layer_name}: {branch} has shape {tuple(weight.shape)}, but "
              f"the layer's {own} is {tuple(source.shape)} = (hidden_size, cross_attention_dim): check the width you built "
              "it with (the up path runs block_out_channels in reverse)",
              f"{layer_name}：{branch} 的形状是 {tuple(weight.shape)}，而该层的 {own} 是 {tuple(source.shape)} = "
              "(hidden_size, cross_attention_dim)：请检查构建它时用的宽度（上采样路径按反转的 block_out_channels 排列）"))
    expect(weight.data_ptr() != source.data_ptr(),
           tr(f"{layer_name}: {branch} shares its tensor with the layer's "
              f"{own}: training one would change the other, and freezing the UNet freezes both; copy the values "
              "(load_state_dict or .copy_), do not assign the parameter",
              f"{layer_name}：{branch} 与该层的 {own} 共用同一个张量：训练一个会改动另一个，冻结 UNet 也会把两者一起冻结；"
              "请复制数值（load_state_dict 或 .copy_），不要直接赋值参数"))
    other = layer.to_v.weight if own == "to_k" else layer.to_k.weight
    other_name = "to_v" if own == "to_k" else "to_k"
    expect(not (torch.equal(weight, other) and not torch.equal(weight, source)),
           tr(f"{layer_name}: {branch} holds "
              f"the values of the layer's {other_name}; copy {own} into {branch}",
              f"{layer_name}：{branch} 里是该层 {other_name} 的值；应把 {own} 复制进 {branch}"))
    expect(torch.equal(weight, source),
           tr(f"{layer_name}: {branch} was left random: copy the layer's {own} into it "
              "(the paper's initialisation: the image branch starts where the text branch is)",
              f"{layer_name}：{branch} 还是随机初始化的：请把该层的 {own} 复制进去"
              "（论文的初始化方式：图像分支从文本分支的位置出发）"))


def _check_outputs(unet) -> None:
    """Scale 0 gives the plain UNet back; scale 1 gives what ipa_lab's adapter gives."""
    from ..generate import set_scale

    latents, timestep, states, plain, with_adapter = _install_case()
    run = learner_code(unet)
    for scale, want, what in ((0.0, plain, tr("the plain UNet's (no adapter, text alone)",
                                              "应与不带适配器、只有文本的原始 UNet 的输出一致")),
                              (1.0, with_adapter, tr("ipa_lab's install_ip_adapter's",
                                                     "应与 ipa_lab 的 install_ip_adapter 的输出一致"))):
        set_scale(unet, scale)
        with torch.no_grad():
            got = run(latents, timestep, states).sample
        expect_close(got, want, tr(f"at scale {scale}, the UNet's output (expected {what})",
                                   f"scale 为 {scale} 时 UNet 的输出（{what}）"), atol=1e-4)


@builds("adapter.install_ip_adapter")
def install_ip_adapter(fn) -> str:
    """fn(unet, num_tokens=4) -> nn.ModuleList of the UNet's new processors, in unet.attn_processors order.

    中文：fn(unet, num_tokens=4) -> 由 UNet 的新注意力处理器组成的 nn.ModuleList，顺序同 unet.attn_processors。"""
    shared = toy_pipeline().unet
    for num_tokens in (4, 6):
        unet = copy.deepcopy(shared)  # the learner's install changes the UNet: never the shared one
        returned = _run_install(fn, unet, num_tokens)
        _check_returned(returned, unet)
        _check_processors(unet, num_tokens)
        if num_tokens == 4:
            _check_outputs(unet)
    return tr("AttnProcessor on attn1, an image branch on every attn2 with to_k_ip/to_v_ip copied from to_k/to_v, all "
              "set in the UNet and returned in attn_processors order; scale 0 gives the plain UNet back.",
              "attn1 上是 AttnProcessor，每个 attn2 上加了图像分支，其 to_k_ip/to_v_ip 复制自 to_k/to_v；"
              "全部装进 UNet，并按 attn_processors 的顺序返回；scale 为 0 时还原为原始 UNet。")
