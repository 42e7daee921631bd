#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run `passerelle demo` in a new folder under demo-runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p demo-runs
exec .venv/bin/passerelle demo --workdir "demo-runs/$(date +%Y%m%d-%H%M%S)" "$@"
