"""Export a calibrated Kontext as one ComfyUI-native checkpoint (the Export ComfyUI Checkpoint node, from a shell).

    python scripts/export_checkpoint.py --checkpoint flux1-kontext-dev.safetensors \\
        --state models/tensorrt/<engine>.calibration.safetensors --out models/diffusion_models/kontext_fp8_trt.safetensors

--checkpoint: the file the state was calibrated from (16-bit, fp8_scaled or comfy_quant FP8); --state: the calibrated
state Build Engine keeps beside its engine. Streams one tensor at a time; writes atomically.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines.comfy_export import export_comfy_checkpoint  # noqa: E402
from engines.source_weights import open_checkpoint  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--state", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    if not args.state.is_file():
        parser.error(f"--state: no such file {args.state}")
    with open_checkpoint(args.checkpoint) as weights:
        source = weights.describe()
        out = export_comfy_checkpoint(weights, args.state, args.out, source=source)
    print(f"wrote {out} ({out.stat().st_size / 2**30:.2f} GiB) from {source['name']} ({source['format']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
