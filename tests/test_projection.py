"""The image projections match diffusers' classes, weight for weight and number for number."""
import pytest
import torch

from conftest import CROSS_DIM, EMBED_DIM, HIDDEN_DIM, perturb_
from ipa_lab import ImageProjModel, Resampler


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
    with pytest.raises(ValueError, match=r"expects image embeddings 32 wide.*got last dimension 40"):
        model(torch.randn(2, 40))


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


def test_resampler_rejects_wrong_features():
    with pytest.raises(ValueError, match=r"\(batch, tokens, 48\).*got \(2, 48\)"):
        toy_resampler()(torch.randn(2, HIDDEN_DIM))


def test_sd15_plus_resampler_size():
    with torch.device("meta"):
        r = Resampler(dim=768, depth=4, dim_head=64, heads=12, num_queries=16, embedding_dim=1280,
                      output_dim=768, ff_mult=4)
    assert sum(p.numel() for p in r.parameters()) == 29_918_208
    with torch.device("meta"):
        assert r(torch.empty(1, 257, 1280)).shape == (1, 16, 768)  # the shapes work out, no memory used
