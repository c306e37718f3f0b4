#!/usr/bin/env bash
# Run resnetdist in its Docker image (docker/Dockerfile).
#
# Usage: launch/docker-run.sh COMMAND [ARGS...]
#   build            docker build the image ($IMAGE) from this checkout
#   prepare [ARGS]   write FFCV .beton files into the data volume ($DATA_DIR/beton), no GPU
#   train [ARGS]     one process (one GPU): resnetdist train ARGS
#   torchrun [ARGS]  $NPROC processes on this node: torchrun --standalone
#                    --nproc_per_node=$NPROC -m resnetdist train ARGS
#   eval|report|bench [ARGS]   the other resnetdist commands (report reads /runs/...)
#   shell            an interactive bash in the image
# ARGS go to resnetdist unchanged, e.g.
#   launch/docker-run.sh prepare
#   launch/docker-run.sh train --n 3 --out /runs/resnet20
#   NPROC=4 launch/docker-run.sh torchrun --n 7 --plain --out /runs/plain44
#   launch/docker-run.sh report /runs
# Inside the container: CIFAR-10 is looked for in /data (= $DATA_DIR: put
# cifar-10-batches-bin/ or the tarball there), runs go to /runs (= $RUNS_DIR), and the
# working directory holds configs/ (the shipped ones) and runs -> /runs, so
# `train --config configs/resnet56.toml` works and writes to $RUNS_DIR/resnet56-s0.
#
# Variables (all optional):
#   IMAGE        image to run / build            (default resnetdist:latest)
#   DATA_DIR     host folder mounted at /data    (default ./data; created if missing)
#   RUNS_DIR     host folder mounted at /runs    (default ./runs; created if missing)
#   WANDB_HOST_DIR  host folder mounted at /wandb (default: none, a Docker-managed volume)
#   GPUS         value of --gpus                 (default all; empty or "none": no --gpus, CPU;
#                                                 e.g. '"device=0,1"' for two of them)
#   NPROC        processes for `torchrun`        (default: GPUs that nvidia-smi lists, else 1)
#   MAX_RESTARTS torchrun --max-restarts         (default 0: a hang or a dead worker ends the job,
#                saying how to resume; N restarts it from the newest checkpoint)
#   RUN_AS       --user for the container        (default "$(id -u):$(id -g)", so files in
#                                                 DATA_DIR/RUNS_DIR belong to you; "image":
#                                                 the image's own non-root user)
#   NETWORK      --network                       (default: Docker's default; "none" offline)
#   DOCKER       docker command                  (default docker)
#   DOCKER_ARGS  extra `docker run` arguments, word-split (e.g. "--shm-size 8g -e FOO=1")
#   BUILD_ARGS   extra `docker build` arguments, word-split (e.g. "--build-arg BASE_IMAGE=...")
#   DRY_RUN      1: print the docker command instead of running it
# Passed through from your environment when set (never written anywhere):
#   WANDB_API_KEY, WANDB_MODE (online|offline|disabled), WANDB_PROJECT, WANDB_ENTITY,
#   WANDB_BASE_URL, NCCL_DEBUG, TORCH_DISTRIBUTED_DEBUG
set -euo pipefail
# shellcheck source=launch/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"

IMAGE="${IMAGE:-resnetdist:latest}"
DATA_DIR="${DATA_DIR:-./data}"
RUNS_DIR="${RUNS_DIR:-./runs}"
WANDB_HOST_DIR="${WANDB_HOST_DIR:-}"
GPUS="${GPUS-all}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
RUN_AS="${RUN_AS:-$(id -u):$(id -g)}"
NETWORK="${NETWORK:-}"
DOCKER="${DOCKER:-docker}"
DOCKER_ARGS="${DOCKER_ARGS:-}"
BUILD_ARGS="${BUILD_ARGS:-}"
DRY_RUN="${DRY_RUN:-0}"

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }

# docker run with the volumes, user, GPUs and environment; $1 = "gpu" or "cpu".
docker_run_args() {
    local want_gpu="$1"
    mkdir -p "$DATA_DIR" "$RUNS_DIR"
    local data runs
    data="$(cd "$DATA_DIR" && pwd)"
    runs="$(cd "$RUNS_DIR" && pwd)"
    args=(run --rm --init -v "$data:/data" -v "$runs:/runs")
    if [[ -n "$WANDB_HOST_DIR" ]]; then
        mkdir -p "$WANDB_HOST_DIR"
        args+=(-v "$(cd "$WANDB_HOST_DIR" && pwd):/wandb")
    fi
    if [[ -t 0 && -t 1 ]]; then args+=(-it); fi
    if [[ "$RUN_AS" != image ]]; then args+=(--user "$RUN_AS"); fi
    if [[ -n "$NETWORK" ]]; then args+=(--network "$NETWORK"); fi
    if [[ "$want_gpu" == gpu && -n "$GPUS" && "$GPUS" != none ]]; then
        # --ipc=host: DDP / data loading use shared memory beyond Docker's 64 MB default
        args+=(--gpus "$GPUS" --ipc=host)
    fi
    local v
    for v in WANDB_API_KEY WANDB_MODE WANDB_PROJECT WANDB_ENTITY WANDB_BASE_URL NCCL_DEBUG \
        TORCH_DISTRIBUTED_DEBUG; do
        # `-e NAME` copies the value from this environment: the key never shows in `ps`
        if [[ -n "${!v:-}" ]]; then args+=(-e "$v"); fi
    done
    if [[ -n "$DOCKER_ARGS" ]]; then
        local extra
        read -r -a extra <<<"$DOCKER_ARGS"
        args+=("${extra[@]}")
    fi
}

cmd="${1:-help}"
if [[ $# -gt 0 ]]; then shift; fi
args=()
case "$cmd" in
build)
    build=(build -f "$repo/docker/Dockerfile" -t "$IMAGE")
    if [[ -n "$BUILD_ARGS" ]]; then
        read -r -a extra <<<"$BUILD_ARGS"
        build+=("${extra[@]}")
    fi
    run_or_print "$DOCKER" "${build[@]}" "$@" "$repo"
    ;;
prepare)
    docker_run_args cpu
    run_or_print "$DOCKER" "${args[@]}" "$IMAGE" prepare --data-dir /data --out /data/beton "$@"
    ;;
train)
    docker_run_args gpu
    run_or_print "$DOCKER" "${args[@]}" "$IMAGE" train "$@"
    ;;
torchrun)
    docker_run_args gpu
    nproc="${NPROC:-$(gpu_count)}"
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: torchrun restarts hang with gloo otherwise
    # (pytorch/pytorch#135712); TORCH_NCCL_ASYNC_ERROR_HANDLING is decided in the worker
    # (resnetdist/dist.py), for every launcher
    run_or_print "$DOCKER" "${args[@]}" -e TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 --entrypoint torchrun "$IMAGE" \
        --standalone --nproc_per_node="$nproc" --max-restarts="$MAX_RESTARTS" \
        -m resnetdist -- train "$@"
    ;;
eval | bench)
    docker_run_args gpu
    run_or_print "$DOCKER" "${args[@]}" "$IMAGE" "$cmd" "$@"
    ;;
report)
    docker_run_args cpu
    run_or_print "$DOCKER" "${args[@]}" "$IMAGE" report "$@"
    ;;
shell)
    docker_run_args gpu
    run_or_print "$DOCKER" "${args[@]}" --entrypoint bash "$IMAGE" "$@"
    ;;
help | -h | --help)
    usage
    ;;
*)
    echo "unknown command: $cmd" >&2
    usage >&2
    exit 2
    ;;
esac
