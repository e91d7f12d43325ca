"""The shapes data set, the training-format Dataset and the toy tokenizer."""
from __future__ import annotations

import json

import pytest
import torch

from ipa_lab.data import (COLOURS, SHAPES, IPAdapterDataset, ShapeSpec, draw, make_shapes_dataset, parse_caption,
                          read_records)
from ipa_lab.evaluate import classify
from ipa_lab.pipeline import REPO_ROOT
from ipa_lab.pretrain import caption_words, image_processor
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
    assert classify(draw(spec)) == spec.as_dict()
    with pytest.raises(ValueError, match="not a shapes caption"):
        parse_caption("a big orange star")


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


def test_toy_tokenizer_keeps_every_caption_word_whole():
    tok = build_tokenizer(caption_words())
    caption = "a small purple square in the bottom left"
    assert tok.tokenize(caption) == [w + "</w>" for w in caption.split()]
    ids = tok(caption, padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(ids) == 16 and ids[0] == tok.bos_token_id and ids[9] == tok.eos_token_id
    assert len(COLOURS) == 6 and len(SHAPES) == 3
