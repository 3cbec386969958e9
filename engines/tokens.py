"""Token ids and example contract inputs for an edit, laid out as ComfyUI lays them out.

Inside ComfyUI the packing is ComfyUI's own (`Flux._forward`); this module exists for the places
that run the transformer without ComfyUI: tests, the demo, calibration and the benchmarks.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .config import KontextConfig

LATENT_DOWNSCALE = 8  # VAE: pixels per latent cell
PATCH = 2  # latent cells per token side


def tokens_for_pixels(height: int, width: int) -> tuple[int, int]:
    """Token grid (rows, cols) of an image of height x width pixels."""
    cell = LATENT_DOWNSCALE * PATCH
    return -(-height // cell), -(-width // cell)


def grid_ids(rows: int, cols: int, index: int = 0, row_offset: int = 0, col_offset: int = 0) -> Tensor:
    """[rows*cols, 3] ids (index, row, col), as ComfyUI's `Flux.process_img` makes them."""
    r = torch.arange(rows, dtype=torch.float32) + row_offset
    c = torch.arange(cols, dtype=torch.float32) + col_offset
    ids = torch.zeros(rows, cols, 3)
    ids[..., 0] = index
    ids[..., 1] = r[:, None]
    ids[..., 2] = c[None, :]
    return ids.reshape(-1, 3)


def edit_ids(target: tuple[int, int], references: list[tuple[int, int]], method: str = "offset") -> Tensor:
    """Ids of the target tokens followed by each reference's, per ComfyUI's ref_latents_method."""
    ids = [grid_ids(*target)]
    h = w = 0
    index = 0
    for rows, cols in references:
        if method == "index":
            index += 1
            ids.append(grid_ids(rows, cols, index))
        elif method == "offset":
            h_off = w_off = 0
            if rows + h > cols + w:
                w_off = w
            else:
                h_off = h
            ids.append(grid_ids(rows, cols, 1, h_off, w_off))
            h, w = max(h, rows + h_off), max(w, cols + w_off)
        else:
            raise ValueError(f"method: expected 'offset' or 'index', got {method!r}")
    return torch.cat(ids)


def example_inputs(cfg: KontextConfig, batch: int = 1, target: tuple[int, int] = (4, 4),
                   references: list[tuple[int, int]] | None = None, n_txt: int = 8, seed: int = 0,
                   dtype=torch.float32, device="cpu") -> dict[str, Tensor]:
    """Random contract inputs for one edit: target grid plus reference grids (token rows, cols)."""
    references = [target] if references is None else references
    g = torch.Generator().manual_seed(seed)
    ids = edit_ids(target, references)
    n = ids.shape[0]
    inputs = dict(
        img=torch.randn(batch, n, cfg.in_channels, generator=g),
        img_ids=ids.expand(batch, n, 3).clone(),
        txt=torch.randn(batch, n_txt, cfg.context_in_dim, generator=g),
        txt_ids=torch.zeros(batch, n_txt, 3),
        timesteps=torch.rand(batch, generator=g) * 0.9 + 0.05,
        y=torch.randn(batch, cfg.vec_in_dim, generator=g),
        guidance=torch.full((batch,), 2.5) + torch.arange(batch, dtype=torch.float32),
    )
    floats = ("img", "txt", "y")
    return {k: v.to(device=device, dtype=dtype if k in floats else torch.float32) for k, v in inputs.items()}


def pack_latent(latent: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """A VAE latent [B, C, h, w] -> tokens [B, rows*cols, C*4] (2x2 patches, zero-padded to even h, w),
    as ComfyUI's `Flux.process_img` packs it; returns the tokens and the (rows, cols) grid."""
    b, c, h, w = latent.shape
    latent = torch.nn.functional.pad(latent, (0, w % PATCH, 0, h % PATCH))
    rows, cols = latent.shape[2] // PATCH, latent.shape[3] // PATCH
    tokens = latent.reshape(b, c, rows, PATCH, cols, PATCH).permute(0, 2, 4, 1, 3, 5).reshape(b, rows * cols, c * PATCH * PATCH)
    return tokens, (rows, cols)


def unpack_latent(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """pack_latent's inverse: tokens [B, rows*cols, C*4] -> a latent [B, C, 2*rows, 2*cols]."""
    b, n, width = tokens.shape
    rows, cols = grid
    if n != rows * cols or width % (PATCH * PATCH):
        raise ValueError(f"tokens: expected [batch, {rows * cols}, channels x {PATCH * PATCH}] for a {rows}x{cols} "
                         f"grid, got {list(tokens.shape)}")
    c = width // (PATCH * PATCH)
    return tokens.reshape(b, rows, cols, c, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5).reshape(b, c, rows * PATCH, cols * PATCH)
