"""The build exercises of notebooks 04-06 (training_step, sampling_loop, perceiver_attention).

Each checker is a `checks.builds` one: `.passed(piece)` is its verdict, which must pass the
solution, report a stub as TODO and name the mistake in plausible wrong answers; calling the
checker itself returns the learner's piece on PASS and the package's reference otherwise."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ipa_lab import checks
from ipa_lab.generate import sampling_loop as reference_sampling_loop
from ipa_lab.projection import PerceiverAttention as ReferencePerceiverAttention
from ipa_lab.trainer import training_step as reference_training_step
from verdicts import assert_fail, assert_pass, assert_todo, stub, verdict


def assert_returns(capsys, check, piece, expected):
    """Calling a builds checker prints one verdict line and returns `expected`."""
    assert check(piece) is expected
    assert capsys.readouterr().out.count("\n") == 1


# --- notebook 04: training_step ------------------------------------------------------------------
def noisy_latents(latents, noise, timesteps, alphas_cumprod):
    a = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    return a.sqrt() * latents + (1 - a).sqrt() * noise


def step(ip_adapter, optimizer, noise_scheduler, latents, text_embeds, image_embeds, noise, timesteps, *,
         noised=True, target="noise", image_last=True, reduce=F.mse_loss, zero=True, backward=True, do_step=True,
         give=lambda loss: loss.item()):
    """The solution, with one knob per mistake."""
    noisy = noisy_latents(latents, noise, timesteps, noise_scheduler.alphas_cumprod) if noised else latents
    image_tokens = ip_adapter.image_proj_model(image_embeds)
    parts = [text_embeds, image_tokens] if image_last else [image_tokens, text_embeds]
    noise_pred = ip_adapter.unet(noisy, timesteps, torch.cat(parts, dim=1)).sample
    loss = reduce(noise_pred.float(), (noise if target == "noise" else latents).float())
    if zero:
        optimizer.zero_grad()
    if backward:
        loss.backward()
    if do_step:
        optimizer.step()
    return give(loss)


def step_through_forward(ip_adapter, optimizer, noise_scheduler, latents, text_embeds, image_embeds, noise, timesteps):
    """The same step written with IPAdapter.forward and the scheduler's add_noise."""
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    loss = F.mse_loss(ip_adapter(noisy, timesteps, text_embeds, image_embeds), noise)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def step_touching_the_unet(*args):
    loss = step(*args)
    with torch.no_grad():
        args[0].unet.conv_in.weight.mul_(1.01)
    return loss


def wrong_step(**mistake):
    return functools.partial(step, **mistake)


def test_training_step(capsys):
    check = checks.training_step.passed
    assert_pass(capsys, check, step)
    assert_pass(capsys, check, step_through_forward)
    assert_pass(capsys, check, wrong_step(give=lambda loss: np.float64(loss.item())))  # numpy floats are floats
    assert_todo(capsys, check)
    assert_fail(capsys, check, wrong_step(target="latents"), "step 1", "the target is the noise")
    assert_fail(capsys, check, wrong_step(noised=False), "clean latents", "add the noise")
    assert_fail(capsys, check, wrong_step(image_last=False), "image tokens come before the text", "LAST")
    assert_fail(capsys, check, wrong_step(reduce=lambda a, b: ((a - b) ** 2).sum()), "summed")
    assert_fail(capsys, check, wrong_step(do_step=False), "unchanged", "call optimizer.step()")
    assert_fail(capsys, check, wrong_step(zero=False), "step 2", "optimizer.zero_grad() before loss.backward()")
    assert_fail(capsys, check, wrong_step(backward=False), "hold no gradient", "loss.backward()")
    assert_fail(capsys, check, wrong_step(give=lambda loss: loss), "returned a tensor", "loss.item()")
    assert_fail(capsys, check, wrong_step(give=lambda loss: None), "NoneType", "loss.item()")
    assert_fail(capsys, check, step_touching_the_unet, "frozen weight unet.conv_in.weight")
    assert_fail(capsys, check, wrong_step(reduce=lambda a, b: a.view(-1, 3)), "your code raised RuntimeError")


