#!/usr/bin/env bash
# The whole test suite from a fresh clone: installs what is missing, builds, runs ctest
# (GoogleTest cases, labels unit/mpi/gpu). Extra arguments go to ctest (e.g. -L unit).
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/build.sh
build_dir=${EPX_BUILD_DIR:-build}
ctest --test-dir "$build_dir" --output-on-failure -j "${EPX_JOBS:-$(nproc)}" "$@"
