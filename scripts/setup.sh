#!/usr/bin/env bash
# Creates ./.venv with everything the demo and the tests need, on a machine with only Python 3.10+.
# torch is pinned to 2.13.0 here (a CPU build is enough for tests and the tiny demo); inside ComfyUI
# the pack uses ComfyUI's own torch and requirements.txt never names torch.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
start=$SECONDS

# Runs "$@", saying what it does first and, while it runs (a first install downloads for minutes with pip
# kept quiet), that it is still at it every 20 s.
step() {
  local what=$1
  shift
  echo "setup: $what"
  (while sleep 20; do echo "setup:   ... still $what ($((SECONDS - start)) s so far)"; done) &
  local ticker=$! rc=0
  "$@" || rc=$?
  kill "$ticker" 2>/dev/null || true
  wait "$ticker" 2>/dev/null || true
  return "$rc"
}

if [ ! -x .venv/bin/python ]; then
  step "creating ./.venv with $("$python" --version 2>&1)" "$python" -m venv .venv
fi
step "installing torch 2.13.0 into .venv (the first time: a large download)" \
  .venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
step "installing requirements-dev.txt (ModelOpt, ONNX, TensorRT-RTX, pytest, ...)" \
  .venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0" -r requirements-dev.txt
echo "setup: .venv ready ($((SECONDS - start)) s)"
