"""The ablations' pieces (ipa_lab.ablation): the simple adapter's processor is plain attention over
[text; image], the three initialisations of the image branch do what they say at step 0, the
trainer surgery trains what it should, and the command line refuses bad input before any work."""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from conftest import CROSS_DIM, perturb_
from ipa_lab.ablation import (output_change, parse_args, read_csv, reinitialise_branch, use_concatenated_attention,
                              write_csv)
from ipa_lab.adapter import INITS, init_ip_branch, install_ip_adapter, ip_processors
from ipa_lab.attention import ConcatAttnProcessor
from ipa_lab.generate import set_scale


def _layer() -> Attention:
    torch.manual_seed(0)
    return perturb_(Attention(query_dim=32, cross_attention_dim=24, heads=2, dim_head=16)).eval()


def test_the_simple_adapter_is_plain_attention_over_text_and_image_tokens():
    attn, x = _layer(), torch.randn(2, 10, 32)
    text, image = torch.randn(2, 7, 24), torch.randn(2, 4, 24)
    states = torch.cat([text, image], dim=1)
    processor = ConcatAttnProcessor(num_tokens=4)
    with torch.no_grad():
        one_softmax = AttnProcessor2_0()(attn, x, encoder_hidden_states=states)
        assert torch.allclose(processor(attn, x, encoder_hidden_states=states), one_softmax, atol=1e-6)
        processor.scale = 0  # the image tokens left out: the layer on the text alone
        text_only = AttnProcessor2_0()(attn, x, encoder_hidden_states=text)
        assert torch.allclose(processor(attn, x, encoder_hidden_states=states), text_only, atol=1e-6)
    assert list(processor.parameters()) == []  # only the projection trains


def test_the_simple_adapter_has_no_weight_for_the_image_and_says_so():
    processor = ConcatAttnProcessor()
    with pytest.raises(ValueError, match="scale must be 0 .* or 1"):
        processor.scale = 0.5
    with pytest.raises(ValueError, match="cross-attention processor"):
        processor(_layer(), torch.randn(1, 3, 32), encoder_hidden_states=None)


def _unet_output(unet, states):
    torch.manual_seed(3)
    latents, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    with torch.no_grad():
        return unet(latents, t, states).sample


@pytest.mark.parametrize("init", INITS)
def test_only_the_zero_init_leaves_the_unet_unchanged_at_step_0(toy_unet, init):
    text, image = torch.randn(2, 16, CROSS_DIM), torch.randn(2, 4, CROSS_DIM)
    plain = _unet_output(toy_unet, text)
    torch.manual_seed(0)
    install_ip_adapter(toy_unet, init=init)
    out = _unet_output(toy_unet, torch.cat([text, image], dim=1))
    assert torch.equal(out, plain) == (init == "zeros"), init
    if init != "zeros":
        assert (out - plain).abs().max() > 1e-3


def test_each_init_sets_the_branch_as_named(toy_unet):
    adapter = install_ip_adapter(toy_unet)  # the default is the original's copy
    layers = dict(toy_unet.named_modules())
    name, processor = next(iter(ip_processors(toy_unet).items()))
    layer = layers[name.removesuffix(".processor")]
    assert torch.equal(processor.to_k_ip.weight, layer.to_k.weight)
    init_ip_branch(processor, layer, "zeros")
    assert not processor.to_k_ip.weight.any() and not processor.to_v_ip.weight.any()
    init_ip_branch(processor, layer, "random")
    assert processor.to_k_ip.weight.std() > 0 and not torch.equal(processor.to_k_ip.weight, layer.to_k.weight)
    with pytest.raises(ValueError, match="init must be one of copy, zeros, random"):
        install_ip_adapter(copy.deepcopy(toy_unet), init="ones")
    assert len(adapter) == len(toy_unet.attn_processors)


def test_set_scale_finds_the_simple_adapter(toy_unet):
    toy_unet.set_attn_processor({name: ConcatAttnProcessor() if name.endswith("attn2.processor") else AttnProcessor2_0()
                                 for name in toy_unet.attn_processors})
    assert set_scale(toy_unet, 1.0) == 7
    with pytest.raises(ValueError, match="no weight for the image prompt"):
        set_scale(toy_unet, 0.3)


