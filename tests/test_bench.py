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
