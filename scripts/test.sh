#!/usr/bin/env bash
# Install (if needed) and run the test suite. GPU tests skip themselves on CPU-only machines.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
exec "${VENV:-.venv}/bin/python" -m pytest -q -rs tests "$@"
