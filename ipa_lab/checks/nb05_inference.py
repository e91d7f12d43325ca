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
                   toy_pipeline, tr)


@checker
def compose_prompt_embeds(fn) -> str:
    """fn(text, negative_text, image_tokens, uncond_image_tokens) -> (prompt_embeds, negative_prompt_embeds).

    中文：fn(text, negative_text, image_tokens, uncond_image_tokens) -> (prompt_embeds, negative_prompt_embeds)，即条件分支和无条件分支各自的 token 序列。"""
    gen = torch.Generator().manual_seed(2)
    batch, length, tokens, dim = 2, 16, 4, 64
    text, negative = torch.randn(batch, length, dim, generator=gen), torch.randn(batch, length, dim, generator=gen)
    image, uncond = torch.randn(batch, tokens, dim, generator=gen), torch.randn(batch, tokens, dim, generator=gen)
    got = fn(text, negative, image, uncond)
    expect(not isinstance(got, torch.Tensor), tr(
        "you returned one tensor; return a pair (prompt_embeds, "
        "negative_prompt_embeds): one sequence for the conditional branch, one for the unconditional",
        "你只返回了一个张量；应返回一对 (prompt_embeds, negative_prompt_embeds)：条件分支一个序列，无条件分支一个序列"))
    try:
        cond_got, uncond_got = got
    except (TypeError, ValueError):
        raise CheckFailed(tr(f"return a pair (prompt_embeds, negative_prompt_embeds), got {type(got).__name__}",
                             f"应返回一对 (prompt_embeds, negative_prompt_embeds)，实际得到 {type(got).__name__}")) from None
    want_cond, want_uncond = torch.cat([text, image], 1), torch.cat([negative, uncond], 1)
    for t, what in ((cond_got, "prompt_embeds"), (uncond_got, "negative_prompt_embeds")):
        expect(isinstance(t, torch.Tensor), tr(f"{what} should be a torch.Tensor, got {type(t).__name__}",
                                               f"{what} 应为 torch.Tensor，实际得到 {type(t).__name__}"))
        expect(tuple(t.shape) != (batch, length, dim + tokens) and tuple(t.shape) != (batch, length, 2 * dim), tr(
            f"{what} has shape {tuple(t.shape)}: the tokens were joined along the features (dim 2); append the "
            "image tokens along the sequence, dim 1",
            f"{what} 的形状是 {tuple(t.shape)}：token 被沿特征维（dim 2）拼接了；应沿序列维 dim 1 把图像 token 接在后面"))
        expect_shape(t, want_cond.shape, tr(f"{what} (text tokens then image tokens, along dim 1)",
                                            f"{what}（先文本 token 再图像 token，沿 dim 1）"))
    if torch.equal(cond_got, want_uncond) and torch.equal(uncond_got, want_cond):
        raise CheckFailed(tr("the two results are swapped: first the conditional [text; image tokens], then the "
                             "unconditional [negative text; unconditional image tokens]",
                             "两个结果的顺序反了：先是条件分支的 [文本; 图像 token]，再是无条件分支的 "
                             "[负向文本; 无条件图像 token]"))
    expect(not torch.equal(cond_got, torch.cat([image, text], 1)), tr(
        "prompt_embeds has the image tokens first; "
        "IPAttnProcessor takes the LAST num_tokens tokens as the image, so they go after the text",
        "prompt_embeds 把图像 token 放在了前面；IPAttnProcessor 把最后 num_tokens 个 token 当作图像，"
        "所以它们要接在文本之后"))
    expect(torch.equal(cond_got, want_cond), tr("prompt_embeds should be torch.cat([text, image_tokens], dim=1)",
                                                "prompt_embeds 应为 torch.cat([text, image_tokens], dim=1)"))
    expect(not torch.equal(uncond_got, torch.cat([negative, image], 1)), tr(
        "negative_prompt_embeds carries the image "
        "tokens; the unconditional branch gets the unconditional image tokens (the 'no image' the model saw "
        "in training), otherwise guidance cancels the image out",
        "negative_prompt_embeds 带上了图像 token；无条件分支应使用无条件图像 token（模型在训练中见过的“无图像”），"
        "否则引导会把图像的作用抵消掉"))
    expect(not torch.equal(uncond_got, torch.cat([uncond, negative], 1)), tr(
        "negative_prompt_embeds has the image "
        "tokens first; they go after the text",
        "negative_prompt_embeds 把图像 token 放在了前面；它们要接在文本之后"))
    expect(torch.equal(uncond_got, want_uncond), tr(
        "negative_prompt_embeds should be torch.cat([negative_text, uncond_image_tokens], dim=1)",
        "negative_prompt_embeds 应为 torch.cat([negative_text, uncond_image_tokens], dim=1)"))
    return tr("[text; image] for the conditional branch, [negative text; 'no image'] for the unconditional one.",
              "条件分支用 [文本; 图像]，无条件分支用 [负向文本; “无图像”]。")


