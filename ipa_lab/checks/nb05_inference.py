"""Notebook 05, inference: what the UNet reads in each branch of classifier-free guidance.

The conditional and unconditional token sequences, the 'no image' tokens, the guidance step, and
the whole sampling loop, which must give the pipeline's latents bit for bit.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import warnings

import torch

from .core import (CheckFailed, LearnerRaised, builds, checker, describe, expect, expect_close, expect_shape,
                   toy_pipeline)


@checker
def compose_prompt_embeds(fn) -> str:
    """fn(text, negative_text, image_tokens, uncond_image_tokens) -> (prompt_embeds, negative_prompt_embeds)."""
    gen = torch.Generator().manual_seed(2)
    batch, length, tokens, dim = 2, 16, 4, 64
    text, negative = torch.randn(batch, length, dim, generator=gen), torch.randn(batch, length, dim, generator=gen)
    image, uncond = torch.randn(batch, tokens, dim, generator=gen), torch.randn(batch, tokens, dim, generator=gen)
    got = fn(text, negative, image, uncond)
    expect(not isinstance(got, torch.Tensor), "you returned one tensor; return a pair (prompt_embeds, "
           "negative_prompt_embeds): one sequence for the conditional branch, one for the unconditional")
    try:
        cond_got, uncond_got = got
    except (TypeError, ValueError):
        raise CheckFailed(f"return a pair (prompt_embeds, negative_prompt_embeds), got {type(got).__name__}") from None
    want_cond, want_uncond = torch.cat([text, image], 1), torch.cat([negative, uncond], 1)
    for t, what in ((cond_got, "prompt_embeds"), (uncond_got, "negative_prompt_embeds")):
        expect(isinstance(t, torch.Tensor), f"{what} should be a torch.Tensor, got {type(t).__name__}")
        expect(tuple(t.shape) != (batch, length, dim + tokens) and tuple(t.shape) != (batch, length, 2 * dim),
               f"{what} has shape {tuple(t.shape)}: the tokens were joined along the features (dim 2); append the "
               "image tokens along the sequence, dim 1")
        expect_shape(t, want_cond.shape, f"{what} (text tokens then image tokens, along dim 1)")
    if torch.equal(cond_got, want_uncond) and torch.equal(uncond_got, want_cond):
        raise CheckFailed("the two results are swapped: first the conditional [text; image tokens], then the "
                          "unconditional [negative text; unconditional image tokens]")
    expect(not torch.equal(cond_got, torch.cat([image, text], 1)), "prompt_embeds has the image tokens first; "
           "IPAttnProcessor takes the LAST num_tokens tokens as the image, so they go after the text")
    expect(torch.equal(cond_got, want_cond), "prompt_embeds should be torch.cat([text, image_tokens], dim=1)")
    expect(not torch.equal(uncond_got, torch.cat([negative, image], 1)), "negative_prompt_embeds carries the image "
           "tokens; the unconditional branch gets the unconditional image tokens (the 'no image' the model saw "
           "in training), otherwise guidance cancels the image out")
    expect(not torch.equal(uncond_got, torch.cat([uncond, negative], 1)), "negative_prompt_embeds has the image "
           "tokens first; they go after the text")
    expect(torch.equal(uncond_got, want_uncond),
           "negative_prompt_embeds should be torch.cat([negative_text, uncond_image_tokens], dim=1)")
    return "[text; image] for the conditional branch, [negative text; 'no image'] for the unconditional one."


@checker
def unconditional_image_tokens(fn) -> str:
    """fn(image_proj_model) -> the 'no image' tokens of the base model, (1, num_tokens, dim)."""
    from ..projection import ImageProjModel

    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = ImageProjModel(cross_attention_dim=64, clip_embeddings_dim=32, clip_extra_context_tokens=4)
        with torch.no_grad():
            model.proj.bias.normal_(0, 0.5)
            model.norm.weight.normal_(1, 0.3)
            model.norm.bias.normal_(0, 0.3)
    with torch.no_grad():
        want = model(torch.zeros(1, 32))
        got = fn(model)
    expect(isinstance(got, torch.Tensor), f"return a torch.Tensor, got {type(got).__name__}")
    expect(got.numel() == want.numel(), f"the tokens have shape {tuple(got.shape)}, expected {tuple(want.shape)}: "
           "one image's worth of tokens (num_tokens x cross_attention_dim)")
    got = got.detach().reshape(want.shape)
    expect(bool(got.abs().sum() > 0), "you returned all-zero tokens; in training a dropped image was a zero "
           "*embedding*, passed through the projection: proj(0) is proj's bias, and the LayerNorm then gives "
           "tokens that are not zero. Project torch.zeros(1, clip_embeddings_dim)")
    expect(not torch.allclose(got, model.proj.bias.detach().reshape(want.shape), atol=1e-5),
           "you returned proj's bias without the LayerNorm; run the whole projection on a zero embedding")
    expect_close(got, want, "the unconditional tokens", atol=1e-5)
    return "the projection of a zero image embedding: exactly what the model saw whenever an image was dropped."


@checker
def guidance(fn) -> str:
    """fn(noise_uncond, noise_cond, guidance_scale) -> the classifier-free guided noise prediction."""
    gen = torch.Generator().manual_seed(4)
    uncond, cond = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    for w in (7.5, 1.0, 0.0, 5.0):
        got = fn(uncond.clone(), cond.clone(), w)
        want = uncond + w * (cond - uncond)
        what = f"the guided prediction at guidance_scale={w}"
        expect(isinstance(got, torch.Tensor), f"return a torch.Tensor, got {type(got).__name__}")
        expect_shape(got, want.shape, what)
        if torch.allclose(got, want, atol=1e-5):
            continue
        expect(not torch.allclose(got, cond + w * (cond - uncond), atol=1e-5), f"{what}: start from the "
               "unconditional prediction, uncond + w * (cond - uncond); at w = 1 that gives cond exactly")
        expect(not torch.allclose(got, uncond + w * (uncond - cond), atol=1e-5), f"{what}: the difference points "
               "the wrong way; move from uncond towards cond: uncond + w * (cond - uncond)")
        expect_close(got, want, what)
    return "uncond + w * (cond - uncond): w = 1 is the conditional prediction, w > 1 pushes past it."


# ---------------------------------------------------------------------------------------------
# sampling_loop: the learner's loop against StableDiffusionPipeline's own, on the toy model
# (what, scheduler class, batch, steps, guidance scale). DDIM is the toy's scheduler (its
# init_noise_sigma is 1 and scale_model_input does nothing); Euler needs both.
_SAMPLING_CASES = (("the toy's DDIM scheduler, 1 image, 4 steps, guidance 7.5", "DDIMScheduler", 1, 4, 7.5),
                   ("EulerDiscreteScheduler (init_noise_sigma is not 1), 2 images, 4 steps, guidance 5",
                    "EulerDiscreteScheduler", 2, 4, 5.0))


@functools.lru_cache(maxsize=1)
def _adapted_pipeline():
    """A copy of the shipped toy pipeline with the shipped toy adapter loaded; returns (pipe, projection)."""
    from ..generate import load_adapter
    from ..pipeline import REPO_ROOT

    pipe = copy.deepcopy(toy_pipeline())
    image_proj_model = load_adapter(pipe, REPO_ROOT / "data" / "ip-adapter-toy" / "ip_adapter.safetensors")
    return pipe, image_proj_model


def _fresh_scheduler(name: str):
    """A new scheduler of class `name` with the toy's settings: set_timesteps and step change its state."""
    import diffusers

    return getattr(diffusers, name).from_config(toy_pipeline().scheduler.config)


