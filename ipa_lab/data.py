"""The course's data: a synthetic shapes data set, and a Dataset for IP-Adapter's training format.

Why synthetic shapes: what an image prompt carries (colour, shape, position, size) can then be
*measured* in a generated image with a few lines of pixel arithmetic (see `ipa_lab.evaluate`),
so the course can show what the adapter learned instead of trusting a loss curve.

The on-disk format is exactly the original training script's: a JSON list of
``{"image_file": <path relative to the data folder>, "text": <caption>}``. Any folder in that
format works with `IPAdapterDataset`, so a learner can bring their own images.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError
from torch.utils.data import Dataset

RESOLUTION = 32
BACKGROUND = (245, 245, 245)
# Saturated colours far apart in RGB, so a blurry sample is still easy to name.
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (150, 60, 190),
    "cyan": (40, 200, 210),
}
SHAPES = ("circle", "square", "triangle")
# Quadrant centres, as fractions of the image side.
POSITIONS = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
}
SIZES = {"small": 0.30, "large": 0.44}  # shape extent as a fraction of the image side
ATTRIBUTES = ("colour", "shape", "position", "size")


@dataclass(frozen=True)
class ShapeSpec:
    """What one picture shows; the caption is made from it, word for word."""

    colour: str
    shape: str
    position: str
    size: str

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} in the {self.position}"

    def as_dict(self) -> dict:
        return {a: getattr(self, a) for a in ATTRIBUTES}


def parse_caption(text: str) -> ShapeSpec:
    """Invert `ShapeSpec.caption` (raises ValueError on a caption the generator never writes)."""
    words = text.split()
    if len(words) != 8 or words[0] != "a" or words[4:6] != ["in", "the"]:
        raise ValueError(f"not a shapes caption: {text!r}; expected e.g. 'a small red circle in the top left'")
    spec = ShapeSpec(colour=words[2], shape=words[3], position=" ".join(words[-2:]), size=words[1])
    if spec.colour not in COLOURS or spec.shape not in SHAPES or spec.position not in POSITIONS or spec.size not in SIZES:
        raise ValueError(f"not a shapes caption: {text!r}")
    return spec


def random_spec(rng: random.Random) -> ShapeSpec:
    return ShapeSpec(
        colour=rng.choice(list(COLOURS)),
        shape=rng.choice(SHAPES),
        position=rng.choice(list(POSITIONS)),
        size=rng.choice(list(SIZES)),
    )


def render_shape(spec: ShapeSpec, rng: random.Random | None = None, resolution: int = RESOLUTION) -> Image.Image:
    """Render one shape on the plain background.

    Drawn 8x larger and scaled down, so the edges are anti-aliased like a photo's and the VAE
    has smooth gradients to learn; `rng` adds a little jitter to position and size.
    """
    rng = rng or random.Random(0)
    ss = 8
    side = resolution * ss
    img = Image.new("RGB", (side, side), BACKGROUND)
    d = ImageDraw.Draw(img)
    fx, fy = POSITIONS[spec.position]
    jitter = 0.04 * side
    cx = fx * side + rng.uniform(-jitter, jitter)
    cy = fy * side + rng.uniform(-jitter, jitter)
    r = SIZES[spec.size] * side / 2 * rng.uniform(0.93, 1.07)
    colour = COLOURS[spec.colour]
    if spec.shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif spec.shape == "square":
        s = 0.85 * r  # a square of the same extent looks much bigger than the circle
        d.rectangle([cx - s, cy - s, cx + s, cy + s], fill=colour)
    elif spec.shape == "triangle":
        d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=colour)
    else:
        raise ValueError(f"unknown shape {spec.shape!r}; expected one of {SHAPES}")
    return img.resize((resolution, resolution), Image.Resampling.BOX)


def make_shapes_dataset(root: str | os.PathLike, n_train: int = 4000, n_val: int = 512, seed: int = 0) -> Path:
    """Write the shapes data set in the original training format into `root`.

    `root/images/*.png`, `root/train.json`, `root/val.json`; the same seed gives the same files.
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        rows = []
        for i in range(n):
            spec = random_spec(rng)
            name = f"images/{split}_{i:05d}.png"
            render_shape(spec, rng).save(root / name, optimize=True)
            rows.append({"image_file": name, "text": spec.caption})
        (root / f"{split}.json").write_text(json.dumps(rows, indent=0) + "\n")
    return root


