"""Notebook 04, the training loop: dropping conditions, adding noise, one optimizer step.

One uniform draw decides what is dropped; DDPM noise at a timestep; the whole training step
(noise, predict, MSE against the noise, zero_grad / backward / step), checked against the
package's `ipa_lab.trainer.training_step` on two copies of the same toy model.
"""
from __future__ import annotations

import copy
import functools
import numbers

import torch
import torch.nn.functional as F

from .core import (CheckFailed, builds, checker, describe, expect, expect_close, expect_shape, reference, toy_pipeline,
                   tr)


def _as_bool_pair(value, what: str) -> tuple[bool, bool]:
    try:
        a, b = value
        return bool(a), bool(b)
    except (TypeError, ValueError, RuntimeError):
        raise CheckFailed(tr(f"{what}: return a pair (drop_image, drop_text) of booleans, got {value!r}",
                             f"{what}：应返回一对布尔值 (drop_image, drop_text)，实际得到 {value!r}")) from None


_ANSWERS = ((True, False), (False, True), (True, True))  # image, text, both dropped; past them: keep both


def _banded(u: float, upper_bounds) -> tuple[bool, bool]:
    """The answer of a draw against three band ends (image, text, both), tested in that order."""
    for upper, answer in zip(upper_bounds, _ANSWERS):
        if u < upper:
            return answer
    return False, False


def _non_cumulative(p_i: float, p_t: float, p_b: float) -> list[tuple[float, float, float]]:
    """Band ends that compare u with a probability alone instead of the running sum."""
    return [(p_i, p_t, p_i + p_t + p_b), (p_i, p_i + p_t, p_b), (p_i, p_t, p_b), (p_i, p_t, p_t + p_b)]


def _drop_probes():
    """(what, rates, band, lo, hi, u, want) for the start, middle and end of every band, two recipes."""
    recipes = [(tr("the original's rates (0.05, 0.05, 0.05)", "原版的丢弃率 (0.05, 0.05, 0.05)"), (0.05, 0.05, 0.05)),
               (tr("this course's short-run rates (0.05, 0.5, 0.05)", "本课程短训练的丢弃率 (0.05, 0.5, 0.05)"),
                (0.05, 0.5, 0.05))]
    for what, (p_i, p_t, p_b) in recipes:
        bands = [("image", 0.0, p_i), ("text", p_i, p_i + p_t), ("both", p_i + p_t, p_i + p_t + p_b),
                 ("keep", p_i + p_t + p_b, 1.0)]
        for (band, lo, hi), want in zip(bands, _ANSWERS + ((False, False),)):
            for u in (lo, (lo + hi) / 2, hi - 1e-9):
                yield what, (p_i, p_t, p_b), band, lo, hi, u, want


