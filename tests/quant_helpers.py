"""Shared set-up for the quantization tests: a tiny model and a small encoded calibration set."""
from engines import random_state_dict, tiny_config, transformer_from_state_dict
from engines.calibration import StandInEncoder, read_calibration_set, write_default_calibration_set

CFG = tiny_config()
SIZE = 128  # pixels: an 8 x 8 token grid, plus an 8 x 8 reference


def tiny_model(seed=0, device="cpu", dtype=None):
    import torch

    sd = random_state_dict(CFG, seed=seed, dtype=dtype or torch.float32)
    return transformer_from_state_dict({k: v.to(device) for k, v in sd.items()}), sd


def encoded_pairs(tmp_path, n=3):
    pairs = read_calibration_set(write_default_calibration_set(tmp_path / "calib", size=SIZE))[:n]
    encode = StandInEncoder(CFG, n_txt=16)
    return [encode(p, SIZE) for p in pairs]


def tiny_fp8_engine(tmp_path, sd, checkpoint: str):
    """What Build Engine leaves for the loader, for sd (a tiny Kontext): a real engine (TensorRT-RTX, built on this CPU
    for compute capability 8.9) with its sidecar and calibrated state in tmp_path/tensorrt (fp8 recipe, 16-bit
    attention), and sd saved as tmp_path/diffusion_models/<checkpoint>. Returns the engine's path."""
    from safetensors.torch import save_file

    from engines.build import build_kontext_engine
    from engines.engine_store import EngineStore
    from engines.recipes import load_recipe
    from engines.shape_profiles import named_profile
    from engines.tensorrt_build import import_tensorrt

    engine = build_kontext_engine(sd, load_recipe("fp8", attention=False), [named_profile("kontext_1ref")],
                                  encoded_pairs(tmp_path, n=3), steps=3, store=EngineStore(tmp_path / "tensorrt"),
                                  compute_capability=(8, 9), trt=import_tensorrt("tensorrt_rtx")).engine
    (tmp_path / "diffusion_models").mkdir()
    save_file({"model.diffusion_model." + k: v for k, v in sd.items()}, str(tmp_path / "diffusion_models" / checkpoint))
    return engine
