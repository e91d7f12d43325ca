"""Attention processors: the code a diffusers `Attention` layer runs when it is called.

A diffusers `Attention` layer owns the weights (to_q, to_k, to_v, to_out and optional norms) but
delegates the computation to a *processor*: `attn(hidden_states, encoder_hidden_states)` calls
`attn.processor(attn, hidden_states, encoder_hidden_states, ...)`. IP-Adapter changes the
UNet's behaviour by swapping processors, without touching any of the layer's weights:

* `AttnProcessor`: ordinary attention, softmax(Q K^T / sqrt(d)) V. Used for self-attention.
* `IPAttnProcessor`: decoupled cross-attention (the paper's eq. 5). The encoder states arrive
  as [text tokens; image tokens]; the text goes through the layer's frozen to_k/to_v, the image
  tokens through two new trainable layers to_k_ip/to_v_ip, and the two results are added:

      Z = Attn(Q, K_text, V_text) + scale * Attn(Q, K_ip, V_ip)

* `record_image_attention`: a context manager that records, in every `IPAttnProcessor`, where
  the image tokens are read (the image branch's softmax, averaged over the heads).
* `ConcatAttnProcessor`: the ablation the paper compares against (its "simple adapter"): the
  image tokens read by the layer's own to_k/to_v in the same softmax as the text.

Both processors are `nn.Module`s. For `AttnProcessor`, which has no weights, that is only so
`nn.ModuleList(unet.attn_processors.values())` can hold every processor (diffusers' own
`AttnProcessor2_0` is a plain class, and that ModuleList raises a TypeError on it); the list
then carries the `IPAttnProcessor` weights into the optimizer and into the checkpoint.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------------------------------------
# Steps shared by every processor. They mirror what diffusers' AttnProcessor2_0 does with the
# options a UNet (or a VAE) may switch on for an Attention layer.
# ---------------------------------------------------------------------------------------------
def _begin(attn, hidden_states: torch.Tensor, temb: torch.Tensor | None):
    """Optional spatial norm, 4-D feature maps -> token sequences, optional group norm.

    Returns (hidden_states as (batch, tokens, channels), residual, original 4-D shape or None).
    """
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    shape_4d = None
    if hidden_states.ndim == 4:  # (batch, channels, height, width): attend over the pixels
        shape_4d = hidden_states.shape
        batch, channels, height, width = shape_4d
        hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
    if attn.group_norm is not None:  # GroupNorm wants channels in dimension 1
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states, residual, shape_4d


def _finish(attn, hidden_states: torch.Tensor, residual: torch.Tensor, shape_4d,
            to_out_update: torch.Tensor | None = None) -> torch.Tensor:
    """Output projection and dropout, back to 4-D if needed, optional residual and rescale.

    `to_out_update`: added to the output projection's result (FaceID's LoRA on to_out)."""
    projected = attn.to_out[0](hidden_states)  # linear
    hidden_states = projected if to_out_update is None else projected + to_out_update
    hidden_states = attn.to_out[1](hidden_states)  # dropout
    if shape_4d is not None:
        hidden_states = hidden_states.transpose(-1, -2).reshape(shape_4d)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


def _mask_for_sdpa(attn, attention_mask, key_length: int, batch: int):
    """Bring a diffusers attention mask to the (batch, heads, queries, keys) shape SDPA takes."""
    if attention_mask is None:
        return None
    attention_mask = attn.prepare_attention_mask(attention_mask, key_length, batch)
    return attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])


def attend(attn, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head scaled dot-product attention with the layer's head count.

    query (batch, n_q, inner), key/value (batch, n_k, inner) -> (batch, n_q, inner).
    The softmax scale is SDPA's default 1/sqrt(head_dim), as in diffusers' AttnProcessor2_0.
    """
    batch = query.shape[0]
    head_dim = key.shape[-1] // attn.heads

    def heads(x):  # (batch, n, heads * head_dim) -> (batch, heads, n, head_dim)
        return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

    q, k, v = heads(query), heads(key), heads(value)
    if getattr(attn, "norm_q", None) is not None:  # per-head q/k norms: unused in SD's UNets
        q = attn.norm_q(q)
    if getattr(attn, "norm_k", None) is not None:
        k = attn.norm_k(k)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)


