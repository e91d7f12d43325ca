"""Converting the original trainer's checkpoints, as the pinned accelerate really writes them.

The original's training-time wrapper is rebuilt here (`IPAdapter`: unet, image_proj_model,
adapter_modules, in that order), its trainable weights perturbed, and saved with
`Accelerator(cpu=True).save_state(dir)` after `prepare`: once with safe serialization (the
default) and once with `safe_serialization=False`. The converted files must load strictly in
ipa_lab, hold exactly the wrapper's tensors, and sample the same images through ipa_lab's
processors as through diffusers' `load_ip_adapter`.
"""
from __future__ import annotations

import copy
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import perturb_
from ipa_lab.adapter import install_ip_adapter
from ipa_lab.checkpoint import CheckpointMismatchError, load_into, load_ip_adapter, read_metadata
from ipa_lab.convert import NEW_LAYOUT, OLD_LAYOUT, convert, main
from ipa_lab.data import random_spec, render_shape
from ipa_lab.diffusers_path import generate_with_diffusers
from ipa_lab.generate import generate, load_adapter
from ipa_lab.projection import ImageProjModel, Resampler

TOKENS = {"base": 4, "plus": 16}
CROSS = ["down_blocks.0.attentions.0.transformer_blocks.0.attn2", "down_blocks.1.attentions.0.transformer_blocks.0.attn2",
         "up_blocks.1.attentions.0.transformer_blocks.0.attn2", "up_blocks.1.attentions.1.transformer_blocks.0.attn2",
         "up_blocks.2.attentions.0.transformer_blocks.0.attn2", "up_blocks.2.attentions.1.transformer_blocks.0.attn2",
         "mid_block.attentions.0.transformer_blocks.0.attn2"]  # the toy UNet's cross-attention, processor order


class IPAdapter(torch.nn.Module):
    """The original's training-time wrapper (tutorial_train.py), attributes in its order."""

    def __init__(self, unet, image_proj_model, adapter_modules):
        super().__init__()
        self.unet = unet
        self.image_proj_model = image_proj_model
        self.adapter_modules = adapter_modules


def projection_for(pipe, variant: str) -> torch.nn.Module:
    """What the original trains: ImageProjModel, or tutorial_train_plus.py's Resampler (12 heads of 64)."""
    cross, vision = pipe.unet.config.cross_attention_dim, pipe.image_encoder.config
    if variant == "base":
        return ImageProjModel(cross, vision.projection_dim, TOKENS["base"])
    return Resampler(dim=cross, depth=4, dim_head=64, heads=12, num_queries=TOKENS["plus"],
                     embedding_dim=vision.hidden_size, output_dim=cross, ff_mult=4)


@pytest.fixture(scope="module")
def toy_pipe(toy_model):
    from ipa_lab.pipeline import load_pipeline

    return load_pipeline(toy_model)


