"""The toy's face-recognition network: an identity embedding that ignores layout (notebook 8).

IP-Adapter-FaceID is not fed by CLIP but by InsightFace's face-recognition embedding (512
numbers, L2-normalised). A recognition network is trained to tell *identities* apart while the
pose, the framing and the light change, so its embedding keeps who is in the picture and drops
where and how they appear. That is why FaceID follows the text prompt for the composition.

The toy's analog: an "identity" is a colour and a shape (6 x 3 = 18 of them); position and size
play the part of pose and framing. Like a face pipeline, it first detects and aligns (`align`:
the shape cropped and resized to a fixed size, as InsightFace crops every face to 112 x 112), so
layout is removed before the network sees the picture. `ShapeRecognizer` is a small CNN ending
in global average pooling and a linear layer to 512 numbers, trained the way face recognition is
(CosFace: a cosine classifier over identity centres with a margin) on the shapes training split,
where position and size vary. Its embedding has InsightFace's width and, like its
`normed_embedding`, unit length: the original's `IPAdapterFaceID` fixes a 512-wide identity
embedding, so it loads the toy's FaceID adapter unmodified.

`python -m ipa_lab.recognition --output data/toy-recognition` trains it (seeded, about a
minute on 2 CPU cores) and writes `model.safetensors` (weights and config in the header, no
pickle) and `probe.csv`: how well a linear probe reads each attribute from the embedding, on
the validation split, next to chance. `load_recognizer()` loads the shipped one;
`identity_embeds(recognizer, images)` is what FaceID's projection reads.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import ATTRIBUTES, BACKGROUND, COLOURS, SHAPES, load_rgb, parse_caption, read_records

REPO_ROOT = Path(__file__).resolve().parent.parent
RECOGNIZER = REPO_ROOT / "data" / "toy-recognition"
IDENTITIES = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)  # "red circle", ...


def identity_of(spec) -> int:
    """The identity label of a `ShapeSpec`: its colour and shape, nothing about layout."""
    return IDENTITIES.index(f"{spec.colour} {spec.shape}")


class ShapeRecognizer(nn.Module):
    """A small CNN: pixels (B, 3, H, W) in [0, 1] -> unit-length identity embeddings (B, embed_dim = 512).

    Three convolutions, then global average pooling (the same features wherever the shape sits),
    then a linear layer to the embedding. `centres` (n_identities, embed_dim) are the classifier's
    identity directions, used only in training and for `identify`.
    """

    def __init__(self, embed_dim: int = 512, width: int = 32, n_identities: int = len(IDENTITIES)):
        super().__init__()
        self.config = {"embed_dim": embed_dim, "width": width, "n_identities": n_identities}
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(2 * width, embed_dim),
        )
        self.centres = nn.Parameter(torch.randn(n_identities, embed_dim))

    def forward(self, pixels: torch.Tensor, aligned: bool = False) -> torch.Tensor:
        """Align (unless `aligned`: already cropped by `align`), then embed; unit-length rows."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"ShapeRecognizer expects pixels of shape (batch, 3, H, W) in [0, 1], got {tuple(pixels.shape)}")
        return F.normalize(self.features((pixels if aligned else align(pixels)) - 0.5), dim=-1)

    def cosines(self, embeds: torch.Tensor) -> torch.Tensor:
        """Cosine of each embedding with each identity centre, (B, n_identities)."""
        return embeds @ F.normalize(self.centres, dim=-1).T

    def identify(self, pixels: torch.Tensor) -> torch.Tensor:
        """The identity index each image is closest to."""
        return self.cosines(self(pixels)).argmax(-1)


def cosface_loss(cosines: torch.Tensor, labels: torch.Tensor, scale: float = 16.0, margin: float = 0.2) -> torch.Tensor:
    """CosFace: softmax over scale * cosines, the true identity's cosine lowered by `margin` first,
    so an embedding must be clearly closer to its own centre than to any other."""
    return F.cross_entropy(scale * (cosines - margin * F.one_hot(labels, cosines.shape[1])), labels)


