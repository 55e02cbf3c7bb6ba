#!/usr/bin/env bash
# The test suite: lint, workflow lint, then pytest (pytest's "no tests collected" is a failure).
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check .
ruff format --check .
snakemake --lint >/dev/null
python -m pytest "$@"
