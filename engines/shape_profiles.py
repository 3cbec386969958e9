"""TensorRT optimization profiles that cover what Kontext editing really sends.

An engine takes a range of shapes per input (min, opt, max). Kontext's image sequence is the target
tokens plus the reference tokens, so the token range follows from the edit and reference sizes;
ComfyUI batches cond and uncond (batch 2) when CFG > 1; T5 text runs 256..512 tokens.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .config import KontextConfig
from .tokens import tokens_for_pixels

# ComfyUI's PREFERED_KONTEXT_RESOLUTIONS (comfy_extras/nodes_flux.py, ComfyUI 0.3.64): (width, height),
# the sizes FluxKontextImageScale snaps a reference image to. Copied as data: engines/ imports no ComfyUI.
KONTEXT_RESOLUTIONS = [
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
    (1568, 672),
]


def nearest_kontext_resolution(width: int, height: int) -> tuple[int, int]:
    """The Kontext resolution of closest aspect ratio, as ComfyUI's FluxKontextImageScale chooses it."""
    if width < 1 or height < 1:
        raise ProfileError(f"image: expected at least 1x1 pixels to scale to a Kontext resolution, got {width}x{height}")
    aspect = width / height
    _, w, h = min((abs(aspect - w / h), w, h) for w, h in KONTEXT_RESOLUTIONS)
    return w, h


class ProfileError(ValueError):
    """A shape profile that cannot be built, or an input outside one."""


@dataclass(frozen=True)
class ShapeProfile:
    """Ranges (min, opt, max) of batch, image tokens (target + references) and text tokens."""
    name: str
    batch: tuple[int, int, int]
    image_tokens: tuple[int, int, int]
    text_tokens: tuple[int, int, int]

    def __post_init__(self):
        from .engine_store import check_safe_name

        check_safe_name(self.name, "profile name", ProfileError)  # it becomes part of the engine's file name
        for field in ("batch", "image_tokens", "text_tokens"):
            lo, opt, hi = getattr(self, field)
            if not 1 <= lo <= opt <= hi:
                raise ProfileError(f"profile {self.name}: {field} must satisfy 1 <= min <= opt <= max, got {(lo, opt, hi)}")

    def input_shapes(self, cfg: KontextConfig) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """(min, opt, max) shape per engine input, in the contract's order."""
        def dims(*parts):
            return tuple(tuple(p[i] if isinstance(p, tuple) else p for p in parts) for i in range(3))
        b, n, t = self.batch, self.image_tokens, self.text_tokens
        return {"img": dims(b, n, cfg.in_channels), "img_ids": dims(b, n, 3), "txt": dims(b, t, cfg.context_in_dim),
                "txt_ids": dims(b, t, 3), "timesteps": dims(b), "y": dims(b, cfg.vec_in_dim), "guidance": dims(b)}

    def check(self, batch: int, image_tokens: int, text_tokens: int) -> None:
        """Refuse an input the engine cannot take, naming the range and the value."""
        for what, value, (lo, _, hi) in (("batch", batch, self.batch), ("image tokens (target + references)", image_tokens,
                                         self.image_tokens), ("text tokens", text_tokens, self.text_tokens)):
            if not lo <= value <= hi:
                raise ProfileError(f"engine profile {self.name}: {what} must be within {lo}..{hi}, got {value}")

    def to_dict(self) -> dict:
        return asdict(self)


def _tokens(width: int, height: int) -> int:
    rows, cols = tokens_for_pixels(height, width)
    return rows * cols


def kontext_profile(name: str, references: int = 1, max_batch: int = 2,
                    sizes: list[tuple[int, int]] | None = None, text: tuple[int, int, int] = (256, 512, 512)) -> ShapeProfile:
    """Target and each reference at any of `sizes` (default: every Kontext resolution); opt at 1024^2."""
    sizes = sizes or KONTEXT_RESOLUTIONS
    per_image = [_tokens(w, h) for w, h in sizes]
    lo, hi = min(per_image), max(per_image)
    opt = min(max(_tokens(1024, 1024), lo), hi)
    n = 1 + references
    return ShapeProfile(name, batch=(1, 1, max_batch), image_tokens=(n * lo, n * opt, n * hi), text_tokens=text)


def custom_profile(min_side: int, max_side: int, references: int = 1, max_batch: int = 2) -> ShapeProfile:
    """Any edit whose target and references have sides between min_side and max_side pixels."""
    if not 64 <= min_side <= max_side <= 4096:
        raise ProfileError(f"custom profile: expected 64 <= min_side <= max_side <= 4096 pixels, got {min_side}..{max_side}")
    lo, hi = _tokens(min_side, min_side), _tokens(max_side, max_side)
    opt = min(max(_tokens(1024, 1024), lo), hi)
    n = 1 + references
    return ShapeProfile(f"custom_{min_side}-{max_side}px_{references}ref", batch=(1, 1, max_batch),
                        image_tokens=(n * lo, n * opt, n * hi), text_tokens=(256, 512, 512))


NAMED_PROFILES = {
    "kontext_1ref": lambda: kontext_profile("kontext_1ref", references=1),
    "kontext_2ref": lambda: kontext_profile("kontext_2ref", references=2),
    "square_1024_1ref": lambda: kontext_profile("square_1024_1ref", references=1, sizes=[(1024, 1024)]),
}


def named_profile(name: str) -> ShapeProfile:
    if name not in NAMED_PROFILES:
        raise ProfileError(f"profile: expected one of {sorted(NAMED_PROFILES)}, got {name!r}")
    return NAMED_PROFILES[name]()
