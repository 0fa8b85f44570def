"""Ray Data pipeline for WebDataset image-text shards.

``read_webdataset(decoder=None, shuffle="files")`` streams raw bytes (never decoding in the read
task); ``map_batches`` on a CPU actor pool decodes the JPEG, applies RandomResizedCrop + flip and
tokenises the caption with open_clip's tokenizer, emitting numeric columns only:

- ``image``: uint8 crops, B x H x W x 3. Normalisation to float happens on the train worker
  (:func:`normalize_images`), so 4x fewer bytes cross the object store than with float32.
- ``text``: int64 token ids, B x context_length.
- ``skipped``: per output batch, the number of input rows that were dropped (in the first row,
  zeros elsewhere); the train loop sums it into the ``data/skipped`` metric.

With ``decode_device="cuda"`` (``data.decode_device``) the actors do not decode: they read the
JPEG header for the image size, draw the crop box and flip exactly as the CPU path draws them, and
tokenise, emitting ``jpeg`` (the raw bytes), ``crop`` (B x 4 int64: top, left, height, width),
``flip`` (B bool), ``text`` and ``skipped``. The train worker iterates with
:func:`jpeg_collate_fn` and decodes with :func:`decode_crop_batch` (batched nvJPEG through
``torchvision.io.decode_jpeg(device="cuda")``, crop and antialiased resize on the GPU), so the
decode leaves the CPU. Non-JPEG images are re-encoded as JPEG by the actor (rare, slow path).

Two readers feed the same decode (``data.reader``, default ``fused``):

- ``read_webdataset``: Ray's WebDataset read tasks emit raw-byte rows (pandas blocks through the
  object store), re-batched by ``map_batches`` into the decode actors.
- ``fused``: a dataset of shard paths (one row per tar and pass in a few blocks, the block order
  shuffled per execution) mapped on the decode actor pool by :class:`FusedShardDecoder`: each
  actor takes a block, shuffles its rows and opens each tar
  (through the pyarrow filesystem Ray resolves for the paths), groups files by key and decodes in
  batches of ``decode_batch_size``, so raw bytes never cross the object store and there are no
  read tasks. A shard is the unit of work: with fewer shards than actors some actors idle.

Bad samples (undecodable image, missing or empty caption, the tail of a truncated tar) are
dropped and counted, never fatal. Ray's reader fails the whole read task on a truncated tar, so
both readers go through :func:`iter_tar_samples`, which stops that shard at the break, keeps what
came before and emits a marker row the decoder counts. It reads the tar with
:func:`wsss_ray.data.tarstream.iter_tar_files` (a lean header parser, ~8x cheaper per sample than
``tarfile``) and groups the files into samples with Ray's key grouping.
"""

from __future__ import annotations

import io
import logging
import tarfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from wsss_ray.data.tarstream import iter_tar_files

log = logging.getLogger(__name__)

TRUNCATED_KEY = "__truncated__"


# ------------------------------------------------------------------------------- reading
READERS = ("fused", "read_webdataset")
_TAR_ERRORS = (tarfile.TarError, EOFError, OSError, ValueError)


def iter_tar_samples(
    stream: Any, path: str, fileselect: Any = None, suffixes: Any = None
) -> Iterator[dict]:
    """The WebDataset samples of one tar stream (:func:`~wsss_ray.data.tarstream.iter_tar_files`,
    Ray's file selection and key grouping: dicts of ``__key__``, ``__url__`` and one bytes value
    per extension). A truncated or corrupt tar ends early instead of raising: the samples before
    the break are kept, a warning is logged and a last ``{"__key__": TRUNCATED_KEY}`` marker
    sample is yielded for the decoder to count."""
    from ray.data._internal.datasource import webdataset_datasource as wdsrc

    broken: list[str] = []

    def files() -> Iterator[dict]:
        try:
            for name, data in iter_tar_files(stream):
                if fileselect is None or wdsrc._check_suffix(name, fileselect):
                    yield {"fname": name, "data": data}
        except _TAR_ERRORS as err:
            broken.append(f"{type(err).__name__}: {err}")

    yield from wdsrc._group_by_keys(files(), meta={"__url__": path}, suffixes=suffixes)
    if broken:
        log.warning(
            "shard %s is truncated or corrupt (%s); the rest of it is skipped", path, broken[0]
        )
        yield {"__key__": TRUNCATED_KEY, "__url__": path}


