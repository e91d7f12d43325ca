"""Notebook 04, the training loop: dropping conditions, adding noise, scoring the prediction.

One uniform draw decides what is dropped; DDPM noise at a timestep; the epsilon-prediction loss.
"""
from __future__ import annotations

import torch

from .core import CheckFailed, checker, expect, expect_close, expect_shape


def _as_bool_pair(value, what: str) -> tuple[bool, bool]:
    try:
        a, b = value
        return bool(a), bool(b)
    except (TypeError, ValueError, RuntimeError):
        raise CheckFailed(f"{what}: return a pair (drop_image, drop_text) of booleans, got {value!r}") from None


@checker
def drop_decision(fn) -> str:
    """fn(u, p_image, p_text, p_both) -> (drop_image, drop_text) for one uniform draw u in [0, 1)."""
    recipes = [("the original's rates (0.05, 0.05, 0.05)", 0.05, 0.05, 0.05),
               ("this course's short-run rates (0.05, 0.5, 0.05)", 0.05, 0.5, 0.05)]
    for what, p_i, p_t, p_b in recipes:
        bands = [("image", 0.0, p_i, (True, False)), ("text", p_i, p_i + p_t, (False, True)),
                 ("both", p_i + p_t, p_i + p_t + p_b, (True, True)), ("keep", p_i + p_t + p_b, 1.0, (False, False))]
        for band, lo, hi, want in bands:
            for u in (lo, (lo + hi) / 2, hi - 1e-9):
                got = _as_bool_pair(fn(u, p_i, p_t, p_b), f"u={u:.4f} with {what}")
                if got == want:
                    continue
                where = f"u={u:.4f} with {what}"
                if band == "both":
                    raise CheckFailed(f"{where} falls in the 'both' band [{lo:.2f}, {hi:.2f}): drop the image AND the "
                                      f"text, expected {want}, got {got}. One draw decides one of four cases")
                if band == "keep":
                    raise CheckFailed(f"{where} is past all three bands (they end at p_image + p_text + p_both = "
                                      f"{lo:.2f}): keep both, expected {want}, got {got}")
                if u == lo and lo > 0:
                    raise CheckFailed(f"{where} sits exactly on the start of the '{band}' band [{lo:.2f}, {hi:.2f}): "
                                      f"expected {want}, got {got}. Use u < upper bound, so each band includes its "
                                      "lower end")
                raise CheckFailed(f"{where} falls in the '{band}' band [{lo:.2f}, {hi:.2f}): expected (drop_image, "
                                  f"drop_text) = {want}, got {got}. The bands are consecutive: image [0, p_image), "
                                  "text [p_image, p_image + p_text), both [.., .. + p_both), keep the rest")
    return ("one uniform draw, four consecutive bands: image / text / both dropped, or keep; with the original's "
            "rates 85% of the samples keep both.")


@checker
def noisy_latents(fn) -> str:
    """fn(latents, noise, timesteps, alphas_cumprod) -> the DDPM-noised latents at those timesteps."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 4, 8, 8, generator=gen)
    noise = torch.randn(4, 4, 8, 8, generator=gen)
    timesteps = torch.tensor([0, 250, 600, 999])
    ab = scheduler.alphas_cumprod
    want = scheduler.add_noise(latents, noise, timesteps)
    got = fn(latents.clone(), noise.clone(), timesteps.clone(), ab.clone())
    expect(isinstance(got, torch.Tensor), f"return a torch.Tensor, got {type(got).__name__}")
    expect_shape(got, want.shape, "the noisy latents")
    passed = "x_t = sqrt(alpha_bar_t) * x_0 + sqrt(1 - alpha_bar_t) * noise, per sample: DDPMScheduler.add_noise."
    if torch.allclose(got, want, atol=1e-5):
        return passed
    a = ab[timesteps].view(-1, 1, 1, 1)
    alphas = scheduler.alphas[timesteps].view(-1, 1, 1, 1)
    wrongs = [
        (a * latents + (1 - a) * noise, "you used alpha_bar and 1 - alpha_bar as the weights; take their square roots "
         "(the variances add up to 1, not the weights)"),
        (a.sqrt() * noise + (1 - a).sqrt() * latents, "the weights are swapped: sqrt(alpha_bar) goes with the clean "
         "latents, sqrt(1 - alpha_bar) with the noise"),
        (alphas.sqrt() * latents + (1 - alphas).sqrt() * noise, "you used the one-step alphas; the jump from x_0 to "
         "x_t in one go uses their cumulative product alpha_bar_t = alphas_cumprod[t]"),
        (latents + noise, "you added the noise unscaled; weight x_0 by sqrt(alpha_bar_t) and the noise by "
         "sqrt(1 - alpha_bar_t)"),
    ]
    for wrong, message in wrongs:
        expect(not torch.allclose(got, wrong, atol=1e-5), message)
    same = ab[timesteps[0]]
    flat = same.sqrt() * latents + (1 - same).sqrt() * noise
    expect(not torch.allclose(got, flat, atol=1e-5), "every sample got the first sample's timestep: index "
           "alphas_cumprod with the whole timesteps tensor and reshape to (batch, 1, 1, 1)")
    expect_close(got, want, "the noisy latents", atol=1e-5)
    return passed


@checker
def diffusion_loss(fn) -> str:
    """fn(noise_pred, noise, latents) -> the training loss (a scalar tensor)."""
    gen = torch.Generator().manual_seed(1)
    latents, noise = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    pred = (noise + 0.3 * torch.randn(3, 4, 8, 8, generator=gen)).requires_grad_(True)
    want = torch.nn.functional.mse_loss(pred, noise)
    got = fn(pred, noise, latents)
    expect(isinstance(got, torch.Tensor), f"return a torch.Tensor, got {type(got).__name__}")
    expect(got.numel() == 1, f"return one number (the mean over every element), got shape {tuple(got.shape)}")
    value = got.float().reshape(()).item()
    expect(abs(value - torch.nn.functional.mse_loss(pred, latents).item()) > 1e-4,
           "you compared the prediction with the clean latents; the UNet predicts the noise that was added "
           "(epsilon prediction), so the target is the noise")
    expect(abs(value - ((pred - noise) ** 2).sum().item()) > 1e-3,
           "you summed the squared errors; the original takes the mean (F.mse_loss(..., reduction='mean'))")
    expect(abs(value - (pred - noise).abs().mean().item()) > 1e-4,
           "that is the mean absolute error; the diffusion loss is the mean *squared* error")
    expect(abs(value - want.item()) < 1e-5, f"your loss is {value:.5f}, expected {want.item():.5f}")
    expect(got.requires_grad, "your loss carries no gradient (.item(), .detach() or torch.no_grad()?): the "
           "optimizer needs loss.backward() to reach the adapter")
    return "MSE between the predicted and the true noise, averaged over every element."
