"""Which layers matter: the image injected block by block, adapters trained in some blocks only,
several image prompts at once (notebook 9).

InstantStyle (Wang et al., 2024) found that in SDXL one attention layer carries style and colour
(`up_blocks.0.attentions.1`) and another the layout (`down_blocks.2.attentions.1`), and injects the
image prompt only there. diffusers exposes it as a scale *per block*:
`pipe.set_ip_adapter_scale({"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}})`,
every unlisted block at 0; `ipa_lab.generate.set_scale` takes the same (`block_scales` expands it).
The toy's attributes can be measured, so the question gets numbers here:

* `heatmap`: for the shipped base adapter, the image injected into one attention layer (or one
  block) at a time, all others at 0: how often the sample shows the image prompt's colour, shape,
  position and size (and the text prompt's, when a conflicting caption is given too);
* `train_in_blocks`: adapters whose image branch exists only in chosen blocks, trained with the same
  budget as the full one (`ipa_lab.generate.keep_image_branch`), with their parameter counts;
* `masked_pairs` and `two_adapters`: two image prompts in one sample, through diffusers' own code
  (`IPAdapterMaskProcessor` and `ip_adapter_masks`; `load_ip_adapter` with lists).

    python -m ipa_lab.blocks heatmap --output data/blocks/heatmap.csv
    python -m ipa_lab.blocks train --output data/blocks/training.csv
    python -m ipa_lab.blocks masks --output data/blocks/masks.csv
    python -m ipa_lab.blocks adapters --output data/blocks/adapters.csv
"""
from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np
import torch

from .adapter import count_parameters
from .checkpoint import read_checkpoint
from .data import load_rgb, parse_caption, read_records
from .diffusers_path import diffusers_image_embeds
from .generate import DEFAULT_GUIDANCE_SCALE, attention_blocks, attention_layer, generate, keep_image_branch, \
    load_adapter, sample_generators
from .metrics import agreement, classify
from .pipeline import REPO_ROOT, TOY_SD, load_pipeline
from .results import read_csv, write_csv  # noqa: F401  (notebooks import read_csv from here too)

ATTRIBUTES = ("colour", "shape", "position", "size")
SHIPPED = REPO_ROOT / "data" / "ip-adapter-toy" / "ip_adapter.safetensors"
SHIPPED_PLUS = REPO_ROOT / "data" / "ip-adapter-toy-plus" / "ip_adapter.safetensors"
DATA = REPO_ROOT / "data" / "shapes"
STEPS = 15  # DDIM steps of the shipped CSVs; the full adapter scores the same as at 25 (see the heat map's "all" row)

# InstantStyle's settings for SD 1.5 (marked experimental in its repository), and the toy's layers at
# the same depth: SD 1.5's deepest cross-attention down block is down_blocks.2, the toy's down_blocks.1;
# up_blocks.1 is the first up block with attention in both.
INSTANTSTYLE_SD15 = {"style": {"up": {"block_1": 1.0}},
                     "style and layout": {"down": {"block_2": 1.0}, "mid": 1.0, "up": {"block_1": 1.0}}}
INSTANTSTYLE_ON_TOY = {"style": {"up": {"block_1": 1.0}},
                       "style and layout": {"down": {"block_1": 1.0}, "mid": 1.0, "up": {"block_1": 1.0}}}


# ---------------------------------------------------------------------------------------------
# Scale dicts: which layers are on
# ---------------------------------------------------------------------------------------------
def scale_dict(unet, layers, value: float = 1.0) -> dict:
    """The diffusers-format scale dict that turns the image on in `layers` only (value there, 0
    elsewhere). `layers`: attention layers ('up_blocks.1.attentions.0') or whole blocks
    ('up_blocks.1', 'mid_block'). The inverse of `ipa_lab.generate.block_scales`:
    ['up_blocks.1.attentions.1', 'mid_block'] -> {'mid': 1.0, 'up': {'block_1': [0.0, 1.0]}}.
    """
    spec: dict = {}
    wanted = set(layers)
    found = set()
    for short, n in attention_blocks(unet).items():
        names = [attention_layer(short, k) for k in range(n)]
        block = names[0].rsplit(".attentions.", 1)[0]
        on = [block in wanted or name in wanted for name in names]
        found |= {name for name, o in zip(names, on) if o} | ({block} if block in wanted else set())
        if not any(on):
            continue
        values = [value if o else 0.0 for o in on]
        if short == "mid":
            spec["mid"] = values[0]
        else:
            side, b = short.split(".")
            spec.setdefault(side, {})[b] = values[0] if all(on) else values
    unknown = wanted - found
    if unknown:
        raise ValueError(f"no attention layer or block {sorted(unknown)} in this UNet; it has "
                         f"{[attention_layer(s, k) for s, n in attention_blocks(unet).items() for k in range(n)]}")
    return spec


