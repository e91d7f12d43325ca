"""Train an IP-Adapter on a frozen Stable Diffusion: the original recipe, and a fast path.

What trains (the original's tutorial_train.py, read line by line in notebooks 3 and 4):
- frozen: UNet, VAE, text encoder, image encoder (in eval mode throughout);
- trained: the image projection (`ImageProjModel`, or the `Resampler` for Plus) and the
  `to_k_ip` / `to_v_ip` of every cross-attention layer, with AdamW over those alone;
- each sample: image dropped (zero embedding), text dropped (empty caption) or both, with small
  probabilities, so that classifier-free guidance works for either prompt at inference;
- latents from the VAE, DDPM noise at a uniform timestep, MSE between the UNet's prediction and
  its target (the noise, or the velocity for a `v_prediction` scheduler).

The *reference* path runs the frozen encoders on every step, as the original does, on images
read by a `DataLoader` with workers. The *fast* path (`fast=True`) runs them once over the data
set (`ipa_lab.cache`, on disk) and only reads rows. Every random draw of a step comes from
(seed, step) alone, so both paths see the same batch, a distributed run draws the same global
batch as one process, and a stopped run resumed from its checkpoint ends bitwise equal to one
that never stopped. The command line and the settings are `ipa_lab.train`.
"""
from __future__ import annotations

import csv
import functools
import glob
import hashlib
import itertools
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from . import cache as encoder_cache
from .adapter import freeze, install_ip_adapter
from .checkpoint import save_ip_adapter, write_atomically
from .data import IPAdapterDataset
from .encoders import encode_text, image_features, unconditional_image_features
from .loop import load_state, run_steps, save_state
from .projection import build_image_projection
from .runtime import get_device, seed_everything
from .train import RESULT_KEYS, RUN_FILES, TrainConfig, preflight

PREDICTION_TYPES = ("epsilon", "v_prediction")


class IPAdapter(nn.Module):
    """The trainable whole, as in the original: the UNet (frozen, with the new processors),
    the image projection, and `adapter_modules` (the processors, kept for the optimizer and
    the checkpoint)."""

    def __init__(self, unet, image_proj_model, adapter_modules):
        super().__init__()
        self.unet = unet
        self.image_proj_model = image_proj_model
        self.adapter_modules = adapter_modules

    def forward(self, noisy_latents, timesteps, encoder_hidden_states, image_embeds):
        ip_tokens = self.image_proj_model(image_embeds)
        # Text tokens first, image tokens last: IPAttnProcessor splits them at L - num_tokens.
        states = torch.cat([encoder_hidden_states, ip_tokens.to(encoder_hidden_states.dtype)], dim=1)
        return self.unet(noisy_latents, timesteps, states).sample

    def train(self, mode: bool = True):
        """Only the trained parts change mode: the frozen UNet stays in eval mode (no dropout)."""
        self.training = mode
        self.image_proj_model.train(mode)
        self.adapter_modules.train(mode)
        return self


@dataclass
class Backbone:
    """The four frozen models and what goes with them."""

    vae: nn.Module
    text_encoder: nn.Module
    image_encoder: nn.Module
    unet: nn.Module
    tokenizer: object
    feature_extractor: object
    noise_scheduler: object

    def frozen(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder, "image_encoder": self.image_encoder}


def load_backbone(model: str, device, dtype=torch.float32, image_encoder: str | None = None) -> Backbone:
    """Load the pipeline's parts (offline) and freeze all four models.

    `image_encoder`: the real IP-Adapter keeps its CLIP image encoder apart from SD 1.5
    (`models/image_encoder`); the toy pipeline ships one in `image_encoder/`."""
    from .pipeline import load_pipeline

    pipe = load_pipeline(model, device=device, dtype=dtype, image_encoder=image_encoder)
    if pipe.image_encoder is None:
        raise FileNotFoundError(f"{model} has no image_encoder/; pass --image-encoder with a "
                                "CLIPVisionModelWithProjection folder (IP-Adapter's models/image_encoder)")
    return backbone_of(pipe)


