"""The exercise checkers of notebooks 04-07: each passes the solution, reports a stub as TODO and
names what is wrong in a plausible wrong answer (without ever raising)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ipa_lab import checks
from verdicts import assert_fail, assert_pass, assert_todo, assert_unusable


# --- notebook 04 ---------------------------------------------------------------------------
def drop_decision_solution(u, p_image, p_text, p_both):
    if u < p_image:
        return True, False
    if u < p_image + p_text:
        return False, True
    if u < p_image + p_text + p_both:
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


def test_diffusion_loss(capsys):
    assert_pass(capsys, checks.diffusion_loss, lambda pred, noise, latents: F.mse_loss(pred, noise))
    assert_todo(capsys, checks.diffusion_loss)
    assert_fail(capsys, checks.diffusion_loss, lambda pred, noise, latents: F.mse_loss(pred, latents), "target is the noise")
    assert_fail(capsys, checks.diffusion_loss, lambda pred, noise, latents: ((pred - noise) ** 2).sum(), "summed")
    assert_fail(capsys, checks.diffusion_loss, lambda pred, noise, latents: (pred - noise).abs().mean(), "absolute")
    assert_fail(capsys, checks.diffusion_loss, lambda pred, noise, latents: F.mse_loss(pred, noise).detach(),
                "no gradient")
    assert_fail(capsys, checks.diffusion_loss, lambda pred, noise, latents: (pred - noise) ** 2, "one number")


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


# --- notebook 06 ---------------------------------------------------------------------------
def test_perceiver_kv_input(capsys):
    assert_pass(capsys, checks.perceiver_kv_input, lambda f, l: torch.cat([f, l], dim=-2))
    assert_pass(capsys, checks.perceiver_kv_input, lambda f, l: torch.cat([l, f], dim=1))  # same attention
    assert_todo(capsys, checks.perceiver_kv_input)
    assert_fail(capsys, checks.perceiver_kv_input, lambda f, l: f, "features alone")
    assert_fail(capsys, checks.perceiver_kv_input, lambda f, l: l, "latents alone")
    assert_fail(capsys, checks.perceiver_kv_input, lambda f, l: torch.cat([f, l], dim=-1), "raised RuntimeError")
    assert_fail(capsys, checks.perceiver_kv_input, lambda f, l: torch.cat([f, f[:, :16]], dim=-2), "expected torch.cat")


def test_perceiver_scores(capsys):
    def solution(q, k, dim_head):
        scale = dim_head ** -0.25
        return (q * scale) @ (k * scale).transpose(-2, -1)

    assert_pass(capsys, checks.perceiver_scores, solution)
    assert_pass(capsys, checks.perceiver_scores, lambda q, k, d: q @ k.transpose(-2, -1) / d ** 0.5)
    assert_todo(capsys, checks.perceiver_scores)
    assert_fail(capsys, checks.perceiver_scores, lambda q, k, d: q @ k.transpose(-2, -1), "not scaled")
    assert_fail(capsys, checks.perceiver_scores, lambda q, k, d: (q * d ** -0.5) @ (k * d ** -0.5).transpose(-2, -1),
                "1/dim_head")
    assert_fail(capsys, checks.perceiver_scores, lambda q, k, d: q.transpose(-2, -1) @ q, "transpose")


def resampler_solution(dim, depth, dim_head, heads, num_queries, embedding_dim, output_dim, ff_mult):
    inner = dim_head * heads
    attention = 4 * dim + dim * inner + dim * 2 * inner + inner * dim  # norm1, norm2, to_q, to_kv, to_out
    hidden = int(dim * ff_mult)
    ff = 2 * dim + dim * hidden + hidden * dim  # LayerNorm, two bias-free linears
    return (num_queries * dim + embedding_dim * dim + dim + depth * (attention + ff)
            + dim * output_dim + output_dim + 2 * output_dim)


def test_resampler_parameters(capsys):
    assert_pass(capsys, checks.resampler_parameters, resampler_solution)
    assert resampler_solution(768, 4, 64, 12, 16, 1280, 768, 4) == 29_918_208
    assert_todo(capsys, checks.resampler_parameters)
    assert_fail(capsys, checks.resampler_parameters,
                lambda **kw: resampler_solution(**kw) - kw["num_queries"] * kw["dim"], "learned latents")
    assert_fail(capsys, checks.resampler_parameters,
                lambda **kw: resampler_solution(**kw) - kw["depth"] * 4 * kw["dim"], "norm1")
    assert_fail(capsys, checks.resampler_parameters,
                lambda **kw: resampler_solution(**kw) - kw["depth"] * kw["dim"] * kw["dim_head"] * kw["heads"],
                "keys AND values")
    assert_fail(capsys, checks.resampler_parameters, lambda **kw: resampler_solution(**kw) + 1, "off by +1")


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