@checker
def drop_decision(fn) -> str:
    """fn(u, p_image, p_text, p_both) -> (drop_image, drop_text) for one uniform draw u in [0, 1).

    中文：fn(u, p_image, p_text, p_both) -> (drop_image, drop_text)，u 是 [0, 1) 中的一次均匀抽样。"""
    probes = [(probe, _as_bool_pair(fn(probe[5], *probe[1]), tr(f"u={probe[5]:.4f} with {probe[0]}",
                                                                 f"u={probe[5]:.4f}，{probe[0]}")))
              for probe in _drop_probes()]
    wrong = [(probe, got) for probe, got in probes if got != probe[6]]
    if not wrong:
        return tr("one uniform draw, four consecutive bands: image / text / both dropped, or keep; with the "
                  "original's rates 85% of the samples keep both.",
                  "一次均匀抽样，四个相邻区间：丢弃图像 / 丢弃文本 / 两者都丢弃，或都保留；按原版的丢弃率，"
                  "85% 的样本两者都保留。")
    (what, rates, band, lo, hi, u, want), got = wrong[0]
    where = tr(f"u={u:.4f} with {what}", f"u={u:.4f}（{what}）")
    # Bands that each start from 0 (u < p_text) overlap: name that before the edge-case hints below.
    for ends in range(4):
        if all(got == _banded(probe[5], _non_cumulative(*probe[1])[ends]) for probe, got in probes):
            raise CheckFailed(tr(
                f"{where} falls in the '{band}' band [{lo:.2f}, {hi:.2f}): expected {want}, got {got}. "
                "The bands are consecutive: compare with the running sum (text: u < p_image + p_text; "
                "both: u < p_image + p_text + p_both), not with one probability alone",
                f"{where}落在 '{band}' 区间 [{lo:.2f}, {hi:.2f}) 内：应为 {want}，实际得到 {got}。"
                "各区间是首尾相接的：要与累加和比较（text：u < p_image + p_text；"
                "both：u < p_image + p_text + p_both），而不是只与单个概率比较"))
    if band == "both":
        raise CheckFailed(tr(f"{where} falls in the 'both' band [{lo:.2f}, {hi:.2f}): drop the image AND the "
                             f"text, expected {want}, got {got}. One draw decides one of four cases",
                             f"{where}落在 'both' 区间 [{lo:.2f}, {hi:.2f}) 内：图像和文本都要丢弃，"
                             f"应为 {want}，实际得到 {got}。一次抽样决定四种情况之一"))
    if band == "keep":
        raise CheckFailed(tr(f"{where} is past all three bands (they end at p_image + p_text + p_both = "
                             f"{lo:.2f}): keep both, expected {want}, got {got}",
                             f"{where}超出了全部三个区间（它们止于 p_image + p_text + p_both = {lo:.2f}）："
                             f"两者都保留，应为 {want}，实际得到 {got}"))
    if u == lo and lo > 0:
        raise CheckFailed(tr(f"{where} sits exactly on the start of the '{band}' band [{lo:.2f}, {hi:.2f}): "
                             f"expected {want}, got {got}. Use u < upper bound, so each band includes its lower end",
                             f"{where}恰好落在 '{band}' 区间 [{lo:.2f}, {hi:.2f}) 的起点：应为 {want}，"
                             f"实际得到 {got}。用 u < 上界，让每个区间包含它的下端点"))
    raise CheckFailed(tr(f"{where} falls in the '{band}' band [{lo:.2f}, {hi:.2f}): expected (drop_image, "
                         f"drop_text) = {want}, got {got}. The bands are consecutive: image [0, p_image), "
                         "text [p_image, p_image + p_text), both [.., .. + p_both), keep the rest",
                         f"{where}落在 '{band}' 区间 [{lo:.2f}, {hi:.2f}) 内：(drop_image, drop_text) 应为 {want}，"
                         f"实际得到 {got}。各区间首尾相接：image [0, p_image)、text [p_image, p_image + p_text)、"
                         "both [.., .. + p_both)，其余为 keep"))


@checker
def noisy_latents(fn) -> str:
    """fn(latents, noise, timesteps, alphas_cumprod) -> the DDPM-noised latents at those timesteps.

    中文：fn(latents, noise, timesteps, alphas_cumprod) -> 在这些时间步按 DDPM 加噪后的潜变量。"""
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
    expect(isinstance(got, torch.Tensor), tr(f"return a torch.Tensor, got {type(got).__name__}",
                                             f"应返回 torch.Tensor，实际得到 {type(got).__name__}"))
    expect_shape(got, want.shape, tr("the noisy latents", "加噪后的潜变量"))
    passed = tr("x_t = sqrt(alpha_bar_t) * x_0 + sqrt(1 - alpha_bar_t) * noise, per sample: DDPMScheduler.add_noise.",
                "x_t = sqrt(alpha_bar_t) * x_0 + sqrt(1 - alpha_bar_t) * noise，逐样本计算：即 DDPMScheduler.add_noise。")
    if torch.allclose(got, want, atol=1e-5):
        return passed
    a = ab[timesteps].view(-1, 1, 1, 1)
    alphas = scheduler.alphas[timesteps].view(-1, 1, 1, 1)
    wrongs = [
        (a * latents + (1 - a) * noise, tr(
            "you used alpha_bar and 1 - alpha_bar as the weights; take their square roots "
            "(the variances add up to 1, not the weights)",
            "你把 alpha_bar 和 1 - alpha_bar 直接当作权重；要取它们的平方根（加起来等于 1 的是方差，不是权重）")),
        (a.sqrt() * noise + (1 - a).sqrt() * latents, tr(
            "the weights are swapped: sqrt(alpha_bar) goes with the clean "
            "latents, sqrt(1 - alpha_bar) with the noise",
            "权重用反了：sqrt(alpha_bar) 乘干净的潜变量，sqrt(1 - alpha_bar) 乘噪声")),
        (alphas.sqrt() * latents + (1 - alphas).sqrt() * noise, tr(
            "you used the one-step alphas; the jump from x_0 to "
            "x_t in one go uses their cumulative product alpha_bar_t = alphas_cumprod[t]",
            "你用的是单步的 alphas；从 x_0 一步跳到 x_t 要用它们的累积乘积 alpha_bar_t = alphas_cumprod[t]")),
        (latents + noise, tr(
            "you added the noise unscaled; weight x_0 by sqrt(alpha_bar_t) and the noise by "
            "sqrt(1 - alpha_bar_t)",
            "你加的噪声没有缩放；x_0 要乘 sqrt(alpha_bar_t)，噪声要乘 sqrt(1 - alpha_bar_t)")),
    ]
    for wrong, message in wrongs:
        expect(not torch.allclose(got, wrong, atol=1e-5), message)
    same = ab[timesteps[0]]
    flat = same.sqrt() * latents + (1 - same).sqrt() * noise
    expect(not torch.allclose(got, flat, atol=1e-5), tr(
        "every sample got the first sample's timestep: index "
        "alphas_cumprod with the whole timesteps tensor and reshape to (batch, 1, 1, 1)",
        "每个样本都用了第一个样本的时间步：要用整个 timesteps 张量索引 alphas_cumprod，再变形为 (batch, 1, 1, 1)"))
    expect_close(got, want, tr("the noisy latents", "加噪后的潜变量"), atol=1e-5)
    return passed


