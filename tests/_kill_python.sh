#!/usr/bin/env bash
# A stand-in for PYTHON in launch/*.sh with a fault injected from the test side: it runs the
# real interpreter ($REAL_PYTHON) with every worker's `-m resnetdist [--]` replaced by
# tests/_kill_worker.py $KILL_AT $KILL_RANK (that rank SIGKILLs itself after iteration KILL_AT,
# first attempt only). tests/test_multinode.py sets these three variables; the package reads none.
set -euo pipefail
args=()
while (($#)); do
    if [[ "$1" == -m && "${2:-}" == resnetdist ]]; then
        args+=("$(dirname "${BASH_SOURCE[0]}")/_kill_worker.py" "$KILL_AT" "$KILL_RANK")
        shift 2
        if [[ "${1:-}" == -- ]]; then shift; fi
    else
        args+=("$1")
        shift
    fi
done
exec "$REAL_PYTHON" "${args[@]}"
