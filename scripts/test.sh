#!/usr/bin/env bash
# Set-up, then the whole test suite. pytest exits 5 when it collects no test, which
# fails this script like any other failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