# ---------------------------------------------------------------------------------------------
# training_step: two steps on a copy of the toy model, compared with the package's step
LEARNING_RATE = 1e-3  # large enough that one AdamW step moves every trainable weight visibly


@functools.lru_cache(maxsize=1)
def _step_template():
    """The starting point of every run: the shipped toy UNet, frozen, with the package's adapter
    installed, and a seeded projection, as an `IPAdapter`. Shared: runs deep-copy it."""
    from ..adapter import freeze, install_ip_adapter
    from ..projection import ImageProjModel
    from ..trainer import IPAdapter

    pipe = toy_pipeline()
    unet = copy.deepcopy(pipe.unet)
    freeze(unet)  # freeze first, then install: the new to_k_ip / to_v_ip stay trainable
    with torch.random.fork_rng():
        torch.manual_seed(4)
        image_proj_model = ImageProjModel(cross_attention_dim=unet.config.cross_attention_dim,
                                          clip_embeddings_dim=pipe.image_encoder.config.projection_dim,
                                          clip_extra_context_tokens=4)
    return IPAdapter(unet, image_proj_model, install_ip_adapter(unet))


@functools.lru_cache(maxsize=1)
def _step_inputs() -> dict:
    """A batch of 2 (latents, 8 text tokens, image embeddings) and, per step, its noise and timesteps."""
    gen = torch.Generator().manual_seed(8)
    template = _step_template()
    width, embed = template.unet.config.cross_attention_dim, template.image_proj_model.clip_embeddings_dim
    return {"latents": torch.randn(2, 4, 8, 8, generator=gen), "text_embeds": torch.randn(2, 8, width, generator=gen),
            "image_embeds": torch.randn(2, embed, generator=gen),
            "steps": [(torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([100, 700])),
                      (torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([400, 900]))]}


def _noise_scheduler():
    """The training scheduler: DDPM with the toy pipeline's beta schedule (as `load_backbone` builds it)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(toy_pipeline().scheduler.config)


class _Run:
    """One fresh copy of the setup with its own AdamW, stepped by a training_step function."""

    def __init__(self):
        self.ip_adapter = copy.deepcopy(_step_template())
        self.trainable = {n: p for n, p in self.ip_adapter.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.AdamW(self.trainable.values(), lr=LEARNING_RATE)
        self.noise_scheduler = _noise_scheduler()

    def step(self, fn, k: int):
        """Step `k` (0 or 1): the same batch, its own noise and timesteps; clones, so fn may change them."""
        data = _step_inputs()
        noise, timesteps = data["steps"][k]
        return fn(self.ip_adapter, self.optimizer, self.noise_scheduler, data["latents"].clone(),
                  data["text_embeds"].clone(), data["image_embeds"].clone(), noise.clone(), timesteps.clone())

    def weights(self) -> dict:
        return {n: p.detach().clone() for n, p in self.trainable.items()}

    def grads(self) -> dict:
        return {n: None if p.grad is None else p.grad.detach().clone() for n, p in self.trainable.items()}


@functools.lru_cache(maxsize=1)
def _reference_steps() -> tuple:
    """(loss, weights, grads) after each of the two steps of the package's training_step."""
    run, records = _Run(), []
    for k in range(2):
        loss = run.step(reference("trainer.training_step"), k)
        records.append((loss, run.weights(), run.grads()))
    return tuple(records)


