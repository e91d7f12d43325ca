"""How the toy Stable Diffusion in data/ was made (not part of the lessons).

    python -m ipa_lab.pretrain --data data/shapes --output data/toy-sd --clip-output data/toy-clip

Three stages, each a real model trained the way its full-size original was, in miniature:
1. ``vae``  : an `AutoencoderKL` from 32x32 pixels to 8x8x4 latents (reconstruction + a tiny KL).
2. ``clip`` : a `CLIPModel` (text and vision towers) trained contrastively on the captions.
   Its text tower becomes the pipeline's text encoder (as SD 1.5 uses CLIP ViT-L's), its vision
   tower with projection the IP-Adapter image encoder (as IP-Adapter uses OpenCLIP ViT-H's),
   and the whole model is kept in ``--clip-output`` to score images (CLIP-I, CLIP-T).
3. ``unet`` : a `UNet2DConditionModel` trained on the frozen VAE latents and text states, with
   10% empty captions so that classifier-free guidance works, plus an EMA of its weights.
The frozen encoders' outputs are computed once and cached: they never change.

Every stage is seeded, shows a progress bar, saves its state atomically every
``--checkpoint-every`` steps in ``--work-dir``, and ``--resume`` continues where it stopped.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import data as shapes
from .configs import _settings, load_config
from .loop import load_state, run_steps, save_state
from .runtime import get_device, quiet, seed_everything
from .tokenizer import build_tokenizer, caption_words

CONFIG_DIR = Path(__file__).parent / "configs"


def toy_configs(vocab_size: int) -> dict:
    """The toy model's configs: every class is the one the real SD 1.5 + IP-Adapter uses."""
    unet = json.loads((CONFIG_DIR / "toy_unet.json").read_text())
    unet.pop("_comment", None)
    text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                num_attention_heads=4, max_position_embeddings=16, projection_dim=32,
                bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    vision = dict(image_size=shapes.RESOLUTION, patch_size=4, hidden_size=64, intermediate_size=256,
                  num_hidden_layers=3, num_attention_heads=4, projection_dim=32)
    vae = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
               up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[32, 64, 64],
               layers_per_block=1, latent_channels=4, norm_num_groups=16, sample_size=shapes.RESOLUTION)
    return {"unet": unet, "text": text, "vision": vision, "vae": vae}


def image_processor():
    """CLIP's own preprocessing (resize, centre crop, CLIP's mean and std) at the toy size.

    The PIL flavour of `CLIPImageProcessor`: the same numbers, without needing torchvision.
    """
    from transformers import CLIPImageProcessorPil

    r = shapes.RESOLUTION
    return CLIPImageProcessorPil(size={"shortest_edge": r}, crop_size={"height": r, "width": r})


# ----------------------------------------------------------------------------- the loop
def _loop(stage: str, model, opt, steps: int, step_fn, args, ema=None, lr_fn=None) -> None:
    """One stage: resume from its checkpoint, then `loop.run_steps` with this script's extras
    (a learning-rate schedule, an EMA copy of the weights, the global RNG state it draws from)."""
    ckpt = Path(args.work_dir) / f"{stage}.pt"
    start = 0
    if args.resume and ckpt.exists():
        state = load_state(ckpt)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["rng"])
        start = state["step"]

    def one_step(step: int) -> float:
        if lr_fn is not None:
            for g in opt.param_groups:
                g["lr"] = lr_fn(step)
        loss = step_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm, 1 - args.ema_decay)
        return loss.item()

    def save(done: int) -> None:
        save_state(ckpt, {"model": model.state_dict(), "opt": opt.state_dict(), "step": done,
                          "rng": torch.get_rng_state(), **({"ema": ema.state_dict()} if ema else {})})

    run_steps(start, steps, one_step, save, args.checkpoint_every, desc=stage)


def _cosine(base: float, steps: int, warmup: int = 100):
    return lambda s: base * min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))