def backbone_of(pipe) -> Backbone:
    """A loaded pipeline's parts as a frozen `Backbone` (the same modules, not copies: a
    `Trainer` built on it trains the adapter inside `pipe.unet`, so `pipe` samples with it)."""
    from diffusers import DDPMScheduler

    bb = Backbone(pipe.vae, pipe.text_encoder, pipe.image_encoder, pipe.unet, pipe.tokenizer,
                  pipe.feature_extractor, DDPMScheduler.from_config(pipe.scheduler.config))
    freeze(*bb.frozen().values())
    return bb


def prepare_training(unet, vae, text_encoder, image_encoder, lr: float = 1e-4, weight_decay: float = 1e-2,
                     num_tokens: int = 4, variant: str = "base", fused: bool = False):
    """The original's setup, in its order: freeze the four models, build the projection, install
    the processors, AdamW over the projection and `adapter_modules` (notebook 3's exercise).

    Freezing comes first: the new `to_k_ip` / `to_v_ip` become submodules of the UNet, so a
    freeze after the install would freeze them too. The self-attention processors in
    `adapter_modules` have no parameters, so they add nothing to the optimizer.
    Returns (image_proj_model, adapter_modules, optimizer)."""
    freeze(unet, vae, text_encoder, image_encoder)
    image_proj_model = build_image_projection(dict(unet.config), image_encoder.config.to_dict(), variant,
                                              num_tokens).to(unet.device)
    adapter_modules = install_ip_adapter(unet, num_tokens=num_tokens)
    params = itertools.chain(image_proj_model.parameters(), adapter_modules.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **({"fused": True} if fused else {}))
    return image_proj_model, adapter_modules, optimizer


# ----------------------------------------------------------------------------- randomness
@dataclass
class Draw:
    """Every random choice of one step, drawn from (seed, step) alone."""

    indices: torch.Tensor  # which samples
    latent_eps: torch.Tensor  # to sample the VAE's latent distribution
    noise: torch.Tensor
    timesteps: torch.Tensor
    drop_image: torch.Tensor  # bool per sample
    drop_text: torch.Tensor


