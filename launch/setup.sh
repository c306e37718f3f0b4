#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine (as root, or with sudo) to run resnetdist:
# system libraries for FFCV, PyTorch, then this package with its extras.
#
#   bash launch/setup.sh          # the package with FFCV and W&B
#   bash launch/setup.sh --dev    # also the test and export dependencies
#
# Variables:
#   PYTHON        interpreter to install into (default: python3, or python if that is missing)
#   TORCH_SPEC    what to pip-install when torch is not importable yet (default: torch==2.13.0;
#                 choose the build that matches your CUDA, e.g. from the PyTorch index)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-$(command -v python3 || command -v python)}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=ffcv,wandb
[[ ${1:-} == --dev ]] && EXTRAS=ffcv,wandb,dev

SUDO=""
[[ $(id -u) -ne 0 ]] && SUDO=sudo
# FFCV's setup.py runs pkg-config for opencv4 and libturbojpeg while pip reads its metadata,
# so these must be present before pip sees ffcv.
APT_PKGS=(libopencv-dev libturbojpeg0-dev pkg-config)
if ! dpkg -s "${APT_PKGS[@]}" >/dev/null 2>&1; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${APT_PKGS[@]}"
fi

# torch first, and only when missing: a bare "torch" requirement would otherwise pull a new
# multi-GB build over the one already installed (for example the one in a CUDA base image).
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install "$TORCH_SPEC"
"$PY" -m pip install -e ".[$EXTRAS]"
"$PY" -c "import ffcv, resnetdist; print('resnetdist ready; torch', __import__('torch').__version__)"
