#!/usr/bin/env bash
# Packs a build into a folder that runs from anywhere it is moved or copied to:
#   bin/epx, bench/ (the benchmark executables that were built), lib/ (libepx_sentencepiece.so and
#   every shared library they need but the C/C++ runtime and CUDA, which the node supplies),
#   deploy/mpirun.sh, deploy/hostfile.example and a README.txt on running it.
# Every executable's RUNPATH becomes $ORIGIN/../lib and every bundled library's $ORIGIN (patchelf).
# Usage:
#   deploy/bundle.sh [--build-dir DIR] [--out DIR] [--tar] [--gpu-check]
#     --build-dir  the build to pack (default ${EPX_BUILD_DIR:-build}, from the repository root)
#     --out        the folder to write (default dist/epx-<version>-<arch>); an earlier bundle
#                  there is replaced, any other non-empty folder is an error
#     --tar        also write <out>.tar.gz next to the folder
#     --gpu-check  for validating a GPU node: the CUDA benchmarks only (not the CPU ones and their
#                  OpenBLAS) plus the `gpu` test binaries in tests/; deploy/gpu_check.sh runs them
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)  # --build-dir and --out stay relative to the caller

die() { echo "bundle: error: $*" >&2; exit 1; }

build_dir="" out="" tar=0 gpu_check=0
while [ $# -gt 0 ]; do
  case "$1" in
    --build-dir) [ $# -ge 2 ] || die "--build-dir needs a value"; build_dir=$2; shift 2 ;;
    --out) [ $# -ge 2 ] || die "--out needs a value"; out=$2; shift 2 ;;
    --tar) tar=1; shift ;;
    --gpu-check) gpu_check=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (deploy/bundle.sh [--build-dir DIR] [--out DIR] [--tar] [--gpu-check])" ;;
  esac
done
if [ -z "$build_dir" ]; then
  build_dir=${EPX_BUILD_DIR:-build}
  case "$build_dir" in /*) ;; *) build_dir="$root/$build_dir" ;; esac
fi
[ -d "$build_dir" ] || die "no build directory at $build_dir (build first: bash deploy/build.sh)"
build_dir=$(cd "$build_dir" && pwd)
epx="$build_dir/cli/epx"
module="$build_dir/cli/libepx_sentencepiece.so"
[ -x "$epx" ] || die "no epx binary at $epx: build first (bash deploy/build.sh) or pass --build-dir"
[ -f "$module" ] || die "no tokenizer module at $module: the build is incomplete"
command -v patchelf > /dev/null || die "patchelf is not installed (bash deploy/install-deps.sh)"

arch=$(uname -m)
cache_entry() { sed -n "s/^$1:[A-Z]*=//p" "$build_dir/CMakeCache.txt" 2> /dev/null || true; }
version=$(cache_entry CMAKE_PROJECT_VERSION)
build_id=$("$epx" --version) || die "$epx --version failed: the binary does not run here"
[ -n "$version" ] || version=$(echo "$build_id" | sed -E 's/^epx-([0-9.]+).*/\1/')
[ -n "$out" ] || out="$root/dist/epx-$version-$arch"
mkdir -p "$(dirname "$out")"
out="$(cd "$(dirname "$out")" && pwd)/$(basename "$out")"
if [ -e "$out" ] && [ -n "$(ls -A "$out" 2> /dev/null || echo file)" ] &&
   ! { [ -f "$out/bin/epx" ] && [ -f "$out/README.txt" ]; }; then
  die "$out exists and is not an epx bundle; not replacing it"
fi

# Built next to the final folder and renamed into place at the end: never a half-made bundle.
work=$(mktemp -d "$(dirname "$out")/.epx-bundle.XXXXXX")
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"
mkdir -p "$work/bin" "$work/lib" "$work/deploy"

