"""Notebook 07, going real: the arithmetic of training at the paper's scale.

Global batch and steps per epoch across processes, and the memory of weights, gradients and AdamW.
"""
from __future__ import annotations

from .core import CheckFailed, as_number, checker, expect, tr


@checker
def global_batch(fn) -> str:
    """fn(per_device_batch, num_processes, dataset_size) -> (global_batch, steps_per_epoch).

    中文：fn(per_device_batch, num_processes, dataset_size) -> (全局批大小, 每个 epoch 的步数)。"""
    cases = [(tr("the paper: 8 GPUs x 8 images, about 10M pairs", "论文的设置（8 张 GPU x 每张 8 张图，约 1000 万对）"),
              (8, 8, 10_000_000), 64, {156_250}),
             (tr("this course on one CPU: batch 64, 4000 images", "本课程在一个 CPU 上的设置（批大小 64，4000 张图）"),
              (64, 1, 4000), 64, {62, 63}),
             (tr("4 GPUs x 16 images, 1024 images", "4 张 GPU x 每张 16 张图、共 1024 张图"), (16, 4, 1024), 64, {16}),
             (tr("2 GPUs x 8 images, 4000 images", "2 张 GPU x 每张 8 张图、共 4000 张图"), (8, 2, 4000), 16, {250})]
    for what, args, want_batch, want_steps in cases:
        got = fn(*args)
        try:
            batch, steps = (int(x) for x in got)
        except (TypeError, ValueError, OverflowError):  # not a pair, or not numbers (inf, nan, text)
            raise CheckFailed(tr(f"return a pair (global_batch, steps_per_epoch), got {got!r}",
                                 f"应返回一对 (global_batch, steps_per_epoch)，实际得到 {got!r}")) from None
        expect(batch == want_batch, tr(
            f"for {what} the global batch is {batch}, expected {want_batch}: every process "
            "takes its own per-device batch at each step, so one step consumes per_device x num_processes images",
            f"对于{what}，你的全局批大小是 {batch}，应为 {want_batch}：每一步每个进程都取自己的一个单卡批次，"
            "所以一步消耗 per_device x num_processes 张图"))
        expect(steps != args[2] // args[0] or args[1] == 1, tr(
            f"for {what} you get {steps:,} steps per epoch: that is "
            "one GPU's count; all processes move through the data together, so divide by the global batch",
            f"对于{what}，你得到每个 epoch {steps:,} 步：这是单张 GPU 的步数；所有进程一起遍历数据，"
            "所以要除以全局批大小"))
        expect(steps in want_steps, tr(
            f"for {what} you get {steps:,} steps per epoch, expected "
            f"{' or '.join(f'{s:,}' for s in sorted(want_steps))} (dataset_size / global batch)",
            f"对于{what}，你得到每个 epoch {steps:,} 步，应为 "
            f"{' 或 '.join(f'{s:,}' for s in sorted(want_steps))}（dataset_size / 全局批大小）"))
    return tr("global batch = per-device batch x processes; an epoch is dataset_size / global batch steps (156,250 for the paper).",
              "全局批大小 = 单卡批大小 x 进程数；一个 epoch 是 dataset_size / 全局批大小 步（论文中为 156,250 步）。")


@checker
def adamw_state_bytes(fn) -> str:
    """fn(num_trainable) -> bytes of AdamW's state for that many fp32 parameters.

    中文：fn(num_trainable) -> 这么多个 fp32 参数的 AdamW 状态所占的字节数。"""
    for n in (22_319_616, 49_087_488, 1000):
        got = fn(n)
        number = as_number(got)
        expect(number is not None, tr(f"return a number, got {got!r}", f"应返回一个数，实际得到 {got!r}"))
        got = number
        want = 8 * n
        expect(got != 4 * n, tr(
            f"for {n:,} parameters you get {got:,.0f} bytes: that is one fp32 moment; AdamW keeps "
            "two per parameter (exp_avg and exp_avg_sq)",
            f"对于 {n:,} 个参数，你得到 {got:,.0f} 字节：这只是一个 fp32 矩；AdamW 为每个参数保存两个"
            "（exp_avg 和 exp_avg_sq）"))
        expect(got != 16 * n, tr(
            f"for {n:,} parameters you get {got:,.0f} bytes: that also counts the weights and "
            "the gradients; the optimizer's state is the two moments alone",
            f"对于 {n:,} 个参数，你得到 {got:,.0f} 字节：这把权重和梯度也算进去了；优化器的状态只有那两个矩"))
        expect(got != 2 * n, tr(
            f"for {n:,} parameters you get {got:,.0f}: count bytes, not values (fp32 = 4 bytes)",
            f"对于 {n:,} 个参数，你得到 {got:,.0f}：要数字节，而不是数值个数（fp32 = 4 字节）"))
        expect(abs(got - want) < 0.5, tr(f"for {n:,} parameters you get {got:,.0f} bytes, expected {want:,}",
                                         f"对于 {n:,} 个参数，你得到 {got:,.0f} 字节，应为 {want:,}"))
    return tr("two fp32 moments per parameter = 8 bytes: 178.6 MB for SD 1.5's 22,319,616 trainable parameters.",
              "每个参数两个 fp32 矩 = 8 字节：SD 1.5 的 22,319,616 个可训练参数需要 178.6 MB。")


