"""Our processors compute what diffusers' processors compute, on every path a UNet or VAE uses."""
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, IPAdapterAttnProcessor2_0
from torch import nn

from conftest import CROSS_DIM, perturb_
from ipa_lab import AttnProcessor, IPAttnProcessor

TOL = 1e-5


def layer(**kwargs) -> Attention:
    torch.manual_seed(0)
    return perturb_(Attention(**kwargs)).eval()


def run(attn, processor, *args, **kwargs):
    with torch.no_grad():
        return processor(attn, *args, **kwargs)


def test_attn_processor_is_an_empty_module():
    proc = AttnProcessor()
    assert isinstance(proc, nn.Module) and len(list(proc.parameters())) == 0
    assert len(nn.ModuleList([proc, IPAttnProcessor(32, 16)])) == 2
    # ...which is why the original defines its own: diffusers' default processor is no Module.
    with pytest.raises(TypeError):
        nn.ModuleList([AttnProcessor2_0()])


CASES = {
    "self-attention": dict(layer=dict(query_dim=32, heads=4, dim_head=8), x=(2, 10, 32), context=None),
    "cross-attention, norm_cross and mask": dict(
        layer=dict(query_dim=32, cross_attention_dim=24, heads=2, dim_head=16, cross_attention_norm="layer_norm"),
        x=(2, 10, 32), context=(2, 7, 24), mask=True),
    "4-D input, group norm, residual, rescale (VAE style)": dict(
        layer=dict(query_dim=32, heads=1, dim_head=32, norm_num_groups=8, residual_connection=True,
                   rescale_output_factor=2.0, bias=True, _from_deprecated_attn_block=True),
        x=(2, 32, 4, 4), context=None),
    "spatial norm with temb": dict(
        layer=dict(query_dim=32, heads=4, dim_head=8, spatial_norm_dim=16, residual_connection=True),
        x=(2, 32, 4, 4), context=None, temb=(2, 16, 4, 4)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_attn_processor_matches_attn_processor_2_0(case):
    spec = CASES[case]
    attn = layer(**spec["layer"])
    x = torch.randn(spec["x"])
    kwargs = {}
    if spec.get("context"):
        kwargs["encoder_hidden_states"] = torch.randn(spec["context"])
    if spec.get("mask"):  # hide the last two text tokens of the second sample
        mask = torch.ones(2, spec["context"][1])
        mask[1, -2:] = 0
        kwargs["attention_mask"] = (1 - mask)[:, None, :] * -10000.0
    if spec.get("temb"):
        kwargs["temb"] = torch.randn(spec["temb"])
    ours, theirs = run(attn, AttnProcessor(), x, **kwargs), run(attn, AttnProcessor2_0(), x, **kwargs)
    assert ours.shape == theirs.shape == x.shape[:1] + theirs.shape[1:]
    assert (ours - theirs).abs().max().item() <= TOL


def ip_pair(scale=0.7, num_tokens=4, **layer_kwargs):
    """An attention layer with our IPAttnProcessor and diffusers' one holding the same weights."""
    attn = layer(query_dim=32, cross_attention_dim=CROSS_DIM, heads=4, dim_head=8, **layer_kwargs)
    ours = perturb_(IPAttnProcessor(32, CROSS_DIM, scale=scale, num_tokens=num_tokens), seed=3)
    theirs = IPAdapterAttnProcessor2_0(32, CROSS_DIM, num_tokens=(num_tokens,), scale=scale)
    theirs.load_state_dict({"to_k_ip.0.weight": ours.to_k_ip.weight, "to_v_ip.0.weight": ours.to_v_ip.weight})
    return attn, ours, theirs


@pytest.mark.parametrize("layer_kwargs", [{}, {"cross_attention_norm": "layer_norm"}])
def test_ip_attn_processor_matches_diffusers(layer_kwargs):
    attn, ours, theirs = ip_pair(**layer_kwargs)
    x, text, image = torch.randn(2, 10, 32), torch.randn(2, 7, CROSS_DIM), torch.randn(2, 4, CROSS_DIM)
    mask = torch.zeros(2, 1, 7)
    mask[0, 0, -1] = -10000.0  # a text mask covers the text keys only
    a = run(attn, ours, x, encoder_hidden_states=torch.cat([text, image], 1), attention_mask=mask)
    b = run(attn, theirs, x, encoder_hidden_states=(text, [image]), attention_mask=mask)
    assert (a - b).abs().max().item() <= TOL


def test_ip_attn_processor_is_the_formula():
    attn, ours, _ = ip_pair(scale=0.3)
    x, text, image = torch.randn(1, 5, 32), torch.randn(1, 7, CROSS_DIM), torch.randn(1, 4, CROSS_DIM)
    with torch.no_grad():
        q = attn.to_q(x).view(1, 5, 4, 8).transpose(1, 2)

        def attention(k, v):
            k, v = (t.view(1, -1, 4, 8).transpose(1, 2) for t in (k, v))
            w = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1)
            return (w @ v).transpose(1, 2).reshape(1, 5, 32)

        z = attention(attn.to_k(text), attn.to_v(text)) + 0.3 * attention(ours.to_k_ip(image), ours.to_v_ip(image))
        expected = attn.to_out[0](z)
    got = run(attn, ours, x, encoder_hidden_states=torch.cat([text, image], 1))
    assert (got - expected).abs().max().item() <= TOL


def test_scale_zero_is_plain_cross_attention_exactly():
    attn, ours, _ = ip_pair(scale=0.0)
    x, text, image = torch.randn(2, 10, 32), torch.randn(2, 7, CROSS_DIM), torch.randn(2, 4, CROSS_DIM)
    plain = run(attn, AttnProcessor(), x, encoder_hidden_states=text)
    assert torch.equal(run(attn, ours, x, encoder_hidden_states=torch.cat([text, image], 1)), plain)
    ours.scale = 1.0  # a plain attribute: switching the image prompt back on changes the output
    assert not torch.allclose(run(attn, ours, x, encoder_hidden_states=torch.cat([text, image], 1)), plain)


def test_missing_encoder_states_is_explained():
    attn, ours, _ = ip_pair()
    with pytest.raises(ValueError, match="needs encoder_hidden_states.*got None"):
        run(attn, ours, torch.randn(1, 5, 32))


@pytest.mark.parametrize("length", [3, 4])
def test_too_few_tokens_is_explained(length):
    attn, ours, _ = ip_pair(num_tokens=4)
    with pytest.raises(ValueError, match=rf"has {length} tokens.*num_tokens=4.*at least 5"):
        run(attn, ours, torch.randn(1, 5, 32), encoder_hidden_states=torch.randn(1, length, CROSS_DIM))


def test_diffusers_tuple_format_is_explained():
    attn, ours, _ = ip_pair()
    with pytest.raises(TypeError, match="got a tuple.*Concatenate"):
        run(attn, ours, torch.randn(1, 5, 32), encoder_hidden_states=(torch.randn(1, 7, CROSS_DIM), []))


def test_forward_hooks_see_processor_calls():
    """Processors are real Modules when called: hooks work (notebook 2 uses them for attention maps)."""
    attn, ours, _ = ip_pair()
    attn.set_processor(ours)
    seen = []
    ours.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with torch.no_grad():
        attn(torch.randn(1, 5, 32), encoder_hidden_states=torch.randn(1, 11, CROSS_DIM))
    assert seen == [torch.Size([1, 5, 32])]


def test_record_image_attention_records_the_image_softmax():
    """record_image_attention: one (batch, queries, image tokens) map per call, the image branch's
    softmax averaged over the heads; the layer's output is unchanged and the hooks go on exit."""
    from types import SimpleNamespace

    from ipa_lab.attention import record_image_attention

    attn, ours, _ = ip_pair()
    attn.set_processor(ours)
    x, states = torch.randn(1, 5, 32), torch.randn(1, 11, CROSS_DIM)
    with torch.no_grad():
        before = attn(x, encoder_hidden_states=states)
        with record_image_attention(SimpleNamespace(attn_processors={"attn2.processor": ours})) as maps:
            during = attn(x, encoder_hidden_states=states)
        attn(x, encoder_hidden_states=states)  # after exit: not recorded
        q = attn.to_q(x).view(1, 5, 4, 8).transpose(1, 2)
        k = ours.to_k_ip(states[:, -4:]).view(1, 4, 4, 8).transpose(1, 2)
        expected = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1).mean(1)
    assert torch.equal(before, during)
    assert list(maps) == ["attn2.processor"] and len(maps["attn2.processor"]) == 1
    assert torch.allclose(maps["attn2.processor"][0], expected, atol=1e-6)
    assert torch.allclose(expected.sum(-1), torch.ones(1, 5))
    with pytest.raises(ValueError, match="no IPAttnProcessor"):
        with record_image_attention(SimpleNamespace(attn_processors={})):
            pass
