#!/usr/bin/env bash
# Data-parallel training across machines: run this script once on EVERY node, with the same
# RDZV_ENDPOINT and RDZV_ID. torchrun's c10d rendezvous (hosted by the node whose address is
# RDZV_ENDPOINT) gathers the nodes, assigns ranks, and with MAX_RESTARTS > 0 restarts the
# whole group from the last checkpoint when a worker or node fails.
#
# Usage: launch/torchrun-multi-node.sh [resnetdist train ARGS...]
#   # on node0 (10.1.2.3) and node1, same command:
#   NNODES=2 NPROC=4 RDZV_ENDPOINT=10.1.2.3:29500 RDZV_ID=r56-s0 \
#       launch/torchrun-multi-node.sh --n 9 --out /shared/runs/resnet56
# Storage: rank 0 alone writes the run directory (--out) and alone reads it on a restart (the
# checkpoint's state reaches the other ranks over the network), so it may be node-local. Rank 0
# is on the node whose hostname sorts first (the c10d rendezvous sorts the nodes by name), at
# every restart; put --out on shared storage if that node itself may be lost. The data folder
# (--data-dir, and the .beton files with data.loader=ffcv) must exist on every node; a node
# without it stops the job at start with one line naming the host and path (docs/multi-node.md).
#
# Variables:
#   NNODES         required: number of nodes, or MIN:MAX for an elastic range (e.g. 2:4)
#   RDZV_ENDPOINT  required: HOST:PORT of the rendezvous; HOST is one of the nodes (the first
#                  to start hosts the c10d store there), PORT free on it (e.g. 29500)
#   RDZV_ID        job id, the same on all nodes, unique per job (default resnetdist)
#   NPROC          processes (GPUs) per node (default: GPUs nvidia-smi lists, else 1)
#   MAX_RESTARTS   torchrun --max-restarts (default 3)
#   RDZV_CONF      extra --rdzv-conf, e.g. join_timeout=900 (default: none)
#   PYTHON         python with resnetdist installed (default python3)
#   NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME  network interface for NCCL / gloo, if the
#                  default route's one is wrong (exported as given)
#   DRY_RUN        1: print the command instead of running it
set -euo pipefail
# shellcheck source=launch/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

PYTHON="${PYTHON:-python3}"
RDZV_ID="${RDZV_ID:-resnetdist}"
MAX_RESTARTS="${MAX_RESTARTS:-3}"
RDZV_CONF="${RDZV_CONF:-}"
DRY_RUN="${DRY_RUN:-0}"

if [[ -z "${NNODES:-}" || -z "${RDZV_ENDPOINT:-}" ]]; then
    echo "set NNODES and RDZV_ENDPOINT (HOST:PORT), e.g." >&2
    echo "  NNODES=2 RDZV_ENDPOINT=node0:29500 $0 --n 9" >&2
    exit 2
fi
NPROC="${NPROC:-$(gpu_count)}"

cmd=("$PYTHON" -m torch.distributed.run
    --nnodes="$NNODES" --nproc_per_node="$NPROC"
    --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="$RDZV_ID"
    --max-restarts="$MAX_RESTARTS")
if [[ -n "$RDZV_CONF" ]]; then cmd+=(--rdzv-conf="$RDZV_CONF"); fi
cmd+=(-m resnetdist -- train "$@")

run_or_print "${cmd[@]}"
