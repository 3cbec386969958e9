#!/usr/bin/env bash
# The main job: set-up, then everything the pack does, stage by stage, on its embedded tiny random-weight
# Kontext on the CPU (engines/demo.py): FP8 calibration, ONNX, a TensorRT-RTX engine, the PyTorch FP8
# backend, a three-turn edit; writes output/demo/ (sheet.png, report.json, report.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "main job: starting Python (PyTorch, ModelOpt, TensorRT-RTX) ..."
exec .venv/bin/python -m engines.demo "$@"