def test_training_step_returns_the_piece_to_use(capsys):
    assert_returns(capsys, checks.training_step, step, step)
    assert_returns(capsys, checks.training_step, stub, reference_training_step)
    assert_returns(capsys, checks.training_step, wrong_step(do_step=False), reference_training_step)


# --- notebook 05: sampling_loop ------------------------------------------------------------------
def loop(unet, scheduler, prompt_embeds, negative_prompt_embeds, latents, num_inference_steps, guidance_scale, *,
         set_timesteps=True, init_sigma=True, scale_input=True, embeds="uncond first", chunks="uncond first",
         guide=None, two_calls=False, give="latents"):
    """The solution, with one knob per mistake (and two harmless variations)."""
    guide = guide or (lambda uncond, cond, w: uncond + w * (cond - uncond))
    if set_timesteps:
        scheduler.set_timesteps(num_inference_steps)
    if init_sigma:
        latents = latents * scheduler.init_noise_sigma
    scale = scheduler.scale_model_input if scale_input else (lambda x, t: x)
    both = [negative_prompt_embeds, prompt_embeds]
    for t in scheduler.timesteps:
        if two_calls:
            model_input = scale(latents, t)
            noise_uncond, noise_cond = (unet(model_input, t, encoder_hidden_states=e).sample for e in both)
        else:
            model_input = scale(torch.cat([latents] * 2), t)
            states = torch.cat(both if embeds == "uncond first" else both[::-1])
            first, second = unet(model_input, t, encoder_hidden_states=states).sample.chunk(2)
            noise_uncond, noise_cond = (first, second) if chunks == "uncond first" else (second, first)
        noise_pred = guide(noise_uncond, noise_cond, guidance_scale)
        latents = scheduler.step(noise_pred, t, latents).prev_sample
    return latents if give == "latents" else noise_pred


def wrong_loop(**mistake):
    return functools.partial(loop, **mistake)


def test_sampling_loop(capsys):
    check = checks.sampling_loop.passed
    assert_pass(capsys, check, loop)
    assert_pass(capsys, check, reference_sampling_loop)
    assert_pass(capsys, check, wrong_loop(embeds="cond first", chunks="cond first"))  # read back the same way
    ok, out = checks.sampling_loop.passed(wrong_loop(two_calls=True)), capsys.readouterr().out
    assert ok and "up to rounding" in out and "twice" in out, out  # the same math in two calls: accepted
    assert_todo(capsys, check)
    assert_fail(capsys, check, wrong_loop(embeds="cond first"), "branches are swapped", "[uncond; cond]")
    assert_fail(capsys, check, wrong_loop(init_sigma=False), "Euler", "init_noise_sigma")
    assert_fail(capsys, check, wrong_loop(scale_input=False), "Euler", "scale_model_input")
    assert_fail(capsys, check, wrong_loop(init_sigma=False, scale_input=False), "scale_model_input")
    assert_fail(capsys, check, wrong_loop(guide=lambda u, c, w: w * c + (1 - w) * u), "rounds differently",
                "bit for bit")
    assert_fail(capsys, check, wrong_loop(guide=lambda u, c, w: c + w * (c - u)), "starts from the conditional")
    assert_fail(capsys, check, wrong_loop(guide=lambda u, c, w: c), "one branch's noise alone")
    assert_fail(capsys, check, wrong_loop(give="noise"), "returned the last noise prediction")
    assert_fail(capsys, check, wrong_loop(set_timesteps=False), "scheduler.set_timesteps(num_inference_steps)")


def test_sampling_loop_stops_a_loop_over_too_many_timesteps(capsys):
    def fifty_steps(unet, scheduler, *args):
        scheduler.set_timesteps(50)
        return loop(unet, scheduler, *args, set_timesteps=False)

    assert_fail(capsys, checks.sampling_loop.passed, fifty_steps, "more than 8 times")


