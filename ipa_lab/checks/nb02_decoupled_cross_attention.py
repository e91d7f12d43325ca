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
                   learner_code, toy_pipeline)


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
        # numbers.Integral: an int, and numpy's integers too (np.int64 from an array of widths)
        expect(isinstance(got, numbers.Integral) and not isinstance(got, bool),
               f"return an int, got {type(got).__name__} {got!r} for {where}")
        if name.startswith("up_blocks") and got != want and got == widths[int(name.split(".")[1])]:
            raise CheckFailed(f"{where}: got {got}, expected {want}. The up path mirrors the down path: "
                              "up_blocks.0 is the deepest, so index block_out_channels reversed")
        if name.startswith("mid_block"):
            expect(got == want, f"{where}: got {got}, expected {want}. The mid block sits at the bottom of the U "
                   "and runs at the deepest width, block_out_channels[-1]")
        expect(got == want, f"{where}: got {got}, expected {want}")
    return "down_blocks.i -> block_out_channels[i], up_blocks.i -> reversed(...)[i], mid_block -> block_out_channels[-1]."


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
        expect(not torch.allclose(got, wrong, atol=1e-5), f"{what}: the softmax runs over dim=-2, the queries; "
               "each query's weights over the keys must sum to 1, so softmax over the last dimension of "
               "q @ k^T (dim=-1)")


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
        # k_ip * scale (or q * scale) in the image branch: the weights still sum to 1, only sharper or flatter
        on_keys = text + _softmax_attention(q, k_ip * scale, v_ip)
        expect(not torch.allclose(got, on_keys, atol=1e-5), f"{what}: the scale multiplies the image keys "
               "(k_ip * scale). Inside the softmax it only flattens the image weights, which still sum to 1, so "
               "scale=0 would not switch the image off; multiply the image branch's output: "
               "Attn(q, k, v) + scale * Attn(q, k_ip, v_ip)")
        _expect_softmax_over_keys(got, q, k, v, k_ip, v_ip, scale, what)
        expect_close(got, want, what)
    return "two softmaxes with one query, the image branch weighted by scale; scale=0 leaves the text branch alone."


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
                raise CheckFailed(f"{call} raised {first_line(e.error)}: keep the signature {_PROCESSOR_ARGS}") from None
            raise
    expect(isinstance(processor, nn.Module), f"{call} gave {type(processor).__name__}, not an nn.Module: subclass "
           "nn.Module, so nn.ModuleList can hold the processors and the optimizer finds to_k_ip/to_v_ip")
    return processor


