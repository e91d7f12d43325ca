"""The evaluation: the pixel classifier reads the data set right, the tables have the promised shape.

The classifier is checked on the shipped validation images; the tables run on a Stable
Diffusion and a scoring CLIP built here from the toy configs with random weights (2-3 prompts,
2 steps), so they test the mechanics, not the quality.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from ipa_lab.adapter import install_ip_adapter
from ipa_lab.checkpoint import checkpoint_state, save_ip_adapter
from ipa_lab.data import parse_caption, read_records
from ipa_lab.evaluate import (
    CONDITIONS,
    all_captions,
    evaluate,
    main,
    retrieval_top1,
    scale_sweep,
    text_to_image_scores,
    vae_psnr,
)
from ipa_lab.generate import load_adapter
from ipa_lab.metrics import agreement, classify
from ipa_lab.projection import ImageProjModel
from ipa_lab.runtime import quiet

quiet()
DATA = Path(__file__).resolve().parent.parent / "data" / "shapes"
ATTRS = ("colour", "shape", "position", "size")


def _toy_parts():
    from ipa_lab.pretrain import image_processor, toy_configs
    from ipa_lab.tokenizer import caption_words
    from ipa_lab.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(caption_words())
    return tokenizer, toy_configs(len(tokenizer)), image_processor()


@pytest.fixture(scope="module")
def _template():
    """The toy Stable Diffusion's architecture with seeded random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    from ipa_lab.pretrain import scheduler_config

    tokenizer, cfg, processor = _toy_parts()
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**cfg["vae"]).eval(), text_encoder=CLIPTextModel(CLIPTextConfig(**cfg["text"])).eval(),
        tokenizer=tokenizer, unet=UNet2DConditionModel(**cfg["unet"]).eval(),
        scheduler=DDIMScheduler.from_config(scheduler_config()), safety_checker=None, feature_extractor=processor,
        image_encoder=CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg["vision"])).eval(),
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe(_template):
    return copy.deepcopy(_template)


@pytest.fixture(scope="module")
def clip():
    """A scoring CLIP (both towers) of the toy's size, random weights: (model, tokenizer, processor)."""
    from transformers import CLIPConfig, CLIPModel

    tokenizer, cfg, processor = _toy_parts()
    torch.manual_seed(1)
    model = CLIPModel(CLIPConfig(text_config=cfg["text"], vision_config=cfg["vision"], projection_dim=32)).eval()
    return model, tokenizer, processor


@pytest.fixture
def checkpoint(pipe):
    torch.manual_seed(2)
    proj = ImageProjModel(cross_attention_dim=64, clip_embeddings_dim=32)
    modules = install_ip_adapter(copy.deepcopy(pipe.unet))
    with torch.no_grad():
        for p in modules.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return checkpoint_state(proj, modules)


@pytest.fixture(scope="module")
def records():
    return read_records(DATA / "val.json")


def test_classify_reads_the_validation_images_right(records):
    from PIL import Image

    predicted = [classify(Image.open(DATA / r["image_file"])) for r in records]
    scores = agreement(predicted, [parse_caption(r["text"]).as_dict() for r in records])
    assert min(scores.values()) >= 0.99, scores


def _check_scores(row, clip_keys=("clip_i", "clip_t")):
    for a in ATTRS:
        assert 0.0 <= row[a] <= 1.0
    for k in clip_keys:
        assert -1.0 <= row[k] <= 1.0


def test_evaluate_rows_and_ranges(pipe, checkpoint, records, clip):
    proj = load_adapter(pipe, checkpoint)
    rows = evaluate(pipe, proj, records, DATA, clip=clip, n=3, num_samples=2, steps=2, batch_size=4)
    assert [r["condition"] for r in rows] == list(CONDITIONS)
    for row in rows:
        assert list(row) == ["condition", *ATTRS, "clip_i", "clip_t"]
        _check_scores(row)
    # Without a scoring CLIP: agreement only. Through diffusers' loader: the same numbers.
    ours = evaluate(pipe, proj, records, DATA, n=2, steps=2)
    theirs = evaluate(pipe, None, records, DATA, n=2, steps=2, via="diffusers", checkpoint=checkpoint)
    assert list(ours[0]) == ["condition", *ATTRS]
    assert ours == theirs