@contextlib.contextmanager
def _without_diffusers_deprecations():
    """Euler's set_timesteps trips a numpy DeprecationWarning inside diffusers: nothing the learner can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"diffusers\.")
        yield


@functools.lru_cache(maxsize=1)
def _sampling_references() -> tuple:
    """Per case: (prompt_embeds, negative_prompt_embeds, latents, the pipeline's final latents).

    The embeddings end with image tokens from the adapter's projection (an image embedding for the
    prompt, a zero one for the negative), as in notebook 05; the truth is the pipeline's own call."""
    pipe, image_proj_model = _adapted_pipeline()
    gen = torch.Generator().manual_seed(5)
    width, embed = pipe.unet.config.cross_attention_dim, image_proj_model.clip_embeddings_dim
    cases = []
    with torch.no_grad():
        for _, name, batch, steps, scale in _SAMPLING_CASES:
            image = image_proj_model(torch.randn(batch, embed, generator=gen))
            no_image = image_proj_model(torch.zeros(batch, embed))
            prompt = torch.cat([torch.randn(batch, 8, width, generator=gen), image], 1)
            negative = torch.cat([torch.randn(batch, 8, width, generator=gen), no_image], 1)
            latents = torch.randn(batch, 4, 8, 8, generator=gen)
            pipe.scheduler = _fresh_scheduler(name)
            want = pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, latents=latents.clone(),
                        num_inference_steps=steps, guidance_scale=scale, output_type="latent").images
            cases.append((prompt, negative, latents, want))
    return tuple(cases)


