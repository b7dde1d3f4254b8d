#!/usr/bin/env bash
# Many concurrent streams on one coordinator (bench/README.md, "Many streams"): `epx bench serve`
# at 300, 3,000 and 10,000 streams over gRPC (callback API) and at 300 and 3,000 over the OpenAI
# HTTP API, against one `epx serve` of the tiny model, with the server's thread count after each
# load. The ceiling next to it, measured in the same run: `epx bench decode` of the same model at
# the server's batch (--max-running), i.e. the output tokens/s the engine alone reaches.
#
# Usage: bench/serve_streams.sh          (from the source tree)
# Environment:
#   EPX_BIN     the epx binary (default build/cli/epx)
#   MODEL       a checkpoint directory (default tests/data/tiny-mixtral)
#   MAX_TOKENS  tokens per stream (default 8); PROMPT_TOKENS (default 8)
#   GRPC_STREAMS (default "300 3000 10000"); HTTP_STREAMS (default "300 3000")
#   OUT_DIR     logs and the CSV (default build/bench_serve_streams)
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
epx=${EPX_BIN:-build/cli/epx}
model=${MODEL:-tests/data/tiny-mixtral}
max_tokens=${MAX_TOKENS:-8}
prompt_tokens=${PROMPT_TOKENS:-8}
grpc_streams=${GRPC_STREAMS:-300 3000 10000}
http_streams=${HTTP_STREAMS:-300 3000}
out=${OUT_DIR:-build/bench_serve_streams}
max_running=64
mkdir -p "$out" || exit 1
rm -f "$out/port" "$out/http_port" "$out/streams.csv"

echo "== ceiling: the engine alone at batch $max_running (epx bench decode)"
"$epx" bench decode --model "$model" --batch-sizes "$max_running" --steps 50 2>&1 | tail -1

"$epx" serve --model "$model" --listen 127.0.0.1:0 --port-file "$out/port" \
  --http-listen 127.0.0.1:0 --http-port-file "$out/http_port" --max-queue 20000 \
  --max-running "$max_running" > "$out/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null' EXIT
for _ in $(seq 600); do [ -s "$out/http_port" ] && break; sleep 0.1; done
[ -s "$out/port" ] && [ -s "$out/http_port" ] || { cat "$out/server.log"; exit 1; }
grpc=127.0.0.1:$(cat "$out/port")
http=127.0.0.1:$(cat "$out/http_port")
threads() { awk '/^Threads:/ {print $2}' "/proc/$server/status"; }
echo "server threads idle: $(threads)"

run() {  # api streams address
  echo "== $1, $2 streams of $max_tokens tokens"
  "$epx" bench serve --api "$1" --server "$3" --concurrency "$2" --requests "$2" \
    --max-tokens "$max_tokens" --prompt-tokens "$prompt_tokens" --timeout 600 \
    --csv "$out/streams.csv" 2>&1
  echo "server threads after: $(threads)"
}
for n in $grpc_streams; do run grpc "$n" "$grpc"; done
for n in $http_streams; do run openai "$n" "$http"; done
echo "CSV: $out/streams.csv"