def layer_sets(unet) -> list[tuple[str, str, list[str]]]:
    """What the heat map turns on, one at a time: (name, kind, layers) for every attention layer,
    every block with attention, all of them, and none (the adapter off)."""
    blocks = attention_blocks(unet)
    layers = [attention_layer(s, k) for s, n in blocks.items() for k in range(n)]
    whole = [attention_layer(s, 0).rsplit(".attentions.", 1)[0] for s in blocks]
    return ([(name, "layer", [name]) for name in layers]
            + [(name, "block", [name]) for name in whole]
            + [("all", "all", whole), ("none", "none", [])])


# ---------------------------------------------------------------------------------------------
# The heat map: one layer at a time
# ---------------------------------------------------------------------------------------------
def prompts(records, root, n: int) -> tuple[list, list[str], list[dict], list[str], list[dict]]:
    """The first n validation records as image prompts, each paired with a conflicting caption
    (the caption of the record n // 2 further on, so it usually names other attributes).
    Returns (images, captions, their attributes, conflicting captions, their attributes)."""
    records = list(records)[:n]
    if len(records) < 2:
        raise ValueError(f"need at least 2 records, got {len(records)}")
    images = [load_rgb(Path(root) / r["image_file"]) for r in records]
    captions = [r["text"] for r in records]
    other = [captions[(i + len(captions) // 2) % len(captions)] for i in range(len(captions))]
    return (images, captions, [parse_caption(c).as_dict() for c in captions],
            other, [parse_caption(c).as_dict() for c in other])


def _sample(pipe, image_proj_model, images, texts, scale, seed: int, steps: int, batch_size: int = 64) -> list:
    """One sample per image prompt, sample k from the noise of seed + k, in batches."""
    out = []
    for start in range(0, len(images), batch_size):
        out += generate(pipe, image_proj_model, images[start:start + batch_size], texts[start:start + batch_size],
                        scale=scale, num_samples=1, seed=seed + start, num_inference_steps=steps)
    return out


def heatmap(pipe, image_proj_model, records, root, n: int = 64, steps: int = STEPS, seed: int = 0,
            sets=None, with_text: bool = True) -> list[dict]:
    """For each layer set (`layer_sets`): the image injected there only (scale 1, all else 0),
    n image prompts, one sample each, scored by `metrics.classify`.

    Rows {"layers", "kind", "condition", colour, shape, position, size} give the agreement with
    the image prompt; with_text adds the condition "image + other text" (a conflicting caption,
    `prompts`) with `text_<attribute>` columns too: who wins, the image or the text. The noise is
    the same for every row, so rows differ only by where the image enters.
    """
    images, _, expected, other, other_expected = prompts(records, root, n)
    conditions = [("image only", [""] * len(images))] + ([("image + other text", other)] if with_text else [])
    rows = []
    for name, kind, layers in sets or layer_sets(pipe.unet):
        scale = scale_dict(pipe.unet, layers) if layers else 0.0
        for condition, texts in conditions:
            found = [classify(s) for s in _sample(pipe, image_proj_model, images, texts, scale, seed, steps)]
            row = {"layers": name, "kind": kind, "condition": condition, **agreement(found, expected)}
            if condition != "image only":
                row.update({f"text_{k}": v for k, v in agreement(found, other_expected).items()})
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Training only some blocks
# ---------------------------------------------------------------------------------------------
def block_configs(best: str = "up_blocks.1") -> dict[str, list[str]]:
    """The adapters section 2 trains: the image branch in the down blocks only, the mid block only,
    the up blocks only, the best single block of the heat map, and everywhere (the toy's names)."""
    return {"down": ["down_blocks.0", "down_blocks.1"], "mid": ["mid_block"], "up": ["up_blocks.1", "up_blocks.2"],
            f"best block ({best})": [best], "all": ["down_blocks.0", "down_blocks.1", "mid_block",
                                                    "up_blocks.1", "up_blocks.2"]}


def restrict_trainer(trainer, layers) -> int:
    """Keep the image branch of a freshly built `Trainer` only in `layers` and give it a new AdamW
    over what is left (the projection and the kept `to_k_ip`/`to_v_ip`); returns that count.

    The projection's random start is the full adapter's (it was drawn before), so every
    configuration starts from the same weights and sees the same batches."""
    ip = trainer.ip_adapter
    ip.adapter_modules = keep_image_branch(ip.unet, layers)
    params = list(itertools.chain(ip.image_proj_model.parameters(), ip.adapter_modules.parameters()))
    optimizer = torch.optim.AdamW(params, lr=trainer.cfg.lr, weight_decay=trainer.cfg.weight_decay)
    trainer.model, trainer.optimizer = trainer.accelerator.prepare(ip, optimizer)
    return sum(p.numel() for p in params)


def train_in_blocks(layers, output, steps: int = 300, cache_dir=None, seed: int = 0, progress: bool = False):
    """Train an adapter whose image branch exists only in `layers`, with the shipped base adapter's
    recipe (`TrainConfig` defaults: batch 64, lr 1e-3, text dropped half the time).
    Returns (trainer, result); the checkpoint in `output` holds only the kept layers, in the
    original format (load it with `load_adapter(..., partial=True)`)."""
    from .train import TrainConfig
    from .trainer import Trainer

    cfg = TrainConfig(model=str(TOY_SD), data=str(DATA), output=str(output), steps=steps, seed=seed,
                      overwrite=True, cache_dir=None if cache_dir is None else str(cache_dir))
    trainer = Trainer(cfg)
    restrict_trainer(trainer, layers)
    return trainer, trainer.run(progress=progress)


def trained_counts(trainer) -> dict[str, int]:
    """Trainable parameters of a (restricted) trainer: the projection, the kept layers' to_k_ip/to_v_ip."""
    ip = trainer.ip_adapter
    return {"projection": count_parameters(ip.image_proj_model), "adapter": count_parameters(ip.adapter_modules),
            "layers": sum(1 for m in ip.adapter_modules if count_parameters(m) > 0)}


def score_image_prompts(pipe, image_proj_model, records, root, n: int = 64, steps: int = STEPS, seed: int = 0,
                        scale=1.0) -> dict:
    """Image-only agreement with the prompt image over n validation prompts (one sample each)."""
    images, _, expected, _, _ = prompts(records, root, n)
    samples = _sample(pipe, image_proj_model, images, [""] * len(images), scale, seed, steps)
    return agreement([classify(s) for s in samples], expected)


# ---------------------------------------------------------------------------------------------
# Several image prompts: masks, and two adapters, through diffusers' own code
# ---------------------------------------------------------------------------------------------
def half_masks(size: int) -> list:
    """Two binary masks as PIL images: the left half and the right half of a size x size picture."""
    from PIL import Image

    left = np.zeros((size, size), dtype=np.uint8)
    left[:, : size // 2] = 255
    return [Image.fromarray(left), Image.fromarray(255 - left)]


def region_colours(image) -> tuple[str | None, str | None]:
    """The colour `classify` reads in the left half and in the right half of a sample (None: empty)."""
    a = np.asarray(image.convert("RGB"))
    w = a.shape[1]
    return classify(a[:, : w // 2])["colour"], classify(a[:, w // 2:])["colour"]


def mask_pairs(records, root, n: int) -> list[tuple[int, int]]:
    """n pairs (i, j) of validation images of different colours: each record in turn (until n pairs)
    with the nearest later one whose colour differs."""
    records = list(records)
    pairs = []
    for i, r in enumerate(records):
        a = parse_caption(r["text"])
        for j in range(i + 1, len(records)):
            if parse_caption(records[j]["text"]).colour != a.colour:
                pairs.append((i, j))
                break
        if len(pairs) == n:
            break
    return pairs


@torch.no_grad()
def masked_pairs(pipe, checkpoint, records, root, n: int = 32, steps: int = STEPS, seed: int = 0,
                 guidance_scale: float = DEFAULT_GUIDANCE_SCALE) -> list[dict]:
    """Two image prompts A and B in one sample through diffusers' own code, A masked to the left
    half and B to the right (`IPAdapterMaskProcessor`, `cross_attention_kwargs={"ip_adapter_masks": ...}`);
    against it, each prompt alone and unmasked. Per region, how often the sample shows A's
    colour on the left and B's on the right.

    Returns one row per setting: {"setting", "left_is_A", "right_is_B", "both", "left_empty", "right_empty",
    "one_shape"} as fractions of n samples ("one_shape": classify sees a shape in exactly one half).
    """
    from diffusers.image_processor import IPAdapterMaskProcessor

    from .diffusers_path import diffusers_ip_adapter

    records = list(records)
    pairs = mask_pairs(records, root, n)
    size = pipe.vae.config.sample_size
    masks = IPAdapterMaskProcessor().preprocess(half_masks(size), height=size, width=size)
    masks = [masks.reshape(1, 2, size, size)]
    colours = [parse_caption(r["text"]).colour for r in records]
    results = {k: [] for k in ("A and B, masked", "A and B, no mask", "A alone", "B alone")}
    with diffusers_ip_adapter(pipe, checkpoint):
        pipe.set_ip_adapter_scale(1.0)  # with masks, diffusers gives each masked image this scale
        for k, (i, j) in enumerate(pairs):
            a, b = (load_rgb(Path(root) / records[x]["image_file"]) for x in (i, j))
            one_a, one_b = diffusers_image_embeds(pipe, False, [a])[0], diffusers_image_embeds(pipe, False, [b])[0]
            both = torch.cat([one_a, one_b], dim=1)  # (2, 2, D): [uncond; cond] x the two images
            common = dict(prompt="", negative_prompt="", num_inference_steps=steps, guidance_scale=guidance_scale,
                          generator=sample_generators(seed + k, 1))
            calls = {"A and B, masked": dict(ip_adapter_image_embeds=[both],
                                             cross_attention_kwargs={"ip_adapter_masks": masks}),
                     "A and B, no mask": dict(ip_adapter_image_embeds=[both]),
                     "A alone": dict(ip_adapter_image_embeds=[one_a]),
                     "B alone": dict(ip_adapter_image_embeds=[one_b])}
            for setting, extra in calls.items():
                common["generator"] = sample_generators(seed + k, 1)
                image = pipe(**common, **extra).images[0]
                left, right = region_colours(image)
                results[setting].append((left == colours[i], right == colours[j], left is None, right is None))
    rows = []
    for setting, marks in results.items():
        m = np.array(marks, dtype=float)
        rows.append({"setting": setting, "left_is_A": m[:, 0].mean(), "right_is_B": m[:, 1].mean(),
                     "both": (m[:, 0] * m[:, 1]).mean(), "left_empty": m[:, 2].mean(), "right_empty": m[:, 3].mean(),
                     "one_shape": (m[:, 2] + m[:, 3] == 1).mean()})
    return rows


@torch.no_grad()
def two_adapters(pipe, checkpoints, records, root, scales, n: int = 32, steps: int = STEPS, seed: int = 0,
                 guidance_scale: float = DEFAULT_GUIDANCE_SCALE) -> list[dict]:
    """Two adapters loaded together with diffusers' list API (`load_ip_adapter([a, b], ...)`), the
    first given image A, the second image B (pairs of different colours, `mask_pairs`). For each
    scale list in `scales` (e.g. [1.0, 0.0]), how often the sample takes A's colour, B's colour.
    Returns rows {"scales", "colour_A", "colour_B", "shape_A", "shape_B"}."""
    states = [read_checkpoint(c) for c in checkpoints]
    plus = ["latents" in s["image_proj"] for s in states]
    records = list(records)
    pairs = mask_pairs(records, root, n)
    attrs = [parse_caption(r["text"]).as_dict() for r in records]
    saved = pipe.unet.attn_processors
    encoder, features = pipe.image_encoder, pipe.feature_extractor
    pipe.load_ip_adapter(states, subfolder=[""] * len(states), weight_name=[""] * len(states),
                         image_encoder_folder=None)
    rows = []
    try:
        embeds = []
        for i, j in pairs:
            a, b = (load_rgb(Path(root) / records[x]["image_file"]) for x in (i, j))
            embeds.append([diffusers_image_embeds(pipe, plus[0], [a])[0], diffusers_image_embeds(pipe, plus[1], [b])[0]])
        for scale in scales:
            pipe.set_ip_adapter_scale(list(scale))
            found = [classify(pipe(prompt="", negative_prompt="", ip_adapter_image_embeds=e, num_inference_steps=steps,
                                   guidance_scale=guidance_scale, generator=sample_generators(seed + k, 1)).images[0])
                     for k, e in enumerate(embeds)]
            row = {"scales": " ".join(f"{s:g}" for s in scale)}
            for key, idx in (("A", 0), ("B", 1)):
                want = [attrs[p[idx]] for p in pairs]
                got = agreement(found, want, ("colour", "shape"))
                row[f"colour_{key}"], row[f"shape_{key}"] = got["colour"], got["shape"]
            rows.append(row)
    finally:
        pipe.unload_ip_adapter()
        pipe.register_modules(image_encoder=encoder, feature_extractor=features)
        pipe.unet.set_attn_processor(saved)
    return rows


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def _parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m ipa_lab.blocks", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("heatmap", "train", "masks", "adapters"))
    p.add_argument("--output", required=True, help="CSV to write")
    p.add_argument("--n", type=int, help="validation prompts (default: 64 for heatmap and train, 32 for masks and adapters)")
    p.add_argument("--steps", type=int, default=STEPS, help="DDIM sampling steps")
    p.add_argument("--train-steps", type=int, default=300, help="training steps per configuration (train)")
    p.add_argument("--best", default="up_blocks.1", help="the heat map's best single block (train)")
    p.add_argument("--cache-dir", default=str(REPO_ROOT / "runs" / "encoder-cache"), help="encoder cache (train)")
    p.add_argument("--runs", default=str(REPO_ROOT / "runs" / "blocks"), help="where the trained adapters go (train)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.n is not None and args.n < 2:
        p.error(f"--n must be at least 2, got {args.n}")
    if Path(args.output).is_dir():
        p.error(f"--output {args.output} is a folder; give a .csv file")
    return args


def main(argv=None) -> None:
    args = _parse_args(argv)
    from .runtime import setup

    setup(args.seed, "cpu")
    t0 = time.perf_counter()
    records = read_records(DATA / "val.json")
    pipe = load_pipeline(str(TOY_SD))
    n = args.n or (64 if args.what in ("heatmap", "train") else 32)
    if args.what == "heatmap":
        proj = load_adapter(pipe, SHIPPED)
        rows = heatmap(pipe, proj, records, DATA, n=n, steps=args.steps, seed=args.seed)
    elif args.what == "train":
        rows = []
        for name, layers in block_configs(args.best).items():
            folder = Path(args.runs) / name.split(" ")[0]
            trainer, result = train_in_blocks(layers, folder, args.train_steps, args.cache_dir, args.seed)
            counts = trained_counts(trainer)
            proj = load_adapter(pipe, folder / "ip_adapter.safetensors", partial=True)
            losses = [loss for _, loss in result.losses]
            rows.append({"config": name, "layers": " ".join(layers), "cross_attention_layers": counts["layers"],
                         "adapter_parameters": counts["adapter"], "projection_parameters": counts["projection"],
                         "trainable_parameters": counts["adapter"] + counts["projection"], "steps": result.steps,
                         "loss_first_10": float(np.mean(losses[:10])), "loss_last_50": float(np.mean(losses[-50:])),
                         **score_image_prompts(pipe, proj, records, DATA, n=n, steps=args.steps, seed=args.seed),
                         "train_seconds": round(result.train_seconds, 1)})
            print(rows[-1], flush=True)
    elif args.what == "masks":
        rows = masked_pairs(pipe, SHIPPED, records, DATA, n=n, steps=args.steps, seed=args.seed)
    else:
        rows = two_adapters(pipe, [SHIPPED, SHIPPED_PLUS], records, DATA,
                            [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (1.0, 1.0)], n=n, steps=args.steps, seed=args.seed)
    write_csv(args.output, rows)
    print(f"{len(rows)} rows -> {args.output} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
