"""The exercise checkers of notebooks 04-07 in Chinese: under checks.set_language("zh-CN") every
checker says TODO to the stub, FAIL to wrong answers and PASS to the right one, with the same
verdict word and name as in English, then Chinese, and a line that is not the English one.

The answers are the existing tests' (test_checks_04_07.py, test_checks_build_04_06.py); the
wrong ones reach each checker's main hints, so an English message left untranslated shows."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from ipa_lab import checks
from ipa_lab.checks import core
from ipa_lab.generate import sampling_loop as reference_sampling_loop
from ipa_lab.projection import PerceiverAttention as ReferencePerceiverAttention
from ipa_lab.trainer import train_loop as reference_train_loop
from ipa_lab.trainer import training_step as reference_training_step
from test_checks_04_07 import drop_bands_from_zero, drop_decision_solution, noisy_solution
from test_checks_build_04_06 import CrashingForward, loop, perceiver, step, wrong_loop, wrong_step
from verdicts import stub

CJK = re.compile(r"[\u4e00-\u9fff]")
# Words of an English sentence: in a Chinese verdict they mean a message left untranslated.
ENGLISH = re.compile(r"\b(the|your|you|expected|should|return|got|with|before|after)\b")


@pytest.fixture
def zh():
    """Chinese for the test, English again afterwards (whatever the test does)."""
    checks.set_language("zh-CN")
    yield
    checks.set_language("en")


def _line(capsys, check, answer) -> tuple[bool, str]:
    ok = check(answer)
    out = capsys.readouterr().out
    assert out.count("\n") == 1, out  # one line, no traceback
    return ok, out.rstrip("\n")


def assert_bilingual(capsys, check, answer, word: str, *, english_inside: bool = False) -> str:
    """`check(answer)` gives the verdict `word` in both languages: the same word and name, then
    Chinese after the name (and no English sentence, unless the learner's own error is quoted);
    the Chinese line is not the English one. Returns the Chinese line."""
    name = check.__name__
    checks.set_language("en")
    ok_en, en = _line(capsys, check, answer)
    checks.set_language("zh-CN")
    ok_zh, zh = _line(capsys, check, answer)
    head = f"{word} {name}: "
    assert en.startswith(head) and ok_en is (word == "PASS"), en
    assert zh.startswith(head) and ok_zh is ok_en, zh
    rest = zh[len(head):]
    assert CJK.search(rest), zh
    assert english_inside or not ENGLISH.search(rest), zh
    assert zh != en
    return zh


def all_three(capsys, check, right, wrongs, **kw):
    """TODO for the stub, FAIL for every wrong answer, PASS for the right one, in both languages."""
    assert_bilingual(capsys, check, stub, "TODO")
    for wrong in wrongs:
        assert_bilingual(capsys, check, wrong, "FAIL", **kw)
    assert_bilingual(capsys, check, right, "PASS")


# --- notebook 04 ---------------------------------------------------------------------------
def test_drop_decision(capsys, zh):
    all_three(capsys, checks.drop_decision, drop_decision_solution, [
        lambda u, i, t, b: (u < i, i <= u < i + t + b),  # 'both' forgotten
        drop_bands_from_zero,  # overlapping bands
        lambda u, i, t, b: drop_decision_solution(u - 1e-12 if u in (i, i + t, i + t + b) else u, i, t, b),  # <=
        lambda u, i, t, b: (False, False) if u >= i + t else drop_decision_solution(u, i, t, b),  # 'both' band kept
        lambda u, i, t, b: drop_decision_solution(u, i, t, b) if u < i + t + b else (True, True),  # past the bands
        lambda u, i, t, b: (u >= i, False) if u < i + t else drop_decision_solution(u, i, t, b),  # image band wrong
        lambda u, i, t, b: u < i,  # not a pair
    ])


def test_noisy_latents(capsys, zh):
    def no_sqrt(x, n, t, ab):
        a = ab[t].view(-1, 1, 1, 1)
        return a * x + (1 - a) * n

    all_three(capsys, checks.noisy_latents, noisy_solution, [
        no_sqrt,
        lambda x, n, t, ab: noisy_solution(n, x, t, ab),
        lambda x, n, t, ab: x + n,
        lambda x, n, t, ab: ab[t[0]].sqrt() * x + (1 - ab[t[0]]).sqrt() * n,
        lambda x, n, t, ab: noisy_solution(x, n, t, ab) + 1.0,  # only the largest difference left to say
        lambda x, n, t, ab: x[:1],  # wrong shape (core's template)
        lambda x, n, t, ab: x.tolist(),  # not a tensor
    ])


def test_training_step(capsys, zh):
    all_three(capsys, checks.training_step.passed, step, [
        wrong_step(target="latents"),
        wrong_step(noised=False),
        wrong_step(image_last=False),
        wrong_step(reduce=lambda a, b: ((a - b) ** 2).sum()),
        wrong_step(reduce=lambda a, b: (a - b).abs().mean()),
        wrong_step(do_step=False),
        wrong_step(zero=False),
        wrong_step(backward=False),
        wrong_step(give=lambda loss: loss),
        wrong_step(give=lambda loss: None),
    ])


def test_training_step_names_the_fallback_in_chinese(capsys, zh):
    assert checks.training_step(stub) is reference_training_step
    out = capsys.readouterr().out
    assert out.startswith("TODO training_step: ") and "ipa_lab 的 training_step" in out, out


def test_train_loop(capsys, zh):
    def same_draw(trainer, steps, step_fn):
        d = trainer.draw(0)
        return [step_fn(trainer.ip_adapter, trainer.optimizer, trainer.bb.noise_scheduler, *trainer.inputs(d, "cpu"),
                        d.noise, d.timesteps) for _ in range(steps)]

    def unmoved(trainer, steps, step_fn):
        losses = []
        for s in range(steps):
            d = trainer.draw(s)
            losses.append(step_fn(trainer.ip_adapter, trainer.optimizer, trainer.bb.noise_scheduler,
                                  *trainer.inputs(d, trainer.device), d.noise, d.timesteps))
        return losses

    def wrong_inputs_draw(trainer, steps, step_fn):  # draws each step but hands inputs step 0's draw
        first, losses = trainer.draw(0), []
        for s in range(steps):
            d = trainer.draw(s) if s else first
            losses.append(step_fn(trainer.ip_adapter, trainer.optimizer, trainer.bb.noise_scheduler,
                                  *trainer.inputs(first, trainer.device), d.noise.to(trainer.device),
                                  d.timesteps.to(trainer.device)))
        return losses

    def no_optimizer(trainer, steps, step_fn):
        return reference_train_loop(trainer, steps, lambda a, o, *rest: step_fn(a, None, *rest))

    def noise_of_step_zero(trainer, steps, step_fn):
        zero = trainer.draw(0)
        losses = []
        for s in range(steps):
            d = trainer.draw(s) if s else zero
            losses.append(step_fn(trainer.ip_adapter, trainer.optimizer, trainer.bb.noise_scheduler,
                                  *trainer.inputs(d, trainer.device), zero.noise.to(trainer.device),
                                  zero.timesteps.to(trainer.device)))
        return losses

    all_three(capsys, checks.train_loop.passed, reference_train_loop, [
        same_draw,
        unmoved,
        wrong_inputs_draw,
        no_optimizer,
        noise_of_step_zero,
        lambda trainer, steps, step_fn: reference_train_loop(trainer, steps - 1, step_fn),  # off by one
        lambda trainer, steps, step_fn: reference_train_loop(trainer, steps, step_fn) and None,  # returns None
        lambda trainer, steps, step_fn: {"losses": reference_train_loop(trainer, steps, step_fn)},  # not a list
        lambda trainer, steps, step_fn: reference_train_loop(trainer, steps, step_fn)[::-1],  # wrong order
    ])


# --- notebook 05 ---------------------------------------------------------------------------
def test_compose_prompt_embeds(capsys, zh):
    def solution(text, negative, image, uncond):
        return torch.cat([text, image], dim=1), torch.cat([negative, uncond], dim=1)

    all_three(capsys, checks.compose_prompt_embeds, solution, [
        lambda t, n, i, u: torch.cat([t, i], 1),
        lambda t, n, i, u: 42,
        lambda t, n, i, u: (torch.cat([t, t], 2), torch.cat([n, n], 2)),
        lambda t, n, i, u: (torch.cat([t, i], 1).tolist(), torch.cat([n, u], 1)),
        lambda t, n, i, u: (t, n),
        lambda t, n, i, u: solution(t, n, i, u)[::-1],
        lambda t, n, i, u: (torch.cat([i, t], 1), torch.cat([u, n], 1)),
        lambda t, n, i, u: (torch.cat([t, u], 1), torch.cat([n, u], 1)),
        lambda t, n, i, u: (torch.cat([t, i], 1), torch.cat([n, i], 1)),
        lambda t, n, i, u: (torch.cat([t, i], 1), torch.cat([u, n], 1)),
        lambda t, n, i, u: (torch.cat([t, i], 1), torch.cat([t, u], 1)),
    ])


def test_unconditional_image_tokens(capsys, zh):
    all_three(capsys, checks.unconditional_image_tokens, lambda m: m(torch.zeros(1, m.clip_embeddings_dim)), [
        lambda m: "zeros",
        lambda m: torch.zeros(1, 3, 64),
        lambda m: torch.zeros(1, m.clip_extra_context_tokens, m.cross_attention_dim),
        lambda m: m.proj.bias.reshape(1, m.clip_extra_context_tokens, -1),
        lambda m: m(torch.ones(1, m.clip_embeddings_dim)),
    ])


def test_guidance(capsys, zh):
    all_three(capsys, checks.guidance, lambda u, c, w: u + w * (c - u), [
        lambda u, c, w: [0.0],
        lambda u, c, w: u[:1],
        lambda u, c, w: c + w * (c - u),
        lambda u, c, w: u + w * (u - c),
        lambda u, c, w: c,
    ])


def test_sampling_loop(capsys, zh):
    def fifty_steps(unet, scheduler, *args):
        scheduler.set_timesteps(50)
        return loop(unet, scheduler, *args, set_timesteps=False)

    def doubled(*args):
        return torch.cat([loop(*args)] * 2)

    def scales_the_first_step_only(unet, scheduler, prompt, negative, latents, steps, w):
        scheduler.set_timesteps(steps)
        latents = latents * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_input = torch.cat([latents] * 2)
            if t == scheduler.timesteps[0]:
                model_input = scheduler.scale_model_input(model_input, t)
            uncond, cond = unet(model_input, t, encoder_hidden_states=torch.cat([negative, prompt])).sample.chunk(2)
            latents = scheduler.step(uncond + w * (cond - uncond), t, latents).prev_sample
        return latents

    all_three(capsys, checks.sampling_loop.passed, loop, [
        wrong_loop(embeds="cond first"),
        wrong_loop(init_sigma=False),
        wrong_loop(scale_input=False),
        wrong_loop(guide=lambda u, c, w: w * c + (1 - w) * u),
        wrong_loop(guide=lambda u, c, w: c + w * (c - u)),
        wrong_loop(guide=lambda u, c, w: c),
        wrong_loop(guide=lambda u, c, w: u + 0.5 * w * (c - u)),
        wrong_loop(give="noise"),
        wrong_loop(set_timesteps=False),
        fifty_steps,
        doubled,
        scales_the_first_step_only,
        lambda *args: loop(*args)[:, :2],
        lambda *args: None,
        lambda *args: loop(*args) + 1.0,
    ])
    # two UNet calls a step: the same math, accepted up to rounding, said in Chinese too
    assert "两次" in assert_bilingual(capsys, checks.sampling_loop.passed, wrong_loop(two_calls=True), "PASS")
    assert_bilingual(capsys, checks.sampling_loop.passed, reference_sampling_loop, "PASS")


# --- notebook 06 ---------------------------------------------------------------------------
def test_perceiver_attention(capsys, zh):
    class NotAModule:
        def __init__(self, **kw):
            pass

    class HardCoded(perceiver()):
        def __init__(self, *, dim, dim_head=64, heads=8):
            super().__init__(dim=dim, dim_head=8, heads=4)

    class Renamed(perceiver()):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.to_output = self.to_out
            del self.to_out

    class Extra(perceiver()):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.gate = torch.nn.Parameter(torch.zeros(1))

    class Unmerged(perceiver()):
        def forward(self, x, latents):
            q = self.to_q(self.norm2(latents))
            return q.view(q.shape[0], q.shape[1], self.heads, -1).transpose(1, 2)

    class ReturnsAList(perceiver()):
        def forward(self, x, latents):
            return [super().forward(x, latents)]

    class Shifted(perceiver()):
        def forward(self, x, latents):
            return super().forward(x, latents) + 0.1

    all_three(capsys, checks.perceiver_attention.passed, perceiver(), [
        NotAModule,
        HardCoded,
        Renamed,
        Extra,
        Unmerged,
        ReturnsAList,
        Shifted,
        perceiver(kv="x"),
        perceiver(norms="none"),
        perceiver(norms="swapped"),
        perceiver(k_power=0.0),
        perceiver(q_power=0.0, k_power=0.0),
        perceiver(q_power=-0.5, k_power=-0.5),
        perceiver(softmax_dim=-2),
        perceiver(one_head=True),
        perceiver(bias=True),
        perceiver(separate_kv=True),
        perceiver(to_out=False),
    ])
    # the learner's own exception is quoted as Python gave it (English inside), the rest is Chinese
    zh_line = assert_bilingual(capsys, checks.perceiver_attention.passed, CrashingForward, "FAIL", english_inside=True)
    assert "RuntimeError" in zh_line and "PerceiverAttention" in zh_line
    assert_bilingual(capsys, checks.perceiver_attention.passed, ReferencePerceiverAttention, "PASS")


# --- notebook 07 ---------------------------------------------------------------------------
def test_global_batch(capsys, zh):
    all_three(capsys, checks.global_batch, lambda b, n, size: (b * n, size // (b * n)), [
        lambda b, n, size: b * n,
        lambda b, n, size: (b, size // b),
        lambda b, n, size: (b * n, size // b),
        lambda b, n, size: (b * n, size // (b * n) + 7),
    ])


def test_adamw_state_bytes(capsys, zh):
    all_three(capsys, checks.adamw_state_bytes, lambda n: 8 * n, [
        lambda n: "a lot", lambda n: 4 * n, lambda n: 16 * n, lambda n: 2 * n, lambda n: 8 * n + 1,
    ])


def test_static_training_bytes(capsys, zh):
    all_three(capsys, checks.static_training_bytes, lambda f, t, b: f * b + 16 * t, [
        lambda f, t, b: "16 GB",
        lambda f, t, b: f * b + 16 * t + 12 * f,
        lambda f, t, b: 16 * (f + t),
        lambda f, t, b: f * b + t * (4 + b + 8),
        lambda f, t, b: f * b + t * (4 + 2 + 8),
        lambda f, t, b: (f + t) * b + t * (b + 8),
        lambda f, t, b: f * b + 12 * t,
        lambda f, t, b: f * b + 8 * t,
        lambda f, t, b: (f + t) * b,
        lambda f, t, b: f * b + 16 * t + 1,
    ])


# --- what the checker expects, when it cannot use an answer -----------------------------------
@pytest.mark.parametrize("check, answer", [
    (checks.global_batch, lambda b, n, size: (b * n, float("inf"))),
    (checks.adamw_state_bytes, lambda n: torch.tensor([4.0 * n, 4.0 * n])),
    (checks.static_training_bytes, lambda f, t, b: torch.tensor([1.0, 2.0])),
    (checks.guidance, lambda u, c, w: torch.stack([u, c])),
])
def test_an_unusable_answer_says_what_was_expected_in_chinese(capsys, zh, check, answer):
    line = assert_bilingual(capsys, check, answer, "FAIL", english_inside=True)
    assert "your code raised" not in line and "你的代码抛出了" not in line


@pytest.mark.parametrize("check", [
    checks.drop_decision, checks.noisy_latents, checks.training_step, checks.train_loop,
    checks.compose_prompt_embeds, checks.unconditional_image_tokens, checks.guidance, checks.sampling_loop,
    checks.perceiver_attention, checks.global_batch, checks.adamw_state_bytes, checks.static_training_bytes,
])
def test_every_checker_says_what_it_expects_in_chinese(zh, check):
    """Each checker's docstring has a '中文：' line (core's convention), which `_expected` gives in Chinese."""
    expected = core._expected(check)
    assert CJK.search(expected), expected
    checks.set_language("en")
    assert core._expected(check) == check.__doc__.splitlines()[0].rstrip(".")


# --- the switch ---------------------------------------------------------------------------
def test_english_is_the_default(capsys):
    """A fresh interpreter without IPA_LAB_LANG speaks English; and so does this one after set_language("en")."""
    env = {k: v for k, v in os.environ.items() if k != "IPA_LAB_LANG"}
    code = "from ipa_lab.checks import core; print(core._language, core.tr('en', 'zh'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["en", "en"], out
    checks.set_language("en")
    checks.global_batch(lambda b, n, size: (b, size // b))
    out = capsys.readouterr().out
    assert out.startswith("FAIL global_batch: for the paper: 8 GPUs x 8 images") and not CJK.search(out), out


def test_an_unknown_language_raises_a_clear_error():
    with pytest.raises(ValueError, match="'fr'.*en.*zh-CN"):
        checks.set_language("fr")
    with pytest.raises(ValueError, match="zh-CN"):
        checks.set_language("zh")
    assert core._language == "en"  # unchanged