@checker
def unconditional_image_tokens(fn) -> str:
    """fn(image_proj_model) -> the 'no image' tokens of the base model, (1, num_tokens, dim).

    中文：fn(image_proj_model) -> 基础模型的“无图像” token，形状 (1, num_tokens, dim)。"""
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
    expect(isinstance(got, torch.Tensor), tr(f"return a torch.Tensor, got {type(got).__name__}",
                                             f"应返回 torch.Tensor，实际得到 {type(got).__name__}"))
    expect(got.numel() == want.numel(), tr(
        f"the tokens have shape {tuple(got.shape)}, expected {tuple(want.shape)}: "
        "one image's worth of tokens (num_tokens x cross_attention_dim)",
        f"token 的形状是 {tuple(got.shape)}，应为 {tuple(want.shape)}：一张图像的 token（num_tokens x cross_attention_dim）"))
    got = got.detach().reshape(want.shape)
    expect(bool(got.abs().sum() > 0), tr(
        "you returned all-zero tokens; in training a dropped image was a zero "
        "*embedding*, passed through the projection: proj(0) is proj's bias, and the LayerNorm then gives "
        "tokens that are not zero. Project torch.zeros(1, clip_embeddings_dim)",
        "你返回了全零的 token；训练时被丢弃的图像是一个全零的*图像嵌入*，它还要经过图像投影：proj(0) 就是 proj 的偏置，"
        "再经过 LayerNorm 得到的 token 并不为零。请对 torch.zeros(1, clip_embeddings_dim) 做投影"))
    expect(not torch.allclose(got, model.proj.bias.detach().reshape(want.shape), atol=1e-5), tr(
        "you returned proj's bias without the LayerNorm; run the whole projection on a zero embedding",
        "你返回的是没经过 LayerNorm 的 proj 偏置；应对全零嵌入运行完整的图像投影"))
    expect_close(got, want, tr("the unconditional tokens", "无条件 token"), atol=1e-5)
    return tr("the projection of a zero image embedding: exactly what the model saw whenever an image was dropped.",
              "全零图像嵌入的投影：正是训练中每次丢弃图像时模型看到的东西。")


@checker
def guidance(fn) -> str:
    """fn(noise_uncond, noise_cond, guidance_scale) -> the classifier-free guided noise prediction.

    中文：fn(noise_uncond, noise_cond, guidance_scale) -> 经无分类器引导（CFG）的噪声预测。"""
    gen = torch.Generator().manual_seed(4)
    uncond, cond = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    for w in (7.5, 1.0, 0.0, 5.0):
        got = fn(uncond.clone(), cond.clone(), w)
        want = uncond + w * (cond - uncond)
        what = tr(f"the guided prediction at guidance_scale={w}", f"guidance_scale={w} 时的引导预测")
        expect(isinstance(got, torch.Tensor), tr(f"return a torch.Tensor, got {type(got).__name__}",
                                                 f"应返回 torch.Tensor，实际得到 {type(got).__name__}"))
        expect_shape(got, want.shape, what)
        if torch.allclose(got, want, atol=1e-5):
            continue
        expect(not torch.allclose(got, cond + w * (cond - uncond), atol=1e-5), tr(
            f"{what}: start from the "
            "unconditional prediction, uncond + w * (cond - uncond); at w = 1 that gives cond exactly",
            f"{what}：应从无条件预测出发，uncond + w * (cond - uncond)；w = 1 时它恰好等于 cond"))
        expect(not torch.allclose(got, uncond + w * (uncond - cond), atol=1e-5), tr(
            f"{what}: the difference points "
            "the wrong way; move from uncond towards cond: uncond + w * (cond - uncond)",
            f"{what}：差值的方向反了；应从 uncond 朝 cond 移动：uncond + w * (cond - uncond)"))
        expect_close(got, want, what)
    return tr("uncond + w * (cond - uncond): w = 1 is the conditional prediction, w > 1 pushes past it.",
              "uncond + w * (cond - uncond)：w = 1 即条件预测，w > 1 则越过它继续推进。")


