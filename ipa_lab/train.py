"""Train an IP-Adapter on a frozen Stable Diffusion: the original recipe, and a fast path.

    python -m ipa_lab.train --model data/toy-sd --data data/shapes --output runs/ip-adapter

What trains (the original's tutorial_train.py, read line by line in notebooks 3 and 4):
- frozen: UNet, VAE, text encoder, image encoder;
- trained: the image projection (`ImageProjModel`, or the `Resampler` for Plus) and the
  `to_k_ip` / `to_v_ip` of every cross-attention layer, with AdamW over those alone;
- each sample: image dropped (zero embedding), text dropped (empty caption) or both, with small
  probabilities, so that classifier-free guidance works for either prompt at inference;
- latents from the VAE, DDPM noise at a uniform timestep, MSE between predicted and true noise.

The *reference* path runs the frozen encoders on every step, as the original does. The *fast*
path (`fast=True`) runs them once over the data set and caches their outputs, which never
change: the VAE's latent mean and std (a new latent is still sampled every step, so the recipe
is unchanged), the text states of each caption, and the image embeddings. Every random draw of
a step comes from (seed, step), so both paths see the same batch, and a stopped run resumed
from its checkpoint ends bitwise equal to one that never stopped.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .adapter import freeze, install_ip_adapter
from .checkpoint import save_ip_adapter, write_atomically
from .data import IPAdapterDataset
from .pipeline import resolve_model
from .configs import build_image_projection
from .runtime import get_device, quiet, seed_everything

# The original recipe's values (tutorial_train.py and the paper).
ORIGINAL = dict(lr=1e-4, weight_decay=0.01, drop_image=0.05, drop_text=0.05, drop_both=0.05)


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
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = ORIGINAL["weight_decay"]
    drop_image: float = ORIGINAL["drop_image"]
    drop_text: float = 0.5
    drop_both: float = ORIGINAL["drop_both"]
    device: str = "auto"
    precision: str = "fp32"  # "fp32", "bf16" or "fp16" (autocast, on CUDA)
    seed: int = 0
    checkpoint_every: int = 100
    resume: bool = False
    fast: bool = True  # cache the frozen encoders' outputs
    compile: bool = False  # torch.compile the UNet (helps on GPU)
    channels_last: bool = False
    fused_adamw: bool = False  # one fused kernel for the optimizer step (CUDA)
    resolution: int | None = None  # pixels; default: the VAE's sample_size

    def __post_init__(self):
        if self.variant not in ("base", "plus"):
            raise ValueError(f"variant must be 'base' or 'plus', got {self.variant!r}")
        if self.num_tokens is None:
            self.num_tokens = 4 if self.variant == "base" else 16
        if self.steps < 0 or self.batch_size < 1 or self.num_tokens < 1 or self.checkpoint_every < 1:
            raise ValueError("steps must be >= 0, and batch_size, num_tokens and checkpoint_every >= 1; "
                             f"got steps={self.steps}, batch_size={self.batch_size}, num_tokens={self.num_tokens}, "
                             f"checkpoint_every={self.checkpoint_every}")
        for name in ("drop_image", "drop_text", "drop_both"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if self.drop_image + self.drop_text + self.drop_both > 1:
            raise ValueError("drop_image + drop_text + drop_both must not exceed 1")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")


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


def build_image_proj(variant: str, unet, image_encoder, num_tokens: int) -> nn.Module:
    """The image projection for a variant, sized from the UNet and image encoder configs."""
    return build_image_projection(dict(unet.config), image_encoder.config.to_dict(), variant, num_tokens)


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
    from diffusers import DDPMScheduler

    from .pipeline import load_pipeline

    pipe = load_pipeline(model, device=device, dtype=dtype, image_encoder=image_encoder)
    if pipe.image_encoder is None:
        raise FileNotFoundError(f"{model} has no image_encoder/; pass --image-encoder with a "
                                "CLIPVisionModelWithProjection folder (IP-Adapter's models/image_encoder)")
    bb = Backbone(pipe.vae, pipe.text_encoder, pipe.image_encoder, pipe.unet, pipe.tokenizer,
                  pipe.feature_extractor, DDPMScheduler.from_config(pipe.scheduler.config))
    freeze(*bb.frozen().values())
    return bb


# ----------------------------------------------------------------------------- the encoders
@torch.no_grad()
def encode_text(bb: Backbone, captions: list[str]) -> torch.Tensor:
    tok = bb.tokenizer
    ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    return bb.text_encoder(ids.to(bb.text_encoder.device))[0]


@torch.no_grad()
def encode_images(bb: Backbone, clip_pixels: torch.Tensor, variant: str) -> torch.Tensor:
    """Base: the projected CLIP embedding; Plus: the penultimate layer's hidden states."""
    out = bb.image_encoder(clip_pixels.to(bb.image_encoder.device, bb.image_encoder.dtype), output_hidden_states=variant == "plus")
    return out.image_embeds if variant == "base" else out.hidden_states[-2]


