#!/usr/bin/env bash
# Set up napari-binn in ./.venv: system libraries (Debian, when run as root), CPU torch, the package.
# Usage: bash scripts/setup.sh            (everything: GUI, tests, benchmarks' extras excluded)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    # Xvfb for the napari canvas in tests; the X/GL libraries Qt 6 needs.
    need=""
    for pkg in xvfb xauth libgl1 libegl1 libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 \
               libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0 libxcb-shape0 libxcb-cursor0 \
               libdbus-1-3 libfontconfig1 libglib2.0-0; do
        dpkg -s "$pkg" >/dev/null 2>&1 || need="$need $pkg"
    done
    if [ -n "$need" ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null
    fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned to the CPU build: a bare 'torch' pulled in later could fetch a multi-GB CUDA build.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[all,testing]"
echo "napari-binn is set up in .venv"
