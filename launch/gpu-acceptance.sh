#!/usr/bin/env bash
# Acceptance of a new single-GPU machine, in one command and within 9.5 minutes on an H100/H200:
# doctor, the CUDA tests, the step benchmarks (ResNet-20 and -56), FFCV's .beton files and
# loader, the full 64k-iteration ResNet-20 with default settings, `resnetdist eval` of its
# model.pt, and last torch.compile of ResNet-20, which takes what time is left.
#
# Usage: launch/gpu-acceptance.sh OUT_DIR DATA_DIR [WHEELS_DIR]
#   OUT_DIR     new or empty: one that holds anything (an earlier acceptance, whose finished
#               training would "resume" in seconds and report its old figures as new) is
#               refused, unless ACCEPTANCE_FRESH=1 empties it first
#   DATA_DIR    holds cifar-10-batches-bin/ (CIFAR-10, or the stand-in of ../shared/data)
#   WHEELS_DIR  wheels of what the machine lacks (tomli-w, ffcv, wandb, ...); installed with
#               pip --no-index --no-deps into OUT_DIR/site, nothing fetched from the network
#
# Runs from this checkout (PYTHONPATH), needing only a stock PyTorch CUDA environment (torch >=
# 2.4, numpy, typer, tqdm, tensorboard, matplotlib, pytest, Pillow). FFCV and W&B stages are
# skipped, with a line saying so, when those packages are absent. Every stage has its own time
# limit; a failed or timed-out stage is recorded and the later stages still run. Writes
# OUT_DIR/summary.json, OUT_DIR/logs/<stage>.log and each stage's JSON, and prints a table.
# Exit status: 0 when every stage that ran passed, 1 otherwise, 128+N when stopped by signal N.
#
# Time: the stage limits (the run_stage lines below) sum to 565 s, each above its estimate (in
# the comments beside it; 1.15-2x, the training 1.4x). The whole script also keeps an overall
# deadline, ACCEPTANCE_DEADLINE_S seconds after it starts (default 570 = the 520 s of the other
# limits + 45 s for the pack stage (bench --pack, ResNet-20, K = 1, 4, 8), which runs last, + 5 s for
# the summary): no stage runs past it (its limit is cut to what is left, less the time the
# summary needs) and a stage with no time left is skipped. Why 570 s: a lent GPU machine gives
# 15 minutes of device time in all, its start-up (a few minutes) included, and at most 10
# minutes per command; one run of 9.5 minutes plus the start-up leaves about 2-3 minutes, enough
# to rerun the stages that failed (ACCEPTANCE_SKIP names the others) into a new OUT_DIR on the
# still-warm machine, not to rerun everything. The compile stage runs next to last, with what is
# left before the deadline less the pack stage's 45 s (at least its own limit): a cold compile may take 30-90 s, and one cut short is reported ("cut at N s") without
# failing the acceptance. On SIGTERM or SIGINT, or at a stage's limit, the stage's whole process group
# is ended (SIGTERM, then SIGKILL after ACCEPTANCE_GRACE_S), and summary.json is still written
# for what ran; a stage cut short shows how far it got (the training's last metrics.jsonl record).
#
# Variables (all optional):
#   PYTHON                 python with torch (default python3)
#   DRY_RUN                1: print each stage's command and limit, and their sum; run nothing
#   ACCEPTANCE_DEADLINE_S  overall deadline in seconds from the start (default 570)
#   ACCEPTANCE_GRACE_S     seconds between SIGTERM and SIGKILL of a stage's group (default 10)
#   ACCEPTANCE_FRESH       1: empty a non-empty OUT_DIR first (its earlier results are deleted)
#   ACCEPTANCE_SKIP        stages not to run, comma-separated (e.g. a rerun of the failed ones:
#                          ACCEPTANCE_SKIP=doctor,pytest-cuda,bench-n3,bench-n9)
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: $0 OUT_DIR DATA_DIR [WHEELS_DIR]" >&2
    exit 2
fi
if [[ -d "$1" && -n "$(ls -A "$1" 2>/dev/null)" ]]; then
    if [[ "${ACCEPTANCE_FRESH:-0}" != 1 ]]; then
        held="it holds files"
        [[ -f "$1/summary.json" || -f "$1/resnet20/summary.json" ]] && held="it holds an earlier acceptance's results"
        echo "error: OUT_DIR $1 is not empty ($held, which a new run would report as its own); pass a new or empty folder, or set ACCEPTANCE_FRESH=1 to delete what it holds and start afresh" >&2
        exit 2
    fi
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        echo "ACCEPTANCE_FRESH=1: would delete what $1 holds"
    else
        find "$1" -mindepth 1 -delete
    fi