# ----------------------------------------------------------------------------- stages
def train_vae(pixels: torch.Tensor, cfg: dict, args):
    from diffusers import AutoencoderKL

    seed_everything(args.seed)
    vae = AutoencoderKL(**cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr_vae, weight_decay=0.0)

    def step(_):
        x = pixels[torch.randint(len(pixels), (args.batch_size,))]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        return F.mse_loss(rec, x) + 1e-6 * post.kl().mean()  # SD's KL weight is tiny too

    _loop("vae", vae, opt, args.steps_vae, step, args, lr_fn=_cosine(args.lr_vae, args.steps_vae))
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        lat = torch.cat([vae.encode(pixels[i : i + 256]).latent_dist.mean for i in range(0, len(pixels), 256)])
    # Like SD's 0.18215: scale latents to unit variance so the noise schedule fits them.
    vae.register_to_config(scaling_factor=round(1.0 / lat.std().item(), 5))
    return vae


def train_clip(clip_pixels: torch.Tensor, input_ids: torch.Tensor, caption_index: torch.Tensor, cfg: dict, args):
    from transformers import CLIPConfig, CLIPModel

    seed_everything(args.seed + 1)
    model = CLIPModel(CLIPConfig(text_config=cfg["text"], vision_config=cfg["vision"], projection_dim=32))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr_clip, weight_decay=0.01)

    def step(_):
        idx = torch.randint(len(clip_pixels), (args.batch_size,))
        out = model(input_ids=input_ids[idx], pixel_values=clip_pixels[idx])
        # Many images share a caption: every pair with the same caption is a positive.
        same = (caption_index[idx][:, None] == caption_index[idx][None, :]).float()
        target = same / same.sum(1, keepdim=True)
        logits = out.logits_per_image
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))

    _loop("clip", model, opt, args.steps_clip, step, args, lr_fn=_cosine(args.lr_clip, args.steps_clip))
    return model.eval().requires_grad_(False)


def train_unet(latent_mean, latent_std, caption_index, text_states, empty_state, cfg, args):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    seed_everything(args.seed + 2)
    unet = UNet2DConditionModel(**cfg)
    ema = copy.deepcopy(unet).requires_grad_(False)
    sched = DDPMScheduler.from_config(scheduler_config())
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr_unet, weight_decay=0.01)

    def step(_):
        idx = torch.randint(len(latent_mean), (args.batch_size,))
        z = latent_mean[idx] + latent_std[idx] * torch.randn_like(latent_mean[idx])
        cond = text_states[caption_index[idx]]
        drop = torch.rand(len(idx)) < 0.1  # empty captions teach the unconditional model for CFG
        cond = torch.where(drop[:, None, None], empty_state.expand_as(cond), cond)
        noise = torch.randn_like(z)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(idx),))
        pred = unet(sched.add_noise(z, noise, t), t, cond).sample
        return F.mse_loss(pred, noise)

    _loop("unet", unet, opt, args.steps_unet, step, args, ema=ema, lr_fn=_cosine(args.lr_unet, args.steps_unet))
    return ema.eval()


def scheduler_config() -> dict:
    """SD 1.5's noise schedule (scaled-linear betas over 1000 steps), from configs/sd15_scheduler.json."""
    return _settings(load_config("sd15_scheduler"))


# ----------------------------------------------------------------------------- assembly
def split_clip(clip):
    """CLIP's text tower -> the pipeline's text encoder; vision tower + projection -> image encoder."""
    from transformers import CLIPTextModel, CLIPVisionModelWithProjection

    text_encoder = CLIPTextModel(clip.config.text_config)
    text_encoder.load_state_dict(clip.text_model.state_dict())
    image_encoder = CLIPVisionModelWithProjection(clip.config.vision_config)
    image_encoder.vision_model.load_state_dict(clip.vision_model.state_dict())
    image_encoder.visual_projection.load_state_dict(clip.visual_projection.state_dict())
    return text_encoder.eval(), image_encoder.eval()


