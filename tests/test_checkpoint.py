"""Checkpoints in the original format: round trips, diffusers' loader, and refusals."""
import copy
import os
import pickle

import pytest
import torch
from safetensors import safe_open

from conftest import CROSS_DIM, EMBED_DIM, HIDDEN_DIM, make_toy_unet, perturb_
from ipa_lab import ImageProjModel, IPAttnProcessor, Resampler, install_ip_adapter, load_ip_adapter, save_ip_adapter
from ipa_lab.checkpoint import CheckpointMismatchError, load_into

PLUS_TOKENS = 6


def make_projection(variant: str):
    torch.manual_seed(0)
    if variant == "base":
        return perturb_(ImageProjModel(CROSS_DIM, EMBED_DIM, 4)).eval()
    return perturb_(Resampler(dim=CROSS_DIM, depth=4, dim_head=64, heads=2, num_queries=PLUS_TOKENS,
                              embedding_dim=HIDDEN_DIM, output_dim=CROSS_DIM)).eval()


def trained_adapter(unet, variant: str):
    """Install on `unet` and move the weights away from their to_k/to_v copies, as training would."""
    tokens = 4 if variant == "base" else PLUS_TOKENS
    return perturb_(install_ip_adapter(unet, num_tokens=tokens), seed=9)


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
@pytest.mark.parametrize("variant", ["base", "plus"])
def test_round_trip(toy_unet, tmp_path, suffix, variant):
    proj, adapter = make_projection(variant), trained_adapter(toy_unet, variant)
    path = save_ip_adapter(tmp_path / f"ip{suffix}", proj, adapter)
    assert os.listdir(tmp_path) == [path.name]  # no temp file left behind
    state = load_ip_adapter(path)
    assert set(state) == {"image_proj", "ip_adapter"}
    assert sorted(state["ip_adapter"]) == sorted(adapter.state_dict())
    assert all(int(k.split(".")[0]) % 2 == 1 for k in state["ip_adapter"])  # odd indices only

    fresh_proj = make_projection(variant)
    torch.nn.init.zeros_(next(fresh_proj.parameters()))
    fresh_unet = copy.deepcopy(toy_unet)
    fresh_unet.set_attn_processor({n: type(p)() if not isinstance(p, IPAttnProcessor) else IPAttnProcessor(
        p.hidden_size, p.cross_attention_dim, num_tokens=p.num_tokens) for n, p in fresh_unet.attn_processors.items()})
    fresh_adapter = torch.nn.ModuleList(fresh_unet.attn_processors.values())
    load_into(state, fresh_proj, fresh_adapter)
    for a, b in [(proj, fresh_proj), (adapter, fresh_adapter)]:
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_file_layouts(toy_unet, tmp_path):
    proj, adapter = make_projection("base"), trained_adapter(toy_unet, "base")
    save_ip_adapter(tmp_path / "ip.safetensors", proj, adapter)
    with safe_open(tmp_path / "ip.safetensors", framework="pt") as f:
        keys = set(f.keys())
    assert {"image_proj.proj.weight", "image_proj.norm.bias", "ip_adapter.1.to_k_ip.weight"} <= keys
    assert all(k.startswith(("image_proj.", "ip_adapter.")) for k in keys)
    save_ip_adapter(tmp_path / "ip.bin", proj, adapter)
    nested = torch.load(tmp_path / "ip.bin", weights_only=True)
    assert set(nested) == {"image_proj", "ip_adapter"} and "1.to_v_ip.weight" in nested["ip_adapter"]


def test_write_is_atomic(toy_unet, tmp_path, monkeypatch):
    proj, adapter = make_projection("base"), trained_adapter(toy_unet, "base")
    path = save_ip_adapter(tmp_path / "ip.bin", proj, adapter)
    before = path.read_bytes()

    def crash(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_ip_adapter(path, proj, adapter)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ip.bin"]


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_saved_file_has_the_usual_permissions(toy_unet, tmp_path, suffix):
    """The temp file behind the atomic write is private; the checkpoint must not stay so."""
    old = os.umask(0o022)
    try:
        path = save_ip_adapter(tmp_path / f"ip{suffix}", make_projection("base"), trained_adapter(toy_unet, "base"))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def denoise_ours(unet, parts, prompt_embeds, negative_embeds, image_tokens, negative_tokens, latents,
                 steps=2, guidance=7.5):
    """The pipeline's loop, written out, with image tokens appended to the text tokens."""
    scheduler = copy.deepcopy(parts["scheduler"])
    scheduler.set_timesteps(steps)
    context = torch.cat([torch.cat([negative_embeds, negative_tokens], 1), torch.cat([prompt_embeds, image_tokens], 1)])
    latents = latents * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            uncond, cond = unet(model_input, t, encoder_hidden_states=context).sample.chunk(2)
            latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents, eta=0.0).prev_sample
    return latents


@pytest.mark.parametrize("variant, suffix, as_dict", [
    ("base", ".safetensors", False), ("base", ".bin", False), ("plus", ".safetensors", False),
    ("plus", ".bin", False), ("base", ".safetensors", True)])
