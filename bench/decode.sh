#!/usr/bin/env bash
# Whole-model decode on one GPU (bench/README.md, "Whole-model decode"), three runs in turn:
#   epx_bf16    epx bench decode, dummy Mixtral-8x7B cut to $LAYERS layers (16: fits 80 GB), bf16
#   epx_fp8     the same with fp8 experts and all the preset's layers
#   torch_bf16  the Hugging Face transformers peer (bench/peer/decode_torch.py), $LAYERS layers
# each with --json into $OUT_DIR, then one table by batch size. A run that fails is reported and
# the others still run; the exit status is 1 if any failed.
#
# Usage: bench/decode.sh            (from the source tree or an unpacked bundle)
# Environment:
#   EPX_BIN      the epx binary (default: build/cli/epx, else bin/epx)
#   PYTHON       the interpreter with torch and transformers for the peer (default python3)
#   OUT_DIR      where the JSON and the logs go (default build/bench_decode)
#   PRESET       mixtral-8x7b; LAYERS 16; BATCH_SIZES 1,2,4,8,16,32,64,128,256; CONTEXT 512;
#   STEPS        32 (timed decode steps per batch size)
#   SKIP         runs to leave out, comma-separated (epx_bf16, epx_fp8, torch_bf16)
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

epx=${EPX_BIN:-}
if [ -z "$epx" ]; then
  for candidate in build/cli/epx bin/epx; do
    if [ -x "$candidate" ]; then epx=$candidate; break; fi
  done
fi
if [ -z "$epx" ] || [ ! -x "$epx" ]; then
  echo "decode.sh: no epx binary: set EPX_BIN, or build build/cli/epx (or run from a bundle)" >&2
  exit 1
fi

python=${PYTHON:-python3}
out=${OUT_DIR:-build/bench_decode}
preset=${PRESET:-mixtral-8x7b}
layers=${LAYERS:-16}
batch_sizes=${BATCH_SIZES:-1,2,4,8,16,32,64,128,256}
context=${CONTEXT:-512}
steps=${STEPS:-32}
skip=",${SKIP:-},"
mkdir -p "$out" || exit 1
common=(--batch-sizes "$batch_sizes" --context "$context" --steps "$steps")

failed=() ran=()
# run NAME COMMAND...: the command's stdout and stderr to the terminal and $out/NAME.log.
run() {
  local name=$1
  shift
  if [[ $skip == *",$name,"* ]]; then
    echo "== $name: skipped (SKIP)"
    return
  fi
  rm -f "$out/$name.json"
  ran+=("$name")
  echo "== $name: $*"
  "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    echo "== $name failed (exit $rc); its log: $out/$name.log"
    failed+=("$name")
  fi
  echo
}

run epx_bf16 "$epx" bench decode --device cuda --load-format dummy --preset "$preset" \
  --num-layers "$layers" "${common[@]}" --json "$out/epx_bf16.json"
run epx_fp8 "$epx" bench decode --device cuda --load-format dummy --preset "$preset" \
  --expert-dtype fp8 "${common[@]}" --json "$out/epx_fp8.json"
run torch_bf16 "$python" bench/peer/decode_torch.py --preset "$preset" --num-layers "$layers" \
  "${common[@]}" --json "$out/torch_bf16.json"

python3 - "$out" ${ran[@]+"${ran[@]}"} <<'EOF'
import json, os, sys

out = sys.argv[1]
runs = []
for name in sys.argv[2:]:
    path = os.path.join(out, name + ".json")
    try:
        with open(path) as f:
            runs.append((name, json.load(f)))
    except (OSError, ValueError):
        print(f"{name}: no results ({path})")
if not runs:
    sys.exit(0)

print("Side by side (tok/s = batch x steps / time; frac = bytes the step must read per second /"
      " the run's own device-to-device copy bandwidth, read + write counted)")
for name, r in runs:
    m = r.get("model", {})
    bw = r.get("copy_bandwidth_GBps")
    extra = ""
    if r.get("engine") == "transformers":
        extra = (f"; torch {r.get('torch')}, transformers {r.get('transformers')}, attention "
                 f"{r.get('attn_implementation')}, experts {r.get('experts_implementation')}")
    print(f"  {name:<11} {r.get('device')}: {m.get('name')} {m.get('num_hidden_layers')} layers, "
          f"experts {r.get('expert_dtype')}, copy BW "
          f"{'-' if bw is None else format(bw, '.0f')} GB/s{extra}")
layer_counts = {r.get("model", {}).get("num_hidden_layers") for _, r in runs}
if len(layer_counts) > 1:
    print("  (runs with different layer counts: compare their tok/s through frac or ms/step per "
          "layer, not directly)")
print()

def cell(row):
    if row is None:
        return f"{'':>9} {'':>9} {'':>6}"
    if "error" in row:
        error = row["error"]
        text = ("skipped" if error.startswith("skipped")
                else "OOM" if "OOM" in error or "out of memory" in error else "failed")
        return f"{text:>9} {'':>9} {'':>6}"
    frac = row.get("fraction_of_copy_bw")
    return (f"{row['ms_per_step']:>9.2f} {row['tokens_per_s']:>9.1f} "
            f"{'-' if frac is None else format(frac, '.3f'):>6}")

by_batch = [{row["batch"]: row for row in r.get("rows", [])} for _, r in runs]
batches = sorted(set().union(*by_batch))
width = len(cell(None))
print(f"{'':>6} " + " | ".join(f"{name:^{width}}" for name, _ in runs), end="")
ratio = [i for i, (name, _) in enumerate(runs) if name in ("epx_bf16", "torch_bf16")]
print(" | epx_bf16/torch" if len(ratio) == 2 else "")
print(f"{'batch':>6} " + " | ".join(f"{'ms/step':>9} {'tok/s':>9} {'frac':>6}" for _ in runs),
      end="")
print(" | tok/s ratio" if len(ratio) == 2 else "")
for b in batches:
    rows = [rows_of.get(b) for rows_of in by_batch]
    line = f"{b:>6} " + " | ".join(cell(row) for row in rows)
    if len(ratio) == 2:
        e, t = rows[ratio[0]], rows[ratio[1]]
        if e and t and "error" not in e and "error" not in t and t["tokens_per_s"] > 0:
            line += f" | {e['tokens_per_s'] / t['tokens_per_s']:>10.2f}x"
        else:
            line += f" | {'-':>11}"
    print(line)
EOF

if [ ${#failed[@]} -gt 0 ]; then
  echo "decode.sh: failed: ${failed[*]} (logs in $out)" >&2
  exit 1
fi
