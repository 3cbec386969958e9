"""Engines on disk: `<name>.engine` plus a `<name>.json` sidecar that says everything about it.

The sidecar records the source checkpoint (name, format, fingerprint of every weight), the LoRAs baked in
(hash, strength), the model config, the recipe, the shape profiles, the TensorRT flavour and version, the target GPU, the pack
version, the build time and the build's stage timings, and the engine's size and sha256. Both files
are written inside the build's scratch folder and renamed into place, the engine first and the
sidecar last: the loader accepts an engine only with a valid sidecar whose size and hash the engine
matches, so a crash or cancel at any point, a torn copy or an edited file leaves nothing it could
mistake for an engine. A request that matches an existing, intact entry's key is answered with that
engine instead of a rebuild; a damaged or mismatched entry is never reused.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .atomic import write_atomically
from .scratch import Scratch, bookkeeping_dir, remove_abandoned_scratch
from .sidecar import SIDECAR_FORMAT, SidecarError, parse_sidecar

log = logging.getLogger(__name__)

ENGINE_SUFFIXES = (".engine", ".plan")
# What a name taken from a recipe or profile may contain to become part of a file name in the store.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
REBUILD = "rebuild it with Kontext TRT: Build Engine (the same settings replace it), or delete {files}"


class EngineStoreError(ValueError):
    """An engine or sidecar that is missing, damaged or not this pack's, or an engine folder a build cannot use."""


def human_size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_safe_name(value: str, what: str, error: type[Exception] = EngineStoreError) -> str:
    """A name that stays one file name inside the store: no separators, no '..', nothing hidden."""
    if not isinstance(value, str) or not SAFE_NAME.fullmatch(value) or ".." in value:
        raise error(f"{what}: expected a name of letters, digits, '_', '-' and '.' (no '..', at most 128 "
                    f"characters) to name files in the engine folder, got {value!r}")
    return value


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
        check_safe_name(recipe["name"], "recipe name")
        check_safe_name(profile, "profile name")
        lora = "_lora" if self.loras else ""
        return f"kontext_{recipe['name']}{attention}_{profile}{lora}_{self.key()[:10]}"


# sha256 of engine files this process has hashed: (resolved path, size, mtime_ns, inode) -> hex digest
_HASHED: dict[tuple, str] = {}
HASH_CHUNK = 16 << 20


