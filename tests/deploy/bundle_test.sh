#!/usr/bin/env bash
# deploy/bundle.sh end to end: bundles the build, moves the folder elsewhere and checks that it
# runs there with an empty environment, that epx loads its tokenizer module and every bundled
# library from the bundle's own lib/, that only the C/C++ runtime and CUDA come from the system,
# and that the tarball unpacks to a working copy. Usage:
#   bundle_test.sh BUILD_DIR SOURCE_DIR
set -euo pipefail
build_dir=${1:?usage: bundle_test.sh BUILD_DIR SOURCE_DIR}
src=${2:?usage: bundle_test.sh BUILD_DIR SOURCE_DIR}
tmp=$(cd "$(mktemp -d "${TMPDIR:-/tmp}/epx_bundle_test.XXXXXX")" && pwd -P)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }
clean() { env -i PATH=/usr/bin:/bin "$@"; }  # no LD_LIBRARY_PATH, no EPX_* from the caller
model="$src/tests/data/tiny-mixtral"

# A build directory without epx is refused, naming what is missing.
mkdir "$tmp/no_build"
if msg=$(bash "$src/deploy/bundle.sh" --build-dir "$tmp/no_build" --out "$tmp/x" 2>&1); then
  fail "bundle.sh accepted a build directory without epx"
fi
grep -q "no epx binary at $tmp/no_build/cli/epx" <<< "$msg" || fail "unclear error: $msg"

bash "$src/deploy/bundle.sh" --build-dir "$build_dir" --out "$tmp/made/epx-test" --tar
[ -s "$tmp/made/epx-test.tar.gz" ] || fail "--tar wrote no epx-test.tar.gz next to the folder"

# Relocation: nothing may point back to where the bundle was made.
mkdir "$tmp/moved"
mv "$tmp/made/epx-test" "$tmp/moved/bundle"
bundle="$tmp/moved/bundle"
for f in bin/epx lib/libepx_sentencepiece.so deploy/mpirun.sh deploy/hostfile.example README.txt; do
  [ -f "$bundle/$f" ] || fail "the bundle has no $f"
done
# shellcheck disable=SC2016  # $ORIGIN is for the loader, not the shell
[ "$(readelf -d "$bundle/bin/epx" | sed -n 's/.*RUNPATH.*\[\(.*\)\]/\1/p')" = '$ORIGIN/../lib' ] ||
  fail "bin/epx: RUNPATH is not \$ORIGIN/../lib: $(readelf -d "$bundle/bin/epx" | grep PATH)"

