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
    if suffix == ".safetensors":  # diffusers reads past our metadata
        from ipa_lab.checkpoint import read_metadata

        assert read_metadata(path)["ipa_lab.variant"] == variant
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


# ---------------------------------------------------------------------------------------------
# Metadata: what the tensors do not say (variant, tokens, the Resampler's heads and dim_head)
# ---------------------------------------------------------------------------------------------
def test_saved_files_describe_their_projection(toy_unet, tmp_path):
    from ipa_lab.checkpoint import read_metadata

    base = save_ip_adapter(tmp_path / "base.safetensors", make_projection("base"), trained_adapter(toy_unet, "base"))
    assert read_metadata(base) == {"format": "pt", "ipa_lab.format": "ip-adapter", "ipa_lab.format_version": "1",
                                   "ipa_lab.variant": "base", "ipa_lab.num_tokens": "4"}
    plus = save_ip_adapter(tmp_path / "plus.safetensors", make_projection("plus"),
                           trained_adapter(make_toy_unet(), "plus"))
    assert read_metadata(plus) == {"format": "pt", "ipa_lab.format": "ip-adapter", "ipa_lab.format_version": "1",
                                   "ipa_lab.variant": "plus", "ipa_lab.num_tokens": str(PLUS_TOKENS),
                                   "ipa_lab.heads": "2", "ipa_lab.dim_head": "64"}
    # a .bin stays the original's plain nested dict of tensors: no metadata
    path = save_ip_adapter(tmp_path / "plus.bin", make_projection("plus"), trained_adapter(make_toy_unet(), "plus"))
    assert read_metadata(path) == {}
    assert {type(v) for v in torch.load(path, weights_only=True).values()} == {dict}


def narrow_heads_resampler():
    """A Resampler of 4 heads of 32: to_q has 128 rows, exactly like 2 heads of 64."""
    torch.manual_seed(0)
    return perturb_(Resampler(dim=CROSS_DIM, depth=2, dim_head=32, heads=4, num_queries=PLUS_TOKENS,
                              embedding_dim=HIDDEN_DIM, output_dim=CROSS_DIM)).eval()


