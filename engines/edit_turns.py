"""Multi-turn editing: a turn is an instruction applied to the previous turn's result.

A turn keeps its result as a latent, so the next turn edits that latent directly: no VAE decode /
encode round trip between turns (each one adds drift). It also keeps its parent, so the whole
history (instructions, seeds, settings, images) is one walk up the chain, and a branch is two turns
sharing a parent. Turns are immutable: ComfyUI may hand the same turn to several nodes.
"""
from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .sampling import euler_edit
from .tokens import edit_ids, pack_latent, unpack_latent


class EditInputError(ValueError):
    """A turn's inputs that cannot make an edit; the message names the input."""


@dataclass(frozen=True, eq=False)
class EditTurn:
    latent: Tensor  # [1, C, h, w]: this turn's result, the next turn's reference
    image: Tensor  # [1, H, W, 3] in 0..1: the decoded result, for showing and the history
    instruction: str
    seed: int
    steps: int
    guidance: float
    parent: EditTurn | None = None
    source_image: Tensor | None = field(default=None, repr=False)  # first turn only: what was edited

    @property
    def number(self) -> int:
        return 1 if self.parent is None else self.parent.number + 1

    def history(self) -> list[EditTurn]:
        """Every turn from the first to this one."""
        turns, turn = [], self
        while turn is not None:
            turns.append(turn)
            turn = turn.parent
        return turns[::-1]

    def describe(self) -> str:
        return "\n".join(f"turn {t.number}: {t.instruction!r} (seed {t.seed}, {t.steps} steps, guidance {t.guidance})"
                         for t in self.history())


def check_instruction(instruction: str) -> str:
    text = (instruction or "").strip()
    if not text:
        raise EditInputError("instruction: expected an edit instruction (e.g. 'make it dusk'), got an empty text")
    return text


def check_image(image: Tensor, name: str) -> None:
    """A ComfyUI IMAGE with at least one pixel and one image in the batch."""
    if not torch.is_tensor(image) or image.ndim != 4 or image.shape[-1] not in (3, 4):
        got = tuple(image.shape) if torch.is_tensor(image) else type(image).__name__
        raise EditInputError(f"{name}: expected an IMAGE [batch, height, width, 3], got {got}")
    if 0 in image.shape[:3]:
        raise EditInputError(f"{name}: expected a non-empty IMAGE (at least one image of at least 1x1 pixels), got "
                             f"batch {image.shape[0]} of {image.shape[2]}x{image.shape[1]}")


def check_turn_source(image: Tensor | None, previous: EditTurn | None) -> None:
    """A turn edits either a source image (the first turn) or the previous turn, never both or neither."""
    if previous is not None and not isinstance(previous, EditTurn):
        raise EditInputError(f"previous: expected a Kontext edit turn, got {type(previous).__name__}")
    if image is not None:
        check_image(image, "image")
    if image is None and previous is None:
        raise EditInputError("image / previous: expected a source image (first turn) or the previous turn, got neither")
    if image is not None and previous is not None:
        raise EditInputError("image / previous: expected a source image (first turn) or the previous turn, got both; "
                             "a later turn edits the previous turn's result")


def check_latent_format(latent_channels: int, expected: int = 16) -> None:
    if latent_channels != expected:
        raise EditInputError(f"vae: expected the FLUX VAE ({expected} latent channels), got a VAE with "
                             f"{latent_channels} latent channels")


# A panel is at most this many times as wide as the sheet is tall: at the sheet's height a 16384x16 image would
# otherwise be a 393216-pixel-wide panel (a 3.9 GiB float sheet). Wider images are shown smaller, whole.
MAX_PANEL_ASPECT = 4