# What may come from outside the bundle: glibc, the GCC C++ runtime, the CUDA driver and toolkit.
system='^(linux-vdso|ld-linux[^ ]*|libc|libm|libmvec|libpthread|libdl|librt|libresolv|libutil'
system+='|libanl|libnsl|libstdc\+\+|libgcc_s|libcuda|libcudart|libcublas[^ ]*|libcufft[^ ]*'
system+='|libcurand|libcusolver[^ ]*|libcusparse[^ ]*|libnvrtc[^ ]*|libnvJitLink|libnvToolsExt'
system+='|libnccl[^ ]*|libnvidia[^ ]*)\.so'
elves=("$bundle"/bin/* "$bundle"/lib/*)
[ -d "$bundle/bench" ] && elves+=("$bundle"/bench/*)
for f in "${elves[@]}"; do
  deps=$(clean ldd "$f") || fail "ldd $f: $deps"
  ! grep -q "not found" <<< "$deps" || fail "$f: $(grep "not found" <<< "$deps")"
  while read -r name arrow path _; do
    [ "$arrow" = "=>" ] || continue
    real=$(readlink -f "$path")
    if [ -e "$bundle/lib/$name" ]; then
      [ "$real" = "$bundle/lib/$name" ] || fail "$f: bundled $name resolves to $real"
    else
      [[ $name =~ $system ]] || fail "$f: $name comes from $real, not from the bundle"
    fi
  done <<< "$deps"
done

version=$(clean "$bundle/bin/epx" --version) || fail "bin/epx --version failed: $version"
[[ $version == epx-* ]] || fail "bin/epx --version printed '$version'"
clean "$bundle/bin/epx" eval --model "$model" --input "$model/golden.safetensors" \
  --output "$tmp/eval.safetensors" --check > "$tmp/eval.log" 2>&1 ||
  fail "bin/epx eval --check: $(cat "$tmp/eval.log")"
grep -q "check passed" "$tmp/eval.log" || fail "eval --check: $(cat "$tmp/eval.log")"

# A text prompt loads the tokenizer module: it must be the bundle's (exe/../lib), not the one the
# build path baked into the loader still points at; LD_DEBUG names every object initialised.
if clean ldd "$bundle/bin/epx" | grep -q libasan; then
  echo "skipping the tokenizer check: sanitizer runtimes refuse the module's RTLD_DEEPBIND"
else
  clean LD_DEBUG=files "$bundle/bin/epx" generate --model "$model" --prompt "Hello" \
    --max-tokens 4 > "$tmp/generate.log" 2>&1 || fail "bin/epx generate: $(cat "$tmp/generate.log")"
  for lib in libepx_sentencepiece.so libsentencepiece.so.0; do
    grep -q "calling init: $bundle/lib/$lib\$" "$tmp/generate.log" ||
      fail "$lib was not loaded from $bundle/lib: $(grep -i sentencepiece "$tmp/generate.log")"
  done
  while read -r path; do
    case "$path" in "$bundle"/*) continue ;; esac
    [[ $(basename "$path") =~ $system ]] || fail "generate loaded $path from outside the bundle"
  done < <(sed -n 's/.*calling init: //p' "$tmp/generate.log" | sort -u)
fi

# The bundle's deploy/mpirun.sh launches the bundle's epx (a stand-in mpirun prints its argv).
mkdir "$tmp/fake_bin"
printf '#!/bin/sh\necho "$@"\n' > "$tmp/fake_bin/mpirun"
chmod +x "$tmp/fake_bin/mpirun"
launch=$(env -i PATH="$tmp/fake_bin:/usr/bin:/bin" bash "$bundle/deploy/mpirun.sh" 2 --version)
[[ " $launch " == *" -np 3 $bundle/bin/epx --version "* ]] ||
  fail "deploy/mpirun.sh in the bundle launched: $launch"

# The tarball holds the same folder, which runs wherever it is unpacked.
mkdir "$tmp/unpacked"
tar -C "$tmp/unpacked" -xzf "$tmp/made/epx-test.tar.gz"
[ "$(clean "$tmp/unpacked/epx-test/bin/epx" --version)" = "$version" ] ||
  fail "the unpacked tarball's bin/epx does not run"
# A CUDA build's --gpu-check bundle: the gpu test binaries and only the CUDA benchmarks, and
# deploy/gpu_check.sh runs the tests from it (here they skip: no device).
if compgen -G "$build_dir/tests/*/cuda_*_test" > /dev/null; then
  bash "$src/deploy/bundle.sh" --build-dir "$build_dir" --out "$tmp/gpu" --gpu-check > /dev/null
  [ -x "$tmp/gpu/tests/cuda_forward_test" ] || fail "--gpu-check: no tests/cuda_forward_test"
  ! [ -e "$tmp/gpu/bench/cpu_layers_bench" ] || fail "--gpu-check shipped the CPU benchmarks"
  summary=$(bash "$src/deploy/gpu_check.sh" --bundle "$tmp/gpu" --out "$tmp/gpu_out" --tests) ||
    fail "gpu_check.sh --tests failed: $summary"
  grep -q "PASS cuda_forward_test" <<< "$summary" || fail "gpu_check.sh said: $summary"
fi
echo "PASS: $bundle ($version)"
