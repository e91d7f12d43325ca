"""FaceID on the toy: train it, and measure what it takes from the image and from the text (notebook 8).

The original trains FaceID with tutorial_train_faceid.py: the base recipe, with the identity
embedding (a zero embedding when the image is dropped) in place of CLIP's, FaceID's projection,
and LoRA processors everywhere. Here the same, on the toy: `faceid_trainer` builds the base
adapter's `Trainer` (same data, encoder cache, draws and recipe: `TrainConfig` defaults) and
gives it FaceID's parts and inputs; the identity embedding is `ipa_lab.recognition`'s.

`compare` asks what FaceID was built for: with an image prompt and a caption that asks for
another position and size and names no colour or shape, do the samples keep the prompt's colour
and shape and follow the caption's layout, where the base adapter copies the layout too?

    python -m ipa_lab.train_faceid train --output data/ip-adapter-toy-faceid
    python -m ipa_lab.train_faceid compare --faceid data/ip-adapter-toy-faceid/ip_adapter.safetensors \
        --output data/faceid/compare.csv
"""
from __future__ import annotations

import argparse
import itertools
import random
from pathlib import Path

import torch

from .faceid import NUM_TOKENS, MLPProjModel

# The toy's LoRA rank: its attention layers are 64 and 128 wide (SD 1.5's are 320 to 1280, rank 128).
TOY_LORA_RANK = 8
STEPS = 15  # DDIM steps for `compare`, as in notebooks 05 and 09


# ---------------------------------------------------------------------------------------------
# Training on the toy: the base adapter's trainer, with FaceID's parts and inputs
# ---------------------------------------------------------------------------------------------
class IdentityInputs:
    """A step's inputs for FaceID: latents and text from the encoder cache, and in place of the
    CLIP features the identity embedding of each sample's image; a dropped image is a zero
    embedding, as in tutorial_train_faceid.py (and "no image" at inference).

    `id_embeds`: records -> their embeddings (`DatasetIdentities`), asked only for the records a
    step draws."""

    def __init__(self, cache, id_embeds):
        self.cache, self.id_embeds = cache, id_embeds

    def __call__(self, d, device):
        latents, text, _ = self.cache(d, device)
        image = self.id_embeds(d.indices.cpu().tolist()).to(device)
        return latents, text, torch.where(d.drop_image.to(device)[:, None], torch.zeros_like(image), image)


class DatasetIdentities:
    """The identity embeddings of an `IPAdapterDataset`'s records, each computed the first time a
    step draws it and kept: a short run recognizes only the images it reads (3 steps of 64: under
    200 of the 4,000), a long one each image once.

    The new images of a call go through the recognizer together, at least `MIN_BATCH` of them
    (padded with repeats): below 8 images the CPU takes another convolution kernel, whose rounding
    differs (by 1e-7), while from 8 up each image's embedding is bitwise the same whatever else is
    in the batch (tested). So a run resumed from a checkpoint, which starts with none known, sees
    exactly the numbers of one that never stopped."""

    MIN_BATCH = 8

    def __init__(self, recognizer, dataset):
        self.recognizer, self.dataset, self.known = recognizer, dataset, {}

    def __call__(self, records: list[int]) -> torch.Tensor:
        from .recognition import identity_embeds

        new = [i for i in dict.fromkeys(records) if i not in self.known]
        if new:
            padded = new + [new[0]] * (self.MIN_BATCH - len(new))
            self.known.update(zip(new, identity_embeds(self.recognizer, [self.dataset.image(i) for i in padded])))
        return torch.stack([self.known[i] for i in records])


def faceid_trainer(cfg, recognizer, lora_rank: int = TOY_LORA_RANK, backbone=None):
    """A `Trainer` for FaceID: built as for the base adapter (same data, cache, draws and recipe),
    then given FaceID's parts: the processors with LoRA (`install_ip_adapter(lora_rank=...)`),
    FaceID's `MLPProjModel` over the recognizer's embedding, AdamW over both, and
    `IdentityInputs`. Everything else (checkpoints, resume, the loss log) is the Trainer's."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from .adapter import install_ip_adapter
    from .trainer import IPAdapter, Trainer

    if not cfg.fast:
        raise ValueError("FaceID training on the toy reads the encoder cache: use fast=True")
    trainer = Trainer(cfg, backbone)
    unet = trainer.bb.unet
    unet.set_attn_processor(AttnProcessor2_0())  # take the base adapter out before installing FaceID's
    torch.manual_seed(cfg.seed)
    adapter_modules = install_ip_adapter(unet, num_tokens=NUM_TOKENS, lora_rank=lora_rank)
    projection = MLPProjModel(unet.config.cross_attention_dim, recognizer.config["embed_dim"]).to(trainer.device)
    params = list(itertools.chain(projection.parameters(), adapter_modules.parameters()))
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    trainer.ip_adapter = IPAdapter(unet, projection, adapter_modules)
    trainer.model, trainer.optimizer = trainer.accelerator.prepare(trainer.ip_adapter, optimizer)
    trainer.inputs = IdentityInputs(trainer.inputs, DatasetIdentities(recognizer, trainer.dataset))
    return trainer


# ---------------------------------------------------------------------------------------------
# What a FaceID adapter takes from the image prompt, and what from the text
# ---------------------------------------------------------------------------------------------
def layout_caption(size: str, position: str) -> str:
    """A caption that asks for a layout and nothing else: "a large in the top left". The toy's text
    encoder was trained on full captions, yet this one still places the shape (the text-only row of
    `compare`: position and size 1.00) and leaves colour and shape to the model's defaults."""
    return f"a {size} in the {position}"


