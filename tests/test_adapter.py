"""Installing IP-Adapter: which processors go where, what trains, and parity with diffusers."""
import copy

import pytest
import torch
from torch import nn

from conftest import CROSS_DIM, EMBED_DIM, make_toy_unet, perturb_, toy_unet_settings
from ipa_lab import (
    AttnProcessor,
    ImageProjModel,
    IPAttnProcessor,
    count_parameters,
    format_parameter_table,
    freeze,
    hidden_size_of,
    install_ip_adapter,
    ip_processors,
    parameter_table,
)
from ipa_lab.checkpoint import checkpoint_state

SD15 = {"block_out_channels": [320, 640, 1280, 1280]}


@pytest.mark.parametrize("name, width", [
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor", 320),
    ("down_blocks.2.attentions.1.transformer_blocks.0.attn1.processor", 1280),
    ("mid_block.attentions.0.transformer_blocks.0.attn2.processor", 1280),
    ("up_blocks.1.attentions.2.transformer_blocks.0.attn2.processor", 1280),
    ("up_blocks.3.attentions.0.transformer_blocks.0.attn2.processor", 320),
])
def test_hidden_size_of(name, width):
    assert hidden_size_of(name, SD15) == width


def test_hidden_size_of_rejects_unknown_names():
    with pytest.raises(ValueError, match="cannot tell the width of attention layer 'conv_in'"):
        hidden_size_of("conv_in", SD15)


def test_install_replaces_every_processor(toy_unet):
    names = list(toy_unet.attn_processors)
    adapter = install_ip_adapter(toy_unet, num_tokens=4, scale=0.5)
    assert isinstance(adapter, nn.ModuleList) and len(adapter) == len(names)
    for i, (name, proc) in enumerate(toy_unet.attn_processors.items()):
        assert adapter[i] is proc and name == names[i]  # same order as unet.attn_processors
        if name.endswith("attn2.processor"):
            assert isinstance(proc, IPAttnProcessor) and i % 2 == 1
            assert (proc.scale, proc.num_tokens) == (0.5, 4)
            assert proc.hidden_size == hidden_size_of(name, toy_unet.config)
        else:
            assert type(proc) is AttnProcessor and count_parameters(proc) == 0
    # checkpoint keys: odd indices only, to_k_ip and to_v_ip
    keys = list(adapter.state_dict())
    assert keys[:4] == ["1.to_k_ip.weight", "1.to_v_ip.weight", "3.to_k_ip.weight", "3.to_v_ip.weight"]
    assert names[-1].startswith("mid_block")  # the mid block comes last


def test_install_copies_to_k_and_to_v_and_leaves_them_alone(toy_unet):
    before = {n: p.clone() for n, p in toy_unet.named_parameters()}
    install_ip_adapter(toy_unet)
    modules = dict(toy_unet.named_modules())
    for name, proc in toy_unet.attn_processors.items():
        if isinstance(proc, IPAttnProcessor):
            attn = modules[name[: -len(".processor")]]
            assert torch.equal(proc.to_k_ip.weight, attn.to_k.weight)
            assert torch.equal(proc.to_v_ip.weight, attn.to_v.weight)
            assert proc.to_k_ip.weight.data_ptr() != attn.to_k.weight.data_ptr()  # a copy, not a view
    after = dict(toy_unet.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)  # nothing of the UNet changed


def test_central_claim_only_the_ip_layers_train(toy_unet, tiny_sd_parts):
    vae, text_encoder = copy.deepcopy(tiny_sd_parts["vae"]), copy.deepcopy(tiny_sd_parts["text_encoder"])
    image_encoder = nn.Sequential(nn.Linear(12, EMBED_DIM))  # stands in for the CLIP image encoder
    freeze(toy_unet, vae, text_encoder, image_encoder)
    for model in (toy_unet, vae, text_encoder, image_encoder):
        assert not model.training and count_parameters(model, trainable_only=True) == 0
    adapter = install_ip_adapter(toy_unet)
    trainable = [n for n, p in toy_unet.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("processor.to_k_ip.weight", "processor.to_v_ip.weight")) for n in trainable)
    assert count_parameters(toy_unet, trainable_only=True) == count_parameters(adapter, trainable_only=True)
    assert all(count_parameters(m) == 0 for m in adapter if isinstance(m, AttnProcessor))
    for model in (vae, text_encoder, image_encoder):
        assert not any(p.requires_grad for p in model.parameters())


def test_install_works_on_meta():
    with torch.device("meta"):
        unet = make_toy_unet()
    adapter = install_ip_adapter(unet)
    assert all(p.is_meta for p in adapter.parameters())
    assert count_parameters(adapter) == 2 * CROSS_DIM * sum(m.hidden_size for m in adapter if isinstance(m, IPAttnProcessor))


def test_install_twice_is_refused(toy_unet):
    install_ip_adapter(toy_unet)
    with pytest.raises(RuntimeError, match=r"already has IP-Adapter processors \(7 of them"):
        install_ip_adapter(toy_unet)


