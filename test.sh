#!/usr/bin/env bash
# Runs the whole test suite (installing first if needed), then the linter.
set -euo pipefail
cd "$(dirname "$0")"
bash install.sh
.venv/bin/python -m pytest -q "$@"
.venv/bin/ruff check .
