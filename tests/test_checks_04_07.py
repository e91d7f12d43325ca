"""The exercise checkers of notebooks 04-07: each passes the solution, reports a stub as TODO and
names what is wrong in a plausible wrong answer (without ever raising). The build exercises of
these notebooks (training_step, sampling_loop, perceiver_attention) are in test_checks_build_04_06.py."""
from __future__ import annotations

import numpy as np
import torch

from ipa_lab import checks
from verdicts import assert_fail, assert_pass, assert_todo, assert_unusable, verdict


# --- notebook 04 ---------------------------------------------------------------------------
def drop_decision_solution(u, p_image, p_text, p_both):
    if u < p_image:
        return True, False
    if u < p_image + p_text:
        return False, True
    if u < p_image + p_text + p_both:
        return True, True
    return False, False


def drop_bands_from_zero(u, p_image, p_text, p_both):
    """A wrong answer: each band tested from 0 (u < p_text, u < p_both), not from where the last ended."""
    if u < p_image:
        return True, False
    if u < p_text:
        return False, True
    if u < p_both:
        return True, True
    return False, False


def test_drop_decision(capsys):
    assert_pass(capsys, checks.drop_decision, drop_decision_solution)
    assert_todo(capsys, checks.drop_decision)
    # "both" forgotten: the third band only drops the text
    assert_fail(capsys, checks.drop_decision,
                lambda u, i, t, b: (u < i, i <= u < i + t + b), "'both' band", "AND")
    # each band tested from 0 (overlapping bands instead of consecutive ones)
    assert_fail(capsys, checks.drop_decision, lambda u, i, t, b: (u < i, u < t), "consecutive")
    # <= instead of <
    assert_fail(capsys, checks.drop_decision,
                lambda u, i, t, b: drop_decision_solution(u - 1e-12 if u in (i, i + t, i + t + b) else u, i, t, b),
                "exactly on the start")
    assert_fail(capsys, checks.drop_decision, lambda u, i, t, b: u < i, "pair (drop_image, drop_text)")


def test_drop_decision_names_bands_that_each_start_from_zero(capsys):
    """u < p_text for the text band (not the running sum p_image + p_text) first fails exactly on the
    band's start, where a hint about `<` would mislead: the checker names the running sum instead."""
    def text_from_zero(u, p_image, p_text, p_both):
        return drop_decision_solution(u, p_image, p_text - p_image, p_both + p_image)  # ends p_image, p_text, sum

    for answer in (text_from_zero, drop_bands_from_zero):
        ok, out = verdict(capsys, checks.drop_decision, answer)
        assert ok is False and "running sum" in out and "exactly on the start" not in out, out


