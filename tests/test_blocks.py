"""Per-block scales (InstantStyle) and adapters in some blocks only (notebook 9).

`generate.block_scales` expands diffusers' `set_ip_adapter_scale` format to one scale per attention
layer; here it is checked against diffusers' own expansion, and our sampling with a dict against
diffusers' sampling with the same dict (same images), on the shipped toy model and base adapter.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ipa_lab.blocks import SHIPPED, layer_sets, scale_dict, write_csv, read_csv
from ipa_lab.checkpoint import save_ip_adapter
from ipa_lab.diffusers_path import generate_with_diffusers
from ipa_lab.generate import attention_blocks, block_scales, generate, keep_image_branch, load_adapter, set_scale
from ipa_lab.pipeline import TOY_SD, load_pipeline
from ipa_lab.runtime import quiet

quiet()
TOY_LAYERS = ["down_blocks.0.attentions.0", "down_blocks.1.attentions.0", "up_blocks.1.attentions.0",
              "up_blocks.1.attentions.1", "up_blocks.2.attentions.0", "up_blocks.2.attentions.1",
              "mid_block.attentions.0"]
SPECS = [1.0, 0.5, {"up": {"block_1": [0.0, 1.0]}}, {"down": {"block_1": 1.0}, "mid": 0.5, "up": {"block_2": [1.0]}},
         {"down": 1.0}, {"mid": [1.0]}, {"up": 0.7, "down": {"block_0": 0.2}}, {}]


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(str(TOY_SD))


def test_the_toy_has_seven_attention_layers_in_five_blocks(toy_unet):
    assert attention_blocks(toy_unet) == {"down.block_0": 1, "down.block_1": 1, "up.block_1": 2, "up.block_2": 2,
                                          "mid": 1}
    assert sorted(block_scales(toy_unet, 1.0)) == sorted(TOY_LAYERS)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_block_scales_is_diffusers_expansion(toy_unet, spec):
    from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales

    theirs = _maybe_expand_lora_scales(toy_unet, [spec], default_scale=0.0)[0]
    ours = block_scales(toy_unet, spec)
    if not isinstance(theirs, dict):
        theirs = {name: theirs for name in ours}
    assert ours == pytest.approx(theirs)


def test_set_scale_sets_what_diffusers_sets(pipe):
    """The same dict through pipe.set_ip_adapter_scale and through our set_scale, on diffusers'
    processors (two adapters loaded: a list of specs, one per adapter)."""
    from ipa_lab.checkpoint import read_checkpoint

    state = read_checkpoint(SHIPPED)
    saved = pipe.unet.attn_processors
    encoder, features = pipe.image_encoder, pipe.feature_extractor
    pipe.load_ip_adapter([state, state], subfolder=["", ""], weight_name=["", ""], image_encoder_folder=None)
    try:
        for spec in ([{"up": {"block_1": [0.0, 1.0]}}, 0.5], [{"down": 1.0, "mid": 0.3}, {"up": 1.0}], [1.0, 0.0]):
            pipe.set_ip_adapter_scale(spec)
            theirs = {n: list(p.scale) for n, p in pipe.unet.attn_processors.items() if hasattr(p, "to_k_ip")}
            pipe.set_ip_adapter_scale([9.0, 9.0])
            assert set_scale(pipe.unet, spec) == 7
            ours = {n: list(p.scale) for n, p in pipe.unet.attn_processors.items() if hasattr(p, "to_k_ip")}
            assert ours == theirs
        # diffusers wants one spec per adapter ("Cannot assign 1 scale_configs to 2"); ours also takes one for all.
        set_scale(pipe.unet, {"mid": 1.0})
        assert [p.scale for n, p in pipe.unet.attn_processors.items() if n.startswith("mid_block") and
                hasattr(p, "to_k_ip")] == [[1.0, 1.0]]
        with pytest.raises(ValueError, match="3 scale specs for 2 loaded adapter"):
            set_scale(pipe.unet, [1.0, 1.0, 1.0])
    finally:
        pipe.unload_ip_adapter()
        pipe.register_modules(image_encoder=encoder, feature_extractor=features)
        pipe.unet.set_attn_processor(saved)


def test_same_images_as_diffusers_for_the_same_dict(pipe):
    from ipa_lab.data import load_rgb, read_records
    from ipa_lab.blocks import DATA

    records = read_records(DATA / "val.json")[:2]
    images = [load_rgb(DATA / r["image_file"]) for r in records]
    proj = load_adapter(pipe, SHIPPED)
    spec = {"down": {"block_1": 1.0}, "up": {"block_1": [0.0, 1.0]}}
    args = dict(prompt="", num_samples=1, seed=5, num_inference_steps=4, output_type="np", scale=spec)
    ours = generate(pipe, proj, images, **args)
    theirs = generate_with_diffusers(pipe, SHIPPED, images, **args)
    assert np.abs(ours - theirs).max() <= 1e-4
    # The dict matters: all on, and all off, give other images.
    assert np.abs(ours - generate(pipe, proj, images, **{**args, "scale": 1.0})).max() > 1e-2
    assert np.abs(ours - generate(pipe, proj, images, **{**args, "scale": 0.0})).max() > 1e-2
    # A dict naming every layer at 1 is the float 1, bit for bit.
    every = scale_dict(pipe.unet, ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.1", "up_blocks.2"])
    assert np.array_equal(generate(pipe, proj, images, **{**args, "scale": every}),
                          generate(pipe, proj, images, **{**args, "scale": 1.0}))


@pytest.mark.parametrize("spec, message", [
    ({"middle": 1.0}, "unknown key.*'middle'.*'down', 'mid' and 'up'"),
    ({"down": {"block_2": 1.0}}, "'down' has no block 'block_2' with attention.*'block_0', 'block_1'"),
    ({"up": {"block_0": 1.0}}, "'up' has no block 'block_0'"),
    ({"up": {"block_1": [1.0, 0.0, 0.0]}}, "up.block_1 has 2 attention layer.*expected 2 scales.*got 3"),
    ({"mid": [1.0, 1.0]}, "'mid' has one attention: expected 1 scale, got 2"),
    ({"up": {"block_1": "high"}}, "must be a number, got 'high'"),
])
def test_bad_specs_are_named_before_anything_changes(toy_unet, spec, message):
    from ipa_lab.adapter import install_ip_adapter

    install_ip_adapter(toy_unet, scale=0.25)
    with pytest.raises((ValueError, TypeError), match=message):
        set_scale(toy_unet, spec)
    assert {p.scale for p in toy_unet.attn_processors.values() if hasattr(p, "to_k_ip")} == {0.25}


def test_scale_dict_is_the_inverse_of_block_scales(toy_unet):
    for name, kind, layers in layer_sets(toy_unet):
        if not layers:
            continue
        on = {n for n, v in block_scales(toy_unet, scale_dict(toy_unet, layers)).items() if v == 1.0}
        assert on == {n for n in TOY_LAYERS if any(n == w or n.startswith(w + ".") for w in layers)}
    assert scale_dict(toy_unet, ["up_blocks.1.attentions.1", "mid_block"]) == {"mid": 1.0, "up": {"block_1": [0.0, 1.0]}}
    with pytest.raises(ValueError, match="no attention layer or block.*up_blocks.0"):
        scale_dict(toy_unet, ["up_blocks.0"])


def test_a_partial_adapter_saves_in_the_original_format_and_loads_back(pipe, tmp_path):
    """Keep the image branch in up_blocks.1 only: its two layers keep their keys (7 and 9 in
    attn_processors order), the file holds nothing else, and partial=True loads it strictly."""
    from ipa_lab.checkpoint import read_checkpoint

    proj = load_adapter(pipe, SHIPPED)
    modules = keep_image_branch(pipe.unet, ["up_blocks.1"])
    save_ip_adapter(tmp_path / "up1.safetensors", proj, modules)
    state = read_checkpoint(tmp_path / "up1.safetensors")
    names = list(pipe.unet.attn_processors)
    assert sorted({k.split(".")[0] for k in state["ip_adapter"]}, key=int) == [
        str(i) for i, n in enumerate(names) if n.startswith("up_blocks.1.") and "attn2" in n]
    with pytest.raises(Exception, match="missing"):
        load_adapter(pipe, state)
    load_adapter(pipe, state, partial=True)
    kept = [n for n, p in pipe.unet.attn_processors.items() if hasattr(p, "to_k_ip")]
    assert len(kept) == 2 and all(n.startswith("up_blocks.1.") for n in kept)
    with pytest.raises(ValueError, match="no IP-Adapter processor under"):
        keep_image_branch(pipe.unet, ["up_blocks.7"])


def test_csv_round_trip(tmp_path):
    rows = [{"layers": "mid_block", "colour": 0.123456, "n": 3, "text_colour": None}]
    back = read_csv(write_csv(tmp_path / "x.csv", rows))
    assert back == [{"layers": "mid_block", "colour": 0.1235, "n": 3, "text_colour": None}]
