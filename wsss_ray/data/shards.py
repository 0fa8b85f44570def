"""Writing WebDataset tar shards of image-text pairs.

Sources: a folder of images with same-named ``.txt`` captions, or a CSV/parquet table of
(local image path, caption). Each sample becomes ``{key}.jpg``, ``{key}.txt`` and ``{key}.json``
(source path, original size). A shard is written under a temporary name and renamed when
complete, so a crashed run never leaves a half shard that looks whole.

Bad input is skipped and counted, never fatal, because real crawls always contain some: an
empty, truncated or corrupt file, a file that is no image, an image of more pixels than
``PIL.Image.MAX_IMAGE_PIXELS`` (a decompression bomb: refused from its header, never decoded), a
caption that is missing, empty or not UTF-8, a table row without an image path. Each skip is
named (file and reason) in the summary and, all of them, in ``{prefix}-skipped.txt`` beside the
shards. Images that decode are converted as a viewer shows them (:func:`to_rgb`: CMYK, palettes,
transparency, 16-bit grey). Captions longer than :data:`~wsss_ray.data.skips.MAX_CAPTION_BYTES`
are cut there (the text towers read 77 tokens) and listed too.
"""

from __future__ import annotations

import codecs
import io
import json
import os
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import webdataset as wds
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from wsss_ray.data.skips import MAX_CAPTION_BYTES

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
        """One image-text sample: ``{key}.jpg``, ``{key}.txt``, ``{key}.json``."""
        self.write_sample(
            {
                "__key__": key,
                "jpg": jpeg,
                "txt": caption.encode("utf-8"),
                "json": json.dumps(meta).encode("utf-8"),
            }
        )

    def write_sample(self, sample: dict) -> None:
        """Any WebDataset sample (``__key__`` and one bytes value per extension)."""
        if self._writer is None or self._count >= self.per_shard:
            self._rotate()
        assert self._writer is not None
        self._writer.write(sample)
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


#: skips (and notes) kept in memory and printed by the summary; the list file has every one
MAX_EXAMPLES = 1000
SHOWN = 10


