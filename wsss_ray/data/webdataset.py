"""Ray Data pipeline for WebDataset image-text shards.

``read_webdataset(decoder=None, shuffle="files")`` streams raw bytes (never decoding in the read
task); ``map_batches`` on a CPU actor pool decodes the JPEG, applies RandomResizedCrop + flip and
tokenises the caption with open_clip's tokenizer, emitting numeric columns only:

- ``image``: uint8 crops, B x H x W x 3. Normalisation to float happens on the train worker
  (:func:`normalize_images`), so 4x fewer bytes cross the object store than with float32.
- ``text``: int64 token ids, B x context_length.
- ``skipped``: per output batch, the number of input rows that were dropped (in the first row,
  zeros elsewhere); the train loop sums it into the ``data/skipped`` metric.

Bad samples (undecodable image, missing or empty caption, the tail of a truncated tar) are
dropped and counted, never fatal. Ray's reader fails the whole read task on a truncated tar, so
:class:`TolerantWebDatasetDatasource` stops that shard at the break, keeps what came before and
emits a marker row the decoder counts.
"""

from __future__ import annotations

import io
import logging
import tarfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

TRUNCATED_KEY = "__truncated__"


# ------------------------------------------------------------------------------- reading
def _tolerant_datasource_cls():
    """Built lazily so this module imports without Ray for the pure decode functions."""
    from ray.data._internal.datasource import webdataset_datasource as wdsrc

    class TolerantWebDatasetDatasource(wdsrc.WebDatasetDatasource):
        """Ray's WebDataset reader, but a truncated or corrupt tar ends its shard early instead
        of failing the read task: earlier samples are kept, a marker row is counted."""

        def _read_stream(self, stream: Any, path: str) -> Iterator[Any]:
            import pandas as pd

            broken: list[str] = []

            def files() -> Iterator[dict]:
                try:
                    yield from wdsrc._tar_file_iterator(stream, fileselect=self.fileselect)
                except (tarfile.TarError, EOFError, OSError, ValueError) as err:
                    broken.append(f"{type(err).__name__}: {err}")

            rows: list[dict] = []
            for sample in wdsrc._group_by_keys(
                files(), meta={"__url__": path}, suffixes=self.suffixes
            ):
                rows.append(sample)
                if len(rows) >= wdsrc.WEBDATASET_READ_CHUNK_SIZE:
                    yield pd.DataFrame.from_records(rows)
                    rows = []
            if broken:
                log.warning(
                    "shard %s is truncated or corrupt (%s); the rest of it is skipped",
                    path,
                    broken[0],
                )
                rows.append({"__key__": TRUNCATED_KEY, "__url__": path})
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


# ------------------------------------------------------------------------------ decoding
def _as_bytes(value: Any) -> bytes | None:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    return None


class ImageTextDecoder:
    """``map_batches`` callable (one per actor): raw WebDataset rows -> numeric columns."""

    def __init__(
        self,
        tokenizer_name: str,
        image_size: int,
        crop_scale: tuple[float, float],
        hflip: bool,
        seed: int | None = None,
        context_length: int | None = None,
        skip_counter: str | None = None,
    ):
        from torchvision.transforms import v2

        from wsss_ray.data.skips import SkipReporter
        from wsss_ray.models.clip import tokenizer

        self.tokenizer = tokenizer(tokenizer_name, context_length)
        self.image_size = image_size
        ops: list[Any] = [v2.RandomResizedCrop(image_size, scale=tuple(crop_scale), antialias=True)]
        if hflip:
            ops.append(v2.RandomHorizontalFlip())
        self.transform = v2.Compose(ops)
        if seed is not None:
            torch.manual_seed(seed)
        self.skips = SkipReporter(skip_counter)

    def _image(self, raw: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(raw)) as im:
            im.draft("RGB", (self.image_size, self.image_size))  # DCT-domain downscale: cheap
            rgb = im.convert("RGB")
        t = torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)  # 3 x H x W uint8
        return self.transform(t).permute(1, 2, 0).numpy()  # H x W x 3

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["__key__"])
        jpgs = batch.get("jpg", [None] * n)
        txts = batch.get("txt", [None] * n)
        images, captions = [], []
        for raw_img, raw_txt in zip(jpgs, txts):
            img_bytes, txt_bytes = _as_bytes(raw_img), _as_bytes(raw_txt)
            if img_bytes is None or txt_bytes is None:
                continue
            caption = txt_bytes.decode("utf-8", errors="replace").strip()
            if not caption:
                continue
            try:
                images.append(self._image(img_bytes))
            except Exception:  # noqa: BLE001 - any undecodable image is skipped and counted
                continue
            captions.append(caption)
        kept = len(images)
        self.skips.add(n - kept)
        skipped = np.zeros(kept, np.int64)
        if kept:
            skipped[0] = n - kept
            tokens = self.tokenizer(captions).numpy().astype(np.int64)
            image_arr = np.stack(images)
        else:
            if n:
                log.warning("a whole batch of %d samples was undecodable", n)
            ctx = getattr(self.tokenizer, "context_length", 77)
            tokens = np.zeros((0, ctx), np.int64)
            image_arr = np.zeros((0, self.image_size, self.image_size, 3), np.uint8)
        return {"image": image_arr, "text": tokens, "skipped": skipped}


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
):
    """The training dataset: tolerant read -> decode/crop/tokenize on a CPU actor pool
    (``skip_counter``: the name from :func:`wsss_ray.data.skips.start_skip_counter`)."""
    from ray.data import ActorPoolStrategy

    ds = read_shards(paths)
    return ds.map_batches(
        ImageTextDecoder,
        fn_constructor_kwargs={
            "tokenizer_name": tokenizer_name,
            "image_size": image_size,
            "crop_scale": tuple(crop_scale),
            "hflip": hflip,
            "context_length": context_length,
            "skip_counter": skip_counter,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(min_size=actors[0], max_size=actors[1]),
        num_cpus=cpus_per_actor,
    )


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
