#!/usr/bin/env bash
# Installs missing packages, configures and builds epx into ${EPX_BUILD_DIR:-build}.
# Extra arguments go to CMake (e.g. -DEPX_ENABLE_CUDA=OFF).
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-deps.sh
bash deploy/python-env.sh
build_dir=${EPX_BUILD_DIR:-build}
jobs=${EPX_JOBS:-$(nproc)}
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release "$@"
cmake --build "$build_dir" -j "$jobs"
