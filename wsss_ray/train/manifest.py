"""Checkpoint integrity: a manifest of every file's size and SHA-256, written into a
checkpoint before Ray Train stores it, and checked before a resume loads it.

Ray Train registers a checkpoint only after its upload completes, but a file can still be cut
short later (a full disk, a copy between buckets, an interrupted sync to an NFS mirror). Loading
such a file fails deep inside ``torch.load`` with a long traceback, on every resume, while the
previous checkpoint beside it is intact. :func:`verify` names the first bad file; the training
loop then falls back to the newest checkpoint that verifies (``wsss_ray.train.loop``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "manifest.json"  # manifest_rank<r>.json: each worker uploads its own files


def _is_manifest(name: str) -> bool:
    return name == MANIFEST or (name.startswith("manifest_rank") and name.endswith(".json"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not _is_manifest(p.name))


def write_manifest(folder: str | os.PathLike, rank: int = 0) -> Path:
    """``manifest_rank<rank>.json`` in ``folder``: relative path -> {size, sha256} of the other
    files there (one worker's part of the checkpoint: Ray Train merges the workers' folders)."""
    root = Path(folder)
    entries = {
        str(p.relative_to(root)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in _files(root)
    }
    out = root / f"manifest_rank{rank}.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"files": entries}, indent=1, sort_keys=True))
    os.replace(tmp, out)  # the manifest itself is whole or absent
    return out


def verify(folder: str | os.PathLike) -> str | None:
    """None when every file of every manifest in ``folder`` is there with its size and hash;
    else the first problem, in words. A checkpoint without manifests (written before them)
    passes."""
    root = Path(folder)
    for path in sorted(p for p in root.iterdir() if p.is_file() and _is_manifest(p.name)):
        try:
            entries = json.loads(path.read_text())["files"]
        except (OSError, ValueError, KeyError) as err:
            return f"unreadable {path.name} ({err})"
        for name, want in sorted(entries.items()):
            p = root / name
            if not p.is_file():
                return f"{name} is missing"
            size = p.stat().st_size
            if size != want["size"]:
                return f"{name} has {size:,} bytes, the manifest says {want['size']:,}"
            if _sha256(p) != want["sha256"]:
                return f"{name} does not match its SHA-256"
    return None
