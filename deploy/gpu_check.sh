#!/usr/bin/env bash
# Validates the CUDA backend on a GPU node, from a bundle made (on any machine with the CUDA
# toolkit; -march portable, since the node's CPU may differ) with
#   EPX_BUILD_DIR=build-gpu bash deploy/build.sh -DEPX_CPU_ARCH=x86-64-v3
#   deploy/bundle.sh --build-dir build-gpu --gpu-check --out DIR
# and the source tree (tests/data for the fixtures, bench/ for the peer scripts). Writes every
# log and JSON under OUT and prints a summary; exits non-zero if a test failed.
# Usage:
#   deploy/gpu_check.sh --bundle DIR --out OUT [--tests] [--moe-layer] [--decode] [--nccl]
#     --tests      every gpu test binary (tests/cuda_*_test), one log each
#     --moe-layer  bench/moe_layer.sh: one Mixtral-8x7B MoE layer, epx next to PyTorch
#     --decode     bench/decode.sh: whole-model decode, epx next to HF transformers
#     --nccl       bench/nccl_layer.sh: remote experts over NCCL, next to NCCL's own exchange
#   With none of them, all of them.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
die() { echo "gpu_check: error: $*" >&2; exit 1; }

bundle="" out="" tests=0 moe=0 decode=0 nccl=0
while [ $# -gt 0 ]; do
  case "$1" in
    --bundle) [ $# -ge 2 ] || die "--bundle needs a value"; bundle=$2; shift 2 ;;
    --out) [ $# -ge 2 ] || die "--out needs a value"; out=$2; shift 2 ;;
    --tests) tests=1; shift ;;
    --moe-layer) moe=1; shift ;;
    --decode) decode=1; shift ;;
    --nccl) nccl=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    *) die "unknown argument '$1'" ;;
  esac
done
if [ -z "$bundle" ] || ! [ -x "$bundle/bin/epx" ]; then die "--bundle must name a bundle (bin/epx)"; fi
[ -n "$out" ] || die "--out is required"
if [ "$tests$moe$decode$nccl" = 0000 ]; then tests=1 moe=1 decode=1 nccl=1; fi
bundle=$(cd "$bundle" && pwd)
# The CUDA libraries (runtime, cuBLAS, NCCL) come from the node. Where the loader does not find
# them, the CUDA wheels of the node's Python (site-packages/nvidia/*/lib, as PyTorch installs
# them) are tried before giving up.
if ldd "$bundle/bin/epx" | grep -q "not found"; then
  wheel_libs=$(python3 - 2> /dev/null << 'PY'
import glob, os, site
dirs = []
for base in site.getsitepackages() + [site.getusersitepackages()]:
    dirs += sorted(glob.glob(os.path.join(base, "nvidia", "*", "lib")))
    dirs += sorted(glob.glob(os.path.join(base, "nvidia", "cu*", "lib")))
print(":".join(dict.fromkeys(dirs)))
PY
  ) || wheel_libs=""
  if [ -n "$wheel_libs" ]; then export LD_LIBRARY_PATH="$wheel_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; fi
  if ldd "$bundle/bin/epx" | grep "not found"; then
    die "bin/epx needs the libraries above: install them, or put their folder on LD_LIBRARY_PATH"
  fi
fi
# The gpu tests that start epx processes take the bundle's.
export EPX_BINARY="$bundle/bin/epx"
mkdir -p "$out"
out=$(cd "$out" && pwd)

{
  echo "== node"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2> /dev/null ||
    echo "nvidia-smi: not available"
  "$bundle/bin/epx" --version
  python3 -c 'import torch, transformers; print("torch", torch.__version__, "cuda",
torch.version.cuda, "transformers", transformers.__version__)' 2> /dev/null ||
    echo "python3: no torch/transformers (the peers will be skipped)"
} 2>&1 | tee "$out/node.txt"

failed=0
if [ "$tests" = 1 ]; then
  [ -d "$bundle/tests" ] || die "$bundle has no tests/: make it with deploy/bundle.sh --gpu-check"
  export EPX_TEST_DATA_DIR="$root/tests/data"
  echo "== gpu tests (fixtures from $EPX_TEST_DATA_DIR)"
  for t in "$bundle"/tests/cuda_*_test; do
    name=$(basename "$t")
    if "$t" --gtest_output="xml:$out/$name.xml" > "$out/$name.log" 2>&1; then
      echo "  PASS $name ($(grep -c '^\[       OK \]' "$out/$name.log") tests)"
    else
      failed=1
      echo "  FAIL $name: $(grep -c '^\[  FAILED  \]' "$out/$name.log") failed lines; see $name.log"
    fi
    if grep -q '^\[  SKIPPED \]' "$out/$name.log"; then
      echo "       some tests skipped: $(grep -m1 -B1 '^\[  SKIPPED \]' "$out/$name.log" | head -1)"
    fi
  done
fi
if [ "$moe" = 1 ]; then
  echo "== MoE layer (bench/moe_layer.sh)"
  BENCH_BIN="$bundle/bench/cuda_moe_layer_bench" OUT_DIR="$out/moe_layer" \
    bash "$root/bench/moe_layer.sh" > "$out/moe_layer.txt" 2>&1 ||
    echo "  moe_layer.sh exited non-zero: see moe_layer.txt"
  tail -n 25 "$out/moe_layer.txt"
fi
if [ "$decode" = 1 ]; then
  echo "== whole-model decode (bench/decode.sh)"
  EPX_BIN="$bundle/bin/epx" OUT_DIR="$out/decode" bash "$root/bench/decode.sh" \
    > "$out/decode.txt" 2>&1 ||
    echo "  decode.sh exited non-zero: see decode.txt"
  tail -n 25 "$out/decode.txt"
fi
if [ "$nccl" = 1 ]; then
  echo "== remote experts over NCCL (bench/nccl_layer.sh)"
  EPX_BIN="$bundle/bin/epx" BENCH_BIN="$bundle/bench/comm_alltoall_bench" OUT_DIR="$out/nccl_layer" \
    bash "$root/bench/nccl_layer.sh" > "$out/nccl_layer.txt" 2>&1 ||
    echo "  nccl_layer.sh exited non-zero: see nccl_layer.txt"
  tail -n 25 "$out/nccl_layer.txt"
fi
exit "$failed"
