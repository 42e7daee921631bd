#!/usr/bin/env bash
# Set up (scripts/setup.sh), then lint (ruff), type-check (mypy --strict) and run the
# whole test suite. PostgreSQL must be reachable on 127.0.0.1:5432 (user postgres):
# the PostgreSQL tests fail, they never skip, when it is not.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Tools the tests drive for real, from Debian's packages: `age` (bundle interoperability),
# `chromium` (the report, opened headless) and `poppler-utils` (pdftotext and pdftoppm read
# the dossier's PDF). Installed here when missing and root.
missing=""
command -v age >/dev/null 2>&1 || missing="$missing age"
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
command -v pdftotext >/dev/null 2>&1 || missing="$missing poppler-utils"
if [ -n "$missing" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "== installing$missing (Debian packages)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi
. .venv/bin/activate
echo "== ruff"; ruff check .
echo "== mypy"; mypy
echo "== pytest"; pytest -n 2 --dist loadgroup "$@"
