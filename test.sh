#!/usr/bin/env bash
# Run every check: lint, types, import layers, unit and property tests, and the
# real-QEMU tests.
# Needs ./setup.sh --no-run first (it builds .venv and the test guest).
# Extra arguments go to pytest, e.g. ./test.sh -k planner
set -euo pipefail
cd "$(dirname "$0")"
.venv/bin/ruff check reconciler tests
.venv/bin/mypy --strict reconciler
.venv/bin/lint-imports --no-cache >/dev/null || .venv/bin/lint-imports --no-cache
.venv/bin/python -m pytest "$@"