def layout_prompts(records, n: int, seed: int = 0) -> tuple[list[int], list[str], list]:
    """n validation items as image prompts, each with a caption (`layout_caption`) asking for
    another position *and* another size than the image's, and naming no colour or shape.
    Returns (indices, captions, specs): each spec has the image's colour and shape, the caption's
    position and size."""
    from .data import POSITIONS, SIZES, ShapeSpec, parse_caption

    rng = random.Random(seed)
    indices, captions, specs = [], [], []
    for i in range(min(n, len(records))):
        spec = parse_caption(records[i]["text"])
        position = rng.choice([p for p in POSITIONS if p != spec.position])
        size = next(z for z in SIZES if z != spec.size)  # two sizes: the other one
        indices.append(i)
        captions.append(layout_caption(size, position))
        specs.append(ShapeSpec(spec.colour, spec.shape, position, size))
    return indices, captions, specs


def chance() -> dict[str, float]:
    """Agreement by chance for each attribute: one over the number of values it takes."""
    from .data import COLOURS, POSITIONS, SHAPES, SIZES

    return {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES), "position": 1 / len(POSITIONS), "size": 1 / len(SIZES)}


def _agreement(samples, expected) -> dict:
    from .metrics import agreement, classify

    return agreement([classify(s) for s in samples], [e.as_dict() for e in expected])


@torch.no_grad()
def compare(pipe, base_checkpoint, faceid_checkpoint, recognizer, records, root, n: int = 64, steps: int = STEPS,
            seed: int = 0, scales=(1.0, 3.0)) -> list[dict]:
    """The table of notebook 8: for the base adapter and the FaceID adapter, the agreement of the
    samples with the image prompt, with an empty text (λ = 1) and with a caption that asks for another
    position and size and names no colour or shape (at each λ of `scales`), and with that caption's
    layout; then the caption alone (adapter off) and chance. One sample per prompt, the same noise
    for every row."""
    from .data import load_rgb, parse_caption
    from .generate import generate, load_adapter, remove_adapter
    from .recognition import identity_embeds

    indices, captions, asked = layout_prompts(records, n, seed)
    images = [load_rgb(Path(root) / records[i]["image_file"]) for i in indices]
    shown = [parse_caption(records[i]["text"]) for i in indices]
    ids = identity_embeds(recognizer, images)
    attributes = ("colour", "shape", "position", "size")
    rows = []

    def measure(adapter, prompt_name, proj, prompt, scale, **image):
        out = generate(pipe, proj, prompt=prompt, scale=scale, num_samples=1, seed=seed, num_inference_steps=steps,
                       **image)
        with_image, with_text = _agreement(out, shown), _agreement(out, asked)
        row = {"adapter": adapter, "prompt": prompt_name, "λ": scale}
        row.update({f"{a} = image": with_image[a] for a in attributes})
        row.update({f"{a} = text": with_text[a] if prompt else None for a in ("position", "size")})
        rows.append(row)

    for adapter, checkpoint, image in (("base adapter", base_checkpoint, {"image": images}),
                                       ("FaceID adapter", faceid_checkpoint, {"image_embeds": ids})):
        proj = load_adapter(pipe, checkpoint)
        measure(adapter, "image, empty text", proj, "", 1.0, **image)
        for scale in scales:
            measure(adapter, "image + a caption asking another layout", proj, captions, scale, **image)
    measure("text only (adapter off)", "the caption alone", load_adapter(pipe, base_checkpoint), captions, 0.0)
    remove_adapter(pipe)
    p = chance()
    rows.append({"adapter": "chance", "prompt": "", "λ": None, **{f"{a} = image": p[a] for a in attributes},
                 "position = text": p["position"], "size = text": p["size"]})
    return rows


def _parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m ipa_lab.train_faceid", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train the toy FaceID adapter (the shipped one: the defaults)")
    train.add_argument("--output", required=True, help="run folder (ip_adapter.safetensors, loss.csv, ...)")
    train.add_argument("--steps", type=int, default=300)
    train.add_argument("--rank", type=int, default=TOY_LORA_RANK, help="LoRA rank (the original's is 128)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--overwrite", action="store_true")
    evaluate = sub.add_parser("compare", help="the base adapter against FaceID: what comes from image and text")
    evaluate.add_argument("--faceid", required=True, help="the FaceID checkpoint")
    evaluate.add_argument("--output", required=True, help="CSV to write")
    evaluate.add_argument("--n", type=int, default=64)
    evaluate.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("steps", "rank", "n"):
        if getattr(args, name, 1) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    return args


def main(argv=None) -> None:
    args = _parse_args(argv)
    from .runtime import setup

    setup(seed=args.seed)
    from .pipeline import REPO_ROOT, TOY_SD
    from .recognition import load_recognizer
    from .tables import format_table

    data = REPO_ROOT / "data" / "shapes"
    if args.command == "train":
        from .train import TrainConfig

        cfg = TrainConfig(model=str(TOY_SD), data=str(data), output=args.output, steps=args.steps, seed=args.seed,
                          overwrite=args.overwrite)
        result = faceid_trainer(cfg, load_recognizer(), args.rank).run()
        print(f"{result.steps} steps, last loss {result.losses[-1][1]:.4f}: {result.output}")
        return
    from .data import read_records
    from .pipeline import load_pipeline
    from .results import write_csv

    pipe = load_pipeline()
    rows = compare(pipe, REPO_ROOT / "data" / "ip-adapter-toy" / "ip_adapter.safetensors", args.faceid,
                   load_recognizer(), read_records(data / "val.json"), data, n=args.n, seed=args.seed)
    write_csv(args.output, rows)
    print(format_table(rows))


if __name__ == "__main__":
    main()