def test_sampling_loop_returns_the_piece_to_use(capsys):
    assert_returns(capsys, checks.sampling_loop, loop, loop)
    assert_returns(capsys, checks.sampling_loop, stub, reference_sampling_loop)
    assert_returns(capsys, checks.sampling_loop, wrong_loop(give="noise"), reference_sampling_loop)


# --- notebook 06: perceiver_attention ------------------------------------------------------------
def split_heads(x, heads):
    batch, length, _ = x.shape
    return x.view(batch, length, heads, -1).transpose(1, 2)


def merge_heads(x):
    batch, heads, length, dim_head = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * dim_head)


def perceiver(*, kv="x and latents", norms="right", q_power=-0.25, k_power=-0.25, softmax_dim=-1, one_head=False,
              bias=False, separate_kv=False, to_out=True, sqrt_once=False):
    """The solution's class, with one knob per mistake (and two harmless variations)."""

    class PerceiverAttention(nn.Module):
        def __init__(self, *, dim, dim_head=64, heads=8):
            super().__init__()
            self.heads, self.dim_head = heads, dim_head
            inner = dim_head * heads
            self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.to_q = nn.Linear(dim, inner, bias=bias)
            if separate_kv:
                self.to_k, self.to_v = nn.Linear(dim, inner, bias=False), nn.Linear(dim, inner, bias=False)
            else:
                self.to_kv = nn.Linear(dim, inner * 2, bias=False)
            self.to_out = nn.Linear(inner, dim, bias=False)

        def forward(self, x, latents):
            if norms == "right":
                x, latents = self.norm1(x), self.norm2(latents)
            elif norms == "swapped":
                x, latents = self.norm2(x), self.norm1(latents)
            heads = 1 if one_head else self.heads
            source = {"x and latents": [x, latents], "latents and x": [latents, x], "x": [x]}[kv]
            q = split_heads(self.to_q(latents), heads)
            k, v = self.to_kv(torch.cat(source, dim=-2)).chunk(2, dim=-1)
            k, v = split_heads(k, heads), split_heads(v, heads)
            if sqrt_once:
                scores = q @ k.transpose(-2, -1) / self.dim_head ** 0.5
            else:
                scores = (q * self.dim_head ** q_power) @ (k * self.dim_head ** k_power).transpose(-2, -1)
            out = merge_heads(torch.softmax(scores, dim=softmax_dim) @ v)
            return self.to_out(out) if to_out else out

    return PerceiverAttention


class StubForward(perceiver()):
    """A half-done student copy: the layers are there, forward is still the stub."""

    def forward(self, x, latents):
        raise NotImplementedError("your code here")


class CrashingForward(perceiver()):
    def forward(self, x, latents):
        return self.to_q(x) @ self.to_q(latents)  # (.., inner) @ (.., inner): a shape error


def test_perceiver_attention(capsys):
    check = checks.perceiver_attention.passed
    assert_pass(capsys, check, perceiver())
    assert_pass(capsys, check, ReferencePerceiverAttention)
    assert_pass(capsys, check, perceiver(kv="latents and x"))  # the keys' order does not change attention
    assert_pass(capsys, check, perceiver(sqrt_once=True))  # 1/sqrt(d) once: the same scores
    assert_todo(capsys, check)
    assert_fail(capsys, check, CrashingForward, "your code raised RuntimeError")
    assert_fail(capsys, check, perceiver(kv="x"), "image features alone", "torch.cat([x, latents], dim=-2)")
    assert_fail(capsys, check, perceiver(norms="none"), "no LayerNorms")
    assert_fail(capsys, check, perceiver(norms="swapped"), "norm1 and norm2 are swapped")
    assert_fail(capsys, check, perceiver(k_power=0.0), "only q is scaled")
    assert_fail(capsys, check, perceiver(q_power=0.0, k_power=0.0), "not scaled")
    assert_fail(capsys, check, perceiver(softmax_dim=-2), "softmax runs over the queries")
    assert_fail(capsys, check, perceiver(one_head=True), "heads are not split")
    assert_fail(capsys, check, perceiver(bias=True), "to_q.bias", "bias=False")
    assert_fail(capsys, check, perceiver(separate_kv=True), "to_k and to_v", "to_kv.weight")
    assert_fail(capsys, check, perceiver(to_out=False), "apply to_out")


