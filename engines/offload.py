"""CPU staging for calibration on cards smaller than the 16-bit model (a 24 GB card and 22 GiB of weights).

The weights stay in system memory (ComfyUI's tensors, not copied there); each block's weights are
put on the GPU only for that block's forward, by swapping `param.data` and swapping it back, so no
second CPU copy is ever made. Activations and ModelOpt's calibration statistics live on the GPU.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


def _swap_in(module: nn.Module, device) -> list:
    saved = []
    for p in module.parameters():
        saved.append((p, p.data))
        p.data = p.data.to(device, non_blocking=True)
    return saved


def _swap_out(saved: list) -> None:
    for p, data in saved:
        p.data = data


@contextmanager
def blocks_streamed_to(model: nn.Module, device) -> Iterator[None]:
    """Run `model` on `device` with at most one transformer block's weights there at a time.

    Embedders and the final layer (small) stay on the device for the whole context. Weights must not
    be modified inside (max calibration reads them only).
    """
    blocks = list(model.double_blocks) + list(model.single_blocks)
    rest = [m for name, m in model.named_children() if name not in ("double_blocks", "single_blocks")]
    resident = [s for m in rest for s in _swap_in(m, device)]
    pending = {}
    hooks = []

    def pre(block, args):
        pending[id(block)] = _swap_in(block, device)

    def post(block, args, output):
        _swap_out(pending.pop(id(block)))

    for block in blocks:
        hooks.append(block.register_forward_pre_hook(pre))
        hooks.append(block.register_forward_hook(post))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for saved in pending.values():
            _swap_out(saved)
        _swap_out(resident)


def move_quantizer_state(model: nn.Module, device) -> None:
    """Calibration leaves amax buffers where the activations were; bring them to the weights' device."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    for m in model.modules():
        if isinstance(m, TensorQuantizer):
            m.to(device)
