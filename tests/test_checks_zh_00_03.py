"""The checkers of notebooks 00-03, and the verdict printer, in Chinese (set_language("zh-CN")).

For every checker: the stub (TODO), wrong answers (FAIL) and the right answer (PASS) give a
verdict that starts with the same word and name as in English, says the rest in Chinese, and
differs from the English verdict for the same answer. The answers are the existing tests' own
(test_checks_00_03.py, test_checks_build_01_03.py), the build exercises' wrong answers taken
from those tests' parametrize lists, so a mistake added there is checked in Chinese too."""
from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import test_checks_00_03 as t00
import test_checks_build_01_03 as b01
from ipa_lab import checks
from ipa_lab.adapter import install_ip_adapter as package_install
from ipa_lab.attention import IPAttnProcessor as PackageProcessor
from ipa_lab.checks import core
from ipa_lab.checks.core import checker, describe, expect, expect_close, expect_equal, expect_shape, tr
from ipa_lab.projection import ImageProjModel as PackageProjection
from ipa_lab.trainer import prepare_training as package_prepare
from verdicts import stub, verdict

CJK = re.compile(r"[\u4e00-\u9fff]")
# English prose left in a Chinese verdict: a message someone forgot to wrap in tr(). The text of a
# Python exception the verdict quotes ("ValueError: invalid literal ...") is English and stays so.
ENGLISH_PROSE = re.compile(r"\b(the|your|you|should|expected|got|is|are|not|with)\b")
QUOTED_ERROR = re.compile(r"\b\w*(Error|Exception)\b: [^（）；：]*(（[^\u4e00-\u9fff）]*）)?")


@pytest.fixture(autouse=True)
def english_again_after():
    """Each test switches languages; the next test (and every other test file) gets English back."""
    yield
    checks.set_language("en")


def in_both(capsys, checker, answer, english_allowed: bool = False) -> tuple[str, str]:
    """The English and the Chinese verdict for one answer, with what must hold between them."""
    checks.set_language("en")
    ok_en, en = verdict(capsys, checker, answer)
    checks.set_language("zh-CN")
    ok_zh, zh = verdict(capsys, checker, answer)
    checks.set_language("en")
    word, name = en.split(" ", 2)[:2]
    head = f"{word} {name}"
    assert word in ("PASS", "FAIL", "TODO") and name.endswith(":"), en
    assert ok_zh is ok_en is (word == "PASS"), (en, zh)
    assert zh.startswith(head + " "), (en, zh)  # PASS/FAIL/TODO and the name stay English
    assert CJK.search(zh[len(head):]), zh
    assert zh != en, zh
    if not english_allowed:
        assert not ENGLISH_PROSE.search(QUOTED_ERROR.sub("", zh[len(head):])), zh
    return en, zh


def wrong_answers(test) -> list:
    """The (piece, fragments) cases an existing test is parametrized with."""
    return next(mark.args[1] for mark in test.pytestmark if mark.name == "parametrize")


def zh_pass(capsys, checker, answer) -> str:
    en, zh = in_both(capsys, checker, answer)
    assert en.startswith(f"PASS {checker.__name__}:"), en
    return zh


def zh_todo(capsys, checker) -> str:
    en, zh = in_both(capsys, checker, stub)
    assert en.startswith(f"TODO {checker.__name__}: not yet implemented"), en
    assert zh.startswith(f"TODO {checker.__name__}: 尚未实现"), zh
    return zh


def zh_fail(capsys, checker, answer, *fragments) -> str:
    """A FAIL in both languages; `fragments` must appear in the Chinese verdict."""
    en, zh = in_both(capsys, checker, answer)
    assert en.startswith(f"FAIL {checker.__name__}:"), en
    for fragment in fragments:
        assert fragment in zh, zh
    return zh