def _tolerant_datasource_cls():
    """Built lazily so this module imports without Ray for the pure decode functions."""
    from ray.data._internal.datasource import webdataset_datasource as wdsrc

    class TolerantWebDatasetDatasource(wdsrc.WebDatasetDatasource):
        """Ray's WebDataset reader, but a truncated or corrupt tar ends its shard early instead
        of failing the read task: earlier samples are kept, a marker row is counted."""

        def _read_stream(self, stream: Any, path: str) -> Iterator[Any]:
            import pandas as pd

            rows: list[dict] = []
            for sample in iter_tar_samples(stream, path, self.fileselect, self.suffixes):
                rows.append(sample)
                if len(rows) >= wdsrc.WEBDATASET_READ_CHUNK_SIZE:
                    yield pd.DataFrame.from_records(rows)
                    rows = []
            if rows:
                yield pd.DataFrame.from_records(rows)

    return TolerantWebDatasetDatasource


def read_shards(paths: list[str], shuffle_files: bool = True, concurrency: int | None = None):
    """``read_webdataset(paths, decoder=None, shuffle="files")`` with truncated-tar tolerance."""
    import ray.data
    from ray.data.datasource.file_meta_provider import DefaultFileMetadataProvider

    if not paths:
        raise ValueError("no WebDataset shards given")
    cls = _tolerant_datasource_cls()
    datasource = cls(
        paths,
        decoder=None,
        meta_provider=DefaultFileMetadataProvider(),
        shuffle="files" if shuffle_files else None,
        file_extensions=["tar"],
    )
    return ray.data.read_datasource(datasource, concurrency=concurrency)


def resolve_shards(paths: list[str]) -> tuple[list[str], Any]:
    """Tar files, directories of tars or URIs -> (the tar paths, their pyarrow filesystem), with
    the resolution, the retrying wrapper and the directory listing ``read_webdataset`` uses."""
    from ray.data import DataContext
    from ray.data._internal.util import RetryingPyFileSystem
    from ray.data.datasource.file_meta_provider import DefaultFileMetadataProvider
    from ray.data.datasource.path_util import _resolve_paths_and_filesystem

    if not paths:
        raise ValueError("no WebDataset shards given")
    resolved, fs = _resolve_paths_and_filesystem(list(paths))
    fs = RetryingPyFileSystem.wrap(fs, retryable_errors=DataContext.get_current().retried_io_errors)
    listed = DefaultFileMetadataProvider().expand_paths(resolved, fs)
    tars = [p for p, _ in listed if p.endswith(".tar")]
    if not tars:
        raise ValueError(f"no .tar files under {paths[:3]}")
    return tars, fs


def shard_order(tars: list[str], passes: int = 1, seed: int = 0, shuffle: bool = True) -> list[str]:
    """Every tar ``passes`` times, pass after pass; pass ``p`` in the permutation drawn from
    ``(seed, p)`` (a pure function of its arguments), or in the given order without ``shuffle``."""
    if passes < 1:
        raise ValueError(f"passes must be >= 1, not {passes}")
    if not shuffle:
        return list(tars) * passes
    out: list[str] = []
    for p in range(passes):
        perm = np.random.default_rng([seed, p]).permutation(len(tars))
        out.extend(tars[i] for i in perm)
    return out


def shard_path_dataset(
    paths: list[str],
    shuffle_files: bool = True,
    passes: int = 1,
    seed: int = 0,
    num_blocks: int = 16,
) -> tuple[Any, Any]:
    """(a dataset of one ``path`` row per tar and pass, the filesystem to open them): the fused
    reader's input. The rows (:func:`shard_order`) sit in at most ``num_blocks`` Arrow blocks
    (a few times the decode actors), so building it costs the same at 30 or 30,000 shards: one
    block per shard cost 1.2 ms and 33 KB of driver memory each, copied into three more Ray
    processes. ``shuffle_files``: the block order is drawn anew at every execution (and each
    actor shuffles the rows of its block, :class:`FusedShardDecoder`). ``passes``: every tar is
    listed that many times, so one execution is that many epochs."""
    import pyarrow as pa
    import ray.data

    tars, fs = resolve_shards(paths)
    order = shard_order(tars, passes, seed, shuffle_files)
    n = max(1, min(len(order), int(num_blocks)))
    bounds = np.linspace(0, len(order), n + 1).astype(int)
    tables = [pa.table({"path": order[a:b]}) for a, b in zip(bounds[:-1], bounds[1:])]
    ds = ray.data.from_arrow(tables)
    if shuffle_files:
        ds = ds.randomize_block_order()
    return ds, fs


