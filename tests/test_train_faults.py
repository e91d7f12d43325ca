"""Nothing is lost when a run is killed: SIGKILL at every write point of a checkpoint, then
--resume, ends bitwise equal to a run that was never interrupted, with a complete loss log.

Each run is a real `python -m ipa_lab.train` process. A kill is injected by wrapping os.replace
(the rename that makes each file of a checkpoint appear, see checkpoint.write_atomically) so
that the process SIGKILLs itself just before or just after the rename of a chosen file."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

KILLER = """
import os, signal, sys
target, when, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
real, seen = os.replace, [0]
def replace(src, dst, *args, **kwargs):
    hit = os.path.basename(dst) == target
    seen[0] += hit
    if hit and seen[0] == nth and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst, *args, **kwargs)
    if hit and seen[0] == nth and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
from ipa_lab.train import main
main(sys.argv[4:])
"""


def _train(args: list[str], kill: tuple[str, str, int] | None = None) -> subprocess.CompletedProcess:
    kill = kill or ("-", "never", 0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, "-c", KILLER, kill[0], kill[1], str(kill[2]), *args],
                          capture_output=True, text=True, env=env)


def test_sigkill_at_every_write_point_then_resume_is_bitwise_equal(toy_model, toy_data, tmp_path):
    common = ["--model", toy_model, "--data", toy_data, "--steps", "8", "--batch-size", "4",
              "--checkpoint-every", "2", "--device", "cpu", "--cache-dir", str(tmp_path / "cache")]
    reference = tmp_path / "reference"
    done = _train(common + ["--output", str(reference)])
    assert done.returncode == 0, done.stderr

    out = tmp_path / "killed"
    chain = [  # (file whose rename is hit, before/after the rename, at its n-th rename in that process)
        ("ip_adapter.safetensors", "after", 1),   # step 2: nothing committed yet
        ("ip_adapter.safetensors", "before", 2),  # step 4: step 2 committed
        ("loss.csv", "before", 1),
        ("loss.csv", "after", 1),
        ("training_state.pt", "before", 1),
        ("training_state.pt", "after", 1),        # step 4 committed
    ]
    for i, kill in enumerate(chain):
        run = _train(common + ["--output", str(out)] + (["--resume"] if i else []), kill)
        assert run.returncode == -9, (kill, run.returncode, run.stderr[-2000:])
    final = _train(common + ["--output", str(out), "--resume"])
    assert final.returncode == 0, final.stderr

    a, b = load_file(reference / "ip_adapter.safetensors"), load_file(out / "ip_adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "loss.csv").read_text() == (reference / "loss.csv").read_text()
    assert len((out / "loss.csv").read_text().splitlines()) == 1 + 8
    state_a = torch.load(reference / "training_state.pt", weights_only=True)
    state_b = torch.load(out / "training_state.pt", weights_only=True)
    assert torch.equal(state_a["losses"], state_b["losses"]) and state_b["step"] == 8
    assert sorted(p.name for p in Path(out).iterdir()) == ["ip_adapter.safetensors", "loss.csv", "training_state.pt"]