def zh_builds_fail(capsys, built, answer, *fragments) -> str:
    """A build exercise's FAIL: the Chinese verdict names the fallback the notebook carries on with."""
    return zh_fail(capsys, built.passed, answer, *fragments, "笔记本继续使用 ipa_lab 的")


def zh_builds_pass_and_todo(capsys, built, solution, reference) -> None:
    """A build exercise in both languages: PASS for the notebook's solution and for the package's
    own piece (the learner may hand either in), TODO for the stub."""
    zh_pass(capsys, built.passed, solution)
    zh_pass(capsys, built.passed, reference)
    zh_todo(capsys, built.passed)


# --- the switch ------------------------------------------------------------------------------
def run_python(code: str, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "IPA_LAB_LANG"} | env
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])


def test_english_is_the_default_and_the_environment_variable_switches():
    code = ("from ipa_lab import checks\n"
            "def stub(*a): raise NotImplementedError\n"
            "checks.latent_shape(stub)\n")
    assert run_python(code).stdout == ("TODO latent_shape: not yet implemented "
                                       "(the notebook carries on with ipa_lab's version)\n")
    assert run_python(code, IPA_LAB_LANG="zh-CN").stdout == "TODO latent_shape: 尚未实现（笔记本继续使用 ipa_lab 的版本）\n"
    unknown = run_python("import ipa_lab.checks", IPA_LAB_LANG="fr")
    assert unknown.returncode != 0 and "ValueError: language 'fr' is not one of en, zh-CN" in unknown.stderr


def test_an_unknown_language_is_a_clear_value_error():
    for wrong in ("fr", "zh", "zh_CN", "EN", ""):
        with pytest.raises(ValueError, match=f"language {re.escape(repr(wrong))} is not one of en, zh-CN"):
            checks.set_language(wrong)
    assert tr("English", "中文") == "English"  # a refused language leaves the one in force
    checks.set_language("zh-CN")
    assert tr("English", "中文") == "中文"


# --- the verdict printer ---------------------------------------------------------------------
@checker
def double(fn) -> str:
    """fn(x) -> 2 * x, as an int.

    中文：fn(x) -> 2 * x，返回 int。"""
    value = int(fn(21))
    expect(value == 42, tr(f"double(21) gave {value}, expected 42", f"double(21) 得到 {value}，应为 42"))
    return tr("twice the input.", "输入的两倍。")


@checker
def untranslated(fn) -> str:
    """fn(x) -> x, its docstring in English only."""
    return int(fn(1)) and "ok"


@checker
def broken(fn) -> str:
    """fn() -> anything."""
    raise KeyError("a bug in the checker")


def test_the_printers_own_verdicts_in_chinese(capsys):
    assert zh_pass(capsys, double, lambda x: 2 * x) == "PASS double: 输入的两倍。\n"
    assert zh_todo(capsys, double) == "TODO double: 尚未实现（笔记本继续使用 ipa_lab 的版本）\n"
    assert zh_fail(capsys, double, lambda x: 1 / 0) == "FAIL double: 你的代码抛出了 ZeroDivisionError: division by zero\n"
    assert zh_fail(capsys, double, 42) == ("FAIL double: 请传入函数本身，如 checks.double(my_function)，"
                                           "而不是它的返回值（收到的是 int 42）\n")
    zh = zh_fail(capsys, double, lambda x: "forty-two", "你的函数返回了 str 'forty-two'，检查器无法使用",
                 "期望的是：fn(x) -> 2 * x，返回 int\n")
    assert "your code raised" not in zh and "你的代码抛出了" not in zh
    # no "中文：" line in the docstring: the English description stands in
    en, zh = in_both(capsys, untranslated, lambda x: "one", english_allowed=True)
    assert zh.endswith("期望的是：fn(x) -> x, its docstring in English only\n"), zh
    zh_fail(capsys, broken, lambda: None, "检查器在拿到你的函数的返回值之前就出错了", "这是 ipa_lab.checks 的 bug，不是你的代码的问题")