def _as_loss(value, k: int) -> float:
    """The returned loss as a float; a tensor is refused: it keeps the step's whole graph alive."""
    if isinstance(value, torch.Tensor):
        raise CheckFailed(tr(f"step {k + 1} returned {describe(value)}: return loss.item(), a Python float. A tensor "
                             "keeps the whole graph of the step (every activation) alive as long as you keep it, "
                             "e.g. in a list of losses",
                             f"第 {k + 1} 步返回了 {describe(value)}：应返回 loss.item()，一个 Python float。"
                             "只要你保留着张量（例如放在损失列表里），这一步的整个计算图（所有激活值）就一直占着内存"))
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise CheckFailed(tr(f"step {k + 1} returned {describe(value)}: return the loss as a float, loss.item()",
                             f"第 {k + 1} 步返回了 {describe(value)}：应以 float 返回损失，即 loss.item()"))
    return float(value)


def _same_number(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-5 * max(1.0, abs(b))


def _wrong_losses():
    """(loss, what is wrong) of plausible wrong steps, from the starting weights and step 1's draw.

    Lazy: each costs one forward pass of the UNet, and only a wrong loss needs them."""
    template, data = _step_template(), _step_inputs()
    noise, t = data["steps"][0]
    latents, text = data["latents"], data["text_embeds"]
    with torch.no_grad():
        tokens = template.image_proj_model(data["image_embeds"])
        noisy = _noise_scheduler().add_noise(latents, noise, t)
        predict = lambda x, states: template.unet(x, t, states).sample  # noqa: E731
        right = predict(noisy, torch.cat([text, tokens], 1))
        yield F.mse_loss(right, latents).item(), tr(
            "the target is the noise, not the clean latents: the UNet "
            "predicts the noise that was added (epsilon prediction)",
            "目标是噪声，不是干净的潜变量：UNet 预测的是加进去的噪声（epsilon 预测）")
        yield F.mse_loss(predict(latents, torch.cat([text, tokens], 1)), noise).item(), tr(
            "the UNet got the clean latents: add the noise first (noisy_latents(latents, noise, timesteps, "
            "noise_scheduler.alphas_cumprod)) and predict from the noisy ones",
            "UNet 拿到的是干净的潜变量：先加噪（noisy_latents(latents, noise, timesteps, "
            "noise_scheduler.alphas_cumprod)），再从加噪后的潜变量做预测")
        yield F.mse_loss(predict(noisy, torch.cat([tokens, text], 1)), noise).item(), tr(
            "the image tokens come before the text: IPAttnProcessor takes the LAST num_tokens tokens as the "
            "image, so append them after the text, torch.cat([text_embeds, image_tokens], dim=1)",
            "图像 token 放在了文本前面：IPAttnProcessor 把最后 num_tokens 个 token 当作图像，"
            "所以要把它们接在文本之后，torch.cat([text_embeds, image_tokens], dim=1)")
        yield F.mse_loss(predict(noisy, text), noise).item(), tr(
            "the UNet never saw the image tokens: project image_embeds with ip_adapter.image_proj_model and "
            "append the tokens after the text",
            "UNet 根本没看到图像 token：用 ip_adapter.image_proj_model 投影 image_embeds，再把这些 token 接在文本之后")
        yield ((right - noise) ** 2).sum().item(), tr(
            "you summed the squared errors; the original takes the mean, "
            "F.mse_loss(noise_pred, noise)",
            "你对平方误差求了和；原版取的是平均值，F.mse_loss(noise_pred, noise)")
        yield (right - noise).abs().mean().item(), tr(
            "that is the mean absolute error; the loss is the mean "
            "*squared* error",
            "这是平均绝对误差；损失应是均方误差（*平方*误差的平均）")


def _check_loss(loss: float, want: float, k: int) -> None:
    """Step k's loss is the reference's; a wrong first loss is matched against the plausible mistakes."""
    if _same_number(loss, want):
        return
    if k == 0:
        for wrong, message in _wrong_losses():
            expect(not _same_number(loss, wrong), tr(f"step 1 returned loss {loss:.5f}: {message}",
                                                     f"第 1 步返回的损失是 {loss:.5f}：{message}"))
    raise CheckFailed(tr(f"step {k + 1} returned loss {loss:.5f}, expected {want:.5f}: noise the latents at the "
                         "timesteps, predict with the UNet on [text; image tokens], MSE against the noise",
                         f"第 {k + 1} 步返回的损失是 {loss:.5f}，应为 {want:.5f}：在这些时间步给潜变量加噪，"
                         "用 UNet 在 [文本; 图像 token] 上做预测，再与噪声算 MSE"))


def _check_frozen(run: _Run, k: int) -> None:
    """The frozen UNet must come out of the step bit for bit as it went in."""
    start = dict(_step_template().named_parameters())
    for name, p in run.ip_adapter.named_parameters():
        if name not in run.trainable:
            expect(torch.equal(p, start[name]), tr(
                f"step {k + 1} changed the frozen weight {name}: only the "
                "projection and to_k_ip / to_v_ip may change (they alone are in the optimizer)",
                f"第 {k + 1} 步改动了冻结的权重 {name}：只有图像投影和 to_k_ip / to_v_ip 可以改变"
                "（只有它们在优化器里）"))


def _max_difference(a: dict, b: dict) -> tuple[float, str]:
    """The largest difference between two weight dicts, and the name where it is."""
    return max(((a[n] - b[n]).abs().max().item(), n) for n in b)


def _check_weights(run: _Run, k: int, before: dict) -> None:
    """After step k the trainable weights are the reference's; if not, the gradients say why."""
    _, want, want_grads = _reference_steps()[k]
    weights, grads = run.weights(), run.grads()
    diff, name = _max_difference(weights, want)
    if diff <= 1e-5:
        return
    if all(torch.equal(weights[n], before[n]) for n in weights):
        expect(any(g is not None and bool(g.any()) for g in grads.values()), tr(
            f"after step {k + 1} the trainable weights are unchanged and hold no gradient: the order is "
            "optimizer.zero_grad(), loss.backward(), optimizer.step() (zero_grad after backward erases the "
            "gradients before the step can use them)",
            f"第 {k + 1} 步之后可训练参数没有变化，也没有梯度：顺序应是 optimizer.zero_grad()、loss.backward()、"
            "optimizer.step()（在 backward 之后 zero_grad，会在 step 用上梯度之前就把它们清掉）"))
        raise CheckFailed(tr(f"after step {k + 1} the trainable weights are unchanged although their gradients are "
                             "there: call optimizer.step() after loss.backward()",
                             f"第 {k + 1} 步之后可训练参数没有变化，尽管梯度已经有了：在 loss.backward() 之后调用 "
                             "optimizer.step()"))
    expect(not all(g is not None and not g.any() for g in grads.values()), tr(
        f"in step {k + 1} the gradients were all zero when optimizer.step() ran: zero them before "
        "loss.backward(), not between backward and step",
        f"第 {k + 1} 步中 optimizer.step() 运行时梯度全为零：应在 loss.backward() 之前清零梯度，"
        "而不是在 backward 和 step 之间"))
    if k == 1:
        piled = {n: want_grads[n] + _reference_steps()[0][2][n] for n in want_grads}
        expect(not all(grads[n] is not None and torch.allclose(grads[n], piled[n], rtol=1e-4, atol=1e-8)
                       for n in grads),
               tr("step 2 used step 1's gradients plus its own: backward() adds to .grad, so call "
                  "optimizer.zero_grad() before loss.backward() in every step",
                  "第 2 步用的是第 1 步的梯度加上它自己的：backward() 会累加到 .grad 上，"
                  "所以每一步都要在 loss.backward() 之前调用 optimizer.zero_grad()"))
    raise CheckFailed(tr(f"your loss is right, but after step {k + 1} the trainable weights differ from one AdamW step "
                         f"on it by up to {diff:.3g} ({name}): call loss.backward() on that loss, then optimizer.step() "
                         "once",
                         f"你的损失是对的，但第 {k + 1} 步之后，可训练参数与在这个损失上做一次 AdamW 更新的结果"
                         f"相差最多 {diff:.3g}（{name}）：对这个损失调用 loss.backward()，再调用一次 optimizer.step()"))


@builds("trainer.training_step")
def training_step(fn) -> str:
    """fn(ip_adapter, optimizer, noise_scheduler, latents, text_embeds, image_embeds, noise, timesteps) -> the loss, a float.

    中文：fn(ip_adapter, optimizer, noise_scheduler, latents, text_embeds, image_embeds, noise, timesteps) -> 损失，一个 float。"""
    run = _Run()
    for k, (want_loss, _, _) in enumerate(_reference_steps()):
        before = run.weights()
        loss = _as_loss(run.step(fn, k), k)
        _check_frozen(run, k)
        _check_loss(loss, want_loss, k)
        _check_weights(run, k, before)
    return tr("noise, predict on [text; image tokens], MSE against the noise, then zero_grad, backward, step: "
              "the losses and the adapter's weights after two AdamW steps match the package's.",
              "加噪，在 [文本; 图像 token] 上预测，与噪声算 MSE，然后 zero_grad、backward、step："
              "两次 AdamW 更新后的损失和适配器权重都与 ipa_lab 的一致。")


# ----------------------------------------------------------------------------- the loop
class _RecordingTrainer:
    """A stand-in for `ipa_lab.trainer.Trainer` with the attributes the loop reads, which records
    what the loop asks for. Each step's draw and inputs are tagged with the step number, so the
    checker can see which step's draw reached which call."""

    def __init__(self):
        from types import SimpleNamespace

        self.device = torch.device("cpu")
        self.ip_adapter, self.optimizer = object(), object()
        self.bb = SimpleNamespace(noise_scheduler=object())
        self.draws, self.inputs_of = [], []

    def draw(self, step):
        from types import SimpleNamespace

        self.draws.append(step)
        return SimpleNamespace(step=step, noise=_DrawnOnTheCPU(torch.full((2, 1), float(step))),
                               timesteps=_DrawnOnTheCPU(torch.full((2,), step, dtype=torch.long)))

    def inputs(self, d, device):
        self.inputs_of.append(d.step)
        return (torch.full((2, 1), 1000.0 + d.step), torch.full((2, 1), 2000.0 + d.step),
                torch.full((2, 1), 3000.0 + d.step))


class _DrawnOnTheCPU:
    """A draw as the stand-in trainer hands it out: usable only after `.to(trainer.device)`, so a
    loop that forgets the move (which fails on a GPU, where the draws stay on the CPU) shows."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def to(self, *args, **kwargs):
        return self.tensor.clone()


def _recording_step(calls: list):
    """A step_fn that records its arguments and returns a loss that tells the steps apart."""

    def step_fn(ip_adapter, optimizer, noise_scheduler, latents, text, image, noise, timesteps):
        calls.append((ip_adapter, optimizer, noise_scheduler, latents, text, image, noise, timesteps))
        return 0.5 + (len(calls) - 1) / 100  # the k-th call's loss

    return step_fn


@builds("trainer.train_loop")
def train_loop(fn) -> str:
    """fn(trainer, steps, step_fn) -> the list of the losses step_fn returned, one per step.

    中文：fn(trainer, steps, step_fn) -> step_fn 返回的损失组成的列表，每步一个。"""
    for steps in (3, 5):
        trainer, calls = _RecordingTrainer(), []
        got = fn(trainer, steps, _recording_step(calls))
        where = tr(f"with steps={steps}", f"steps={steps} 时，")
        expect(len(calls) == steps, tr(
            f"{where} your loop called step_fn {len(calls)} times; once per step, "
            f"for step = 0, 1, ..., {steps - 1}",
            f"{where}你的循环调用了 step_fn {len(calls)} 次；应每步一次，step = 0, 1, ..., {steps - 1}"))
        expect(trainer.draws == list(range(steps)), tr(
            f"{where} your loop asked for the draws of steps "
            f"{trainer.draws}, expected {list(range(steps))}: call trainer.draw(step) once per step, with "
            "that step's number (the same draw every step would train on one batch again and again)",
            f"{where}你的循环取的是第 {trainer.draws} 步的抽样，应为 {list(range(steps))}：每步用该步的编号调用一次 "
            "trainer.draw(step)（每步都用同一次抽样，就会在同一个批次上反复训练）"))
        expect(trainer.inputs_of == list(range(steps)), tr(
            f"{where} trainer.inputs got the draws of steps "
            f"{trainer.inputs_of}: give it each step's own draw, trainer.inputs(d, trainer.device)",
            f"{where}trainer.inputs 拿到的是第 {trainer.inputs_of} 步的抽样：应把每一步自己的抽样交给它，"
            "trainer.inputs(d, trainer.device)"))
        for step, (ip_adapter, optimizer, scheduler, latents, text, image, noise, timesteps) in enumerate(calls):
            expect(ip_adapter is trainer.ip_adapter and optimizer is trainer.optimizer
                   and scheduler is trainer.bb.noise_scheduler, tr(
                       f"step {step}: pass step_fn the trainer's own "
                       "trainer.ip_adapter, trainer.optimizer and trainer.bb.noise_scheduler, in that order",
                       f"第 {step} 步：应按顺序把 trainer 自己的 trainer.ip_adapter、trainer.optimizer 和 "
                       "trainer.bb.noise_scheduler 传给 step_fn"))
            tags = [float(t.flatten()[0]) if isinstance(t, torch.Tensor) else None for t in (latents, text, image)]
            expect(tags == [1000.0 + step, 2000.0 + step, 3000.0 + step], tr(
                f"step {step}: step_fn did not get "
                "(latents, text, image) as trainer.inputs returned them, in that order",
                f"第 {step} 步：step_fn 拿到的不是 trainer.inputs 返回的 (latents, text, image)，或顺序不对"))
            expect(not isinstance(noise, _DrawnOnTheCPU) and not isinstance(timesteps, _DrawnOnTheCPU), tr(
                f"step {step}: move the draws to the trainer's device first, d.noise.to(trainer.device) and "
                "d.timesteps.to(trainer.device): they are drawn on the CPU, and on a GPU the UNet needs them there",
                f"第 {step} 步：先把抽样移到 trainer 的设备上，d.noise.to(trainer.device) 和 "
                "d.timesteps.to(trainer.device)：它们是在 CPU 上抽取的，而在 GPU 上 UNet 需要它们在 GPU 上"))
            expect(isinstance(noise, torch.Tensor) and isinstance(timesteps, torch.Tensor)
                   and float(noise.flatten()[0]) == step and int(timesteps[0]) == step, tr(
                       f"step {step}: pass this step's d.noise and d.timesteps (moved to trainer.device) as the last "
                       "two arguments",
                       f"第 {step} 步：把这一步的 d.noise 和 d.timesteps（已移到 trainer.device）作为最后两个参数传入"))
        want = [0.5 + step / 100 for step in range(steps)]
        expect(got is not None, tr("your loop returned None: collect what step_fn returns in a list and return it",
                                   "你的循环返回了 None：把 step_fn 的返回值收集到一个列表里并返回它"))
        expect(isinstance(got, (list, tuple)), tr(f"return a list of the losses, got {describe(got)}",
                                                  f"应返回损失的列表，实际得到 {describe(got)}"))
        expect(list(got) == want, tr(
            f"{where} your loop returned {_short_list(got)}, expected the {steps} losses "
            f"step_fn returned, in order: {_short_list(want)}",
            f"{where}你的循环返回了 {_short_list(got)}，应按顺序返回 step_fn 给出的 {steps} 个损失：{_short_list(want)}"))
    return tr("one draw per step, its inputs, your step: the whole training loop.",
              "每步一次抽样、取出它的输入、调用你的训练步：这就是完整的训练循环。")


def _short_list(values) -> str:
    return "[" + ", ".join(f"{v:.2f}" if isinstance(v, float) else repr(v) for v in list(values)[:6]) + "]"
