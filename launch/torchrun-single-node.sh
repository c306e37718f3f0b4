#!/usr/bin/env bash
# Data-parallel training on the GPUs of this machine: one process per GPU, torchrun --standalone
# (rendezvous on a free local port, so several jobs can share the machine).
#
# Usage: launch/torchrun-single-node.sh [resnetdist train ARGS...]
#   launch/torchrun-single-node.sh --n 7 --plain --out runs/plain44
#   NPROC=2 launch/torchrun-single-node.sh --config configs/resnet110.toml
# Same as `resnetdist train --nproc-per-node N ARGS`.
#
# Variables (all optional):
#   NPROC          processes (GPUs) on this node (default: GPUs that nvidia-smi lists, else 1;
#                  on CPU add `--device cpu` to ARGS: ranks then use gloo)
#   MAX_RESTARTS   torchrun --max-restarts: elastic restarts of the whole group after a worker
#                  dies or reports a hang (exit 7); training resumes from the last checkpoint
#                  (default 0 on one machine: the job ends, its last line saying how to resume
#                  and that MAX_RESTARTS=N restarts it; the multi-node and Slurm scripts default to 3)
#   PYTHON         python that has resnetdist installed (default python3); torchrun is run
#                  as `$PYTHON -m torch.distributed.run`
#   OMP_NUM_THREADS  CPU threads per process (torchrun's default: 1)
#   DRY_RUN        1: print the command instead of running it
set -euo pipefail
# shellcheck source=launch/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

PYTHON="${PYTHON:-python3}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
DRY_RUN="${DRY_RUN:-0}"

NPROC="${NPROC:-$(gpu_count)}"

cmd=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC"
    --max-restarts="$MAX_RESTARTS" -m resnetdist -- train "$@")
run_or_print "${cmd[@]}"
