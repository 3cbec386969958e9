"""Kontext TRT engines: everything about the quantized Kontext transformer.

Imports with neither ComfyUI nor CUDA; `nodes/` is the thin ComfyUI glue over this package.
"""
__version__ = "0.2.0"  # the pack version, as in pyproject.toml

from .config import KONTEXT_DEV, KontextConfig, tiny_config
from .contract import INPUT_NAMES, OUTPUT_NAME, KontextInputError, check_inputs
from .state_dict import (NotKontextError, config_from_state_dict, random_state_dict, strip_prefix,
                         transformer_from_state_dict)
from .transformer import Attention, KontextTransformer

__all__ = [
    "KONTEXT_DEV", "KontextConfig", "tiny_config", "INPUT_NAMES", "OUTPUT_NAME", "KontextInputError",
    "check_inputs", "NotKontextError", "config_from_state_dict", "random_state_dict", "strip_prefix",
    "transformer_from_state_dict", "Attention", "KontextTransformer",
]