@functools.lru_cache(maxsize=2)
def _epoch_permutation(seed: int, epoch: int, n_items: int) -> torch.Tensor:
    """The order of the data set in one epoch: from the seed and the epoch alone (kept for the
    epoch, since every step of it needs the same one)."""
    return torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def batch_indices(step: int, cfg: TrainConfig, n_items: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Which items process `rank` trains on at `step`: its slice of the global batch.

    Each epoch walks a permutation of the data set in global batches of batch_size * world
    (the last `n_items % global batch` items of a permutation are skipped, as a DataLoader with
    drop_last does); a data set smaller than one global batch repeats items."""
    b, total = cfg.batch_size, cfg.batch_size * world
    epoch, k = divmod(step, max(1, n_items // total))
    idx = _epoch_permutation(cfg.seed, epoch, n_items)[torch.arange(k * total, (k + 1) * total) % n_items]
    return idx[rank * b : (rank + 1) * b]


def draw_step(step: int, cfg: TrainConfig, n_items: int, latent_shape, num_train_timesteps: int, rank: int = 0,
              world: int = 1) -> Draw:
    """One step's draws for process `rank` of `world` (each takes `cfg.batch_size` samples).

    The global batch (batch_size * world samples) is drawn whole, from (seed, step) alone, and
    each process takes its slice: so N processes see exactly what one process with an N times
    larger batch sees, and their averaged gradients are that process's gradient (see
    `batch_indices` for which items)."""
    b, total = cfg.batch_size, cfg.batch_size * world
    g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 131)
    u = torch.rand(total, generator=g)
    # One draw decides the case, as in the original: image / text / both dropped, or neither.
    p_i, p_t, p_b = cfg.drop_image, cfg.drop_text, cfg.drop_both
    drop_img = (u < p_i) | ((u >= p_i + p_t) & (u < p_i + p_t + p_b))
    drop_txt = (u >= p_i) & (u < p_i + p_t + p_b)
    eps, noise = torch.randn(total, *latent_shape, generator=g), torch.randn(total, *latent_shape, generator=g)
    t = torch.randint(0, num_train_timesteps, (total,), generator=g)
    mine = slice(rank * b, (rank + 1) * b)
    # .clone(): a slice is a view that would keep the whole global batch's noise alive
    return Draw(batch_indices(step, cfg, n_items, rank, world), eps[mine].clone(), noise[mine].clone(), t[mine].clone(),
                drop_img[mine].clone(), drop_txt[mine].clone())


# ----------------------------------------------------------------------------- inputs of a step
def collate(items: list[dict]) -> dict:
    """Data set items -> one batch: pixel tensors stacked, captions as a list."""
    return {"pixel_values": torch.stack([it["pixel_values"] for it in items]),
            "clip_pixel_values": torch.stack([it["clip_pixel_values"] for it in items]),
            "text": [it["text"] for it in items]}


class _StepBatches:
    """The items of each step, computed when the DataLoader asks (a batch_sampler)."""

    def __init__(self, steps, indices_of):
        self.steps, self.indices_of = steps, indices_of

    def __iter__(self):
        return (self.indices_of(s).tolist() for s in self.steps)

    def __len__(self):
        return len(self.steps)


class ReferenceInputs:
    """The original recipe: load the images and run the frozen encoders on every step."""

    def __init__(self, bb: Backbone, dataset: IPAdapterDataset, variant: str):
        self.bb, self.dataset, self.variant = bb, dataset, variant

    def loader(self, steps, indices_of, num_workers: int) -> DataLoader:
        """A DataLoader that yields, in order, the batch of each step in `steps` (`indices_of(step)`
        names its items); its workers read and preprocess images while the model trains."""
        return DataLoader(self.dataset, batch_sampler=_StepBatches(steps, indices_of), num_workers=num_workers,
                          collate_fn=collate)

    @torch.no_grad()
    def __call__(self, d: Draw, device, batch: dict | None = None):
        bb = self.bb
        batch = batch or collate([self.dataset[int(i)] for i in d.indices])
        post = bb.vae.encode(batch["pixel_values"].to(device, bb.vae.dtype)).latent_dist
        latents = (post.mean + post.std * d.latent_eps.to(device)) * bb.vae.config.scaling_factor
        captions = ["" if drop else text for text, drop in zip(batch["text"], d.drop_text.tolist())]
        text = encode_text(bb.tokenizer, bb.text_encoder, captions)
        plus = self.variant == "plus"
        clip = batch["clip_pixel_values"]
        if plus:  # the original zeroes the pixels of a dropped image
            clip = torch.where(d.drop_image[:, None, None, None], torch.zeros_like(clip), clip)
        image = image_features(bb.image_encoder, clip, plus)
        if not plus:
            mask = d.drop_image[:, None].to(image.device)
            image = torch.where(mask, unconditional_image_features(bb.image_encoder, False), image)
        return latents.float(), text, image


def diffusion_loss(ip_adapter: IPAdapter, noise_scheduler, latents, text, image, noise, timesteps) -> torch.Tensor:
    """Add DDPM noise at the drawn timesteps and score the UNet's prediction (MSE).

    The target is what the scheduler says the UNet predicts: the noise (`epsilon`, SD 1.5) or
    the velocity (`v_prediction`, SD 2.x at 768 px), as in diffusers' training examples."""
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"the scheduler's prediction_type is {kind!r}; IP-Adapter training supports "
                         f"{' and '.join(PREDICTION_TYPES)}")
    pred = ip_adapter(noisy, timesteps, text, image)
    return F.mse_loss(pred.float(), target.float())