def printable(text: str) -> str:
    """``text`` safe for any console: file names that are not UTF-8 (surrogate escapes) get
    backslash escapes instead of failing the print."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass
class ShardSummary:
    """What a shard writer did: samples written, skips counted per kind and named
    (``"item (why)"``), and notes on samples kept but changed (a caption cut, an annotation left
    out of a mask). ``list_file`` (when anything was skipped or noted) lists every one."""

    written: int = 0
    skipped: int = 0
    shards: list[str] = field(default_factory=list)
    skipped_examples: list[str] = field(default_factory=list)
    kinds: dict[str, int] = field(default_factory=dict)
    notes: dict[str, int] = field(default_factory=dict)
    note_examples: list[str] = field(default_factory=list)
    list_file: str | None = None
    _log: IO[str] | None = field(default=None, repr=False)
    _path: Path | None = field(default=None, repr=False)

    def skip(self, named: str, kind: str) -> None:
        """One skipped item: ``named`` says which and why, ``kind`` groups the count."""
        self.skipped += 1
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        if len(self.skipped_examples) < MAX_EXAMPLES:
            self.skipped_examples.append(named)
        self._list(f"skipped: {named}")

    def note(self, named: str, kind: str) -> None:
        """One item written, but changed (``kind``: e.g. a caption cut)."""
        self.notes[kind] = self.notes.get(kind, 0) + 1
        if len(self.note_examples) < MAX_EXAMPLES:
            self.note_examples.append(named)
        self._list(f"note: {named}")

    def _list(self, line: str) -> None:
        if self._path is None:
            return
        if self._log is None:
            self._log = open(self._path, "w", encoding="utf-8", errors="backslashreplace")
            self.list_file = str(self._path)
        self._log.write(line + "\n")

    def listing(self, path: str | Path) -> ShardSummary:
        """Write every skip and note to ``path`` (created on the first; a stale one from an
        earlier run is removed now). Use as a context manager: the file is closed on exit."""
        self._path = Path(path)
        self._path.unlink(missing_ok=True)
        return self

    def __enter__(self) -> ShardSummary:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __str__(self) -> str:
        head = f"wrote {self.written} samples in {len(self.shards)} shards, skipped {self.skipped}"
        if self.kinds:
            ranked = sorted(self.kinds.items(), key=lambda kv: -kv[1])
            head += ": " + ", ".join(f"{n} {kind}" for kind, n in ranked)
        head += "".join(f"; {kind}: {n}" for kind, n in self.notes.items())
        lines = [head] + [f"  skipped: {s}" for s in self.skipped_examples[:SHOWN]]
        if self.skipped > SHOWN:
            lines.append(f"  ... {self.skipped - SHOWN} more skipped")
        lines += [f"  note: {s}" for s in self.note_examples[:SHOWN]]
        if self.list_file:
            lines.append(f"  every one listed in {self.list_file}")
        return "\n".join(printable(line) for line in lines)


class CaptionError(str):
    """A caption (or table row) that cannot be used; the string names it and says why (the
    pair is skipped and counted under ``kind``)."""

    kind: str

    def __new__(cls, text: str, kind: str = "caption not UTF-8") -> CaptionError:
        self = super().__new__(cls, text)
        self.kind = kind
        return self


class BadImage(ValueError):
    """An image file that cannot be used; the message says why in a few words, ``kind``
    groups it in the summary (``unreadable`` or ``too large``)."""

    def __init__(self, why: str, kind: str = "unreadable"):
        super().__init__(why)
        self.kind = kind


_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def _too_large(pixels: int | None, limit: int, dims: str = "") -> BadImage:
    what = f"{dims} = {pixels:,} pixels" if dims else f"{pixels or 0:,} pixels"
    return BadImage(
        f"too large: {what}, over PIL.Image.MAX_IMAGE_PIXELS = {limit:,} "
        "(a decompression bomb?); not decoded",
        "too large",
    )


def open_image(raw: bytes) -> Image.Image:
    """The image in ``raw``, opened: its header is read, nothing is decoded yet.
    :class:`BadImage` for an empty file, a file no PIL plugin reads, or an image of more pixels
    than ``PIL.Image.MAX_IMAGE_PIXELS`` (checked on the header: a decompression bomb, a few KB
    on disk, is refused before it takes gigabytes; raise the limit to allow larger images)."""
    if not raw:
        raise BadImage("empty file (0 bytes)")
    limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below
            im = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError as err:  # over twice the limit: PIL refuses itself
        found = _BOMB_PIXELS.search(str(err))
        raise _too_large(int(found.group(1)) if found else None, limit or 0) from None
    except UnidentifiedImageError:
        raise BadImage(f"not an image PIL can read ({len(raw):,} bytes)") from None
    except Exception as err:  # noqa: BLE001 - a header cut short or corrupt
        raise BadImage(f"truncated or corrupt ({type(err).__name__}: {err})") from None
    width, height = im.size
    if limit and width * height > limit:
        im.close()
        raise _too_large(width * height, limit, f"{width} x {height}")
    return im


def decode_image(raw: bytes) -> Image.Image:
    """:func:`open_image`, then a full decode: a truncated or corrupt file raises
    :class:`BadImage` here, not on the cluster."""
    im = open_image(raw)
    try:
        im.load()
    except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError...
        im.close()
        raise BadImage(f"truncated or corrupt ({type(err).__name__}: {err})") from None
    return im


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
    """The image's bytes as JPEG and its size (RGB JPEG files are copied after a full decode
    check; anything else is converted by :func:`to_rgb` and encoded). :class:`BadImage` when
    it cannot be used."""
    raw = Path(path).read_bytes()
    with decode_image(raw) as im:
        size = im.size
        if im.format == "JPEG" and im.mode == "RGB":
            return raw, size
        buf = io.BytesIO()
        to_rgb(im).save(buf, format="JPEG", quality=quality)
        return buf.getvalue(), size


def why_unusable(err: Exception) -> tuple[str, str]:
    """(why, kind) of an image that raised ``err`` while being read, for the summary."""
    if isinstance(err, BadImage):
        return str(err), err.kind
    if isinstance(err, FileNotFoundError):
        return "no such file", "unreadable"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror, "unreadable"
    return f"{type(err).__name__}: {err}", "unreadable"


#: bytes of a caption file read at most: a few times the cap, so a multi-GB ``.txt`` is not
#: read whole to keep its first 4 KB
_CAPTION_READ = 4 * MAX_CAPTION_BYTES


def _caption(txt: Path) -> str:
    if not txt.exists():
        return ""
    try:
        with open(txt, "rb") as f:
            raw = f.read(_CAPTION_READ + 1)
    except OSError as err:
        return CaptionError(f"{txt}: caption unreadable ({err.strerror})", "unreadable caption")
    whole = len(raw) <= _CAPTION_READ
    try:  # a multi-byte character cut by the read limit is no error
        text = codecs.getincrementaldecoder("utf-8")().decode(raw[:_CAPTION_READ], final=whole)
    except UnicodeDecodeError as err:
        return CaptionError(f"{txt}: caption not UTF-8 ({err.reason} at byte {err.start})")
    return text.strip()


def cut_caption(caption: str, limit: int = MAX_CAPTION_BYTES) -> tuple[str, int]:
    """(the caption cut to ``limit`` UTF-8 bytes at a character boundary, its length in bytes
    when it was cut, else 0)."""
    data = caption.encode("utf-8")
    if len(data) <= limit:
        return caption, 0
    return data[:limit].decode("utf-8", errors="ignore").rstrip(), len(data)


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
            yield (
                f"{path} row {row}",
                CaptionError(f"{path} row {row}: no image path", "no image path"),
            )
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
    """Write (image path, caption) pairs to shards; unusable images and captions are skipped,
    counted and named (every one in ``{prefix}-skipped.txt`` in ``out_dir``), long captions
    cut to :data:`MAX_CAPTION_BYTES` and listed there too."""
    summary = ShardSummary()
    with (
        ShardSink(out_dir, prefix, samples_per_shard) as sink,
        summary.listing(Path(out_dir) / f"{prefix}-skipped.txt"),
    ):
        for i, (img, caption) in enumerate(
            tqdm(pairs, total=total, disable=not progress, unit="img", desc="sharding")
        ):
            if isinstance(caption, CaptionError):
                summary.skip(str(caption), caption.kind)
                continue
            caption = caption.strip()
            if not caption:
                summary.skip(f"{img} (no caption)", "no caption")
                continue
            try:
                jpeg, (w, h) = to_jpeg(img)
            except Exception as err:  # noqa: BLE001 - any unusable image is skipped
                why, kind = why_unusable(err)
                summary.skip(f"{img} ({why})", kind)
                continue
            caption, length = cut_caption(caption)
            if length:
                summary.note(
                    f"{img}: caption longer than {MAX_CAPTION_BYTES:,} bytes, cut there",
                    f"captions cut to {MAX_CAPTION_BYTES} bytes",
                )
            sink.write(f"{i:09d}", jpeg, caption, {"source": img, "width": w, "height": h})
            summary.written += 1
    summary.shards = sink.paths
    return summary
