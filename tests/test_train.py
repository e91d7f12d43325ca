"""The training loop on tiny settings: it learns, trains only the adapter, resumes exactly."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from ipa_lab.train import TrainConfig, Trainer, main, parse_args


def config(toy_model, toy_data, tmp_path, **kw) -> TrainConfig:
    base = dict(model=toy_model, data=toy_data, output=str(tmp_path / "run"), steps=4, batch_size=8,
                checkpoint_every=2, device="cpu")
    return TrainConfig(**{**base, **kw})


def test_loss_goes_down_on_a_fixed_batch(toy_model, toy_data, tmp_path):
    trainer = Trainer(config(toy_model, toy_data, tmp_path, lr=1e-2, drop_text=0.0, drop_image=0.0, drop_both=0.0))
    # Step 0's draws every time: the same batch, noise and timesteps.
    losses = [trainer.train_step(0) for _ in range(12)]
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("variant", ["base", "plus"])
def test_only_the_adapter_and_projection_train(toy_model, toy_data, tmp_path, variant):
    trainer = Trainer(config(toy_model, toy_data, tmp_path, variant=variant, steps=2))
    trainable = {n for n, p in trainer.ip_adapter.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("image_proj_model.") or n.endswith(("to_k_ip.weight", "to_v_ip.weight"))
                             for n in trainable), sorted(trainable)
    opt_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in trainer.ip_adapter.parameters() if p.requires_grad}
    result = trainer.run(progress=False)
    report = result.report
    assert report["frozen_changed"] == [] and report["frozen_tensors"] > 100
    assert report["trainable_unmoved"] == [] and report["trainable_tensors"] == len(trainable)


def test_resume_is_bitwise_equal_to_an_uninterrupted_run(toy_model, toy_data, tmp_path):
    full = Trainer(config(toy_model, toy_data, tmp_path / "a", steps=4)).run(progress=False)
    Trainer(config(toy_model, toy_data, tmp_path / "b", steps=2)).run(progress=False)
    resumed = Trainer(config(toy_model, toy_data, tmp_path / "b", steps=4, resume=True)).run(progress=False)
    assert resumed.losses == full.losses
    a = load_file(full.output / "ip_adapter.safetensors")
    b = load_file(resumed.output / "ip_adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_saves_first_and_resume_finishes_the_same_run(toy_model, toy_data, tmp_path, capsys):
    full = Trainer(config(toy_model, toy_data, tmp_path / "a", steps=4)).run(progress=False)
    stopped = Trainer(config(toy_model, toy_data, tmp_path / "b", steps=4))
    real_step = stopped.train_step

    def press_ctrl_c_at_step_3(step):
        if step == 3:
            raise KeyboardInterrupt
        return real_step(step)

    stopped.train_step = press_ctrl_c_at_step_3
    with pytest.raises(KeyboardInterrupt):
        stopped.run(progress=False)
    assert "saved step 3; continue with --resume" in capsys.readouterr().err
    resumed = Trainer(config(toy_model, toy_data, tmp_path / "b", steps=4, resume=True)).run(progress=False)
    assert resumed.losses == full.losses


@pytest.mark.parametrize("variant", ["base", "plus"])
def test_fast_path_loss_equals_the_reference_recipe(toy_model, toy_data, tmp_path, variant):
    # High drop rates so that the first batch holds every case: image, text, both dropped.
    kw = dict(variant=variant, drop_image=0.25, drop_text=0.25, drop_both=0.25)
    ref = Trainer(config(toy_model, toy_data, tmp_path / "r", fast=False, **kw))
    fast = Trainer(config(toy_model, toy_data, tmp_path / "f", fast=True, **kw))
    d = ref.draw(0)
    assert d.drop_image.any() and d.drop_text.any() and (d.drop_image & d.drop_text).any()
    with torch.no_grad():
        assert abs(ref.loss(0).item() - fast.loss(0).item()) <= 1e-3


def test_drop_rates_follow_the_recipe(toy_model, toy_data, tmp_path):
    from ipa_lab.train import draw

    cfg = config(toy_model, toy_data, tmp_path, batch_size=1000, drop_image=0.05, drop_text=0.05, drop_both=0.05)
    d = draw(0, cfg, 40, (4, 8, 8), 1000)
    both = (d.drop_image & d.drop_text).float().mean().item()
    only_image = (d.drop_image & ~d.drop_text).float().mean().item()
    only_text = (d.drop_text & ~d.drop_image).float().mean().item()
    for f in (both, only_image, only_text):
        assert 0.02 < f < 0.09


def test_a_damaged_or_mismatched_checkpoint_is_refused(toy_model, toy_data, tmp_path):
    Trainer(config(toy_model, toy_data, tmp_path, steps=2)).run(progress=False)
    with pytest.raises(ValueError, match="variant='base'.*'plus'"):
        Trainer(config(toy_model, toy_data, tmp_path, steps=4, resume=True, variant="plus")).run(progress=False)
    state = tmp_path / "run" / "training_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(ValueError, match="damaged"):
        Trainer(config(toy_model, toy_data, tmp_path, steps=4, resume=True)).run(progress=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume"):
        Trainer(config(toy_model, toy_data, tmp_path / "new", steps=4, resume=True)).run(progress=False)


def test_bad_command_lines_fail_at_once_with_a_message(toy_model, toy_data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--steps", "-3"])
    assert "--steps must be >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no training data at"):
        main(["--data", str(tmp_path / "nope"), "--model", toy_model])
    with pytest.raises(SystemExit, match="not a diffusers pipeline"):
        main(["--data", toy_data, "--model", str(tmp_path)])
    with pytest.raises(SystemExit):
        parse_args(["--drop-text", "1.5"])
    assert "drop_text must be a probability" in capsys.readouterr().err


def test_original_recipe_flag():
    cfg = parse_args(["--original-recipe"])
    assert (cfg.lr, cfg.drop_image, cfg.drop_text, cfg.drop_both, cfg.weight_decay) == (1e-4, 0.05, 0.05, 0.05, 0.01)
    assert dataclasses.asdict(cfg)["num_tokens"] == 4