# ------------------------------------------------------------------------------ decoding
def _as_bytes(value: Any) -> bytes | None:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    return None


class ImageTextDecoder:
    """``map_batches`` callable (one per actor): raw WebDataset rows -> numeric columns
    (``decode_on_worker``: the GPU-decode columns instead, see the module docstring)."""

    def __init__(
        self,
        tokenizer_name: str,
        image_size: int,
        crop_scale: tuple[float, float],
        hflip: bool,
        seed: int | None = None,
        context_length: int | None = None,
        skip_counter: str | None = None,
        decode_on_worker: bool = False,
        multi_label: int = 0,
        noun_tagger: str = "nltk",
    ):
        from torchvision.transforms import v2

        from wsss_ray.data.skips import SkipReporter
        from wsss_ray.models.clip import tokenizer

        self.tokenizer = tokenizer(tokenizer_name, context_length)
        self.image_size = image_size
        self.crop = v2.RandomResizedCrop(image_size, scale=tuple(crop_scale), antialias=True)
        ops: list[Any] = [self.crop]
        self.hflip = hflip
        if hflip:
            ops.append(v2.RandomHorizontalFlip())
        self.transform = v2.Compose(ops)
        self.decode_on_worker = decode_on_worker
        #: GroupViT's multi-label loss: ``text`` becomes n x (1 + multi_label) x context tokens
        self.multi_label, self.noun_tagger = multi_label, noun_tagger
        if multi_label:
            from wsss_ray.data.nouns import imagenet_templates

            self.templates = imagenet_templates()
            self.rng = np.random.default_rng(seed)
        if seed is not None:
            torch.manual_seed(seed)
        self.skips = SkipReporter(skip_counter)

    def _draw(self, height: int, width: int) -> tuple[int, int, int, int, bool]:
        """(top, left, crop height, crop width, flip): the random calls of
        ``v2.Compose([RandomResizedCrop, RandomHorizontalFlip])`` on an image of this size, in
        the same order, so both decode paths draw the same augmentation from the same seed."""
        shape = torch.zeros(1, 1, 1, dtype=torch.uint8).expand(3, height, width)
        p = self.crop.make_params([shape])
        flip = bool(self.hflip and torch.rand(1) < 0.5)
        return p["top"], p["left"], p["height"], p["width"], flip

    def _image(self, raw: bytes, out: np.ndarray | None = None) -> np.ndarray:
        """JPEG bytes -> the H x W x 3 uint8 crop, contiguous (written into ``out`` when given:
        a row of the batch array). Bit-identical to ``self.transform`` on the decoded image, but
        the crop is resized in channels-last layout: the result is already H x W x 3 in memory,
        so writing it into the batch is a plain copy (not a transpose)."""
        with Image.open(io.BytesIO(raw)) as im:
            im.draft("RGB", (self.image_size, self.image_size))  # DCT-domain downscale: cheap
            rgb = np.asarray(im.convert("RGB"))  # H x W x 3, read-only view
        top, left, h, w, flip = self._draw(*rgb.shape[:2])
        region = rgb[top : top + h, left : left + w].copy()  # the crop's pixels, writable
        x = torch.from_numpy(region).unsqueeze(0).permute(0, 3, 1, 2)  # 1 x 3 x h x w, NHWC
        size = (self.image_size, self.image_size)
        y = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        if flip:
            y = y.flip(-1)
        hwc = y.permute(1, 2, 0).numpy()  # H x W x 3, contiguous
        if out is None:
            return hwc
        out[...] = hwc
        return out

    def _params(self, raw: bytes) -> tuple[bytes, list[int], bool]:
        """GPU decode: (JPEG bytes, crop box, flip) without decoding; the crop box and the flip
        are drawn as in :meth:`_image`."""
        with Image.open(io.BytesIO(raw)) as im:
            width, height = im.size
            if im.format != "JPEG":  # nvJPEG reads JPEG only: re-encode (rare)
                buf = io.BytesIO()
                im.convert("RGB").save(buf, format="JPEG", quality=95)
                raw = buf.getvalue()
        top, left, h, w, flip = self._draw(height, width)
        return raw, [top, left, h, w], flip

    def _tokens(self, captions: list[str]) -> np.ndarray:
        """n x context tokens, or n x (1 + multi_label) x context: caption, then noun prompts."""
        if not self.multi_label:
            return self.tokenizer(captions).numpy().astype(np.int64)
        from wsss_ray.data.nouns import noun_prompts

        texts = [
            t
            for c in captions
            for t in noun_prompts(c, self.multi_label, self.rng, self.templates, self.noun_tagger)
        ]
        tokens = self.tokenizer(texts).numpy().astype(np.int64)
        return tokens.reshape(len(captions), 1 + self.multi_label, -1)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["__key__"])
        jpgs = batch.get("jpg", [None] * n)
        txts = batch.get("txt", [None] * n)
        images, captions, boxes, flips = [], [], [], []
        # each crop is written into its row of the batch array: no 256 separately allocated
        # crops kept alive until an np.stack (the same one copy per crop, far fewer allocations)
        size = self.image_size
        batch_images = None if self.decode_on_worker else np.empty((n, size, size, 3), np.uint8)
        for raw_img, raw_txt in zip(jpgs, txts):
            img_bytes, txt_bytes = _as_bytes(raw_img), _as_bytes(raw_txt)
            if img_bytes is None or txt_bytes is None:
                continue
            caption = txt_bytes.decode("utf-8", errors="replace").strip()
            if not caption:
                continue
            try:
                if self.decode_on_worker:
                    jpeg, box, flip = self._params(img_bytes)
                    images.append(jpeg)
                    boxes.append(box)
                    flips.append(flip)
                else:
                    images.append(self._image(img_bytes, batch_images[len(images)]))
            except Exception:  # noqa: BLE001 - any undecodable image is skipped and counted
                continue
            captions.append(caption)
        kept = len(images)
        self.skips.add(n - kept)
        skipped = np.zeros(kept, np.int64)
        ctx = getattr(self.tokenizer, "context_length", 77)
        if kept:
            skipped[0] = n - kept
            tokens = self._tokens(captions)
        else:
            if n:
                log.warning("a whole batch of %d samples was undecodable", n)
            shape = (0, 1 + self.multi_label, ctx) if self.multi_label else (0, ctx)
            tokens = np.zeros(shape, np.int64)
        if self.decode_on_worker:
            jpeg_arr = np.empty(kept, dtype=object)
            jpeg_arr[:] = images
            return {
                "jpeg": jpeg_arr,
                "crop": np.asarray(boxes, np.int64).reshape(kept, 4),
                "flip": np.asarray(flips, bool),
                "text": tokens,
                "skipped": skipped,
            }
        image_arr = batch_images if kept == n else batch_images[:kept].copy()
        return {"image": image_arr, "text": tokens, "skipped": skipped}


