"""The evaluation protocol: what to generate, what to score, and the command line (notebook 5).

The course's miniature of the paper's Table 1: for validation images used as prompts, generate
under four conditions (no prompt / text only / image only / text + image) and score each sample
with `ipa_lab.metrics`:
- attribute agreement: does the sample show the colour, shape, position, size of the reference
  (the prompt image's, which are also its caption's in this data set)? (`classify`, `agreement`)
- CLIP-I: cosine similarity of the scoring CLIP's image embeddings, sample vs prompt image;
- CLIP-T: cosine similarity of the sample's embedding with the caption's text embedding
  (the paper scores with CLIP ViT-L/14; we use the toy CLIP in data/toy-clip).
`scale_sweep` scores the image prompt alone as lambda goes from 0 to 1. And the backbone's own
quality, so that the adapter's numbers can be read against it: text-to-image agreement, the
VAE's reconstruction PSNR, the scoring CLIP's caption retrieval. Tables print with
`ipa_lab.tables.format_table`.

    python -m ipa_lab.evaluate --checkpoint runs/base/ip_adapter.safetensors [--n 64] [--via diffusers]
    python -m ipa_lab.evaluate --backbone
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch

from .checkpoint import read_checkpoint
from .data import COLOURS, POSITIONS, SHAPES, SIZES, ShapeSpec, images_to_tensor, load_rgb, parse_caption, read_records
from .diffusers_path import generate_with_diffusers
from .generate import DEFAULT_GUIDANCE_SCALE, generate, load_adapter, plain_attention, sample_generators
from .metrics import agreement, classify, clip_image_embeds, clip_score, clip_text_embeds
from .pipeline import REPO_ROOT, TOY_CLIP, TOY_SD, load_pipeline, load_scoring_clip
from .runtime import setup
from .tables import format_table


# ---------------------------------------------------------------------------------------------
# The evaluation table
# ---------------------------------------------------------------------------------------------
CONDITIONS = ("no prompt", "text only", "image only", "text + image")


def _load_prompts(records, root, n):
    """The first n records: (prompt images, captions, reference attributes)."""
    records = list(records)[: n if n is not None else len(records)]
    if not records:
        raise ValueError("no records to evaluate on")
    root = Path(root)
    images = [load_rgb(root / r["image_file"]) for r in records]
    captions = [r["text"] for r in records]
    return images, captions, [parse_caption(c).as_dict() for c in captions]


def _sampler(pipe, image_proj_model, via: str, checkpoint, num_samples: int, steps: int, guidance_scale: float):
    """A function (images or None, prompts, seed, scale) -> PIL samples, through our code or diffusers'."""
    common = dict(num_samples=num_samples, num_inference_steps=steps, guidance_scale=guidance_scale)
    if via == "ours":
        if image_proj_model is None:
            raise ValueError("via='ours' needs the image projection returned by load_adapter(pipe, checkpoint)")
        return lambda images, prompts, seed, scale: generate(
            pipe, image_proj_model, images, prompts, scale=scale, seed=seed, **common)
    if via == "diffusers":
        if checkpoint is None:
            raise ValueError("via='diffusers' needs checkpoint=<path or dict> (loaded with pipe.load_ip_adapter)")
        return lambda images, prompts, seed, scale: generate_with_diffusers(
            pipe, checkpoint, images, prompts, scale=scale, seed=seed, **common)
    raise ValueError(f"via must be 'ours' or 'diffusers', got {via!r}")