@pytest.fixture(scope="module")
def trained(toy_pipe, tmp_path_factory):
    """{variant: (wrapper, {"safe": checkpoint dir, "bin": checkpoint dir})}, saved by accelerate itself."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # accelerate keeps one process-wide state and refuses cpu=True once another test made it use
    # a GPU: start from a clean state, and leave a clean one.
    AcceleratorState._reset_state(True)
    made = {}
    try:
        for seed, variant in enumerate(TOKENS, start=1):
            torch.manual_seed(seed)
            unet = copy.deepcopy(toy_pipe.unet)
            install_ip_adapter(unet, num_tokens=TOKENS[variant])
            wrapper = IPAdapter(unet, projection_for(toy_pipe, variant),
                                torch.nn.ModuleList(unet.attn_processors.values()))
            perturb_(wrapper.image_proj_model, seed=seed)
            perturb_(wrapper.adapter_modules, seed=seed + 10)  # away from the to_k / to_v copies
            accelerator = Accelerator(cpu=True)
            prepared = accelerator.prepare(wrapper)
            dirs = {"safe": tmp_path_factory.mktemp(f"{variant}-safe") / "checkpoint-10",
                    "bin": tmp_path_factory.mktemp(f"{variant}-bin") / "checkpoint-10"}
            accelerator.save_state(str(dirs["safe"]))
            accelerator.save_state(str(dirs["bin"]), safe_serialization=False)
            made[variant] = (accelerator.unwrap_model(prepared), dirs)
    finally:
        AcceleratorState._reset_state(True)
    return made


def file_keys(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    return list(torch.load(path, map_location="cpu", weights_only=True))


# ---------------------------------------------------------------------------------------------
# What today's accelerate writes (documents the two layouts the converter reads)
# ---------------------------------------------------------------------------------------------
def test_accelerate_layouts(trained):
    wrapper, dirs = trained["base"]
    assert {"model.safetensors", "random_states_0.pkl"} <= set(os.listdir(dirs["safe"]))
    assert "pytorch_model.bin" not in os.listdir(dirs["safe"])
    safe = file_keys(dirs["safe"] / "model.safetensors")
    # Safe serialization drops every adapter_modules.* key as a duplicate of a UNet tensor ...
    assert not [k for k in safe if k.startswith("adapter_modules.")]
    assert sorted(k for k in safe if "_ip." in k) == sorted(
        f"unet.{layer}.processor.to_{kv}_ip.weight" for layer in CROSS for kv in "kv")
    assert {k for k in safe if k.startswith("image_proj_model.")} == {
        f"image_proj_model.{k}" for k in wrapper.image_proj_model.state_dict()}
    assert len([k for k in safe if k.startswith("unet.")]) > 100  # ... beside the whole UNet

    assert "pytorch_model.bin" in os.listdir(dirs["bin"])
    old = file_keys(dirs["bin"] / "pytorch_model.bin")
    adapter = sorted(k for k in old if k.startswith("adapter_modules."))
    assert adapter == sorted(f"adapter_modules.{i}.to_{kv}_ip.weight" for i in range(1, 14, 2) for kv in "kv")
    assert {k for k in safe if "_ip." in k} <= set(old)  # torch.save keeps both names


# ---------------------------------------------------------------------------------------------
# Both layouts, both variants, both file formats: strict load, the wrapper's very tensors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
@pytest.mark.parametrize("saved", ["safe", "bin"])
@pytest.mark.parametrize("variant", ["base", "plus"])
def test_converted_file_holds_the_wrapper_weights(trained, toy_pipe, toy_model, tmp_path, variant, saved, suffix):
    wrapper, dirs = trained[variant]
    dst = tmp_path / f"ip_adapter{suffix}"
    done = convert(dirs[saved], dst, model=toy_model)
    assert done.layout == (NEW_LAYOUT if saved == "safe" else OLD_LAYOUT)
    assert (done.variant, done.num_tokens, done.layers) == (variant, TOKENS[variant], 7)
    trainable = [*wrapper.image_proj_model.parameters(), *wrapper.adapter_modules.parameters()]
    assert done.parameters == sum(p.numel() for p in trainable)
    assert done.source.name == {"safe": "model.safetensors", "bin": "pytorch_model.bin"}[saved]

    state = load_ip_adapter(dst)
    for part, module in (("image_proj", wrapper.image_proj_model), ("ip_adapter", wrapper.adapter_modules)):
        expected = module.state_dict()
        assert sorted(state[part]) == sorted(expected)
        assert all(torch.equal(state[part][k], v) for k, v in expected.items())

    # strictly into modules built the usual way
    fresh_unet = copy.deepcopy(toy_pipe.unet)
    adapter = install_ip_adapter(fresh_unet, num_tokens=TOKENS[variant])
    projection = projection_for(toy_pipe, variant)
    load_into(state, projection, adapter)
    assert all(torch.equal(a, b) for a, b in zip(adapter.state_dict().values(), wrapper.adapter_modules.state_dict().values()))

    metadata = read_metadata(dst)
    if suffix == ".bin":
        assert metadata == {}  # a plain nested dict of tensors, as the original's torch.load expects
        assert type(torch.load(dst, weights_only=True)["ip_adapter"]) is dict
    else:
        assert metadata["ipa_lab.variant"] == variant and metadata["ipa_lab.num_tokens"] == str(TOKENS[variant])
        assert (metadata.get("ipa_lab.heads"), metadata.get("ipa_lab.dim_head")) == (
            ("12", "64") if variant == "plus" else (None, None))


@pytest.mark.parametrize("variant, saved, suffix", [("base", "safe", ".safetensors"), ("plus", "bin", ".bin"),
                                                    ("plus", "safe", ".safetensors")])
def test_ipa_lab_and_diffusers_sample_the_same_images(trained, toy_pipe, toy_model, tmp_path, variant, saved, suffix):
    dst = tmp_path / f"ip_adapter{suffix}"
    convert(trained[variant][1][saved], dst, model=toy_model)
    pipe = copy.deepcopy(toy_pipe)
    rng = random.Random(0)
    images = [render_shape(random_spec(rng), rng) for _ in range(2)]
    args = dict(prompt="a red circle", num_samples=1, seed=5, num_inference_steps=2, output_type="np")

    projection = load_adapter(pipe, dst)  # ipa_lab's processors and projection
    assert type(projection) is type(trained[variant][0].image_proj_model)
    ours = generate(pipe, projection, images, **args)
    theirs = generate_with_diffusers(pipe, load_ip_adapter(dst), images, **args)  # pipe.load_ip_adapter(dict)
    assert np.abs(ours - theirs).max() <= 1e-4
    # the image prompt matters, so agreeing proves something
    assert np.abs(ours - generate(pipe, projection, images, scale=0.0, **args)).max() > 1e-3


# ---------------------------------------------------------------------------------------------
# Where the weights are found: folder with both files, a file itself, DDP prefixes, config names
# ---------------------------------------------------------------------------------------------
def test_a_folder_with_both_files_uses_safetensors_and_says_so(trained, toy_model, tmp_path):
    wrapper, dirs = trained["base"]
    both = tmp_path / "checkpoint-10"
    both.mkdir()
    for source in (dirs["safe"] / "model.safetensors", dirs["bin"] / "pytorch_model.bin"):
        (both / source.name).write_bytes(source.read_bytes())
    done = convert(both, tmp_path / "ip.safetensors", model=toy_model)
    assert done.source == both / "model.safetensors" and done.unused == ("pytorch_model.bin",)
    assert "not used: pytorch_model.bin" in str(done)
    # a weights file itself is accepted too
    assert convert(dirs["bin"] / "pytorch_model.bin", tmp_path / "ip.bin", model=toy_model).layout == OLD_LAYOUT


def test_ddp_prefixes_and_a_unet_config_name(trained, tmp_path):
    """Multi-GPU: save_state does not unwrap DistributedDataParallel, so every key starts with 'module.'."""
    wrapper, dirs = trained["plus"]
    tensors = load_file(str(dirs["safe"] / "model.safetensors"))
    ddp = tmp_path / "model.safetensors"
    save_file({f"module.{k}": v for k, v in tensors.items()}, str(ddp))
    done = convert(ddp, tmp_path / "ip.safetensors", model="toy_unet")  # a config from ipa_lab/configs
    assert (done.layout, done.layers) == (NEW_LAYOUT, 7)
    state = load_ip_adapter(tmp_path / "ip.safetensors")
    assert torch.equal(state["image_proj"]["latents"], wrapper.image_proj_model.latents)


def test_command_line(trained, toy_model, tmp_path, capsys):
    dst = tmp_path / "ip.safetensors"
    assert main([str(trained["base"][1]["safe"]), str(dst), "--model", toy_model]) == 0
    out = capsys.readouterr().out
    assert f"layout  {NEW_LAYOUT} keys" in out and "IP-Adapter base, 4 image tokens, 7 adapter layers" in out
    with pytest.raises(SystemExit) as info:
        main([str(trained["base"][1]["safe"]), str(dst), "--model", toy_model])
    assert info.value.code == 1 and "exists; pass --overwrite" in capsys.readouterr().err
    assert main([str(trained["plus"][1]["bin"]), str(dst), "--model", toy_model, "--overwrite"]) == 0
    assert read_metadata(dst)["ipa_lab.variant"] == "plus"


def test_python_dash_m(trained, toy_model, tmp_path):
    dst = tmp_path / "ip.bin"
    run = subprocess.run([sys.executable, "-m", "ipa_lab.convert", str(trained["base"][1]["bin"]), str(dst),
                          "--model", toy_model], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    assert "7 adapter layers" in run.stdout and dst.is_file()


# ---------------------------------------------------------------------------------------------
# Refusals: named, and nothing written
# ---------------------------------------------------------------------------------------------
def _rewritten(src: Path, dst_dir: Path, change) -> Path:
    """A copy of a checkpoint's weights file with `change(tensors)` applied."""
    dst_dir.mkdir()
    if src.suffix == ".safetensors":
        tensors = load_file(str(src))
        change(tensors)
        save_file(tensors, str(dst_dir / src.name))
    else:
        tensors = torch.load(src, weights_only=True)
        change(tensors)
        torch.save(tensors, dst_dir / src.name)
    return dst_dir


