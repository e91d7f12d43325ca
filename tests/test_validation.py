"""The fixed validation loss: reproducible, one draw for every condition, adapter off ignores the
adapter, the shipped adapter reads its image, and the command line logs it at checkpoints."""
from __future__ import annotations

import pytest
import torch

from ipa_lab.checkpoint import load_into, load_ip_adapter
from ipa_lab.pipeline import REPO_ROOT, TOY_SD
from ipa_lab.train import TrainConfig
from ipa_lab.trainer import (VALIDATION_CONDITIONS, IPAdapter, Trainer, load_backbone, prepare_training,
                             validation_inputs, validation_loss)


def _adapter(model):
    bb = load_backbone(model, torch.device("cpu"))
    torch.manual_seed(0)
    proj, modules, _ = prepare_training(bb.unet, bb.vae, bb.text_encoder, bb.image_encoder)
    return bb, IPAdapter(bb.unet, proj, modules)


@pytest.fixture(scope="module")
def untrained(toy_model, toy_data, tmp_path_factory):
    bb, ip_adapter = _adapter(toy_model)
    return bb, ip_adapter, validation_inputs(bb, toy_data, "base", tmp_path_factory.mktemp("cache"), "cpu")


def test_the_same_numbers_every_call_and_for_any_batch_size(untrained):
    bb, ip_adapter, cache = untrained
    first = validation_loss(ip_adapter, bb.noise_scheduler, cache, n=8, batch_size=8)
    again = validation_loss(ip_adapter, bb.noise_scheduler, cache, n=8, batch_size=8)
    split = validation_loss(ip_adapter, bb.noise_scheduler, cache, n=8, batch_size=3)
    assert list(first) == list(VALIDATION_CONDITIONS)
    assert first == again
    # The roll that gives each sample another image stays within a batch, so that condition alone depends on it.
    for condition in ("image", "no image", "adapter off"):
        assert split[condition] == pytest.approx(first[condition], rel=1e-5)
    other_seed = validation_loss(ip_adapter, bb.noise_scheduler, cache, n=8, seed=1, conditions=("image",))
    assert other_seed["image"] != first["image"]


def test_adapter_off_ignores_the_adapter_and_the_scales_come_back(untrained):
    bb, ip_adapter, cache = untrained
    processors = [p for p in ip_adapter.adapter_modules if hasattr(p, "to_k_ip")]
    for p in processors:
        p.scale = 0.7
    before = validation_loss(ip_adapter, bb.noise_scheduler, cache, n=8, conditions=("image", "adapter off"))
    assert [p.scale for p in processors] == [0.7] * len(processors)
    saved = {k: v.clone() for k, v in ip_adapter.image_proj_model.state_dict().items()}
    with torch.no_grad():  # another projection: other image tokens
        for param in ip_adapter.image_proj_model.parameters():
            param.mul_(-3.0)
    after = validation_loss(ip_adapter, bb.noise_scheduler, cache, n=8, conditions=("image", "adapter off"))
    ip_adapter.image_proj_model.load_state_dict(saved)
    for p in processors:
        p.scale = 1.0
    assert after["adapter off"] == before["adapter off"]  # scale 0: the image branch adds exactly nothing
    assert after["image"] != before["image"]


def test_bad_arguments_are_named(untrained):
    bb, ip_adapter, cache = untrained
    with pytest.raises(ValueError, match="unknown condition"):
        validation_loss(ip_adapter, bb.noise_scheduler, cache, conditions=("text",))
    with pytest.raises(ValueError, match="n must be in"):
        validation_loss(ip_adapter, bb.noise_scheduler, cache, n=9)


def test_the_shipped_adapter_reads_its_image(tmp_path):
    """On the shipped toy and adapter: its own image lowers the loss, another image raises it."""
    bb, ip_adapter = _adapter(str(TOY_SD))
    load_into(load_ip_adapter(REPO_ROOT / "data" / "ip-adapter-toy" / "ip_adapter.safetensors"),
              ip_adapter.image_proj_model, ip_adapter.adapter_modules)
    cache = validation_inputs(bb, REPO_ROOT / "data" / "shapes", "base", tmp_path, "cpu")
    loss = validation_loss(ip_adapter, bb.noise_scheduler, cache, n=128, batch_size=128)
    assert loss["image"] < loss["no image"] < loss["other image"]
    assert loss["image"] < loss["adapter off"] < loss["other image"]


def test_the_command_line_logs_it_at_each_checkpoint(toy_model, toy_data, tmp_path):
    lines = []
    cfg = TrainConfig(model=toy_model, data=toy_data, output=str(tmp_path / "run"), steps=4, batch_size=8,
                      checkpoint_every=2, device="cpu", verify_frozen=0, cache_dir=str(tmp_path / "cache"))
    Trainer(cfg, log=lines.append).run(progress=False)
    logged = [line for line in lines if "validation loss" in line]
    assert [line.split(":")[0] for line in logged] == ["step 2", "step 4"]
    assert "8 images" in logged[0] and "image " in logged[0] and "other image " in logged[0]


def test_the_loss_curve_averages_full_windows_only():
    """The bold line starts once it averages `window` batches, never at one batch's loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ipa_lab.viz import loss_curve

    losses = [float(s % 7) for s in range(40)]
    raw, mean = loss_curve(range(40), losses, window=10).axes[0].lines
    assert list(mean.get_xdata())[0] == 9 and len(mean.get_xdata()) == 31
    assert mean.get_ydata()[0] == pytest.approx(sum(losses[:10]) / 10)
    assert len(loss_curve(range(5), losses[:5], window=10).axes[0].lines) == 1  # no full window: raw only
    plt.close("all")
