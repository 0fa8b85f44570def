"""``benchmark.py scale``: what the shard count costs before the first step and in memory.

At 24M pairs a run has 2,400-24,000 shards. The fused reader's input is the shard list, listed
``data.passes_per_execution`` times; it used to be one Ray block per shard per pass (1.2 ms and
33 KB each on the driver, copied into Ray's split coordinator and Train's controllers), which
made start-up grow with the shard count. This benchmark measures, for each shard count (30,
3,000, 30,000 by default, tiny one-sample shards so that reading them costs little):

- **start-up**: seconds from building the training dataset (``image_text_dataset``, fused
  reader, ``passes`` passes) to its first batch, and the driver's RSS growth by then;
- **executions**: the same dataset (one pass) consumed through ``streaming_split(2)`` as two train
  workers do, ``executions`` times: the driver's RSS and the unique memory (USS) of Ray's actor
  processes (split coordinator, decode actors) after each, to show they stay flat.

With ``baseline_shards`` it also times the old layout (one block per shard and pass) at that
count in the same run, for the ratio. Targets: start-up at the largest count <= 1.5x that at the
smallest, driver and actor memory within +100 MB of the smallest, flat across executions.
"""

from __future__ import annotations

import io
import os
import tarfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from wsss_ray.bench.common import Report, Target, say, start_bench_ray

MB = 1024 * 1024


@dataclass
class ScaleBenchConfig:
    shard_counts: tuple[int, ...] = (30, 3000, 30000)
    passes: int = 10
    executions: int = 3
    actors: int = 2
    baseline_shards: int = 3000
    data_dir: str = "outputs/bench/scale"


