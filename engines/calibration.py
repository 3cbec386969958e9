"""Calibration data: prompt / conditioning-image pairs, and the forward loop ModelOpt calibrates with.

A calibration set is either a folder of `<name>.png` (or .jpg/.jpeg/.webp) + `<name>.txt` pairs, or
a JSON file listing `{"image": path, "prompt": text}` (paths relative to the JSON file). The pack
ships no image files: `write_default_calibration_set` draws its default set with Pillow.

Encoding a pair needs the text encoders and the VAE; inside ComfyUI the build node does that with
the user's CLIP and VAE and hands `EncodedPair`s here. Outside ComfyUI (tests, the full-size
accuracy run on random weights) `StandInEncoder` turns pixels and prompts into tensors of the right
shapes deterministically; it is not a text encoder or a VAE and says so in its name.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .config import KontextConfig
from .sampling import euler_edit
from .tokens import edit_ids, tokens_for_pixels

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class CalibrationSetError(ValueError):
    """Calibration data that cannot be used: a set that cannot be read as pairs, an image that cannot be decoded,
    an encoded pair with NaN or of the wrong shape, no pairs or no steps."""


class CalibrationCancelled(RuntimeError):
    """The user cancelled calibration between samples."""


@dataclass(frozen=True)
class CalibrationPair:
    name: str
    image: Path
    prompt: str


def read_calibration_set(source: str | Path) -> list[CalibrationPair]:
    source = Path(source)
    if source.is_dir():
        pairs = []
        images = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for image in images:
            text = image.with_suffix(".txt")
            if not text.is_file():
                raise CalibrationSetError(f"calibration set {source}: image {image.name} has no prompt file {text.name}")
            prompt = _prompt(_read_text(text), f"{source}/{text.name}")
            pairs.append(CalibrationPair(image.stem, _checked_image(image), prompt))
    elif source.suffix == ".json" and source.is_file():
        try:
            entries = json.loads(_read_text(source))
        except json.JSONDecodeError as e:
            raise CalibrationSetError(f"calibration set {source}: not valid JSON ({e})") from e
        if not isinstance(entries, list):
            raise CalibrationSetError(f"calibration set {source}: expected a JSON list of "
                                      f'{{"image": ..., "prompt": ...}}, got {type(entries).__name__}')
        pairs = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or not {"image", "prompt"} <= set(entry) or not isinstance(entry["image"], str):
                raise CalibrationSetError(f"calibration set {source}: entry {i} needs 'image' (a path) and 'prompt', "
                                          f"got {entry!r}")
            image = (source.parent / entry["image"]).resolve()
            if not image.is_file():
                raise CalibrationSetError(f"calibration set {source}: entry {i} image {entry['image']!r} does not exist")
            prompt = _prompt(entry["prompt"], f"{source} entry {i}")
            pairs.append(CalibrationPair(image.stem, _checked_image(image), prompt))
    else:
        raise CalibrationSetError(f"calibration set: expected a folder of image + .txt pairs or a .json list, got {source}")
    if not pairs:
        raise CalibrationSetError(f"calibration set {source}: no image + prompt pairs found "
                                  f"(images: {', '.join(IMAGE_SUFFIXES)})")
    return pairs


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CalibrationSetError(f"calibration set: {path}: expected UTF-8 text, cannot read it ({e})") from None


def _checked_image(path: Path) -> Path:
    """Decode the image once now, so a damaged one is named here and not found by the encoder mid-build (Pillow's
    own 'image file is truncated' names no file)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            width, height = img.size
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise CalibrationSetError(f"calibration set: image {path}: expected a readable PNG / JPEG / WebP image, "
                                  f"got one Pillow cannot decode ({e})") from None
    if not width or not height:
        raise CalibrationSetError(f"calibration set: image {path}: expected a non-empty image, got {width}x{height}")
    return path


