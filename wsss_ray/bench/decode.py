"""``benchmark.py decode``: what decoding costs per image on a CPU core and on the GPU, and so
how many CPU cores a GPU node needs per train worker (docs/DATA.md, "Sizing the decode actors").

Measured on the same JPEGs (``source_size`` photos-like images, ``image_size`` crops):

- **CPU decode** (``data.decode_device=cpu``): one core (one torch thread) running the decode
  actors' path, ``ImageTextDecoder._image`` (PIL with draft, RandomResizedCrop, flip): images/s
  per core;
- **CPU parse** (``data.decode_device=cuda``): one core running what the actors still do when the
  GPU decodes: the JPEG header for the size, the crop box and flip, and the tokenizer;
- **GPU decode** (CUDA only): :func:`wsss_ray.data.gpu_decode.decode_crop_batch` on batches of
  ``batch`` JPEGs (batched nvJPEG, crop + antialiased resize + flip on the GPU), synchronised;
- **equality**: GPU crops against the CPU decode of the same boxes (mean and max absolute
  difference in grey levels; JPEG decoders differ by a few levels).

With ``step_rate`` (samples/s of one GPU's training step, e.g. from ``benchmark.py npr``) it
prints the cores each decode path needs per GPU: ``step_rate / per-core rate``.
"""

from __future__ import annotations

import io
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from wsss_ray.bench.common import Report, Target, rounds


@dataclass
class DecodeBenchConfig:
    num_images: int = 256
    source_size: int = 500
    image_size: int = 224
    batch: int = 128
    repeats: int = 3
    step_rate: float = 0.0
    with_step: bool = False  # CUDA: also the vit_s step with and without the decode inside


