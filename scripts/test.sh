#!/usr/bin/env bash
# The whole test suite, set-up included, on a fresh Debian machine with Python >= 3.11:
#   bash scripts/test.sh            (extra arguments go to pytest, e.g. -k admission)
# Installs redis-server from Debian if it is missing, makes .venv with the project and its
# dev tools, then runs ruff, mypy and pytest (unit + integration with real processes).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

ensure_redis_server
ensure_project_venv

step "ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
step "mypy (strict)"
.venv/bin/mypy
step "pytest"
.venv/bin/pytest "$@"