def _trainer(toy_model, toy_data, tmp_path, name):
    from ipa_lab.train import TrainConfig
    from ipa_lab.trainer import Trainer

    return Trainer(TrainConfig(model=toy_model, data=toy_data, output=str(tmp_path / name), steps=2, batch_size=8,
                               device="cpu", cache_dir=str(tmp_path.parent / "cache")))


def test_the_concatenated_variant_trains_the_projection_alone(toy_model, toy_data, tmp_path):
    trainer = _trainer(toy_model, toy_data, tmp_path, "concat")
    use_concatenated_attention(trainer)
    projection = trainer.ip_adapter.image_proj_model
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == {id(p) for p in projection.parameters()}
    assert all(isinstance(p, ConcatAttnProcessor) for p in ip_processors(trainer.bb.unet).values())
    unet_before = copy.deepcopy(trainer.bb.unet.state_dict())
    proj_before = copy.deepcopy(projection.state_dict())
    trainer.train_step(0)
    assert all(torch.equal(v, trainer.bb.unet.state_dict()[k]) for k, v in unet_before.items())
    assert any(not torch.equal(v, projection.state_dict()[k]) for k, v in proj_before.items())


def test_reinitialised_branches_change_the_output_at_step_0_as_their_init_says(toy_model, toy_data, tmp_path):
    changes = {}
    for init in INITS:
        trainer = _trainer(toy_model, toy_data, tmp_path, init)
        reinitialise_branch(trainer, init, seed=0)
        changes[init] = output_change(trainer, 0)
    assert changes["zeros"] == 0 and changes["copy"] > 0 and changes["random"] > 0


def test_csv_round_trip(tmp_path):
    rows = [{"variant": "decoupled", "steps": 300, "colour": 0.984375}, {"variant": "x", "steps": 1, "colour": 1.0}]
    write_csv(tmp_path / "a.csv", rows)
    assert read_csv(tmp_path / "a.csv") == [{"variant": "decoupled", "steps": 300, "colour": 0.9844},
                                            {"variant": "x", "steps": 1, "colour": 1.0}]


@pytest.mark.parametrize("argv, message", [
    (["concat"], "required: --output"),
    (["dropout", "--output", "x.csv"], "invalid choice"),
    (["concat", "--output", "x.txt"], "expected a .csv file name"),
    (["concat", "--output", "x.csv", "--max-steps", "10"], "--max-steps applies to recipe, not to concat"),
    (["recipe", "--output", "x.csv", "--steps", "10"], "--steps applies to concat and init, not to recipe"),
    (["recipe", "--output", "x.csv", "--target", "1.5"], "--target 1.5 (an agreement"),
    (["init", "--output", "x.csv", "--steps", "0"], "--steps 0 (must be >= 1)"),
    (["plus", "--output", "x.csv", "--plus", "nowhere.safetensors"], "--plus nowhere.safetensors: no such checkpoint"),
    (["concat", "--output", "x.csv", "--data", "nowhere"], "no train.json in --data nowhere"),
])
def test_the_command_line_refuses_bad_input_clearly(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_an_existing_csv_is_never_overwritten_silently(tmp_path, capsys):
    out = tmp_path / "concat.csv"
    out.write_text("variant\nkept\n")
    with pytest.raises(SystemExit):
        parse_args(["concat", "--output", str(out)])
    assert "exists: pass --overwrite" in capsys.readouterr().err and out.read_text() == "variant\nkept\n"
    assert parse_args(["concat", "--output", str(out), "--overwrite"]).overwrite


def test_bad_input_fails_before_torch_loads(tmp_path):
    code = ("import sys\nfrom ipa_lab.ablation import parse_args\ntry:\n    parse_args(['init', '--output', 'x.txt'])\n"
            "except SystemExit:\n    print('torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.stdout.strip() == "False", result.stderr
