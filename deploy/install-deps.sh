#!/usr/bin/env bash
# Installs the Debian 12 packages epx builds and tests with. Idempotent: installs only what is
# missing. Run as root (or with sudo available). The CUDA toolkit is optional and not installed
# here: CUDA sources are built when nvcc is on PATH.
set -euo pipefail

packages=(
  build-essential cmake ninja-build ccache pkg-config git
  libabsl-dev                       # Status/StatusOr, strings, flags, synchronization
  nlohmann-json3-dev                # config.json / safetensors header parsing
  libcli11-dev                      # command-line parsing of the epx subcommands
  libsentencepiece-dev              # tokenizer.model
  libgrpc++-dev libprotobuf-dev     # client API and control plane (gRPC, protobuf)
  protobuf-compiler protobuf-compiler-grpc  # protoc and its gRPC C++ plugin
  libopenblas-dev                   # the BLAS peer in bench/
  libopenmpi-dev openmpi-bin        # the CPU data plane under a launcher (mpirun -np 1+W)
  libgloo-dev                       # the CPU data plane without a launcher (TCP)
  libcpp-httplib-dev                # the OpenAI-compatible HTTP front end and /metrics
  python3-venv                      # deploy/python-env.sh: the openai / prometheus-client test venv
  openssl                           # the TLS tests make their certificates with it
  slurm-wlm munge                   # deploy/slurm/: the Slurm test runs a single-node Slurm
  chromium chromium-driver          # the dashboard test: headless Chromium through WebDriver
  fonts-dejavu-core                 # ... with a font to render the page (and its screenshot)
  procps                            # pgrep, for the mpi tests that signal a rank
  patchelf                          # deploy/bundle.sh: RUNPATH of the bundled binaries
  libgtest-dev libgmock-dev         # unit tests
  libbenchmark-dev                  # bench/
  python3
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages present"
  exit 0
fi

echo "install-deps: installing ${missing[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
