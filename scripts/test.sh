#!/usr/bin/env bash
# The test command: set-up, then the whole suite. Set COMFYUI_PATH to a ComfyUI checkout to also run
# the ComfyUI integration tests (skipped, with the reason, otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest tests -ra "$@"
