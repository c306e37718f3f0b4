#!/usr/bin/env bash
# Build a local base image for the Docker tests WITHOUT any registry.
#
# The production image (docker/Dockerfile) starts FROM an official pytorch/pytorch CUDA image,
# which CI cannot pull (no registry reachable). The tests build the same Dockerfile FROM this
# image instead: Debian bookworm (debootstrap, minbase), python3 + venv, ca-certificates,
# a venv at /opt/venv (PEP 668: Debian's python refuses `pip install` outside a venv) that is
# first on PATH, and the local torch CPU wheel installed in it. So, as in the real base, torch
# is already there and `python3`/`pip` on PATH are the ones to use.
#
# Idempotent: does nothing when the tag exists (set DOCKER_BASE_FORCE=1 to rebuild).
# Needs: root, debootstrap, docker (a daemon: see .ci/start-dockerd.sh), the torch wheel.
# Network: the Debian mirror that apt uses, and PyPI (torch's dependencies) through the
# host's pip configuration (CA bundle, find-links).
#
# Variables (all optional):
#   DOCKER_BASE_TAG     image tag to create         (default resnetdist-test-base:bookworm)
#   DOCKER_BASE_FORCE   1 = rebuild even if the tag exists (default 0)
#   DEBIAN_SUITE        Debian suite                (default bookworm)
#   DEBIAN_MIRROR       Debian mirror               (default: the first URIs: of the host's
#                       apt sources for that suite, else http://deb.debian.org/debian)
#   DEBOOTSTRAP_CACHE   .deb cache shared between runs (default /var/cache/resnetdist-debootstrap)
#   TORCH_WHEEL         torch wheel to install      (default: newest /opt/wheels/torch-*cp311*.whl)
#   PIP_CA_BUNDLE       CA bundle pip uses in the chroot (default $PIP_CERT, else
#                       /etc/ssl/certs/ca-certificates.crt)
#   KEEP_ROOTFS         1 = keep the temporary root file system (for debugging)
set -euo pipefail

DOCKER_BASE_TAG="${DOCKER_BASE_TAG:-resnetdist-test-base:bookworm}"
DOCKER_BASE_FORCE="${DOCKER_BASE_FORCE:-0}"
DEBIAN_SUITE="${DEBIAN_SUITE:-bookworm}"
DEBOOTSTRAP_CACHE="${DEBOOTSTRAP_CACHE:-/var/cache/resnetdist-debootstrap}"
PIP_CA_BUNDLE="${PIP_CA_BUNDLE:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}"
KEEP_ROOTFS="${KEEP_ROOTFS:-0}"

log() { printf '[docker-base] %s\n' "$*" >&2; }
start=$SECONDS

if ! docker info >/dev/null 2>&1; then
    log "no Docker daemon answers: run .ci/start-dockerd.sh first"
    exit 1
fi

if [[ "$DOCKER_BASE_FORCE" != 1 ]] && docker image inspect "$DOCKER_BASE_TAG" >/dev/null 2>&1; then
    log "$DOCKER_BASE_TAG exists; nothing to do (DOCKER_BASE_FORCE=1 rebuilds)"
    exit 0
fi

if [[ -z "${DEBIAN_MIRROR:-}" ]]; then
    # deb822 sources (Debian 12 default): the URIs: line of the stanza whose Suites: holds the
    # suite itself; then one-line sources; then the public default.
    DEBIAN_MIRROR="$(
        cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk -v s="$DEBIAN_SUITE" '
            /^URIs:/   { uri = $2 }
            /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == s && uri != "") { print uri; exit } }
            /^$/       { uri = "" }'
    )"
fi
if [[ -z "${DEBIAN_MIRROR:-}" ]]; then
    DEBIAN_MIRROR="$(
        cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
            awk -v s="$DEBIAN_SUITE" '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i == s) { print $(i - 1); exit } }'
    )"
fi
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

if [[ -z "${TORCH_WHEEL:-}" ]]; then
    TORCH_WHEEL="$(find /opt/wheels -maxdepth 1 -name 'torch-*-cp311-*.whl' 2>/dev/null | sort -V | tail -n 1)"
fi
if [[ -z "${TORCH_WHEEL:-}" || ! -f "$TORCH_WHEEL" ]]; then
    log "no torch wheel (set TORCH_WHEEL=/path/torch-...-cp311-...whl)"
    exit 1
fi
if [[ ! -f "$PIP_CA_BUNDLE" ]]; then
    log "CA bundle $PIP_CA_BUNDLE not found (set PIP_CA_BUNDLE)"
    exit 1
fi
command -v debootstrap >/dev/null || { log "debootstrap missing (apt-get install -y debootstrap)"; exit 1; }

rootfs="$(mktemp -d /var/tmp/resnetdist-base.XXXXXX)"
mounted=()
cleanup() {
    local m
    for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
        m="${mounted[i]}"
        umount -l "$m" 2>/dev/null || true
    done
    if [[ "$KEEP_ROOTFS" == 1 ]]; then
        log "root file system kept at $rootfs"
    else
        rm -rf --one-file-system "$rootfs"
    fi
}
trap cleanup EXIT

