"""Check a built engine on this machine's GPU: the engine and the PyTorch backend on the same edit steps, the
cosine per sigma, against the recipe's tolerance.

    python scripts/check_engine.py ENGINE CHECKPOINT [--sigmas 0.9 0.7 0.5 0.3 0.1] [--pairs 2]

ENGINE: a .engine from models/tensorrt (its .json sidecar and .calibration.safetensors beside it, as Build Engine
leaves them); CHECKPOINT: the FLUX.1 Kontext [dev] checkpoint it was built from. Run it with ComfyUI's Python
(TensorRT, torch with CUDA and the pack's requirements installed there). The engine and the reference run one
after the other, so the GPU needs room for the larger of the two, not both. Exit status: 0 when every sigma is
within the recipe's tolerance, 1 when one is below it, 2 when the check cannot run (the reason is printed).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv):
    from engines.engine_check import DEFAULT_SIGMAS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("engine", type=Path)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--sigmas", type=float, nargs="+", default=list(DEFAULT_SIGMAS))
    parser.add_argument("--pairs", type=int, default=2, help="edit pairs per sigma (default 2)")
    return parser.parse_args(argv)


def main(argv=None, runtime=None) -> int:
    """runtime: (TensorRT, backend class, device) to run with instead of this machine's TensorRT and GPU (tests)."""
    sys.path.insert(0, str(ROOT))
    import torch

    from engines.config import KontextConfig
    from engines.engine_check import (EngineCheckError, check_pairs, compare, engine_recipe, format_report,
                                      read_sidecar, reference_loader)
    from engines.engine_store import EngineStoreError
    from engines.runtime_tensorrt import EngineMismatch, TensorRTBackend, check_engine_metadata
    from engines.shape_profiles import ProfileError
    from engines.tensorrt_build import TensorRTMissing, import_tensorrt

    args = parse_args(argv)
    try:
        if args.pairs < 1 or not args.sigmas or not all(0 < s <= 1 for s in args.sigmas):
            raise EngineCheckError(f"--pairs must be >= 1 and --sigmas in (0, 1], got {args.pairs} and {args.sigmas}")
        meta = read_sidecar(args.engine)
        recipe = engine_recipe(meta)
        config = KontextConfig.from_dict(meta["model_config"])
        if runtime is None:
            trt = import_tensorrt(meta["tensorrt"]["flavour"])
            gpu = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
            check_engine_metadata(meta, trt.flavour, trt.version, gpu, torch.cuda.get_device_name() if gpu else "")
            backend_class, device = TensorRTBackend, torch.device("cuda")
        else:
            trt, backend_class, device = runtime
        reference_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        load_reference, reference = reference_loader(meta, args.engine, args.checkpoint, device, reference_dtype)
        engine = backend_class(args.engine, meta, trt, config)
        pairs = check_pairs(config, engine.profiles[0], args.pairs)
        result = compare(engine, load_reference, pairs, args.sigmas, device, engine.dtype, reference_dtype,
                         recipe.min_cosine, reference)
    except (EngineCheckError, EngineStoreError, EngineMismatch, TensorRTMissing, ProfileError) as e:
        print(f"cannot check the engine: {e}", file=sys.stderr)
        return 2
    print(format_report(result, args.engine.name, recipe, pairs))
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
