#!/usr/bin/env bash
# Creates the virtual environment the tests run their real clients from (the `openai` package
# against the HTTP API, prometheus-client's parser on /metrics): ${EPX_VENV:-.venv} from
# tests/requirements.txt. Idempotent: reinstalls only when the requirements changed.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${EPX_VENV:-.venv}
stamp="$venv/.requirements"
if [ -x "$venv/bin/python" ] && cmp -s tests/requirements.txt "$stamp"; then
  echo "python-env: $venv up to date"
  exit 0
fi
# Debian's interpreter (python3-venv), not whatever python3 is first on PATH.
python=/usr/bin/python3
[ -x "$python" ] || python=python3
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check -r tests/requirements.txt
cp tests/requirements.txt "$stamp"
echo "python-env: $venv ready ($("$venv/bin/python" -c 'import openai, prometheus_client, grpc, selenium; print("openai", openai.__version__, "grpcio", grpc.__version__, "selenium", selenium.__version__)'))"
