"""Two processes (torchrun, gloo on the CPU) train the same adapter as one process with the
same global batch: each draws its slice of the global batch, DDP averages the gradients."""
from __future__ import annotations

import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from ipa_lab.trainer import read_log


def test_two_processes_equal_one_process_with_the_same_global_batch(toy_model, toy_data, tmp_path):
    common = ["--model", toy_model, "--data", toy_data, "--steps", "3", "--device", "cpu",
              "--cache-dir", str(tmp_path / "cache"), "--lr", "1e-2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    one = subprocess.run([sys.executable, "-m", "ipa_lab.train", *common, "--batch-size", "8",
                          "--output", str(tmp_path / "one")], capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "ipa_lab.train", *common, "--batch-size", "4", "--output", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("trained 3 steps") == 1  # one report, from the main process
    a, b = load_file(tmp_path / "one" / "ip_adapter.safetensors"), load_file(tmp_path / "two" / "ip_adapter.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    losses_one, losses_two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert [s for s, _ in losses_one] == [s for s, _ in losses_two] == [0, 1, 2]
    assert all(abs(x - y) < 1e-4 for (_, x), (_, y) in zip(losses_one, losses_two))
