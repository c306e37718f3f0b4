#!/usr/bin/env bash
# Acceptance of a new single-GPU machine, in one command and at most 9 minutes on an H100:
# doctor, the CUDA tests, the step benchmarks (ResNet-20 and -56), the full 64k-iteration
# ResNet-20 with default settings and `resnetdist eval` of its model.pt.
#
# Usage: launch/gpu-acceptance.sh OUT_DIR DATA_DIR [WHEELS_DIR]
#   DATA_DIR    holds cifar-10-batches-bin/ (CIFAR-10, or the stand-in of ../shared/data)
#   WHEELS_DIR  wheels of what the machine lacks (tomli-w, ffcv, wandb, ...); installed with
#               pip --no-index --no-deps into OUT_DIR/site, nothing fetched from the network
#
# Runs from this checkout (PYTHONPATH), needing only a stock PyTorch CUDA environment (torch >=
# 2.4, numpy, typer, tqdm, tensorboard, matplotlib, pytest, Pillow). FFCV and W&B stages are
# skipped, with a line saying so, when those packages are absent. Every stage has its own time
# limit; a failed or timed-out stage is recorded and the later stages still run. Writes
# OUT_DIR/summary.json, OUT_DIR/logs/<stage>.log and each stage's JSON, and prints a table.
# Exit status: 0 when every stage that ran passed, 1 otherwise.
#
# Variables (all optional):
#   PYTHON   python with torch (default python3)
#   DRY_RUN  1: print each stage's command, run nothing
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: $0 OUT_DIR DATA_DIR [WHEELS_DIR]" >&2
    exit 2
fi
OUT="$(mkdir -p "$1" && cd "$1" && pwd)"
DATA="$2"
WHEELS="${3:-}"
PYTHON="${PYTHON:-python3}"
DRY_RUN="${DRY_RUN:-0}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
mkdir -p "$OUT/logs"
export PYTHONPATH="$OUT/site:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 WANDB_MODE="${WANDB_MODE:-offline}" WANDB_DIR="$OUT"
STAGES="$OUT/stages.tsv"
: >"$STAGES"

# run_stage NAME LIMIT_S CMD...: run CMD with a time limit, its output in logs/NAME.log;
# record name, status, seconds and exit code in stages.tsv (DRY_RUN=1: print CMD only)
run_stage() {
    local name="$1" limit="$2"
    shift 2
    if [[ "$DRY_RUN" == 1 ]]; then
        printf 'stage %s (limit %s s): ' "$name" "$limit"
        printf '%q ' "$@"
        printf '\n'
        return 0
    fi
    local start=$SECONDS rc=0 status=ok
    echo "[acceptance] $name (limit ${limit} s) ..."
    timeout --kill-after=20 "$limit" "$@" >"$OUT/logs/$name.log" 2>&1 || rc=$?
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then
        status=timeout
    elif [[ $rc -ne 0 ]]; then
        status=failed
    fi
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" "$rc" >>"$STAGES"
    echo "[acceptance] $name: $status in $((SECONDS - start)) s (log: $OUT/logs/$name.log)"
}

skip_stage() {
    if [[ "$DRY_RUN" == 1 ]]; then
        echo "stage $1: skipped: $2"
        return 0
    fi
    printf '%s\tskipped: %s\t0\t0\n' "$1" "$2" >>"$STAGES"
    echo "[acceptance] $1: skipped: $2"
}

has_module() { "$PYTHON" -c "import $1" >/dev/null 2>&1; }

# ----- wheels (no network: --no-index) -----
if [[ -n "$WHEELS" ]]; then
    if [[ "$DRY_RUN" == 1 ]]; then
        echo "wheels: $PYTHON -m pip install --no-index --no-deps --target $OUT/site $WHEELS/*.whl"
    elif "$PYTHON" -m pip --version >/dev/null 2>&1; then
        "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$OUT/site" "$WHEELS"/*.whl
    else  # no pip at all: a wheel is a zip archive laid out for site-packages
        for whl in "$WHEELS"/*.whl; do "$PYTHON" -m zipfile -e "$whl" "$OUT/site"; done
    fi
fi

RD=("$PYTHON" -m resnetdist)
RUN="$OUT/resnet20"
WANDB_SET=(--set log.wandb_mode=disabled)
FFCV_OK=0
if [[ "$DRY_RUN" != 1 ]]; then
    has_module wandb && WANDB_SET=(--set log.wandb_mode=offline)
    has_module ffcv && FFCV_OK=1
fi

# ----- the stages: limits sum to 530 s, under the 9 minutes -----
run_stage doctor 60 "${RD[@]}" doctor --device cuda --data-dir "$DATA" --json
run_stage pytest-cuda 100 "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider tests
run_stage bench-n3 70 "${RD[@]}" bench -n 3 --iters 200 --warmup 20 --loaders resident \
    --modes eager,graph,compile --precisions bf16 --data-dir "$DATA" --out "$OUT/bench-n3.json"
run_stage bench-n9 80 "${RD[@]}" bench -n 9 --iters 150 --warmup 20 --loaders resident \
    --modes eager,graph,compile --precisions bf16 --data-dir "$DATA" --out "$OUT/bench-n9.json"
if [[ "$FFCV_OK" == 1 || "$DRY_RUN" == 1 ]]; then
    run_stage bench-loader 30 "${RD[@]}" bench loader --iters 100 --loaders resident,ffcv \
        --data-dir "$DATA" --out "$OUT/bench-loader.json"
else
    skip_stage bench-loader "FFCV is not installed (bring its wheel in WHEELS_DIR)"
fi
if [[ "$DRY_RUN" != 1 ]] && ! has_module wandb; then
    echo "[acceptance] W&B is not installed: the training run logs to JSONL and TensorBoard only"
fi
run_stage train-resnet20 170 "${RD[@]}" train --n 3 --data-dir "$DATA" --out "$RUN" "${WANDB_SET[@]}"
run_stage eval-resnet20 20 "${RD[@]}" eval "$RUN/model.pt" --data-dir "$DATA" --json

if [[ "$DRY_RUN" == 1 ]]; then
    exit 0
fi
cp "$OUT/logs/doctor.log" "$OUT/doctor.json" 2>/dev/null || true
"$PYTHON" "$REPO/launch/acceptance_summary.py" "$OUT"
