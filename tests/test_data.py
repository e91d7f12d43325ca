"""The shapes data set, the training-format Dataset and the toy tokenizer."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from ipa_lab.data import (COLOURS, SHAPES, IPAdapterDataset, ShapeSpec, load_rgb, make_shapes_dataset, parse_caption,
                          read_records, render_shape, to_unet_pixels)
from ipa_lab.metrics import classify, foreground
from ipa_lab.pipeline import REPO_ROOT
from ipa_lab.pretrain import image_processor
from ipa_lab.tokenizer import caption_words
from ipa_lab.tokenizer import build_tokenizer


def test_same_seed_same_files(tmp_path):
    a = make_shapes_dataset(tmp_path / "a", n_train=6, n_val=2, seed=3)
    b = make_shapes_dataset(tmp_path / "b", n_train=6, n_val=2, seed=3)
    assert (a / "train.json").read_text() == (b / "train.json").read_text()
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in ("images/train_00000.png", "images/val_00001.png"))


def test_shipped_data_set_is_in_the_original_format_and_small():
    root = REPO_ROOT / "data" / "shapes"
    train, val = read_records(root / "train.json"), read_records(root / "val.json")
    assert len(train) >= 2000 and len(val) >= 256
    assert all(set(r) == {"image_file", "text"} and (root / r["image_file"]).is_file() for r in train[:50] + val[:50])
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert size < 5 * 2**20, f"data/shapes is {size / 2**20:.1f} MiB"


def test_captions_round_trip_and_the_classifier_reads_them():
    spec = ShapeSpec("cyan", "triangle", "bottom right", "large")
    assert parse_caption(spec.caption) == spec
    assert classify(render_shape(spec)) == spec.as_dict()
    with pytest.raises(ValueError, match="not a shapes caption"):
        parse_caption("a big orange star")


def test_foreground_is_the_shapes_pixels():
    """foreground: True on the drawn shape, False on the plain background (the mask classify reads)."""
    mask = foreground(render_shape(ShapeSpec("red", "square", "top left", "large")))
    h, w = mask.shape
    assert mask[: h // 2, : w // 2].any() and not mask[h // 2 + 2:, w // 2 + 2:].any()


def test_dataset_items(tmp_path):
    root = make_shapes_dataset(tmp_path, n_train=3, n_val=1, seed=0)
    ds = IPAdapterDataset(root, "train", image_processor=image_processor())
    item = ds[0]
    assert item["pixel_values"].shape == (3, 32, 32) and -1 <= item["pixel_values"].min() <= item["pixel_values"].max() <= 1
    assert item["clip_pixel_values"].shape == (3, 32, 32)
    assert item["text"] == read_records(root / "train.json")[0]["text"]


def test_dataset_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        IPAdapterDataset(tmp_path / "missing")
    (tmp_path / "train.json").write_text(json.dumps([{"image_file": "x.png"}]))
    with pytest.raises(ValueError, match="entry 0"):
        IPAdapterDataset(tmp_path)
    (tmp_path / "train.json").write_text(json.dumps([{"image_file": "x.png", "text": "a"}]))
    with pytest.raises(FileNotFoundError, match="x.png"):
        IPAdapterDataset(tmp_path)[0]


def _one_entry_dataset(root, image_bytes: bytes, name: str = "x.png"):
    """A folder whose train.json names one file holding `image_bytes`."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "images" / name).write_bytes(image_bytes)
    (root / "train.json").write_text(json.dumps([{"image_file": f"images/{name}", "text": "a"}]))
    return IPAdapterDataset(root)


def _png_bytes(image: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_a_file_that_is_not_an_image_names_the_file_and_the_entry(tmp_path):
    ds = _one_entry_dataset(tmp_path, b"this is a caption, not a picture")
    with pytest.raises(ValueError, match=r"entry 0 of .*train\.json: .*images/x\.png is not a readable image"):
        ds[0]


def test_a_truncated_image_names_the_file_and_the_entry(tmp_path):
    png = _png_bytes(render_shape(ShapeSpec("red", "circle", "top left", "small")))
    ds = _one_entry_dataset(tmp_path, png[: len(png) // 2])
    with pytest.raises(ValueError, match=r"entry 0 of .*x\.png is not a readable image"):
        ds[0]


def test_invalid_json_names_the_file_line_and_column(tmp_path):
    (tmp_path / "train.json").write_text('[\n  {"image_file": "a.png", "text": "a"},\n  {"image_file": "b.png" "text": "b"}\n]\n')
    with pytest.raises(ValueError, match=r"train\.json is not valid JSON: .* at line 3, column 26"):
        read_records(tmp_path / "train.json")
    with pytest.raises(ValueError, match="line 3, column 26"):
        IPAdapterDataset(tmp_path)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_load_as_white_not_black(tmp_path, mode):
    # left half: fully transparent (black underneath); right half: opaque black
    rgba = Image.new("RGBA", (4, 2), (0, 0, 0, 0))
    rgba.paste((0, 0, 0, 255), (2, 0, 4, 2))
    image = rgba.convert(mode) if mode != "P" else rgba.convert("P", palette=Image.Palette.ADAPTIVE)
    if mode == "P":  # a palette image marks one palette index as transparent
        image.info["transparency"] = image.getpixel((0, 0))
    path = tmp_path / f"{mode}.png"
    image.save(path)
    got = load_rgb(path)
    assert got.mode == "RGB"
    assert got.getpixel((0, 0)) == (255, 255, 255) and got.getpixel((3, 1)) == (0, 0, 0)


def test_half_transparent_pixels_are_blended_with_white_in_the_dataset(tmp_path):
    image = Image.new("RGBA", (32, 32), (200, 0, 0, 128))
    ds = _one_entry_dataset(tmp_path, _png_bytes(image))
    assert ds.image(0).getpixel((5, 5)) == pytest.approx((227, 127, 127), abs=1)
    assert torch.allclose(ds[0]["pixel_values"], to_unet_pixels(ds.image(0)))
    assert to_unet_pixels(Image.new("RGBA", (32, 32), (0, 0, 0, 0))).min() == 1.0  # white, not black


def test_toy_tokenizer_keeps_every_caption_word_whole():
    tok = build_tokenizer(caption_words())
    caption = "a small purple square in the bottom left"
    assert tok.tokenize(caption) == [w + "</w>" for w in caption.split()]
    ids = tok(caption, padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(ids) == 16 and ids[0] == tok.bos_token_id and ids[9] == tok.eos_token_id
    assert len(COLOURS) == 6 and len(SHAPES) == 3