@pytest.mark.parametrize("saved, key", [
    ("safe", "unet.up_blocks.1.attentions.1.transformer_blocks.0.attn2.processor.to_v_ip.weight"),
    ("bin", "adapter_modules.7.to_v_ip.weight")])
def test_a_missing_layer_is_named(trained, toy_model, tmp_path, saved, key):
    src = _rewritten(trained["base"][1][saved] / ("model.safetensors" if saved == "safe" else "pytorch_model.bin"),
                     tmp_path / "checkpoint-10", lambda t: t.pop(key))
    with pytest.raises(CheckpointMismatchError, match=r"missing 7\.to_v_ip\.weight \(layer up_blocks\.1\.attentions\.1\."
                                                      r"transformer_blocks\.0\.attn2\)"):
        convert(src, tmp_path / "ip.safetensors", model=toy_model)
    assert not (tmp_path / "ip.safetensors").exists()


def test_a_wrong_shape_is_named(trained, toy_model, tmp_path):
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_k_ip.weight"
    src = _rewritten(trained["base"][1]["safe"] / "model.safetensors", tmp_path / "checkpoint-10",
                     lambda t: t.__setitem__(key, torch.zeros(64, 64)))
    with pytest.raises(CheckpointMismatchError) as info:
        convert(src, tmp_path / "ip.safetensors", model=toy_model)
    assert ("3.to_k_ip.weight (layer down_blocks.1.attentions.0.transformer_blocks.0.attn2) has shape (64, 64), "
            "expected (128, 64) = (hidden_size of down_blocks.1, cross_attention_dim)") in str(info.value)
    assert not (tmp_path / "ip.safetensors").exists()


