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
