#!/usr/bin/env bash
# The main job: set-up, then one Kontext edit through the transformer (tiny random weights unless
# --checkpoint or $KONTEXT_CHECKPOINT names a real FLUX.1 Kontext [dev] transformer).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m engines.demo "$@"
