"""The image projections match diffusers' classes, weight for weight and number for number."""
import re

import pytest
import torch

from conftest import CROSS_DIM, EMBED_DIM, HIDDEN_DIM, perturb_
from ipa_lab import ImageProjModel, Resampler
from ipa_lab.projection import build_image_projection, is_plus, num_tokens_of


def toy_resampler(num_queries: int = 6) -> Resampler:
    # diffusers' converter assumes depth 4 and 64-wide heads (heads = to_q rows // 64).
    torch.manual_seed(0)
    return Resampler(dim=CROSS_DIM, depth=4, dim_head=64, heads=2, num_queries=num_queries,
                     embedding_dim=HIDDEN_DIM, output_dim=CROSS_DIM, ff_mult=4)


def test_image_proj_model_shapes_and_names():
    model = ImageProjModel(cross_attention_dim=CROSS_DIM, clip_embeddings_dim=EMBED_DIM, clip_extra_context_tokens=4)
    out = model(torch.randn(3, EMBED_DIM))
    assert out.shape == (3, 4, CROSS_DIM)
    assert sorted(model.state_dict()) == ["norm.bias", "norm.weight", "proj.bias", "proj.weight"]
    assert model.proj.weight.shape == (4 * CROSS_DIM, EMBED_DIM)


def test_image_proj_model_matches_diffusers(toy_unet):
    torch.manual_seed(0)
    ours = perturb_(ImageProjModel(CROSS_DIM, EMBED_DIM, 4)).eval()
    theirs = toy_unet._convert_ip_adapter_image_proj_to_diffusers(ours.state_dict(), low_cpu_mem_usage=False)
    assert type(theirs).__name__ == "ImageProjection"
    x = torch.randn(5, EMBED_DIM)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max().item() <= 1e-5


def test_image_proj_model_rejects_wrong_width():
    model = ImageProjModel(CROSS_DIM, EMBED_DIM, 4)
    with pytest.raises(ValueError, match=r"expects image embeddings of shape \(batch, 32\).*got shape \(2, 40\) "
                                         r"\(last dimension 40\)"):
        model(torch.randn(2, 40))


@pytest.mark.parametrize("shape", [(2, 5, EMBED_DIM), (EMBED_DIM,)], ids=["3-d", "1-d"])
def test_image_proj_model_rejects_anything_but_one_embedding_per_image(shape):
    # Before: (2, 5, 32) ran and came back as (10, 4, 64), ten "images" out of two.
    model = ImageProjModel(CROSS_DIM, EMBED_DIM, 4)
    with pytest.raises(ValueError, match=rf"of shape \(batch, {EMBED_DIM}\).*got shape {re.escape(str(shape))}"):
        model(torch.randn(shape))


def test_resampler_parameter_names_follow_the_original():
    names = set(toy_resampler().state_dict())
    for name in ["latents", "proj_in.weight", "proj_in.bias", "proj_out.weight", "norm_out.weight",
                 "layers.0.0.norm1.weight", "layers.0.0.norm2.bias", "layers.0.0.to_q.weight",
                 "layers.0.0.to_kv.weight", "layers.0.0.to_out.weight", "layers.3.1.0.weight",
                 "layers.3.1.1.weight", "layers.3.1.3.weight"]:
        assert name in names
    # bias-free attention and MLP linears, as in the original
    assert not any(n.endswith(("to_q.bias", "to_kv.bias", "to_out.bias", "1.1.bias", "1.3.bias")) for n in names)
    r = toy_resampler()
    assert r.latents.shape == (1, 6, CROSS_DIM)
    assert r.layers[0][0].to_kv.weight.shape == (2 * 128, CROSS_DIM)


def test_resampler_matches_diffusers_plus_projection(toy_unet):
    ours = perturb_(toy_resampler()).eval()
    theirs = toy_unet._convert_ip_adapter_image_proj_to_diffusers(ours.state_dict(), low_cpu_mem_usage=False)
    assert type(theirs).__name__ == "IPAdapterPlusImageProjection"
    x = torch.randn(2, 17, HIDDEN_DIM)
    with torch.no_grad():
        ours_out, theirs_out = ours(x), theirs(x)
    assert ours_out.shape == (2, 6, CROSS_DIM)
    assert (ours_out - theirs_out).abs().max().item() <= 1e-5


@pytest.mark.parametrize("shape", [(2, HIDDEN_DIM), (2, 17, 40), (2, 3, 17, HIDDEN_DIM)],
                         ids=["pooled", "wrong width", "4-d"])
def test_resampler_rejects_wrong_features(shape):
    with pytest.raises(ValueError, match=rf"\(batch, tokens, 48\).*got {re.escape(str(shape))}"):
        toy_resampler()(torch.randn(shape))


@pytest.mark.parametrize("variant, tokens", [("base", None), ("base", 16), ("plus", None), ("plus", 6)])
def test_build_image_projection_and_its_token_count(variant, tokens):
    unet, encoder = {"cross_attention_dim": CROSS_DIM}, {"projection_dim": EMBED_DIM, "hidden_size": HIDDEN_DIM}
    proj = build_image_projection(unet, encoder, variant, tokens)
    assert isinstance(proj, Resampler if variant == "plus" else ImageProjModel)
    assert is_plus(proj) == (variant == "plus")
    assert num_tokens_of(proj) == (tokens or (16 if variant == "plus" else 4))
    features = torch.randn(2, 5, HIDDEN_DIM) if variant == "plus" else torch.randn(2, EMBED_DIM)
    assert proj(features).shape == (2, num_tokens_of(proj), CROSS_DIM)
    with pytest.raises(ValueError, match="unknown variant 'large'"):
        build_image_projection(unet, encoder, "large")
    with pytest.raises(TypeError, match="cannot tell how many tokens a Linear makes"):
        num_tokens_of(torch.nn.Linear(2, 2))


def test_sd15_plus_resampler_size():
    with torch.device("meta"):
        r = Resampler(dim=768, depth=4, dim_head=64, heads=12, num_queries=16, embedding_dim=1280,
                      output_dim=768, ff_mult=4)
    assert sum(p.numel() for p in r.parameters()) == 29_918_208
    with torch.device("meta"):
        assert r(torch.empty(1, 257, 1280)).shape == (1, 16, 768)  # the shapes work out, no memory used


def test_plus_is_built_with_the_originals_heads_whatever_the_width():
    # IPAdapterPlus.init_proj and tutorial_train_plus.py: heads=12, dim_head=64 for any SD 1.5-like
    # UNet (so the toy's 64-wide Resampler has to_q (768, 64)); IPAdapterPlusXL: dim 1280, 20 heads.
    from ipa_lab.configs import load_config
    from ipa_lab.projection import build_image_projection

    cases = [(load_config("toy_unet"), {"hidden_size": 64, "projection_dim": 32}, 64, 12),
             (load_config("sd15_unet"), load_config("clip_vit_h14_vision"), 768, 12),
             (load_config("sdxl_unet"), load_config("clip_vit_bigg14_vision"), 1280, 20)]
    for unet, encoder, dim, heads in cases:
        with torch.device("meta"):
            r = build_image_projection(unet, encoder, "plus")
        attn = r.layers[0][0]
        assert (attn.heads, attn.dim_head, r.latents.shape[-1]) == (heads, 64, dim)
        assert tuple(attn.to_q.weight.shape) == (heads * 64, dim)
