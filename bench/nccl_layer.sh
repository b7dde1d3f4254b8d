#!/usr/bin/env bash
# Remote experts over the NCCL data plane on one node (bench/README.md, "NCCL data plane"), no
# launcher needed, two runs:
#   cluster  a launcher-free epx cluster: `epx generate --stats` as the coordinator and WORKERS
#            `epx worker`s, all --device cuda --data-plane nccl: the per-layer dispatch and
#            combine microseconds of every decode step (CUDA events on the coordinator's stream)
#   raw      comm_alltoall_bench --backend nccl with 1 + WORKERS ranks: the same round trip
#            through epx's NCCL communicator next to NCCL's own send/recv, at the bytes of a
#            layer (1 to 512 rows of the model's hidden size, bf16, per worker)
# Ranks take GPU r mod (GPUs seen); ranks sharing a GPU get distinct NCCL_HOSTIDs, which NCCL's
# maintainers call unsupported: if NCCL still refuses ("Duplicate GPU"), the logs say so.
#
# Usage: bench/nccl_layer.sh         (from the source tree)
# Environment:
#   EPX_BIN    the epx binary (default build/cli/epx)
#   BENCH_BIN  comm_alltoall_bench (default build/bench/comm_alltoall_bench)
#   MODEL      a checkpoint directory (default: `epx make-model --preset small` under OUT_DIR)
#   WORKERS    expert workers (default 1); MAX_TOKENS decode tokens (default 64)
#   OUT_DIR    logs (default build/bench_nccl_layer)
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
epx=${EPX_BIN:-build/cli/epx}
bench=${BENCH_BIN:-build/bench/comm_alltoall_bench}
out=${OUT_DIR:-build/bench_nccl_layer}
workers=${WORKERS:-1}
max_tokens=${MAX_TOKENS:-64}
mkdir -p "$out" || exit 1
gpus=$(nvidia-smi -L 2> /dev/null | grep -c '^GPU') || gpus=0
[ "$gpus" -gt 0 ] || { echo "nccl_layer: no GPU (nvidia-smi -L)" >&2; exit 1; }
model=${MODEL:-}
if [ -z "$model" ]; then
  model=$out/model
  [ -f "$model/config.json" ] || "$epx" make-model --preset small --out "$model" > "$out/make_model.log" 2>&1 ||
    { echo "nccl_layer: make-model failed: see $out/make_model.log" >&2; exit 1; }
fi
hidden=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["hidden_size"])' "$model/config.json")
port=$((20000 + $$ % 20000))
failed=0

echo "== cluster: coordinator + $workers worker(s) over NCCL on $gpus GPU(s), $max_tokens decode tokens"
pids=()
for r in $(seq 1 "$workers"); do
  NCCL_HOSTID=epx-bench-$r "$epx" worker --model "$model" --coordinator "127.0.0.1:$port" \
    --device cuda --data-plane nccl --cuda-device $((r % gpus)) --rank "$r" > "$out/worker$r.log" 2>&1 &
  pids+=($!)
done
if NCCL_HOSTID=epx-bench-0 "$epx" generate --model "$model" --prompt "The quick brown fox" \
     --max-tokens "$max_tokens" --device cuda --cuda-device 0 --data-plane nccl \
     --workers "$workers" --listen "127.0.0.1:$port" --stats > "$out/cluster.log" 2>&1; then
  sed -n '/^epx stats/,$p' "$out/cluster.log"
else
  failed=1
  echo "  the cluster run failed: see $out/cluster.log and worker*.log"
  grep -h "Duplicate GPU" "$out"/*.log | head -1
fi
for p in "${pids[@]}"; do wait "$p" || true; done

echo "== raw: comm_alltoall_bench --backend nccl, 1 + $workers ranks"
sizes=""
for rows in 1 2 8 64 512; do sizes="$sizes $((rows * hidden * 2))"; done
rm -rf "$out/rendezvous" && mkdir -p "$out/rendezvous"
pids=()
for r in $(seq 1 "$workers"); do
  # shellcheck disable=SC2086  # the sizes are words
  NCCL_HOSTID=epx-bench-$r "$bench" --backend nccl --rank "$r" --world $((workers + 1)) \
    --dir "$out/rendezvous" --cuda-device $((r % gpus)) $sizes > "$out/raw$r.log" 2>&1 &
  pids+=($!)
done
# shellcheck disable=SC2086
if NCCL_HOSTID=epx-bench-0 "$bench" --backend nccl --rank 0 --world $((workers + 1)) \
     --dir "$out/rendezvous" --cuda-device 0 $sizes > "$out/raw0.log" 2>&1; then
  cat "$out/raw0.log"
else
  failed=1
  echo "  the raw exchange failed: see $out/raw*.log"
fi
for p in "${pids[@]}"; do wait "$p" || true; done
exit "$failed"
