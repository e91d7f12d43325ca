"""Train an IP-Adapter from the command line: the run's settings, checked before anything loads.

    python -m ipa_lab.train --model data/toy-sd --data data/shapes --output runs/ip-adapter
    torchrun --nproc_per_node 2 -m ipa_lab.train ...     # several processes (CPU or GPU)

This module holds `TrainConfig` (everything a run depends on, saved with its checkpoint) and
the command line. It imports only the standard library until the settings have been checked
(`preflight`), so a mistyped flag or path fails in well under two seconds, before torch or any
model loads. The training itself is `ipa_lab.trainer`.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path

# The original recipe's values (tutorial_train.py and the paper). The drop rates are three bands of
# one draw per sample: the image alone, the text alone, both; so the image is absent from 10% of the
# samples (5% alone + 5% both) and the text from 10%.
ORIGINAL = dict(lr=1e-4, weight_decay=0.01, drop_image=0.05, drop_text=0.05, drop_both=0.05)
# This course's short-run recipe: a higher lr and the text dropped from 55% of the samples (50% alone
# + 5% with the image), so that 300 steps learn to read the image (notebook 4 explains why).
COURSE = dict(lr=1e-3, weight_decay=0.01, drop_image=0.05, drop_text=0.5, drop_both=0.05)

# The files a run writes into its output folder; training_state.pt is written last.
RUN_FILES = ("ip_adapter.safetensors", "loss.csv", "training_state.pt")
# Settings that change the numbers a run produces: a resumed run must keep them (the batch is
# compared as the global batch, batch_size times the number of processes).
RESULT_KEYS = ("model", "image_encoder", "data", "variant", "num_tokens", "lr", "weight_decay", "drop_image",
               "drop_text", "drop_both", "precision", "seed", "resolution", "fast")


@dataclass
class TrainConfig:
    """Everything a run depends on; saved next to the checkpoint so a run can be resumed."""

    model: str = "data/toy-sd"
    image_encoder: str | None = None  # a CLIPVisionModelWithProjection folder, if not in the pipeline
    data: str = "data/shapes"
    output: str = "runs/ip-adapter"
    variant: str = "base"  # "base" (ImageProjModel) or "plus" (Resampler)
    num_tokens: int | None = None  # 4 for base, 16 for Plus
    steps: int = 300
    batch_size: int = 64  # per process, as in the original
    lr: float = COURSE["lr"]
    weight_decay: float = COURSE["weight_decay"]
    drop_image: float = COURSE["drop_image"]
    drop_text: float = COURSE["drop_text"]
    drop_both: float = COURSE["drop_both"]
    device: str = "auto"
    precision: str = "fp32"  # "fp32", "bf16" or "fp16" (autocast, on CUDA)
    seed: int = 0
    checkpoint_every: int = 100
    resume: bool = False
    overwrite: bool = False  # replace the run already in `output`
    fast: bool = True  # cache the frozen encoders' outputs
    cache_dir: str | None = None  # where the encoder cache lives; default output/encoder_cache
    num_workers: int = 0  # DataLoader workers that read and preprocess images
    verify_frozen: int = 8  # frozen tensors per model hashed before and after (0: every one)
    compile: bool = False  # torch.compile the UNet (helps on GPU)
    channels_last: bool = False
    fused_adamw: bool = False  # one fused kernel for the optimizer step (CUDA)
    resolution: int | None = None  # pixels; default: the VAE's sample_size

    def __post_init__(self):
        if self.variant not in ("base", "plus"):
            raise ValueError(f"variant must be 'base' or 'plus', got {self.variant!r}")
        if self.num_tokens is None:
            self.num_tokens = 4 if self.variant == "base" else 16
        positive = {"batch_size": self.batch_size, "num_tokens": self.num_tokens,
                    "checkpoint_every": self.checkpoint_every}
        if self.resolution is not None:
            positive["resolution"] = self.resolution
        bad = [f"{k}={v} (must be >= 1)" for k, v in positive.items() if v < 1]
        bad += [f"{k}={v} (must be >= 0)" for k, v in (("steps", self.steps), ("num_workers", self.num_workers),
                                                       ("verify_frozen", self.verify_frozen)) if v < 0]
        if not 0 <= self.seed < 2**32:
            bad.append(f"seed={self.seed} (must be in [0, 2**32), as NumPy's seeds are)")
        if bad:
            raise ValueError(f"invalid settings: {', '.join(bad)}")
        if self.resolution is not None and self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8 (the VAE downsamples by 8), got {self.resolution}")
        for name in ("drop_image", "drop_text", "drop_both"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if self.drop_image + self.drop_text + self.drop_both > 1:
            raise ValueError("drop_image + drop_text + drop_both must not exceed 1")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ValueError(f"lr must be > 0 and weight_decay >= 0, got lr={self.lr}, weight_decay={self.weight_decay}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite contradict each other: --resume continues the run in the "
                             "output folder, --overwrite replaces it; pass one")


def preflight(cfg: TrainConfig, check_model: bool = True) -> list[str]:
    """Every check that costs nothing, before any model or data loads; returns warnings.

    Raises FileNotFoundError / FileExistsError / ValueError naming what is wrong."""
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--output {out} is a file; expected a folder for the run's checkpoint and logs")
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if existing and not (cfg.resume or cfg.overwrite):
        raise FileExistsError(f"{out} already holds a training run ({', '.join(existing)}): pass --resume to "
                              "continue it, --overwrite to replace it, or choose another --output")
    if cfg.resume and not existing:  # leftovers of a run killed before its first checkpoint restart it
        raise FileNotFoundError(f"--resume: no checkpoint to resume from at {out / 'training_state.pt'}")
    data = Path(cfg.data)
    if not data.is_dir():
        raise FileNotFoundError(f"data folder {data} does not exist; expected a folder with train.json "
                                "(a JSON list of {'image_file', 'text'} entries) and its images")
    if not (data / "train.json").is_file():
        raise FileNotFoundError(f"no training data at {data}: expected {data / 'train.json'} (a JSON list of "
                                "{'image_file', 'text'} entries) and its images")
    if cfg.image_encoder is not None and not (Path(cfg.image_encoder) / "config.json").is_file():
        raise FileNotFoundError(f"no image encoder at {cfg.image_encoder}; expected a "
                                "CLIPVisionModelWithProjection folder with config.json")
    if check_model:
        from .pipeline import resolve_model

        resolve_model(cfg.model)
    warnings = []
    if cfg.variant == "base" and cfg.num_tokens != 4:
        warnings.append(f"num_tokens={cfg.num_tokens}: ipa_lab and the original code load such a base checkpoint, "
                        "but diffusers' load_ip_adapter assumes 4 tokens for the base model and will not")
    return warnings


def parse_args(argv=None) -> TrainConfig:
    """The command line -> a checked TrainConfig (argparse exits with a message on bad values)."""
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m ipa_lab.train", description="Train an IP-Adapter on a frozen Stable Diffusion.")
    p.add_argument("--model", default=d.model, help="pipeline folder, or a hub id already in the local cache")
    p.add_argument("--image-encoder", default=None, help="CLIPVisionModelWithProjection folder, if the pipeline has none")
    p.add_argument("--data", default=d.data, help="folder with train.json ({'image_file', 'text'} list) and images")
    p.add_argument("--output", default=d.output)
    p.add_argument("--variant", choices=["base", "plus"], default=d.variant)
    p.add_argument("--num-tokens", type=int, default=None, help="image tokens (default 4, Plus 16)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per process")
    p.add_argument("--resolution", type=int, default=None, help="pixels (default: the VAE's sample_size)")
    what = {"drop_image": "probability of dropping the image alone; ", "drop_text": "probability of dropping the "
            "text alone; ", "drop_both": "probability of dropping the image and the text together; "}
    for name in COURSE:
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=None,
                       help=f"{what.get(name, '')}default {COURSE[name]:g} (--original-recipe: {ORIGINAL[name]:g})")
    p.add_argument("--original-recipe", action="store_true",
                   help="lr 1e-4 and each drop band 0.05 (image alone, text alone, both: the image and the text "
                        "are each absent from 10%% of the samples), as the original; flags given explicitly still win")
    p.add_argument("--device", default=d.device, help="auto (CUDA if present, else CPU), cpu, cuda, cuda:1 ...")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=d.precision)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--resume", action="store_true", help="continue the run in --output")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --output")
    p.add_argument("--reference", action="store_true", help="run the frozen encoders every step (the original's way)")
    p.add_argument("--cache-dir", default=None, help="encoder cache folder (default: OUTPUT/encoder_cache)")
    p.add_argument("--num-workers", type=int, default=d.num_workers, help="DataLoader workers reading images")
    p.add_argument("--verify-frozen", type=int, default=d.verify_frozen,
                   help="frozen tensors per model proven unchanged by hashing (0: all; seconds per GB)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--fused-adamw", action="store_true")
    a = p.parse_args(argv)
    recipe = ORIGINAL if a.original_recipe else COURSE
    for name in COURSE:  # explicit flags win over either recipe
        if getattr(a, name) is None:
            setattr(a, name, recipe[name])
    names = {f.name for f in fields(TrainConfig)}
    kw = {k: v for k, v in vars(a).items() if k in names}
    try:
        return TrainConfig(**kw, fast=not a.reference)
    except ValueError as e:
        p.error(str(e))


def _is_main_process() -> bool:
    """Rank 0 under torchrun / accelerate launch (they set RANK), or a single process."""
    return os.environ.get("RANK", "0") == "0"


def main(argv=None) -> None:
    cfg = parse_args(argv)
    main_process = _is_main_process()
    try:
        for warning in preflight(cfg):
            if main_process:
                print(f"warning: {warning}", file=sys.stderr)
        from .runtime import quiet, set_threads
        from .trainer import train

        quiet()
        set_threads()  # IPA_LAB_THREADS, as in the notebooks (several runs sharing cores: docs/teaching.md)
        result = train(cfg, log=print if main_process else None)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if not main_process:  # one report, not one per process
        return
    r = result.report
    ran = result.steps - result.first_step
    print(f"trained {ran} steps ({result.first_step} to {result.steps}) in {result.train_seconds:.1f} s (encoder cache "
          f"{result.cache_seconds:.1f} s); final loss {result.losses[-1][1]:.4f}" if ran else "no steps to train")
    if r:
        print(f"frozen tensors unchanged: {r['frozen_tensors'] - len(r['frozen_changed'])}/{r['frozen_tensors']} hashed "
              f"(of {r['frozen_total']}; --verify-frozen 0 hashes all); trainable tensors moved: "
              f"{r['trainable_tensors'] - len(r['trainable_unmoved'])}/{r['trainable_tensors']}")
    print(f"checkpoint: {result.output / 'ip_adapter.safetensors'}")


if __name__ == "__main__":
    main()