def to_pixels(images) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) float pixels in [0, 1]."""
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def load_split(root: str | Path, split: str) -> tuple[torch.Tensor, list]:
    """A shapes split as pixels (N, 3, H, W) and its `ShapeSpec`s (parsed from the captions)."""
    root = Path(root)
    records = read_records(root / f"{split}.json")
    return to_pixels([load_rgb(root / r["image_file"]) for r in records]), [parse_caption(r["text"]) for r in records]


def align(pixels: torch.Tensor, size: int = 32, margin: float = 1.25) -> torch.Tensor:
    """Detect and align, as a face pipeline does before recognition: crop a square around the
    shape (its pixels: farther than 60 RGB units from the background, as `metrics.foreground`
    finds them), `margin` times its extent, and resize it to `size` x `size`. Position and size
    are gone from the result by construction, as InsightFace's 112 x 112 aligned crop removes
    where the face was and how large. A picture with no shape pixels is used whole."""
    from .metrics import foreground

    b, _, h, w = pixels.shape
    background = torch.tensor(BACKGROUND, dtype=pixels.dtype).view(1, 3, 1, 1) / 255.0
    mask = torch.from_numpy(np.stack([foreground(x * 2 - 1) for x in pixels]))  # (B, H, W): the shape's pixels
    rows, cols = mask.any(dim=2), mask.any(dim=1)  # which rows / columns hold shape pixels
    found = rows.any(dim=1)

    def extent(hit: torch.Tensor, n: int):  # first and last index of each row of `hit` (n-1, 0 if none)
        index = torch.arange(n).expand_as(hit)
        return torch.where(hit, index, n).min(dim=1).values, torch.where(hit, index, -1).max(dim=1).values + 1

    (top, bottom), (left, right) = extent(rows, h), extent(cols, w)
    cy, cx = (top + bottom) / 2, (left + right) / 2
    half = margin * torch.maximum(bottom - top, right - left) / 2
    # A blank picture: the whole image (centre, half the side).
    cy, cx = torch.where(found, cy, h / 2), torch.where(found, cx, w / 2)
    half = torch.where(found, half, torch.tensor(w / 2, dtype=half.dtype))
    # The crop box in the [-1, 1] coordinates grid_sample reads; outside the picture is background.
    theta = torch.zeros(b, 2, 3, dtype=pixels.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = 2 * half / w, 2 * cx / w - 1
    theta[:, 1, 1], theta[:, 1, 2] = 2 * half / h, 2 * cy / h - 1
    grid = F.affine_grid(theta, (b, 3, size, size), align_corners=False)
    return F.grid_sample(pixels - background, grid, align_corners=False) + background


def train_recognizer(root: str | Path, steps: int = 300, batch_size: int = 128, lr: float = 3e-3, seed: int = 0
                     ) -> ShapeRecognizer:
    """Train `ShapeRecognizer` on the identities of the shapes training split (seeded): the
    pictures are aligned once, then each step classifies a random batch, half of it mirrored
    (a mirrored triangle is still a triangle)."""
    torch.manual_seed(seed)
    pixels, specs = load_split(root, "train")
    crops = align(pixels)
    labels = torch.tensor([identity_of(s) for s in specs])
    model = ShapeRecognizer()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(labels), (batch_size,), generator=g)
        batch = torch.where((torch.rand(batch_size, generator=g) < 0.5).view(-1, 1, 1, 1), crops[idx].flip(-1), crops[idx])
        loss = cosface_loss(model.cosines(model(batch, aligned=True)), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def identity_embeds(recognizer: ShapeRecognizer, images, batch_size: int = 512) -> torch.Tensor:
    """Images (PIL, or (B, 3, H, W) pixels in [0, 1]) -> their identity embeddings (B, embed_dim).

    What FaceID's projection reads, as InsightFace's `normed_embedding` is for the real FaceID."""
    pixels = images if isinstance(images, torch.Tensor) else to_pixels(images)
    return torch.cat([recognizer(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)])


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 steps: int = 300, seed: int = 0) -> float:
    """Accuracy of a logistic-regression probe (trained on train_x) on test_x: what the features
    say about a label, read by the simplest classifier there is."""
    torch.manual_seed(seed)
    n_classes = int(train_y.max()) + 1
    probe = nn.Linear(train_x.shape[1], n_classes)
    optimizer = torch.optim.Adam(probe.parameters(), lr=0.05)
    for _ in range(steps):
        loss = F.cross_entropy(probe(train_x), train_y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float((probe(test_x).argmax(-1) == test_y).float().mean())


def probe_table(recognizer: ShapeRecognizer, root: str | Path) -> list[dict]:
    """What the embedding carries: per attribute, a linear probe's accuracy on the validation
    split (trained on the training split's embeddings), and chance (one over the values)."""
    from .data import POSITIONS, SIZES

    values = {"colour": list(COLOURS), "shape": list(SHAPES), "position": list(POSITIONS), "size": list(SIZES)}
    (train_px, train_specs), (val_px, val_specs) = load_split(root, "train"), load_split(root, "val")
    train_e, val_e = identity_embeds(recognizer, train_px), identity_embeds(recognizer, val_px)
    rows = [{"attribute": "identity (nearest centre)", "accuracy": float(
        (recognizer.cosines(val_e).argmax(-1) == torch.tensor([identity_of(s) for s in val_specs])).float().mean()),
        "chance": 1 / len(IDENTITIES)}]
    for attribute in ATTRIBUTES:
        label = lambda specs: torch.tensor([values[attribute].index(getattr(s, attribute)) for s in specs])  # noqa: E731
        rows.append({"attribute": attribute, "accuracy": linear_probe(train_e, label(train_specs), val_e, label(val_specs)),
                     "chance": 1 / len(values[attribute])})
    return rows


def save_recognizer(model: ShapeRecognizer, folder: str | Path) -> Path:
    """Write `model.safetensors` (weights, the config in the header) atomically."""
    from safetensors.torch import save_file

    from .checkpoint import write_atomically

    path = Path(folder) / "model.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata={"config": json.dumps(model.config)}))
    return path


def load_recognizer(folder: str | Path = RECOGNIZER) -> ShapeRecognizer:
    """The recognizer saved in `folder` (the shipped one by default), in eval mode, frozen."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no recognizer at {path}; train one with "
                                f"`python -m ipa_lab.recognition --output {folder}`")
    with safe_open(str(path), framework="pt") as f:
        config = json.loads((f.metadata() or {}).get("config", "{}"))
    model = ShapeRecognizer(**config)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval().requires_grad_(False)


def main(argv=None) -> None:
    from .runtime import setup
    from .tables import format_table

    parser = argparse.ArgumentParser(prog="python -m ipa_lab.recognition", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="folder for model.safetensors and probe.csv")
    parser.add_argument("--data", default=str(REPO_ROOT / "data" / "shapes"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    setup(seed=args.seed)
    model = train_recognizer(args.data, steps=args.steps, seed=args.seed)
    save_recognizer(model, args.output)
    rows = probe_table(model, args.data)
    from .results import write_csv

    write_csv(Path(args.output) / "probe.csv", rows)
    print(format_table([{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]))


if __name__ == "__main__":
    main()