def test_a_stub_of_an_earlier_exercise_is_named_in_chinese(capsys):
    namespace = {"__name__": "__main__"}
    exec("def guidance(u, c, w):\n    raise NotImplementedError('your code here')\n\n"
         "def twice(x):\n    return 2 * guidance(x, x, 1)\n", namespace)
    en, zh = in_both(capsys, double, namespace["twice"])
    assert en.startswith("TODO double: your code calls guidance"), en
    assert zh.startswith("TODO double: 你的代码调用了 guidance，而它还是未实现的占位代码；请先完成那个练习"), zh


def test_a_build_exercises_fallback_in_chinese(capsys):
    en, zh = in_both(capsys, checks.image_proj_model.passed, b01.NoBias)
    assert en.endswith("; the notebook carries on with ipa_lab's ImageProjModel until yours passes\n"), en
    assert zh.endswith("；在你的实现通过之前，笔记本继续使用 ipa_lab 的 ImageProjModel\n"), zh
    en, zh = in_both(capsys, checks.image_proj_model.passed, b01.ImageProjModel)
    assert en.endswith(". The notebook uses yours from here on.\n") and zh.endswith("。从这里开始，笔记本使用你的实现。\n")
    en, zh = in_both(capsys, checks.image_proj_model.passed, stub)
    assert zh == "TODO image_proj_model: 尚未实现（笔记本继续使用 ipa_lab 的 ImageProjModel）\n", zh


def test_grade_in_chinese(capsys):
    checks.set_language("zh-CN")
    double(lambda x: x + 1)
    with pytest.raises(AssertionError, match="^FAIL double: double\\(21\\) 得到 22，应为 42$"):
        checks.grade("double")
    checks.image_proj_model(PackageProjection)
    with pytest.raises(AssertionError, match="^FAIL image_proj_model: 检查器收到的是 ipa_lab 自带的 ImageProjModel，不是你的"):
        checks.grade("image_proj_model")
    with pytest.raises(AssertionError, match="^no_such_exercise：这个练习的单元格还没有运行"):
        checks.grade("no_such_exercise")
    checks.set_language("en")
    with pytest.raises(AssertionError, match="^no_such_exercise: the exercise's cell has not run"):
        checks.grade("no_such_exercise")
    capsys.readouterr()


def test_the_expect_helpers_and_describe_in_chinese():
    def message(call) -> str:
        with pytest.raises(core.CheckFailed) as caught:
            call()
        return str(caught.value)

    cases = [
        (lambda: expect_shape(torch.zeros(2), (3,)), "the output has shape (2,), expected (3,)", "输出的形状是 (2,)，应为 (3,)"),
        (lambda: expect_shape([1, 2], (2,), tr("the tokens", "token 序列")),
         "the tokens should be a torch.Tensor, got list", "token 序列应为 torch.Tensor，实际是 list"),
        (lambda: expect_shape(torch.zeros(2), (3,), "proj.weight"),  # a Latin word before Chinese: spaced
         "proj.weight has shape (2,), expected (3,)", "proj.weight 的形状是 (2,)，应为 (3,)"),
        (lambda: expect_close(torch.zeros(2), torch.ones(2)),
         "the output differs from the expected values by up to 1 (allowed 1e-05)", "输出与期望值最多相差 1（允许 1e-05）"),
        (lambda: expect_equal(3, 4, tr("the count", "数量")), "the count is 3, expected 4", "数量是 3，应为 4"),
    ]
    for call, english, chinese in cases:
        checks.set_language("en")
        assert message(call) == english
        checks.set_language("zh-CN")
        assert message(call) == chinese
    assert describe(torch.zeros(2, 3, dtype=torch.int64)) == "dtype 为 int64、形状为 (2, 3) 的张量"
    assert describe(("4", "x")) == "tuple ('4', 'x')"
    checks.set_language("en")
    assert describe(torch.zeros(2, 3, dtype=torch.int64)) == "a tensor of dtype int64 and shape (2, 3)"


