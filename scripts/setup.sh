#!/usr/bin/env bash
# Creates ./.venv with everything the demo and the tests need, on a machine with only Python 3.10+.
# torch is pinned to 2.13.0 here (a CPU build is enough for tests and the tiny demo); inside ComfyUI
# the pack uses ComfyUI's own torch and requirements.txt never names torch.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0" -r requirements-dev.txt
