"""Benchmark: the original training recipe against the fast path, in one run, on one machine.

    python -m ipa_lab.bench                       # the toy pipeline on this machine's device
    python -m ipa_lab.bench --size sd15           # SD 1.5-size models, random weights (GPU)
    python -m ipa_lab.bench --sweep               # steps/s against batch size and resolution
    python -m ipa_lab.bench --cache-scale         # encoder cache build: time and memory at 10k-1M captions

Rows are cumulative switches, so each row's gain is that switch's contribution:
reference (the original: every frozen encoder runs every step, fp32) -> + cached encoders ->
+ bf16 autocast (CUDA, or a CPU with bf16 instructions) -> + fused AdamW (CUDA) ->
+ channels_last -> + torch.compile. Each row runs in a fresh process so that its peak memory
is its own. Speed is the best of `--repeats` timed windows after the warm-up steps (the best
window is the one least disturbed by anything else on the machine); the last line printed is
one JSON object for scripts.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .runtime import get_device, quiet

# Cumulative switches: name, TrainConfig overrides, what the device needs for it.
SWITCHES = [
    ("reference (original recipe)", {"fast": False}, None),
    ("+ cached frozen encoders", {"fast": True}, None),
    ("+ bf16 autocast", {"precision": "bf16"}, "bf16"),
    ("+ fused AdamW", {"fused_adamw": True}, "cuda"),
    ("+ channels_last", {"channels_last": True}, None),
    ("+ torch.compile", {"compile": True}, None),
]


FAST_ON_CPU = "+ cached frozen encoders"


def supports(device: torch.device, need: str | None) -> bool:
    """Whether this machine can run a switch (bf16 on a CPU needs its bf16 instructions)."""
    if need is None:
        return True
    if need == "cuda":
        return device.type == "cuda"
    return device.type == "cuda" or torch.ops.mkldnn._is_mkldnn_bf16_supported()
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense, vendor figures


def sd15_backbone(device):
    """SD 1.5-size frozen models with random weights: the real UNet, VAE and text-encoder
    configs and a ViT-H/14 image encoder, so the cost per step is the real one."""
    from diffusers import AutoencoderKL, DDPMScheduler

    from .configs import _settings, build_image_encoder, build_unet, load_config
    from .tokenizer import build_tokenizer, caption_words
    from .trainer import Backbone
    from transformers import CLIPImageProcessorPil, CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = build_unet("sd15_unet", device="cpu")
    vae = AutoencoderKL(**_settings(load_config("sd15_vae")))
    text = CLIPTextModel(CLIPTextConfig(**_settings(load_config("clip_vit_l14_text"))))
    image = build_image_encoder("clip_vit_h14_vision", device="cpu")
    bb = Backbone(vae, text, image, unet, build_tokenizer(caption_words(), model_max_length=77),
                  CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}),
                  DDPMScheduler.from_config(_settings(load_config("sd15_scheduler"))))
    for m in bb.frozen().values():
        m.requires_grad_(False).eval().to(device)
    return bb


def run_one(args, overrides: dict) -> dict:
    """Train `warmup + steps` steps with one configuration; return speed and peak memory."""
    from .train import TrainConfig
    from .trainer import Trainer

    device = get_device(args.device)
    cfg = TrainConfig(model=args.model, data=args.data, output=tempfile.mkdtemp(prefix="ipa-bench-"),
                      steps=args.warmup + 1 + args.repeats * args.steps, batch_size=args.batch_size, device=str(device),
                      checkpoint_every=10**9, resolution=args.resolution, **overrides)
    backbone = sd15_backbone(device) if args.size == "sd15" else None
    trainer = Trainer(cfg, backbone=backbone)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.warmup):
        trainer.train_step(step)
    flops = None
    if args.count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            trainer.train_step(args.warmup)
        flops = fc.get_total_flops()
    windows = []
    step = args.warmup
    for _ in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for step in range(step + 1, step + 1 + args.steps):
            trainer.train_step(step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        windows.append(time.perf_counter() - t0)
    dt = min(windows)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"steps_per_s": args.steps / dt, "peak_memory_bytes": peak, "cache_seconds": trainer.cache_seconds,
            "flops_per_step": flops, "device": device.type, "resolution": trainer.resolution,
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}


def _child(args, overrides: dict) -> dict:
    """Run one configuration in a fresh Python process and read back its JSON."""
    cmd = [sys.executable, "-m", "ipa_lab.bench", "--_one", json.dumps(overrides)] + args.passthrough
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child failed for {overrides}:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _passthrough(args) -> list[str]:
    keep = ["model", "data", "size", "batch_size", "steps", "warmup", "repeats", "device", "resolution"]
    out = []
    for k in keep:
        v = getattr(args, k)
        if v is not None:
            out += [f"--{k.replace('_', '-')}", str(v)]
    return out + (["--count-flops"] if args.count_flops else [])


def compare(args) -> dict:
    """The table of cumulative switches, and the summary JSON (reference vs the last row)."""
    device = get_device(args.device)
    cuda = device.type == "cuda"
    rows, overrides = [], {}
    for name, switch, need in SWITCHES:
        if not supports(device, need) or (switch.get("compile") and args.no_compile):
            continue
        overrides = {**overrides, **switch}
        r = _child(args, overrides)
        rows.append((name, r))
        print(f"{name:<30} {r['steps_per_s']:8.2f} steps/s  {r['steps_per_s'] / rows[0][1]['steps_per_s']:5.2f}x  "
              f"peak {r['peak_memory_bytes'] / 2**20:9.0f} MiB", flush=True)
    ref = rows[0][1]
    # The fast path is fixed in advance, not picked after the fact: on the CPU only the cache
    # (bf16 and channels_last do not pay off there), on CUDA every switch.
    fast = rows[-1][1] if cuda else dict(rows)[FAST_ON_CPU]
    summary = {"reference_steps_per_s": round(ref["steps_per_s"], 3), "fast_steps_per_s": round(fast["steps_per_s"], 3),
               "speedup": round(fast["steps_per_s"] / ref["steps_per_s"], 2),
               "peak_memory_ratio": round(fast["peak_memory_bytes"] / ref["peak_memory_bytes"], 3),
               "batch_size": args.batch_size, "resolution": fast["resolution"], "device": fast["gpu"] or "cpu",
               "model": "sd15-size (random weights)" if args.size == "sd15" else "toy-sd",
               "fast_cache_seconds": round(fast["cache_seconds"], 1)}
    if fast["flops_per_step"] and cuda:
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in (fast["gpu"] or "")), None)
        if peak:
            summary["mfu"] = round(fast["flops_per_step"] * fast["steps_per_s"] / (peak * 1e12), 3)
    return summary


def sweep(args) -> None:
    """Fast-path steps/s against batch size, then against resolution (CPU toy)."""
    base = {"fast": True}
    print("batch size sweep (resolution default)")
    for bs in args.sweep_batch_sizes:
        a = argparse.Namespace(**{**vars(args), "batch_size": bs})
        a.passthrough = _passthrough(a)
        r = _child(a, base)
        print(f"  batch {bs:4d}: {r['steps_per_s']:7.2f} steps/s = {r['steps_per_s'] * bs:8.1f} samples/s", flush=True)
    print(f"resolution sweep (batch {args.batch_size})")
    for res in args.sweep_resolutions:
        a = argparse.Namespace(**{**vars(args), "resolution": res})
        a.passthrough = _passthrough(a)
        r = _child(a, base)
        print(f"  {res:4d} px: {r['steps_per_s']:7.2f} steps/s", flush=True)


def cache_one(n_captions: int, n_images: int, seed: int = 0) -> dict:
    """Build the encoder cache of a synthetic data set of `n_captions` records (distinct random
    captions of the toy vocabulary, `n_images` shape images reused in turn) with the toy
    encoders; return the build time, the size on disk and the peak memory (this process)."""
    import random

    from . import cache
    from .data import IPAdapterDataset, make_shapes_dataset
    from .pipeline import load_pipeline
    from .tokenizer import caption_words

    root = Path(tempfile.mkdtemp(prefix="ipa-cache-scale-"))
    make_shapes_dataset(root, n_train=n_images, n_val=1, seed=seed)
    rng, words = random.Random(seed), caption_words()
    records = [{"image_file": f"images/train_{i % n_images:05d}.png", "text": " ".join(rng.choices(words, k=10))}
               for i in range(n_captions)]
    (root / "train.json").write_text(json.dumps(records))
    del records
    pipe = load_pipeline()
    dataset = IPAdapterDataset(root, "train", image_processor=pipe.feature_extractor)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    folder = cache.build(pipe, dataset, "base", root / "cache")
    seconds = time.perf_counter() - t0
    manifest = json.loads((folder / "manifest.json").read_text())
    return {"records": n_captions, "captions": manifest["captions"], "images": manifest["images"],
            "bytes": manifest["bytes"], "seconds": seconds, "rss_before_build": rss_before,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "root": str(root)}


def cache_scale(args) -> None:
    """The encoder cache at growing sizes, each in a fresh process (its own peak memory)."""
    print(f"{'records':>10} {'captions':>10} {'on disk':>10} {'build':>8} {'per 1k':>7} {'RSS before':>11} {'peak RSS':>9}")
    for n in args.cache_scale_sizes:
        cmd = [sys.executable, "-m", "ipa_lab.bench", "--_cache", str(n), "--cache-images", str(args.cache_images)]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        if out.returncode != 0:
            raise RuntimeError(f"cache-scale child failed for {n} records:\n{out.stderr[-2000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        subprocess.run(["rm", "-rf", r.pop("root")])
        print(f"{r['records']:>10,} {r['captions']:>10,} {r['bytes'] / 2**20:>7,.0f} MiB {r['seconds']:>6.1f} s "
              f"{1000 * r['seconds'] / r['records']:>5.2f} s {r['rss_before_build'] / 2**20:>7,.0f} MiB "
              f"{r['peak_rss'] / 2**20:>5,.0f} MiB", flush=True)
        print(json.dumps(r), file=sys.stderr)


# ----------------------------------------------------------------------------- activation memory
def _storage_key(t: torch.Tensor):
    return t.device.type, t.untyped_storage()._cdata


def saved_tensor_bytes(fn, model: torch.nn.Module | None = None) -> int:
    """Run `fn()` and return the bytes of every tensor autograd saves for the backward pass.

    A `saved_tensors_hooks` pack hook sees each tensor an operation keeps; tensors that share a
    storage (views, one input saved by several layers) are counted once, by their storage. A layer
    also saves its weight (to pass the gradient on to its input), which is in memory anyway: the
    parameters of `model` are not counted. On the meta device nothing is allocated, so a model of
    any size is counted in a second."""
    weights = {_storage_key(p) for p in model.parameters()} if model is not None else set()
    storages: dict = {}

    def pack(t):
        key = _storage_key(t)
        if key not in weights:
            storages[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def activation_bytes(unet_config: str = "sd15_unet", batch: int = 8, resolution: int = 512, text_tokens: int = 77,
                     num_tokens: int = 4, dtype=torch.float32, device="meta", seed: int = 0) -> int:
    """The activation memory of one IP-Adapter training step: what the UNet's forward pass keeps
    for backward, counted by running it (`saved_tensor_bytes`) on the meta device (no memory).

    The gradient must reach every `to_k_ip` / `to_v_ip` and the image tokens, so every layer from
    the first cross-attention on keeps its inputs. The count grows linearly with `batch`, and with
    the latent pixels ((resolution / 8) ** 2) except for the self-attention probabilities, which
    grow with their square. Attention is counted as PyTorch's reference (math) attention keeps it,
    the probabilities included; fused kernels (flash / memory-efficient, the default on a GPU) keep
    only a log-sum-exp instead, so on a GPU this is an upper bound. `dtype`: the activations'
    storage (under bf16 autocast most are bf16, the norms stay fp32: between the fp32 and the bf16
    counts). `device="cpu"` runs it for real (the check against a measured step)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from .adapter import freeze, install_ip_adapter
    from .configs import build_unet

    quiet()  # (diffusers warns about any cast of a model built from a config)
    torch.manual_seed(seed)
    unet = build_unet(unet_config, device=device)
    freeze(unet)
    with torch.device(device):
        install_ip_adapter(unet, num_tokens=num_tokens)
    unet.to(dtype)
    g = torch.Generator(device="cpu").manual_seed(seed)
    side, dim = resolution // 8, unet.config.cross_attention_dim
    make = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
    latents, text = make(batch, unet.config.in_channels, side, side), make(batch, text_tokens, dim)
    image_tokens = make(batch, num_tokens, dim).requires_grad_(True)  # the projection's output trains too
    timesteps = torch.randint(0, 1000, (batch,), generator=g).to(device)
    with sdpa_kernel(SDPBackend.MATH):
        return saved_tensor_bytes(lambda: unet(latents, timesteps, torch.cat([text, image_tokens], 1)).sample, unet)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m ipa_lab.bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="data/toy-sd")
    p.add_argument("--data", default="data/shapes")
    p.add_argument("--size", choices=["toy", "sd15"], default="toy")
    p.add_argument("--batch-size", type=int, default=None, help="default: 64 (toy), 8 (sd15)")
    p.add_argument("--resolution", type=int, default=None, help="pixels; default: the model's own (toy 32, sd15 512)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per window")
    p.add_argument("--repeats", type=int, default=3, help="timed windows per configuration (the best counts)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--count-flops", action="store_true", help="count FLOPs of one step (for MFU)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--sweep-batch-sizes", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    p.add_argument("--sweep-resolutions", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--cache-scale", action="store_true", help="encoder cache build time and memory against size")
    p.add_argument("--cache-scale-sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--cache-images", type=int, default=1000, help="distinct images in the cache-scale data sets")
    p.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_cache", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.batch_size is None:
        a.batch_size = 8 if a.size == "sd15" else 64
    if a.size == "sd15" and a.resolution is None:
        a.resolution = 512
    if a.size == "sd15" and get_device(a.device).type == "cuda":
        a.count_flops = True
    a.passthrough = _passthrough(a)
    return a


def main(argv=None) -> None:
    quiet()
    args = parse_args(argv)
    if args._one is not None:
        print(json.dumps(run_one(args, json.loads(args._one))))
        return
    if args._cache is not None:
        print(json.dumps(cache_one(args._cache, args.cache_images)))
        return
    if args.cache_scale:
        cache_scale(args)
        return
    if args.sweep:
        sweep(args)
        return
    print(f"benchmark: batch {args.batch_size}; per row {args.warmup} warm-up steps, then the best of "
          f"{args.repeats} windows of {args.steps} steps")
    print(json.dumps(compare(args)))


if __name__ == "__main__":
    main()