# --- notebook 00 ---------------------------------------------------------------------------
def test_latent_shape(capsys):
    solution = t00.latent_shape_solution
    assert zh_pass(capsys, checks.latent_shape, solution).startswith("PASS latent_shape: VAE 保留 latent_channels 个通道")
    zh_todo(capsys, checks.latent_shape)
    zh_fail(capsys, checks.latent_shape, lambda h, w, c: (4, h // 8, w // 8), "缩小倍数是 2 ** (len(block_out_channels) - 1)")
    zh_fail(capsys, checks.latent_shape, lambda h, w, c: solution(w, h, c), "把高和宽弄反了", "对于 SD 1.5 的 VAE")
    zh_fail(capsys, checks.latent_shape,
            lambda h, w, c: (len(c["block_out_channels"]),) + solution(h, w, c)[1:], "通道数就是配置中的 latent_channels")
    zh_fail(capsys, checks.latent_shape, lambda h, w, c: None, "应为由整数组成的元组")
    zh_fail(capsys, checks.latent_shape, lambda h, w, c: ("4", "x", "8"), "应为由整数组成的元组", "('4', 'x', '8')")
    zh_fail(capsys, checks.latent_shape, lambda h, w, c: (4, 8), "应为 3 个：(通道数, 高, 宽)")
    zh_fail(capsys, checks.latent_shape, lambda h, w, c: h // 0, "你的代码抛出了 ZeroDivisionError")


def test_encoder_hidden_states_shape(capsys):
    zh_pass(capsys, checks.encoder_hidden_states_shape, lambda b, t, i, d: (b, t + i, d))
    zh_todo(capsys, checks.encoder_hidden_states_shape)
    zh_fail(capsys, checks.encoder_hidden_states_shape, lambda b, t, i, d: (b, t, d), "这只是文本部分")
    zh_fail(capsys, checks.encoder_hidden_states_shape, lambda b, t, i, d: (b, t, d + i), "沿序列维（dim 1）拼接")
    zh_fail(capsys, checks.encoder_hidden_states_shape, lambda b, t, i, d: (b, t + 4, d), "应为 (3, 93, 768)")
    zh_fail(capsys, checks.encoder_hidden_states_shape, lambda b, t, i, d: (b, f"{t}+{i}", d), "应为由整数组成的元组")
    zh_fail(capsys, checks.encoder_hidden_states_shape, lambda b, t, i, d: (b, t + i), "应为 3 个数")


# --- notebook 01 ---------------------------------------------------------------------------
def test_image_proj_model(capsys):
    zh_builds_pass_and_todo(capsys, checks.image_proj_model, b01.ImageProjModel, PackageProjection)
    for todo in (b01.StubForward, b01.StubInit):
        assert in_both(capsys, checks.image_proj_model.passed, todo)[1].startswith("TODO image_proj_model: 尚未实现")


@pytest.mark.parametrize("piece, fragments", wrong_answers(b01.test_image_proj_model_names_the_mistake))
def test_image_proj_model_names_the_mistake(capsys, piece, fragments):
    zh_builds_fail(capsys, checks.image_proj_model, piece)


def test_image_proj_model_in_chinese_words(capsys):
    zh_builds_fail(capsys, checks.image_proj_model, b01.NoNormApplied, "少了 LayerNorm")
    zh_builds_fail(capsys, checks.image_proj_model, b01.HardCodedSizes, "你把 64、32 或 4 写死了")
    zh_builds_fail(capsys, checks.image_proj_model, b01.NoGradient, "不带梯度")
    zh_builds_fail(capsys, checks.image_proj_model, b01.OneLongVector, "玩具模型（32 -> 4 个 token x 64）输出的形状是")


# --- notebook 02 ---------------------------------------------------------------------------
def test_hidden_size_of(capsys):
    solution = t00.hidden_size_solution
    zh_pass(capsys, checks.hidden_size_of, solution)
    zh_todo(capsys, checks.hidden_size_of)
    zh_fail(capsys, checks.hidden_size_of, lambda n, w: w[-1] if n.startswith("mid") else w[int(n.split(".")[1])],
            "按反转后的 block_out_channels 取下标")
    zh_fail(capsys, checks.hidden_size_of, lambda n, w: w[0] if n.startswith("mid") else solution(n, w),
            "block_out_channels[-1]")
    zh_fail(capsys, checks.hidden_size_of, lambda n, w: str(solution(n, w)), "应返回 int")
    zh_fail(capsys, checks.hidden_size_of, lambda n, w: 320, "得到 320，应为 1280")


def test_decoupled_attention(capsys):
    solution = t00.decoupled_solution
    attention = b01.softmax_attention
    sdpa = F.scaled_dot_product_attention
    zh_pass(capsys, checks.decoupled_attention, solution)
    zh_todo(capsys, checks.decoupled_attention)
    for wrong, fragment in [
        (lambda q, k, v, ki, vi, s: sdpa(q, torch.cat([k, ki], -2), torch.cat([v, vi], -2)), "只做了一次 softmax"),
        (lambda q, k, v, ki, vi, s: s * sdpa(q, k, v) + sdpa(q, ki, vi), "scale 乘在了文本分支上"),
        (lambda q, k, v, ki, vi, s: solution(q, k, v, ki, vi, 1.0), "忽略了 scale"),
        (lambda q, k, v, ki, vi, s: (torch.softmax(q @ k.transpose(-2, -1), -1) @ v
                                     + s * torch.softmax(q @ ki.transpose(-2, -1), -1) @ vi), "1/sqrt(head_dim)"),
        (lambda q, k, v, ki, vi, s: sdpa(q, k, v) + sdpa(q, ki * s, vi), "scale 乘在了图像的键上"),
        (lambda q, k, v, ki, vi, s: attention(q, k, v, -2) + s * attention(q, ki, vi, -2), "沿 dim=-2（查询）"),
        (lambda q, k, v, ki, vi, s: solution(q, k, v, ki, vi, s)[:, 0], "scale=1.0 时的 Z 的形状是 (2, 16, 8)"),
        (lambda q, k, v, ki, vi, s: solution(q, k, v, ki, vi, s) + 1e-3, "与期望值最多相差"),
    ]:
        zh_fail(capsys, checks.decoupled_attention, wrong, fragment)


def test_ip_attn_processor(capsys):
    zh_builds_pass_and_todo(capsys, checks.ip_attn_processor, b01.IPAttnProcessor, PackageProcessor)
    assert in_both(capsys, checks.ip_attn_processor.passed, b01.StubProcessorForward)[1].startswith(
        "TODO ip_attn_processor: 尚未实现")


@pytest.mark.parametrize("piece, fragments", wrong_answers(b01.test_ip_attn_processor_names_the_mistake))
def test_ip_attn_processor_names_the_mistake(capsys, piece, fragments):
    zh_builds_fail(capsys, checks.ip_attn_processor, piece)


def test_ip_attn_processor_in_chinese_words(capsys):
    zh_builds_fail(capsys, checks.ip_attn_processor, b01.SwappedBranches,
                   "该层的输出（hidden_size 48，3 个头，num_tokens=4，scale=0.5）：两个分支接反了")
    zh_builds_fail(capsys, checks.ip_attn_processor, b01.NoNumTokensAttribute, "（现在没有这个属性，应为 4）")
    zh_builds_fail(capsys, checks.ip_attn_processor, b01.ScaleFixedAtInit, "没有任何效果：请在 forward 里读取 self.scale")


def test_install_ip_adapter(capsys):
    zh_builds_pass_and_todo(capsys, checks.install_ip_adapter, b01.make_install(), package_install)


@pytest.mark.parametrize("piece, fragments", wrong_answers(b01.test_install_ip_adapter_names_the_mistake))
def test_install_ip_adapter_names_the_mistake(capsys, piece, fragments):
    zh_builds_fail(capsys, checks.install_ip_adapter, piece)


def test_install_ip_adapter_in_chinese_words(capsys):
    zh_builds_fail(capsys, checks.install_ip_adapter, b01.make_install(widths=b01.not_reversed),
                   "位置在 up_blocks.2.attentions.0.transformer_blocks.0.attn2：up_blocks.2 的宽度是 64")
    zh_builds_fail(capsys, checks.install_ip_adapter, b01.make_install(copy=False), "to_k_ip 还是随机初始化的")

    class Unscaled(b01.IPAttnProcessor):
        def combine(self, q, k, v, k_ip, v_ip):
            return b01.merge_heads(t00.decoupled_solution(q, k, v, k_ip, v_ip, 1.0))

    zh_builds_fail(capsys, checks.install_ip_adapter, b01.make_install(Unscaled),
                   "scale 为 0.0 时 UNet 的输出（应与不带适配器、只有文本的原始 UNet 的输出一致）与期望值最多相差")


# --- notebook 03 ---------------------------------------------------------------------------
def test_params_to_opt(capsys):
    zh_pass(capsys, checks.params_to_opt,
            lambda proj, adapter, unet: list(itertools.chain(proj.parameters(), adapter.parameters())))
    zh_todo(capsys, checks.params_to_opt)
    for wrong, fragment in [
        (lambda proj, adapter, unet: list(proj.parameters()) + list(unet.parameters()), "个冻结的张量（例如 unet: "),
        (lambda proj, adapter, unet: list(adapter.parameters()), "你的列表缺了图像投影"),
        (lambda proj, adapter, unet: list(proj.parameters()), "个适配器张量"),
        (lambda proj, adapter, unet: list(proj.parameters()) + 2 * list(adapter.parameters()), "出现了两次"),
        (lambda proj, adapter, unet: None, "你的函数返回了 None"),
        (lambda proj, adapter, unet: adapter, "而不是模块"),
        (lambda proj, adapter, unet: 3, "请返回参数列表，得到的是 int 3"),
        (lambda proj, adapter, unet: [1.0], "却发现了 float"),
        (lambda proj, adapter, unet: list(proj.parameters()) + list(adapter.parameters()) + [torch.zeros(1, requires_grad=True)],
         "既不属于图像投影也不属于适配器"),
    ]:
        zh_fail(capsys, checks.params_to_opt, wrong, fragment)


def test_prepare_training(capsys):
    zh_builds_pass_and_todo(capsys, checks.prepare_training, b01.solution_prepare, package_prepare)


@pytest.mark.parametrize("piece, fragments", wrong_answers(b01.test_prepare_training_names_the_mistake))
def test_prepare_training_names_the_mistake(capsys, piece, fragments):
    zh_builds_fail(capsys, checks.prepare_training, piece)


def test_prepare_training_in_chinese_words(capsys):
    zh_builds_fail(capsys, checks.prepare_training, b01.make_prepare(freeze=("unet", "vae", "image_encoder")),
                   "文本编码器没有冻结")
    zh_builds_fail(capsys, checks.prepare_training, b01.make_prepare(freeze=("vae", "text_encoder", "image_encoder")),
                   "UNet 没有冻结")
    zh_builds_fail(capsys, checks.prepare_training,
                   b01.make_prepare(params=lambda proj, adapter, unet: list(proj.parameters()) + list(unet.parameters())),
                   "优化器里有 5,835,012 个 UNet 参数")
    zh_builds_fail(capsys, checks.prepare_training, b01.make_prepare(returned=lambda proj, adapter, opt: (proj, opt)),
                   "实际得到：一个有 2 项的 tuple")