def _columns(samples: list[dict]) -> dict[str, list]:
    """Samples -> the column dict :class:`ImageTextDecoder` takes (``None`` where missing)."""
    return {k: [s.get(k) for s in samples] for k in ("__key__", "jpg", "txt")}


class FusedShardDecoder:
    """``map_batches`` callable of the fused reader (one per actor): rows of shard paths ->
    batches of :class:`ImageTextDecoder`'s columns, at most ``batch_size`` samples each (the
    last batch of a shard also carries its truncation marker, so the skip lands in a column)."""

    def __init__(
        self, filesystem: Any, batch_size: int, shuffle_files: bool = False, **decoder_kwargs: Any
    ):
        self.fs = filesystem
        self.batch_size = max(1, int(batch_size))
        self.shuffle = shuffle_files
        self.rng = np.random.default_rng()
        self.decoder = ImageTextDecoder(**decoder_kwargs)

    def samples(self, path: str) -> Iterator[dict]:
        """The samples of one tar; an unreadable file counts as a corrupt shard."""
        try:
            stream = self.fs.open_input_stream(path)
        except OSError as err:
            log.warning("shard %s cannot be opened (%s); it is skipped", path, err)
            yield {"__key__": TRUNCATED_KEY, "__url__": path}
            return
        with stream:
            yield from iter_tar_samples(stream, path)

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        paths = list(batch["path"])  # one block: many shards (see shard_path_dataset)
        if self.shuffle:
            paths = [paths[i] for i in self.rng.permutation(len(paths))]
        for path in paths:
            rows: list[dict] = []
            for sample in self.samples(str(path)):
                if len(rows) >= self.batch_size and sample["__key__"] != TRUNCATED_KEY:
                    yield self.decoder(_columns(rows))
                    rows = []
                rows.append(sample)
            if rows:
                yield self.decoder(_columns(rows))


