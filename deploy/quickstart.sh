#!/usr/bin/env bash
# Quickstart: build epx, make a small random Mixtral-layout model (~180 MB), start a local
# cluster on it (a coordinator serving gRPC and 2 expert workers, under mpirun), send it a few
# requests with the epx client, print the answers and the expert-load stats, and shut the
# cluster down; then form the same cluster without mpirun (workers started on their own, joining
# the coordinator over gRPC, gloo data plane) and check that it answers with the same tokens.
# Also checks the engine against the golden reference. Output lands in ${EPX_BUILD_DIR:-build};
# the logs in $build_dir/quickstart-*.log.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/build.sh
build_dir=${EPX_BUILD_DIR:-build}
model_dir=${EPX_MODEL_DIR:-$build_dir/models/small}
epx="$build_dir/cli/epx"
port_file="$build_dir/quickstart.port"
log="$build_dir/quickstart-serve.log"

# Waits for the port file of the server started as process $1; prints HOST:PORT.
wait_for_port() {
  for _ in $(seq 300); do
    [ -s "$port_file" ] && break
    kill -0 "$1" 2>/dev/null || { cat "$2"; echo "the server did not start" >&2; exit 1; }
    sleep 0.2
  done
  echo "127.0.0.1:$(cat "$port_file")"
}
chat() {
  "$epx" generate --server "$1" --chat --prompt "What is a mixture of experts?" --max-tokens 32
}

echo "== golden check: the CPU engine against the float64 reference of tests/data/tiny-mixtral"
"$epx" eval --model tests/data/tiny-mixtral --input tests/data/tiny-mixtral/golden.safetensors \
  --output "$build_dir/golden-eval.safetensors" --check

echo "== making a small random model (Mixtral layout: 4 layers, 8 experts, top-2, GQA 8:2) in $model_dir"
[ -f "$model_dir/config.json" ] || "$epx" make-model --preset small --out "$model_dir" --seed 1

echo "== starting a local cluster: coordinator + 2 expert workers (mpirun -np 3), any free port"
rm -f "$port_file"
bash deploy/mpirun.sh 2 serve --model "$model_dir" --listen 127.0.0.1:0 \
  --port-file "$port_file" > "$log" 2>&1 &
cluster=$!
trap 'kill $cluster 2>/dev/null || true' EXIT
server=$(wait_for_port $cluster "$log")
"$epx" health --server "$server" --service epx.v1.Generation --wait --timeout 60

echo "== a chat request (Mixtral-Instruct template), greedy"
"$epx" generate --server "$server" --chat --prompt "What is a mixture of experts?" \
  --max-tokens 32 --usage
under_mpirun=$(chat "$server")
echo "== a sampled request (temperature 0.8, top-p 0.95, seed 7), stopping at a full stop"
"$epx" generate --server "$server" --prompt "The experts of layer one" --max-tokens 48 \
  --temperature 0.8 --top-p 0.95 --seed 7 --stop "." --usage
echo "== 16 requests from 4 clients at once"
"$epx" bench serve --server "$server" --concurrency 4 --requests 16 --max-tokens 32

echo "== the server's statistics: expert load, per-layer timings, workers"
"$epx" stats --server "$server"

echo "== shutting the cluster down"
"$epx" shutdown --server "$server"
wait $cluster
trap - EXIT

echo "== the same cluster without mpirun: a coordinator waiting for 2 workers (--workers 2), and"
echo "   2 \`epx worker\` processes started on their own; they register over gRPC, get their"
echo "   ranks and experts, and form the gloo data plane"
rm -f "$port_file"
log="$build_dir/quickstart-coordinator.log"
http_port_file="$build_dir/quickstart.http-port"
rm -f "$http_port_file"
"$epx" serve --model "$model_dir" --listen 127.0.0.1:0 --port-file "$port_file" --workers 2 \
  --http-listen 127.0.0.1:0 --http-port-file "$http_port_file" > "$log" 2>&1 &
coordinator=$!
trap 'kill $coordinator 2>/dev/null || true' EXIT
server=$(wait_for_port $coordinator "$log")
for w in 1 2; do
  "$epx" worker --model "$model_dir" --coordinator "$server" \
    > "$build_dir/quickstart-worker$w.log" 2>&1 &
done
"$epx" health --server "$server" --service epx.v1.Generation --wait --timeout 60
launcher_free=$(chat "$server")
echo "$launcher_free"
if [ "$launcher_free" != "$under_mpirun" ]; then
  echo "the launcher-free cluster answered differently from the mpirun one" >&2
  exit 1
fi
echo "(the same tokens as the cluster under mpirun)"
http="127.0.0.1:$(cat "$http_port_file")"
echo "== the OpenAI-compatible HTTP API and the dashboard (http://$http/ while it runs)"
"$epx" bench serve --api openai --server "$http" --concurrency 2 --requests 4 --max-tokens 16
python3 - "$http" <<'PY'
import json, sys, urllib.request
base = "http://" + sys.argv[1]
page = urllib.request.urlopen(base + "/").read()
stats = json.load(urllib.request.urlopen(base + "/v1/epx/stats"))
print("dashboard page: %d bytes; its stats: %s steps, %d layers x %d experts, %d workers"
      % (len(page), stats["steps"], len(stats["layers"]), len(stats["layers"][0]["expert_tokens"]),
         len(stats["workers"])))
PY
"$epx" shutdown --server "$server"
wait $coordinator
wait
trap - EXIT
echo "The weights are random, so the text is too: the point is the pipeline. Next: README.md."
