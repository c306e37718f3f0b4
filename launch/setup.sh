#!/usr/bin/env bash
# Set up this checkout to run resnetdist: FFCV's system libraries (apt, as root or with sudo:
# said before sudo asks), PyTorch when missing, then this package and its extras, in a
# virtual environment. Quiet: apt's and pip's output goes to a log shown only on failure.
#
#   bash launch/setup.sh             # into .venv here (or the active venv), with FFCV and W&B
#   bash launch/setup.sh --dev       # also the test and export dependencies
#   bash launch/setup.sh --no-ffcv   # no apt, no root: the resident loader only
#   bash launch/setup.sh -v          # show apt's and pip's output
#   bash launch/setup.sh --dry-run   # print what would be done; do nothing
#
# Where it installs (the first that applies):
#   PYTHON=/path/to/python   that interpreter as it is (a system or conda Python)
#   $VIRTUAL_ENV             the active virtual environment
#   VENV (default .venv in the checkout), made if missing. When the system Python already has
#                            torch (e.g. a CUDA base image) the venv sees the system's
#                            packages, so that torch build is used rather than downloaded again.
# Also: TORCH_SPEC   what to pip-install when torch is missing (default torch==2.13.0; pick
#                    the build for your CUDA, e.g. from the PyTorch index)
#       APT_PACKAGES the apt packages FFCV's build needs (default: libopencv-dev
#                    libturbojpeg0-dev pkg-config)
set -euo pipefail
FROM=$PWD
cd "$(dirname "$0")/.."
ROOT=$PWD

DEV=0 FFCV=1 VERBOSE=0 DRY=0
for arg in "$@"; do
    case $arg in
        --dev) DEV=1 ;;
        --no-ffcv) FFCV=0 ;;
        -v | --verbose) VERBOSE=1 ;;
        --dry-run) DRY=1 ;;
        -h | --help) sed -n '2,/^set -euo/{/^set -euo/d; s/^# \{0,1\}//; p}' "$0"; exit 0 ;;
        *) echo "setup.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
    esac
done
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
APT_PKGS=()
EXTRAS=wandb
if ((FFCV)); then
    read -r -a APT_PKGS <<<"${APT_PACKAGES:-libopencv-dev libturbojpeg0-dev pkg-config}"
    EXTRAS=ffcv,$EXTRAS
fi
((DEV)) && EXTRAS=$EXTRAS,dev

LOG=""
if ((!VERBOSE && !DRY)); then
    LOG=$(mktemp "${TMPDIR:-/tmp}/resnetdist-setup.XXXXXX.log")
fi

say() { echo "setup.sh: $*"; }
die() { echo "setup.sh: $*" >&2; exit 1; }

# run CMD...: as is with -v; else into the log, whose tail is shown if CMD fails
run() {
    if ((DRY)); then
        echo "would run: $*"
    elif ((VERBOSE)); then
        "$@"
    elif ! "$@" >>"$LOG" 2>&1; then
        echo "setup.sh: failed: $*" >&2
        tail -n 25 "$LOG" >&2
        die "the whole output is in $LOG"
    fi
}

# a path as the user can type it from where they ran this: relative below there, else absolute
shown() {
    case $1 in
        "$FROM"/*) echo "${1#"$FROM"/}" ;;
        *) echo "$1" ;;
    esac
}

BASE=$(command -v python3 || command -v python || true)
MAKE_VENV=0
if [[ -n ${PYTHON:-} ]]; then
    PY=$PYTHON WHERE="the interpreter $PYTHON (PYTHON)" NEXT_PY=$PYTHON NEXT="$PYTHON -m resnetdist"
elif [[ -n ${VIRTUAL_ENV:-} ]]; then
    PY=$VIRTUAL_ENV/bin/python WHERE="the active virtual environment $VIRTUAL_ENV" NEXT_PY=python NEXT=resnetdist
else
    VENV=$(realpath -m "${VENV:-$ROOT/.venv}")
    PY=$VENV/bin/python WHERE="the virtual environment $(shown "$VENV")"
    NEXT_PY="$(shown "$VENV")/bin/python" NEXT="$(shown "$VENV")/bin/resnetdist"
    [[ -x $PY ]] || MAKE_VENV=1
fi
if ((MAKE_VENV)); then
    [[ -n $BASE ]] || die "no python3 found; install Python 3.10 or newer"
    # Debian's python3 makes venvs only with python3-venv (ensurepip) installed
    "$BASE" -c "import ensurepip, venv" 2>/dev/null || APT_PKGS+=(python3-venv)
fi

# --- system packages: only those missing, and only after saying why root is needed
NEED=()
if ((FFCV || MAKE_VENV)); then
    if command -v dpkg >/dev/null; then
        for pkg in "${APT_PKGS[@]}"; do
            dpkg -s "$pkg" >/dev/null 2>&1 || NEED+=("$pkg")
        done
    elif ((FFCV)) && ! pkg-config --exists opencv4 libturbojpeg 2>/dev/null; then
        die "FFCV needs OpenCV 4 and libjpeg-turbo with their development files (pkg-config opencv4, libturbojpeg); install them with your package manager and rerun, or rerun with --no-ffcv"
    fi
fi
if ((${#NEED[@]})); then
    command -v apt-get >/dev/null || die "needs the system packages ${NEED[*]} (Debian/Ubuntu names) and there is no apt-get here: install them, then rerun (or use --no-ffcv)"
    SUDO=()
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null || die "needs the system packages ${NEED[*]} from apt, which needs root: run this as root, ask an administrator to install them, or rerun with --no-ffcv"
        SUDO=(sudo)
    fi
    say "FFCV's build needs system libraries from apt: ${NEED[*]}; installing them needs root${SUDO:+, so sudo may ask for your password}"
    run "${SUDO[@]}" apt-get update -qq
    run "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${NEED[@]}"
fi

# --- the environment, torch, the package
say "installing resnetdist ($EXTRAS) into $WHERE${LOG:+ (log: $LOG)}"
VENV_FLAGS=()
if ((MAKE_VENV)); then
    "$BASE" -c "import torch" 2>/dev/null && VENV_FLAGS=(--system-site-packages)
    run "$BASE" -m venv "${VENV_FLAGS[@]}" "$VENV"
fi
# torch first, and only when missing: a bare "torch" requirement would otherwise pull a new
# multi-GB build over the one already installed (for example the one in a CUDA base image)
if ((MAKE_VENV)); then HAS_TORCH=${#VENV_FLAGS[@]}; else HAS_TORCH=$("$PY" -c "import torch; print(1)" 2>/dev/null || echo 0); fi
if ((!HAS_TORCH)); then
    run "$PY" -m pip install "$TORCH_SPEC"
fi
run "$PY" -m pip install -e "${ROOT}[$EXTRAS]"
CHECK="import resnetdist, torch"
((FFCV)) && CHECK+=", ffcv"
run "$PY" -c "$CHECK"
((DRY)) && exit 0
[[ -n $LOG ]] && rm -f "$LOG"

VERSION=$("$PY" -c "import torch; print(torch.__version__)")
say "ready: resnetdist with torch $VERSION in $WHERE"
if ((DEV)); then
    echo "next: $NEXT_PY -m pytest -m 'not slow'   (or train: $NEXT train --n 3)"
else
    echo "next: $NEXT train --n 3"
fi