# ---------------------------------------------------------------------------------------------
# sampling_loop: the learner's loop against StableDiffusionPipeline's own, on the toy model
# (what, scheduler class, batch, steps, guidance scale). DDIM is the toy's scheduler (its
# init_noise_sigma is 1 and scale_model_input does nothing); Euler needs both. `what` is an
# (English, Chinese) pair: `_what(case)` says it in the learner's language.
_SAMPLING_CASES = ((("the toy's DDIM scheduler, 1 image, 4 steps, guidance 7.5",
                     "用玩具模型的 DDIM 调度器、1 张图、4 步、引导系数 7.5 时"), "DDIMScheduler", 1, 4, 7.5),
                   (("EulerDiscreteScheduler (init_noise_sigma is not 1), 2 images, 4 steps, guidance 5",
                     "用 EulerDiscreteScheduler（init_noise_sigma 不为 1）、2 张图、4 步、引导系数 5 时"),
                    "EulerDiscreteScheduler", 2, 4, 5.0))


def _what(case) -> str:
    """The case's description, in the learner's language."""
    return tr(*case[0])


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
    _, _, _, steps, _ = case
    what = _what(case)
    expect(scheduler.num_inference_steps is not None, tr(
        f"with {what}: call scheduler.set_timesteps("
        "num_inference_steps) before the loop; a new scheduler's timesteps are all 1000 training steps",
        f"{what}：循环之前要调用 scheduler.set_timesteps(num_inference_steps)；"
        "新建调度器的时间步是全部 1000 个训练时间步"))
    raise CheckFailed(tr(f"with {what}: your loop called the UNet more than {2 * steps} times for num_inference_steps="
                         f"{steps}: loop over scheduler.timesteps after scheduler.set_timesteps(num_inference_steps)",
                         f"{what}：num_inference_steps={steps}，你的循环调用 UNet 超过了 {2 * steps} 次："
                         "应在 scheduler.set_timesteps(num_inference_steps) 之后遍历 scheduler.timesteps"))


def _first_input_hint(case, watch) -> None:
    """The UNet's input at the first two steps tells whether init_noise_sigma / scale_model_input were used."""
    _, name, batch, steps, _ = case
    what = _what(case)
    _, _, latents, _ = _sampling_references()[_SAMPLING_CASES.index(case)]
    per_step = len(watch.calls) // max(1, len(watch.steps))
    probe = _fresh_scheduler_at(name, steps)
    init, timesteps = probe.init_noise_sigma, probe.timesteps
    scaled = lambda x, t: _fresh_scheduler_at(name, steps).scale_model_input(x, t)  # noqa: E731
    first = watch.calls[0][0][:batch] if isinstance(watch.calls[0][0], torch.Tensor) else None
    if first is None or _close(first, scaled(latents * init, timesteps[0])):
        if len(watch.calls) > per_step and len(watch.steps) > 0 and watch.steps[0][2] is not None:
            second, prev = watch.calls[per_step][0], watch.steps[0][2]
            expect(not (_close(second[:batch], prev) and not _close(prev, scaled(prev, timesteps[1]))), tr(
                f"with {what}: the UNet got the latents unscaled: feed it "
                "scheduler.scale_model_input(model_input, t) (Euler divides by sqrt(sigma^2 + 1); DDIM leaves it alone, so the toy's scheduler hides this)",
                f"{what}：UNet 拿到的潜变量没有缩放：应输入 scheduler.scale_model_input(model_input, t)"
                "（Euler 会除以 sqrt(sigma^2 + 1)；DDIM 不做改动，所以玩具模型的调度器掩盖了这个问题）"))
        return
    expect(not _close(first, scaled(latents, timesteps[0])), tr(
        f"with {what}: the loop starts from the noise as given: "
        f"multiply it by scheduler.init_noise_sigma first ({float(init):.3g} here; 1 for DDIM, so the toy's "
        "scheduler hides this)",
        f"{what}：循环直接从给定的噪声开始了：应先乘以 scheduler.init_noise_sigma"
        f"（这里是 {float(init):.3g}；DDIM 是 1，所以玩具模型的调度器掩盖了这个问题）"))
    expect(not _close(first, latents * init), tr(
        f"with {what}: the UNet got the latents unscaled: feed it "
        "scheduler.scale_model_input(model_input, t) (Euler divides by sqrt(sigma^2 + 1); DDIM leaves it alone)",
        f"{what}：UNet 拿到的潜变量没有缩放：应输入 scheduler.scale_model_input(model_input, t)"
        "（Euler 会除以 sqrt(sigma^2 + 1)；DDIM 不做改动）"))