def read_records(json_file: str | os.PathLike) -> list[dict]:
    """Read and validate a training-format JSON list; errors say which entry is wrong and how."""
    path = Path(json_file)
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}; expected a JSON list of {{'image_file', 'text'}} entries")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:  # say where, so a hand-edited file is quick to fix
        raise ValueError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}; expected a "
                         "JSON list of {'image_file': ..., 'text': ...} entries") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}); JSON files are UTF-8") from None
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path} must hold a non-empty JSON list of {{'image_file': ..., 'text': ...}} entries")
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("image_file"), str) or not isinstance(r.get("text"), str):
            raise ValueError(f"{path}, entry {i}: expected {{'image_file': str, 'text': str}}, got {r!r}")
    return records


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` in RGB, its transparent parts white.

    `.convert("RGB")` alone drops the alpha channel, and what is left under a transparent pixel is
    often black: a cut-out logo would train as a shape on a black square. Compositing onto white
    first shows the image as a viewer shows it (RGBA, LA, PA, and P or L with a transparent colour).
    """
    if not image.has_transparency_data:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image file as RGB (transparent parts white, see `to_rgb`), fully read.

    Raises FileNotFoundError if there is no file, and ValueError naming the file if PIL cannot
    read it (not an image, a truncated or corrupt one).
    """
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, inside the try, not later
            return to_rgb(image)
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # PIL reports a broken PNG chunk as SyntaxError and a truncated file as OSError
        raise ValueError(f"{path} is not a readable image ({type(e).__name__}: {e}); expected a PNG, JPEG "
                         "or another format PIL opens") from e


def to_unet_pixels(image: Image.Image, resolution: int = RESOLUTION) -> torch.Tensor:
    """The VAE's input, as in the original: resize the short side, centre crop, scale to [-1, 1]."""
    image = to_rgb(image)
    w, h = image.size
    scale = resolution / min(w, h)
    if (w, h) != (resolution, resolution):
        image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.Resampling.BICUBIC)
        w, h = image.size
        left, top = (w - resolution) // 2, (h - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    return x * 2 - 1


class IPAdapterDataset(Dataset):
    """IP-Adapter's training data: one image and its caption per item.

    Returns ``{"pixel_values": (3, R, R) in [-1, 1] for the VAE, "clip_pixel_values": the image
    encoder's input (its own preprocessing, as CLIP expects), "text": caption}``.
    Dropping text or image is done by the training loop, not here, so that cached encoder
    outputs can be reused (see `ipa_lab.train`).
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", image_processor=None, resolution: int = RESOLUTION):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"data folder {self.root} does not exist; expected a folder with {split}.json and its images")
        self.json_file = self.root / f"{split}.json"
        self.records = read_records(self.json_file)
        self.image_processor = image_processor
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.records)

    def image(self, i: int) -> Image.Image:
        """Entry `i`'s image in RGB; an error names the entry and its file."""
        path = self.root / self.records[i]["image_file"]
        try:
            return load_rgb(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"entry {i} of {self.root} names {path}, which does not exist") from None
        except ValueError as e:  # load_rgb's message names the file and why; add which entry
            raise ValueError(f"entry {i} of {self.json_file}: {e}") from e.__cause__

    def __getitem__(self, i: int) -> dict:
        image = self.image(i)
        item = {"pixel_values": to_unet_pixels(image, self.resolution), "text": self.records[i]["text"]}
        if self.image_processor is not None:
            item["clip_pixel_values"] = self.image_processor(images=image, return_tensors="pt").pixel_values[0]
        return item


def images_to_tensor(images: list[Image.Image], resolution: int = RESOLUTION) -> torch.Tensor:
    """A batch of PIL images as the VAE's input, (B, 3, R, R) in [-1, 1]."""
    return torch.stack([to_unet_pixels(im, resolution) for im in images])