def _prompt(text, where: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise CalibrationSetError(f"calibration set: {where}: the prompt is empty")
    return text.strip()


# ---------------------------------------------------------------- the default set

DEFAULT_EDITS = [
    ("house_day", "make it night with warm light in the windows"),
    ("house_day", "add heavy rain and puddles on the ground"),
    ("street", "remove the people from the street"),
    ("street", "turn the red car into a blue bicycle"),
    ("portrait", "give the person a straw hat and sunglasses"),
    ("portrait", "change the background to a snowy mountain"),
    ("room", "make the room look like a watercolor painting"),
    ("room", "replace the lamp with a potted plant"),
    ("sign", 'change the text on the sign to "OPEN LATE"'),
    ("landscape", "turn the season to autumn with orange leaves"),
    ("landscape", "add a hot-air balloon in the sky"),
    ("still_life", "make the apples green and add a glass of water"),
]


def write_default_calibration_set(dest: str | Path, size: int = 1024, seed: int = 0) -> Path:
    """Draw the pack's default calibration set (Pillow shapes: scenes Kontext users edit) into dest."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i, (scene, prompt) in enumerate(DEFAULT_EDITS):
        name = f"{i:02d}_{scene}"
        draw_scene(scene, size, rng).save(dest / f"{name}.png")
        (dest / f"{name}.txt").write_text(prompt + "\n")
    return dest


def draw_scene(scene: str, size: int, rng: random.Random):
    """One scene of the default set (see DEFAULT_EDITS), drawn with Pillow: a size x size RGB image."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size))
    _draw_scene(ImageDraw.Draw(img), scene, size, rng)
    return img


def _draw_scene(draw, scene: str, s: int, rng: random.Random) -> None:
    sky = [(rng.randrange(90, 160), rng.randrange(150, 210), 235), (240, 230, 200)]
    for y in range(s):  # vertical gradient sky
        t = y / s
        draw.line([(0, y), (s, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(*sky)))
    ground = (rng.randrange(60, 120), rng.randrange(110, 160), rng.randrange(50, 90))
    draw.rectangle([0, int(s * 0.65), s, s], fill=ground)
    draw.ellipse([int(s * 0.75), int(s * 0.08), int(s * 0.9), int(s * 0.23)], fill=(255, 220, 90))
    if scene in ("house_day", "street"):
        for k in range(3 if scene == "street" else 1):
            x0 = int(s * (0.1 + 0.3 * k))
            draw.rectangle([x0, int(s * 0.4), x0 + int(s * 0.25), int(s * 0.66)], fill=(200, 80 + 40 * k, 70))
            draw.polygon([(x0 - 10, int(s * 0.4)), (x0 + int(s * 0.125), int(s * 0.25)),
                          (x0 + int(s * 0.25) + 10, int(s * 0.4))], fill=(110, 50, 40))
            draw.rectangle([x0 + 20, int(s * 0.45), x0 + 60, int(s * 0.5)], fill=(250, 250, 200))
        if scene == "street":
            draw.rectangle([int(s * 0.4), int(s * 0.72), int(s * 0.65), int(s * 0.8)], fill=(210, 30, 30))
            for k in range(4):
                px = int(s * (0.15 + 0.2 * k))
                draw.ellipse([px, int(s * 0.66), px + 30, int(s * 0.7)], fill=(240, 200, 170))
                draw.rectangle([px + 5, int(s * 0.7), px + 25, int(s * 0.8)], fill=(40, 40, 120))
    elif scene == "portrait":
        draw.ellipse([int(s * 0.3), int(s * 0.15), int(s * 0.7), int(s * 0.6)], fill=(235, 190, 160))
        draw.rectangle([int(s * 0.25), int(s * 0.6), int(s * 0.75), s], fill=(60, 90, 150))
        for ex in (0.42, 0.58):
            draw.ellipse([int(s * ex) - 15, int(s * 0.35) - 10, int(s * ex) + 15, int(s * 0.35) + 10], fill=(40, 30, 20))
    elif scene == "room":
        draw.rectangle([0, 0, s, s], fill=(220, 210, 190))
        draw.rectangle([0, int(s * 0.7), s, s], fill=(140, 100, 60))
        draw.rectangle([int(s * 0.1), int(s * 0.45), int(s * 0.5), int(s * 0.72)], fill=(90, 120, 90))
        draw.polygon([(int(s * 0.7), int(s * 0.3)), (int(s * 0.8), int(s * 0.3)), (int(s * 0.83), int(s * 0.4)),
                      (int(s * 0.67), int(s * 0.4))], fill=(250, 240, 150))
        draw.line([(int(s * 0.75), int(s * 0.4)), (int(s * 0.75), int(s * 0.72))], fill=(50, 50, 50), width=8)
    elif scene == "sign":
        draw.rectangle([int(s * 0.2), int(s * 0.3), int(s * 0.8), int(s * 0.55)], fill=(250, 250, 245), outline=(30, 30, 30), width=12)
        draw.text((int(s * 0.3), int(s * 0.4)), "CLOSED", fill=(20, 20, 20))
        draw.rectangle([int(s * 0.48), int(s * 0.55), int(s * 0.52), int(s * 0.8)], fill=(90, 70, 50))
    elif scene == "landscape":
        for k in range(5):
            x = rng.randrange(0, s)
            draw.polygon([(x - 120, int(s * 0.65)), (x, int(s * 0.3)), (x + 120, int(s * 0.65))], fill=(90, 100, 120))
        for k in range(8):
            x = rng.randrange(0, s)
            draw.ellipse([x - 40, int(s * 0.55), x + 40, int(s * 0.7)], fill=(30, 110, 40))
    elif scene == "still_life":
        draw.rectangle([0, int(s * 0.55), s, s], fill=(150, 110, 80))
        for k in range(3):
            x = int(s * (0.3 + 0.15 * k))
            draw.ellipse([x, int(s * 0.45), x + 120, int(s * 0.57)], fill=(200, 30, 40))


# ---------------------------------------------------------------- encoded pairs and the loop

@dataclass
class EncodedPair:
    """One calibration pair at the engine contract: text states, pooled vector, reference tokens."""
    txt: Tensor  # [1, T, context]
    y: Tensor  # [1, vec]
    reference: Tensor  # [1, N_ref, in_channels], packed like ComfyUI packs a reference latent
    reference_grid: tuple[int, int]  # token rows, cols of the reference (the target has the same grid)
    name: str = ""  # the pair's name in its set, for messages


class StandInEncoder:
    """Deterministic pixels/prompt -> tensors of the contract's shapes, for runs without ComfyUI.

    NOT a VAE or text encoder: reference tokens are the image's average colour per token cell pushed
    through a fixed random projection, text states are seeded by a hash of the prompt. It exists so
    calibration runs on the real trajectory shapes and on image-dependent data in tests and in the
    random-weight accuracy report.
    """

    def __init__(self, cfg: KontextConfig, n_txt: int = 512, seed: int = 0):
        self.cfg, self.n_txt = cfg, n_txt
        g = torch.Generator().manual_seed(seed)
        self.projection = torch.randn(3 * 4, cfg.in_channels, generator=g) / math.sqrt(12)

    def __call__(self, pair: CalibrationPair, size: int) -> EncodedPair:
        from PIL import Image

        reference, grid = self.encode_image(Image.open(pair.image), size)
        txt, y = self.encode_prompt(pair.prompt)
        return EncodedPair(txt=txt, y=y, reference=reference, reference_grid=grid, name=pair.name)

    def encode_image(self, image, size: int) -> tuple[Tensor, tuple[int, int]]:
        """A PIL image, resized to size x size pixels' token grid -> tokens [1, rows*cols, in_channels], (rows, cols)."""
        import numpy as np

        rows, cols = tokens_for_pixels(size, size)
        img = image.convert("RGB").resize((cols * 2, rows * 2))
        px = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1)  # [2r, 2c, 3]
        cells = px.reshape(rows, 2, cols, 2, 3).permute(0, 2, 1, 3, 4).reshape(rows * cols, 12)
        return (cells @ self.projection)[None] * 2.0, (rows, cols)

    def encode_prompt(self, prompt: str) -> tuple[Tensor, Tensor]:
        """Text states [1, n_txt, context] and pooled vector [1, vec], seeded by a hash of the prompt."""
        seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "little")
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(1, self.n_txt, self.cfg.context_in_dim, generator=g),
                torch.randn(1, self.cfg.vec_in_dim, generator=g))

    def decode(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """encode_image's least-squares inverse: tokens [1, rows*cols, in_channels] -> an IMAGE [1, 2*rows,
        2*cols, 3] in 0..1 (two pixels per token side). Exact on what encode_image made; on anything else,
        the colours nearest to it in the projection's span. Not a VAE decoder: it lets a run without one
        show its latents as pictures."""
        rows, cols = grid
        if tokens.shape[1:] != (rows * cols, self.cfg.in_channels):
            raise ValueError(f"tokens: expected [1, {rows * cols}, {self.cfg.in_channels}] for a {rows}x{cols} grid, "
                             f"got {list(tokens.shape)}")
        cells = (tokens[0].float().cpu() / 2.0) @ torch.linalg.pinv(self.projection)  # [rows*cols, 12]
        px = cells.reshape(rows, cols, 2, 2, 3).permute(0, 2, 1, 3, 4).reshape(rows * 2, cols * 2, 3)
        return ((px + 1) / 2).clamp(0, 1)[None]


def calibration_forward_loop(samples: Sequence[EncodedPair], steps: int, guidance: float = 2.5, seed: int = 0,
                             progress: Callable[[int, int], None] | None = None,
                             should_cancel: Callable[[], bool] | None = None):
    """ModelOpt's forward_loop: each pair is sampled as a real edit (Euler over Flux's schedule), so the
    quantizers see activations at every sigma that sampling visits, not at one timestep.

    progress(done, total) is called after each pair; should_cancel() is checked before each pair
    and raises CalibrationCancelled, which leaves no calibrated state behind.
    """
    check_encoded_pairs(samples, steps)

    def forward_loop(model) -> None:
        param = next(model.parameters())
        device, dtype = param.device, model.dtype if hasattr(model, "dtype") else param.dtype
        for i, s in enumerate(samples):
            if should_cancel is not None and should_cancel():
                raise CalibrationCancelled(f"calibration cancelled after {i} of {len(samples)} pairs")
            grid = s.reference_grid
            n_target = grid[0] * grid[1]
            ids = edit_ids(grid, [grid])[None].to(device)
            txt = s.txt.to(device, dtype)
            try:
                euler_edit(model, txt, torch.zeros(1, txt.shape[1], 3, device=device), s.y.to(device, dtype),
                           s.reference.to(device, dtype), ids, n_target, steps, guidance, seed + i)
            except AssertionError as e:  # ModelOpt's max calibrator asserts on NaN / inf activations, naming nothing
                if "nan" not in str(e) and "inf" not in str(e):
                    raise
                raise CalibrationSetError(
                    f"calibration pair {_pair_name(i, s)}: the model's activations became NaN or infinite in {dtype} "
                    f"on this pair (ModelOpt: {e}); its weights and this pair's tensors are finite, so they overflow "
                    "here: check the model and the pair") from None
            if progress is not None:
                progress(i + 1, len(samples))

    return forward_loop


def _pair_name(i: int, pair: EncodedPair) -> str:
    return f"{i}" + (f" ({pair.name})" if pair.name else "")


def check_encoded_pairs(samples: Sequence[EncodedPair], steps: int) -> None:
    """Before calibrating: at least one pair and one step, each pair's tensors finite and of the contract's shapes
    (NaN in one pair otherwise surfaces as ModelOpt's 'detected nan values in amax', naming no pair)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise CalibrationSetError(f"steps: expected at least 1 sampling step per calibration pair, got {steps!r}")
    if not samples:
        raise CalibrationSetError("samples: expected at least one encoded calibration pair, got none")
    for i, s in enumerate(samples):
        rows, cols = s.reference_grid
        shapes = {"txt": (s.txt, 3, None), "y": (s.y, 2, None), "reference": (s.reference, 3, rows * cols)}
        for field, (t, ndim, tokens) in shapes.items():
            if not torch.is_tensor(t) or t.ndim != ndim or t.shape[0] != 1 or 0 in t.shape \
                    or (tokens is not None and t.shape[1] != tokens):
                got = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
                raise CalibrationSetError(f"calibration pair {_pair_name(i, s)}: {field}: expected a non-empty tensor of "
                                          f"{ndim} dims, batch 1{f', {tokens} tokens' if tokens else ''}, got {got}")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise CalibrationSetError(f"calibration pair {_pair_name(i, s)}: {field}: expected finite values, got "
                                          f"{int((~torch.isfinite(t)).sum())} NaN or infinite; its image or prompt "
                                          "encoded to NaN: replace the pair")


def calibration_content_hash(samples: Sequence[EncodedPair]) -> str:
    """sha256 of what calibration sees: every pair's tensors (shape, dtype, bytes) and grid, in order. A set edited
    in place (same folder, same count) or encoded by another CLIP or VAE hashes differently."""
    h = hashlib.sha256()
    for s in samples:
        h.update(repr(tuple(s.reference_grid)).encode())
        for t in (s.txt, s.y, s.reference):
            t = t.detach().cpu().contiguous()
            h.update(f"{tuple(t.shape)}|{t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def default_encoded_pairs(cfg: KontextConfig, size: int = 1024, n_txt: int = 512) -> list[EncodedPair]:
    """The shipped default calibration set, drawn into a temporary folder and encoded by StandInEncoder:
    calibration and held-out data for runs with no text encoder or VAE (benchmarks, random weights)."""
    import tempfile

    encode = StandInEncoder(cfg, n_txt=n_txt)
    folder = write_default_calibration_set(Path(tempfile.mkdtemp(prefix="kontext_calib_")) / "calib", size=size)
    return [encode(pair, size) for pair in read_calibration_set(folder)]