def test_diffusers_loads_our_checkpoint_and_agrees(tiny_pipeline, tiny_sd_parts, tmp_path, variant, suffix, as_dict):
    pipe = tiny_pipeline
    ours_unet = copy.deepcopy(pipe.unet)
    proj, adapter = make_projection(variant), trained_adapter(ours_unet, variant)
    path = save_ip_adapter(tmp_path / f"ip-adapter{suffix}", proj, adapter)
    if as_dict:
        pipe.load_ip_adapter(load_ip_adapter(path), subfolder="", weight_name="unused", image_encoder_folder=None)
    else:
        pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name=path.name, image_encoder_folder=None,
                             local_files_only=True)
    expected = {"base": "ImageProjection", "plus": "IPAdapterPlusImageProjection"}[variant]
    assert type(pipe.unet.encoder_hid_proj.image_projection_layers[0]).__name__ == expected

    gen = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 4, 8, 8, generator=gen)
    shape = (1, 1, EMBED_DIM) if variant == "base" else (1, 1, 5, HIDDEN_DIM)  # Plus: hidden states
    image, negative = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    theirs = pipe("a red cat", num_inference_steps=2, guidance_scale=7.5, latents=latents.clone(),
                  ip_adapter_image_embeds=[torch.cat([negative, image])], output_type="latent").images

    prompt_embeds, negative_embeds = pipe.encode_prompt("a red cat", "cpu", 1, True)
    with torch.no_grad():
        tokens, negative_tokens = proj(image[:, 0]), proj(negative[:, 0])
    ours = denoise_ours(ours_unet, tiny_sd_parts, prompt_embeds, negative_embeds, tokens, negative_tokens, latents)
    assert (ours - theirs).abs().max().item() <= 1e-4
    # and the image prompt matters: another image gives other latents
    other = denoise_ours(ours_unet, tiny_sd_parts, prompt_embeds, negative_embeds, negative_tokens, negative_tokens, latents)
    assert (other - theirs).abs().max().item() > 1e-3


# ---------------------------------------------------------------------------------------------
# Refusals, each with a message that says what is wrong
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def saved(toy_unet, tmp_path):
    proj, adapter = make_projection("base"), trained_adapter(toy_unet, "base")
    return save_ip_adapter(tmp_path / "ip.safetensors", proj, adapter), proj, adapter


