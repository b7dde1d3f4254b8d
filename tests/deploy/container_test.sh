#!/usr/bin/env bash
# deploy/container/build.sh: stages the image's build context (--context-only), checks that the
# Containerfile's COPY source and ENTRYPOINT are in it, and runs the staged /opt/epx/bin/epx in an
# empty environment as the image runs it, with the model "mounted" (a path outside the build): it
# generates the same text as the build's epx. When a container engine is reachable (podman, or
# docker with a daemon), it also builds the image and runs it; otherwise it says so.
# Usage: container_test.sh BUILD_DIR SOURCE_DIR
set -euo pipefail
build_dir=${1:?usage: container_test.sh BUILD_DIR SOURCE_DIR}
src=${2:?usage: container_test.sh BUILD_DIR SOURCE_DIR}
tmp=$(cd "$(mktemp -d "${TMPDIR:-/tmp}/epx_container_test.XXXXXX")" && pwd -P)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

EPX_BUILD_DIR="$build_dir" bash "$src/deploy/container/build.sh" --context-only "$tmp/context"
context="$tmp/context"
[ -f "$context/Containerfile" ] || fail "no Containerfile in the context"
copy=$(sed -n 's/^COPY \([^ ]*\) \(.*\)$/\1 \2/p' "$context/Containerfile")
[ "$copy" = "epx/ /opt/epx/" ] || fail "unexpected COPY line: $copy"
grep -q '^ENTRYPOINT \["/opt/epx/bin/epx"\]$' "$context/Containerfile" || fail "ENTRYPOINT is not /opt/epx/bin/epx"
[ -x "$context/epx/bin/epx" ] || fail "the context has no epx/bin/epx"
# A non-empty context is refused (nothing is overwritten).
if EPX_BUILD_DIR="$build_dir" bash "$src/deploy/container/build.sh" --context-only "$context" 2> "$tmp/err"; then
  fail "build.sh staged into a non-empty folder"
fi
grep -q "is not empty" "$tmp/err" || fail "unclear error: $(cat "$tmp/err")"

# /opt/epx as the image has it, and the model mounted at /models/<name>.
mkdir -p "$tmp/root/opt" "$tmp/root/models"
cp -a "$context/epx" "$tmp/root/opt/epx"
cp -a "$src/tests/data/tiny-mixtral" "$tmp/root/models/tiny"
args=(generate --model "$tmp/root/models/tiny" --prompt "The router" --max-tokens 8 --ignore-eos)
inside=$(env -i PATH="$tmp/root/opt/epx/bin:/usr/bin:/bin" HOME=/nonexistent epx "${args[@]}")
outside=$("$build_dir/cli/epx" "${args[@]}")
[ -n "$inside" ] || fail "the staged epx generated nothing"
[ "$inside" = "$outside" ] || fail "the staged epx generated '$inside', the build '$outside'"

engine=""
if command -v podman > /dev/null && podman info > /dev/null 2>&1; then engine=podman
elif command -v docker > /dev/null && docker info > /dev/null 2>&1; then engine=docker; fi
if [ -z "$engine" ]; then
  echo "container_test: no container engine reachable here: the image itself was not built"
  exit 0
fi
CONTAINER_ENGINE=$engine EPX_BUILD_DIR="$build_dir" bash "$src/deploy/container/build.sh" --tag epx:test
image=$("$engine" run --rm -v "$src/tests/data/tiny-mixtral:/models/tiny:ro" epx:test \
  generate --model /models/tiny --prompt "The router" --max-tokens 8 --ignore-eos)
[ "$image" = "$outside" ] || fail "the image generated '$image', the build '$outside'"
echo "container_test: the image ($engine) generated the same text"
