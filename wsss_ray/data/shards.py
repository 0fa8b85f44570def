"""Writing WebDataset tar shards of image-text pairs.

Sources: a folder of images with same-named ``.txt`` captions, or a CSV/parquet table of
(local image path, caption). Each sample becomes ``{key}.jpg``, ``{key}.txt`` and ``{key}.json``
(source path, original size). Unreadable images are skipped and counted in the summary, never
fatal, because real crawls always contain some. A shard is written under a temporary name and
renamed when complete, so a crashed run never leaves a half shard that looks whole.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds
from PIL import Image
from tqdm import tqdm

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


class ShardSink:
    """Writes samples to ``{prefix}-{i:06d}.tar`` with ``samples_per_shard`` samples each."""

    def __init__(
        self,
        out_dir: str | Path,
        prefix: str = "shard",
        samples_per_shard: int = 1000,
        mtime: float | None = None,
    ):
        if samples_per_shard < 1:
            raise ValueError("samples_per_shard must be >= 1")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.per_shard = samples_per_shard
        self.mtime = mtime  # fixed tar header time: byte-identical shards for the same samples
        self.paths: list[str] = []
        self._writer: wds.TarWriter | None = None
        self._tmp: Path | None = None
        self._count = 0

    def _rotate(self) -> None:
        self._close_current()
        final = self.out_dir / f"{self.prefix}-{len(self.paths):06d}.tar"
        self._tmp = final.with_suffix(".tar.tmp")
        self._writer = wds.TarWriter(str(self._tmp), mtime=self.mtime)
        self.paths.append(str(final))
        self._count = 0

    def _close_current(self) -> None:
        if self._writer is not None and self._tmp is not None:
            self._writer.close()
            os.replace(self._tmp, self._tmp.with_suffix(""))
            self._writer = None

    def write(self, key: str, jpeg: bytes, caption: str, meta: dict) -> None:
        if self._writer is None or self._count >= self.per_shard:
            self._rotate()
        assert self._writer is not None
        self._writer.write(
            {
                "__key__": key,
                "jpg": jpeg,
                "txt": caption.encode("utf-8"),
                "json": json.dumps(meta).encode("utf-8"),
            }
        )
        self._count += 1

    def close(self) -> None:
        self._close_current()

    def __enter__(self) -> ShardSink:
        return self

    def abort(self) -> None:
        """Drop the shard being written (its ``.tar.tmp``): it never gets its final name."""
        if self._writer is not None and self._tmp is not None:
            self._writer.close()
            self._tmp.unlink(missing_ok=True)
            self.paths.pop()
            self._writer = None

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:  # a crash: the complete shards stay, the half-written one goes
            self.abort()


@dataclass
class ShardSummary:
    written: int = 0
    skipped: int = 0
    shards: list[str] = field(default_factory=list)
    skipped_examples: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"wrote {self.written} samples in {len(self.shards)} shards, "
            f"skipped {self.skipped} unreadable images"
        ]
        lines += [f"  skipped: {s}" for s in self.skipped_examples[:10]]
        return "\n".join(lines)


class CaptionError(str):
    """A caption that could not be read; the string says why (the pair is skipped, counted)."""


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB as a viewer shows the image: 16-bit and 32-bit grey scaled to 8 bits (PIL's
    ``convert`` clips them, so a 16-bit scan turns white), transparency composited on white
    (``convert`` drops the alpha channel and shows the hidden colours), CMYK and palettes
    converted."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np

        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        return Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert(
            "RGB"
        )
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def to_jpeg(path: str | Path, quality: int = 95) -> tuple[bytes, tuple[int, int]]:
    """The image's bytes as JPEG (JPEG files are copied after a full decode check)."""
    raw = Path(path).read_bytes()
    with Image.open(io.BytesIO(raw)) as im:
        im.load()  # a full decode: truncated files fail here, not on the cluster
        size = im.size
        if im.format == "JPEG" and im.mode == "RGB":
            return raw, size
        buf = io.BytesIO()
        to_rgb(im).save(buf, format="JPEG", quality=quality)
        return buf.getvalue(), size


def _caption(txt: Path) -> str:
    if not txt.exists():
        return ""
    raw = txt.read_bytes()
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError as err:
        return CaptionError(f"{txt}: caption not UTF-8 ({err.reason} at byte {err.start})")


def pairs_from_folder(folder: str | Path) -> Iterator[tuple[str, str]]:
    """(image path, caption) for every image that has a same-named ``.txt`` beside it (a
    caption that is not UTF-8 comes as a :class:`CaptionError`). Raises at once when the
    folder does not exist."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such folder: {folder}")
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
    return ((str(img), _caption(img.with_suffix(".txt"))) for img in images)


def pairs_from_table(
    path: str | Path, image_col: str = "path", caption_col: str = "caption"
) -> Iterator[tuple[str, str]]:
    """(image path, caption) rows of a CSV or parquet file; relative paths are resolved
    against the table's folder."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such table: {path}")
    try:
        table = pq.read_table(path) if path.suffix == ".parquet" else pcsv.read_csv(path)
    except Exception as err:  # noqa: BLE001 - pyarrow's errors: one line naming the file
        raise ValueError(f"{path}: not a readable table ({str(err).splitlines()[0]})") from None
    for col in (image_col, caption_col):
        if col not in table.column_names:
            raise ValueError(f"{path}: no column '{col}' (columns: {table.column_names})")
    if table.num_rows == 0:
        raise ValueError(f"{path}: the table has no rows")
    return _table_rows(path, table[image_col].to_pylist(), table[caption_col].to_pylist())


def _table_rows(path: Path, images: list, captions: list) -> Iterator[tuple[str, str]]:
    for row, (img, cap) in enumerate(zip(images, captions)):
        if img is None or not str(img).strip():
            yield f"{path} row {row}", CaptionError(f"{path} row {row}: no image path")
            continue
        img_path = Path(str(img))
        if not img_path.is_absolute():
            img_path = path.parent / img_path
        yield str(img_path), "" if cap is None else str(cap)


def write_shards(
    pairs: Iterable[tuple[str, str]],
    out_dir: str | Path,
    prefix: str = "shard",
    samples_per_shard: int = 1000,
    total: int | None = None,
    progress: bool = True,
) -> ShardSummary:
    """Write (image path, caption) pairs to shards; unreadable images and empty captions are
    skipped and counted."""
    summary = ShardSummary()
    with ShardSink(out_dir, prefix, samples_per_shard) as sink:
        for i, (img, caption) in enumerate(
            tqdm(pairs, total=total, disable=not progress, unit="img", desc="sharding")
        ):
            if isinstance(caption, CaptionError):
                summary.skipped += 1
                summary.skipped_examples.append(str(caption))
                continue
            if not caption.strip():
                summary.skipped += 1
                summary.skipped_examples.append(f"{img} (no caption)")
                continue
            try:
                jpeg, (w, h) = to_jpeg(img)
            except Exception as err:  # noqa: BLE001 - any unreadable image is skipped
                summary.skipped += 1
                summary.skipped_examples.append(f"{img} ({type(err).__name__}: {err})")
                continue
            sink.write(f"{i:09d}", jpeg, caption.strip(), {"source": img, "width": w, "height": h})
            summary.written += 1
    summary.shards = sink.paths
    return summary
