"""Ray Data pipeline for WebDataset image-text shards.

``read_webdataset(decoder=None, shuffle="files")`` streams raw bytes (never decoding in the read
task); ``map_batches`` on a CPU actor pool decodes the JPEG, applies RandomResizedCrop + flip and
tokenises the caption with open_clip's tokenizer, emitting numeric columns only:

- ``image``: uint8 crops, B x H x W x 3. Normalisation to float happens on the train worker
  (:func:`~wsss_ray.data.gpu_decode.normalize_images`), so 4x fewer bytes cross the object
  store than with float32.
- ``text``: int64 token ids, B x context_length.
- ``skipped``: per output batch, the number of input rows that were dropped (in the first row,
  zeros elsewhere); the train loop sums it into the ``data/skipped`` metric.

With ``decode_device="cuda"`` the actors emit JPEG bytes, crop boxes and flips instead of images,
decoded on the train worker's GPU: see :mod:`wsss_ray.data.gpu_decode`.

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
both readers go through :func:`~wsss_ray.data.shard_reading.iter_tar_samples`, which stops that
shard at the break, keeps what came before and emits a marker row the decoder counts. It reads
the tar with :func:`wsss_ray.data.tarstream.iter_tar_files` (a lean header parser, ~8x cheaper
per sample than ``tarfile``) and groups the files into samples with Ray's key grouping. The
shard list, its order per pass and the tar reading are in :mod:`wsss_ray.data.shard_reading`.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from wsss_ray.data.shard_reading import (
    READERS,
    iter_tar_samples,
    read_shards,
    resolve_shards,
    shard_list_dataset,
)
from wsss_ray.data.skips import (
    MAX_CAPTION_BYTES,
    TRUNCATED_KEY,
    as_bytes,
    pair_problem,
    skip_name,
    undecodable,
)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ decoding
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
        urls, bad = batch.get("__url__", [None] * n), []  # skips named: shard, key, why
        ids = batch.get("__id__")  # the fused reader's sample ids (wsss_ray.data.position)
        images, captions, boxes, flips, kept_ids = [], [], [], [], []
        # each crop is written into its row of the batch array: no 256 separately allocated
        # crops kept alive until an np.stack (the same one copy per crop, far fewer allocations)
        size = self.image_size
        batch_images = None if self.decode_on_worker else np.empty((n, size, size, 3), np.uint8)
        for row, (raw_img, raw_txt) in enumerate(zip(jpgs, txts)):
            img_bytes, txt_bytes = as_bytes(raw_img), as_bytes(raw_txt)
            key, url = batch["__key__"][row], urls[row]
            why = pair_problem(key, img_bytes, txt_bytes)
            if why is None:  # captions past the cap are cut: the tokenizer reads ~77 tokens
                caption = txt_bytes[:MAX_CAPTION_BYTES].decode("utf-8", errors="replace").strip()
                why = None if caption else "empty caption"
            if why is not None:
                bad.append(skip_name(url, key, why))
                continue
            try:
                if self.decode_on_worker:
                    jpeg, box, flip = self._params(img_bytes)
                    images.append(jpeg)
                    boxes.append(box)
                    flips.append(flip)
                else:
                    images.append(self._image(img_bytes, batch_images[len(images)]))
            except Exception as err:  # noqa: BLE001 - any undecodable image is skipped and counted
                bad.append(skip_name(url, key, undecodable(err)))
                continue
            captions.append(caption)
            if ids is not None:
                kept_ids.append(ids[row])
        kept = len(images)
        self.skips.add(n - kept, bad)
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
        extra = {} if ids is None else {"sample_id": np.asarray(kept_ids, np.int64)}
        if self.decode_on_worker:
            jpeg_arr = np.empty(kept, dtype=object)
            jpeg_arr[:] = images
            return {
                "jpeg": jpeg_arr,
                "crop": np.asarray(boxes, np.int64).reshape(kept, 4),
                "flip": np.asarray(flips, bool),
                "text": tokens,
                "skipped": skipped,
                **extra,
            }
        image_arr = batch_images if kept == n else batch_images[:kept].copy()
        return {"image": image_arr, "text": tokens, "skipped": skipped, **extra}


def _columns(samples: list[dict], with_ids: bool = False) -> dict[str, list]:
    """Samples -> the column dict :class:`ImageTextDecoder` takes (``None`` where missing)."""
    keys = ("__key__", "__url__", "jpg", "txt") + (("__id__",) if with_ids else ())
    return {k: [s.get(k) for s in samples] for k in keys}


class FusedShardDecoder:
    """``map_batches`` callable of the fused reader (one per actor): rows of shard paths ->
    batches of :class:`ImageTextDecoder`'s columns, at most ``batch_size`` samples each (the
    last batch of a shard also carries its truncation marker, so the skip lands in a column).
    With ``n_shards`` (the resolved list's length) every sample gets a ``sample_id``, and the
    samples the run's data plan (``plan``, :mod:`wsss_ray.data.position`) records as consumed
    before a resume are passed over without decoding."""

    def __init__(
        self,
        filesystem: Any,
        batch_size: int,
        shuffle_files: bool = False,
        plan: str | None = None,
        n_shards: int = 0,
        **decoder_kwargs: Any,
    ):
        from wsss_ray.data.position import PlanReader

        self.fs = filesystem
        self.batch_size = max(1, int(batch_size))
        self.shuffle = shuffle_files
        self.rng = np.random.default_rng()
        self.decoder = ImageTextDecoder(**decoder_kwargs)
        self.n_shards = int(n_shards)
        self.plan = PlanReader(plan, self.n_shards)
        self._opened = True

    def samples(self, path: str) -> Iterator[dict]:
        """The samples of one tar; an unreadable file counts as a corrupt shard."""
        self._opened = True
        try:
            stream = self.fs.open_input_stream(path)
        except OSError as err:
            log.warning("shard %s cannot be opened (%s); it is skipped", path, err)
            self._opened = False
            yield {"__key__": TRUNCATED_KEY, "__url__": path}
            return
        with stream:
            yield from iter_tar_samples(stream, path)

    def shard(self, path: str, shard: int, pass_: int) -> Iterator[dict[str, np.ndarray]]:
        """The decoded batches of one tar (``shard`` < 0: no sample ids, nothing passed over)."""
        from wsss_ray.data.position import MAX_INDEX, pack

        ids = shard >= 0 and self.n_shards > 0
        base = int(pack(pass_, shard, self.n_shards, 0)) if ids else 0
        if ids and self.plan.fully_consumed(pass_, shard):
            return
        done = self.plan.consumed(pass_, shard).tolist() if ids else []
        rows: list[dict] = []
        index, j, whole = 0, 0, True
        for sample in self.samples(path):
            if sample["__key__"] == TRUNCATED_KEY:
                whole = False
                rows.append(sample)  # the marker rides with the shard's last batch
                continue
            this, index = index, index + 1
            while j < len(done) and done[j][1] <= this:
                j += 1
            if j < len(done) and done[j][0] <= this:
                continue  # consumed before the resume
            if ids:
                if this >= MAX_INDEX:
                    raise ValueError(f"{path} holds more than {MAX_INDEX} samples: split it")
                sample["__id__"] = base | this
            if len(rows) >= self.batch_size:
                yield self.decoder(_columns(rows, ids))
                rows = []
            rows.append(sample)
        if rows:
            yield self.decoder(_columns(rows, ids))
        if ids and whole and self._opened:
            self.plan.report_size(shard, index)

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        paths = list(batch["path"])  # one block: many shards (see shard_path_dataset)
        shards = batch.get("shard", np.full(len(paths), -1))
        passes = batch.get("pass", np.zeros(len(paths), np.int64))
        order = range(len(paths))
        if self.shuffle:
            order = self.rng.permutation(len(paths))
        self.plan.refresh()
        for i in order:
            yield from self.shard(str(paths[i]), int(shards[i]), int(passes[i]))


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
    plan: str | None = None,
):
    """The training dataset: tolerant read -> decode/crop/tokenize on a CPU actor pool
    (``skip_counter``: the name from :func:`wsss_ray.data.skips.start_skip_counter`;
    ``decode_device="cuda"``: the actors only parse, the train worker decodes on its GPU;
    ``reader``: ``fused`` (each actor reads its own tars, see the module docstring) or
    ``read_webdataset`` (read tasks, raw bytes through the object store); ``passes``: epochs
    per execution, fused reader only: one actor-pool start-up per ``passes`` epochs; ``seed``: the
    shard order of each pass, :func:`shard_order`; ``num_blocks``: blocks of the fused reader's
    shard list, 0 = four per decode actor; ``plan``: the run's data plan actor,
    :mod:`wsss_ray.data.position`: exact mid-epoch resume, fused reader only)."""
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
        tars, fs = resolve_shards(paths)
        ds = shard_list_dataset(tars, shuffle_files, passes, seed, num_blocks=blocks)
        kwargs = {"filesystem": fs, "batch_size": batch_size, "shuffle_files": shuffle_files}
        if plan:  # sample ids, and the samples consumed before a resume passed over
            import ray

            from wsss_ray.data.position import digest, plan_handle

            kwargs.update(plan=plan, n_shards=len(tars))
            ray.get(plan_handle(plan).configure.remote(digest(tars), len(tars)))
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