def _batched(sample, images, prompts, seed: int, scale: float, num_samples: int, batch_size: int) -> list:
    """Run `sample` over chunks of about batch_size samples; sample k always gets seed + k."""
    per_call = max(1, batch_size // num_samples)
    out = []
    for start in range(0, len(prompts), per_call):
        stop = start + per_call
        chunk_images = None if images is None else images[start:stop]
        out += sample(chunk_images, prompts[start:stop], seed + start * num_samples, scale)
    return out


def _scores(samples, expected, num_samples, prompt_embeds=None, caption_embeds=None, clip=None) -> dict:
    """Agreement per attribute; with a scoring CLIP, CLIP-I (needs prompt_embeds) and CLIP-T
    (needs caption_embeds). Sample k of prompt i is scored against prompt i's references."""
    expected = [e for e in expected for _ in range(num_samples)]
    row = agreement([classify(s) for s in samples], expected)
    if clip is not None:
        model, _, processor = clip
        emb = clip_image_embeds(model, processor, samples)
        row["clip_i"] = clip_score(emb, prompt_embeds.repeat_interleave(num_samples, 0))
        if caption_embeds is not None:
            row["clip_t"] = clip_score(emb, caption_embeds.repeat_interleave(num_samples, 0))
    return row


def evaluate(pipe, image_proj_model, records, root, clip=None, n: int | None = 64, num_samples: int = 1,
             scale: float = 1.0, seed: int = 0, steps: int = 25, guidance_scale: float | None = None,
             batch_size: int = 64, via: str = "ours", checkpoint=None) -> list[dict]:
    """The miniature Table 1: one row per condition, scored against the prompt image.

    records: validation entries {"image_file", "text"} (the first n are used), root: their folder.
    clip: `load_scoring_clip()`'s (model, tokenizer, processor), or None to skip CLIP-I/CLIP-T.
    Conditions: "no prompt" (empty text, no image: the chance level), "text only" (caption),
    "image only" (empty text + the image), "text + image". Every condition uses the same noise
    (sample k of the table starts from seed + k), so rows differ only by the prompt.
    via="diffusers" generates through diffusers' `load_ip_adapter` (then pass `checkpoint`).
    Returns [{"condition", "colour", "shape", "position", "size", ("clip_i", "clip_t")}, ...].
    """
    guidance_scale = DEFAULT_GUIDANCE_SCALE if guidance_scale is None else guidance_scale
    images, captions, expected = _load_prompts(records, root, n)
    empty = [""] * len(captions)
    settings = {"no prompt": (None, empty), "text only": (None, captions),
                "image only": (images, empty), "text + image": (images, captions)}
    prompt_embeds = caption_embeds = None
    if clip is not None:
        prompt_embeds = clip_image_embeds(clip[0], clip[2], images)
        caption_embeds = clip_text_embeds(clip[0], clip[1], captions)
    if via == "diffusers" and checkpoint is not None:
        checkpoint = read_checkpoint(checkpoint)  # read the file once, not once per batch
    sample = _sampler(pipe, image_proj_model, via, checkpoint, num_samples, steps, guidance_scale)
    rows = []
    for condition in CONDITIONS:
        cond_images, prompts = settings[condition]
        samples = _batched(sample, cond_images, prompts, seed, scale, num_samples, batch_size)
        rows.append({"condition": condition,
                     **_scores(samples, expected, num_samples, prompt_embeds, caption_embeds, clip)})
    return rows


def scale_sweep(pipe, image_proj_model, records, root, scales=(0.0, 0.25, 0.5, 0.75, 1.0), clip=None,
                n: int | None = 64, num_samples: int = 1, seed: int = 0, steps: int = 25,
                guidance_scale: float | None = None, batch_size: int = 64, prompt="") -> list[dict]:
    """Image-prompt agreement as lambda (the image branch's scale) goes from 0 to 1.

    At 0 the adapter is off (the backbone from an empty prompt: chance level); the rise with the
    scale is what the image branch contributes. Same noise at every scale.
    Returns [{"scale", "colour", "shape", "position", "size", ("clip_i")}, ...].
    """
    guidance_scale = DEFAULT_GUIDANCE_SCALE if guidance_scale is None else guidance_scale
    images, captions, expected = _load_prompts(records, root, n)
    prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
    prompt_embeds = clip_image_embeds(clip[0], clip[2], images) if clip is not None else None
    sample = _sampler(pipe, image_proj_model, "ours", None, num_samples, steps, guidance_scale)
    rows = []
    for scale in scales:
        samples = _batched(sample, images, prompts, seed, scale, num_samples, batch_size)
        rows.append({"scale": float(scale), **_scores(samples, expected, num_samples, prompt_embeds, None, clip)})
    return rows


# ---------------------------------------------------------------------------------------------
# The backbone's own quality (what the adapter builds on)
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def text_to_image_scores(pipe, records, n: int | None = 64, num_samples: int = 1, seed: int = 0, steps: int = 25,
                         guidance_scale: float | None = None, batch_size: int = 64) -> dict:
    """How often the backbone alone (text, no adapter) draws the caption's attributes.

    Any adapter in `pipe.unet` is set aside for the measurement (`plain_attention`).
    Returns {"colour", "shape", "position", "size"} as fractions of the samples.
    """
    guidance_scale = DEFAULT_GUIDANCE_SCALE if guidance_scale is None else guidance_scale
    captions = [r["text"] for r in list(records)[: n if n is not None else len(records)]]
    per_call = max(1, batch_size // num_samples)
    samples = []
    with plain_attention(pipe.unet):
        for start in range(0, len(captions), per_call):
            chunk = captions[start : start + per_call]
            samples += pipe(prompt=chunk, num_images_per_prompt=num_samples, num_inference_steps=steps,
                            guidance_scale=guidance_scale,
                            generator=sample_generators(seed + start * num_samples, len(chunk) * num_samples)).images
    expected = [parse_caption(c).as_dict() for c in captions for _ in range(num_samples)]
    return agreement([classify(s) for s in samples], expected)


@torch.no_grad()
def vae_psnr(pipe, records, root, n: int | None = None, batch_size: int = 128) -> float:
    """Mean PSNR (dB, images in [0, 1]) of the VAE's reconstructions encode -> mean latent -> decode."""
    records = list(records)[: n if n is not None else len(records)]
    root = Path(root)
    vae = pipe.vae
    psnrs = []
    for start in range(0, len(records), batch_size):
        chunk = [load_rgb(root / r["image_file"]) for r in records[start : start + batch_size]]
        x = images_to_tensor(chunk).to(device=vae.device, dtype=vae.dtype)
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        mse = (((rec.float() - x.float()) / 2) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
        psnrs.append((10 * torch.log10(1.0 / mse)).cpu())
    return float(torch.cat(psnrs).mean())


def all_captions() -> list[str]:
    """Every caption the shapes generator can write (6 colours x 3 shapes x 4 positions x 2 sizes)."""
    return [ShapeSpec(colour=c, shape=s, position=p, size=z).caption
            for c, s, p, z in itertools.product(COLOURS, SHAPES, POSITIONS, SIZES)]


@torch.no_grad()
def retrieval_top1(clip, records, root, n: int | None = None) -> dict:
    """Caption retrieval with the scoring CLIP: for each image, the nearest of all possible captions.

    clip: (model, tokenizer, processor) from `load_scoring_clip()`. Returns top-1 accuracy of
    the whole caption ("caption") and of each attribute of the retrieved caption.
    """
    model, tokenizer, processor = clip
    images, captions, expected = _load_prompts(records, root, n)
    candidates = all_captions()
    image_emb = clip_image_embeds(model, processor, images)
    text_emb = clip_text_embeds(model, tokenizer, candidates)
    best = (image_emb @ text_emb.T).argmax(dim=1).tolist()
    found = [candidates[i] for i in best]
    result = {"caption": float(np.mean([f == c for f, c in zip(found, captions)]))}
    result.update(agreement([parse_caption(f).as_dict() for f in found], expected))
    return result


def generation_seconds(pipe, n: int = 32, steps: int = 25, guidance_scale: float | None = None) -> float:
    """Wall-clock seconds to sample n images from text at `steps` steps (one warm-up call first)."""
    guidance_scale = DEFAULT_GUIDANCE_SCALE if guidance_scale is None else guidance_scale
    prompts = [c for c, _ in zip(itertools.cycle(all_captions()), range(n))]
    with plain_attention(pipe.unet):
        pipe(prompt=prompts[:2], num_inference_steps=2, guidance_scale=guidance_scale)
        start = time.perf_counter()
        pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance_scale,
             generator=torch.Generator("cpu").manual_seed(0))
        return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def _parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m ipa_lab.evaluate",
                                description="Score an IP-Adapter checkpoint (or, with --backbone, the toy model itself).")
    p.add_argument("--model", default=str(TOY_SD), help="Stable Diffusion pipeline folder (default: data/toy-sd)")
    p.add_argument("--checkpoint", help="ip_adapter.safetensors (or .bin) to evaluate")
    p.add_argument("--data", default=str(REPO_ROOT / "data" / "shapes"),
                   help="folder with <split>.json and its images (default: data/shapes)")
    p.add_argument("--split", default="val")
    p.add_argument("--clip", default=str(TOY_CLIP),
                   help="scoring CLIP folder, default data/toy-clip ('none' to skip CLIP-I/CLIP-T)")
    p.add_argument("--n", type=int, default=64, help="number of validation prompts")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--via", choices=("ours", "diffusers"), default="ours",
                   help="generate with our processors, or through diffusers' own load_ip_adapter")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE_SCALE)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--sweep", action="store_true", help="also print image-only agreement for scales 0..1")
    p.add_argument("--backbone", action="store_true",
                   help="score the backbone instead: text->image agreement, VAE PSNR, CLIP retrieval, speed")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if not args.backbone and not args.checkpoint:
        p.error("give --checkpoint DIR/ip_adapter.safetensors, or --backbone")
    return args