def image_text_dataset(
    paths: list[str],
    tokenizer_name: str,
    image_size: int,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    hflip: bool = True,
    batch_size: int = 64,
    actors: tuple[int, int] = (1, 2),
    cpus_per_actor: float = 1.0,
    context_length: int | None = None,
    skip_counter: str | None = None,
    decode_device: str = "cpu",
    reader: str = "fused",
    shuffle_files: bool = True,
    passes: int = 1,
    multi_label: int = 0,
    noun_tagger: str = "nltk",
    seed: int = 0,
    num_blocks: int = 0,
):
    """The training dataset: tolerant read -> decode/crop/tokenize on a CPU actor pool
    (``skip_counter``: the name from :func:`wsss_ray.data.skips.start_skip_counter`;
    ``decode_device="cuda"``: the actors only parse, the train worker decodes on its GPU;
    ``reader``: ``fused`` (each actor reads its own tars, see the module docstring) or
    ``read_webdataset`` (read tasks, raw bytes through the object store); ``passes``: epochs
    per execution, fused reader only: one actor-pool start-up per ``passes`` epochs; ``seed``: the
    shard order of each pass, :func:`shard_order`; ``num_blocks``: blocks of the fused reader's
    shard list, 0 = four per decode actor)."""
    from ray.data import ActorPoolStrategy

    if decode_device not in ("cpu", "cuda"):
        raise ValueError(f"decode_device must be cpu or cuda, not {decode_device!r}")
    if reader not in READERS:
        raise ValueError(f"reader must be one of {' | '.join(READERS)}, not {reader!r}")
    if passes != 1 and reader != "fused":
        raise ValueError(f"passes={passes} needs the fused reader (read_webdataset: one pass)")
    decoder_kwargs = {
        "tokenizer_name": tokenizer_name,
        "image_size": image_size,
        "crop_scale": tuple(crop_scale),
        "hflip": hflip,
        "context_length": context_length,
        "skip_counter": skip_counter,
        "decode_on_worker": decode_device == "cuda",
        "multi_label": multi_label,
        "noun_tagger": noun_tagger,
    }
    if reader == "fused":
        # a few blocks per actor: start-up independent of the shard count, and no actor left
        # with a long queue at the end of an execution
        blocks = num_blocks or 4 * actors[1]
        ds, fs = shard_path_dataset(paths, shuffle_files, passes, seed, num_blocks=blocks)
        kwargs = {"filesystem": fs, "batch_size": batch_size, "shuffle_files": shuffle_files}
        return ds.map_batches(
            FusedShardDecoder,
            fn_constructor_kwargs={**kwargs, **decoder_kwargs},
            batch_size=None,  # one block (many shards) per call, yielding batch_size-row batches
            batch_format="numpy",
            # two shards in flight per actor: one decoding, one queued (the default 4 leaves
            # the last actors idle while one works through its queue at the end of an epoch)
            compute=ActorPoolStrategy(
                min_size=actors[0], max_size=actors[1], max_tasks_in_flight_per_actor=2
            ),
            num_cpus=cpus_per_actor,
        )
    ds = read_shards(paths, shuffle_files)
    return ds.map_batches(
        ImageTextDecoder,
        fn_constructor_kwargs=decoder_kwargs,
        batch_size=batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(min_size=actors[0], max_size=actors[1]),
        num_cpus=cpus_per_actor,
    )