class _TooManyCalls(Exception):
    """Raised inside the learner's loop to stop it: it calls the UNet more often than any right loop."""


class _Watch:
    """Records one run of the learner's loop: every UNet call (input, timestep, encoder states, output)
    and every scheduler.step (model_output, sample, prev_sample). Stops a loop that runs away."""

    def __init__(self, unet, scheduler, max_calls: int):
        self.unet, self.scheduler, self.max_calls = unet, scheduler, max_calls
        self.calls, self.steps = [], []

    def __enter__(self):
        self.handles = [self.unet.register_forward_pre_hook(self._before, with_kwargs=True),
                        self.unet.register_forward_hook(self._after, with_kwargs=True)]
        original = self.scheduler.step

        def step(*args, **kwargs):  # the scheduler's own step, recorded
            out = original(*args, **kwargs)
            self._record_step(args, kwargs, out)
            return out

        self.scheduler.step = step
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def _before(self, module, args, kwargs):
        if len(self.calls) >= self.max_calls:
            raise _TooManyCalls()
        inputs = list(args) + [kwargs.get(k) for k in ("sample", "timestep", "encoder_hidden_states")[len(args):]]
        self.calls.append([_copy(x) for x in inputs[:3]] + [None])

    def _after(self, module, args, kwargs, output):
        self.calls[-1][3] = _copy(output[0] if isinstance(output, tuple) else output.sample)

    def _record_step(self, args, kwargs, out):
        try:
            model_output = args[0] if args else kwargs.get("model_output")
            sample = args[2] if len(args) > 2 else kwargs.get("sample")
            prev = out[0] if isinstance(out, tuple) else out.prev_sample
            self.steps.append((_copy(model_output), _copy(sample), _copy(prev)))
        except Exception:  # recording must never break the learner's loop
            self.steps.append((None, None, None))


def _copy(x):
    return x.detach().clone() if isinstance(x, torch.Tensor) else x


def _equal(a, b) -> bool:
    """Bit for bit the same tensor (False for anything that is not a tensor)."""
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)


def _close(a, b, rtol: float = 1e-4) -> bool:
    """Equal up to rounding: within rtol of the larger values."""
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and torch.allclose(a.float(), b.float(), rtol=rtol, atol=rtol * max(1.0, b.abs().max().item())))


def _run_learner(fn, unet, case):
    """The learner's loop on one case, watched; returns (result, watch)."""
    what, name, batch, steps, scale = case
    prompt, negative, latents, _ = _sampling_references()[_SAMPLING_CASES.index(case)]
    scheduler = _fresh_scheduler(name)
    with _Watch(unet, scheduler, max_calls=2 * steps) as watch, torch.no_grad():
        try:
            got = fn(unet, scheduler, prompt.clone(), negative.clone(), latents.clone(), steps, scale)
        except LearnerRaised as e:
            if isinstance(e.error, _TooManyCalls) or scheduler.num_inference_steps is None:
                _timesteps_failure(case, scheduler)
            raise
    return got, watch