def test_the_wrong_base_model_is_refused(trained, tmp_path):
    with pytest.raises(CheckpointMismatchError) as info:
        convert(trained["base"][1]["safe"], tmp_path / "ip.safetensors", model="sd15_unet")
    message = str(info.value)
    assert "image_proj_model makes 64-wide tokens, but the UNet's cross_attention_dim is 768" in message
    assert "1.to_k_ip.weight (layer down_blocks.0.attentions.0.transformer_blocks.0.attn2) has shape (64, 64), " \
           "expected (320, 768)" in message
    assert "missing 3.to_k_ip.weight (layer down_blocks.0.attentions.1.transformer_blocks.0.attn2)" in message


def test_files_of_neither_layout_are_refused(trained, toy_model, tmp_path):
    unet_only = tmp_path / "unet.safetensors"
    save_file({"unet.conv_in.weight": torch.zeros(2, 2)}, str(unet_only))
    with pytest.raises(CheckpointMismatchError, match=r"no image_proj_model\.\* keys: this is not a checkpoint of the "
                                                      r"original's IPAdapter wrapper.*unet\.conv_in\.weight"):
        convert(unet_only, tmp_path / "ip.safetensors", model=toy_model)

    no_adapter = tmp_path / "proj-only.bin"
    torch.save({"image_proj_model.proj.weight": torch.zeros(256, 32), "unet.conv_in.weight": torch.zeros(2)}, no_adapter)
    with pytest.raises(CheckpointMismatchError, match=r"image_proj_model\.\* keys but no adapter weights.*"
                                                      r"adapter_modules\.<i>\.to_k_ip\.weight"):
        convert(no_adapter, tmp_path / "ip.safetensors", model=toy_model)

    ours = tmp_path / "already.safetensors"
    convert(trained["base"][1]["safe"], ours, model=toy_model)
    with pytest.raises(CheckpointMismatchError, match="already holds image_proj.* / ip_adapter.* keys"):
        convert(ours, tmp_path / "again.safetensors", model=toy_model)

    empty = tmp_path / "checkpoint-3"
    empty.mkdir()
    (empty / "optimizer.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"holds no model\.safetensors or pytorch_model\.bin.*optimizer\.bin"):
        convert(empty, tmp_path / "ip.safetensors", model=toy_model)
    truncated = tmp_path / "model.safetensors"
    truncated.write_bytes((trained["base"][1]["safe"] / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"cannot read the training checkpoint .*truncated"):
        convert(truncated, tmp_path / "ip.safetensors", model=toy_model)


def test_an_existing_destination_is_kept(trained, toy_model, tmp_path):
    dst = tmp_path / "ip.safetensors"
    dst.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="ip.safetensors exists; pass --overwrite"):
        convert(trained["base"][1]["safe"], dst, model=toy_model)
    assert dst.read_bytes() == b"precious"
    convert(trained["base"][1]["safe"], dst, model=toy_model, overwrite=True)
    assert load_ip_adapter(dst)["ip_adapter"].keys() == trained["base"][0].adapter_modules.state_dict().keys()
    assert os.listdir(tmp_path) == ["ip.safetensors"]  # the atomic write left no temp file
    with pytest.raises(ValueError, match=r"must end in \.safetensors or \.bin"):
        convert(trained["base"][1]["safe"], tmp_path / "ip.pt", model=toy_model)
