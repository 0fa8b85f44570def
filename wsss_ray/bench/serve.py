"""``benchmark.py serve``: requests/s and p50 / p99 latency of ``POST /segment`` on the Ray Serve
app under a bounded concurrent load on 127.0.0.1, against the Segmenter called directly in this
process (the ceiling: no HTTP, no JSON, no base64, no batching queue), interleaved.

The model is an untrained PGSeg (``tiny_seg`` on CPU) written as a segmenter package: what is
measured is the serving path around the model, whose own cost is the same in both.
"""

from __future__ import annotations

import io
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np

from wsss_ray.bench.common import Report, Target, paired_ratio, rounds

CLASSES = "circle,square,triangle"


@dataclass
class ServeBenchConfig:
    size: str = "tiny_seg"
    image_size: int = 96
    requests: int = 48
    concurrency: int = 4
    max_batch_size: int = 4
    repeats: int = 3
    warmup: int = 1


def _jpeg(side: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _figures(n: int, total: float, lat: list[float]) -> dict[str, float]:
    """requests/s and p50 / p99 latency (ms) of one round."""
    return {
        "rps": n / total,
        "p50_ms": 1e3 * float(np.percentile(lat, 50)),
        "p99_ms": 1e3 * float(np.percentile(lat, 99)),
    }


def run(cfg: ServeBenchConfig, out: str | None = None) -> Report:
    import requests
    import torch
    from ray import serve

    from wsss_ray.bench.common import start_bench_ray
    from wsss_ray.inference.segmenter import Segmenter, _pgseg_spec
    from wsss_ray.models.pgseg import PGSeg
    from wsss_ray.serve import app

    report = Report("serve", asdict(cfg))
    torch.manual_seed(0)
    model = PGSeg(cfg.size)
    seg = Segmenter(
        "pgseg", _pgseg_spec(cfg.size, "quick_gelu", None), {"model": model.state_dict()}
    )
    body = _jpeg(cfg.image_size)
    tmp = tempfile.TemporaryDirectory()
    package = seg.save(f"{tmp.name}/segmenter")
    start_bench_ray(2)
    port = _port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        app({"checkpoint": str(package), "max_batch_size": str(cfg.max_batch_size)}),
        route_prefix="/",
    )
    url = f"http://127.0.0.1:{port}/segment?classes={CLASSES}"
    session = requests.Session()

    def direct() -> dict[str, float]:
        lat = []
        t0 = time.perf_counter()
        for _ in range(cfg.requests):
            t = time.perf_counter()
            seg.predict([body], CLASSES)
            lat.append(time.perf_counter() - t)
        total = time.perf_counter() - t0
        return _figures(cfg.requests, total, lat)

    def served() -> dict[str, float]:
        def one(_i: int) -> float:
            t = time.perf_counter()
            r = session.post(url, data=body, timeout=120)
            r.raise_for_status()
            return time.perf_counter() - t

        t0 = time.perf_counter()
        with ThreadPoolExecutor(cfg.concurrency) as pool:
            lat = list(pool.map(one, range(cfg.requests)))
        total = time.perf_counter() - t0
        return _figures(cfg.requests, total, lat)

    try:
        setup = f"serve bench: {cfg.requests} requests, concurrency {cfg.concurrency}, {url}"
        res = rounds({"direct": direct, "serve": served}, cfg, setup)
    finally:
        serve.shutdown()
        tmp.cleanup()
    ratio = paired_ratio(res["serve"]["rps"], res["direct"]["rps"])
    rows = [
        [name, r["rps"].fmt(), r["p50_ms"].fmt(), r["p99_ms"].fmt()]
        for name, r in (
            ("Segmenter in-process (ceiling)", res["direct"]),
            ("Ray Serve /segment", res["serve"]),
        )
    ]
    report.table(
        f"{cfg.size}, {cfg.image_size}-px JPEG, {cfg.requests} requests, concurrency "
        f"{cfg.concurrency} (serve), max_batch_size {cfg.max_batch_size}",
        ["path", "requests/s", "p50 latency (ms)", "p99 latency (ms)"],
        rows,
    )
    report.table("ratio", ["serve / ceiling requests/s"], [[ratio.fmt()]])
    report.figures = {"direct": res["direct"], "serve": res["serve"], "ratio": ratio}
    report.targets.append(
        Target(
            "Serve keeps most of the in-process rate",
            ratio.median if ratio.values else None,
            ">=",
            0.5,
            note="HTTP + JSON + base64 + the batching queue around the same model",
        )
    )
    report.finish(out)
    return report
