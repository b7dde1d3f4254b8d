#!/usr/bin/env bash
# Launches an epx command across 1 + W ranks on this machine: rank 0 the coordinator, ranks 1..W
# expert workers. Usage:
#   deploy/mpirun.sh W eval --model DIR --input G --output O [--placement FILE] [--stats]
#   deploy/mpirun.sh W generate --model DIR --prompt "..."
# Extra mpirun flags go in MPIRUN_FLAGS (e.g. "--hostfile deploy/hostfile.example"). Runs
# ${EPX_BUILD_DIR:-build}/cli/epx, or bin/epx in a bundle made by deploy/bundle.sh.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)  # paths in ARGS stay relative to the caller's directory
epx="${EPX_BUILD_DIR:-$root/build}/cli/epx"
[ -z "${EPX_BUILD_DIR:-}" ] && [ -x "$root/bin/epx" ] && epx="$root/bin/epx"
workers=${1:?usage: deploy/mpirun.sh W COMMAND [ARGS...]}
shift
flags=(--oversubscribe -x "OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}")
[ "$(id -u)" -eq 0 ] && flags+=(--allow-run-as-root)
# shellcheck disable=SC2086
exec mpirun "${flags[@]}" ${MPIRUN_FLAGS:-} -np $((1 + workers)) "$epx" "$@"
