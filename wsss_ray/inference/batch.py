"""Batch segmentation of image files (``jobs/segment.py``): what to read, what each image
writes, and the Ray Data actor that holds the model once and writes the outputs.

Per image ``<key>`` (its path relative to the input folder, without the extension) the job
writes ``<out>/<key>.png`` (palette PNG of the class indices), ``<out>/<key>_overlay.jpg`` (the
image with the mask and a legend) and ``<out>/<key>.json`` (classes, areas, size). An image
whose three files exist is done: a rerun skips it.
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
from pathlib import Path
from typing import Any

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_inputs(inputs: list[str]) -> list[dict[str, str]]:
    """Rows ``{"key", "path", "member"}`` for folders (recursive), image files, globs and
    WebDataset ``.tar`` shards (``member`` = the image's name inside the tar). Raises
    FileNotFoundError for an input that matches nothing."""
    rows: list[dict[str, str]] = []
    for entry in inputs:
        p = Path(entry)
        if "://" in entry:  # an object-store prefix (s3://, gs://, ...; file:// too)
            rows += _list_uri(entry)
        elif p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.suffix.lower() in IMAGE_EXTS and f.is_file():
                    key = str(f.relative_to(p).with_suffix(""))
                    rows.append({"key": key, "path": str(f), "member": ""})
        elif p.is_file() and p.suffix == ".tar":
            with tarfile.open(p) as tar:
                for m in tar.getmembers():
                    if m.isfile() and Path(m.name).suffix.lower() in IMAGE_EXTS:
                        key = f"{p.stem}/{Path(m.name).with_suffix('')}"
                        rows.append({"key": key, "path": str(p), "member": m.name})
        elif p.is_file():
            rows.append({"key": p.stem, "path": str(p), "member": ""})
        else:
            matches = sorted(glob.glob(entry))
            if not matches:
                raise FileNotFoundError(f"input not found: {entry}")
            rows += list_inputs(matches)
    keys = [r["key"] for r in rows]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"two inputs would write the same outputs: {dup}")
    return rows


def _list_uri(uri: str) -> list[dict[str, str]]:
    """The images under an object-store prefix, through pyarrow's filesystems (credentials
    as pyarrow reads them: the environment, instance roles)."""
    from pyarrow import fs

    filesystem, root = fs.FileSystem.from_uri(uri)
    scheme = uri.split("://", 1)[0]
    info = filesystem.get_file_info(root)
    if info.type == fs.FileType.NotFound:
        raise FileNotFoundError(f"input not found: {uri}")
    if info.type == fs.FileType.File:
        files = [info]
    else:
        files = filesystem.get_file_info(fs.FileSelector(root, recursive=True))
    rows = []
    for f in sorted(files, key=lambda i: i.path):
        if f.type == fs.FileType.File and Path(f.path).suffix.lower() in IMAGE_EXTS:
            rel = Path(f.path).relative_to(root) if f.path != root else Path(Path(f.path).name)
            rows.append(
                {"key": str(rel.with_suffix("")), "path": f"{scheme}://{f.path}", "member": ""}
            )
    return rows


def outputs(out: str | Path, key: str) -> tuple[Path, Path, Path]:
    base = Path(out) / key
    return (
        base.with_name(base.name + ".png"),
        base.with_name(base.name + "_overlay.jpg"),
        base.with_name(base.name + ".json"),
    )


def is_done(out: str | Path, key: str) -> bool:
    return all(p.is_file() for p in outputs(out, key))


def read_bytes(row: dict[str, Any]) -> bytes:
    if row["member"]:
        with tarfile.open(row["path"]) as tar:
            f = tar.extractfile(row["member"])
            if f is None:
                raise OSError(f"{row['member']} is not a file in {row['path']}")
            return f.read()
    if "://" in row["path"]:
        from pyarrow import fs

        filesystem, path = fs.FileSystem.from_uri(row["path"])
        with filesystem.open_input_stream(path) as stream:
            return stream.read()
    return Path(row["path"]).read_bytes()


def write_outputs(out: str | Path, key: str, image, result, seg) -> None:
    """The three files of one image; each is written to a temporary name and renamed, so an
    interrupted job never leaves a file that looks done."""
    from wsss_ray.inference.render import label_png

    png, jpg, js = outputs(out, key)
    png.parent.mkdir(parents=True, exist_ok=True)

    def put(path: Path, data: bytes) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    import io

    buf = io.BytesIO()
    seg.overlay(image, result).save(buf, format="JPEG", quality=90)
    put(png, label_png(result.mask))
    put(jpg, buf.getvalue())
    put(js, json.dumps({"image": key, **result.to_json()}, indent=2).encode())


class SegmentActor:
    """Ray Data actor: loads the Segmenter once, segments a batch of rows, writes the outputs.
    Returns per row its key and ``ok`` or the error (an unreadable image is not fatal)."""

    def __init__(self, checkpoint: str, class_names: list[str] | None, out: str, **kwargs):
        from wsss_ray.inference.segmenter import Segmenter

        self.seg = Segmenter.from_checkpoint(checkpoint, **kwargs)
        self.names = class_names
        self.out = out

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np
        from PIL import UnidentifiedImageError

        from wsss_ray.inference.segmenter import _as_rgb

        keys, status = [], []
        for key, path, member in zip(batch["key"], batch["path"], batch["member"]):
            row = {"key": str(key), "path": str(path), "member": str(member)}
            try:
                try:
                    image = _as_rgb(read_bytes(row))
                except UnidentifiedImageError:
                    raise ValueError("not an image PIL can read") from None
                result = self.seg.predict([image], self.names)[0]
                write_outputs(self.out, row["key"], image, result, self.seg)
                status.append("ok")
            except ValueError as err:
                status.append(str(err))
            except Exception as err:  # noqa: BLE001 - one bad image must not stop the job
                status.append(f"{type(err).__name__}: {err}")
            keys.append(row["key"])
        return {"key": np.array(keys, dtype=object), "status": np.array(status, dtype=object)}
