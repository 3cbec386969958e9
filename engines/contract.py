"""The engine contract's inputs, named and checked in one place.

Every backend (PyTorch, ONNX export, TensorRT) takes the same seven tensors in this order; a
wrong shape is refused here with the input's name, what was expected and what came, instead of
surfacing as a matmul error deep inside a block.
"""
from __future__ import annotations

from torch import Tensor

from .config import KontextConfig

INPUT_NAMES = ("img", "img_ids", "txt", "txt_ids", "timesteps", "y", "guidance")
OUTPUT_NAME = "out"


class KontextInputError(ValueError):
    """An input to the Kontext transformer does not fit the engine contract."""


def _shape(t) -> str:
    return str(tuple(t.shape)) if hasattr(t, "shape") else f"a {type(t).__name__}"


def check_inputs(cfg: KontextConfig, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor,
                 timesteps: Tensor, y: Tensor, guidance: Tensor) -> None:
    def need(ok: bool, name: str, expected: str, got) -> None:
        if not ok:
            raise KontextInputError(f"{name}: expected {expected}, got {got}")

    for name, t in zip(INPUT_NAMES, (img, img_ids, txt, txt_ids, timesteps, y, guidance)):
        need(isinstance(t, Tensor), name, "a torch.Tensor", f"a {type(t).__name__}")

    need(img.ndim == 3 and img.shape[-1] == cfg.in_channels, "img",
         f"[B, N, {cfg.in_channels}] (B batch, N image tokens, 16 latent channels x 2x2 patch)", _shape(img))
    batch, n_img = img.shape[0], img.shape[1]
    need(batch > 0, "img", "a batch of at least one sample", _shape(img))
    need(n_img > 0, "img", "at least one image token", _shape(img))
    need(img_ids.ndim == 3 and tuple(img_ids.shape) == (batch, n_img, 3), "img_ids",
         f"[B, N, 3] = ({batch}, {n_img}, 3) to match img", _shape(img_ids))
    need(txt.ndim == 3 and txt.shape[-1] == cfg.context_in_dim, "txt",
         f"[B, T, {cfg.context_in_dim}] (T text tokens)", _shape(txt))
    need(txt.shape[0] == batch, "txt", f"batch {batch} to match img", f"batch {txt.shape[0]}")
    n_txt = txt.shape[1]
    need(n_txt > 0, "txt", "at least one text token (an empty prompt still encodes to T5's padding tokens)", _shape(txt))
    need(txt_ids.ndim == 3 and tuple(txt_ids.shape) == (batch, n_txt, 3), "txt_ids",
         f"[B, T, 3] = ({batch}, {n_txt}, 3) to match txt", _shape(txt_ids))
    need(timesteps.ndim == 1 and timesteps.shape[0] == batch, "timesteps",
         f"[B] = ({batch},), one sigma per sample", _shape(timesteps))
    need(timesteps.is_floating_point(), "timesteps", "a floating-point tensor (sigma in 0..1)", str(timesteps.dtype))
    need(y.ndim == 2 and tuple(y.shape) == (batch, cfg.vec_in_dim), "y",
         f"[B, {cfg.vec_in_dim}] = ({batch}, {cfg.vec_in_dim}) (pooled text embedding)", _shape(y))
    need(guidance.ndim == 1 and guidance.shape[0] == batch, "guidance",
         f"[B] = ({batch},), one guidance value per sample", _shape(guidance))
    need(guidance.is_floating_point(), "guidance", "a floating-point tensor", str(guidance.dtype))