def test_missing_and_unexpected_keys_are_named(saved):
    path, proj, adapter = saved
    state = load_ip_adapter(path)
    del state["ip_adapter"]["3.to_v_ip.weight"]
    state["image_proj"]["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError) as info:
        load_into(state, proj, adapter)
    message = str(info.value)
    assert "ip_adapter: missing keys" in message and "3.to_v_ip.weight" in message
    assert "image_proj: unexpected keys" in message and "extra.weight" in message


def test_mis_shaped_keys_show_both_shapes(saved):
    path, proj, adapter = saved
    state = load_ip_adapter(path)
    state["image_proj"]["proj.weight"] = torch.zeros(256, 16)
    with pytest.raises(CheckpointMismatchError, match=r"proj.weight has shape \(256, 16\) in the checkpoint, but \(256, 32\) in the model"):
        load_into(state, proj, adapter)


def test_missing_part_is_named(saved):
    path, proj, adapter = saved
    with pytest.raises(CheckpointMismatchError, match="no 'ip_adapter' part"):
        load_into({"image_proj": {}}, proj, adapter)


class _RunsCode:
    """A pickle that would call a function on load (here the harmless `print`)."""

    def __reduce__(self):
        return (print, ("this must never be printed",))


def test_pickled_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.bin"
    with open(path, "wb") as f:
        pickle.dump({"image_proj": {}, "ip_adapter": {}, "payload": _RunsCode()}, f, protocol=2)
    with pytest.raises(ValueError, match="refusing to load.*could run arbitrary code"):
        load_ip_adapter(path)
    assert "never be printed" not in capsys.readouterr().out


def test_unknown_suffix_is_refused(saved, tmp_path):
    _, proj, adapter = saved
    with pytest.raises(ValueError, match=r"unknown checkpoint format '.pt'.*\.safetensors, \.bin"):
        save_ip_adapter(tmp_path / "ip.pt", proj, adapter)
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        load_ip_adapter(tmp_path / "ip.ckpt")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no IP-Adapter checkpoint at .*nothing.safetensors"):
        load_ip_adapter(tmp_path / "nothing.safetensors")


# ---------------------------------------------------------------------------------------------
# Files that are not (whole) checkpoints: named, with what is wrong, not a bare library error
# ---------------------------------------------------------------------------------------------
def _damaged(saved_path, kind: str) -> bytes:
    data = saved_path.read_bytes()
    return {"empty": b"", "truncated": data[: len(data) // 2], "cut short": data[:-7], "a few bytes": data[:5],
            "random bytes": bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).tolist()),
            "a Git LFS pointer": b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n"}[kind]


DAMAGE = {  # what the message must say about each kind of damage, per format
    ".safetensors": {"empty": "empty", "truncated": "truncated", "cut short": "truncated", "a few bytes": "truncated",
                     "random bytes": "not a safetensors file", "a Git LFS pointer": "Git LFS pointer"},
    ".bin": {"empty": "empty", "truncated": "truncated", "cut short": "truncated", "a few bytes": "truncated",
             "random bytes": "not a torch.save file", "a Git LFS pointer": "Git LFS pointer"},
}


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
@pytest.mark.parametrize("kind", ["empty", "truncated", "cut short", "a few bytes", "random bytes", "a Git LFS pointer"])
def test_a_damaged_file_is_named_with_what_is_wrong(toy_unet, tmp_path, suffix, kind):
    whole = save_ip_adapter(tmp_path / f"whole{suffix}", make_projection("base"), trained_adapter(toy_unet, "base"))
    path = tmp_path / f"damaged{suffix}"
    path.write_bytes(_damaged(whole, kind))
    with pytest.raises(ValueError) as info:
        load_ip_adapter(path)
    message = str(info.value)
    assert message.startswith(f"cannot read the IP-Adapter checkpoint {str(path)!r}: "), message
    assert DAMAGE[suffix][kind] in message, message
    assert "could run arbitrary code" not in message  # damage is not a security refusal


def test_read_checkpoint_takes_a_path_the_nested_dict_or_flat_keys(saved):
    from ipa_lab.checkpoint import read_checkpoint

    path, proj, adapter = saved
    nested = read_checkpoint(path)
    assert nested.keys() == {"image_proj", "ip_adapter"}
    flat = {f"{part}.{k}": v for part, tensors in nested.items() for k, v in tensors.items()}
    for form in (str(path), nested, flat):
        again = read_checkpoint(form)
        assert {p: sorted(t) for p, t in again.items()} == {p: sorted(t) for p, t in nested.items()}
    with pytest.raises(CheckpointMismatchError, match="belong to neither part"):
        read_checkpoint({**flat, "unet.conv.weight": torch.zeros(1)})
    with pytest.raises(CheckpointMismatchError, match="no 'ip_adapter' part"):
        read_checkpoint({k: v for k, v in flat.items() if k.startswith("image_proj.")})
    with pytest.raises(TypeError, match="expected a checkpoint path or dict, got int"):
        read_checkpoint(3)


def test_a_file_with_only_one_part_is_refused_when_read(tmp_path):
    # Before: read as {"ip_adapter": {}}, and only a later strict load (if any) noticed.
    from safetensors.torch import save_file

    path = tmp_path / "half.safetensors"
    save_file({"image_proj.proj.weight": torch.zeros(4, 2)}, str(path))
    with pytest.raises(CheckpointMismatchError, match=r"half\.safetensors.*no 'ip_adapter' part"):
        load_ip_adapter(path)


# ---------------------------------------------------------------------------------------------
# Token counts: nothing in the weights' shapes says how many image tokens the processors cut off
# ---------------------------------------------------------------------------------------------
def test_processors_for_another_token_count_are_refused(saved):
    # Before: a base checkpoint (4 tokens) loaded into processors built for 16 ran, and drew wrong
    # images: the processors took 12 text tokens as image tokens.
    path, proj, _ = saved
    state = load_ip_adapter(path)
    adapter_16 = install_ip_adapter(make_toy_unet(), num_tokens=16)
    with pytest.raises(CheckpointMismatchError, match=r"the projection makes 4 image tokens, but the processors take "
                                                      r"the last 16.*install_ip_adapter\(unet, num_tokens=4\)"):
        load_into(state, proj, adapter_16)
    assert not torch.equal(adapter_16[1].to_k_ip.weight, state["ip_adapter"]["1.to_k_ip.weight"])  # nothing loaded


def test_shape_errors_come_before_the_token_count(saved):
    """A projection of the wrong size is reported by its shapes, not as a token mismatch."""
    path, _, _ = saved
    state = load_ip_adapter(path)
    wrong = ImageProjModel(CROSS_DIM, EMBED_DIM, 16)
    with pytest.raises(CheckpointMismatchError) as info:
        load_into(state, wrong, install_ip_adapter(make_toy_unet(), num_tokens=4))
    assert "proj.weight has shape (256, 32) in the checkpoint, but (1024, 32) in the model" in str(info.value)
    assert "num_tokens" not in str(info.value)


@pytest.mark.parametrize("variant", ["base", "plus"])
def test_image_proj_from_state_dict_builds_and_loads_strictly(variant):
    from ipa_lab.checkpoint import image_proj_from_state_dict
    from ipa_lab.projection import num_tokens_of

    proj = make_projection(variant)
    state = proj.state_dict()
    built = image_proj_from_state_dict({"image_proj": state, "ip_adapter": {}})
    assert type(built) is type(proj) and num_tokens_of(built) == num_tokens_of(proj)
    assert all(torch.equal(built.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(CheckpointMismatchError, match="image_proj: unexpected keys .*: stray.weight"):
        image_proj_from_state_dict({**state, "stray.weight": torch.zeros(1)})
