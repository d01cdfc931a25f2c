#!/usr/bin/env bash
# Trains every stage on the built-in shapes data, samples, reranks, writes a grid.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/dalle demo "$@"