def test_perceiver_attention_with_a_stubbed_forward_is_todo(capsys):
    ok, out = verdict(capsys, checks.perceiver_attention.passed, StubForward)
    assert ok is False and out.startswith("TODO perceiver_attention: not yet implemented"), out


@pytest.mark.parametrize("size", [(64, 64, 12), (32, 8, 4)])
def test_perceiver_attention_hard_coded_sizes_fail(capsys, size):
    dim, dim_head, heads = size

    class HardCoded(perceiver()):
        def __init__(self, *, dim, dim_head=64, heads=8):
            super().__init__(dim=dim, dim_head=size[1], heads=size[2])

    assert_fail(capsys, checks.perceiver_attention.passed, HardCoded, "has shape")


def test_perceiver_attention_returns_the_piece_to_use(capsys):
    mine = perceiver()
    assert_returns(capsys, checks.perceiver_attention, mine, mine)
    assert_returns(capsys, checks.perceiver_attention, stub, ReferencePerceiverAttention)
    assert_returns(capsys, checks.perceiver_attention, perceiver(norms="swapped"), ReferencePerceiverAttention)


# --- notebook 04: the loop ----------------------------------------------------------------
def test_train_loop(capsys):
    """The package's loop is notebook 04's solution (nbval runs the notebook's own copy)."""
    from ipa_lab.trainer import train_loop as reference_loop

    train_loop_solution = reference_loop
    check = checks.train_loop.passed
    assert_pass(capsys, check, reference_loop)
    assert_todo(capsys, check)

    def same_draw(trainer, steps, step_fn):  # draws step 0 every time: one batch over and over
        d = trainer.draw(0)
        return [step_fn(trainer.ip_adapter, trainer.optimizer, trainer.bb.noise_scheduler, *trainer.inputs(d, "cpu"),
                        d.noise, d.timesteps) for _ in range(steps)]

    def off_by_one(trainer, steps, step_fn):
        return train_loop_solution(trainer, steps - 1, step_fn)

    def forgets_losses(trainer, steps, step_fn):
        train_loop_solution(trainer, steps, step_fn)

    def inputs_swapped(trainer, steps, step_fn):
        losses = []
        for step in range(steps):
            d = trainer.draw(step)
            latents, text, image = trainer.inputs(d, trainer.device)
            losses.append(step_fn(trainer.ip_adapter, trainer.optimizer, trainer.bb.noise_scheduler, latents, image, text,
                                  d.noise, d.timesteps))
        return losses

    assert_fail(capsys, check, same_draw, "asked for the draws of steps [0]", "one batch again and again")
    assert_fail(capsys, check, off_by_one, "called step_fn 2 times")
    assert_fail(capsys, check, forgets_losses, "returned None")
    assert_fail(capsys, check, inputs_swapped, "(latents, text, image)")


def test_train_loop_returns_the_piece_to_use(capsys):
    from ipa_lab.trainer import train_loop as reference_loop

    def mine(trainer, steps, step_fn):
        return reference_loop(trainer, steps, step_fn)

    assert checks.train_loop(mine) is mine
    assert checks.train_loop(lambda trainer, steps, step_fn: []) is reference_loop
    assert "the notebook carries on with ipa_lab's train_loop" in capsys.readouterr().out


def test_train_loop_names_draws_left_on_the_cpu(capsys):
    def unmoved(trainer, steps, step_fn):  # fine on a CPU, a device mismatch on a GPU
        losses = []
        for step in range(steps):
            d = trainer.draw(step)
            latents, text, image = trainer.inputs(d, trainer.device)
            losses.append(step_fn(trainer.ip_adapter, trainer.optimizer, trainer.bb.noise_scheduler, latents, text,
                                  image, d.noise, d.timesteps))
        return losses

    assert_fail(capsys, checks.train_loop.passed, unmoved, "d.noise.to(trainer.device)")