def assemble_pipeline(vae, text_encoder, image_encoder, unet, tokenizer, feature_extractor):
    """A standard `StableDiffusionPipeline` with the IP-Adapter image encoder as a component."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler.from_config(scheduler_config()), safety_checker=None,
                                   feature_extractor=feature_extractor, image_encoder=image_encoder,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_toy_pipeline(seed: int = 0):
    """The toy architecture with untrained (seeded random) weights: for tests, in a blink."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPModel

    quiet()
    tok = build_tokenizer(caption_words())
    cfg = toy_configs(len(tok))
    torch.manual_seed(seed)
    clip = CLIPModel(CLIPConfig(text_config=cfg["text"], vision_config=cfg["vision"], projection_dim=32))
    text_encoder, image_encoder = split_clip(clip)
    return assemble_pipeline(AutoencoderKL(**cfg["vae"]).eval(), text_encoder, image_encoder,
                             UNet2DConditionModel(**cfg["unet"]).eval(), tok, image_processor())


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m ipa_lab.pretrain", description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/shapes")
    p.add_argument("--output", default="data/toy-sd")
    p.add_argument("--clip-output", default="data/toy-clip")
    p.add_argument("--work-dir", default="runs/pretrain", help="stage checkpoints, for --resume")
    p.add_argument("--make-data", action="store_true", help="(re)generate the shapes data set first")
    p.add_argument("--steps-vae", type=int, default=1500)
    p.add_argument("--steps-clip", type=int, default=800)
    p.add_argument("--steps-unet", type=int, default=4000)
    p.add_argument("--lr-vae", type=float, default=1e-3)
    p.add_argument("--lr-clip", type=float, default=1e-3)
    p.add_argument("--lr-unet", type=float, default=1e-3)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--stages", default="vae,clip,unet")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    quiet()  # before the imports below, which otherwise warn about torchvision
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPModel

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if get_device(args.device).type != "cpu":
        raise SystemExit("pretrain runs on the CPU only, so that data/ is reproducible bit for bit")
    t0 = time.time()
    if args.make_data:
        shapes.make_shapes_dataset(args.data)
    tok = build_tokenizer(caption_words())
    cfg = toy_configs(len(tok))
    proc = image_processor()
    ds = shapes.IPAdapterDataset(args.data, "train", image_processor=proc)
    items = [ds[i] for i in range(len(ds))]
    pixels = torch.stack([it["pixel_values"] for it in items])
    clip_pixels = torch.stack([it["clip_pixel_values"] for it in items])
    captions = sorted({it["text"] for it in items})
    row = {c: i for i, c in enumerate(captions)}
    caption_index = torch.tensor([row[it["text"]] for it in items])
    ids = tok(captions, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    stages = args.stages.split(",")
    out, clip_out = Path(args.output), Path(args.clip_output)

    vae = train_vae(pixels, cfg["vae"], args) if "vae" in stages else AutoencoderKL.from_pretrained(out / "vae")
    if "clip" in stages:
        clip = train_clip(clip_pixels, ids[caption_index], caption_index, cfg, args)
        clip.save_pretrained(clip_out)
        tok.save_pretrained(clip_out)
        proc.save_pretrained(clip_out)
    else:
        clip = CLIPModel.from_pretrained(clip_out)
    text_encoder, image_encoder = split_clip(clip)

    if "unet" in stages:
        with torch.no_grad():
            post = [vae.encode(pixels[i : i + 256]).latent_dist for i in range(0, len(pixels), 256)]
            sf = vae.config.scaling_factor
            mean, std = torch.cat([p.mean for p in post]) * sf, torch.cat([p.std for p in post]) * sf
            states = text_encoder(ids).last_hidden_state
            empty = text_encoder(tok([""], padding="max_length", max_length=tok.model_max_length,
                                     return_tensors="pt").input_ids).last_hidden_state
        unet = train_unet(mean, std, caption_index, states, empty, cfg["unet"], args)
    else:
        unet = UNet2DConditionModel.from_pretrained(out / "unet")

    assemble_pipeline(vae, text_encoder, image_encoder, unet, tok, proc).save_pretrained(out)
    print(f"saved the toy pipeline to {out} and the scoring CLIP to {clip_out} "
          f"after {time.time() - t0:.0f} s on {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