def training_step(ip_adapter: IPAdapter, optimizer, noise_scheduler, latents, text_embeds, image_embeds, noise,
                  timesteps) -> float:
    """One optimizer step in plain PyTorch (notebook 4's exercise; `Trainer.train_step` is the
    same step through accelerate): noise the latents, predict, MSE, backward, step; the loss."""
    loss = diffusion_loss(ip_adapter, noise_scheduler, latents, text_embeds, image_embeds, noise, timesteps)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def train_loop(trainer: "Trainer", steps: int, step_fn=training_step) -> list[float]:
    """The training loop in plain PyTorch (notebook 4's exercise): for each step, its draws (from
    (seed, step) alone), its inputs, one `step_fn`; returns the losses. `Trainer.run` is this loop
    with checkpoints, accelerate and Ctrl-C handling around it."""
    losses = []
    for step in range(steps):
        d = trainer.draw(step)
        latents, text, image = trainer.inputs(d, trainer.device)
        losses.append(step_fn(trainer.ip_adapter, trainer.optimizer, trainer.bb.noise_scheduler, latents, text, image,
                              d.noise.to(trainer.device), d.timesteps.to(trainer.device)))
    return losses


# ----------------------------------------------------------------------------- validation
# The fixed validation loss, each condition on the same latents, noise and timesteps, text empty.
VALIDATION_CONDITIONS = ("image", "no image", "other image", "adapter off")


def validation_inputs(bb: Backbone, data: str | os.PathLike, variant: str, cache_dir: str | os.PathLike, device,
                      resolution: int | None = None, log=None) -> encoder_cache.EncoderCache:
    """The encoder cache of the data set's validation split (`val.json`), built once under `cache_dir`.

    The same cache as training's (`ipa_lab.cache`), keyed by the split's records, so the two never mix."""
    dataset = IPAdapterDataset(data, "val", bb.feature_extractor, resolution or bb.vae.config.sample_size)
    return encoder_cache.open_or_build(bb, dataset, variant, cache_dir, device, log=log)


@torch.no_grad()
def validation_loss(ip_adapter: IPAdapter, noise_scheduler, cache: encoder_cache.EncoderCache, n: int = 256,
                    seed: int = 0, batch_size: int = 64, conditions=VALIDATION_CONDITIONS) -> dict[str, float]:
    """The diffusion loss on the first `n` validation images, with a fixed draw: a loss that shows learning.

    The training loss hardly falls because each batch draws new timesteps, and the timestep moves the
    loss far more than the adapter does. Here every condition and every call sees the same latents,
    noise and timesteps (drawn from `seed` alone) and an empty caption, so only the image prompt
    differs between the conditions:
    - "image": each image's own embedding (what the adapter was trained to read);
    - "no image": the "no image" features (a dropped image in training);
    - "other image": the embedding of the next image in the batch (a wrong prompt);
    - "adapter off": the image branch at scale 0, the frozen UNet alone.
    An adapter that reads its image scores "image" lowest and "other image" highest; an untrained
    one scores them alike. Returns {condition: mean MSE}."""
    unknown = [c for c in conditions if c not in VALIDATION_CONDITIONS]
    if unknown:
        raise ValueError(f"unknown condition(s) {unknown}; choose from {list(VALIDATION_CONDITIONS)}")
    n_items = len(cache.image_ids)
    if not 2 <= n <= n_items:
        raise ValueError(f"n={n}: the validation set has {n_items} items; n must be in [2, {n_items}]")
    device = next(ip_adapter.image_proj_model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    shape = cache.mean.shape[1:]
    eps, noise = torch.randn(n, *shape, generator=g), torch.randn(n, *shape, generator=g)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (n,), generator=g)
    processors = [p for p in ip_adapter.adapter_modules if hasattr(p, "to_k_ip")]
    scales = [p.scale for p in processors]
    totals = {}
    try:
        for condition in conditions:
            for p in processors:  # the image branch's weight, lambda: 0 switches it off exactly
                p.scale = 0.0 if condition == "adapter off" else 1.0
            total = 0.0
            for start in range(0, n, batch_size):
                s = slice(start, min(n, start + batch_size))
                k = s.stop - s.start
                # A Draw with every caption dropped: the cache gives the latents, empty text and image rows.
                d = Draw(torch.arange(s.start, s.stop), eps[s], noise[s], timesteps[s],
                         torch.full((k,), condition == "no image"), torch.ones(k, dtype=torch.bool))
                latents, text, image = cache(d, device)
                if condition == "other image":
                    image = image.roll(1, dims=0)  # each sample gets its neighbour's image
                loss = diffusion_loss(ip_adapter, noise_scheduler, latents, text, image, noise[s].to(device),
                                      timesteps[s].to(device))
                total += loss.item() * k
            totals[condition] = total / n
    finally:
        for p, scale in zip(processors, scales):
            p.scale = scale
    return totals