def test_recorded_heads_build_the_right_resampler(tmp_path):
    from ipa_lab.checkpoint import image_proj_from_state_dict, metadata_of

    proj = narrow_heads_resampler()
    path = save_ip_adapter(tmp_path / "ip.safetensors", proj, install_ip_adapter(make_toy_unet(), num_tokens=PLUS_TOKENS))
    state = load_ip_adapter(path)
    assert metadata_of(state["image_proj"])["ipa_lab.dim_head"] == "32"
    built = image_proj_from_state_dict(state["image_proj"])
    assert (built.layers[0][0].heads, built.layers[0][0].dim_head) == (4, 32)
    features = torch.randn(2, 5, HIDDEN_DIM, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(built(features), proj(features))
        # Without the metadata the split is guessed (64 wide): same tensors, another function.
        guessed = image_proj_from_state_dict(dict(state["image_proj"]))
        assert (guessed.layers[0][0].heads, guessed.layers[0][0].dim_head) == (2, 64)
        assert (guessed(features) - proj(features)).abs().max() > 1e-3


def test_load_adapter_uses_the_recorded_heads(tiny_pipeline, tmp_path):
    from ipa_lab.generate import load_adapter

    proj = narrow_heads_resampler()
    path = save_ip_adapter(tmp_path / "ip.safetensors", proj, install_ip_adapter(make_toy_unet(), num_tokens=PLUS_TOKENS))
    features = torch.randn(1, 5, HIDDEN_DIM, generator=torch.Generator().manual_seed(1))
    for checkpoint in (path, load_ip_adapter(path)):  # a path, or the dict read from it
        loaded = load_adapter(tiny_pipeline, checkpoint)
        assert (loaded.layers[0][0].heads, loaded.layers[0][0].dim_head) == (4, 32)
        with torch.no_grad():
            assert torch.equal(loaded(features), proj(features))


def test_metadata_survives_copies_and_torch_save(saved, tmp_path):
    from ipa_lab.checkpoint import metadata_of, read_checkpoint

    path, _, _ = saved
    state = load_ip_adapter(path)
    assert metadata_of(state)["ipa_lab.num_tokens"] == "4"
    assert metadata_of(read_checkpoint(state)) == metadata_of(state)  # read_checkpoint copies the parts
    torch.save(state, tmp_path / "again.bin")
    assert metadata_of(torch.load(tmp_path / "again.bin", weights_only=True)) == metadata_of(state)


def _with_metadata_file(path, tmp_path, **entries):
    """A copy of the checkpoint at `path` with its metadata entries replaced (None removes one)."""
    from safetensors.torch import load_file, save_file

    from ipa_lab.checkpoint import read_metadata

    metadata = {**read_metadata(path), **{f"ipa_lab.{k}": v for k, v in entries.items()}}
    copy_path = tmp_path / "edited.safetensors"
    save_file(load_file(str(path)), str(copy_path), metadata={k: v for k, v in metadata.items() if v is not None})
    return copy_path


def test_metadata_that_disagrees_with_the_tensors_is_named(saved, tmp_path):
    from ipa_lab.checkpoint import image_proj_from_state_dict

    path, proj, adapter = saved
    lying = load_ip_adapter(_with_metadata_file(path, tmp_path, variant="plus", num_tokens="16"))
    with pytest.raises(CheckpointMismatchError) as info:
        image_proj_from_state_dict(lying["image_proj"])
    message = str(info.value)
    assert "ipa_lab.variant='plus', but the tensors describe ImageProjModel ('base')" in message
    assert "ipa_lab.num_tokens=16, but the projection's tensors make 4 tokens" in message
    with pytest.raises(CheckpointMismatchError, match=r"ipa_lab.num_tokens=16, but the processors take the last 4"):
        load_into(lying, proj, adapter)


def test_recorded_heads_that_do_not_fit_to_q_are_named(tmp_path):
    from ipa_lab.checkpoint import image_proj_from_state_dict

    proj = narrow_heads_resampler()
    path = save_ip_adapter(tmp_path / "ip.safetensors", proj, install_ip_adapter(make_toy_unet(), num_tokens=PLUS_TOKENS))
    state = load_ip_adapter(_with_metadata_file(path, tmp_path, heads="12", dim_head="64"))
    with pytest.raises(CheckpointMismatchError, match=r"ipa_lab.heads=12 x dim_head=64 = 768, but "
                                                      r"image_proj.layers.0.0.to_q.weight has 128 rows"):
        image_proj_from_state_dict(state["image_proj"])
    with pytest.raises(CheckpointMismatchError, match="dim_head=64 was passed, but the checkpoint's metadata records "
                                                      "ipa_lab.dim_head=32"):
        image_proj_from_state_dict(load_ip_adapter(path), dim_head=64)
    # Modules built with another split (same shapes) are refused: they would compute something else.
    other = perturb_(Resampler(dim=CROSS_DIM, depth=2, dim_head=64, heads=2, num_queries=PLUS_TOKENS,
                               embedding_dim=HIDDEN_DIM, output_dim=CROSS_DIM))
    with pytest.raises(CheckpointMismatchError) as info:
        load_into(load_ip_adapter(path), other, install_ip_adapter(make_toy_unet(), num_tokens=PLUS_TOKENS))
    assert "ipa_lab.heads=4, but the Resampler was built with heads=2" in str(info.value)
    assert "ipa_lab.dim_head=32, but the Resampler was built with dim_head=64" in str(info.value)


@pytest.mark.parametrize("entry, value, expected", [
    ("num_tokens", "four", "ipa_lab.num_tokens='four': expected a positive integer"),
    ("variant", "huge", r"ipa_lab.variant='huge': expected one of \('base', 'plus'\)"),
    ("format_version", "2", "ipa_lab.format_version=2: written by a newer ipa_lab"),
    ("format", "lora", "ipa_lab.format='lora': expected 'ip-adapter'")])
def test_malformed_metadata_is_named_with_the_file(saved, tmp_path, entry, value, expected):
    path = _with_metadata_file(saved[0], tmp_path, **{entry: value})
    with pytest.raises(CheckpointMismatchError, match=rf"edited\.safetensors'?: metadata {expected}"):
        load_ip_adapter(path)


def test_files_without_metadata_load_as_before(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    from ipa_lab.checkpoint import image_proj_from_state_dict, metadata_of, read_metadata

    path, proj, adapter = saved
    bare = tmp_path / "bare.safetensors"  # as the original's and diffusers' files are
    save_file(load_file(str(path)), str(bare))
    assert read_metadata(bare) == {}
    state = load_ip_adapter(bare)
    assert metadata_of(state) == {} and type(state["image_proj"]) is dict
    load_into(state, proj, adapter)
    assert isinstance(image_proj_from_state_dict(state["image_proj"]), ImageProjModel)
    # only safetensors' own entry: nothing of ours either
    only_format = _with_metadata_file(path, tmp_path, format=None, format_version=None, variant=None, num_tokens=None)
    assert read_metadata(only_format) == {"format": "pt"} and metadata_of(load_ip_adapter(only_format)) == {}


def test_resaving_a_loaded_file_keeps_its_metadata(tmp_path):
    from ipa_lab.checkpoint import load_ip_adapter, read_metadata, write_checkpoint
    from ipa_lab.pipeline import REPO_ROOT

    source = REPO_ROOT / "data" / "ip-adapter-toy-plus" / "ip_adapter.safetensors"
    write_checkpoint(tmp_path / "copy.safetensors", load_ip_adapter(source))
    assert read_metadata(tmp_path / "copy.safetensors") == read_metadata(source)