def test_scale_sweep(pipe, checkpoint, records, clip):
    proj = load_adapter(pipe, checkpoint)
    rows = scale_sweep(pipe, proj, records, DATA, scales=(0.0, 1.0), clip=clip, n=2, steps=2)
    assert [r["scale"] for r in rows] == [0.0, 1.0]
    for row in rows:
        assert list(row) == ["scale", *ATTRS, "clip_i"]
        _check_scores(row, ("clip_i",))


def test_backbone_scores(pipe, checkpoint, records, clip):
    load_adapter(pipe, checkpoint)  # set aside for the text-to-image measurement
    t2i = text_to_image_scores(pipe, records, n=3, steps=2)
    assert list(t2i) == list(ATTRS) and all(0 <= v <= 1 for v in t2i.values())
    assert 0 < vae_psnr(pipe, records, DATA, n=4) < 100
    ret = retrieval_top1(clip, records, DATA, n=8)
    assert list(ret) == ["caption", *ATTRS] and all(0 <= v <= 1 for v in ret.values())
    assert len(all_captions()) == len(set(all_captions())) == 6 * 3 * 4 * 2


def test_command_line(pipe, checkpoint, tmp_path, capsys):
    pipe.save_pretrained(tmp_path / "sd")
    path = save_ip_adapter(tmp_path / "ip_adapter.safetensors", *_modules(pipe, checkpoint))
    common = ["--model", str(tmp_path / "sd"), "--data", str(DATA), "--clip", "none", "--n", "2", "--steps", "2"]
    main(common + ["--checkpoint", str(path)])
    out = capsys.readouterr().out.strip().splitlines()
    ours = json.loads(out[-1])
    assert list(ours) == ["colour", "shape", "position"]
    assert all(c in "\n".join(out) for c in CONDITIONS)
    main(common + ["--checkpoint", str(path), "--via", "diffusers"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == ours


def _modules(pipe, checkpoint):
    proj = ImageProjModel(cross_attention_dim=64, clip_embeddings_dim=32)
    proj.load_state_dict(checkpoint["image_proj"])
    modules = install_ip_adapter(copy.deepcopy(pipe.unet))
    modules.load_state_dict(checkpoint["ip_adapter"])
    return proj, modules


def test_command_line_backbone(pipe, clip, tmp_path, capsys):
    pipe.save_pretrained(tmp_path / "sd")
    for part in clip:  # model, tokenizer, processor
        part.save_pretrained(tmp_path / "clip")
    main(["--backbone", "--model", str(tmp_path / "sd"), "--data", str(DATA), "--clip", str(tmp_path / "clip"),
          "--n", "2", "--steps", "2"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"text_to_image_colour", "text_to_image_shape", "retrieval_colour", "vae_psnr_db",
            "seconds_32_images"} <= set(summary)


def test_figures():
    import random

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ipa_lab.data import random_spec, render_shape
    from ipa_lab.viz import image_grid, loss_curve, show_images

    rng = random.Random(0)
    images = [render_shape(random_spec(rng), rng) for _ in range(6)]
    grid = image_grid(images[:2], images[2:], row_labels=["first", "second"])
    assert len(grid.axes) == 2 * 3 and grid.axes[0].get_title() == "prompt"
    shown = show_images([images[0], torch.rand(3, 32, 32), torch.rand(3, 32, 32) * 2 - 1], titles=list("abc"), ncols=2)
    assert len(shown.axes) == 4
    curve = loss_curve(range(40), [1.0 / (s + 1) for s in range(40)])
    assert len(curve.axes[0].lines) == 2
    with pytest.raises(ValueError, match="split evenly"):
        image_grid(images[:2], images[:3])
    plt.close("all")
