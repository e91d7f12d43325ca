#!/usr/bin/env bash
# Several kernels on the same cores: how much slower is a training job when others share its cores?
#
# Times the toy training run (`python -m ipa_lab.train --device cpu --steps N`: model load, N steps,
# one checkpoint) pinned to a set of cores with taskset:
#   1. one job alone, PyTorch's default threads (one per core it may use)
#   2. four jobs at once, default threads
#   3. four jobs at once, OMP_NUM_THREADS=1
#   4. one job alone, OMP_NUM_THREADS=1
# and prints the wall clock of each (for 2 and 3: from the first start to the last finish) and its
# ratio to run 1. docs/teaching.md quotes a measurement and explains what it means for a shared
# JupyterHub server.
#
# Run from the repository root:
#     bash docs/contention.sh
# Settings (environment variables):
#     CORES=0,1          the cores every job is pinned to (taskset -c); default 0,1
#     STEPS=30           training steps per job; default 30
#     PYTHON=...         the interpreter; default .venv/bin/python if present, else python3
#     SKIP_DEFAULT=1     skip runs 1 and 2 (four jobs with default threads take the longest)
#     IPA_LAB_WHEELS=DIR only for a machine whose Python lacks the pinned packages: when `diffusers`
#                        cannot be imported, install the wheels in DIR (no dependencies) into a
#                        temporary folder put on PYTHONPATH. Without it such a machine stops here.
# Everything the jobs write (runs, logs, the encoder cache) goes to a temporary folder, removed at
# the end. The jobs run on the CPU even on a GPU machine, offline.
set -euo pipefail

[ -f pyproject.toml ] && [ -d ipa_lab ] || { echo "run this from the repository root: bash docs/contention.sh" >&2; exit 2; }
command -v taskset >/dev/null || { echo "taskset (util-linux) is needed to pin the jobs to CORES" >&2; exit 2; }

CORES=${CORES:-0,1}
STEPS=${STEPS:-30}
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/ipa-contention.XXXXXX")
trap 'rm -rf "$work"' EXIT

# The repository's ipa_lab first on the path; the jobs see no GPU, never download, draw no progress bars.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TQDM_DISABLE=1 HF_HUB_OFFLINE=1 CUDA_VISIBLE_DEVICES=

# Optional: a machine without the pinned packages (e.g. a lent GPU machine with its own torch).
if ! "$PYTHON" -c "import diffusers" 2>/dev/null; then
    if [ -z "${IPA_LAB_WHEELS:-}" ]; then
        echo "$PYTHON cannot import diffusers: install the course (pip install -e .) or set IPA_LAB_WHEELS" >&2
        exit 2
    fi
    "$PYTHON" -m pip install -q --no-deps --target "$work/packages" "$IPA_LAB_WHEELS"/*.whl
    export PYTHONPATH="$work/packages:$PYTHONPATH"
fi

# What was measured on: the CPU, the versions, and the threads PyTorch picks on these cores.
lscpu | grep -i "model name" || true
taskset -c "$CORES" "$PYTHON" -c "import torch, diffusers; print('torch', torch.__version__, '| diffusers', \
diffusers.__version__, '| threads PyTorch picks on cores $CORES:', torch.get_num_threads())"

# job ID: one training run pinned to CORES; its output and log are its own, the encoder cache is shared.
job() {
    taskset -c "$CORES" "$PYTHON" -m ipa_lab.train --device cpu --steps "$STEPS" --output "$work/run$1" \
        --overwrite --cache-dir "$work/cache" --checkpoint-every 100000 > "$work/log$1" 2>&1 \
        || { echo "job $1 failed; its log:" >&2; cat "$work/log$1" >&2; exit 1; }
}
now() { date +%s.%N; }
seconds() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

# Warm-up: one step builds the encoder cache, so no timed job pays for it.
STEPS=1 job 0
tail -n 2 "$work/log0"

alone=""
report() {  # report WHAT SECONDS: the time, and its ratio to one job alone with default threads
    if [ -n "$alone" ]; then
        echo "$1: $2 s ($(awk -v t="$2" -v a="$alone" 'BEGIN { printf "%.1f", t / a }')x one job alone)"
    else
        echo "$1: $2 s"
    fi
}

if [ -z "${SKIP_DEFAULT:-}" ]; then
    t0=$(now); job 1; t1=$(now)
    report "one job alone, default threads" "$(seconds "$t0" "$t1")"
    alone=$(seconds "$t0" "$t1")  # the yardstick of the ratios below

    t0=$(now)
    pids=(); for i in 1 2 3 4; do job "$i" & pids+=($!); done
    for pid in "${pids[@]}"; do wait "$pid"; done
    t1=$(now)
    report "four jobs at once, default threads" "$(seconds "$t0" "$t1")"
fi

t0=$(now)
pids=(); for i in 1 2 3 4; do OMP_NUM_THREADS=1 job "$i" & pids+=($!); done
for pid in "${pids[@]}"; do wait "$pid"; done
t1=$(now)
report "four jobs at once, OMP_NUM_THREADS=1" "$(seconds "$t0" "$t1")"

t0=$(now); OMP_NUM_THREADS=1 job 1; t1=$(now)
report "one job alone, OMP_NUM_THREADS=1" "$(seconds "$t0" "$t1")"

tail -n 3 "$work/log1"  # the last job's own summary: steps, loss, where it wrote