def _timesteps_failure(case, scheduler):
    """The loop ran away or the scheduler refused to step: most likely set_timesteps was not called."""
    what, _, _, steps, _ = case
    expect(scheduler.num_inference_steps is not None, f"with {what}: call scheduler.set_timesteps("
           "num_inference_steps) before the loop; a new scheduler's timesteps are all 1000 training steps")
    raise CheckFailed(f"with {what}: your loop called the UNet more than {2 * steps} times for num_inference_steps="
                      f"{steps}: loop over scheduler.timesteps after scheduler.set_timesteps(num_inference_steps)")


def _first_input_hint(case, watch) -> None:
    """The UNet's input at the first two steps tells whether init_noise_sigma / scale_model_input were used."""
    what, name, batch, steps, _ = case
    _, _, latents, _ = _sampling_references()[_SAMPLING_CASES.index(case)]
    per_step = len(watch.calls) // max(1, len(watch.steps))
    probe = _fresh_scheduler_at(name, steps)
    init, timesteps = probe.init_noise_sigma, probe.timesteps
    scaled = lambda x, t: _fresh_scheduler_at(name, steps).scale_model_input(x, t)  # noqa: E731
    first = watch.calls[0][0][:batch] if isinstance(watch.calls[0][0], torch.Tensor) else None
    if first is None or _close(first, scaled(latents * init, timesteps[0])):
        if len(watch.calls) > per_step and len(watch.steps) > 0 and watch.steps[0][2] is not None:
            second, prev = watch.calls[per_step][0], watch.steps[0][2]
            expect(not (_close(second[:batch], prev) and not _close(prev, scaled(prev, timesteps[1]))),
                   f"with {what}: the UNet got the latents unscaled: feed it "
                   "scheduler.scale_model_input(model_input, t) (Euler divides by sqrt(sigma^2 + 1); DDIM leaves it alone, so the toy's scheduler hides this)")
        return
    expect(not _close(first, scaled(latents, timesteps[0])), f"with {what}: the loop starts from the noise as given: "
           f"multiply it by scheduler.init_noise_sigma first ({float(init):.3g} here; 1 for DDIM, so the toy's "
           "scheduler hides this)")
    expect(not _close(first, latents * init), f"with {what}: the UNet got the latents unscaled: feed it "
           "scheduler.scale_model_input(model_input, t) (Euler divides by sqrt(sigma^2 + 1); DDIM leaves it alone)")


def _fresh_scheduler_at(name: str, steps: int):
    """A new scheduler set to `steps` timesteps (scale_model_input then finds its sigma from t alone)."""
    scheduler = _fresh_scheduler(name)
    scheduler.set_timesteps(steps)
    return scheduler


def _branches(case, watch):
    """(noise_uncond, noise_cond) of the first step, from the UNet calls, as the learner ordered them."""
    prompt, negative, _, _ = _sampling_references()[_SAMPLING_CASES.index(case)]
    what, _, batch, _, _ = case
    both = torch.cat([negative, prompt])
    _, _, states, out = watch.calls[0]
    if _equal(states, both):
        return out.chunk(2)
    if _equal(states, torch.cat([prompt, negative])):  # cond first: fine if the chunks are read that way too
        return out.chunk(2)[::-1]
    if len(watch.calls) >= 2 and _equal(states, negative) and _equal(watch.calls[1][2], prompt):
        return out, watch.calls[1][3]
    if len(watch.calls) >= 2 and _equal(states, prompt) and _equal(watch.calls[1][2], negative):
        return watch.calls[1][3], out
    raise CheckFailed(f"with {what}: the UNet's encoder_hidden_states are neither torch.cat([negative_prompt_embeds, "
                      "prompt_embeds]) (one call on the doubled batch, unconditional first, as the pipeline does) "
                      "nor the two of them in two calls")