# The executables worth shipping: epx and every benchmark that was built.
cp "$epx" "$work/bin/epx"
shipped=("$work/bin/epx")
if [ -d "$build_dir/bench" ]; then
  for f in "$build_dir"/bench/*; do
    if ! [ -f "$f" ] || ! [ -x "$f" ] || [ "$(head -c 4 "$f")" != $'\x7fELF' ]; then continue; fi
    if [ "$gpu_check" = 1 ]; then
      case "$(basename "$f")" in cuda_*|comm_alltoall_bench) ;; *) continue ;; esac
    fi
    mkdir -p "$work/bench"
    cp "$f" "$work/bench/"
    shipped+=("$work/bench/$(basename "$f")")
  done
fi
if [ "$gpu_check" = 1 ]; then
  # The gpu-labelled test binaries (tests/*/cuda_*_test); they find the fixtures through
  # $EPX_TEST_DATA_DIR (deploy/gpu_check.sh points it at the source tree's tests/data).
  for f in "$build_dir"/tests/*/cuda_*_test; do
    [ -x "$f" ] || continue
    mkdir -p "$work/tests"
    cp "$f" "$work/tests/"
    shipped+=("$work/tests/$(basename "$f")")
  done
  [ -d "$work/tests" ] || die "--gpu-check: no cuda_*_test binaries in $build_dir/tests"
fi
cp "$module" "$work/lib/"
shipped+=("$work/lib/libepx_sentencepiece.so")

# What the node supplies: glibc, the GCC C++ runtime, and the CUDA driver and toolkit libraries
# (they must match the node's driver). Everything else a binary needs is copied into lib/.
runtime_lib() {
  case "$1" in
    linux-vdso.so*|linux-gate.so*|ld-linux*.so*|ld64.so*|*/ld-linux*.so*) return 0 ;;
    libc.so*|libm.so*|libmvec.so*|libpthread.so*|libdl.so*|librt.so*|libresolv.so*) return 0 ;;
    libutil.so*|libanl.so*|libnsl.so*|libBrokenLocale.so*|libthread_db.so*) return 0 ;;
    libstdc++.so*|libgcc_s.so*) return 0 ;;
  esac
  return 1
}
cuda_lib() {
  case "$1" in
    libcuda.so*|libcudart.so*|libcublas*.so*|libcufft*.so*|libcurand.so*) return 0 ;;
    libcusolver*.so*|libcusparse*.so*|libnvrtc*.so*|libnvJitLink.so*|libnvToolsExt.so*) return 0 ;;
    libnccl*.so*|libnvidia*.so*) return 0 ;;
  esac
  return 1
}

# ldd lists the whole transitive closure, resolved as the loader would for that binary.
declare -A lib_path=()
node_cuda=()
for f in "${shipped[@]}"; do
  while read -r name arrow path _; do
    [ "$arrow" = "=>" ] || continue  # the vdso and the loader itself
    [ "$path" != "not" ] || die "$(basename "$f") needs $name, which ldd does not find here"
    runtime_lib "$name" && continue
    if cuda_lib "$name"; then node_cuda+=("$name"); continue; fi
    real=$(readlink -f "$path")
    if [ -n "${lib_path[$name]:-}" ] && [ "${lib_path[$name]}" != "$real" ]; then
      die "$name resolves to both ${lib_path[$name]} and $real (for $(basename "$f"))"
    fi
    lib_path[$name]=$real
  done < <(ldd "$f")
done
for name in "${!lib_path[@]}"; do
  cp "${lib_path[$name]}" "$work/lib/$name"
  chmod 755 "$work/lib/$name"
done