def _check_branch_layers(processor: nn.Module, hidden: int, cross: int, scale: float, num_tokens: int) -> None:
    """Exactly to_k_ip.weight and to_v_ip.weight, (hidden_size, cross_attention_dim), and the two attributes."""
    got = {name: tuple(p.shape) for name, p in processor.named_parameters()}
    want = {"to_k_ip.weight": (hidden, cross), "to_v_ip.weight": (hidden, cross)}
    extra = [n for n in got if n not in want]
    expect(not (extra and all(n.endswith(".bias") for n in extra) and set(want) <= set(got)),
           f"your processor has {', '.join(extra)}: to_k_ip and to_v_ip have no bias, nn.Linear(..., bias=False), "
           "like the layer's to_k/to_v (the original's checkpoints hold weights only)")
    expect(set(want) <= set(got), f"your processor's parameters are {', '.join(got) or 'none'}; expected "
           "to_k_ip.weight and to_v_ip.weight: name the layers self.to_k_ip and self.to_v_ip, the names in "
           "checkpoints of the original (1.to_k_ip.weight, ...)")
    expect(not extra, f"your processor has parameters besides to_k_ip/to_v_ip: {', '.join(extra)}. It adds only "
           "those two; to_q, to_k, to_v and to_out belong to the layer (attn) and stay frozen")
    for name, shape in want.items():
        expect(got[name] != shape[::-1] or hidden == cross, f"{name} has shape {got[name]}, expected {shape}: "
               "nn.Linear(cross_attention_dim, hidden_size): it reads the image tokens, it writes the layer's width")
        expect(got[name] == shape, f"with hidden_size={hidden} and cross_attention_dim={cross}, {name} has shape "
               f"{got[name]}, expected {shape}")
    for attribute, value in (("scale", scale), ("num_tokens", num_tokens)):
        expect(getattr(processor, attribute, None) == value, f"keep {attribute} as an attribute, self.{attribute} = "
               f"{attribute} (got {getattr(processor, attribute, 'nothing')!r}, expected {value!r}): "
               "set_scale and the checkpoint tools read processor.scale and processor.num_tokens")


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
        "the text keys include the image tokens: cut encoder_hidden_states at L - num_tokens and give only the "
        "text part to to_k/to_v": out(branch(states, attn.to_k, attn.to_v) + scale * i),
        "you took the image tokens from the front: they come last, [text; image], so the image is "
        "encoder_hidden_states[:, -num_tokens:]": out(branch(states[:, num_tokens:], attn.to_k, attn.to_v)
                                                         + scale * branch(states[:, :num_tokens], k_ip, v_ip)),
        "the branches are swapped: the text goes through the layer's to_k/to_v, the image tokens through "
        "to_k_ip/to_v_ip": out(branch(text, k_ip, v_ip) + scale * branch(image, attn.to_k, attn.to_v)),
        "you ran one softmax over the concatenated [text; image] keys; decoupled cross-attention runs two, "
        "one per branch, and adds them": out(_heads_attention(q, torch.cat([attn.to_k(text), k_ip(image)], 1),
                                                              torch.cat([attn.to_v(text), v_ip(image)], 1), attn.heads)),
        "attn.to_out is not applied: end with attn.to_out[0] (the output projection) and attn.to_out[1] "
        "(dropout)": t + scale * i,
        "the heads are not split: attention runs per head, split_heads(x, attn.heads) before it and "
        "merge_heads after": out(branch(text, attn.to_k, attn.to_v, 1) + scale * branch(image, k_ip, v_ip, 1)),
        "the scale multiplies the text branch; it belongs on the image branch: text + scale * image":
            out(scale * t + i),
        "the scale is ignored: multiply the image branch by self.scale": out(t + i),
    }
    if num_tokens != 4:
        mistakes[f"with num_tokens={num_tokens} you took the last 4 tokens as the image: use self.num_tokens, "
                 "not 4"] = out(branch(states[:, :four], attn.to_k, attn.to_v)
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
            raise CheckFailed(f"your processor raised {first_line(e.error)}. diffusers calls it as "
                              "processor(attn, hidden_states, encoder_hidden_states=..., attention_mask=...): keep "
                              f"the signature {_FORWARD_ARGS}") from None
        raise


def _compare_processor(got, want, mistakes: dict, what: str) -> None:
    """Equal to the reference, or the first mistake that explains the difference, or the difference."""
    expect(isinstance(got, torch.Tensor), f"{what}: the processor returned {type(got).__name__}, expected a tensor")
    expect_shape(got, want.shape, what)
    expect(got.dtype == want.dtype, f"{what} has dtype {got.dtype}, expected {want.dtype}, the input's")
    if torch.allclose(got, want, atol=1e-5):
        return
    for message, wrong in mistakes.items():
        expect(wrong.shape != got.shape or not torch.allclose(got, wrong, atol=1e-5), f"{what}: {message}")
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
                    mistakes = {f"setting processor.scale = {scale} after building it changed nothing: read "
                                "self.scale in forward (set_scale changes it on installed processors)": previous,
                                **mistakes}
            got = _run_layer(attn, processor, hidden_states, states, learner=cls)
            _compare_processor(got, want, mistakes, f"the layer's output (hidden_size {hidden}, {heads} heads, "
                               f"num_tokens={num_tokens}, scale={scale})")
            previous = want
    return ("text through the layer's to_k/to_v, the last num_tokens tokens through to_k_ip/to_v_ip, two softmaxes "
            "added with the image branch times scale, then to_out; equal to ipa_lab's IPAttnProcessor in a diffusers "
            "Attention layer.")


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
    said = f"your code raised {first_line(e.error)}" + ("" if detail in text.splitlines()[0] else f" ({detail})")
    layer = _layer_at_crash(e.error, unet.attn_processors)
    if layer is None:
        return CheckFailed(f"{said}: a processor's to_k_ip/to_v_ip were built with another width than the layer's "
                           "to_k/to_v. attn1 layers take AttnProcessor(); for attn2 check the widths (the up path "
                           "runs block_out_channels in reverse)")
    if layer.endswith("attn1"):
        return CheckFailed(f"{said} at {layer}: a self-attention layer (attn1) reads no image tokens, so it gets "
                           "AttnProcessor(), no image branch; build IPAttnProcessor for attn2 layers only")
    width = width_of(layer, unet.config)
    block = layer.split(".attentions")[0]
    return CheckFailed(f"{said} at {layer}: {block} is {width} wide (its to_k is "
                       f"{tuple(unet.get_submodule(layer).to_k.weight.shape)}), so build its processor with "
                       f"hidden_size={width}. The up path runs block_out_channels in reverse: up_blocks.0 is the "
                       "deepest")


def _run_install(fn, unet, num_tokens: int):
    """The learner's install on a private copy of the toy UNet; shape errors explained."""
    from ..adapter import is_ip_processor

    try:
        with torch.random.fork_rng():  # the processors' random init must not move the notebook's seed
            return fn(unet, num_tokens=num_tokens)
    except LearnerRaised as e:
        if isinstance(e.error, TypeError) and "is not a Module subclass" in str(e.error):
            said = f"your code raised {first_line(e.error)}: nn.ModuleList holds nn.Modules only"
            expect(any(is_ip_processor(p) for p in unet.attn_processors.values()), f"{said}, and the UNet still "
                   "runs diffusers' own processors (plain classes): call unet.set_attn_processor(processors) "
                   "before reading unet.attn_processors")
            raise CheckFailed(f"{said}, and diffusers' own processors are plain classes; give attn1 layers "
                              "ipa_lab.attention's AttnProcessor(), an nn.Module with no weights") from None
        explained = _explain_crash(e, unet)
        if explained is None:
            raise
        raise explained from None


def _check_returned(returned, unet) -> None:
    """An nn.ModuleList of the processors now in the UNet, in unet.attn_processors order."""
    from ..adapter import is_ip_processor

    installed = list(unet.attn_processors.values())
    expect(returned is not None, "your function returned None: return nn.ModuleList(unet.attn_processors.values()), "
           "what the optimizer trains and the checkpoint stores")
    expect(isinstance(returned, nn.ModuleList), f"return an nn.ModuleList (got {type(returned).__name__}): "
           "nn.ModuleList(unet.attn_processors.values()), so .parameters() reaches every to_k_ip/to_v_ip")
    if not any(is_ip_processor(p) for p in installed):
        expect(not any(is_ip_processor(m) for m in returned), "your processors are built but the UNet still runs "
               "its old ones: call unet.set_attn_processor(processors) with the dict of new processors")
        raise CheckFailed("the UNet has no processor with to_k_ip/to_v_ip: nothing was installed. Build a dict "
                          "{name: processor} over unet.attn_processors and call unet.set_attn_processor on it")
    expect(len(returned) == len(installed), f"your ModuleList holds {len(returned)} modules, expected "
           f"{len(installed)}: one per entry of unet.attn_processors, attn1 ones included, as the original's "
           "checkpoints number them (1.to_k_ip.weight, 3.to_k_ip.weight, ...)")
    ids = [id(m) for m in returned]
    expect(set(ids) == {id(p) for p in installed}, "the modules you return are not the processors installed in the "
           "UNet: return nn.ModuleList(unet.attn_processors.values()) after set_attn_processor")
    expect(ids == [id(p) for p in installed], "your ModuleList has the processors in another order: follow "
           "unet.attn_processors, so checkpoint keys (1.to_k_ip.weight, ...) mean the same layers as the original's")


def _check_processors(unet, num_tokens: int) -> None:
    """attn1: no parameters; attn2: to_k_ip/to_v_ip, copies of the layer's to_k/to_v; num_tokens passed on."""
    from ..adapter import is_ip_processor

    for name, processor in unet.attn_processors.items():
        layer_name = name.removesuffix(".processor")
        if layer_name.endswith("attn1"):
            expect(not any(True for _ in processor.parameters()), f"{layer_name} (self-attention) got parameters: "
                   "attn1 layers read no image tokens, give them AttnProcessor() (no weights); the image branch "
                   "goes on attn2 only")
            continue
        layer = unet.get_submodule(layer_name)
        expect(is_ip_processor(processor), f"{layer_name} runs {type(processor).__name__}, without to_k_ip/to_v_ip: "
               "every cross-attention layer (attn2) gets an IPAttnProcessor")
        for branch, own in (("to_k_ip", "to_k"), ("to_v_ip", "to_v")):
            _check_copy(getattr(processor, branch).weight, getattr(layer, own).weight, layer, layer_name, branch, own)
        expect(getattr(processor, "num_tokens", None) == num_tokens, f"install_ip_adapter(unet, num_tokens="
               f"{num_tokens}) built {layer_name}'s processor with num_tokens={getattr(processor, 'num_tokens', None)}: "
               "pass num_tokens on to IPAttnProcessor")


def _check_copy(weight, source, layer, layer_name: str, branch: str, own: str) -> None:
    """`weight` holds the values of the layer's `source` (the paper's initialisation), in its own tensor."""
    expect(tuple(weight.shape) == tuple(source.shape), f"{layer_name}: {branch} has shape {tuple(weight.shape)}, but "
           f"the layer's {own} is {tuple(source.shape)} = (hidden_size, cross_attention_dim): check the width you built "
           "it with (the up path runs block_out_channels in reverse)")
    expect(weight.data_ptr() != source.data_ptr(), f"{layer_name}: {branch} shares its tensor with the layer's "
           f"{own}: training one would change the other, and freezing the UNet freezes both; copy the values "
           "(load_state_dict or .copy_), do not assign the parameter")
    other = layer.to_v.weight if own == "to_k" else layer.to_k.weight
    expect(not (torch.equal(weight, other) and not torch.equal(weight, source)), f"{layer_name}: {branch} holds "
           f"the values of the layer's {'to_v' if own == 'to_k' else 'to_k'}; copy {own} into {branch}")
    expect(torch.equal(weight, source), f"{layer_name}: {branch} was left random: copy the layer's {own} into it "
           "(the paper's initialisation: the image branch starts where the text branch is)")


def _check_outputs(unet) -> None:
    """Scale 0 gives the plain UNet back; scale 1 gives what ipa_lab's adapter gives."""
    from ..generate import set_scale

    latents, timestep, states, plain, with_adapter = _install_case()
    run = learner_code(unet)
    for scale, want, what in ((0.0, plain, "the plain UNet's (no adapter, text alone)"),
                              (1.0, with_adapter, "ipa_lab's install_ip_adapter's")):
        set_scale(unet, scale)
        with torch.no_grad():
            got = run(latents, timestep, states).sample
        expect_close(got, want, f"at scale {scale}, the UNet's output (expected {what})", atol=1e-4)


@builds("adapter.install_ip_adapter")
def install_ip_adapter(fn) -> str:
    """fn(unet, num_tokens=4) -> nn.ModuleList of the UNet's new processors, in unet.attn_processors order."""
    shared = toy_pipeline().unet
    for num_tokens in (4, 6):
        unet = copy.deepcopy(shared)  # the learner's install changes the UNet: never the shared one
        returned = _run_install(fn, unet, num_tokens)
        _check_returned(returned, unet)
        _check_processors(unet, num_tokens)
        if num_tokens == 4:
            _check_outputs(unet)
    return ("AttnProcessor on attn1, an image branch on every attn2 with to_k_ip/to_v_ip copied from to_k/to_v, all "
            "set in the UNet and returned in attn_processors order; scale 0 gives the plain UNet back.")