fi
OUT="$(mkdir -p "$1" && cd "$1" && pwd)"
DATA="$2"
WHEELS="${3:-}"
PYTHON="${PYTHON:-python3}"
DRY_RUN="${DRY_RUN:-0}"
DEADLINE="${ACCEPTANCE_DEADLINE_S:-570}"
SKIP=",${ACCEPTANCE_SKIP:-},"
PACK_RESERVE=45    # seconds kept for the pack stage (`bench --pack 1,4,8`, ResNet-20), after compile
GRACE="${ACCEPTANCE_GRACE_S:-10}"
SUMMARY_RESERVE=5  # seconds kept back from the deadline for writing the summary
for var in DEADLINE GRACE; do
    if ! [[ "${!var}" =~ ^[0-9]+$ ]]; then
        echo "error: ACCEPTANCE_${var}_S must be a whole number of seconds, got '${!var}'" >&2
        exit 2
    fi
done
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
mkdir -p "$OUT/logs"
export PYTHONPATH="$OUT/site:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 WANDB_MODE="${WANDB_MODE:-offline}" WANDB_DIR="$OUT"
# cuBLAS's deterministic workspace, read at its first use: the CUDA tests that compare two
# captured graphs bitwise run under torch's deterministic algorithms, which require it
export CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}"
STAGES="$OUT/stages.tsv"
[[ "$DRY_RUN" == 1 ]] || : >"$STAGES"
LIMIT_SUM=0
STAGE_PID=""   # the running stage's `timeout` process, leader of the stage's process group
STAGE_NAME=""
STAGE_START=0
STAGE_LIMIT=0

# record NAME STATUS SECONDS RC LIMIT: one line of stages.tsv
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$STAGES"; }

# end_group PGID: SIGTERM to the whole group, SIGKILL to whatever is left after GRACE seconds
end_group() {
    local pg="$1" tenths=0
    kill -TERM -- "-$pg" 2>/dev/null || kill -TERM "$pg" 2>/dev/null || true
    while kill -0 -- "-$pg" 2>/dev/null && ((tenths < GRACE * 10)); do
        sleep 0.1
        tenths=$((tenths + 1))
    done
    kill -KILL -- "-$pg" 2>/dev/null || true
}

summarize() { "$PYTHON" "$REPO/launch/acceptance_summary.py" "$OUT"; }

# on SIGTERM / SIGINT: end the running stage's group, record it, write the summary, exit 128+N
on_signal() {
    local sig="$1" code="$2"
    trap '' TERM INT
    if [[ -n "$STAGE_PID" ]]; then
        end_group "$STAGE_PID"
        record "$STAGE_NAME" "interrupted: SIG$sig" "$((SECONDS - STAGE_START))" "$code" "$STAGE_LIMIT"
        STAGE_PID=""
    fi
    echo "[acceptance] stopped by SIG$sig; writing the summary of what ran" >&2
    summarize || true
    exit "$code"
}
trap 'on_signal TERM 143' TERM
trap 'on_signal INT 130' INT