# shellcheck disable=SC2016  # $ORIGIN is for the loader, not the shell
for f in "${shipped[@]}"; do
  case "$f" in
    "$work"/lib/*) ;;
    *) patchelf --set-rpath '$ORIGIN/../lib' "$f" ;;
  esac
done
# shellcheck disable=SC2016
for f in "$work"/lib/*; do
  patchelf --set-rpath '$ORIGIN' "$f"
done

cp "$root/deploy/mpirun.sh" "$root/deploy/hostfile.example" "$work/deploy/"

# What the node must provide, for README.txt.
all_elf=("$work"/bin/* "$work"/lib/*)
[ -d "$work/bench" ] && all_elf+=("$work"/bench/*)
[ -d "$work/tests" ] && all_elf+=("$work"/tests/*)
newest() { objdump -T "${all_elf[@]}" 2> /dev/null | grep -oE "\($1_[0-9.]+\)" | tr -d '()' |
           sort -uV | tail -1 || true; }
glibc=$(newest GLIBC) glibcxx=$(newest GLIBCXX)
cpu_arch=$(cache_entry EPX_CPU_ARCH)
cpu_note="the compiler's default -march"
[ -n "$cpu_arch" ] && cpu_note="-march=$cpu_arch"
[ -f "$build_dir/CMakeCache.txt" ] || cpu_note="an -march not recorded here (no CMakeCache.txt)"
if [ "$cpu_arch" = "native" ]; then
  cpu_model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
  cpu_note="-march=native on this CPU ($cpu_model): it may stop with SIGILL on
    a CPU without its instruction sets. For other machines, build with -DEPX_CPU_ARCH=x86-64-v3"
  echo "bundle: warning: $build_dir was built with -march=native; for other CPUs rebuild with" \
       "-DEPX_CPU_ARCH=x86-64-v3" >&2
fi
mapfile -t node_cuda < <(printf '%s\n' "${node_cuda[@]}" | sort -u | sed '/^$/d')
if [ ${#node_cuda[@]} -gt 0 ]; then
  cuda_note="${node_cuda[*]}"
  cuda_note="this build needs ${cuda_note// /, }"
else
  cuda_note="this build links no CUDA library"
fi
if ls "$work"/lib/libmpi.so* > /dev/null 2>&1; then
  mpi_version=$(ompi_info --version 2> /dev/null | sed -n 's/^Open MPI v//p' | head -1 || true)
  mpi_name="Open MPI${mpi_version:+ $mpi_version}"
  mpi_note="lib/ holds the libraries of $mpi_name (libmpi, libopen-rte, libopen-pal), so
    epx runs as a single process, or as a cluster formed without mpirun (\`epx serve --workers W\`
    and \`epx worker --coordinator HOST:PORT\`, gloo over TCP), on nodes without MPI. An mpirun
    job needs the Open MPI runtime
    installed on every node: mpirun, orted and Open MPI's plugins (which the bundled libmpi loads
    from the node's install) are not in this folder, and must be the same Open MPI version as the
    bundled libmpi (\`ompi_info --version\`; Debian 12: apt-get install openmpi-bin). With another
    Open MPI, use the node's libraries instead: LD_LIBRARY_PATH=<its lib dir> takes precedence
    over the bundled ones."
else
  mpi_note="this build has no MPI data plane (EPX_ENABLE_MPI=OFF): epx runs as a single process."
fi
bench_line=""
[ -d "$work/bench" ] && bench_line="
  bench/                  $(cd "$work/bench" && echo *) (bench/README.md in the sources)"
[ -d "$work/tests" ] && bench_line="$bench_line
  tests/                  the gpu test binaries (deploy/gpu_check.sh in the sources runs them)"

cat > "$work/README.txt" << EOF
$build_id, relocatable bundle for $arch
(made by deploy/bundle.sh from $build_dir)

This folder runs from wherever it is moved or copied to: the executables find lib/ through their
RUNPATH (\$ORIGIN/../lib), and epx loads its tokenizer module from ../lib/ next to the real path
of the binary (a symlink to bin/epx works; EPX_SENTENCEPIECE_MODULE names another module).

Layout
  bin/epx                 the epx binary$bench_line
  lib/                    libepx_sentencepiece.so and the shared libraries the executables need
                          (gRPC, protobuf, abseil, Open MPI, OpenMP, ...)
  deploy/mpirun.sh        launches bin/epx as 1 coordinator + W expert workers on this machine
  deploy/hostfile.example an Open MPI hostfile for a job across machines

Running
  bin/epx --help                      # the subcommands; bin/epx SUBCOMMAND --help for their flags
  bin/epx make-model --preset tiny --out /tmp/tiny --seed 1
  bin/epx generate --model /tmp/tiny --prompt "Hello" --max-tokens 32
  bin/epx serve --model /tmp/tiny --listen 127.0.0.1:50051
  deploy/mpirun.sh 2 generate --model /tmp/tiny --prompt "Hello" --stats   # from this folder

What the node must provide
  - glibc ${glibc#GLIBC_} or newer and a libstdc++ with ${glibcxx} (GCC's C++ runtime), as on
    Debian 12: they are not bundled.
  - CPU: built with $cpu_note.
  - CUDA: the driver (libcuda) and the CUDA runtime libraries (libcudart, libcublas, libnccl, ...)
    are not bundled: they come from the node's own CUDA install and must be on the loader's path
    (ldconfig, or LD_LIBRARY_PATH):
    $cuda_note.
  - MPI: $mpi_note
  - Across machines, put this folder at the same path on every node (or on a shared file
    system); see deploy/hostfile.example.
EOF

rm -rf "$out"
mv "$work" "$out"
trap - EXIT
env -i PATH=/usr/bin:/bin "$out/bin/epx" --version > /dev/null ||
  die "the bundled $out/bin/epx does not start"
echo "bundle: $out ($(find "$out/lib" -type f | wc -l) libraries in lib/)"
if [ "$tar" -eq 1 ]; then
  tar -C "$(dirname "$out")" --owner=0 --group=0 --numeric-owner -czf "$out.tar.gz" \
    "$(basename "$out")"
  echo "bundle: $out.tar.gz"
fi
