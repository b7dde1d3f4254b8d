#!/usr/bin/env bash
# How long serving pauses when a launcher-free cluster changes (bench/README.md, "Losing and
# gaining workers"): the longest gap between two tokens of a stream while
#   normal     nothing happens (the peer: a normal step, same cluster, same load)
#   recovery   a worker is killed (SIGKILL) mid-load: the step runs again on a re-formed data plane
#   placement  a new placement is set (Admin/SetPlacement): experts load in the background, the
#              data plane re-forms between two steps
# next to the median gap (one decode step) of the same run. A cluster of WORKERS CPU workers with
# every expert on two of them (--replicas 2), gloo data plane, on this machine.
#
# Usage: bench/cluster_gaps.sh          (from the source tree)
# Environment:
#   EPX_BIN      the epx binary (default build/cli/epx)
#   MODEL        a checkpoint directory (default: `epx make-model --preset small` under OUT_DIR)
#   WORKERS      expert workers (default 3; at least 3)
#   CONCURRENCY  streams (default 8); MAX_TOKENS tokens per stream (default 128)
#   OUT_DIR      logs (default build/bench_cluster_gaps)
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
epx=${EPX_BIN:-build/cli/epx}
out=${OUT_DIR:-build/bench_cluster_gaps}
workers=${WORKERS:-3}
concurrency=${CONCURRENCY:-8}
max_tokens=${MAX_TOKENS:-128}
mkdir -p "$out" || exit 1
rm -f "$out/port"  # a previous run's
[ "$workers" -ge 3 ] || { echo "cluster_gaps: WORKERS must be >= 3" >&2; exit 1; }
model=${MODEL:-}
if [ -z "$model" ]; then
  model=$out/model
  [ -f "$model/config.json" ] || "$epx" make-model --preset small --out "$model" > "$out/make_model.log" 2>&1 ||
    { echo "cluster_gaps: make-model failed: see $out/make_model.log" >&2; exit 1; }
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2> /dev/null; done; }
trap cleanup EXIT

"$epx" serve --model "$model" --listen 127.0.0.1:0 --port-file "$out/port" --workers "$workers" \
  --replicas 2 --comm-timeout 10 --heartbeat-ms 200 > "$out/server.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -s "$out/port" ] && break; sleep 0.1; done
[ -s "$out/port" ] || { echo "cluster_gaps: the server did not start: see $out/server.log" >&2; exit 1; }
server=127.0.0.1:$(cat "$out/port")
worker_pid=()
for r in $(seq "$workers"); do
  "$epx" worker --model "$model" --coordinator "$server" --rank "$r" > "$out/worker$r.log" 2>&1 &
  pids+=($!)
  worker_pid[$r]=$!
done
"$epx" health --server "$server" --service epx.v1.Generation --wait --timeout 120 > /dev/null ||
  { echo "cluster_gaps: the cluster did not form: see $out/server.log" >&2; exit 1; }

# Tokens the server has generated so far (its Stats counter).
generated() {
  "$epx" stats --server "$server" --json 2> /dev/null |
    python3 -c 'import json, sys; print(int(json.load(sys.stdin).get("generated_tokens", 0)))' 2> /dev/null ||
    echo 0
}
# One run of the load; `during` (a command) runs once every stream is under way (the server has
# generated a few tokens per stream more than before the run).
load() {
  local name=$1 during=$2
  local before
  before=$(generated)
  "$epx" bench serve --server "$server" --concurrency "$concurrency" --requests "$concurrency" \
    --max-tokens "$max_tokens" --prompt-tokens 32 --timeout 600 > "$out/$name.txt" 2>&1 &
  local bench=$!
  if [ -n "$during" ]; then
    local flowing=0
    for _ in $(seq 600); do
      [ "$(generated)" -ge $((before + 4 * concurrency)) ] && { flowing=1; break; }
      sleep 0.05
    done
    [ "$flowing" = 1 ] || { echo "cluster_gaps: no tokens flowed in the $name run" >&2; exit 1; }
    eval "$during"
  fi
  wait $bench
}
# count mean p50 p90 p99 max of the ITL row.
itl() { awk '/^  ITL \(ms\)/ { print $5, $8 }' "$out/$1.txt"; }
failed() { awk '/^results/ { print $4 }' "$out/$1.txt"; }

load normal ""
# The placement the other run sets: every expert's copies one worker along.
python3 - "$model/config.json" "$workers" > "$out/shifted.json" << 'EOF'
import json, sys
e = json.load(open(sys.argv[1]))["num_local_experts"]
w = int(sys.argv[2])
print(json.dumps({"experts": {str(i): sorted({1 + (2 * i + j + 1) % w for j in range(2)})
                              for i in range(e)}}))
EOF
load placement "\"$epx\" placement --server $server --set $out/shifted.json > $out/placement_set.txt 2>&1"
load recovery "kill -9 ${worker_pid[2]}"

printf '%-10s %8s %12s %12s %8s\n' scenario failed "ITL p50 ms" "ITL max ms" "max/p50"
for s in normal placement recovery; do
  read -r p50 max <<< "$(itl $s)"
  ratio=$(python3 -c "print(f'{float(\"$max\") / max(float(\"$p50\"), 1e-9):.1f}')" 2> /dev/null || echo -)
  printf '%-10s %8s %12s %12s %8s\n' "$s" "$(failed $s)" "$p50" "$max" "$ratio"
done
echo "(the normal run's ITL p50 is one decode step of this cluster: the peer of the two pauses)"
"$epx" stats --server "$server" > "$out/stats.txt" 2>&1
grep -E 'lost|re-formed|re-placement' "$out/stats.txt" | sed 's/^/  /'
grep -q 'lost: worker 2' "$out/stats.txt" ||
  { echo "cluster_gaps: worker 2's loss is not in the server's events" >&2; exit 1; }
