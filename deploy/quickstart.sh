#!/usr/bin/env bash
# Quickstart: build epx, make a small random Mixtral-layout model (~180 MB), generate from it on
# the CPU (greedy and sampled), check the engine against the golden reference, alone and with
# the experts on 2 worker processes under mpirun. Output lands in ${EPX_BUILD_DIR:-build}.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/build.sh
build_dir=${EPX_BUILD_DIR:-build}
model_dir=${EPX_MODEL_DIR:-$build_dir/models/small}
epx="$build_dir/cli/epx"

echo "== making a small random model (Mixtral layout: 4 layers, 8 experts, top-2, GQA 8:2) in $model_dir"
[ -f "$model_dir/config.json" ] || "$epx" make-model --preset small --out "$model_dir" --seed 1

echo "== greedy generation"
"$epx" generate --model "$model_dir" --prompt "[INST] What is a mixture of experts? [/INST]" \
  --max-tokens 32
echo "== sampled generation (temperature 0.8, top-p 0.95, seed 7)"
"$epx" generate --model "$model_dir" --prompt "The experts of layer one" --max-tokens 32 \
  --temperature 0.8 --top-p 0.95 --seed 7
echo "== golden check: the CPU engine against the float64 reference of tests/data/tiny-mixtral"
"$epx" eval --model tests/data/tiny-mixtral --input tests/data/tiny-mixtral/golden.safetensors \
  --output "$build_dir/golden-eval.safetensors" --check
echo "== the same check with the experts on 2 worker processes (mpirun -np 3), with --stats"
bash deploy/mpirun.sh 2 eval --model tests/data/tiny-mixtral \
  --input tests/data/tiny-mixtral/golden.safetensors \
  --output "$build_dir/golden-eval-mpi.safetensors" --check --stats
cmp "$build_dir/golden-eval.safetensors" "$build_dir/golden-eval-mpi.safetensors" &&
  echo "the 3-process output is bit-for-bit the single-process one"
echo "The weights are random, so the text is too: the point is the pipeline. Next: README.md."