def _fresh_scheduler_at(name: str, steps: int):
    """A new scheduler set to `steps` timesteps (scale_model_input then finds its sigma from t alone)."""
    scheduler = _fresh_scheduler(name)
    scheduler.set_timesteps(steps)
    return scheduler


def _branches(case, watch):
    """(noise_uncond, noise_cond) of the first step, from the UNet calls, as the learner ordered them."""
    prompt, negative, _, _ = _sampling_references()[_SAMPLING_CASES.index(case)]
    what = _what(case)
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
    raise CheckFailed(tr(f"with {what}: the UNet's encoder_hidden_states are neither torch.cat([negative_prompt_embeds, "
                         "prompt_embeds]) (one call on the doubled batch, unconditional first, as the pipeline does) "
                         "nor the two of them in two calls",
                         f"{what}：UNet 的 encoder_hidden_states 既不是 torch.cat([negative_prompt_embeds, "
                         "prompt_embeds])（像 pipeline 那样在加倍的批次上调用一次，无条件在前），"
                         "也不是分两次调用时的这两者"))


def _guidance_hint(case, watch) -> None:
    """The noise given to the first scheduler.step must be noise_uncond + w * (noise_cond - noise_uncond)."""
    w, what = case[4], _what(case)
    uncond, cond = _branches(case, watch)
    guided = watch.steps[0][0]
    want = uncond + w * (cond - uncond)
    if not isinstance(guided, torch.Tensor) or _equal(guided, want):
        return
    diff = (guided - want).abs().max().item()
    expect(not _close(guided, cond + w * (uncond - cond)), tr(
        f"with {what}: the branches are swapped: guidance "
        "pushes away from the prompt. The pipeline's order is [uncond; cond]: the UNet reads "
        "torch.cat([negative_prompt_embeds, prompt_embeds]) and .chunk(2) gives (noise_uncond, noise_cond)",
        f"{what}：两个分支颠倒了：引导把结果推离了提示。pipeline 的顺序是 [uncond; cond]：UNet 读入 "
        "torch.cat([negative_prompt_embeds, prompt_embeds])，.chunk(2) 得到 (noise_uncond, noise_cond)"))
    expect(not _close(guided, want), tr(
        f"with {what}: your guided noise rounds differently from the pipeline's (up to "
        f"{diff:.2g}): compute noise_uncond + guidance_scale * (noise_cond - "
        "noise_uncond), the pipeline's order of operations, to match it bit for bit",
        f"{what}：你的引导噪声与 pipeline 的舍入不同（相差最多 {diff:.2g}）：按 pipeline 的运算顺序计算 "
        "noise_uncond + guidance_scale * (noise_cond - noise_uncond)，才能逐位一致"))
    expect(not (_close(guided, cond) or _close(guided, uncond)), tr(
        f"with {what}: scheduler.step got one branch's "
        "noise alone: combine them with your guidance function first",
        f"{what}：scheduler.step 只拿到了一个分支的噪声：应先用你的 guidance 函数把两者合起来"))
    expect(not _close(guided, cond + w * (cond - uncond)), tr(
        f"with {what}: the guidance starts from the conditional "
        "prediction: start from the unconditional one, noise_uncond + guidance_scale * (noise_cond - noise_uncond)",
        f"{what}：引导是从条件预测出发的：应从无条件预测出发，"
        "noise_uncond + guidance_scale * (noise_cond - noise_uncond)"))
    raise CheckFailed(tr(f"with {what}: the noise passed to scheduler.step differs from noise_uncond + guidance_scale * "
                         f"(noise_cond - noise_uncond) by up to {diff:.3g}: check "
                         "the guidance formula",
                         f"{what}：传给 scheduler.step 的噪声与 noise_uncond + guidance_scale * "
                         f"(noise_cond - noise_uncond) 相差最多 {diff:.3g}：请检查引导公式"))


