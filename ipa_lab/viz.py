"""Figures for the notebooks: image grids (prompt, then samples), image rows, loss curves.

Every function returns a matplotlib Figure built with pyplot, so a notebook cell that ends
with `image_grid(...);` shows it exactly once. Nothing here prints or saves anything.
Images may be PIL images, (H, W, 3) arrays (uint8, or floats in [0, 1]) or (3, H, W) tensors
(in [0, 1] as the pipeline's output_type="pt" gives, or in [-1, 1] as the data set's
`pixel_values`, recognised by negative values).
"""
from __future__ import annotations

import numpy as np
import torch


def to_array(image) -> np.ndarray:
    """Any supported image -> (H, W, 3) float array in [0, 1], for imshow."""
    if isinstance(image, torch.Tensor):
        x = image.detach().float().cpu()
        if x.ndim != 3 or x.shape[0] not in (1, 3):
            raise ValueError(f"expected a (3, H, W) image tensor, got shape {tuple(x.shape)}")
        if x.min() < 0:
            x = (x + 1) / 2
        return x.clamp(0, 1).permute(1, 2, 0).numpy()
    a = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {a.shape}")
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    return np.clip(a.astype(np.float32), 0, 1)


def _off(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def image_grid(prompt_images, samples, titles=None, row_labels=None, cell: float = 1.1):
    """One row per prompt: the prompt image (framed), then its samples.

    prompt_images: list of B images, or None for a grid of samples only.
    samples: a list of B lists, or a flat list of B * N images in prompt-major order (what
        `generate` returns).
    titles: column titles (1 + N with prompts, N without); default "prompt", "sample 1", ...
    row_labels: optional text to the left of each row (e.g. the captions).
    """
    import matplotlib.pyplot as plt

    rows = len(prompt_images) if prompt_images is not None else None
    samples = list(samples)
    if samples and not isinstance(samples[0], (list, tuple)):
        if rows is None:
            rows = 1
        if len(samples) % rows:
            raise ValueError(f"{len(samples)} samples cannot be split evenly over {rows} prompts")
        per = len(samples) // rows
        samples = [samples[i * per : (i + 1) * per] for i in range(rows)]
    rows = len(samples) if rows is None else rows
    if len(samples) != rows:
        raise ValueError(f"{len(samples)} rows of samples for {rows} prompt images")
    n = max((len(s) for s in samples), default=0)
    lead = 0 if prompt_images is None else 1
    cols = lead + n
    if titles is None:
        titles = (["prompt"] if lead else []) + [f"sample {j + 1}" for j in range(n)]
    if len(titles) != cols:
        raise ValueError(f"{len(titles)} titles for {cols} columns")
    fig, axes = plt.subplots(rows, cols, figsize=(cell * cols + (1.6 if row_labels else 0), cell * rows + 0.3),
                             squeeze=False)
    for i in range(rows):
        for j in range(cols):
            ax = axes[i][j]
            _off(ax)
            image = prompt_images[i] if lead and j == 0 else (
                samples[i][j - lead] if j - lead < len(samples[i]) else None)
            if image is not None:
                ax.imshow(to_array(image), interpolation="nearest")
            if lead and j == 0:  # frame the prompt so it reads as the input
                for spine in ax.spines.values():
                    spine.set_visible(True)
                    spine.set_color("black")
                    spine.set_linewidth(2)
            if i == 0:
                ax.set_title(titles[j], fontsize=8)
        if row_labels:
            axes[i][0].set_ylabel(row_labels[i], rotation=0, ha="right", va="center", fontsize=7)
    fig.tight_layout()
    return fig


def show_images(images, titles=None, ncols: int = 8, cell: float = 1.1):
    """A plain grid of images, `ncols` per row, with optional titles."""
    import matplotlib.pyplot as plt

    images = list(images)
    if not images:
        raise ValueError("no images to show")
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"{len(titles)} titles for {len(images)} images")
    ncols = max(1, min(ncols, len(images)))
    nrows = -(-len(images) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(cell * ncols, cell * nrows + (0.25 * nrows if titles else 0)),
                             squeeze=False)
    for k, ax in enumerate(axes.flat):
        _off(ax)
        if k < len(images):
            ax.imshow(to_array(images[k]), interpolation="nearest")
            if titles is not None:
                ax.set_title(titles[k], fontsize=7)
    fig.tight_layout()
    return fig


def moving_average(values, window: int) -> np.ndarray:
    """Mean of the last `window` values at each point (fewer at the start)."""
    v = np.asarray(values, dtype=np.float64)
    if window <= 1 or len(v) == 0:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def loss_curve(steps, losses, window: int | None = None, title: str = "training loss"):
    """The raw loss (faint) and its moving average (bold, from the first full window on) against the step.

    The diffusion loss is dominated by the random timestep of each batch, so the raw curve is
    noisy and falls slowly; the average shows the trend. Samples tell more than this curve.
    window: moving-average length (default: about 1/20 of the run, at least 1).
    """
    import matplotlib.pyplot as plt

    steps, losses = list(steps), list(losses)
    if len(steps) != len(losses):
        raise ValueError(f"{len(steps)} steps for {len(losses)} losses")
    window = window or max(1, len(losses) // 20)
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss")
    if 1 < window <= len(losses):  # drawn once a full window is in: its first point is no single batch
        ax.plot(steps[window - 1:], moving_average(losses, window)[window - 1:], color="tab:blue", linewidth=2,
                label=f"mean of last {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE (predicted vs true noise)")
    ax.set_title(title)
    ax.legend(frameon=False)
    fig.tight_layout()
    return fig
