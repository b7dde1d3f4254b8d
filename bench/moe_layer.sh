#!/usr/bin/env bash
# One Mixtral MoE layer on one GPU (bench/README.md, "MoE layer on the GPU"), two runs in turn:
#   epx    build/bench/cuda_moe_layer_bench: every GroupedSwiGlu form, bf16 and fp8 experts
#   torch  bench/peer/moe_layer_torch.py: transformers' MixtralSparseMoeBlock, bf16
# each with --json into $OUT_DIR, then one table joined on T. A run that fails is reported and
# the other still runs; the exit status is 1 if either failed.
#
# Usage: bench/moe_layer.sh          (from the source tree)
# Environment:
#   BENCH_BIN  the epx bench (default build/bench/cuda_moe_layer_bench)
#   PYTHON     the interpreter with torch and transformers (default python3)
#   OUT_DIR    where the JSON and the logs go (default build/bench_moe_layer)
#   TOKENS     comma-separated T (default 1,2,4,...,8192); SCALE mixtral (default) or small
#   MIN_MS     timed milliseconds per row, at least (default 200)
#   SKIP       runs to leave out, comma-separated (epx, torch)
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

bench=${BENCH_BIN:-build/bench/cuda_moe_layer_bench}
python=${PYTHON:-python3}
out=${OUT_DIR:-build/bench_moe_layer}
tokens=${TOKENS:-1,2,4,8,16,32,64,128,256,512,1024,2048,4096,8192}
scale=${SCALE:-mixtral}
min_ms=${MIN_MS:-200}
skip=",${SKIP:-},"
mkdir -p "$out" || exit 1
common=(--tokens "$tokens" --scale "$scale" --min-ms "$min_ms")

failed=()
# run NAME COMMAND...: the command's stdout and stderr to the terminal and $out/NAME.log.
run() {
  local name=$1
  shift
  if [[ $skip == *",$name,"* ]]; then
    echo "== $name: skipped (SKIP)"
    return
  fi
  rm -f "$out/$name.json"
  echo "== $name: $*"
  "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    echo "== $name failed (exit $rc); its log: $out/$name.log"
    failed+=("$name")
  fi
  echo
}

if [ -x "$bench" ]; then
  run epx "$bench" "${common[@]}" --json "$out/epx.json"
elif [[ $skip != *",epx,"* ]]; then
  echo "== epx: no $bench (build it: ninja -C build cuda_moe_layer_bench, or set BENCH_BIN)"
  failed+=(epx)
fi
run torch "$python" bench/peer/moe_layer_torch.py "${common[@]}" --json "$out/torch.json"

python3 - "$out" <<'EOF'
import json, os, sys

out = sys.argv[1]
runs = {}
for name in ("epx", "torch"):
    path = os.path.join(out, name + ".json")
    try:
        with open(path) as f:
            runs[name] = json.load(f)
    except (OSError, ValueError):
        print(f"{name}: no results ({path})")
if not runs:
    sys.exit(0)

print("Side by side, joined on T (us per layer; frac = bytes that must move per second / the "
      "run's own device-to-device copy bandwidth, read + write counted; epx counts the fp32 "
      "residual, the peer bf16 in and out)")
for name, r in runs.items():
    extra = ""
    if name == "torch":
        extra = (f"; torch {r.get('torch')}, transformers {r.get('transformers')}, "
                 f"{r.get('block_class')}, experts {r.get('experts_implementation')}")
    print(f"  {name:<6} {r.get('device')}: copy {r.get('copy_GBps', 0):.0f} GB/s, GEMM peak "
          f"{r.get('gemm_peak_TFLOPs', 0):.1f} TFLOP/s{extra}")
print()

epx = {}
for row in runs.get("epx", {}).get("rows", []):
    epx.setdefault(row["T"], {})[(row["dtype"], row["impl"])] = row
torch_rows = {row["T"]: row for row in runs.get("torch", {}).get("rows", [])}
tokens = sorted(set(epx) | set(torch_rows))


def us(row):
    if row is not None and "error" in row:
        return row["error"]
    return "-" if row is None or "us" not in row else f"{row['us']:.1f}"


def frac(row):
    if row is None or row.get("frac_copy_bw") is None:
        return "-"
    return f"{row['frac_copy_bw']:.2f}"


def best(rows, dtype):
    """The fastest explicit epx form for this dtype (auto is one of them): (impl, row)."""
    cands = [(impl, r) for (d, impl), r in rows.items()
             if d == dtype and impl != "auto" and "us" in r]
    return min(cands, key=lambda c: c[1]["us"], default=(None, None))


header = (f"{'T':>6} {'hit':>4} | {'torch us':>9} {'frac':>5} {'TF/s':>6} | "
          f"{'bf16 auto':>9} {'frac':>5} {'best bf16 form':>24} | "
          f"{'fp8 auto':>9} {'frac':>5} {'best fp8 form':>24} | {'torch/bf16':>10} "
          f"{'torch/fp8':>9}")
print(header)
print("-" * len(header))
for t in tokens:
    rows = epx.get(t, {})
    tr = torch_rows.get(t)
    b_auto, f_auto = rows.get(("bf16", "auto")), rows.get(("fp8", "auto"))
    b_impl, b_best = best(rows, "bf16")
    f_impl, f_best = best(rows, "fp8")
    hit = next((r.get("experts_hit") for r in list(rows.values()) + [tr or {}]
                if r.get("experts_hit") is not None), None)
    tflops = "-" if tr is None or "TFLOPs" not in tr else f"{tr['TFLOPs']:.1f}"

    def form(impl, row):
        return "-" if row is None else f"{impl} {row['us']:.1f}"

    def ratio(row):
        if tr is None or "us" not in tr or row is None:
            return "-"
        return f"{tr['us'] / row['us']:.2f}x"

    print(f"{t:>6} {'-' if hit is None else hit:>4} | {us(tr):>9} {frac(tr):>5} {tflops:>6} | "
          f"{us(b_auto):>9} {frac(b_auto):>5} {form(b_impl, b_best):>24} | "
          f"{us(f_auto):>9} {frac(f_auto):>5} {form(f_impl, f_best):>24} | "
          f"{ratio(b_auto):>10} {ratio(f_auto):>9}")
print("\ntorch/bf16, torch/fp8: the peer's time over epx's auto form (above 1: epx faster)")
EOF

if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}"
  exit 1
fi