# ------------------------------------------------------------- decoding on the train worker
def jpeg_collate_fn():
    """``iter_torch_batches(collate_fn=...)`` for the GPU-decode columns: ``jpeg`` becomes a list
    of uint8 CPU tensors (variable length), the other columns CPU tensors; the loop's
    ``_prepare`` decodes and moves them (Ray moves only plain tensor dicts to the device)."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class JpegCollate(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
            return jpeg_batch_tensors(batch)

    return JpegCollate()


def jpeg_batch_tensors(batch: dict[str, Any]) -> dict[str, Any]:
    """The GPU-decode columns as the train worker takes them: ``jpeg`` a list of uint8 CPU
    tensors (variable length), the other columns CPU tensors (what :func:`jpeg_collate_fn`
    does inside Ray)."""
    out: dict[str, Any] = {
        k: torch.as_tensor(np.ascontiguousarray(v)) for k, v in batch.items() if k != "jpeg"
    }
    out["jpeg"] = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in batch["jpeg"]]
    return out


_NVJPEG_FAILED = False


def _nvjpeg_failed(err: Exception) -> None:
    global _NVJPEG_FAILED
    _NVJPEG_FAILED = True
    log.warning("nvJPEG decode failed (%s): decoding on this worker's CPU instead", err)


def decode_crop_batch(
    jpegs: list[torch.Tensor],
    crops_B4: torch.Tensor,
    flips_B: torch.Tensor,
    image_size: int,
    device: torch.device | str = "cuda",
    method: str = "auto",
) -> torch.Tensor:
    """JPEG bytes -> uint8 B x S x S x 3 crops on ``device`` (what the CPU actors deliver):
    ``torchvision.io.decode_jpeg`` (batched nvJPEG on CUDA, libjpeg-turbo on CPU), then per image
    the crop box resized to ``image_size`` and the flip. ``method``: ``loop`` (an antialiased
    bilinear resize per image, as the actors), ``roi_align`` (all crops in one kernel: adaptive
    sampling averages each output pixel's footprint, which is the antialiasing; within 0.3 grey
    levels of ``loop`` on average), ``auto``: ``roi_align`` on CUDA (on an H200, 256 crops by
    ``loop`` cost 28 ms, a third of a vit_s step), ``loop`` elsewhere."""
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    if method == "auto":
        method = "roi_align" if device.type == "cuda" else "loop"
    if method not in ("loop", "roi_align"):
        raise ValueError(f"method must be auto | loop | roi_align, not {method!r}")
    decoded = None
    if device.type == "cuda" and not _NVJPEG_FAILED:
        try:
            # torchvision's nvJPEG decode does not order itself with the current stream: without
            # these two synchronisations the third training step on an H200 read a corrupt batch
            # (NaN in the step; torch 2.11 / torchvision 0.26, decode_crop_batch in _prepare)
            torch.cuda.synchronize(device)
            decoded = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
            torch.cuda.synchronize(device)
        except RuntimeError as err:  # a torchvision without nvJPEG: libjpeg-turbo from now on
            _nvjpeg_failed(err)
    if decoded is None:
        decoded = [decode_jpeg(j, mode=ImageReadMode.RGB).to(device) for j in jpegs]
    if method == "roi_align":
        return _roi_crops(decoded, crops_B4.to(device), flips_B.to(device), image_size)
    from torchvision.transforms.v2 import functional as TF

    boxes = crops_B4.tolist()  # B x 4 ints on the host: one small copy
    flips = flips_B.tolist()
    out = torch.empty(len(decoded), image_size, image_size, 3, dtype=torch.uint8, device=device)
    for b, (img, (top, left, h, w), flip) in enumerate(zip(decoded, boxes, flips)):
        crop = TF.resized_crop(img, top, left, h, w, [image_size, image_size], antialias=True)
        if flip:
            crop = crop.flip(-1)
        out[b] = crop.permute(1, 2, 0)
    return out


def _roi_crops(
    decoded: list[torch.Tensor], crops_B4: torch.Tensor, flips_B: torch.Tensor, size: int
) -> torch.Tensor:
    """The crops of :func:`decode_crop_batch` by ``roi_align``: images padded into float chunks
    of at most ~1 GB, boxes as (index, x1, y1, x2, y2) with pixel-centre alignment."""
    from torchvision.ops import roi_align

    out = torch.empty(len(decoded), 3, size, size, dtype=torch.uint8, device=crops_B4.device)
    c = crops_B4.float()
    height = max(int(d.shape[1]) for d in decoded)
    width = max(int(d.shape[2]) for d in decoded)
    step = max(1, (1 << 30) // (3 * 4 * height * width))  # images per ~1 GB float chunk
    for i in range(0, len(decoded), step):
        chunk = decoded[i : i + step]
        batch = torch.zeros(len(chunk), 3, height, width, device=crops_B4.device)
        for k, d in enumerate(chunk):
            batch[k, :, : d.shape[1], : d.shape[2]] = d
        top, left, h, w = c[i : i + len(chunk)].unbind(1)
        idx = torch.arange(len(chunk), device=c.device, dtype=c.dtype)
        boxes = torch.stack([idx, left, top, left + w, top + h], 1)
        res = roi_align(batch, boxes, (size, size), 1.0, -1, True)
        out[i : i + len(chunk)] = res.round_().clamp_(0, 255).to(torch.uint8)
    out = torch.where(flips_B.view(-1, 1, 1, 1), out.flip(-1), out)
    return out.permute(0, 2, 3, 1).contiguous()


def normalize_images(
    images_BHWC: torch.Tensor,
    mean: list[float],
    std: list[float],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 B x H x W x 3 -> normalised B x 3 x H x W in ``dtype`` (on the images' device)."""
    x = images_BHWC.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return ((x - m) / s).to(dtype)
