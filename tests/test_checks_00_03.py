"""The exercise checkers of notebooks 00-03: each passes the solution, reports a stub as TODO and
names what is wrong in a plausible wrong answer (without ever raising)."""
from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F

from ipa_lab import checks
from verdicts import assert_fail, assert_pass, assert_todo, assert_unusable


# --- notebook 00 ---------------------------------------------------------------------------
def latent_shape_solution(height, width, vae_config):
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    return (vae_config["latent_channels"], height // factor, width // factor)


def test_latent_shape(capsys):
    assert_pass(capsys, checks.latent_shape, latent_shape_solution)
    assert_pass(capsys, checks.latent_shape,  # attribute access works too, as on pipe.vae.config
                lambda h, w, c: (c.latent_channels, h // 2 ** (len(c.block_out_channels) - 1),
                                 w // 2 ** (len(c.block_out_channels) - 1)))
    assert_todo(capsys, checks.latent_shape)
    assert_fail(capsys, checks.latent_shape, lambda h, w, c: (4, h // 8, w // 8), "2 ** (len(block_out_channels) - 1)")
    assert_fail(capsys, checks.latent_shape, lambda h, w, c: latent_shape_solution(w, h, c), "swapped height and width")
    assert_fail(capsys, checks.latent_shape,
                lambda h, w, c: (len(c["block_out_channels"]),) + latent_shape_solution(h, w, c)[1:], "latent_channels")
    assert_fail(capsys, checks.latent_shape, lambda h, w, c: None, "tuple of ints")
    # strings are not a shape, even where int() would read them; the checker's int() is not the learner's crash
    assert_unusable(capsys, checks.latent_shape, lambda h, w, c: ("4", "x", "8"), "tuple of ints", "('4', 'x', '8')")
    assert_unusable(capsys, checks.latent_shape, lambda h, w, c: ("4", "8", "8"), "tuple of ints")
    assert_unusable(capsys, checks.latent_shape, lambda h, w, c: "488", "tuple of ints", "'488'")
    assert_pass(capsys, checks.latent_shape, lambda h, w, c: torch.tensor(latent_shape_solution(h, w, c)))
    assert_pass(capsys, checks.latent_shape, lambda h, w, c: tuple(np.array(latent_shape_solution(h, w, c))))
    assert_pass(capsys, checks.latent_shape, lambda h, w, c: np.array(latent_shape_solution(h, w, c)))
    assert_fail(capsys, checks.latent_shape, lambda h, w, c: h // 0, "your code raised ZeroDivisionError")


def test_encoder_hidden_states_shape(capsys):
    assert_pass(capsys, checks.encoder_hidden_states_shape, lambda b, t, i, d: (b, t + i, d))
    assert_pass(capsys, checks.encoder_hidden_states_shape, lambda b, t, i, d: torch.Size([b, t + i, d]))
    assert_todo(capsys, checks.encoder_hidden_states_shape)
    assert_fail(capsys, checks.encoder_hidden_states_shape, lambda b, t, i, d: (b, t, d), "the text alone")
    assert_fail(capsys, checks.encoder_hidden_states_shape, lambda b, t, i, d: (b, t, d + i), "along the sequence")
    assert_fail(capsys, checks.encoder_hidden_states_shape, lambda b, t, i, d: (b, t + 4, d), "expected (3, 93, 768)")
    assert_unusable(capsys, checks.encoder_hidden_states_shape, lambda b, t, i, d: (b, f"{t}+{i}", d), "tuple of ints")
    assert_pass(capsys, checks.encoder_hidden_states_shape, lambda b, t, i, d: (np.int64(b), np.int64(t + i), np.int32(d)))


# --- notebook 01: the ImageProjModel build exercise is in test_checks_build_01_03.py -----------
def test_image_proj_parameters(capsys):
    assert_pass(capsys, checks.image_proj_parameters, lambda d, c, t: d * t * c + t * c + 2 * c)
    assert_todo(capsys, checks.image_proj_parameters)
    assert_fail(capsys, checks.image_proj_parameters, lambda d, c, t: d * t * c + 2 * c, "proj's bias is missing")
    assert_fail(capsys, checks.image_proj_parameters, lambda d, c, t: d * t * c + t * c, "LayerNorm's weight and bias")
    assert_fail(capsys, checks.image_proj_parameters, lambda d, c, t: d * t * c + t * c + 2 * t * c,
                "shared by all tokens")
    assert_fail(capsys, checks.image_proj_parameters, lambda d, c, t: d * c + c + 2 * c, "expected 8,576")
    assert_fail(capsys, checks.image_proj_parameters, lambda d, c, t: float(d * t * c + t * c + 2 * c), "whole number")


# --- notebook 02 ---------------------------------------------------------------------------
def hidden_size_solution(name, block_out_channels):
    if name.startswith("mid_block"):
        return block_out_channels[-1]
    index = int(name.split(".")[1])
    if name.startswith("up_blocks"):
        return list(reversed(block_out_channels))[index]
    return block_out_channels[index]


def test_hidden_size_of(capsys):
    assert_pass(capsys, checks.hidden_size_of, hidden_size_solution)
    assert_todo(capsys, checks.hidden_size_of)
    assert_fail(capsys, checks.hidden_size_of,
                lambda n, w: w[-1] if n.startswith("mid") else w[int(n.split(".")[1])], "index block_out_channels reversed")
    assert_fail(capsys, checks.hidden_size_of,
                lambda n, w: w[0] if n.startswith("mid") else hidden_size_solution(n, w), "deepest width")
    assert_fail(capsys, checks.hidden_size_of, lambda n, w: str(hidden_size_solution(n, w)), "return an int")
    assert_fail(capsys, checks.hidden_size_of, lambda n, w: float(hidden_size_solution(n, w)), "return an int")
    # numpy's integers are ints too (np.array(widths)[i] is an np.int64)
    assert_pass(capsys, checks.hidden_size_of, lambda n, w: hidden_size_solution(n, np.array(w)))


def decoupled_solution(q, k, v, k_ip, v_ip, scale):
    return F.scaled_dot_product_attention(q, k, v) + scale * F.scaled_dot_product_attention(q, k_ip, v_ip)


def test_decoupled_attention(capsys):
    assert_pass(capsys, checks.decoupled_attention, decoupled_solution)
    assert_todo(capsys, checks.decoupled_attention)
    assert_fail(capsys, checks.decoupled_attention,
                lambda q, k, v, ki, vi, s: F.scaled_dot_product_attention(q, torch.cat([k, ki], -2), torch.cat([v, vi], -2)),
                "one softmax over the concatenated")
    assert_fail(capsys, checks.decoupled_attention,
                lambda q, k, v, ki, vi, s: s * F.scaled_dot_product_attention(q, k, v) + F.scaled_dot_product_attention(q, ki, vi),
                "multiplies the text branch")
    assert_fail(capsys, checks.decoupled_attention, lambda q, k, v, ki, vi, s: decoupled_solution(q, k, v, ki, vi, 1.0),
                "the scale is ignored")
    assert_fail(capsys, checks.decoupled_attention,
                lambda q, k, v, ki, vi, s: (torch.softmax(q @ k.transpose(-2, -1), -1) @ v
                                            + s * torch.softmax(q @ ki.transpose(-2, -1), -1) @ vi),
                "1/sqrt(head_dim)")
    assert_fail(capsys, checks.decoupled_attention, lambda q, k, v, ki, vi, s: decoupled_solution(q, k, v, ki, vi, s)[:, 0],
                "has shape")


# --- notebook 03 ---------------------------------------------------------------------------
def test_params_to_opt(capsys):
    assert_pass(capsys, checks.params_to_opt, lambda proj, adapter, unet: list(itertools.chain(proj.parameters(), adapter.parameters())))
    assert_pass(capsys, checks.params_to_opt,  # filtering by requires_grad finds the same set
                lambda proj, adapter, unet: [p for p in itertools.chain(proj.parameters(), unet.parameters()) if p.requires_grad])
    assert_todo(capsys, checks.params_to_opt)
    assert_fail(capsys, checks.params_to_opt, lambda proj, adapter, unet: list(proj.parameters()) + list(unet.parameters()),
                "frozen tensors", "unet: ")
    assert_fail(capsys, checks.params_to_opt, lambda proj, adapter, unet: list(adapter.parameters()), "misses the image projection")
    assert_fail(capsys, checks.params_to_opt, lambda proj, adapter, unet: list(proj.parameters()), "to_k_ip")
    assert_fail(capsys, checks.params_to_opt,
                lambda proj, adapter, unet: list(proj.parameters()) + list(adapter.parameters()) + list(adapter.parameters()),
                "appear twice")
    assert_fail(capsys, checks.params_to_opt, lambda proj, adapter, unet: None, "returned None")
    assert_fail(capsys, checks.params_to_opt, lambda proj, adapter, unet: adapter, "not a module")
    assert_unusable(capsys, checks.params_to_opt, lambda proj, adapter, unet: 3, "return a list of parameters, got int 3")
