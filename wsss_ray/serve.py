"""Ray Serve: a trained model behind HTTP, with dynamic request batching.

    serve run wsss_ray.serve:app checkpoint=outputs/demo/ray_results/pgseg_tiny
    curl --data-binary @photo.jpg "http://127.0.0.1:8000/segment?classes=cat,dog,sky"

- ``POST /segment?classes=a,b,c`` with the encoded image as the body (JPEG, PNG, ...), or a
  JSON body ``{"image": <base64>, "classes": [...] or "a,b,c"}`` (for long class lists, which a
  URL cannot carry), answers JSON:
  ``classes`` (index 0 = background), ``areas`` (class -> fraction), ``size``, ``mask_png`` and
  ``overlay_jpg`` (base64). Requests that arrive together are segmented as one batch
  (``@serve.batch``), grouped by class list.
- ``GET /`` is a small page: pick an image, type class names, see the overlay.
- ``GET /healthz`` answers ``ok``.

Bad input gets a 4xx and a one-line reason, never a crashed replica: an empty body (400), not
an image (415), more than ``max_bytes`` (413), more than ``max_pixels`` pixels, a decompression
bomb included (413, checked from the header before decoding), no class names or more than
:data:`wsss_ray.inference.segmenter.MAX_CLASSES` (400), classes given to a VPL model that has
others (400).

Builder arguments (``key=value`` after ``serve run``, or ``args`` in a Serve config file, see
``cluster/kuberay/rayservice_segment.yaml``): ``checkpoint`` (required; anything
``Segmenter.from_checkpoint`` takes), ``classes`` (default list), ``config``, ``size``,
``bg_thresh``, ``replicas`` (1), ``gpus`` (per replica, 0), ``max_batch_size`` (8),
``batch_wait_s`` (0.02), ``max_bytes`` (20 MB), ``max_pixels`` (25 MP).
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

from ray import serve

MAX_BYTES = 20 * 1024 * 1024
MAX_PIXELS = 25_000_000
PAGE = Path(__file__).parent / "inference" / "page.html"


class BadInput(ValueError):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


def decode_image(data: bytes, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS):
    """H x W x 3 uint8 from encoded bytes, or :class:`BadInput` with the status to answer."""
    import numpy as np
    from PIL import Image, ImageOps

    if not data:
        raise BadInput(400, "empty body: send the image bytes")
    if len(data) > max_bytes:
        raise BadInput(413, f"{len(data) / 1e6:.1f} MB is over the {max_bytes / 1e6:.0f} MB limit")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise BadInput(
                    413,
                    f"{w} x {h} = {w * h / 1e6:.1f} MP is over the {max_pixels / 1e6:.0f} MP limit",
                )
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except BadInput:
        raise
    except Image.DecompressionBombError:
        limit = 2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6
        raise BadInput(413, f"a decompression bomb: over {limit:.0f} MP claimed") from None
    except Exception as err:  # noqa: BLE001 - any decoder failure is the client's input
        raise BadInput(415, f"not an image PIL can read ({type(err).__name__})") from None


@serve.deployment
class SegmentService:
    """One replica: the Segmenter loaded once; see the module docstring."""

    def __init__(self, checkpoint: str, options: dict[str, Any]):
        from wsss_ray.inference.segmenter import Segmenter

        self.seg = Segmenter.from_checkpoint(
            checkpoint,
            config=options.get("config"),
            size=options.get("size", ""),
            bg_thresh=options.get("bg_thresh"),
        )
        self.default = options.get("classes") or None
        self.max_bytes = int(options.get("max_bytes", MAX_BYTES))
        self.max_pixels = int(options.get("max_pixels", MAX_PIXELS))
        self.segment_batch.set_max_batch_size(int(options.get("max_batch_size", 8)))
        self.segment_batch.set_batch_wait_timeout_s(float(options.get("batch_wait_s", 0.02)))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def segment_batch(self, items: list[tuple[Any, tuple | None]]) -> list[Any]:
        """Segment the requests that arrived together, one model call per class list."""
        out: list[Any] = [None] * len(items)
        groups: dict[tuple | None, list[int]] = {}
        for i, (_, names) in enumerate(items):
            groups.setdefault(names, []).append(i)
        for names, idx in groups.items():
            try:
                results = self.seg.predict(
                    [items[i][0] for i in idx], list(names) if names else None
                )
            except ValueError as err:
                results = [BadInput(400, str(err))] * len(idx)
            for i, r in zip(idx, results):
                out[i] = r
        return out

    def _classes(self, raw: Any) -> tuple | None:
        from wsss_ray.inference.segmenter import clean_class_names

        if raw is None:  # no ?classes=: the default list
            if self.default:
                raw = self.default
            elif self.seg.kind == "pgseg" and not self.seg.class_names:
                raise BadInput(400, "give class names: ?classes=cat,dog,sky")
            else:
                return None
        try:
            return tuple(clean_class_names(raw))
        except ValueError as err:
            raise BadInput(400, str(err)) from None

    async def __call__(self, request):
        from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse

        path = request.url.path.rstrip("/") or "/"
        try:
            if request.method == "GET" and path == "/":
                return HTMLResponse(PAGE.read_text())
            if request.method == "GET" and path == "/healthz":
                return PlainTextResponse("ok")
            if path != "/segment":
                return JSONResponse({"error": f"no such endpoint: {path}"}, status_code=404)
            if request.method != "POST":
                return JSONResponse({"error": "POST an image to /segment"}, status_code=405)
            data, raw = await self._read(request)
            names = self._classes(raw)
            image = decode_image(data, self.max_bytes, self.max_pixels)
            result = await self.segment_batch((image, names))
            if isinstance(result, BadInput):
                raise result
            return JSONResponse(self._answer(image, result))
        except BadInput as err:
            return JSONResponse({"error": str(err)}, status_code=err.status)
        except Exception as err:  # noqa: BLE001 - a bug answers 500, the replica lives on
            return JSONResponse({"error": f"internal error: {type(err).__name__}"}, status_code=500)

    async def _read(self, request) -> tuple[bytes, Any]:
        body = await request.body()
        if request.headers.get("content-type", "").startswith("application/json"):
            try:
                doc = json.loads(body)
                image = base64.b64decode(doc.get("image", ""), validate=True)
            except (ValueError, AttributeError, TypeError) as err:
                raise BadInput(
                    400, f"want JSON {{'image': base64, 'classes': [...]}}: {err}"
                ) from None
            return image, doc.get("classes")
        return body, request.query_params.get("classes")

    def _answer(self, image, result) -> dict[str, Any]:
        from wsss_ray.inference.render import label_png

        buf = io.BytesIO()
        self.seg.overlay(image, result).save(buf, format="JPEG", quality=88)
        return {
            **result.to_json(),
            "mask_png": base64.b64encode(label_png(result.mask)).decode(),
            "overlay_jpg": base64.b64encode(buf.getvalue()).decode(),
        }


def app(args: dict[str, str]) -> Any:
    """The application builder of ``serve run wsss_ray.serve:app checkpoint=...``."""
    args = dict(args)
    if not args.get("checkpoint"):
        raise ValueError("give checkpoint=<run folder, checkpoint, package or models:/ URI>")
    options: dict[str, Any] = {k: v for k, v in args.items() if k != "checkpoint"}
    for key in ("bg_thresh", "batch_wait_s"):
        if key in options:
            options[key] = float(options[key])
    gpus = float(options.pop("gpus", 0))
    replicas = int(options.pop("replicas", 1))
    return SegmentService.options(
        num_replicas=replicas, ray_actor_options={"num_gpus": gpus, "num_cpus": 1}
    ).bind(args["checkpoint"], options)
