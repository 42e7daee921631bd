#!/usr/bin/env bash
# Set up (scripts/setup.sh), then lint (ruff), type-check (mypy --strict) and run the
# whole test suite. PostgreSQL must be reachable on 127.0.0.1:5432 (user postgres):
# the PostgreSQL tests fail, they never skip, when it is not.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The bundle interoperability tests decrypt with the standard `age` tool (Debian package).
if ! command -v age >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "== installing age (Debian package)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq age >/dev/null
fi
. .venv/bin/activate
echo "== ruff"; ruff check .
echo "== mypy"; mypy
echo "== pytest"; pytest -n 2 --dist loadgroup "$@"