def sample_turns(model, encoder, source, instructions: Sequence[str], steps: int, seed: int = 100,
               guidance: float = 2.5, on_step: Callable[[], None] | None = None) -> Iterator:
    """A multi-turn edit at token level, outside ComfyUI (the main job's): turn 1 edits `source` (reference
    tokens and their grid), each later turn the previous turn's latent, never a decoded image. Yields each turn
    as it is done. `encoder` gives the text states (`encode_prompt`) and the pictures (`decode`): inside
    ComfyUI the Edit Turn node does all this with ComfyUI's own text encoder, sampler and VAE."""
    reference, grid = source
    ids = edit_ids(grid, [grid])[None]
    n_target = grid[0] * grid[1]
    counted = model if on_step is None else (lambda *a: (on_step(), model(*a))[1])
    turn = None
    for i, instruction in enumerate(instructions):
        instruction = check_instruction(instruction)
        txt, y = encoder.encode_prompt(instruction)
        if turn is not None:
            reference, _ = pack_latent(turn.latent)  # the previous turn's result, as a latent
        latent = euler_edit(counted, txt, torch.zeros(1, txt.shape[1], 3), y, reference, ids, n_target, steps,
                            guidance, seed + i)
        turn = EditTurn(latent=unpack_latent(latent, grid), image=encoder.decode(latent, grid), instruction=instruction,
                        seed=seed + i, steps=steps, guidance=guidance, parent=turn,
                        source_image=encoder.decode(source[0], grid) if turn is None else None)
        yield turn


def history_sheet(turns: list[EditTurn], height: int = 384, caption_px: int = 56) -> Tensor:
    """The source and every turn's image side by side, each with its instruction under it: [1, H, W, 3].

    Drawn with Pillow (captions need text rendering, which torch does not do).
    """
    return _sheet([("", turns)], height, caption_px)


def comparison_sheet(rows: list[tuple[str, list[EditTurn]]], height: int = 256, caption_px: int = 56) -> Tensor:
    """Several histories of the same edit, one row each under its label (e.g. the 16-bit model's turns over
    the quantized model's), so each turn's results stand in one column: [1, H, W, 3]."""
    if len({len(turns) for _, turns in rows}) > 1:
        raise EditInputError(f"rows: expected histories of the same length, got {[len(t) for _, t in rows]} turns")
    return _sheet(rows, height, caption_px)


def _sheet(rows: list[tuple[str, list[EditTurn]]], height: int, caption_px: int) -> Tensor:
    import numpy as np
    from PIL import Image, ImageDraw

    def to_pil(image: Tensor, what: str) -> Image.Image:
        check_image(image, what)
        arr = (image[0, :, :, :3].clamp(0, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
        pil = Image.fromarray(arr)
        width = min(max(1, round(pil.width * height / pil.height)), MAX_PANEL_ASPECT * height)
        return pil.resize((width, max(1, min(height, round(pil.height * width / pil.width)))), Image.LANCZOS)

    label_px = 20 if any(label for label, _ in rows) else 0
    drawn = []
    for label, turns in rows:
        panels = []
        if turns[0].source_image is not None:
            panels.append((to_pil(turns[0].source_image, "source image"), "source"))
        panels += [(to_pil(t.image, f"turn {t.number} image"), f"{t.number}. {t.instruction}") for t in turns]
        drawn.append((label, panels))
    width = max(sum(p.width for p, _ in panels) for _, panels in drawn)
    row_px = label_px + height + caption_px
    sheet = Image.new("RGB", (width, row_px * len(drawn)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (label, panels) in enumerate(drawn):
        top, x = r * row_px, 0
        if label:
            draw.text((6, top + 4), label, fill="black")
        for panel, caption in panels:
            sheet.paste(panel, (x, top + label_px))
            caption = "\n".join(textwrap.wrap(caption, max(8, panel.width // 7), max_lines=3, placeholder=" ..."))
            draw.multiline_text((x + 6, top + label_px + height + 6), caption, fill="black")
            x += panel.width
    return torch.from_numpy(np.asarray(sheet, dtype=np.float32) / 255.0)[None]