@torch.no_grad()
def unconditional_image(bb: Backbone, variant: str, like: torch.Tensor) -> torch.Tensor:
    """What a dropped image becomes: zero embeddings (base), or the encoder on a black image (Plus)."""
    if variant == "base":
        return torch.zeros_like(like[:1])
    size = bb.feature_extractor.crop_size
    zeros = torch.zeros(1, 3, size["height"], size["width"])
    return encode_images(bb, zeros, variant)


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


def draw(step: int, cfg: TrainConfig, n_items: int, latent_shape, num_train_timesteps: int, rank: int = 0, world: int = 1) -> Draw:
    """One step's draws. Epochs are permutations; each process takes its slice of the batch."""
    per_epoch = max(1, n_items // (cfg.batch_size * world))
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n_items, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
    start = (k * world + rank) * cfg.batch_size
    idx = perm[start : start + cfg.batch_size]
    if len(idx) < cfg.batch_size:  # a data set smaller than one batch: sample with replacement
        idx = perm[torch.arange(start, start + cfg.batch_size) % n_items]
    g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 131 + rank)
    b = len(idx)
    u = torch.rand(b, generator=g)
    # One draw decides the case, as in the original: image / text / both dropped, or neither.
    p_i, p_t, p_b = cfg.drop_image, cfg.drop_text, cfg.drop_both
    drop_img = (u < p_i) | ((u >= p_i + p_t) & (u < p_i + p_t + p_b))
    drop_txt = (u >= p_i) & (u < p_i + p_t + p_b)
    return Draw(idx, torch.randn(b, *latent_shape, generator=g), torch.randn(b, *latent_shape, generator=g),
                torch.randint(0, num_train_timesteps, (b,), generator=g), drop_img, drop_txt)


# ----------------------------------------------------------------------------- inputs of a step
class ReferenceInputs:
    """The original recipe: load the images and run the frozen encoders on every step."""

    def __init__(self, bb: Backbone, dataset: IPAdapterDataset, variant: str):
        self.bb, self.dataset, self.variant = bb, dataset, variant

    def __call__(self, d: Draw, device):
        items = [self.dataset[int(i)] for i in d.indices]
        pixels = torch.stack([it["pixel_values"] for it in items]).to(device)
        clip = torch.stack([it["clip_pixel_values"] for it in items])
        with torch.no_grad():
            post = self.bb.vae.encode(pixels.to(self.bb.vae.dtype)).latent_dist
            latents = (post.mean + post.std * d.latent_eps.to(device)) * self.bb.vae.config.scaling_factor
            captions = ["" if drop else it["text"] for it, drop in zip(items, d.drop_text.tolist())]
            text = encode_text(self.bb, captions)
            if self.variant == "plus":  # the original zeroes the pixels of a dropped image
                clip = torch.where(d.drop_image[:, None, None, None], torch.zeros_like(clip), clip)
                image = encode_images(self.bb, clip, "plus")
            else:
                image = encode_images(self.bb, clip, "base")
                image = torch.where(d.drop_image[:, None].to(device), torch.zeros_like(image), image)
        return latents.float(), text, image


class CachedInputs:
    """The fast path: the frozen encoders ran once over the data set; a step only indexes."""

    def __init__(self, bb: Backbone, dataset: IPAdapterDataset, variant: str, device, batch: int = 256):
        captions = sorted({r["text"] for r in dataset.records})
        self.caption_index = torch.tensor([captions.index(r["text"]) for r in dataset.records])
        self.text = encode_text(bb, captions)
        self.empty_text = encode_text(bb, [""])
        means, stds, images = [], [], []
        sf = bb.vae.config.scaling_factor
        for s in range(0, len(dataset), batch):
            items = [dataset[i] for i in range(s, min(len(dataset), s + batch))]
            pixels = torch.stack([it["pixel_values"] for it in items]).to(device, bb.vae.dtype)
            with torch.no_grad():
                post = bb.vae.encode(pixels).latent_dist
            means.append(post.mean.float() * sf)
            stds.append(post.std.float() * sf)
            images.append(encode_images(bb, torch.stack([it["clip_pixel_values"] for it in items]), variant))
        self.mean, self.std, self.image = torch.cat(means), torch.cat(stds), torch.cat(images)
        self.uncond_image = unconditional_image(bb, variant, self.image)

    def __call__(self, d: Draw, device):
        idx = d.indices.to(self.mean.device)
        latents = self.mean[idx] + self.std[idx] * d.latent_eps.to(device)
        text = torch.where(d.drop_text[:, None, None].to(device), self.empty_text, self.text[self.caption_index[idx]])
        image = self.image[idx]
        mask = d.drop_image.to(device).view(-1, *([1] * (image.ndim - 1)))
        image = torch.where(mask, self.uncond_image.expand_as(image), image)
        return latents, text, image