def _identity(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino


def _hash_record(engine: Path) -> Path:
    return bookkeeping_dir(engine.parent, "hashes") / f"{engine.name}.json"


def engine_sha256(engine: str | Path) -> str:
    """The sha256 of an engine file, read once per version of the file: remembered by its size, modification time
    and inode, in this process and in `.kontext_trt/hashes/` beside it, so a 12 GB engine is not read again at
    every load. A file rewritten, truncated or swapped in gets another size, mtime or inode and is hashed again."""
    engine = Path(engine)
    identity = _identity(engine)
    key = (str(engine.resolve()), *identity)
    if key in _HASHED:
        return _HASHED[key]
    try:
        record = json.loads(_hash_record(engine).read_text())
        if [record["bytes"], record["mtime_ns"], record["inode"]] == list(identity) \
                and re.fullmatch(r"[0-9a-f]{64}", record["sha256"]):
            _HASHED[key] = record["sha256"]
            return record["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no record, or a damaged one: hash the file
    h = hashlib.sha256()
    with open(engine, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    if _identity(engine) == identity:  # unchanged while it was read
        _remember_hash(engine, identity, digest)
    return digest


def _remember_hash(engine: Path, identity: tuple[int, int, int], digest: str) -> None:
    _HASHED[(str(engine.resolve()), *identity)] = digest
    record = json.dumps({"bytes": identity[0], "mtime_ns": identity[1], "inode": identity[2], "sha256": digest})
    try:
        with Scratch(engine.parent) as scratch:
            write_atomically(_hash_record(engine), lambda tmp: tmp.write_text(record), tmp_dir=scratch.path)
    except OSError as e:  # a read-only models folder: the hash is remembered for this process only
        log.debug("Kontext TRT: could not record the hash of %s (%s)", engine, e)


def verify_engine(engine: str | Path, meta: dict) -> None:
    """Refuse an engine whose size or sha256 differs from what its sidecar recorded when it was built."""
    engine = Path(engine)
    sidecar = engine.with_suffix(".json")
    todo = REBUILD.format(files=f"{engine.name} and {sidecar.name}")
    if not engine.is_file():
        raise EngineStoreError(f"{engine}: the engine file is missing beside its sidecar {sidecar.name}; {todo}")
    size = engine.stat().st_size
    if size != meta["engine_bytes"]:
        raise EngineStoreError(f"{engine}: expected {meta['engine_bytes']} bytes as its sidecar {sidecar.name} "
                               f"records, got {size}: the engine is damaged (cut short, or replaced); {todo}")
    digest = engine_sha256(engine)
    if digest != meta["engine_sha256"]:
        raise EngineStoreError(f"{engine}: expected sha256 {meta['engine_sha256'][:16]}... as its sidecar "
                               f"{sidecar.name} records, got {digest[:16]}...: the engine is damaged, or another "
                               f"engine was copied over it; {todo}")


class EngineStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def engine_path(self, name: str) -> Path:
        return self.root / f"{check_safe_name(name, 'engine name')}.engine"

    def sidecar_path(self, engine: str | Path) -> Path:
        return Path(engine).with_suffix(".json") if Path(engine).suffix else self.root / f"{engine}.json"

    def lookup(self, request: EngineRequest) -> Path | None:
        """The finished engine for this request if one exists intact (a valid sidecar with this request's key, and
        an engine of the size and hash it records). A damaged or mismatched entry is logged and not reused: the
        build that asked replaces it."""
        path = self.engine_path(request.name())
        if not (path.exists() or self.sidecar_path(path).exists()):
            return None
        try:
            meta = self.read_metadata(path)
            if meta["request_key"] != request.key():
                raise EngineStoreError(f"{self.sidecar_path(path)}: records another request (key "
                                       f"{meta['request_key'][:10]}..., this one {request.key()[:10]}...)")
        except EngineStoreError as e:
            log.warning("Kontext TRT: not reusing the stored engine: %s. Building it again.", e)
            return None
        return path

    def save(self, request: EngineRequest, engine: bytes | memoryview, metadata: dict, scratch: Path) -> Path:
        """Write the engine, then its sidecar, each through a temporary file in `scratch` (the build's Scratch
        folder in this store) renamed into place."""
        path = self.engine_path(request.name())
        digest = hashlib.sha256(engine).hexdigest()
        sidecar = dict(metadata, format=SIDECAR_FORMAT, request_key=request.key(), engine_file=path.name,
                       engine_bytes=len(engine), engine_sha256=digest, request=request.__dict__)
        write_atomically(path, lambda tmp: tmp.write_bytes(engine), tmp_dir=scratch)
        _remember_hash(path, _identity(path), digest)
        write_atomically(self.sidecar_path(path), lambda tmp: tmp.write_text(json.dumps(sidecar, indent=2, default=list)),
                         tmp_dir=scratch)
        return path

    def read_metadata(self, engine: str | Path, verify: bool = True) -> dict:
        """The sidecar of an engine file, checked against its schema; with verify, the engine checked against it.
        Refuses an engine without a sidecar, with a damaged or foreign one, or one it does not match, naming the
        file and what to do."""
        engine = Path(engine)
        sidecar = self.sidecar_path(engine)
        if not sidecar.is_file():
            raise EngineStoreError(f"{engine.name}: has no metadata sidecar {sidecar.name}; it is incomplete or not "
                                   "built by Kontext TRT, and cannot be used (rebuild it with the build node)")
        try:
            meta = parse_sidecar(sidecar)
        except SidecarError as e:
            raise EngineStoreError(f"{e}; the sidecar is damaged or not Kontext TRT's: "
                                   f"{REBUILD.format(files=f'{engine.name} and {sidecar.name}')}") from None
        if verify:
            verify_engine(engine, meta)
        return meta

    def engines(self) -> list[str]:
        """Engine file names that have a sidecar (the ones a loader may offer)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.suffix in ENGINE_SUFFIXES and self.sidecar_path(p).is_file())

    def prepare(self, needed_bytes: int = 0) -> None:
        """Before any expensive work: the engine folder exists (or is made), is a folder, can be written, and has
        about `needed_bytes` free; then whatever builds killed earlier left in it is removed."""
        root = self.root
        try:
            root.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise EngineStoreError(f"engine folder {root}: expected a folder, but it or a folder above it is a "
                                   "file; point models/tensorrt at a folder") from None
        except OSError as e:
            raise EngineStoreError(f"engine folder {root}: cannot be created ({e.strerror}); choose a writable "
                                   "folder for models/tensorrt") from None
        try:
            # Writing is the only reliable test: os.access says yes to root and to read-only mounts' owners.
            with Scratch(root) as scratch:
                (scratch.path / "probe").write_bytes(b"")
        except OSError as e:
            raise EngineStoreError(f"engine folder {root}: expected a writable folder, but writing in it failed "
                                   f"({e.strerror}); choose a writable folder for models/tensorrt") from None
        remove_abandoned_scratch(root)
        free = shutil.disk_usage(root).free
        if free < needed_bytes:
            raise EngineStoreError(f"engine folder {root}: the build needs about {human_size(needed_bytes)} free "
                                   f"(the exported ONNX and the engine), got {human_size(free)} free; free space "
                                   "there or choose another folder")