class AttnProcessor(nn.Module):
    """Ordinary attention, as an `nn.Module` with no parameters.

    It computes what diffusers' `AttnProcessor2_0` computes. Being an `nn.Module` is what lets
    the original training script write `nn.ModuleList(unet.attn_processors.values())`: the
    list holds these empty modules next to the `IPAttnProcessor`s, so handing it to the
    optimizer trains the image branch and nothing else (there is nothing else in it).
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        # diffusers inspects `processor.__call__` to decide which keyword arguments to pass on;
        # spelling them out here keeps `temb` flowing, and nn.Module hooks still run.
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def forward(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention when `encoder_hidden_states` is None, cross-attention otherwise."""
        hidden_states, residual, shape_4d = _begin(attn, hidden_states, temb)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        mask = _mask_for_sdpa(attn, attention_mask, context.shape[1], context.shape[0])

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        out = attend(attn, query, attn.to_k(context), attn.to_v(context), mask)
        return _finish(attn, out, residual, shape_4d)


class IPAttnProcessor(nn.Module):
    """Decoupled cross-attention: the text and the image prompt get separate keys and values.

    Args:
        hidden_size: the layer's width (the output size of its to_k/to_v).
        cross_attention_dim: the width of the encoder tokens (text and image); defaults to
            `hidden_size`.
        scale: the weight of the image branch (lambda in the paper). A plain attribute: set
            `processor.scale = 0.5` at any time; 0 gives the original model back exactly.
        num_tokens: how many image tokens sit at the end of `encoder_hidden_states`.

    Trainable: `to_k_ip` and `to_v_ip`, bias-free linear layers cross_attention_dim ->
    hidden_size. Everything else comes from the frozen layer (`attn`) at call time.
    """

    def __init__(self, hidden_size: int, cross_attention_dim: int | None = None, scale: float = 1.0,
                 num_tokens: int = 4, *, device=None, dtype=None):
        super().__init__()
        self.hidden_size = hidden_size
        self.cross_attention_dim = cross_attention_dim
        self.scale = scale
        self.num_tokens = num_tokens
        in_features = cross_attention_dim or hidden_size
        self.to_k_ip = nn.Linear(in_features, hidden_size, bias=False, device=device, dtype=dtype)
        self.to_v_ip = nn.Linear(in_features, hidden_size, bias=False, device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, num_tokens={self.num_tokens}, scale={self.scale}"

    def query(self, attn, hidden_states: torch.Tensor) -> torch.Tensor:
        """The layer's queries, shared by the text and the image branch (FaceID adds its LoRA here)."""
        return attn.to_q(hidden_states)

    def split_tokens(self, encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cut [text tokens; image tokens] at L - num_tokens into (text, image)."""
        if encoder_hidden_states is None:
            raise ValueError(
                "IPAttnProcessor is a cross-attention processor: it needs encoder_hidden_states "
                f"(text tokens followed by {self.num_tokens} image tokens), got None. Install it on "
                "cross-attention layers (attn2) only."
            )
        if isinstance(encoder_hidden_states, (tuple, list)):
            raise TypeError(
                "IPAttnProcessor expects one tensor [text tokens; image tokens] (the original's format), "
                "got a tuple: that is diffusers' (text, [image tokens]) format for IPAdapterAttnProcessor2_0. "
                "Concatenate the projected image tokens after the text tokens along dim 1."
            )
        length = encoder_hidden_states.shape[1]
        if length <= self.num_tokens:
            raise ValueError(
                f"encoder_hidden_states has {length} tokens, but this IPAttnProcessor takes the last "
                f"num_tokens={self.num_tokens} as image tokens and needs at least one text token before "
                f"them (so at least {self.num_tokens + 1}). Did you forget to concatenate the image "
                "tokens after the text tokens?"
            )
        end = length - self.num_tokens
        return encoder_hidden_states[:, :end], encoder_hidden_states[:, end:]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        # See AttnProcessor.__call__: an explicit signature for diffusers' keyword filtering.
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def forward(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        """Z = Attn(Q, K_text, V_text) + scale * Attn(Q, K_ip, V_ip), then the layer's to_out."""
        text, image = self.split_tokens(encoder_hidden_states)
        hidden_states, residual, shape_4d = _begin(attn, hidden_states, temb)
        # A mask, if any, covers the text keys; the image tokens are always all visible.
        mask = _mask_for_sdpa(attn, attention_mask, text.shape[1], text.shape[0])

        query = self.query(attn, hidden_states)  # one query, shared by both branches
        if attn.norm_cross:  # the layer's own norm was made for text states: text only
            text = attn.norm_encoder_hidden_states(text)
        out = attend(attn, query, attn.to_k(text), attn.to_v(text), mask)

        if self.scale != 0:  # scale 0: skip the branch, the result is the original layer's, bit for bit
            image_out = attend(attn, query, self.to_k_ip(image), self.to_v_ip(image))
            out = out + self.scale * image_out
        return _finish(attn, out, residual, shape_4d)


class ConcatAttnProcessor(AttnProcessor):
    """The paper's "simple adapter" (section 4.4): the image tokens join the text tokens in ONE
    attention, read by the layer's own frozen `to_k`/`to_v`. An ablation, not IP-Adapter.

    The encoder states arrive as for `IPAttnProcessor`, [text tokens; image tokens], and this
    processor computes plain attention over all of them: softmax(Q [K_text; K_img]^T / sqrt(d))
    [V_text; V_img], with K_img = to_k(image tokens). It owns no weights, so only the image
    projection trains. What it lacks is the point of the comparison (`ipa_lab.ablation concat`):
    the image tokens compete with the text tokens for one softmax, they are read by keys and
    values learned for text, and there is no clean weight for the image prompt. `scale` is
    therefore 0 (drop the image tokens: the original layer exactly) or 1 (read them), nothing
    in between.
    """

    def __init__(self, num_tokens: int = 4):
        super().__init__()
        self.num_tokens = num_tokens
        self.scale = 1.0

    @property
    def scale(self) -> float:
        return self._scale

    @scale.setter
    def scale(self, value: float) -> None:
        if value not in (0, 1):
            raise ValueError(f"ConcatAttnProcessor (the simple adapter) has no weight for the image prompt: scale "
                             f"must be 0 (text only) or 1 (text and image in one softmax), got {value!r}; "
                             "a scale between them needs the decoupled IPAttnProcessor")
        self._scale = float(value)

    def extra_repr(self) -> str:
        return f"num_tokens={self.num_tokens}, scale={self.scale}"

    def forward(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        """Ordinary attention over [text; image] (scale 1) or over the text alone (scale 0)."""
        if encoder_hidden_states is None or encoder_hidden_states.shape[1] <= self.num_tokens:
            raise ValueError(f"ConcatAttnProcessor is a cross-attention processor: it needs encoder_hidden_states "
                             f"of text tokens followed by {self.num_tokens} image tokens")
        if self.scale == 0:
            encoder_hidden_states = encoder_hidden_states[:, : -self.num_tokens]
        return super().forward(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


@contextmanager
def record_image_attention(unet):
    """Record the image branch's attention probabilities in every `IPAttnProcessor` of `unet`.

    Yields a dict, layer name (as in `unet.attn_processors`) -> list with one tensor per call of
    that layer (one per denoising step in a sampling loop), each of shape (batch, queries,
    image tokens): softmax(Q K_ip^T / sqrt(head_dim)) averaged over the heads, so every row sums
    to 1. A query is one position of the layer's feature map (queries = side * side), so a
    token's column, reshaped to (side, side), shows where in the picture that token is read.
    With classifier-free guidance the batch holds the unconditional half first.

    It works by forward hooks (our processors are `nn.Module`s) that recompute the probabilities
    from the call's arguments; the processors and their outputs are unchanged, and the hooks are
    removed on exit.
    """
    maps: dict[str, list[torch.Tensor]] = {}

    def hook(name):
        def record(processor, args, kwargs, output):
            # IPAttnProcessor.__call__ passes (attn, hidden_states, encoder_hidden_states, mask, temb)
            attn, hidden_states, encoder_hidden_states, _, temb = (list(args) + [None] * 5)[:5]
            _, image = processor.split_tokens(encoder_hidden_states)
            hidden_states, _, _ = _begin(attn, hidden_states, temb)
            query, key = processor.query(attn, hidden_states), processor.to_k_ip(image)
            batch, head_dim = query.shape[0], key.shape[-1] // attn.heads
            q = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
            k = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
            if getattr(attn, "norm_q", None) is not None:  # as in `attend`
                q = attn.norm_q(q)
            if getattr(attn, "norm_k", None) is not None:
                k = attn.norm_k(k)
            probabilities = torch.softmax(q @ k.transpose(-1, -2) * head_dim**-0.5, dim=-1)
            maps.setdefault(name, []).append(probabilities.mean(dim=1).detach().float())
        return record

    handles = [p.register_forward_hook(hook(name), with_kwargs=True)
               for name, p in unet.attn_processors.items() if isinstance(p, IPAttnProcessor)]
    if not handles:
        raise ValueError("record_image_attention: this UNet has no IPAttnProcessor; install or load an adapter first")
    try:
        yield maps
    finally:
        for handle in handles:
            handle.remove()