# Plausible wrong bills, as formulas of (n_frozen, n_trainable, frozen_bytes), each with what it got wrong.
# A formula is named only when it explains the answers of EVERY case: 12 bytes per trainable
# parameter at 2 frozen bytes fits both "no gradients" and "weights and gradients at 2 bytes".
# The messages are (English, Chinese) pairs, put through `tr` when a verdict uses one.
_WRONG_BILLS = (
    (lambda f, t, b: f * b + 16 * t + 12 * f, (
        "you gave the frozen models gradients and AdamW states: they have "
        "none (requires_grad is False and they are not in the optimizer)",
        "你给冻结的模型也算了梯度和 AdamW 状态：它们没有这些（requires_grad 为 False，也不在优化器里）")),
    (lambda f, t, b: 16 * (f + t), (
        "you counted every parameter as trainable; only the adapter has gradients and "
        "optimizer state",
        "你把所有参数都当成了可训练参数；只有适配器才有梯度和优化器状态")),
    (lambda f, t, b: f * b + t * (4 + b + 8), (
        "you stored the gradients with frozen_bytes_per_param bytes: the "
        "trainable parameters are fp32, and so are their gradients (4 bytes each, whatever the frozen models use)",
        "你按 frozen_bytes_per_param 字节存梯度：可训练参数是 fp32，它们的梯度也是"
        "（每个 4 字节，与冻结模型用什么精度无关）")),
    (lambda f, t, b: f * b + t * (4 + 2 + 8), (
        "you counted the gradients at 2 bytes: the trainable parameters are "
        "fp32, and so are their gradients (4 bytes each)",
        "你按 2 字节计算梯度：可训练参数是 fp32，它们的梯度也是（每个 4 字节）")),
    (lambda f, t, b: (f + t) * b + t * (b + 8), (
        "you stored the trainable weights and their gradients with "
        "frozen_bytes_per_param bytes: the adapter trains in fp32, so its weights and gradients take 4 bytes each",
        "你按 frozen_bytes_per_param 字节存可训练权重及其梯度：适配器用 fp32 训练，"
        "所以它的权重和梯度每个占 4 字节")),
    (lambda f, t, b: f * b + 12 * t, (
        "you left out the trainable weights' gradients (4 bytes each)",
        "你漏掉了可训练权重的梯度（每个 4 字节）")),
    (lambda f, t, b: f * b + 8 * t, (
        "the trainable part needs its fp32 weights (4), gradients (4) and two AdamW "
        "moments (8): 16 bytes each",
        "可训练部分需要 fp32 权重（4）、梯度（4）和 AdamW 的两个矩（8）：每个参数 16 字节")),
    (lambda f, t, b: (f + t) * b, (
        "you left out the gradients and AdamW state of the trainable part",
        "你漏掉了可训练部分的梯度和 AdamW 状态")),
)


@checker
def static_training_bytes(fn) -> str:
    """fn(n_frozen, n_trainable, frozen_bytes_per_param) -> bytes of weights, gradients and optimizer state.

    中文：fn(n_frozen, n_trainable, frozen_bytes_per_param) -> 权重、梯度和优化器状态所占的字节数。"""
    cases = ((1_700_000_000, 22_319_616, 2), (1_700_000_000, 22_319_616, 4), (1000, 10, 2))
    answers = []
    for args in cases:
        got = fn(*args)
        number = as_number(got)
        expect(number is not None, tr(f"return a number, got {got!r}", f"应返回一个数，实际得到 {got!r}"))
        answers.append(number)
    for args, got in zip(cases, answers):
        n_frozen, n_trainable, frozen_bytes = args
        want = n_frozen * frozen_bytes + 16 * n_trainable
        if abs(got - want) < 0.5:
            continue
        what = tr(f"for {n_frozen:,} frozen ({frozen_bytes} bytes each) and {n_trainable:,} trainable parameters",
                  f"对于 {n_frozen:,} 个冻结参数（每个 {frozen_bytes} 字节）和 {n_trainable:,} 个可训练参数，")
        for bill, (en, zh) in _WRONG_BILLS:
            expect(not all(abs(a - bill(*c)) < 0.5 for c, a in zip(cases, answers)),
                   tr(f"{what} you get {got:,.0f} bytes: {en}", f"{what}你得到 {got:,.0f} 字节：{zh}"))
        raise CheckFailed(tr(f"{what} you get {got:,.0f} bytes, expected {want:,}",
                             f"{what}你得到 {got:,.0f} 字节，应为 {want:,}"))
    return tr("frozen weights x their bytes + 16 bytes per trainable parameter (fp32 weight, gradient, two moments).",
              "冻结权重 x 每个的字节数 + 每个可训练参数 16 字节（fp32 权重、梯度、两个矩）。")
