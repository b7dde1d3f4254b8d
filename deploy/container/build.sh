#!/usr/bin/env bash
# Builds the epx image: the build (deploy/build.sh), its bundle (deploy/bundle.sh) in a staged
# context next to deploy/container/Containerfile, then `podman build` (or docker).
# Usage:
#   deploy/container/build.sh [--tag NAME:TAG] [--base IMAGE] [--context-only DIR]
#     --tag           the image name (default epx:<version>, also tagged epx:latest)
#     --base          the base image (default debian:12-slim; a CUDA runtime image for GPUs)
#     --context-only  stage the build context in DIR and stop (no container engine needed)
# CONTAINER_ENGINE picks the engine (default: podman if installed, else docker).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
die() { echo "container: error: $*" >&2; exit 1; }
tag="" base="debian:12-slim" context_only=""
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) [ $# -ge 2 ] || die "--tag needs a value"; tag=$2; shift 2 ;;
    --base) [ $# -ge 2 ] || die "--base needs a value"; base=$2; shift 2 ;;
    --context-only) [ $# -ge 2 ] || die "--context-only needs a folder"; context_only=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

build_dir=${EPX_BUILD_DIR:-build}
case "$build_dir" in /*) ;; *) build_dir="$root/$build_dir" ;; esac
[ -x "$build_dir/cli/epx" ] || (cd "$root" && bash deploy/build.sh)
version=$(sed -n 's/^project(epx VERSION \([0-9.]*\).*/\1/p' "$root/CMakeLists.txt")
[ -n "$tag" ] || tag="epx:${version:-dev}"

if [ -n "$context_only" ]; then
  context=$context_only
  mkdir -p "$context"
  [ -z "$(ls -A "$context")" ] || die "--context-only: $context is not empty"
else
  context=$(mktemp -d "${TMPDIR:-/tmp}/epx_container.XXXXXX")
  trap 'rm -rf "$context"' EXIT
fi
bash "$root/deploy/bundle.sh" --build-dir "$build_dir" --out "$context/epx" > /dev/null
cp "$root/deploy/container/Containerfile" "$context/Containerfile"
if [ -n "$context_only" ]; then
  echo "container: context in $context (Containerfile + epx/); build it with:"
  echo "  podman build --build-arg BASE=$base -t $tag $context"
  exit 0
fi

engine=${CONTAINER_ENGINE:-}
if [ -z "$engine" ]; then
  if command -v podman > /dev/null; then engine=podman
  elif command -v docker > /dev/null; then engine=docker
  else die "no container engine: install podman or docker, or use --context-only"; fi
fi
"$engine" build --build-arg BASE="$base" -t "$tag" -t epx:latest -f "$context/Containerfile" "$context"
echo "container: built $tag with $engine"