def test_numpy_answers_are_numbers(capsys):
    """np.int64, np.float32 and np.bool_ (what numpy code returns) count as numbers and booleans."""
    assert_pass(capsys, checks.drop_decision, lambda *a: tuple(np.bool_(x) for x in drop_decision_solution(*a)))
    assert_pass(capsys, checks.global_batch, lambda b, n, size: (np.int64(b * n), np.int64(size // (b * n))))
    assert_pass(capsys, checks.adamw_state_bytes, lambda n: np.int64(8) * n)
    assert_pass(capsys, checks.adamw_state_bytes, lambda n: np.float64(8 * n))
    assert_pass(capsys, checks.static_training_bytes, lambda f, t, b: np.int64(f) * b + np.int64(16) * t)


def noisy_solution(latents, noise, timesteps, alphas_cumprod):
    a = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    return a.sqrt() * latents + (1 - a).sqrt() * noise


def test_noisy_latents(capsys):
    assert_pass(capsys, checks.noisy_latents, noisy_solution)
    assert_todo(capsys, checks.noisy_latents)

    def no_sqrt(x, n, t, ab):
        a = ab[t].view(-1, 1, 1, 1)
        return a * x + (1 - a) * n

    assert_fail(capsys, checks.noisy_latents, no_sqrt, "square roots")
    assert_fail(capsys, checks.noisy_latents, lambda x, n, t, ab: noisy_solution(n, x, t, ab), "swapped")
    assert_fail(capsys, checks.noisy_latents, lambda x, n, t, ab: ab[t[0]].sqrt() * x + (1 - ab[t[0]]).sqrt() * n,
                "first sample's timestep")
    assert_fail(capsys, checks.noisy_latents, lambda x, n, t, ab: x[:1], "shape")


# --- notebook 05 ---------------------------------------------------------------------------
def test_compose_prompt_embeds(capsys):
    def solution(text, negative, image, uncond):
        return torch.cat([text, image], dim=1), torch.cat([negative, uncond], dim=1)

    assert_pass(capsys, checks.compose_prompt_embeds, solution)
    assert_todo(capsys, checks.compose_prompt_embeds)
    assert_fail(capsys, checks.compose_prompt_embeds,
                lambda t, n, i, u: (torch.cat([i, t], 1), torch.cat([u, n], 1)), "image tokens first")
    assert_fail(capsys, checks.compose_prompt_embeds,
                lambda t, n, i, u: (torch.cat([t, i], 1), torch.cat([n, i], 1)), "unconditional image tokens")
    assert_fail(capsys, checks.compose_prompt_embeds,
                lambda t, n, i, u: solution(t, n, i, u)[::-1], "swapped")
    assert_fail(capsys, checks.compose_prompt_embeds,
                lambda t, n, i, u: (torch.cat([t, t], 2), torch.cat([n, n], 2)), "dim 1")
    assert_fail(capsys, checks.compose_prompt_embeds, lambda t, n, i, u: torch.cat([t, i], 1), "pair")


def test_unconditional_image_tokens(capsys):
    assert_pass(capsys, checks.unconditional_image_tokens,
                lambda m: m(torch.zeros(1, m.clip_embeddings_dim)))
    assert_todo(capsys, checks.unconditional_image_tokens)
    assert_fail(capsys, checks.unconditional_image_tokens,
                lambda m: torch.zeros(1, m.clip_extra_context_tokens, m.cross_attention_dim), "all-zero tokens")
    assert_fail(capsys, checks.unconditional_image_tokens,
                lambda m: m.proj.bias.reshape(1, m.clip_extra_context_tokens, -1), "without the LayerNorm")
    assert_fail(capsys, checks.unconditional_image_tokens, lambda m: m(torch.ones(1, m.clip_embeddings_dim)),
                "differs")


def test_guidance(capsys):
    assert_pass(capsys, checks.guidance, lambda u, c, w: u + w * (c - u))
    assert_pass(capsys, checks.guidance, lambda u, c, w: w * c + (1 - w) * u)  # the same, rearranged
    assert_todo(capsys, checks.guidance)
    assert_fail(capsys, checks.guidance, lambda u, c, w: c + w * (c - u), "start from the unconditional")
    assert_fail(capsys, checks.guidance, lambda u, c, w: u + w * (u - c), "wrong way")
    assert_fail(capsys, checks.guidance, lambda u, c, w: c, "guidance_scale=7.5")


# notebook 06's exercise builds PerceiverAttention: tests/test_checks_build_04_06.py


# --- notebook 07 ---------------------------------------------------------------------------
def test_global_batch(capsys):
    assert_pass(capsys, checks.global_batch, lambda b, n, size: (b * n, size // (b * n)))
    assert_pass(capsys, checks.global_batch, lambda b, n, size: (b * n, -(-size // (b * n))))  # a last partial batch
    assert_todo(capsys, checks.global_batch)
    assert_fail(capsys, checks.global_batch, lambda b, n, size: (b, size // b), "every process")
    assert_fail(capsys, checks.global_batch, lambda b, n, size: (b * n, size // b), "one GPU's count")
    assert_fail(capsys, checks.global_batch, lambda b, n, size: b * n, "pair")
    assert_unusable(capsys, checks.global_batch, lambda b, n, size: (b * n, float("inf")), "pair", "inf")


def test_adamw_state_bytes(capsys):
    assert_pass(capsys, checks.adamw_state_bytes, lambda n: 2 * 4 * n)
    assert_todo(capsys, checks.adamw_state_bytes)
    assert_fail(capsys, checks.adamw_state_bytes, lambda n: 4 * n, "two per parameter")
    assert_fail(capsys, checks.adamw_state_bytes, lambda n: 16 * n, "weights and the gradients")
    assert_fail(capsys, checks.adamw_state_bytes, lambda n: 2 * n, "bytes, not values")
    assert_fail(capsys, checks.adamw_state_bytes, lambda n: "a lot", "return a number")
    assert_unusable(capsys, checks.adamw_state_bytes, lambda n: torch.tensor([4.0 * n, 4.0 * n]), "return a number")
    assert_pass(capsys, checks.adamw_state_bytes, lambda n: torch.tensor(8 * n))


def test_static_training_bytes(capsys):
    assert_pass(capsys, checks.static_training_bytes, lambda frozen, trainable, b: frozen * b + 16 * trainable)
    assert_todo(capsys, checks.static_training_bytes)
    assert_fail(capsys, checks.static_training_bytes, lambda f, t, b: 16 * (f + t), "every parameter as trainable")
    assert_fail(capsys, checks.static_training_bytes, lambda f, t, b: f * b + 16 * t + 12 * f, "frozen models gradients")
    assert_fail(capsys, checks.static_training_bytes, lambda f, t, b: f * b + 8 * t, "16 bytes each")
    assert_fail(capsys, checks.static_training_bytes, lambda f, t, b: (f + t) * b, "gradients and AdamW state")
    assert_unusable(capsys, checks.static_training_bytes, lambda f, t, b: "16 GB", "return a number")


def test_static_training_bytes_names_gradients_at_the_frozen_width(capsys):
    """2-byte gradients are not "no gradients": the trainable parameters are fp32, so are their gradients."""
    assert_fail(capsys, checks.static_training_bytes, lambda f, t, b: f * b + t * (4 + 2 + 8), "gradients at 2 bytes",
                "fp32")
    assert_fail(capsys, checks.static_training_bytes, lambda f, t, b: f * b + t * (4 + b + 8),
                "gradients with frozen_bytes_per_param", "4 bytes each")
    # weights and gradients of the adapter at the frozen width: 12 bytes at b = 2, like "no gradients"
    assert_fail(capsys, checks.static_training_bytes, lambda f, t, b: (f + t) * b + t * (b + 8),
                "trainable weights and their gradients with frozen_bytes_per_param")
    assert_fail(capsys, checks.static_training_bytes, lambda f, t, b: f * b + 12 * t,
                "left out the trainable weights' gradients")



def test_resampler_parameters(capsys):
    def count(dim, depth, dim_head, heads, num_queries, embedding_dim, output_dim, ff_mult, leave_out=()):
        inner = heads * dim_head
        attention = (0 if "norms" in leave_out else 4 * dim) + 4 * dim * (dim if "narrow" in leave_out else inner)
        feed_forward = (0 if "norms" in leave_out else 2 * dim) + 2 * dim * int(dim * ff_mult)
        return ((0 if "latents" in leave_out else num_queries * dim) + embedding_dim * dim + dim
                + depth * (attention + feed_forward) + dim * output_dim + output_dim + 2 * output_dim)

    assert_pass(capsys, checks.resampler_parameters, count)
    assert_todo(capsys, checks.resampler_parameters)
    assert_fail(capsys, checks.resampler_parameters, lambda *a: count(*a, leave_out=("latents",)), "latents")
    assert_fail(capsys, checks.resampler_parameters, lambda *a: count(*a, leave_out=("norms",)), "LayerNorms inside")
    assert_fail(capsys, checks.resampler_parameters, lambda *a: count(*a, leave_out=("narrow",)), "inner width")
    assert_fail(capsys, checks.resampler_parameters, lambda *a: count(*a) + a[1] * (int(a[0] * a[7]) + a[0]), "no bias")
