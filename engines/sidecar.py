"""The engine sidecar's schema: every field the store and the loaders read, with its type.

A sidecar is read back by the build's cache lookup and by the loader; a torn, edited or foreign one must be
named with the field that is wrong rather than surface as a KeyError or JSONDecodeError later. The schema is
pydantic's (strict: no "5" for 5, no true for 1); fields it does not list are kept, so a newer pack's extra
fields do not make an older sidecar unreadable.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional

from pydantic import ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError
from typing_extensions import Annotated, NotRequired, TypedDict

from .config import KontextConfig
from .contract import INPUT_NAMES, OUTPUT_NAME

SIDECAR_FORMAT = "kontext-trt-engine/1"
ENGINE_DTYPES = ("HALF", "BF16", "FLOAT")  # what TensorRT names the contract's I/O dtypes

STRICT = ConfigDict(strict=True)
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Range = tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]]


class SidecarError(ValueError):
    """A sidecar that is not valid JSON, or lacks a field, or has one of the wrong type."""


class _TensorRT(TypedDict):
    __pydantic_config__ = STRICT
    flavour: Literal["tensorrt", "tensorrt_rtx"]
    version: str


class _Profile(TypedDict):
    __pydantic_config__ = STRICT
    name: str
    batch: Range
    image_tokens: Range
    text_tokens: Range


class _Tensor(TypedDict):
    __pydantic_config__ = STRICT
    dtype: Literal[ENGINE_DTYPES]
    shape: list[int]


class _Recipe(TypedDict):
    __pydantic_config__ = STRICT
    name: str
    attention: Optional[dict]


class _Source(TypedDict):
    __pydantic_config__ = STRICT
    name: Optional[str]  # None: built from weights in memory, no file
    format: str
    fingerprint: str


class _Sidecar(TypedDict):
    __pydantic_config__ = STRICT
    format: Literal[SIDECAR_FORMAT]
    request_key: Sha256
    engine_file: str
    engine_bytes: Annotated[int, Field(gt=0)]
    engine_sha256: Sha256
    model_fingerprint: str
    source: NotRequired[_Source]  # older sidecars have none: the loader then asks for the checkpoint
    model_config: dict
    recipe: _Recipe
    profiles: Annotated[list[_Profile], Field(min_length=1)]
    calibration: dict
    tensorrt: _TensorRT
    target: str
    io: dict[str, _Tensor]
    pack_version: str
    built_at: str


_SCHEMA = TypeAdapter(_Sidecar)


def parse_sidecar(path: str | Path) -> dict:
    """The sidecar at `path` as a dict, or SidecarError naming the file and the first wrong field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SidecarError(f"{path}: cannot be read as a sidecar ({e})") from e
    try:
        _SCHEMA.validate_json(text)
    except ValidationError as e:
        raise SidecarError(f"{path}: {_first_error(e)}") from None
    meta = json.loads(text)
    missing = sorted((set(INPUT_NAMES) | {OUTPUT_NAME}) - set(meta["io"]))
    if missing:
        raise SidecarError(f"{path}: field 'io' must describe the engine inputs and output "
                           f"{[*INPUT_NAMES, OUTPUT_NAME]}, got {sorted(meta['io'])} (missing {missing})")
    try:
        KontextConfig.from_dict(meta["model_config"])
    except (TypeError, ValueError) as e:
        raise SidecarError(f"{path}: field 'model_config' is not a Kontext transformer config ({e})") from None
    return meta


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    if err["type"] == "json_invalid":
        return f"not valid JSON ({err['msg']}); the file is torn or was edited"
    if not err["loc"]:
        return f"expected a JSON object, got {type(err['input']).__name__}"
    field = ".".join(map(str, err["loc"]))
    if err["type"] == "missing":
        return f"field {field!r} is missing"
    got = repr(err["input"])
    return f"field {field!r}: {err['msg']}, got {got if len(got) <= 80 else got[:77] + '...'}"
