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
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    echo "[setup] installing torch==2.13.0" >&2
    # pip, not uv: pip honours the machine's pip configuration (e.g. a local CPU wheel).
    # No .pyc pass over torch's thousands of files: a fresh set-up is part of the demo's 10 minutes.
    "${PIP[@]}" --no-compile torch==2.13.0
fi
stamp=.venv/.dalle-install-stamp
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[setup] installing the project" >&2
    # uv resolves and installs the other dependencies several times faster than pip; it
    # keeps the torch above, which satisfies the project's requirement. pip if uv is unavailable.
    INSTALL=("${PIP[@]}")
    if "${PIP[@]}" uv >/dev/null 2>&1 && [ -x .venv/bin/uv ]; then
        INSTALL=(.venv/bin/uv pip install -q --python .venv/bin/python)
    fi
    "${INSTALL[@]}" -e ".[dev,digits,hf,serve]"
    # OpenAI's dVAE package, for the parity test only: its own requirements pull a CUDA
    # torchvision, so it goes in without dependencies.
    "${INSTALL[@]}" --no-deps dall-e==0.1
    "${INSTALL[@]}" requests attrs
    # taming-transformers' VQGAN modules, for the VQGAN parity test only: its requirements pull
    # Lightning and a CUDA torchvision; the two modules the test imports need only torch, numpy
    # and einops (already the project's).
    "${INSTALL[@]}" --no-deps taming-transformers-rom1504==0.0.6
    .venv/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
    echo "$want" > "$stamp"
fi
