"""The training loop on tiny settings: it learns, trains only the adapter, resumes exactly,
keeps every tensor of a step on the step's device, and refuses what would lose or mix work."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ipa_lab.train import TrainConfig, main, parse_args, preflight
from ipa_lab.trainer import Trainer, draw_step, load_backbone, read_log


def config(toy_model, toy_data, tmp_path, **kw) -> TrainConfig:
    base = dict(model=toy_model, data=toy_data, output=str(tmp_path / "run"), steps=4, batch_size=8,
                checkpoint_every=2, device="cpu", verify_frozen=0, cache_dir=str(tmp_path.parent / "cache"))
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
    assert report["frozen_changed"] == [] and report["frozen_tensors"] == report["frozen_total"] > 100
    assert report["trainable_unmoved"] == [] and report["trainable_tensors"] == len(trainable)


def test_the_frozen_models_stay_in_eval_mode_while_the_adapter_trains(toy_model, toy_data, tmp_path):
    trainer = Trainer(config(toy_model, toy_data, tmp_path, steps=1))
    trainer.run(progress=False)
    trained = {id(m) for part in (trainer.ip_adapter.image_proj_model, trainer.ip_adapter.adapter_modules)
               for m in part.modules()}
    for name, model in trainer.bb.frozen().items():
        in_train_mode = [n for n, m in model.named_modules() if m.training and id(m) not in trained]
        assert in_train_mode == [], f"{name}: {in_train_mode[:5]}"
    assert trainer.ip_adapter.image_proj_model.training


def test_frozen_proof_hashes_a_spread_sample_by_default(toy_model, toy_data, tmp_path):
    result = Trainer(config(toy_model, toy_data, tmp_path, steps=1, verify_frozen=3)).run(progress=False)
    assert result.report["frozen_tensors"] == 4 * 3 < result.report["frozen_total"]
    assert result.report["frozen_changed"] == []


def test_resume_is_bitwise_equal_to_an_uninterrupted_run(toy_model, toy_data, tmp_path):
    full = Trainer(config(toy_model, toy_data, tmp_path / "a", steps=4)).run(progress=False)
    Trainer(config(toy_model, toy_data, tmp_path / "b", steps=2)).run(progress=False)
    resumed = Trainer(config(toy_model, toy_data, tmp_path / "b", steps=4, resume=True)).run(progress=False)
    assert resumed.losses == full.losses == read_log(resumed.output)
    a = load_file(full.output / "ip_adapter.safetensors")
    b = load_file(resumed.output / "ip_adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _run_interrupted(trainer, at_step: int, interrupt) -> None:
    """Run `trainer`, calling `interrupt()` as step `at_step` begins; the run must end in KeyboardInterrupt."""
    real_step = trainer.train_step

    def step(s, batch=None):
        if s == at_step:
            interrupt()
        return real_step(s)

    trainer.train_step = step
    with pytest.raises(KeyboardInterrupt):
        trainer.run(progress=False)


def test_ctrl_c_saves_first_and_resume_finishes_the_same_run(toy_model, toy_data, tmp_path, capsys):
    full = Trainer(config(toy_model, toy_data, tmp_path / "a", steps=4)).run(progress=False)
    stopped = Trainer(config(toy_model, toy_data, tmp_path / "b", steps=4))

    def press_ctrl_c():
        raise KeyboardInterrupt

    _run_interrupted(stopped, at_step=3, interrupt=press_ctrl_c)
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


def test_the_reference_path_reads_through_a_dataloader_with_workers(toy_model, toy_data, tmp_path):
    one = Trainer(config(toy_model, toy_data, tmp_path / "a", fast=False, steps=2)).run(progress=False)
    two = Trainer(config(toy_model, toy_data, tmp_path / "b", fast=False, steps=2, num_workers=2)).run(progress=False)
    assert one.losses == two.losses


@pytest.mark.parametrize("fast", [True, False])
def test_every_tensor_of_a_step_lives_on_the_step_device(toy_model, toy_data, tmp_path, fast):
    # On the meta device every op mixing in a tensor left on the CPU raises: this is how a step
    # that would fail on CUDA (a CPU index into a GPU cache, say) is caught without a GPU.
    trainer = Trainer(config(toy_model, toy_data, tmp_path, fast=fast, drop_image=0.3, drop_text=0.3, drop_both=0.3))
    meta = torch.device("meta")
    trainer.ip_adapter.to(meta)
    for model in trainer.bb.frozen().values():
        model.to(meta)
    trainer.device = meta
    if fast:
        trainer.inputs = type(trainer.inputs)(trainer.inputs.folder, meta)
    with torch.no_grad():
        loss = trainer.loss(0)
    assert loss.device == meta and loss.shape == ()


def test_v_prediction_trains_on_the_velocity_and_other_targets_are_refused(toy_model, toy_data, tmp_path):
    from diffusers import DDPMScheduler

    bb = load_backbone(toy_model, "cpu")
    bb.noise_scheduler = DDPMScheduler.from_config(bb.noise_scheduler.config, prediction_type="v_prediction")
    trainer = Trainer(config(toy_model, toy_data, tmp_path), backbone=bb)
    d = trainer.draw(0)
    latents, text, image = trainer.inputs(d, trainer.device)
    t = d.timesteps
    noisy = bb.noise_scheduler.add_noise(latents, d.noise, t)
    with torch.no_grad():
        pred = trainer.ip_adapter(noisy, t, text, image)
        velocity = bb.noise_scheduler.get_velocity(latents, d.noise, t)
        assert torch.allclose(trainer.loss(0), torch.nn.functional.mse_loss(pred, velocity), atol=1e-6)
        assert not torch.allclose(trainer.loss(0), torch.nn.functional.mse_loss(pred, d.noise), atol=1e-3)
    bb2 = load_backbone(toy_model, "cpu")
    bb2.noise_scheduler = DDPMScheduler.from_config(bb2.noise_scheduler.config, prediction_type="sample")
    with pytest.raises(ValueError, match="prediction_type is 'sample'.*epsilon and v_prediction"):
        Trainer(config(toy_model, toy_data, tmp_path / "x"), backbone=bb2)


def test_drop_rates_follow_the_recipe(toy_model, toy_data, tmp_path):
    cfg = config(toy_model, toy_data, tmp_path, batch_size=1000, drop_image=0.05, drop_text=0.05, drop_both=0.05)
    d = draw_step(0, cfg, 40, (4, 8, 8), 1000)
    both = (d.drop_image & d.drop_text).float().mean().item()
    only_image = (d.drop_image & ~d.drop_text).float().mean().item()
    only_text = (d.drop_text & ~d.drop_image).float().mean().item()
    for f in (both, only_image, only_text):
        assert 0.02 < f < 0.09


def test_n_processes_draw_the_global_batch_of_one_process(toy_model, toy_data, tmp_path):
    one = draw_step(5, config(toy_model, toy_data, tmp_path, batch_size=8), 40, (4, 8, 8), 1000)
    parts = [draw_step(5, config(toy_model, toy_data, tmp_path, batch_size=4), 40, (4, 8, 8), 1000, rank=r, world=2)
             for r in range(2)]
    for field in ("indices", "latent_eps", "noise", "timesteps", "drop_image", "drop_text"):
        assert torch.equal(getattr(one, field), torch.cat([getattr(p, field) for p in parts])), field


def test_a_damaged_or_mismatched_checkpoint_is_refused(toy_model, toy_data, tmp_path):
    Trainer(config(toy_model, toy_data, tmp_path, steps=2)).run(progress=False)
    with pytest.raises(ValueError, match="variant: saved 'base', now 'plus'"):
        Trainer(config(toy_model, toy_data, tmp_path, steps=4, resume=True, variant="plus")).run(progress=False)
    state = tmp_path / "run" / "training_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(ValueError, match="damaged"):
        Trainer(config(toy_model, toy_data, tmp_path, steps=4, resume=True)).run(progress=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume"):
        Trainer(config(toy_model, toy_data, tmp_path / "new", steps=4, resume=True)).run(progress=False)


def test_resume_with_changed_settings_lists_every_difference(toy_model, toy_data, tmp_path):
    Trainer(config(toy_model, toy_data, tmp_path, steps=2)).run(progress=False)
    changed = config(toy_model, toy_data, tmp_path, steps=4, resume=True, lr=5e-4, drop_text=0.1, batch_size=4)
    with pytest.raises(ValueError) as error:
        Trainer(changed).run(progress=False)
    message = str(error.value)
    for difference in ("lr: saved 0.001, now 0.0005", "drop_text: saved 0.5, now 0.1", "global_batch: saved 8, now 4"):
        assert difference in message, message
    # Settings that do not change the numbers may change: more steps, another checkpoint interval.
    Trainer(config(toy_model, toy_data, tmp_path, steps=3, resume=True, checkpoint_every=1)).run(progress=False)


def test_an_existing_run_is_never_overwritten_silently(toy_model, toy_data, tmp_path, capsys):
    out = tmp_path / "run"
    Trainer(config(toy_model, toy_data, tmp_path, steps=2)).run(progress=False)
    before = (out / "ip_adapter.safetensors").read_bytes()
    for steps in ("0", "2"):
        with pytest.raises(SystemExit, match="already holds a training run.*--resume.*--overwrite"):
            main(["--model", toy_model, "--data", toy_data, "--output", str(out), "--steps", steps])
    assert (out / "ip_adapter.safetensors").read_bytes() == before
    main(["--model", toy_model, "--data", toy_data, "--output", str(out), "--steps", "1", "--batch-size", "4",
          "--overwrite", "--device", "cpu", "--cache-dir", str(tmp_path / "cache")])
    assert [s for s, _ in read_log(out)] == [0]
    capsys.readouterr()


def test_one_commit_point_the_loss_log_comes_back_from_the_state(toy_model, toy_data, tmp_path):
    trainer = Trainer(config(toy_model, toy_data, tmp_path, steps=2))
    trainer.run(progress=False)
    out = trainer.output
    (out / "loss.csv").write_text("step,loss\n0,1.0\n")  # as if a kill had hit the log's write
    (out / ".loss.csv.x1.tmp").write_text("half a file")
    resumed = Trainer(config(toy_model, toy_data, tmp_path, steps=3, resume=True))
    assert not (out / ".loss.csv.x1.tmp").exists()  # stale temp files are cleaned on start
    result = resumed.run(progress=False)
    assert [s for s, _ in read_log(out)] == [0, 1, 2] and read_log(out)[:2] == trainer.losses == result.losses[:2]


def test_warnings_for_settings_that_would_surprise(toy_model, toy_data, tmp_path):
    with pytest.warns(UserWarning, match="larger than the data set"):
        Trainer(config(toy_model, toy_data, tmp_path, batch_size=64))
    warnings = preflight(config(toy_model, toy_data, tmp_path / "b", num_tokens=8))
    assert any("diffusers' load_ip_adapter assumes 4 tokens" in w for w in warnings)
    assert preflight(config(toy_model, toy_data, tmp_path / "c", variant="plus", num_tokens=8)) == []


def test_bad_command_lines_fail_at_once_with_a_message(toy_model, toy_data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--steps", "-3"])
    assert "steps=-3" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="data folder .* does not exist"):
        main(["--data", str(tmp_path / "nope"), "--model", toy_model])
    with pytest.raises(SystemExit, match="not a diffusers pipeline"):
        main(["--data", toy_data, "--model", str(tmp_path)])
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit, match="--output .* is a file"):
        main(["--data", toy_data, "--model", toy_model, "--output", str(tmp_path / "a-file")])
    with pytest.raises(SystemExit):
        parse_args(["--drop-text", "1.5"])
    assert "drop_text must be a probability" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--resume", "--overwrite"])
    assert "contradict" in capsys.readouterr().err


def test_command_line_errors_come_before_torch_is_imported(toy_data, tmp_path):
    # What makes an error fast: nothing heavy is imported before the settings are checked
    # (importing torch and diffusers takes seconds). Checked in a fresh interpreter.
    script = ("import sys\nfrom ipa_lab.train import main\n"
              "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    print(e)\n"
              "print('heavy:', sorted(m for m in ('torch', 'diffusers', 'transformers', 'numpy') if m in sys.modules))")
    cases = [(["--data", str(tmp_path / "nope")], "data folder"),
             (["--data", toy_data, "--model", str(tmp_path / "no-model")], "no such folder"),
             (["--data", toy_data, "--model", "someone/not-cached"], "not in the local Hugging Face cache"),
             (["--batch-size", "0"], "batch_size=0")]
    for argv, expected in cases:
        out = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True,
                             env={"PATH": "", "HF_HUB_CACHE": str(tmp_path / "hub")})
        text = out.stdout + out.stderr
        assert expected in text and "heavy: []" in out.stdout, text


def test_command_line_settings():
    cfg = parse_args(["--original-recipe"])
    assert (cfg.lr, cfg.drop_image, cfg.drop_text, cfg.drop_both, cfg.weight_decay) == (1e-4, 0.05, 0.05, 0.05, 0.01)
    assert dataclasses.asdict(cfg)["num_tokens"] == 4
    explicit = parse_args(["--original-recipe", "--lr", "3e-4", "--drop-text", "0.2"])
    assert (explicit.lr, explicit.drop_text, explicit.drop_image) == (3e-4, 0.2, 0.05)  # explicit flags win
    assert parse_args(["--resolution", "64"]).resolution == 64
    assert (parse_args([]).lr, parse_args([]).drop_text) == (1e-3, 0.5)


def test_the_saved_config_is_the_run_config(toy_model, toy_data, tmp_path):
    trainer = Trainer(config(toy_model, toy_data, tmp_path, steps=1))
    trainer.run(progress=False)
    state = torch.load(trainer.output / "training_state.pt", weights_only=True)
    assert json.loads(state["config"]) == dataclasses.asdict(trainer.cfg) and state["step"] == 1


def test_ctrl_c_during_a_step_finishes_that_step_then_saves(toy_model, toy_data, tmp_path, capsys):
    import os
    import signal

    full = Trainer(config(toy_model, toy_data, tmp_path / "a", steps=4)).run(progress=False)
    stopped = Trainer(config(toy_model, toy_data, tmp_path / "b", steps=4))
    # SIGINT arrives while step 1 is running
    _run_interrupted(stopped, at_step=1, interrupt=lambda: os.kill(os.getpid(), signal.SIGINT))
    assert "saved step 2" in capsys.readouterr().err  # step 1 was finished, not abandoned
    state = torch.load(stopped.output / "training_state.pt", weights_only=True)
    assert state["step"] == 2 and len(state["losses"]) == 2
    resumed = Trainer(config(toy_model, toy_data, tmp_path / "b", steps=4, resume=True)).run(progress=False)
    assert resumed.losses == full.losses


def test_resume_settings_are_checked_before_any_model_loads(toy_model, toy_data, tmp_path, monkeypatch):
    import ipa_lab.trainer as trainer_module

    Trainer(config(toy_model, toy_data, tmp_path, steps=2)).run(progress=False)

    def no_loading(*args, **kwargs):
        raise AssertionError("the models were loaded before the settings were checked")

    monkeypatch.setattr(trainer_module, "load_backbone", no_loading)
    with pytest.raises(ValueError, match="lr: saved 0.001, now 0.002"):
        Trainer(config(toy_model, toy_data, tmp_path, steps=4, resume=True, lr=2e-3))


def test_resume_without_a_state_restarts_only_a_run_that_never_completed_a_checkpoint(toy_model, toy_data, tmp_path):
    Trainer(config(toy_model, toy_data, tmp_path, steps=4)).run(progress=False)
    (tmp_path / "run" / "training_state.pt").unlink()  # a finished run whose state was deleted
    with pytest.raises(FileNotFoundError, match="holds a run of 4 steps but no training_state.pt.*--overwrite"):
        Trainer(config(toy_model, toy_data, tmp_path, steps=6, resume=True))


def test_the_plain_loop_trains_the_same_adapter_as_trainer_run(toy_model, toy_data, tmp_path):
    """Notebook 04's loop (train_loop + training_step, plain PyTorch) and Trainer.run (accelerate,
    checkpoints) take the same steps: bitwise the same adapter after 3 steps."""
    from ipa_lab.trainer import Trainer, train_loop

    def make(name):
        return Trainer(config(toy_model, toy_data, tmp_path, output=str(tmp_path / name), steps=3,
                              checkpoint_every=100))

    plain, ours = make("plain"), make("run")
    losses = train_loop(plain, 3)
    result = ours.run(progress=False)
    assert losses == [loss for _, loss in result.losses]
    for a, b in zip(plain.ip_adapter.parameters(), ours.ip_adapter.parameters()):
        assert torch.equal(a, b)


def test_the_command_line_refuses_a_bad_thread_setting(toy_model, toy_data, tmp_path, monkeypatch):
    """IPA_LAB_THREADS is read by the command line too, and a bad value stops it with its name."""
    monkeypatch.setenv("IPA_LAB_THREADS", "two")
    with pytest.raises(SystemExit, match="IPA_LAB_THREADS is 'two'"):
        main(["--model", toy_model, "--data", toy_data, "--output", str(tmp_path / "run"), "--steps", "1"])