def _guidance_hint(case, watch) -> None:
    """The noise given to the first scheduler.step must be noise_uncond + w * (noise_cond - noise_uncond)."""
    what, _, _, _, w = case
    uncond, cond = _branches(case, watch)
    guided = watch.steps[0][0]
    want = uncond + w * (cond - uncond)
    if not isinstance(guided, torch.Tensor) or _equal(guided, want):
        return
    expect(not _close(guided, cond + w * (uncond - cond)), f"with {what}: the branches are swapped: guidance "
           "pushes away from the prompt. The pipeline's order is [uncond; cond]: the UNet reads "
           "torch.cat([negative_prompt_embeds, prompt_embeds]) and .chunk(2) gives (noise_uncond, noise_cond)")
    expect(not _close(guided, want), f"with {what}: your guided noise rounds differently from the pipeline's (up to "
           f"{(guided - want).abs().max().item():.2g}): compute noise_uncond + guidance_scale * (noise_cond - "
           "noise_uncond), the pipeline's order of operations, to match it bit for bit")
    expect(not (_close(guided, cond) or _close(guided, uncond)), f"with {what}: scheduler.step got one branch's "
           "noise alone: combine them with your guidance function first")
    expect(not _close(guided, cond + w * (cond - uncond)), f"with {what}: the guidance starts from the conditional "
           "prediction: start from the unconditional one, noise_uncond + guidance_scale * (noise_cond - noise_uncond)")
    raise CheckFailed(f"with {what}: the noise passed to scheduler.step differs from noise_uncond + guidance_scale * "
                      f"(noise_cond - noise_uncond) by up to {(guided - want).abs().max().item():.3g}: check "
                      "the guidance formula")


def _sampling_failure(case, got, want, watch) -> None:
    """Name what is wrong with a result that is not the pipeline's; return if it is accepted (two calls)."""
    what, _, batch, steps, _ = case
    expect(isinstance(got, torch.Tensor), f"return the final latents, a tensor; got {describe(got)}")
    expect(tuple(got.shape) != (2 * batch, *want.shape[1:]), f"with {what}: you returned {tuple(got.shape)}: the "
           "doubled batch; the latents themselves are not doubled, only the UNet's input (torch.cat([latents] * 2))")
    expect_shape(got, want.shape, f"with {what}: the final latents")
    expect(len(watch.calls) > 0, "the UNet was never called")
    expect(len(watch.steps) == steps, f"with {what}: scheduler.step ran {len(watch.steps)} times for "
           f"num_inference_steps={steps}: once per t in scheduler.timesteps")
    expect(not _equal(got, watch.steps[-1][0]), f"with {what}: you returned the last noise prediction: return the "
           "latents, scheduler.step(noise_pred, t, latents).prev_sample after the last step")
    _first_input_hint(case, watch)
    _guidance_hint(case, watch)
    diff = (got - want).abs().max().item()
    if len(watch.calls) == 2 * steps and _close(got, want):
        return  # two UNet calls a step: the same math on half batches, equal up to rounding
    expect(not _close(got, want), f"with {what}: your latents are within {diff:.2g} of the pipeline's but not bit for "
           "bit: the pipeline makes one UNet call per step on torch.cat([negative_prompt_embeds, prompt_embeds]) "
           "([uncond; cond]) and guides with noise_uncond + guidance_scale * (noise_cond - noise_uncond)")
    raise CheckFailed(f"with {what}: your final latents differ from the pipeline's by up to {diff:.3g}")


@builds("generate.sampling_loop")
def sampling_loop(fn) -> str:
    """fn(unet, scheduler, prompt_embeds, negative_prompt_embeds, latents, num_inference_steps, guidance_scale) -> the final latents."""
    unet = copy.deepcopy(_adapted_pipeline()[0].unet)  # hooks go on a copy, never on the shared pipeline
    two_calls = False
    with _without_diffusers_deprecations():
        for case, (_, _, _, want) in zip(_SAMPLING_CASES, _sampling_references()):
            got, watch = _run_learner(fn, unet, case)
            if not _equal(got, want):
                _sampling_failure(case, got, want, watch)
                two_calls = True
    passed = ("set_timesteps, noise x init_noise_sigma, then per timestep the UNet on [uncond; cond], guidance and "
              "scheduler.step")
    if two_calls:
        return (f"{passed}: the pipeline's latents up to rounding, with DDIM and Euler. You call the UNet twice per "
                "step; the pipeline runs both branches in one call on a doubled batch (faster).")
    return f"{passed}: bit for bit the pipeline's latents, with DDIM and Euler."
