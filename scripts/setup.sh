#!/usr/bin/env bash
# Create .venv (Python 3.11) and install Passerelle with the pinned dependency set.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
"$PY" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' || {
  echo "error: Passerelle needs Python 3.11 (tensorflow-privacy 0.9.0 pins TensorFlow 2.15.1)" >&2
  exit 2
}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.passerelle-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade "pip>=24" "setuptools>=77" wheel
  .venv/bin/python -m pip install --quiet --disable-pip-version-check \
    -c constraints.txt -e ".[dev]"
  echo "$want" > "$stamp"
fi
