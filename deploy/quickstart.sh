#!/usr/bin/env bash
# Quickstart: build epx, make a small random Mixtral-layout model (~180 MB), start a local
# cluster on it (a coordinator serving gRPC and 2 expert workers, under mpirun), send it a few
# requests with the epx client, print the answers and the expert-load stats, and shut the
# cluster down. Also checks the engine against the golden reference. Output lands in
# ${EPX_BUILD_DIR:-build}; the server's log in $build_dir/quickstart-serve.log.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/build.sh
build_dir=${EPX_BUILD_DIR:-build}
model_dir=${EPX_MODEL_DIR:-$build_dir/models/small}
epx="$build_dir/cli/epx"
port_file="$build_dir/quickstart.port"
log="$build_dir/quickstart-serve.log"

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
for _ in $(seq 300); do
  [ -s "$port_file" ] && break
  kill -0 $cluster 2>/dev/null || { cat "$log"; echo "the cluster did not start"; exit 1; }
  sleep 0.2
done
server="127.0.0.1:$(cat "$port_file")"
"$epx" health --server "$server" --service epx.v1.Generation --wait --timeout 60

echo "== a chat request (Mixtral-Instruct template), greedy"
"$epx" generate --server "$server" --chat --prompt "What is a mixture of experts?" \
  --max-tokens 32 --usage
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
echo "The weights are random, so the text is too: the point is the pipeline. Next: README.md."