def _round(d: dict, digits: int = 3) -> dict:
    return {k: round(v, digits) if isinstance(v, float) else v for k, v in d.items()}


def main(argv=None) -> None:
    args = _parse_args(argv)
    device = setup(args.seed, args.device)
    pipe = load_pipeline(args.model, device=device)
    records = read_records(Path(args.data) / f"{args.split}.json")
    clip = None if args.clip.lower() == "none" else load_scoring_clip(args.clip)
    if clip is not None:
        clip = (clip[0].to(device), clip[1], clip[2])
    common = dict(seed=args.seed, steps=args.steps, guidance_scale=args.guidance, batch_size=args.batch_size)

    if args.backbone:
        t2i = text_to_image_scores(pipe, records, n=args.n, num_samples=args.num_samples, **common)
        psnr = vae_psnr(pipe, records, args.data)
        print(f"text -> image, backbone alone ({args.n} captions x {args.num_samples}): "
              + "  ".join(f"{k} {v:.3f}" for k, v in t2i.items()))
        summary = {**{f"text_to_image_{k}": v for k, v in t2i.items()}, "vae_psnr_db": psnr}
        if clip is not None:
            ret = retrieval_top1(clip, records, args.data)
            print(f"caption retrieval top-1, scoring CLIP ({len(records)} images, {len(all_captions())} captions): "
                  + "  ".join(f"{k} {v:.3f}" for k, v in ret.items()))
            summary.update({f"retrieval_{k}": v for k, v in ret.items()})
        print(f"VAE reconstruction PSNR: {psnr:.2f} dB")
        seconds = generation_seconds(pipe, 32, args.steps, args.guidance)
        print(f"time to generate 32 images at {args.steps} steps: {seconds:.1f} s ({torch.get_num_threads()} threads)")
        summary["seconds_32_images"] = seconds
        print(json.dumps(_round(summary)))
        return

    image_proj_model = load_adapter(pipe, args.checkpoint, scale=args.scale) if args.via == "ours" else None
    rows = evaluate(pipe, image_proj_model, records, args.data, clip=clip, n=args.n, num_samples=args.num_samples,
                    scale=args.scale, via=args.via, checkpoint=args.checkpoint, **common)
    print(f"IP-Adapter on {args.n} validation prompts x {args.num_samples} sample(s), scale {args.scale}, "
          f"via {args.via}:")
    print(format_table(rows))
    if args.sweep:
        if image_proj_model is None:
            image_proj_model = load_adapter(pipe, args.checkpoint)
        print("\nimage prompt only, by scale:")
        print(format_table(scale_sweep(pipe, image_proj_model, records, args.data, clip=clip, n=args.n,
                                       num_samples=args.num_samples, **common)))
    image_only = next(r for r in rows if r["condition"] == "image only")
    print(json.dumps(_round({k: image_only[k] for k in ("colour", "shape", "position")})))


if __name__ == "__main__":
    main()