# run_stage NAME LIMIT_S CMD...: run CMD in its own process group (timeout makes one) with a
# time limit cut to the overall deadline, its output in logs/NAME.log; record name, status,
# seconds, exit code and limit in stages.tsv (DRY_RUN=1: print CMD and its limit only).
# CUT_OK=1 run_stage ...: the stage may use what is left before the deadline, and one cut at
# its limit is recorded as "cut at N s", which does not fail the acceptance
run_stage() {
    local name="$1" limit="$2" cut_ok="${CUT_OK:-0}"
    shift 2
    if [[ "$SKIP" == *",$name,"* ]]; then
        skip_stage "$name" "ACCEPTANCE_SKIP"
        return 0
    fi
    LIMIT_SUM=$((LIMIT_SUM + limit))
    if [[ "$DRY_RUN" == 1 ]]; then
        printf 'stage %s (limit %s s%s): ' "$name" "$limit" "$([[ $cut_ok == 1 ]] && echo ', or what is left before the deadline; a cut is reported, not failed')"
        printf '%q ' "$@"
        printf '\n'
        return 0
    fi
    local left=$((DEADLINE - SUMMARY_RESERVE - SECONDS)) rc=0 status=ok by_deadline=0
    if ((left < 2)); then
        record "$name" "skipped: overall deadline (ACCEPTANCE_DEADLINE_S=$DEADLINE) reached" 0 0 0
        echo "[acceptance] $name: skipped, the overall deadline is reached"
        return 0
    fi
    if ((left < limit)); then
        limit=$left
        by_deadline=1
    elif [[ $cut_ok == 1 ]]; then
        limit=$left
    fi
    echo "[acceptance] $name (limit ${limit} s) ..."
    STAGE_NAME=$name STAGE_LIMIT=$limit STAGE_START=$SECONDS
    timeout --kill-after="$GRACE" "$limit" "$@" >"$OUT/logs/$name.log" 2>&1 &
    STAGE_PID=$!
    wait "$STAGE_PID" || rc=$?
    kill -KILL -- "-$STAGE_PID" 2>/dev/null || true  # what outlived the stage's main process
    STAGE_PID=""
    if [[ ($rc -eq 124 || $rc -eq 137) && $cut_ok == 1 ]]; then
        status="cut at $((SECONDS - STAGE_START)) s"
    elif [[ $rc -eq 124 || $rc -eq 137 ]]; then
        status=timeout
        if ((by_deadline)); then
            status="timeout: overall deadline (ACCEPTANCE_DEADLINE_S=$DEADLINE)"
        fi
    elif [[ $rc -ne 0 ]]; then
        status=failed
    fi
    record "$name" "$status" "$((SECONDS - STAGE_START))" "$rc" "$limit"
    if [[ $status == cut* ]]; then
        echo "[acceptance] $name: $status (reported, not a failure; log: $OUT/logs/$name.log)"
    else
        echo "[acceptance] $name: $status in $((SECONDS - STAGE_START)) s (log: $OUT/logs/$name.log)"
    fi
}