def diffusion_loss(ip_adapter: IPAdapter, noise_scheduler, latents, text, image, d: Draw, device) -> torch.Tensor:
    """Add DDPM noise at the drawn timesteps and score the UNet's noise prediction (MSE)."""
    noise, t = d.noise.to(device), d.timesteps.to(device)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    pred = ip_adapter(noisy, t, text, image)
    return F.mse_loss(pred.float(), noise.float())


# ----------------------------------------------------------------------------- bookkeeping
def fingerprint(module: nn.Module, frozen_only: bool = False) -> dict[str, str]:
    """A hash of every parameter's bytes: 'unchanged' will mean bitwise unchanged.

    `frozen_only`: skip parameters that require grad (the UNet now *contains* the trainable
    to_k_ip / to_v_ip, inside its attention layers' processors)."""
    out = {}
    for name, p in module.named_parameters():
        if frozen_only and p.requires_grad:
            continue
        t = p.detach().cpu().contiguous()
        out[name] = hashlib.sha1(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()
    return out


def verify(before_frozen: dict, before_trainable: dict, bb: Backbone, ip_adapter: IPAdapter) -> dict:
    """Compare fingerprints after training: frozen must be identical, trainable must have moved."""
    after_frozen = {k: fingerprint(m, frozen_only=True) for k, m in bb.frozen().items()}
    changed = [f"{k}.{n}" for k, fp in after_frozen.items() for n, h in fp.items() if before_frozen[k][n] != h]
    after = _trainable_fingerprint(ip_adapter)
    unmoved = [n for n, h in after.items() if before_trainable[n] == h]
    return {"frozen_tensors": sum(len(fp) for fp in after_frozen.values()), "frozen_changed": changed,
            "trainable_tensors": len(after), "trainable_unmoved": unmoved}


def _trainable_fingerprint(ip_adapter: IPAdapter) -> dict:
    return {**{f"image_proj.{k}": v for k, v in fingerprint(ip_adapter.image_proj_model).items()},
            **{f"ip_adapter.{k}": v for k, v in fingerprint(ip_adapter.adapter_modules).items()}}


def _write_log(path: Path, rows: list[tuple[int, float]]) -> None:
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "loss"])
            w.writerows((s, repr(float(l))) for s, l in rows)  # repr: the exact float back on resume

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
    steps: int = 0


