"""Notebook 06, IP-Adapter Plus: the Perceiver Resampler's attention, built by the learner.

The learner's `PerceiverAttention` gets the original's parameter names (so the Plus checkpoints
load into it) and, with the package's weights loaded, the package's outputs.
"""
from __future__ import annotations

import torch

from .core import CheckFailed, builds, expect, expect_shape, learner_code

# (what, keyword arguments): the toy Plus's size, and two small ones that catch hard-coded sizes
_SIZES = (("the toy Plus's size (dim 64, 12 heads of 64)", dict(dim=64, dim_head=64, heads=12)),
          ("dim 32, 4 heads of 8", dict(dim=32, dim_head=8, heads=4)),
          ("dim 48, 3 heads of 16", dict(dim=48, dim_head=16, heads=3)))

# What each parameter of the original is for, for the messages about names and shapes.
_ROLES = {"norm1": "the LayerNorm of the image features", "norm2": "the LayerNorm of the latents (the queries)",
          "to_q": "the queries' Linear (dim -> heads * dim_head, no bias)",
          "to_kv": "ONE Linear for keys and values together (dim -> 2 * heads * dim_head, no bias)",
          "to_out": "the output Linear (heads * dim_head -> dim, no bias)"}


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
            expect(not (layer == "to_kv" and split), f"at {what}: you have to_k and to_v: the original has "
                   f"{_ROLES['to_kv']}, and its checkpoints store to_kv.weight")
            raise CheckFailed(f"at {what}: the parameter {name} is missing: it is {_ROLES[layer]}. Use the "
                              "original's names (norm1, norm2, to_q, to_kv, to_out) so its checkpoints load")
        expect(tuple(mine[name].shape) == tuple(tensor.shape), f"at {what}: {name} has shape "
               f"{tuple(mine[name].shape)}, expected {tuple(tensor.shape)}: it is {_ROLES[layer]}")
    extra = sorted(set(mine) - set(want))
    if extra:
        bias = [n for n in extra if n.endswith(".bias") and n.split(".")[0] in ("to_q", "to_kv", "to_out")]
        expect(not bias, f"at {what}: your module has {', '.join(bias)}: the original's to_q, to_kv and to_out "
               "are Linear(..., bias=False)")
        raise CheckFailed(f"at {what}: your module has parameters the original has not: {', '.join(extra)}")


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


_MISTAKES = (
    (dict(kv="x"), "the keys and values come from the image features alone: compute them from torch.cat([x, "
     "latents], dim=-2), so each query also attends to the latents (itself and the other queries)"),
    (dict(kv="latents"), "the keys and values come from the latents alone: then the queries never see the image. "
     "Compute them from torch.cat([x, latents], dim=-2)"),
    (dict(norms="none"), "no LayerNorms: apply norm1 to the image features and norm2 to the latents first"),
    (dict(norms="swapped"), "norm1 and norm2 are swapped: norm1 is for the image features x, norm2 for the latents"),
    (dict(k_power=0.0), "only q is scaled: scale q AND k by dim_head ** -0.25 (the product then carries "
     "1/sqrt(dim_head))"),
    (dict(q_power=0.0, k_power=0.0), "the scores are not scaled: scale q and k by dim_head ** -0.25 each, or "
     "the softmax saturates as dim_head grows"),
    (dict(q_power=-0.5, k_power=-0.5), "the scores are scaled by 1/dim_head: each of q and k gets "
     "dim_head ** -0.25, so that their product gets dim_head ** -0.5"),
    (dict(softmax_dim=-2), "the softmax runs over the queries (dim=-2): each query's weights over the keys must "
     "sum to 1, softmax(dim=-1)"),
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
        expect(isinstance(got, torch.Tensor), f"at {what}: forward returned {type(got).__name__}: return a tensor")
        inner = kw["heads"] * kw["dim_head"]
        expect(tuple(got.shape) != (2, kw["heads"], 16, kw["dim_head"]), f"at {what}: the output has shape "
               f"{tuple(got.shape)}: merge the heads back, (batch, heads, n, d) -> (batch, n, heads * d), then to_out")
        expect(tuple(got.shape) != (2, 16, inner) or inner == kw["dim"], f"at {what}: the output has shape "
               f"{tuple(got.shape)}: apply to_out after merging the heads")
        expect_shape(got, want.shape, f"at {what}: the output for 16 latents")
        if torch.allclose(got, want, atol=1e-5):
            return
        for knobs, message in _MISTAKES:
            expect(not torch.allclose(got, _attend(m, x, latents, **knobs), atol=1e-4), f"at {what}: {message}")
        expect(not _one_head_mistake(m, x, latents, got), f"at {what}: the heads are not split: view q, k and v as "
               "(batch, heads, n, dim_head) before the scores, so each head attends on its own")
        diff = (got - want).abs().max().item()
    raise CheckFailed(f"at {what}: your output differs from the original's by up to {diff:.3g} (same weights)")


@builds("projection.PerceiverAttention")
def perceiver_attention(cls) -> str:
    """cls(*, dim, dim_head, heads): a module whose forward(x, latents) is the Resampler's attention."""
    for what, kw in _SIZES:
        m = _reference_module(kw)
        with torch.random.fork_rng():
            torch.manual_seed(6)
            module = cls(**kw)
        expect(isinstance(module, torch.nn.Module), f"at {what}: PerceiverAttention(...) should build a "
               f"torch.nn.Module, got {type(module).__name__}")
        want = m.state_dict()
        _check_names(module.state_dict(), want, what)
        module.load_state_dict(want)
        module.eval()
        _check_outputs(module, m, kw, what, cls)
    return ("queries from the latents, keys and values from [features; latents], q and k each scaled by "
            "dim_head ** -0.25, softmax over the keys; the original's parameter names, so the Plus checkpoints load.")
