# shellcheck shell=bash
# Helpers shared by the launch scripts; sourced, not run.

# GPUs that nvidia-smi lists on this machine, or 1 (a single process) where there are none.
gpu_count() {
    local n=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        n="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
    fi
    if [[ "$n" -gt 0 ]]; then echo "$n"; else echo 1; fi
}

# Replace this shell with the command, or print it (shell-quoted) when DRY_RUN=1.
run_or_print() {
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        printf '%q ' "$@"
        printf '\n'
        exit 0
    fi
    exec "$@"
}

# torchrun restarts hang with gloo unless each attempt gets its own TCP store
# (pytorch/pytorch#135712)
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

# TORCH_NCCL_ASYNC_ERROR_HANDLING is decided in the worker, for every launcher (resnetdist/dist.py)