def _sampling_failure(case, got, want, watch) -> None:
    """Name what is wrong with a result that is not the pipeline's; return if it is accepted (two calls)."""
    _, _, batch, steps, _ = case
    what = _what(case)
    expect(isinstance(got, torch.Tensor), tr(f"return the final latents, a tensor; got {describe(got)}",
                                             f"应返回最终的潜变量（一个张量）；实际得到 {describe(got)}"))
    expect(tuple(got.shape) != (2 * batch, *want.shape[1:]), tr(
        f"with {what}: you returned {tuple(got.shape)}: the "
        "doubled batch; the latents themselves are not doubled, only the UNet's input (torch.cat([latents] * 2))",
        f"{what}：你返回了 {tuple(got.shape)}，即加倍后的批次；潜变量本身不加倍，"
        "只有 UNet 的输入才加倍（torch.cat([latents] * 2)）"))
    expect_shape(got, want.shape, tr(f"with {what}: the final latents", f"{what}：最终的潜变量"))
    expect(len(watch.calls) > 0, tr("the UNet was never called", "UNet 一次都没有被调用"))
    expect(len(watch.steps) == steps, tr(
        f"with {what}: scheduler.step ran {len(watch.steps)} times for "
        f"num_inference_steps={steps}: once per t in scheduler.timesteps",
        f"{what}：num_inference_steps={steps}，scheduler.step 却运行了 {len(watch.steps)} 次："
        "应对 scheduler.timesteps 中的每个 t 运行一次"))
    expect(not _equal(got, watch.steps[-1][0]), tr(
        f"with {what}: you returned the last noise prediction: return the "
        "latents, scheduler.step(noise_pred, t, latents).prev_sample after the last step",
        f"{what}：你返回的是最后一次噪声预测：应返回潜变量，即最后一步的 "
        "scheduler.step(noise_pred, t, latents).prev_sample"))
    _first_input_hint(case, watch)
    _guidance_hint(case, watch)
    diff = (got - want).abs().max().item()
    if len(watch.calls) == 2 * steps and _close(got, want):
        return  # two UNet calls a step: the same math on half batches, equal up to rounding
    expect(not _close(got, want), tr(
        f"with {what}: your latents are within {diff:.2g} of the pipeline's but not bit for "
        "bit: the pipeline makes one UNet call per step on torch.cat([negative_prompt_embeds, prompt_embeds]) "
        "([uncond; cond]) and guides with noise_uncond + guidance_scale * (noise_cond - noise_uncond)",
        f"{what}：你的潜变量与 pipeline 的相差在 {diff:.2g} 以内，但没有逐位一致：pipeline 每步只调用一次 UNet，"
        "输入 torch.cat([negative_prompt_embeds, prompt_embeds])（[uncond; cond]），"
        "并用 noise_uncond + guidance_scale * (noise_cond - noise_uncond) 做引导"))
    raise CheckFailed(tr(f"with {what}: your final latents differ from the pipeline's by up to {diff:.3g}",
                         f"{what}：你最终的潜变量与 pipeline 的相差最多 {diff:.3g}"))


@builds("generate.sampling_loop")
def sampling_loop(fn) -> str:
    """fn(unet, scheduler, prompt_embeds, negative_prompt_embeds, latents, num_inference_steps, guidance_scale) -> the final latents.

    中文：fn(unet, scheduler, prompt_embeds, negative_prompt_embeds, latents, num_inference_steps, guidance_scale) -> 最终的潜变量。"""
    unet = copy.deepcopy(_adapted_pipeline()[0].unet)  # hooks go on a copy, never on the shared pipeline
    two_calls = False
    with _without_diffusers_deprecations():
        for case, (_, _, _, want) in zip(_SAMPLING_CASES, _sampling_references()):
            got, watch = _run_learner(fn, unet, case)
            if not _equal(got, want):
                _sampling_failure(case, got, want, watch)
                two_calls = True
    passed = tr("set_timesteps, noise x init_noise_sigma, then per timestep the UNet on [uncond; cond], guidance and "
                "scheduler.step",
                "set_timesteps，噪声乘以 init_noise_sigma，然后每个时间步：UNet 处理 [uncond; cond]、引导、scheduler.step")
    if two_calls:
        return tr(f"{passed}: the pipeline's latents up to rounding, with DDIM and Euler. You call the UNet twice per "
                  "step; the pipeline runs both branches in one call on a doubled batch (faster).",
                  f"{passed}：用 DDIM 和 Euler 都得到与 pipeline 在舍入误差内一致的潜变量。你每步调用两次 UNet；"
                  "pipeline 在加倍的批次上一次调用就跑完两个分支（更快）。")
    return tr(f"{passed}: bit for bit the pipeline's latents, with DDIM and Euler.",
              f"{passed}：用 DDIM 和 Euler 都与 pipeline 的潜变量逐位一致。")