# ----------------------------------------------------------------------------- bookkeeping
def fingerprint(module: nn.Module, frozen_only: bool = False, names: set[str] | None = None) -> dict[str, str]:
    """A hash of each parameter's bytes: 'unchanged' will mean bitwise unchanged.

    `frozen_only`: skip parameters that require grad (the UNet now *contains* the trainable
    to_k_ip / to_v_ip, inside its attention layers' processors). `names`: hash only these."""
    out = {}
    for name, p in module.named_parameters():
        if (frozen_only and p.requires_grad) or (names is not None and name not in names):
            continue
        t = p.detach().cpu().contiguous()
        out[name] = hashlib.sha1(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()
    return out


def frozen_sample(module: nn.Module, k: int) -> set[str] | None:
    """The names of `k` frozen parameters spread evenly over the model (all of them if k <= 0).

    Hashing every frozen tensor twice costs seconds per GB (about 5 GB at SD 1.5 size); a fixed,
    spread sample catches a backbone that trains by mistake, whose every layer would move."""
    names = [n for n, p in module.named_parameters() if not p.requires_grad]
    if k <= 0 or k >= len(names):
        return None
    return {names[round(i * (len(names) - 1) / (k - 1))] for i in range(k)} if k > 1 else {names[0]}


def _trainable_fingerprint(ip_adapter: IPAdapter) -> dict:
    return {**{f"image_proj.{k}": v for k, v in fingerprint(ip_adapter.image_proj_model).items()},
            **{f"ip_adapter.{k}": v for k, v in fingerprint(ip_adapter.adapter_modules).items()}}


def _write_log(path: Path, rows: list[tuple[int, float]]) -> None:
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "loss"])
            w.writerows((s, repr(float(l))) for s, l in rows)  # repr: the exact float

    write_atomically(path, write)


def read_log(output: str | os.PathLike) -> list[tuple[int, float]]:
    """The (step, loss) rows of a run's loss.csv."""
    with open(Path(output) / "loss.csv") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


# ----------------------------------------------------------------------------- the trainer
@dataclass
class TrainResult:
    output: Path
    losses: list = field(default_factory=list)
    report: dict = field(default_factory=dict)
    cache_seconds: float = 0.0
    train_seconds: float = 0.0
    steps: int = 0  # where the run stands (the last step done + 1)
    first_step: int = 0  # where this call started (above 0 after --resume)


