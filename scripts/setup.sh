#!/usr/bin/env bash
# Shared set-up for demo.sh and test.sh: a .venv with torch 2.13.0 (CPU) and the project.
# torch goes first because a bare `torch` requirement pulls gigabytes of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv" >&2
    "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    echo "[setup] installing torch==2.13.0" >&2
    .venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
fi
stamp=.venv/.dalle-install-stamp
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[setup] installing the project" >&2
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev,digits,hf]"
    # OpenAI's dVAE package, for the parity test only: its own requirements pull a CUDA
    # torchvision, so it goes in without dependencies.
    .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps dall-e==0.1
    .venv/bin/python -m pip install -q --disable-pip-version-check requests attrs
    echo "$want" > "$stamp"
fi
