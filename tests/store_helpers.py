"""What an engine folder holds, as the reliability tests look at it."""
from pathlib import Path

BOOKKEEPING = ".kontext_trt"
KEPT_BOOKKEEPING = ("locks", "hashes")  # lock files and remembered hashes stay; a scratch folder's files must not


def store_files(root) -> list[str]:
    """Every file under an engine folder, relative to it, except the pack's lock files and hash records."""
    root = Path(root)
    if not root.is_dir():
        return []
    files = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_dir() or (rel.parts[0] == BOOKKEEPING and len(rel.parts) > 1 and rel.parts[1] in KEPT_BOOKKEEPING):
            continue
        files.append(rel.as_posix())
    return files