class Trainer:
    """Set up once (models, adapter, optimizer, inputs), then `run()`; notebooks use the parts.

    `log`: a print-like function for what a command-line user wants to see (the cache's size
    and progress, warnings); None (the default, for notebooks) keeps setup silent."""

    def __init__(self, cfg: TrainConfig, backbone: Backbone | None = None, accelerator=None, log=None):
        from accelerate import Accelerator

        preflight(cfg, check_model=backbone is None)  # every cheap check, before anything loads
        self.cfg, self.log = cfg, log
        mp = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.precision]
        want = get_device(cfg.device)
        if want.type == "cpu" and cfg.precision == "fp16":
            raise ValueError("fp16 autocast needs a GPU; on the CPU use fp32 or bf16")
        self.accelerator = accelerator or Accelerator(mixed_precision=mp, cpu=want.type == "cpu")
        self.device = self.accelerator.device
        self.output = Path(cfg.output)
        self._prepare_output()
        self._resume = self._saved_state() if cfg.resume else None
        seed_everything(cfg.seed)
        # The records first: a broken train.json fails before any model loads.
        self.dataset = IPAdapterDataset(cfg.data, "train")
        world = self.accelerator.num_processes
        if cfg.batch_size * world > len(self.dataset):
            warnings.warn(f"the global batch ({cfg.batch_size} x {world} processes) is larger than the data set "
                          f"({len(self.dataset)} items): every batch repeats items", stacklevel=2)
        self.bb = backbone or load_backbone(cfg.model, self.device, image_encoder=cfg.image_encoder)
        bb = self.bb
        kind = bb.noise_scheduler.config.prediction_type
        if kind not in PREDICTION_TYPES:
            raise ValueError(f"the scheduler's prediction_type is {kind!r}; IP-Adapter training supports "
                             f"{' and '.join(PREDICTION_TYPES)}")
        self.resolution = cfg.resolution or bb.vae.config.sample_size
        self.dataset.image_processor, self.dataset.resolution = bb.feature_extractor, self.resolution
        if cfg.channels_last:
            bb.unet.to(memory_format=torch.channels_last)
        image_proj, adapter_modules, self.optimizer = prepare_training(
            bb.unet, bb.vae, bb.text_encoder, bb.image_encoder, lr=cfg.lr, weight_decay=cfg.weight_decay,
            num_tokens=cfg.num_tokens, variant=cfg.variant, fused=cfg.fused_adamw and self.device.type == "cuda")
        self.ip_adapter = IPAdapter(bb.unet, image_proj, adapter_modules)
        self.model, self.optimizer = self.accelerator.prepare(self.ip_adapter, self.optimizer)
        if cfg.compile:
            bb.unet.compile()
        t0 = time.perf_counter()
        if cfg.fast:
            root = cfg.cache_dir or self.output / "encoder_cache"
            self.inputs = encoder_cache.open_or_build(bb, self.dataset, cfg.variant, root, self.device,
                                                      self.accelerator, log, num_workers=cfg.num_workers)
        else:
            self.inputs = ReferenceInputs(bb, self.dataset, cfg.variant)
        self.cache_seconds = time.perf_counter() - t0
        # The command line logs a fixed validation loss at each checkpoint, when the data has a val.json.
        self.validation = None
        if log and (Path(cfg.data) / "val.json").is_file() and self.accelerator.is_main_process:
            self.validation = validation_inputs(bb, cfg.data, cfg.variant, cfg.cache_dir or self.output / "encoder_cache",
                                                self.device, self.resolution, log)
        if cfg.fast and self.device.type == "cuda":
            # The cache replaces the frozen encoders during training: give their GPU memory back.
            for m in (bb.vae, bb.text_encoder, bb.image_encoder):
                m.to("cpu")
            torch.cuda.empty_cache()
        s = self.resolution // 2 ** (len(bb.vae.config.block_out_channels) - 1)
        self.latent_shape = (bb.unet.config.in_channels, s, s)
        self.step = 0
        self.losses: list[tuple[int, float]] = []

    def _prepare_output(self) -> None:
        """Remove what a killed run left half-written (temp files), and with `overwrite` the
        previous run's files, so the folder never mixes two runs."""
        if not self.accelerator.is_main_process or not self.output.is_dir():
            return
        for name in RUN_FILES:
            for tmp in glob.glob(glob.escape(str(self.output)) + f"/.{name}.*.tmp"):
                os.unlink(tmp)
            if self.cfg.overwrite and not self.cfg.resume and (self.output / name).exists():
                (self.output / name).unlink()

    def draw(self, step: int) -> Draw:
        return draw_step(step, self.cfg, len(self.dataset), self.latent_shape,
                         self.bb.noise_scheduler.config.num_train_timesteps,
                         self.accelerator.process_index, self.accelerator.num_processes)

    def loss(self, step: int, batch: dict | None = None) -> torch.Tensor:
        """The loss of one step, with that step's draws (no optimizer update)."""
        d = self.draw(step)
        latents, text, image = self.inputs(d, self.device, batch) if batch else self.inputs(d, self.device)
        with self.accelerator.autocast():
            return diffusion_loss(self.model, self.bb.noise_scheduler, latents, text, image, d.noise.to(self.device),
                                  d.timesteps.to(self.device))

    def train_step(self, step: int, batch: dict | None = None) -> float:
        loss = self.loss(step, batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        self.optimizer.step()
        self.step = step + 1
        # The mean over processes: the loss of the global batch, the same as one process logs.
        self.losses.append((step, self.accelerator.reduce(loss.detach(), reduction="mean").item()))
        return self.losses[-1][1]

    def log_validation(self, conditions=("image", "other image")) -> dict[str, float]:
        """Log the fixed validation loss (`validation_loss`) of the adapter as it stands.

        Two conditions by default, about 2 s on the toy: the gap between the right image and a
        wrong one is what the adapter has learned to read."""
        n = min(256, len(self.validation.image_ids)) if self.validation is not None else 0
        if n < 2:
            return {}
        with self.accelerator.autocast():
            losses = validation_loss(self.ip_adapter, self.bb.noise_scheduler, self.validation, n, conditions=conditions)
        self.log(f"step {self.step}: validation loss ({n} images, fixed noise, empty text) "
                 + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
        return losses

    # --- checkpoints
    def save(self) -> None:
        """Write the checkpoint (original format) and the loss log, then the resume state.

        Each file is written atomically, and the resume state comes last: it is the commit
        point. It holds the whole loss history, so a run killed between two files resumes from
        the last complete state and rewrites the others; nothing is lost or mixed."""
        if not self.accelerator.is_main_process:
            return
        assert len(self.losses) == self.step, "one loss per finished step: the log and the weights agree"
        self.output.mkdir(parents=True, exist_ok=True)
        save_ip_adapter(self.output / "ip_adapter.safetensors", self.ip_adapter.image_proj_model,
                        self.ip_adapter.adapter_modules)
        _write_log(self.output / "loss.csv", self.losses)
        scaler = self.accelerator.scaler  # fp16 only: its loss scale is part of the exact state
        save_state(self.output / "training_state.pt", {
            "step": self.step, "config": json.dumps(asdict(self.cfg)), "world": self.accelerator.num_processes,
            "optimizer": self.optimizer.state_dict(), "image_proj": self.ip_adapter.image_proj_model.state_dict(),
            "ip_adapter": self.ip_adapter.adapter_modules.state_dict(),
            "losses": torch.tensor([loss for _, loss in self.losses], dtype=torch.float64),
            **({"scaler": scaler.state_dict()} if scaler is not None else {})})

    def _saved_state(self) -> dict | None:
        """With `resume`: the run's saved state, checked against this run's settings, or None when
        the run was killed before its first checkpoint was complete (it then starts at step 0).

        Runs before any model loads: a resume with changed settings fails in seconds, not after
        the models have loaded and the encoder cache has been built."""
        path = self.output / "training_state.pt"
        if not path.is_file():
            log = self.output / "loss.csv"
            rows = len(log.read_text().splitlines()) - 1 if log.is_file() else 0
            if any((self.output / name).exists() for name in RUN_FILES) and rows <= self.cfg.checkpoint_every:
                if self.log:  # nothing of value can be lost: no checkpoint was ever complete
                    self.log(f"--resume: {self.output} holds no complete checkpoint yet; starting at step 0")
                return None
            if rows > self.cfg.checkpoint_every:
                raise FileNotFoundError(f"--resume: {self.output} holds a run of {rows} steps but no training_state.pt "
                                        "to continue it from; pass --overwrite to train it again from step 0")
            raise FileNotFoundError(f"--resume: no checkpoint to resume from at {path}")
        state = load_state(path)
        missing = {"step", "config", "optimizer", "image_proj", "ip_adapter", "losses"} - set(state)
        if missing:
            raise ValueError(f"--resume: {path} lacks {sorted(missing)}; it is not a checkpoint of this "
                             "version of ipa_lab.train")
        saved = json.loads(state["config"])
        now = asdict(self.cfg)
        saved["global_batch"] = saved["batch_size"] * state.get("world", 1)
        now["global_batch"] = self.cfg.batch_size * self.accelerator.num_processes
        differ = [f"{k}: saved {saved.get(k)!r}, now {now[k]!r}" for k in (*RESULT_KEYS, "global_batch")
                  if saved.get(k) != now[k]]
        if differ:
            raise ValueError(f"--resume: this run's settings differ from those {path} was trained with, which "
                             "would change the result:\n  " + "\n  ".join(differ) +
                             "\nUse the saved settings, or start a new run with another --output.")
        return state

    def restore(self, state: dict) -> None:
        """Continue from a saved state (weights, optimizer moments, loss scale, step, loss log)."""
        self.ip_adapter.image_proj_model.load_state_dict(state["image_proj"])
        self.ip_adapter.adapter_modules.load_state_dict(state["ip_adapter"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.accelerator.scaler is not None and "scaler" in state:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        self.losses = list(enumerate(state["losses"].tolist()))

    def run(self, steps: int | None = None, progress: bool = True) -> TrainResult:
        """Train up to `steps` (default cfg.steps); checkpoint every cfg.checkpoint_every steps."""
        cfg = self.cfg
        steps = cfg.steps if steps is None else steps
        if self._resume is not None:  # once: a second run() continues in memory
            self.restore(self._resume)
            self._resume = None
        start = self.step
        sample = {k: frozen_sample(m, cfg.verify_frozen) for k, m in self.bb.frozen().items()}
        before_frozen = {k: fingerprint(m, True, sample[k]) for k, m in self.bb.frozen().items()}
        before_trainable = _trainable_fingerprint(self.ip_adapter)
        self.model.train()
        batches = None
        if not cfg.fast:  # the reference path: images read ahead by the DataLoader's workers
            world = (self.accelerator.process_index, self.accelerator.num_processes)
            batches = iter(self.inputs.loader(range(self.step, steps),
                                              lambda s: batch_indices(s, cfg, len(self.dataset), *world), cfg.num_workers))
        step_fn = (lambda s: self.train_step(s)) if batches is None else (lambda s: self.train_step(s, next(batches)))
        t0 = time.perf_counter()
        def checkpoint(_):
            self.save()
            self.log_validation()

        run_steps(self.step, steps, step_fn, checkpoint, cfg.checkpoint_every, "train",
                  progress and self.accelerator.is_main_process)
        train_seconds = time.perf_counter() - t0
        report = {}
        if self.step > start:  # the proof is about the steps this call ran
            after = {k: fingerprint(m, True, sample[k]) for k, m in self.bb.frozen().items()}
            changed = [f"{k}.{n}" for k, fp in after.items() for n, h in fp.items() if before_frozen[k][n] != h]
            moved = _trainable_fingerprint(self.ip_adapter)
            report = {"frozen_tensors": sum(len(fp) for fp in after.values()), "frozen_changed": changed,
                      "frozen_total": sum(1 for m in self.bb.frozen().values() for p in m.parameters()
                                          if not p.requires_grad),
                      "trainable_tensors": len(moved),
                      "trainable_unmoved": [n for n, h in moved.items() if before_trainable[n] == h]}
        return TrainResult(self.output, list(self.losses), report, self.cache_seconds, train_seconds, self.step, start)


def train(cfg: TrainConfig, backbone: Backbone | None = None, progress: bool = True, log=None) -> TrainResult:
    """Build a `Trainer` and run it; the function the notebook and the command line call."""
    return Trainer(cfg, backbone, log=log).run(progress=progress)
