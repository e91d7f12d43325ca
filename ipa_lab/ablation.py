"""The paper's ablations and the course's recipe, measured on the toy: each a seeded command that
trains what it compares (no checkpoint is read or kept, except the shipped adapters `plus` scores)
and writes one small CSV.

    python -m ipa_lab.ablation concat --output data/ablations/concat.csv
    python -m ipa_lab.ablation init   --output data/ablations/init.csv
    python -m ipa_lab.ablation recipe --output data/ablations/recipe.csv
    python -m ipa_lab.ablation plus   --output data/ablations/plus.csv

* `concat`: decoupled cross-attention (`IPAttnProcessor`) against the paper's "simple adapter"
  (section 4.4; `ConcatAttnProcessor`: the image tokens appended to the text tokens and read by
  the layer's own frozen to_k/to_v, so only the projection trains). Same recipe, steps and data.
* `init`: `to_k_ip`/`to_v_ip` started as copies of to_k/to_v (the original; the paper's reason,
  section 3.2.2: faster convergence), as zeros (ControlNet's argument: no change at step 0) and
  at random. For each: how much the UNet's output changes at step 0, the gradient that reaches
  to_k_ip at step 0, and the agreement after `--steps` steps.
* `recipe`: the course's recipe (lr 1e-3, text dropped in 55% of samples) against the original's
  (lr 1e-4, text dropped in 10%), both on the fast path (encoder cache, built fresh and timed),
  and the original recipe run the original way (`--reference`: the frozen encoders on every
  step). Image-only agreement every `--eval-every` steps until colour reaches `--target` or
  `--max-steps` (the cap) is spent; seconds are training time (plus the cache build), evaluation
  excluded, all in one process on one machine.
* `plus`: the shipped base and Plus adapters under the same measurement.

The measurement everywhere is `ipa_lab.evaluate`'s: the first `--n` (64) validation prompts,
one sample each from the same noise, 25 DDIM steps, guidance 5, attributes read from the pixels
(`metrics.classify`) and CLIP-I from the toy CLIP; conditions "image only" (empty text) and
"text + image" (the caption). Training uses `ipa_lab.trainer` (the same `Trainer.train_step` as
`python -m ipa_lab.train`, every draw from (seed, step)), batch 64, seed 0.

Measured results, their commands and timings: docs/benchmarks.md; the tables: notebooks 02 and 06.
This module imports only the standard library until the command line has been checked, so a
bad flag fails at once.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from .results import read_csv, write_csv  # noqa: F401  (notebooks import read_csv from here too)

EXPERIMENTS = ("concat", "init", "recipe", "plus")
CONDITIONS = ("image only", "text + image")
ATTRIBUTES = ("colour", "shape", "position", "size")
# Options that belong to one experiment only (given to another, they are refused, not ignored).
ONLY = {"steps": ("concat", "init"), "max_steps": ("recipe",), "eval_every": ("recipe",), "target": ("recipe",),
        "base": ("plus",), "plus": ("plus",)}
DEFAULTS = {"steps": 300, "max_steps": 400, "eval_every": 50, "target": 0.9}


# ----------------------------------------------------------------------------- the pieces
def use_concatenated_attention(trainer) -> None:
    """Turn a freshly built `Trainer` into the simple adapter, before its first step: every
    cross-attention layer gets a `ConcatAttnProcessor` (no weights: the image tokens go through
    the layer's frozen to_k/to_v), and AdamW, with the recipe's settings, gets the image
    projection alone (the decoupled adapter also trains to_k_ip/to_v_ip)."""
    import torch
    from torch import nn

    from .adapter import is_ip_processor
    from .attention import ConcatAttnProcessor

    unet, cfg = trainer.bb.unet, trainer.cfg
    unet.set_attn_processor({name: ConcatAttnProcessor(cfg.num_tokens) if is_ip_processor(p) else p
                             for name, p in unet.attn_processors.items()})
    trainer.ip_adapter.adapter_modules = nn.ModuleList(unet.attn_processors.values())
    adamw = torch.optim.AdamW(trainer.ip_adapter.image_proj_model.parameters(), lr=cfg.lr,
                              weight_decay=cfg.weight_decay)
    trainer.optimizer = trainer.accelerator.prepare_optimizer(adamw)


def reinitialise_branch(trainer, init: str, seed: int = 0) -> None:
    """Set every `to_k_ip`/`to_v_ip` of a freshly built `Trainer` as `init` says
    (`adapter.init_ip_branch`; "random" draws from `seed`), in place: the optimizer keeps them."""
    import torch

    from .adapter import init_ip_branch, ip_processors

    layers = dict(trainer.bb.unet.named_modules())
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for name, processor in ip_processors(trainer.bb.unet).items():
            init_ip_branch(processor, layers[name.removesuffix(".processor")], init)


def output_change(trainer, step: int = 0) -> float:
    """How much the adapter changes the UNet's prediction on the training batch of `step`:
    RMS(with adapter - without) / RMS(without), on that step's noisy latents, text and image."""
    import torch

    from .generate import plain_attention

    d = trainer.draw(step)
    latents, text, image = trainer.inputs(d, trainer.device)
    noisy = trainer.bb.noise_scheduler.add_noise(latents, d.noise, d.timesteps)
    with torch.no_grad():
        with_adapter = trainer.ip_adapter(noisy, d.timesteps, text, image)
        with plain_attention(trainer.bb.unet):
            without = trainer.bb.unet(noisy, d.timesteps, text).sample
    return float((with_adapter - without).pow(2).mean().sqrt() / without.pow(2).mean().sqrt())


def key_gradient(trainer) -> float:
    """The norm of the gradients the last step left on every to_k_ip (0: to_k_ip did not learn)."""
    from .adapter import ip_processors

    grads = [p.to_k_ip.weight.grad for p in ip_processors(trainer.bb.unet).values()]
    return float(sum(g.pow(2).sum() for g in grads if g is not None) ** 0.5)


def train_steps(trainer, start: int, stop: int) -> float:
    """Train steps start..stop-1 (`Trainer.train_step`: the draws of each step); the seconds taken."""
    trainer.model.train()
    t0 = time.perf_counter()
    for step in range(start, stop):
        trainer.train_step(step)
    return time.perf_counter() - t0


def score(pipe, projection, records, root, clip, n: int, seed: int, conditions=CONDITIONS) -> list[dict]:
    """`ipa_lab.evaluate`'s measurement of the adapter now in `pipe.unet`, one row per condition:
    the image with empty text ("image only") or with its caption ("text + image")."""
    from .evaluate import scale_sweep

    captions = [r["text"] for r in records[:n]]
    rows = []
    for condition in conditions:
        prompt = "" if condition == "image only" else captions
        row = scale_sweep(pipe, projection, records, root, scales=(1.0,), clip=clip, n=n, seed=seed, prompt=prompt)[0]
        rows.append({"condition": condition, **{k: v for k, v in row.items() if k != "scale"}})
    return rows


class Lab:
    """What every experiment shares: one pipeline (its UNet receives each variant's adapter in
    turn), the validation prompts, the scoring CLIP, and a folder for the runs' temporary files."""

    def __init__(self, args, workdir: Path):
        from .data import read_records
        from .pipeline import load_pipeline, load_scoring_clip

        self.args, self.workdir = args, workdir
        self.pipe = load_pipeline(args.model)
        self.records = read_records(Path(args.data) / "val.json")
        if len(self.records) < args.n:
            raise ValueError(f"--n {args.n}: {args.data}/val.json has only {len(self.records)} prompts")
        self.clip = load_scoring_clip()

    def trainer(self, name: str, fast: bool = True, **recipe):
        """A `Trainer` on this pipeline's models with plain attention restored first (the frozen
        weights are untouched by any adapter), a fresh encoder cache when `fast` (so its build is
        timed), and the course's recipe unless `recipe` overrides it."""
        from .generate import remove_adapter
        from .train import TrainConfig
        from .trainer import Trainer, backbone_of

        remove_adapter(self.pipe)
        a = self.args
        cfg = TrainConfig(model=a.model, data=a.data, output=str(self.workdir / name), seed=a.seed, fast=fast,
                          cache_dir=str(self.workdir / f"cache-{name}"), verify_frozen=1, **recipe)
        return Trainer(cfg, backbone_of(self.pipe))

    def score(self, projection, conditions=CONDITIONS) -> list[dict]:
        return score(self.pipe, projection, self.records, self.args.data, self.clip, self.args.n, self.args.seed,
                     conditions)


def _trainable(trainer) -> int:
    return sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"])


# ----------------------------------------------------------------------------- the experiments
def run_concat(lab: Lab, log=print) -> list[dict]:
    """Decoupled against concatenated (the simple adapter): same recipe, steps, draws and data."""
    rows = []
    for variant in ("decoupled", "concatenated"):
        trainer = lab.trainer(variant)
        if variant == "concatenated":
            use_concatenated_attention(trainer)
        seconds = train_steps(trainer, 0, lab.args.steps)
        losses = [loss for _, loss in trainer.losses]
        log(f"{variant}: {lab.args.steps} steps in {seconds:.0f} s")
        for row in lab.score(trainer.ip_adapter.image_proj_model):
            rows.append({"variant": variant, "steps": lab.args.steps, "trainable": _trainable(trainer),
                         "final_loss": sum(losses[-50:]) / len(losses[-50:]), **row})
    return rows


def run_init(lab: Lab, log=print) -> list[dict]:
    """Copies, zeros, random: the output change and the to_k_ip gradient at step 0, then agreement."""
    from .adapter import INITS

    rows = []
    for init in INITS:
        trainer = lab.trainer(f"init-{init}")
        reinitialise_branch(trainer, init, lab.args.seed)
        change = output_change(trainer, 0)
        train_steps(trainer, 0, 1)
        gradient, first_loss = key_gradient(trainer), trainer.losses[0][1]
        seconds = train_steps(trainer, 1, lab.args.steps)
        losses = [loss for _, loss in trainer.losses]
        log(f"init {init}: output change at step 0 {change:.3f}, {lab.args.steps} steps in {seconds:.0f} s")
        for row in lab.score(trainer.ip_adapter.image_proj_model):
            rows.append({"init": init, "steps": lab.args.steps, "output_change_step0": change,
                         "to_k_ip_grad_step0": gradient, "loss_step0": first_loss,
                         "final_loss": sum(losses[-50:]) / len(losses[-50:]), **row})
    return rows


def run_recipe(lab: Lab, log=print) -> list[dict]:
    """Steps and seconds to image-only colour agreement `--target`, for three ways to train."""
    from .train import COURSE, ORIGINAL

    a = lab.args
    runs = (("course", COURSE, True), ("original", ORIGINAL, True), ("original, reference path", ORIGINAL, False))
    rows = []
    for name, recipe, fast in runs:
        trainer = lab.trainer(name.replace(", ", "-").replace(" ", "-"), fast=fast, **recipe)
        step, seconds = 0, 0.0
        while step < a.max_steps:
            stop = min(step + a.eval_every, a.max_steps)
            seconds += train_steps(trainer, step, stop)
            step = stop
            row = lab.score(trainer.ip_adapter.image_proj_model, ("image only",))[0]
            rows.append({"run": name, "lr": recipe["lr"], "text_dropped": recipe["drop_text"] + recipe["drop_both"],
                         "encoders": "cached" if fast else "every step", "step": step,
                         "cache_seconds": trainer.cache_seconds, "train_seconds": seconds,
                         **{k: row[k] for k in ATTRIBUTES}})
            log(f"{name}: step {step}, {seconds:.0f} s, image-only colour {row['colour']:.3f}")
            if row["colour"] >= a.target:
                break
    return rows


def run_plus(lab: Lab, log=print) -> list[dict]:
    """The shipped base and Plus adapters, measured alike (nothing trains)."""
    from .adapter import count_parameters
    from .generate import load_adapter
    from .projection import num_tokens_of

    rows = []
    for name, checkpoint in (("base", lab.args.base), ("plus", lab.args.plus)):
        projection = load_adapter(lab.pipe, checkpoint)
        for row in lab.score(projection):
            rows.append({"adapter": name, "tokens": num_tokens_of(projection),
                         "projection_parameters": count_parameters(projection), **row})
        log(f"{name}: scored")
    return rows


RUNS = {"concat": run_concat, "init": run_init, "recipe": run_recipe, "plus": run_plus}


# ----------------------------------------------------------------------------- files and the command line
def parse_args(argv=None) -> argparse.Namespace:
    """The command line, checked before anything heavy loads (argparse exits with the message)."""
    from .pipeline import REPO_ROOT, resolve_model

    shipped = REPO_ROOT / "data"
    p = argparse.ArgumentParser(prog="python -m ipa_lab.ablation", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=EXPERIMENTS)
    p.add_argument("--output", required=True, help="the CSV to write, e.g. data/ablations/concat.csv")
    p.add_argument("--overwrite", action="store_true", help="replace the CSV if it exists")
    p.add_argument("--model", default=str(shipped / "toy-sd"))
    p.add_argument("--data", default=str(shipped / "shapes"), help="folder with train.json, val.json and images")
    p.add_argument("--n", type=int, default=64, help="validation prompts (as python -m ipa_lab.evaluate)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help=f"concat, init: steps per variant ({DEFAULTS['steps']})")
    p.add_argument("--max-steps", type=int, default=None,
                   help=f"recipe: the cap on each run's steps ({DEFAULTS['max_steps']})")
    p.add_argument("--eval-every", type=int, default=None, help=f"recipe: steps between evaluations ({DEFAULTS['eval_every']})")
    p.add_argument("--target", type=float, default=None,
                   help=f"recipe: the image-only colour agreement to reach ({DEFAULTS['target']})")
    p.add_argument("--base", default=None, help="plus: the base adapter (data/ip-adapter-toy)")
    p.add_argument("--plus", default=None, help="plus: the Plus adapter (data/ip-adapter-toy-plus)")
    a = p.parse_args(argv)

    for name, experiments in ONLY.items():
        if getattr(a, name) is not None and a.experiment not in experiments:
            p.error(f"--{name.replace('_', '-')} applies to {' and '.join(experiments)}, not to {a.experiment}")
    for name, value in DEFAULTS.items():
        if getattr(a, name) is None:
            setattr(a, name, value)
    a.base = a.base or str(shipped / "ip-adapter-toy" / "ip_adapter.safetensors")
    a.plus = a.plus or str(shipped / "ip-adapter-toy-plus" / "ip_adapter.safetensors")
    out = Path(a.output)
    if out.suffix != ".csv":
        p.error(f"--output {out}: expected a .csv file name")
    if out.is_dir():
        p.error(f"--output {out} is a folder; expected a .csv file name")
    if out.exists() and not a.overwrite:
        p.error(f"{out} exists: pass --overwrite to replace it, or choose another --output")
    bad = [f"--{k.replace('_', '-')} {getattr(a, k)} (must be >= 1)" for k in ("n", "steps", "max_steps", "eval_every")
           if getattr(a, k) < 1]
    if not 0 < a.target <= 1:
        bad.append(f"--target {a.target} (an agreement, in (0, 1])")
    if not 0 <= a.seed < 2**32:
        bad.append(f"--seed {a.seed} (must be in [0, 2**32))")
    if bad:
        p.error("invalid settings: " + ", ".join(bad))
    for split in ("train.json", "val.json"):
        if not (Path(a.data) / split).is_file():
            p.error(f"no {split} in --data {a.data}: expected the shapes data set's folder (data/shapes)")
    if a.experiment == "plus":
        for flag, path in (("--base", a.base), ("--plus", a.plus)):
            if not Path(path).is_file():
                p.error(f"{flag} {path}: no such checkpoint")
    try:
        resolve_model(a.model)
    except FileNotFoundError as e:
        p.error(str(e))
    return a


def main(argv=None) -> None:
    args = parse_args(argv)
    from .runtime import setup
    from .tables import format_table

    setup(args.seed, "cpu")  # the toy on the CPU: the machine every number of the course comes from
    with tempfile.TemporaryDirectory(prefix="ipa-ablation-") as workdir:
        lab = Lab(args, Path(workdir))
        t0 = time.perf_counter()
        rows = RUNS[args.experiment](lab, log=lambda text: print(text, file=sys.stderr))
    write_csv(Path(args.output), rows)
    print(format_table(rows))
    print(f"wrote {args.output} ({len(rows)} rows) in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