class Trainer:
    """Set up once (models, adapter, optimizer, inputs), then `run()`; notebooks use the parts."""

    def __init__(self, cfg: TrainConfig, backbone: Backbone | None = None, accelerator=None):
        from accelerate import Accelerator

        data = Path(cfg.data)
        if not (data / "train.json").is_file():
            raise FileNotFoundError(f"no training data at {data}: expected {data / 'train.json'} (a JSON list of "
                                    "{'image_file', 'text'} entries) and its images")
        if backbone is None:
            resolve_model(cfg.model)  # fails at once, with a clear message, before any loading
        self.cfg = cfg
        mp = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.precision]
        want = get_device(cfg.device)
        if want.type == "cpu" and cfg.precision == "fp16":
            raise ValueError("fp16 autocast needs a GPU; on the CPU use fp32 or bf16")
        self.accelerator = accelerator or Accelerator(mixed_precision=mp, cpu=want.type == "cpu")
        self.device = self.accelerator.device
        seed_everything(cfg.seed)
        self.bb = backbone or load_backbone(cfg.model, self.device, image_encoder=cfg.image_encoder)
        bb = self.bb
        self.resolution = cfg.resolution or bb.vae.config.sample_size
        self.dataset = IPAdapterDataset(data, "train", image_processor=bb.feature_extractor, resolution=self.resolution)
        if cfg.channels_last:
            bb.unet.to(memory_format=torch.channels_last)
        image_proj = build_image_proj(cfg.variant, bb.unet, bb.image_encoder, cfg.num_tokens).to(self.device)
        adapter_modules = install_ip_adapter(bb.unet, num_tokens=cfg.num_tokens)
        self.ip_adapter = IPAdapter(bb.unet, image_proj, adapter_modules)
        # As the original: AdamW over the projection and adapter_modules. The self-attention
        # processors in adapter_modules have no parameters, so they add nothing.
        params = list(itertools.chain(image_proj.parameters(), adapter_modules.parameters()))
        fused = {"fused": True} if cfg.fused_adamw and self.device.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
        self.model, self.optimizer = self.accelerator.prepare(self.ip_adapter, self.optimizer)
        if cfg.compile:
            bb.unet.compile()
        t0 = time.perf_counter()
        self.inputs = (CachedInputs(bb, self.dataset, cfg.variant, self.device) if cfg.fast
                       else ReferenceInputs(bb, self.dataset, cfg.variant))
        self.cache_seconds = time.perf_counter() - t0
        if cfg.fast and self.device.type == "cuda":
            # The cache replaces the frozen encoders during training: give their GPU memory
            # back (they stay on the CPU for the final fingerprint check).
            for m in (bb.vae, bb.text_encoder, bb.image_encoder):
                m.to("cpu")
            torch.cuda.empty_cache()
        s = self.resolution // 2 ** (len(bb.vae.config.block_out_channels) - 1)
        self.latent_shape = (bb.unet.config.in_channels, s, s)
        self.output = Path(cfg.output)
        self.step = 0
        self.losses: list[tuple[int, float]] = []

    def draw(self, step: int) -> Draw:
        return draw(step, self.cfg, len(self.dataset), self.latent_shape, self.bb.noise_scheduler.config.num_train_timesteps,
                    self.accelerator.process_index, self.accelerator.num_processes)

    def loss(self, step: int) -> torch.Tensor:
        """The loss of one step, with that step's draws (no optimizer update)."""
        d = self.draw(step)
        latents, text, image = self.inputs(d, self.device)
        with self.accelerator.autocast():
            return diffusion_loss(self.model, self.bb.noise_scheduler, latents, text, image, d, self.device)

    def train_step(self, step: int) -> float:
        loss = self.loss(step)
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        self.optimizer.step()
        return loss.item()

    # --- checkpoints
    def save(self) -> None:
        """Atomically write the checkpoint (original format), the resume state and the loss log."""
        if not self.accelerator.is_main_process:
            return
        self.output.mkdir(parents=True, exist_ok=True)
        save_ip_adapter(self.output / "ip_adapter.safetensors", self.ip_adapter.image_proj_model, self.ip_adapter.adapter_modules)
        state = {"step": self.step, "config": json.dumps(asdict(self.cfg)), "optimizer": self.optimizer.state_dict(),
                 "image_proj": self.ip_adapter.image_proj_model.state_dict(),
                 "ip_adapter": self.ip_adapter.adapter_modules.state_dict()}
        write_atomically(self.output / "training_state.pt", lambda tmp: torch.save(state, tmp))
        _write_log(self.output / "loss.csv", self.losses)

    def restore(self) -> None:
        """Continue from `output/training_state.pt` (weights, optimizer moments, step, loss log)."""
        path = self.output / "training_state.pt"
        if not path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint to resume from at {path}")
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as e:  # truncated, corrupted, or carrying pickled code
            raise ValueError(f"--resume: cannot read {path} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                             "it is damaged or not a checkpoint of ipa_lab.train") from None
        missing = {"step", "config", "optimizer", "image_proj", "ip_adapter"} - set(state)
        if missing:
            raise ValueError(f"--resume: {path} lacks {sorted(missing)}; it is not a checkpoint of ipa_lab.train")
        saved = json.loads(state["config"])
        for k in ("variant", "num_tokens", "batch_size", "seed", "model"):
            if saved[k] != getattr(self.cfg, k):
                raise ValueError(f"--resume: the checkpoint was trained with {k}={saved[k]!r}, this run asks for "
                                 f"{getattr(self.cfg, k)!r}; use the same value or a new --output")
        self.ip_adapter.image_proj_model.load_state_dict(state["image_proj"])
        self.ip_adapter.adapter_modules.load_state_dict(state["ip_adapter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        self.losses = [r for r in read_log(self.output) if r[0] < self.step] if (self.output / "loss.csv").exists() else []

    def run(self, steps: int | None = None, progress: bool = True) -> TrainResult:
        """Train up to `steps` (default cfg.steps); checkpoint every cfg.checkpoint_every steps."""
        cfg = self.cfg
        steps = cfg.steps if steps is None else steps
        if cfg.resume and self.step == 0:
            self.restore()
        before_frozen = {k: fingerprint(m, frozen_only=True) for k, m in self.bb.frozen().items()}
        before_trainable = _trainable_fingerprint(self.ip_adapter)
        self.model.train()
        # Leave `disable` to tqdm unless asked, so TQDM_DISABLE=1 (set under CI) is honoured.
        quiet_bar = {"disable": True} if not progress or not self.accelerator.is_main_process else {}
        bar = tqdm(range(self.step, steps), initial=self.step, total=steps, desc="train", **quiet_bar)
        t0 = time.perf_counter()
        try:
            for step in bar:
                loss = self.train_step(step)
                self.step = step + 1
                self.losses.append((step, loss))
                bar.set_postfix(loss=f"{loss:.4f}")
                if self.step % cfg.checkpoint_every == 0:
                    self.save()
        except KeyboardInterrupt:
            self.save()
            print(f"interrupted: saved step {self.step}; continue with --resume", file=sys.stderr)
            raise
        train_seconds = time.perf_counter() - t0
        self.save()
        report = verify(before_frozen, before_trainable, self.bb, self.ip_adapter) if self.step > 0 else {}
        return TrainResult(self.output, list(self.losses), report, self.cache_seconds, train_seconds, self.step)


def train(cfg: TrainConfig, backbone: Backbone | None = None, progress: bool = True) -> TrainResult:
    """Build a `Trainer` and run it; the function the notebook and the command line call."""
    return Trainer(cfg, backbone).run(progress=progress)


# ----------------------------------------------------------------------------- command line
def parse_args(argv=None) -> TrainConfig:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m ipa_lab.train", description="Train an IP-Adapter on a frozen Stable Diffusion.")
    p.add_argument("--model", default=d.model, help="pipeline folder, or a hub id already in the local cache")
    p.add_argument("--image-encoder", default=None, help="CLIPVisionModelWithProjection folder, if the pipeline has none")
    p.add_argument("--data", default=d.data, help="folder with train.json ({'image_file', 'text'} list) and images")
    p.add_argument("--output", default=d.output)
    p.add_argument("--variant", choices=["base", "plus"], default=d.variant)
    p.add_argument("--num-tokens", type=int, default=None, help="image tokens (default 4, Plus 16)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--drop-image", type=float, default=d.drop_image)
    p.add_argument("--drop-text", type=float, default=d.drop_text)
    p.add_argument("--drop-both", type=float, default=d.drop_both)
    p.add_argument("--original-recipe", action="store_true",
                   help="lr 1e-4 and all drop rates 0.05, as the original (overrides those options)")
    p.add_argument("--device", default=d.device, help="auto (CUDA if present, else CPU), cpu, cuda, cuda:1 ...")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=d.precision)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--reference", action="store_true", help="run the frozen encoders every step (the original's way)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--fused-adamw", action="store_true")
    a = p.parse_args(argv)
    if a.steps < 0:
        p.error(f"--steps must be >= 0, got {a.steps}")
    if a.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {a.batch_size}")
    if a.original_recipe:
        a.lr, a.drop_image, a.drop_text, a.drop_both = (ORIGINAL[k] for k in ("lr", "drop_image", "drop_text", "drop_both"))
    names = {f.name for f in fields(TrainConfig)}
    kw = {k: v for k, v in vars(a).items() if k in names}
    try:
        return TrainConfig(**kw, fast=not a.reference)
    except ValueError as e:
        p.error(str(e))


def main(argv=None) -> None:
    quiet()
    cfg = parse_args(argv)
    try:
        result = train(cfg)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under `accelerate launch`, one report, not one per process
        return
    r = result.report
    print(f"trained {result.steps} steps in {result.train_seconds:.1f} s (encoder cache {result.cache_seconds:.1f} s); "
          f"final loss {result.losses[-1][1]:.4f}" if result.losses else "no steps to train")
    if r:
        print(f"frozen tensors unchanged: {r['frozen_tensors'] - len(r['frozen_changed'])}/{r['frozen_tensors']}; "
              f"trainable tensors moved: {r['trainable_tensors'] - len(r['trainable_unmoved'])}/{r['trainable_tensors']}")
    print(f"checkpoint: {result.output / 'ip_adapter.safetensors'}")


if __name__ == "__main__":
    main()