def test_ip_processors_finds_ours_and_diffusers(toy_unet):
    """One test of "is this an IP-Adapter processor", for our install, set_scale and load_adapter alike."""
    assert ip_processors(toy_unet) == {}
    theirs = copy.deepcopy(toy_unet)
    adapter = install_ip_adapter(toy_unet)
    found = ip_processors(toy_unet)
    assert list(found.values()) == [m for m in adapter if isinstance(m, IPAttnProcessor)]
    assert all(name.endswith("attn2.processor") for name in found)
    proj = ImageProjModel(CROSS_DIM, EMBED_DIM, 4)
    theirs._load_ip_adapter_weights(checkpoint_state(proj, adapter), low_cpu_mem_usage=False)
    assert {type(p).__name__ for p in ip_processors(theirs).values()} == {"IPAdapterAttnProcessor2_0"}
    assert list(ip_processors(theirs)) == list(found)
    with pytest.raises(RuntimeError, match=r"already has IP-Adapter processors \(7 of them"):
        install_ip_adapter(theirs)  # diffusers' adapter counts too


def test_install_needs_cross_attention():
    from diffusers import UNet2DConditionModel

    settings = toy_unet_settings() | {"down_block_types": ["DownBlock2D"] * 3, "up_block_types": ["UpBlock2D"] * 3,
                                      "mid_block_type": None}
    unet = UNet2DConditionModel.from_config(settings)
    with pytest.raises(ValueError, match="has no cross-attention layers \\(no 'attn2' processors"):
        install_ip_adapter(unet)


def _ip_inputs(batch=2, seed=5):
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, 8, 8, generator=gen)
    text = torch.randn(batch, 7, CROSS_DIM, generator=gen)
    embeds = torch.randn(batch, EMBED_DIM, generator=gen)
    return sample, text, embeds


def test_unet_matches_diffusers_ip_adapter_processors(toy_unet):
    """Same weights in, same noise prediction out: ours vs diffusers' IPAdapterAttnProcessor2_0."""
    theirs = copy.deepcopy(toy_unet)
    adapter = perturb_(install_ip_adapter(toy_unet, scale=1.0), seed=7)
    torch.manual_seed(0)
    proj = perturb_(ImageProjModel(CROSS_DIM, EMBED_DIM, 4)).eval()
    theirs._load_ip_adapter_weights(checkpoint_state(proj, adapter), low_cpu_mem_usage=False)
    assert {type(p).__name__ for p in theirs.attn_processors.values()} == {"AttnProcessor2_0", "IPAdapterAttnProcessor2_0"}

    sample, text, embeds = _ip_inputs()
    with torch.no_grad():
        ours_out = toy_unet(sample, 10, encoder_hidden_states=torch.cat([text, proj(embeds)], 1)).sample
        theirs_out = theirs(sample, 10, encoder_hidden_states=text, added_cond_kwargs={"image_embeds": [embeds[:, None]]}).sample
    assert (ours_out - theirs_out).abs().max().item() <= 1e-5


def test_scale_zero_gives_the_untouched_unet(toy_unet):
    original = copy.deepcopy(toy_unet)
    adapter = perturb_(install_ip_adapter(toy_unet, scale=0.0), seed=7)
    sample, text, _ = _ip_inputs()
    image_tokens = torch.randn(2, 4, CROSS_DIM)
    with torch.no_grad():
        plain = original(sample, 10, encoder_hidden_states=text).sample
        assert torch.equal(toy_unet(sample, 10, encoder_hidden_states=torch.cat([text, image_tokens], 1)).sample, plain)
        for proc in adapter:
            if isinstance(proc, IPAttnProcessor):
                proc.scale = 1.0
        assert not torch.allclose(toy_unet(sample, 10, encoder_hidden_states=torch.cat([text, image_tokens], 1)).sample, plain)


def test_parameter_table(toy_unet, tiny_sd_parts):
    freeze(toy_unet)
    adapter = install_ip_adapter(toy_unet)
    proj = ImageProjModel(CROSS_DIM, EMBED_DIM, 4)
    text_encoder = copy.deepcopy(tiny_sd_parts["text_encoder"])
    freeze(text_encoder)
    rows = parameter_table(proj, adapter, {"unet": toy_unet, "text_encoder": text_encoder})
    by = {(r.component, r.block): r for r in rows}
    unet_size = count_parameters(toy_unet) - count_parameters(adapter)
    assert by["image projection", "ImageProjModel"].trainable == count_parameters(proj)
    # toy UNet: 64-wide down block 0 and up block 2 (one layer each); 128 wide elsewhere
    assert [(r.block, r.width, r.layers) for r in rows if r.component == "adapter" and r.kind == "part"] == [
        ("down_blocks.0", 64, 1), ("down_blocks.1", 128, 1), ("mid_block", 128, 1),
        ("up_blocks.1", 128, 2), ("up_blocks.2", 64, 2), ("no weights (self-attn)", None, 7)]
    assert by["adapter", "all blocks"].count == count_parameters(adapter) == 2 * 64 * (64 * 3 + 128 * 4)
    assert by["backbone", "unet"].count == unet_size and by["backbone", "unet"].trainable == 0
    total = rows[-1]
    assert total.kind == "total" and total.trainable == count_parameters(proj) + count_parameters(adapter)
    assert total.count == sum(r.count for r in rows if r.kind == "part")
    text = format_parameter_table(rows)
    assert f"{unet_size:,}" in text and "down_blocks.0" in text
    assert len({len(line) for line in text.splitlines() if line.startswith("-")}) == 1  # aligned rules
