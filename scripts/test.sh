#!/usr/bin/env bash
# Set-up, then the whole test suite. pytest exits 5 when it collects no test, which
# fails this script like any other failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Lint first: CI fails on a ruff finding as on a failing test.
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
