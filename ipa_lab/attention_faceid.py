"""FaceID's attention processors: the base processors plus a LoRA on every projection (notebook 8).

IP-Adapter-FaceID breaks the rule the rest of the course relies on. In the base model and Plus,
the self-attention processors are empty and the UNet's own weights never change. FaceID adds a
low-rank update (LoRA) to `to_q`, `to_k`, `to_v` and `to_out` of *every* attention layer, self-
and cross-attention alike, and trains it with the image branch:

    to_q(x)  ->  to_q(x) + lora_scale * up(down(x))        (down: d -> r, up: r -> d, no bias)

The frozen weight W stays as it is; the layer acts as if it were W + lora_scale * B A with A
(`down`, r x d_in) and B (`up`, d_out x r) trained. With B = 0 at the start the update is
exactly zero, so step 0 is the base adapter (and with `to_k_ip` / `to_v_ip` copied, as in
`ipa_lab.adapter`). The original trains rank 128 (tutorial_train_faceid.py).

* `LoRALinearLayer`: the update itself (A then B), parameters `down.weight` and `up.weight`.
* `LoRAAttnProcessor`: self-attention with LoRA; it now holds parameters.
* `LoRAIPAttnProcessor`: decoupled cross-attention (`IPAttnProcessor`) with LoRA on the layer's
  own projections; the image branch (`to_k_ip`, `to_v_ip`) is as in the base model.

Parameter names are the original's (attention_processor_faceid.py): a checkpoint's
`ip_adapter` part holds `{i}.to_q_lora.down.weight`, ... for every processor index i, the
self-attention ones (even i) included; diffusers' `load_ip_adapter` finds those keys and loads
them into the UNet through PEFT.
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import AttnProcessor, IPAttnProcessor, _begin, _finish, _mask_for_sdpa, attend

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out")


class LoRALinearLayer(nn.Module):
    """The low-rank update of one linear layer: x -> up(down(x)), rank r, no biases.

    `down` (in_features -> rank) starts random (std 1/rank), `up` (rank -> out_features) starts at
    zero: the update is zero until training moves `up`. With `network_alpha` the result is scaled
    by alpha / rank (kohya's convention); the original leaves it None (scale 1).
    Parameters: rank * (in_features + out_features).
    """

    def __init__(self, in_features: int, out_features: int, rank: int = 4, network_alpha: float | None = None,
                 device=None, dtype=None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
        self.rank, self.network_alpha = rank, network_alpha
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)
        nn.init.normal_(self.down.weight, std=1 / rank)
        nn.init.zeros_(self.up.weight)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = self.up(self.down(hidden_states.to(self.down.weight.dtype)))
        if self.network_alpha is not None:
            out = out * (self.network_alpha / self.rank)
        return out.to(hidden_states.dtype)


def _loras(module: nn.Module, hidden_size: int, context_size: int, rank: int, network_alpha, device, dtype) -> None:
    """Give `module` the four updates: q and out read the layer's width, k and v the context's."""
    for name, fan_in in (("to_q", hidden_size), ("to_k", context_size), ("to_v", context_size), ("to_out", hidden_size)):
        setattr(module, f"{name}_lora", LoRALinearLayer(fan_in, hidden_size, rank, network_alpha, device, dtype))


class LoRAAttnProcessor(AttnProcessor):
    """Self-attention with a LoRA update on to_q, to_k, to_v and to_out (FaceID's `attn1`).

    Args: hidden_size (the layer's width), cross_attention_dim (None for self-attention), rank,
    network_alpha, lora_scale (the weight of the update at inference; 1 in training).
    Trainable: the four `LoRALinearLayer`s, 4 * rank * 2 * hidden_size parameters in a
    self-attention layer. A subclass of `AttnProcessor` for its call signature (diffusers' keyword
    filtering); `forward` is its own.
    """

    def __init__(self, hidden_size: int, cross_attention_dim: int | None = None, rank: int = 4,
                 network_alpha: float | None = None, lora_scale: float = 1.0, *, device=None, dtype=None):
        super().__init__()
        self.hidden_size, self.cross_attention_dim, self.rank = hidden_size, cross_attention_dim, rank
        self.lora_scale = lora_scale
        _loras(self, hidden_size, cross_attention_dim or hidden_size, rank, network_alpha, device, dtype)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, rank={self.rank}, lora_scale={self.lora_scale}"

    def forward(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        """Ordinary attention in which each projection p(x) becomes p(x) + lora_scale * p_lora(x)."""
        hidden_states, residual, shape_4d = _begin(attn, hidden_states, temb)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        mask = _mask_for_sdpa(attn, attention_mask, context.shape[1], context.shape[0])
        s = self.lora_scale
        query = attn.to_q(hidden_states) + s * self.to_q_lora(hidden_states)
        key = attn.to_k(context) + s * self.to_k_lora(context)
        value = attn.to_v(context) + s * self.to_v_lora(context)
        out = attend(attn, query, key, value, mask)
        return _finish(attn, out, residual, shape_4d, s * self.to_out_lora(out))


class LoRAIPAttnProcessor(IPAttnProcessor):
    """Decoupled cross-attention (`IPAttnProcessor`) whose text path has a LoRA on every projection.

    Z = Attn(Q', K'_text, V'_text) + scale * Attn(Q', K_ip, V_ip), then to_out', where a prime
    marks a LoRA-updated projection: Q' = to_q(x) + lora_scale * to_q_lora(x), and so on. The
    image branch reads the image tokens with `to_k_ip` / `to_v_ip` only (no LoRA there: they are
    trained whole). Trainable: to_k_ip, to_v_ip and the four LoRA updates.
    """

    def __init__(self, hidden_size: int, cross_attention_dim: int | None = None, rank: int = 4,
                 network_alpha: float | None = None, lora_scale: float = 1.0, scale: float = 1.0,
                 num_tokens: int = 4, *, device=None, dtype=None):
        super().__init__(hidden_size, cross_attention_dim, scale, num_tokens, device=device, dtype=dtype)
        self.rank, self.lora_scale = rank, lora_scale
        _loras(self, hidden_size, cross_attention_dim or hidden_size, rank, network_alpha, device, dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, lora_scale={self.lora_scale}"

    def query(self, attn, hidden_states: torch.Tensor) -> torch.Tensor:
        return attn.to_q(hidden_states) + self.lora_scale * self.to_q_lora(hidden_states)

    def forward(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        """As IPAttnProcessor.forward, with the LoRA updates on the layer's q, k, v and out."""
        text, image = self.split_tokens(encoder_hidden_states)
        hidden_states, residual, shape_4d = _begin(attn, hidden_states, temb)
        mask = _mask_for_sdpa(attn, attention_mask, text.shape[1], text.shape[0])
        s = self.lora_scale
        query = self.query(attn, hidden_states)
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)
        key = attn.to_k(text) + s * self.to_k_lora(text)
        value = attn.to_v(text) + s * self.to_v_lora(text)
        out = attend(attn, query, key, value, mask)
        if self.scale != 0:
            out = out + self.scale * attend(attn, query, self.to_k_ip(image), self.to_v_ip(image))
        return _finish(attn, out, residual, shape_4d, s * self.to_out_lora(out))
