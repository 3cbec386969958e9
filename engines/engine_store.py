"""Engines on disk: `<name>.engine` plus a `<name>.json` sidecar that says everything about it.

The sidecar records the source checkpoint (name, format, fingerprint of every weight), the LoRAs baked in (hash,
strength), and the model config, the recipe, the shape profiles,
the TensorRT flavour and version, the target GPU, the pack version, the build time and the
build's stage timings. Both files are written to temporary names and renamed into place, the
engine first and the sidecar last: the loader accepts an engine only with its sidecar, so a crash
or cancel at any point leaves nothing it could mistake for an engine. A request that matches an
existing sidecar's key is answered with that engine instead of a rebuild.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .atomic import write_atomically

SIDECAR_FORMAT = "kontext-trt-engine/1"
ENGINE_SUFFIXES = (".engine", ".plan")


class EngineStoreError(ValueError):
    """An engine or sidecar that is missing, incomplete or not this pack's."""


@dataclass(frozen=True)
class EngineRequest:
    """What makes two builds the same engine."""
    model_fingerprint: str
    model_config: dict
    recipe: str  # the recipe's canonical JSON
    profiles: tuple[dict, ...]
    calibration: dict  # set, pairs, steps: they change the amax values
    tensorrt_flavour: str
    tensorrt_version: str
    target: str  # compute capability built for, e.g. "8.9", or "current GPU <name> 9.0"
    pack_version: str
    loras: tuple[dict, ...] = ()  # LoRAs baked in (each one's hash and strength): other weights than the source's

    def key(self) -> str:
        fields = dict(self.__dict__)
        if not fields["loras"]:
            del fields["loras"]  # keys of engines without LoRA stay what they were before LoRAs were recorded
        blob = json.dumps(fields, sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()

    def name(self) -> str:
        recipe = json.loads(self.recipe)
        attention = "_attn" if recipe.get("attention") else ""
        profile = self.profiles[0]["name"] if self.profiles else "noprofile"
        lora = "_lora" if self.loras else ""
        return f"kontext_{recipe['name']}{attention}_{profile}{lora}_{self.key()[:10]}"


class EngineStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def engine_path(self, name: str) -> Path:
        return self.root / f"{name}.engine"

    def sidecar_path(self, engine: str | Path) -> Path:
        return Path(engine).with_suffix(".json") if Path(engine).suffix else self.root / f"{engine}.json"

    def lookup(self, request: EngineRequest) -> Path | None:
        """The finished engine for this request, if one exists (engine and matching sidecar)."""
        path = self.engine_path(request.name())
        sidecar = self.sidecar_path(path)
        if not (path.is_file() and sidecar.is_file()):
            return None
        meta = json.loads(sidecar.read_text())
        return path if meta.get("request_key") == request.key() else None

    def save(self, request: EngineRequest, engine: bytes | memoryview, metadata: dict) -> Path:
        path = self.engine_path(request.name())
        sidecar = dict(metadata, format=SIDECAR_FORMAT, request_key=request.key(), engine_file=path.name,
                       engine_bytes=len(engine), engine_sha256=hashlib.sha256(engine).hexdigest(), request=request.__dict__)
        write_atomically(path, lambda tmp: tmp.write_bytes(engine))
        write_atomically(self.sidecar_path(path), lambda tmp: tmp.write_text(json.dumps(sidecar, indent=2, default=list)))
        return path

    def read_metadata(self, engine: str | Path) -> dict:
        """The sidecar of an engine file, refusing an engine without one or with a foreign one."""
        engine = Path(engine)
        sidecar = self.sidecar_path(engine)
        if not sidecar.is_file():
            raise EngineStoreError(f"{engine.name}: has no metadata sidecar {sidecar.name}; it is incomplete or not "
                                   "built by Kontext TRT, and cannot be used (rebuild it with the build node)")
        meta = json.loads(sidecar.read_text())
        if meta.get("format") != SIDECAR_FORMAT:
            raise EngineStoreError(f"{sidecar.name}: not a Kontext TRT engine sidecar (format {meta.get('format')!r})")
        return meta

    def engines(self) -> list[str]:
        """Engine file names that have a sidecar (the ones a loader may offer)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.suffix in ENGINE_SUFFIXES and self.sidecar_path(p).is_file())