skip_stage() {
    if [[ "$DRY_RUN" == 1 ]]; then
        echo "stage $1: skipped: $2"
        return 0
    fi
    record "$1" "skipped: $2" 0 0 0
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

# ----- the stages: limit >= 1.5x the estimate, from a plain script's H100 figures (docs/gpu-acceptance.md) -----
# A process's start: python + torch import ~4 s, CUDA context ~2 s, CIFAR-10 parsed ~1 s (S = ~7 s).
# cuDNN's autotune (cudnn.benchmark) of a new net/batch's shapes ~1-2 s; a capture = 11 warm-up
# steps + the capture, ~1 s. Step times (bf16, channels_last, batch 128): ResNet-20 eager 10.7
# ms, graph 2.43 ms; ResNet-56 eager 27.2 ms, graph 6.64 ms; the fp32 baselines 10.5 / 27.1 ms.
#
# doctor, without its compile check (the compile stage times compile) and its speed sample (the
# bench stages measure speed). It is the first process on a cold machine: torch's first import
# from a cold disk ~10-15 s, the CUDA context ~2-5 s, cuDNN's libraries loaded and autotuned for
# three settings (fp32 graph vs eager, the bf16 default twice) ~3-5 s each, a real CUDA graph
# captured (11 warm-up steps + the capture) in each: ~30-35 s cold -> 60 s
run_stage doctor 60 "${RD[@]}" doctor --device cuda --data-dir "$DATA" --json --skip compile,speed
# pytest start and collection (every test module, torch, matplotlib) ~10 s; on one GPU 6 of 8
# tests run: epochs upload ~3 s, graph in place ~4 s, graph vs eager ~4 s, evaluation between
# replays and resume ~5 s, a trained model's evaluation vs its weights (a subprocess) ~10 s, the
# end-to-end run (train 60 iterations + eval: 2 subprocesses) ~16 s = ~52 s -> 75 s
run_stage pytest-cuda 75 "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider tests
# each bench writes its JSON after every setting, so a limit reached keeps what was measured.
# n3: S + baseline and peer (8 DataLoader workers started ~3 s, 220 steps x 10.5 ms) ~5 s each +
# eager (autotune + 220 x 10.7 ms) ~4 s + graph (capture + 220 x 2.43 ms) ~2 s = ~23 s -> 35 s
run_stage bench-n3 35 "${RD[@]}" bench -n 3 --iters 200 --warmup 20 --loaders resident \
    --modes eager,graph --precisions bf16 --data-dir "$DATA" --out "$OUT/bench-n3.json"
# n9: S + baselines (115 x 27.1 ms + workers) ~6 s each + eager ~5 s + graph ~3 s = ~27 s -> 35 s
run_stage bench-n9 35 "${RD[@]}" bench -n 9 --iters 100 --warmup 15 --loaders resident \
    --modes eager,graph --precisions bf16 --data-dir "$DATA" --out "$OUT/bench-n9.json"
if [[ "$FFCV_OK" == 1 || "$DRY_RUN" == 1 ]]; then
    # the .beton files first, outside the loader's timing: S + 60k images written ~6 s = ~13 s -> 15 s
    run_stage beton 15 "${RD[@]}" prepare --data-dir "$DATA"
    # S + FFCV's pipeline compiled by numba ~4 s + 120 batches of each loader ~1 s = ~12 s -> 15 s
    run_stage bench-loader 15 "${RD[@]}" bench loader --iters 100 --loaders resident,ffcv \
        --data-dir "$DATA" --out "$OUT/bench-loader.json"
else
    skip_stage beton "FFCV is not installed (bring its wheel in WHEELS_DIR)"
    skip_stage bench-loader "FFCV is not installed (bring its wheel in WHEELS_DIR)"
fi
if [[ "$DRY_RUN" != 1 ]] && ! has_module wandb; then
    echo "[acceptance] W&B is not installed: the training run logs to JSONL and TensorBoard only"
fi
# 64,000 graphed steps x 2.43 ms = 156 s + S and autotune and capture ~10 s + 32 fp32 evaluations
# of 10k images ~0.2 s each ~6 s + 17 checkpoints and 640 metric reads ~2 s = ~174 s -> 245 s.
# The graph asked for by name: a failed capture stops the stage at once (exit 8, one line)
# instead of training eagerly for ~690 s, past the limit, with the reason buried in the log
run_stage train-resnet20 245 "${RD[@]}" train --n 3 --data-dir "$DATA" --out "$RUN" --set train.step=graph \
    "${WANDB_SET[@]}"
# S + the model loaded and 10k images evaluated in fp32 ~1 s = ~8 s -> 12 s
run_stage eval-resnet20 12 "${RD[@]}" eval "$RUN/model.pt" --data-dir "$DATA" --json
# torch.compile of ResNet-20: S + the baselines ~10 s + a cold compile 30-90 s + 220 steps. Last,
# with what is left before the deadline (at least 28 s) less the pack stage's reserve: a cut
# is reported, not failed. Inductor builds its kernels with a C compiler against Python.h: where
# either is missing the stage is skipped, naming which, rather than failing after its start
compile_missing=""
if [[ "$DRY_RUN" != 1 ]]; then
    command -v "${CC:-cc}" >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || compile_missing="no C compiler (cc, gcc)"
    include="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])' 2>/dev/null || true)"
    if [[ -z "$include" || ! -f "$include/Python.h" ]]; then
        compile_missing="${compile_missing:+$compile_missing and }no Python.h (${include:-the include folder unknown}; the python3-dev package)"
    fi
fi
if [[ -n "$compile_missing" ]]; then
    skip_stage compile "torch.compile needs a C compiler and Python.h to build its kernels: $compile_missing"
else
    DEADLINE=$((DEADLINE - PACK_RESERVE)) CUT_OK=1 run_stage compile 28 "${RD[@]}" bench -n 3 --iters 200 --warmup 20 \
        --loaders resident --modes compile --precisions bf16 --data-dir "$DATA" --out "$OUT/bench-compile.json"
fi
# packs (docs/suite.md): K seeds of ResNet-20 as one fused model against the K runs one after
# another and one model at batch 128*K, the step a run gets here (the graph, bf16), so that this
# first GPU run decides the default K. In the 45 s kept for it: S + for K = 1, 4, 8 the pack, K
# single runs and the dense model each captured (19 captures of 11 warm-up steps, cuDNN's
# autotune of 5 new shapes) ~15 s + 3 rounds of 50 steps of each (K = 8: ~10 + 19 + 10 ms) ~10 s = ~32 s
run_stage bench-pack "$PACK_RESERVE" "${RD[@]}" bench --pack 1,4,8 -n 3 --iters 50 --warmup 5 --device cuda \
    --out "$OUT/bench-pack.json"

if [[ "$DRY_RUN" == 1 ]]; then
    echo "total: stage limits sum to $LIMIT_SUM s (the pack stage's $PACK_RESERVE s among them) + $SUMMARY_RESERVE s for the summary; overall deadline $DEADLINE s (ACCEPTANCE_DEADLINE_S), 570 s budget"
    if ((LIMIT_SUM + SUMMARY_RESERVE > DEADLINE)); then
        echo "error: the stage limits and the summary's $SUMMARY_RESERVE s exceed the deadline" >&2
        exit 1
    fi
    exit 0
fi
cp "$OUT/logs/doctor.log" "$OUT/doctor.json" 2>/dev/null || true
summarize