log "debootstrap --variant=minbase $DEBIAN_SUITE from $DEBIAN_MIRROR (cache $DEBOOTSTRAP_CACHE)"
mkdir -p "$DEBOOTSTRAP_CACHE"
t0=$SECONDS
# minbase + only what we need; debootstrap never installs Recommends.
# python3-venv brings ensurepip (pip wheel) for `python3 -m venv`; no separate python3-pip.
debootstrap --variant=minbase \
    --include=python3,python3-venv,ca-certificates \
    --components=main \
    --cache-dir="$DEBOOTSTRAP_CACHE" \
    "$DEBIAN_SUITE" "$rootfs" "$DEBIAN_MIRROR" >"$rootfs.debootstrap.log" 2>&1 || {
    log "debootstrap failed; log tail:"
    tail -n 40 "$rootfs.debootstrap.log" >&2
    rm -f "$rootfs.debootstrap.log"
    exit 1
}
rm -f "$rootfs.debootstrap.log"
log "debootstrap done in $((SECONDS - t0))s"

# apt inside the image: the same mirror plus updates and security, no recommends,
# and no apt cache left in layers.
cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $DEBIAN_MIRROR $DEBIAN_SUITE main
deb $DEBIAN_MIRROR $DEBIAN_SUITE-updates main
EOF
security_mirror="${DEBIAN_MIRROR%/debian}/debian-security"
if [[ "$security_mirror" != "$DEBIAN_MIRROR" ]]; then
    echo "deb $security_mirror $DEBIAN_SUITE-security main" >>"$rootfs/etc/apt/sources.list"
fi
cat >"$rootfs/etc/apt/apt.conf.d/90resnetdist" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
EOF
# Exactly what the official debian:* images set up: no .deb cache after install.
cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF

log "venv at /opt/venv + $(basename "$TORCH_WHEEL")"
t0=$SECONDS
for m in proc sys dev; do
    mount --bind "/$m" "$rootfs/$m"
    mounted+=("$rootfs/$m")
done
cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
mkdir -p "$rootfs/tmp/wheels"
cp "$TORCH_WHEEL" "$rootfs/tmp/wheels/"
cp "$PIP_CA_BUNDLE" "$rootfs/tmp/ca.crt"
# Host pip cache shared with the chroot (torch's dependencies download once).
pip_cache="${XDG_CACHE_HOME:-$HOME/.cache}/pip"
mkdir -p "$pip_cache" "$rootfs/tmp/pip-cache"
mount --bind "$pip_cache" "$rootfs/tmp/pip-cache"
mounted+=("$rootfs/tmp/pip-cache")

chroot "$rootfs" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
    PIP_CERT=/tmp/ca.crt PIP_CACHE_DIR=/tmp/pip-cache PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT="${PIP_DEFAULT_TIMEOUT:-180}" PIP_INDEX_URL="${PIP_INDEX_URL:-https://pypi.org/simple}" \
    /bin/sh -euc '
        python3 -m venv /opt/venv
        /opt/venv/bin/python -m pip install --quiet --no-compile /tmp/wheels/*.whl
        /opt/venv/bin/python -c "import torch; print(\"torch\", torch.__version__)"
    '

for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
    umount -l "${mounted[i]}"
done
mounted=()
rm -rf "$rootfs/tmp/wheels" "$rootfs/tmp/ca.crt" "$rootfs/tmp/pip-cache" "$rootfs/root/.cache"
: >"$rootfs/etc/resolv.conf"
rm -rf "$rootfs/var/lib/apt/lists/"* "$rootfs/var/cache/apt/archives/"*.deb "$rootfs/var/log/"*.log
log "venv done in $((SECONDS - t0))s"

log "docker import -> $DOCKER_BASE_TAG"
t0=$SECONDS
old_id="$(docker image inspect --format '{{.Id}}' "$DOCKER_BASE_TAG" 2>/dev/null || true)"
tar --numeric-owner --xattrs -C "$rootfs" -c . |
    docker import \
        --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV VIRTUAL_ENV=/opt/venv' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["bash"]' \
        --message "resnetdist test base: debootstrap $DEBIAN_SUITE minbase + /opt/venv + $(basename "$TORCH_WHEEL")" \
        - "$DOCKER_BASE_TAG" >/dev/null
log "import done in $((SECONDS - t0))s"
if [[ -n "$old_id" ]]; then
    # the image this one replaced (DOCKER_BASE_FORCE=1): drop it unless something still uses it
    docker image rm "$old_id" >/dev/null 2>&1 || true
fi
log "built $DOCKER_BASE_TAG in $((SECONDS - start))s ($(docker image inspect --format '{{.Size}}' "$DOCKER_BASE_TAG" | awk '{printf "%.0f MB", $1/1e6}'))"
