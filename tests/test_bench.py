"""The benchmark's machinery on tiny settings (its numbers come from the script, not tests)."""
from __future__ import annotations

from ipa_lab.bench import SWITCHES, parse_args, run_one


def test_one_configuration_reports_speed_and_memory(toy_model, toy_data):
    args = parse_args(["--model", toy_model, "--data", toy_data, "--batch-size", "4", "--steps", "1",
                       "--repeats", "2", "--warmup", "1", "--device", "cpu", "--count-flops"])
    for overrides in ({"fast": False}, {"fast": True}):
        r = run_one(args, overrides)
        assert r["steps_per_s"] > 0 and r["peak_memory_bytes"] > 0 and r["flops_per_step"] > 0
        assert r["device"] == "cpu" and r["resolution"] == 32


def test_switches_start_from_the_reference_and_are_cumulative():
    assert SWITCHES[0][1] == {"fast": False}
    names = [s[0] for s in SWITCHES]
    assert len(set(names)) == len(names)
    assert all(need is None for _, _, need in SWITCHES[:2])  # every machine runs the first two rows


def test_sd15_defaults():
    a = parse_args(["--size", "sd15", "--device", "cpu"])
    assert (a.batch_size, a.resolution) == (8, 512)


def test_activation_bytes_is_the_measured_step_of_the_toy():
    """The meta-device count equals the saved tensors of a real CPU step of the toy (math attention)
    exactly; a fused attention kernel keeps less, within 10% here (the attention probabilities)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ipa_lab.adapter import freeze, install_ip_adapter
    from ipa_lab.bench import activation_bytes, saved_tensor_bytes
    from ipa_lab.configs import build_unet

    counted = activation_bytes("toy_unet", batch=16, resolution=64, text_tokens=16)
    assert counted == activation_bytes("toy_unet", batch=16, resolution=64, text_tokens=16, device="cpu")
    torch.manual_seed(0)
    unet = build_unet("toy_unet", device="cpu")
    freeze(unet)
    install_ip_adapter(unet)
    image = torch.randn(16, 4, 64, requires_grad=True)
    states = torch.cat([torch.randn(16, 16, 64), image], 1)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        fused = saved_tensor_bytes(lambda: unet(torch.randn(16, 4, 8, 8), torch.zeros(16, dtype=torch.long), states),
                                   unet)
    assert 0.9 * counted < fused < counted
    # Linear in the batch.
    assert activation_bytes("toy_unet", batch=32, resolution=64, text_tokens=16) == 2 * counted