def photo_jpegs(n: int, side: int, seed: int = 0) -> list[bytes]:
    """``n`` JPEGs (quality 90, ``side`` x 3/4 ``side``) of smooth gradients with shapes and
    mild noise: about the bytes per pixel of web photos (pure noise would be 5x larger)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    h = side * 3 // 4
    yy, xx = np.mgrid[0:h, 0:side].astype(np.float32)
    out = []
    for _ in range(n):
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        t = (xx / side * rng.uniform(0.3, 1) + yy / h * rng.uniform(0.3, 1))[..., None] / 2
        img = c0 * (1 - t) + c1 * t + rng.normal(0, 6, (h, side, 3))
        im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(im)
        for _ in range(4):
            x0, y0 = int(rng.integers(0, side - 40)), int(rng.integers(0, h - 40))
            box = (
                x0,
                y0,
                x0 + int(rng.integers(20, side // 2)),
                y0 + int(rng.integers(20, h // 2)),
            )
            draw.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _decoder(cfg: DecodeBenchConfig, on_worker: bool):
    from wsss_ray.data.webdataset import ImageTextDecoder

    return ImageTextDecoder(
        "ViT-B-16", cfg.image_size, (0.08, 1.0), True, seed=0, decode_on_worker=on_worker
    )


def cpu_rates(jpegs: list[bytes], cfg: DecodeBenchConfig) -> dict[str, float]:
    """Images/s on one core: the CPU decode path, and the parse + tokenize path."""
    captions = ["a photo of a cat sitting on a wooden table next to a cup"] * len(jpegs)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dec = _decoder(cfg, False)
        t0 = time.perf_counter()
        for raw in jpegs:
            dec._image(raw)
        t_dec = time.perf_counter() - t0
        parse = _decoder(cfg, True)
        t0 = time.perf_counter()
        for raw in jpegs:
            parse._params(raw)
        t_parse = time.perf_counter() - t0
        t0 = time.perf_counter()
        dec.tokenizer(captions)
        t_tok = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    n = len(jpegs)
    return {
        "decode_per_core": n / t_dec,
        "decode_tokenize_per_core": n / (t_dec + t_tok),
        "parse_tokenize_per_core": n / (t_parse + t_tok),
    }


def _boxes(jpegs: list[bytes], cfg: DecodeBenchConfig) -> tuple[torch.Tensor, torch.Tensor]:
    parse = _decoder(cfg, True)
    params = [parse._params(raw) for raw in jpegs]
    return (
        torch.tensor([p[1] for p in params], dtype=torch.int64),
        torch.tensor([p[2] for p in params], dtype=torch.bool),
    )


def _timed(fn, reps: int = 1) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return time.perf_counter() - t0


def gpu_rate(jpegs: list[bytes], cfg: DecodeBenchConfig) -> dict[str, float]:
    """Images/s on CUDA (batches of ``cfg.batch``): nvJPEG alone, and ``decode_crop_batch``
    with each crop method; the ``roi_align`` crops (CUDA's default) against the CPU's decode of
    the same boxes."""
    from torchvision.io import ImageReadMode, decode_jpeg

    from wsss_ray.data.gpu_decode import decode_crop_batch

    crops, flips = _boxes(jpegs, cfg)
    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs]
    dev = torch.device("cuda")
    b = cfg.batch
    chunks = [
        (tensors[i : i + b], crops[i : i + b], flips[i : i + b]) for i in range(0, len(tensors), b)
    ]

    def nvjpeg() -> None:
        for t, _, _ in chunks:
            decode_jpeg(t, mode=ImageReadMode.RGB, device=dev)

    def method(name: str):
        def go() -> None:
            for t, c, f in chunks:
                decode_crop_batch(t, c, f, cfg.image_size, dev, name)

        return go

    out = {}
    for name, fn in (
        ("nvjpeg_only", nvjpeg),
        ("loop", method("loop")),
        ("roi_align", method("roi_align")),
    ):
        fn()  # warm-up
        out[f"gpu_{name}_images_per_s"] = len(tensors) / _timed(fn)
    k = min(len(tensors), 64)
    for name in ("loop", "roi_align"):
        gpu = decode_crop_batch(tensors[:k], crops[:k], flips[:k], cfg.image_size, dev, name)
        cpu = decode_crop_batch(tensors[:k], crops[:k], flips[:k], cfg.image_size, "cpu", "loop")
        diff = (gpu.cpu().int() - cpu.int()).abs().float()
        out[f"{name}_mean_abs_diff"] = diff.mean().item()
        out[f"{name}_p999_abs_diff"] = diff.flatten()[:8_000_000].quantile(0.999).item()
    return out


def step_overhead(
    jpegs: list[bytes], cfg: DecodeBenchConfig, steps: int = 10, device: str = "cuda"
) -> dict[str, float]:
    """CUDA only: seconds per vit_s PGSeg training step (bf16 autocast, fused AdamW) on a batch
    already on the GPU, and with the batch's GPU decode inside the step (``_prepare`` of the
    JPEG columns, as a train worker with ``data.decode_device=cuda`` runs it)."""
    from wsss_ray.config import PGSegPretrainConfig, load_config
    from wsss_ray.data.gpu_decode import jpeg_batch_tensors
    from wsss_ray.tasks import build_task
    from wsss_ray.train.loop import _prepare

    b = cfg.batch
    overrides = ["model.size=vit_s", f"data.image_size={cfg.image_size}", "train.max_steps=1"]
    pcfg = load_config(PGSegPretrainConfig, None, overrides)
    dev = torch.device(device)
    task = build_task(pcfg).to(dev).train()
    opt = torch.optim.AdamW(task.parameters(), lr=1e-5, fused=dev.type == "cuda")
    raw = (jpegs * (b // len(jpegs) + 1))[:b]
    rows = {"__key__": [str(i) for i in range(b)], "jpg": raw, "txt": [b"a photo of a cat"] * b}
    jpeg_batch = jpeg_batch_tensors(_decoder(cfg, True)(rows))
    ready = _prepare(dict(jpeg_batch), pcfg, torch.bfloat16, dev)

    def step(batch: dict) -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16):  # fp32 weights and buffers
            losses, _ = task.training_forward(batch)
            total = sum(v for k, v in losses.items() if k.endswith("_loss"))
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def predecoded() -> None:
        for _ in range(steps):
            step(ready)

    def decoding() -> None:
        for _ in range(steps):
            step(_prepare(dict(jpeg_batch), pcfg, torch.bfloat16, dev))

    predecoded(), decoding()  # warm-up
    t_ready, t_dec = _timed(predecoded) / steps, _timed(decoding) / steps
    return {"step_s": t_ready, "step_with_decode_s": t_dec}


def run(cfg: DecodeBenchConfig, out: str | None = None) -> Report:
    report = Report("decode", asdict(cfg))
    jpegs = photo_jpegs(cfg.num_images, cfg.source_size)
    cuda = torch.cuda.is_available()

    def rates() -> dict[str, float]:
        got = {**cpu_rates(jpegs, cfg), **(gpu_rate(jpegs, cfg) if cuda else {})}
        if cuda and cfg.with_step:
            got.update(step_overhead(jpegs, cfg))
        return got

    setup = f"{cfg.num_images} JPEGs of {cfg.source_size} px, crops of {cfg.image_size}"
    stats = rounds({"decode": rates}, cfg, setup)["decode"]
    report.figures = dict(stats)
    rows = [
        ["CPU decode + crop (decode_device=cpu), one core", stats["decode_per_core"].fmt()],
        ["  + tokenize, one core", stats["decode_tokenize_per_core"].fmt()],
        ["CPU parse + tokenize (decode_device=cuda), one core",
         stats["parse_tokenize_per_core"].fmt()],
    ]  # fmt: skip
    if cuda:
        for name, label in (
            ("nvjpeg_only", "nvJPEG alone"),
            ("loop", "crop per image (loop)"),
            ("roi_align", "crops in one roi_align (default)"),
        ):
            st = stats[f"gpu_{name}_images_per_s"]
            rows.append(
                [
                    f"GPU decode, batches of {cfg.batch}: {label}",
                    st.fmt(),
                    f"{1e3 * cfg.batch / st.median:.1f}",
                ]
            )
        for name in ("loop", "roi_align"):
            report.notes.append(
                f"GPU {name} vs CPU crops of the same boxes: mean |diff| "
                f"{stats[f'{name}_mean_abs_diff'].median:.2f}, 99.9th percentile "
                f"{stats[f'{name}_p999_abs_diff'].median:.0f} grey levels"
            )
    for row in rows[:3]:
        row.append("")  # per-batch time: GPU rows only
    report.table("images/s", ["path", "images/s", f"ms per batch of {cfg.batch}"], rows)
    if "step_s" in stats:
        ready, dec = stats["step_s"], stats["step_with_decode_s"]
        report.table(
            f"vit_s PGSeg step (bf16 autocast, fused AdamW), batch {cfg.batch}",
            ["batch", "seconds per step", "samples/s"],
            [["already on the GPU", ready.fmt(), f"{cfg.batch / ready.median:,.0f}"],
             ["decoded on the GPU in the step", dec.fmt(), f"{cfg.batch / dec.median:,.0f}"]],
        )  # fmt: skip
        report.notes.append(
            f"the GPU decode costs the step {100 * (dec.median / ready.median - 1):.0f}%"
        )
    if cfg.step_rate > 0:
        need_cpu = cfg.step_rate / stats["decode_tokenize_per_core"].median
        need_gpu = cfg.step_rate / stats["parse_tokenize_per_core"].median
        report.table(
            f"decode cores per GPU at {cfg.step_rate:.0f} samples/s per GPU",
            ["decode_device", "cores per GPU (step_rate / per-core rate)"],
            [["cpu", f"{need_cpu:.1f}"], ["cuda", f"{need_gpu:.1f}"]],
        )
        report.figures["cores_per_gpu"] = {"cpu": need_cpu, "cuda": need_gpu}
    report.targets.append(
        Target(
            "GPU decode vs one CPU core",
            stats["gpu_roi_align_images_per_s"].median / stats["decode_per_core"].median
            if cuda
            else None,
            ">=",
            10,
            note="CUDA only",
        )
    )
    report.finish(out)
    return report