def _template_tar() -> bytes:
    """One tar holding one sample (a 16-px JPEG and a caption)."""
    from PIL import Image

    jpg = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 40, 40)).save(jpg, "JPEG")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in (("s.jpg", jpg.getvalue()), ("s.txt", b"a red square")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_shards(folder: Path, n: int) -> Path:
    """``n`` one-sample tars in ``folder`` (kept between runs)."""
    folder.mkdir(parents=True, exist_ok=True)
    have = len(list(folder.glob("*.tar")))
    if have != n:
        data = _template_tar()
        for i in range(n):
            (folder / f"{i:06d}.tar").write_bytes(data)
    return folder


def _rss() -> float:
    import psutil

    return psutil.Process().memory_info().rss / MB


def actor_uss() -> dict[str, float]:
    """MB of unique memory per Ray actor kind (``ray::Name...`` processes of this process's
    embedded Ray, idle workers left out): what the split coordinator and the decode actors
    hold."""
    import psutil

    out: dict[str, float] = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(proc.cmdline())
            if not cmd.startswith("ray::") or cmd.startswith("ray::IDLE"):
                continue
            kind = cmd[5:].split("(")[0].split(" ")[0].split(".")[0] or "worker"
            out[kind] = out.get(kind, 0.0) + proc.memory_full_info().uss / MB
        except (psutil.Error, OSError):
            continue
    return out


def _dataset_before(folder: Path, passes: int, actors: int):
    """The fused reader's input as it was built before: ``from_items`` with one block per
    shard and pass (for the baseline row)."""
    import ray.data
    from ray.data import ActorPoolStrategy

    from wsss_ray.data.webdataset import FusedShardDecoder, resolve_shards

    tars, fs = resolve_shards([str(folder)])
    rows = [{"path": p} for p in tars] * passes
    ds = ray.data.from_items(rows, override_num_blocks=len(rows)).randomize_block_order()
    return ds.map_batches(
        FusedShardDecoder,
        fn_constructor_kwargs={"filesystem": fs, "batch_size": 64, **_decoder_kwargs()},
        batch_size=1,
        batch_format="numpy",
        compute=ActorPoolStrategy(min_size=actors, max_size=actors),
        num_cpus=0.5,
    )


def _decoder_kwargs() -> dict[str, Any]:
    return {
        "tokenizer_name": "wsss-tiny",
        "image_size": 16,
        "crop_scale": (1.0, 1.0),
        "hflip": True,
    }


def _dataset(folder: Path, passes: int, actors: int, num_blocks: int = 0):
    from wsss_ray.data.webdataset import image_text_dataset

    return image_text_dataset(
        [str(folder)],
        "wsss-tiny",
        image_size=16,
        crop_scale=(1.0, 1.0),
        batch_size=64,
        actors=(actors, actors),
        cpus_per_actor=0.5,
        passes=passes,
        num_blocks=num_blocks,
    )


def startup(folder: Path, passes: int, actors: int, before: bool = False) -> dict[str, float]:
    """Seconds and driver MB from building the dataset to its first batch (``before``: the
    old one-block-per-shard input)."""
    rss0 = _rss()
    t0 = time.perf_counter()
    ds = _dataset_before(folder, passes, actors) if before else _dataset(folder, passes, actors)
    built = time.perf_counter() - t0
    it = iter(ds.iter_batches(batch_size=1, batch_format="numpy"))
    next(it)
    first = time.perf_counter() - t0
    out = {"build_s": built, "first_batch_s": first, "driver_mb": _rss() - rss0}
    del it, ds
    return out


def _drain(split: Any, counts: list[int], i: int) -> None:
    for batch in split.iter_batches(batch_size=64, batch_format="numpy"):
        counts[i] += len(batch["text"])


def executions(folder: Path, n: int, actors: int) -> list[dict[str, Any]]:
    """One pass, ``n`` executions through ``streaming_split(2)``: memory after each."""
    ds = _dataset(folder, 1, actors)
    splits = ds.streaming_split(2, equal=False)
    rss0 = _rss()
    rows = []
    for e in range(n):
        counts = [0, 0]
        t0 = time.perf_counter()
        threads = [threading.Thread(target=_drain, args=(splits[i], counts, i)) for i in (0, 1)]
        for t in threads:
            t.start()
        uss: dict[str, float] = {}  # the peak of the execution, sampled once a second
        while any(t.is_alive() for t in threads):
            now = actor_uss()
            if sum(now.values()) > sum(uss.values()):
                uss = now
            threads[0].join(timeout=1.0)
        for t in threads:
            t.join()
        rows.append(
            {
                "execution": e + 1,
                "samples": sum(counts),
                "seconds": time.perf_counter() - t0,
                "driver_mb": _rss() - rss0,
                "actors_mb": sum(uss.values()),
                "by_actor_mb": uss,
            }
        )
        say(
            f"  execution {e + 1}: {sum(counts)} samples in {rows[-1]['seconds']:.1f}s, "
            f"driver +{rows[-1]['driver_mb']:.0f} MB, actors {rows[-1]['actors_mb']:.0f} MB"
        )
    return rows


def run(cfg: ScaleBenchConfig, out: str | None = None) -> Report:
    import ray
    from ray.data import DataContext

    report = Report("scale", asdict(cfg))
    base = Path(cfg.data_dir)
    started = not ray.is_initialized()
    start_bench_ray(cfg.actors)
    # Ray Data emits a map's output when it reaches the target block size (128 MB): ~850 real
    # 224-px crops, but ~90,000 of these 16-px samples, which would make "first batch" wait for
    # a whole input block. 1 MB keeps the samples per output block realistic (~700).
    DataContext.get_current().target_max_block_size = MB
    try:
        figures: dict[str, Any] = {}
        warm = write_shards(base / "shards_8", 8)
        startup(warm, 1, cfg.actors)  # imports and the first actor pool, unrecorded
        for n in cfg.shard_counts:
            folder = write_shards(base / f"shards_{n}", n)
            say(f"{n} shards x {cfg.passes} passes")
            s = startup(folder, cfg.passes, cfg.actors)
            say(f"  first batch after {s['first_batch_s']:.2f}s (dataset built in "
                f"{s['build_s']:.2f}s), driver +{s['driver_mb']:.0f} MB")  # fmt: skip
            e = executions(folder, cfg.executions, cfg.actors)
            figures[str(n)] = {"startup": s, "executions": e}
        if cfg.baseline_shards:
            n = cfg.baseline_shards
            folder = write_shards(base / f"shards_{n}", n)
            say(f"before: one block per shard and pass, {n} shards x {cfg.passes} passes")
            b = startup(folder, cfg.passes, cfg.actors, before=True)
            say(f"  first batch after {b['first_batch_s']:.2f}s, driver +{b['driver_mb']:.0f} MB")
            figures["before"] = {"shards": n, "startup": b}
    finally:
        if started:  # a Ray this run joined stays up
            ray.shutdown()
    report.figures = figures
    rows = []
    for n in cfg.shard_counts:
        f = figures[str(n)]
        mem = [x["actors_mb"] for x in f["executions"]]
        rows.append(
            [f"{n:,}", f"{f['startup']['build_s']:.2f}", f"{f['startup']['first_batch_s']:.2f}",
             f"{f['startup']['driver_mb']:+.0f}",
             " / ".join(f"{x['driver_mb']:+.0f}" for x in f["executions"]),
             " / ".join(f"{m:.0f}" for m in mem)]
        )  # fmt: skip
    if "before" in figures:
        b = figures["before"]
        rows.append(
            [f"{b['shards']:,} (before: a block per shard)", f"{b['startup']['build_s']:.2f}",
             f"{b['startup']['first_batch_s']:.2f}", f"{b['startup']['driver_mb']:+.0f}", "", ""]
        )  # fmt: skip
    report.table(
        f"start-up ({cfg.passes} passes) and memory over {cfg.executions} executions (1 pass)",
        ["shards", "dataset built (s)", "first batch (s)", "driver MB at first batch",
         "driver MB after each execution", "actor MB (USS, peak) in each execution"],
        rows,
    )  # fmt: skip
    lo, hi = figures[str(cfg.shard_counts[0])], figures[str(cfg.shard_counts[-1])]
    ratio = hi["startup"]["first_batch_s"] / lo["startup"]["first_batch_s"]
    label = f"{cfg.shard_counts[-1]:,} vs {cfg.shard_counts[0]:,} shards"
    report.targets += [
        Target(f"start-up, {label}", ratio, "<=", 1.5),
        Target(
            f"driver memory at first batch, {label}",
            hi["startup"]["driver_mb"] - lo["startup"]["driver_mb"],
            "<=",
            100,
            " MB",
        ),
        Target(
            f"actor memory (peak) in execution 1, {label}",
            hi["executions"][0]["actors_mb"] - lo["executions"][0]["actors_mb"],
            "<=",
            100,
            " MB",
        ),
        Target(
            f"driver memory growth over {cfg.executions} executions ({cfg.shard_counts[-1]:,})",
            hi["executions"][-1]["driver_mb"] - hi["executions"][0]["driver_mb"],
            "<=",
            100,
            " MB",
        ),
        Target(
            f"actor memory growth over {cfg.executions} executions ({cfg.shard_counts[-1]:,})",
            hi["executions"][-1]["actors_mb"] - hi["executions"][0]["actors_mb"],
            "<=",
            100,
            " MB",
        ),
    ]
    if "before" in figures:
        report.notes.append(
            f"before (a block per shard and pass) at {figures['before']['shards']:,} shards: "
            f"first batch after {figures['before']['startup']['first_batch_s']:.1f}s"
        )
    report.notes.append(f"cpus: {os.cpu_count()}, {cfg.actors} decode actors")
    report.finish(out)
    return report
