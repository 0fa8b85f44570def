"""``benchmark data``: images/s of the training data pipeline against two baselines.

- **ours**: the Ray Data pipeline the trainer uses (``wsss_ray.data.webdataset``: tolerant
  ``read_webdataset`` of raw bytes -> ``map_batches`` on a CPU actor pool of ``cpus`` actors
  doing JPEG decode + RandomResizedCrop + flip + tokenize), consumed through
  ``streaming_split(1)[0].iter_torch_batches`` exactly as a Ray Train worker consumes its shard;
- **ours (fused)**: the same with ``data.reader=fused``: a dataset of shard paths mapped on the
  same actor pool, each actor reading its own tars (no read tasks, no raw bytes in the object
  store). The targets are evaluated on the row of the default reader (``DataConfig().reader``);
- **plain**: ``webdataset.WebDataset`` on the same shards with the same decode callable
  (:class:`~wsss_ray.data.webdataset.ImageTextDecoder`) in a torch ``DataLoader`` with
  ``num_workers=cpus``: the same work with the same number of processes;
- **ceiling**: the one-core rate of JPEG decode + crop on bytes already in memory, times the
  cores: what the cores could do with no pipeline at all.

Each pass reads every image once. The headline rate is the steady state, from the arrival of the
producers' first outputs (the parallel producers' first batches arrive together after start-up:
``cpus`` batches for plain, ``cpus x decode_batch / batch`` consumer batches for ours) to the last;
start-up (worker processes importing torch, the actor pool, Ray Data's coordinator) is paid once
per pass, i.e. per epoch, and is reported separately as the time to the first batch. For ours,
:class:`~wsss_ray.bench.common.CpuMeter` also accounts the steady state's CPU seconds per process
group (decode actors, split coordinator, consumer, Ray's daemons, read tasks): where the cores go,
and the decode actors' images per CPU-second against the ceiling's one-core rate. The shards
are the synthetic shapes world written as real WebDataset tars by
:func:`wsss_ray.data.synthetic.ensure_synthetic_shards` (kept under ``--data-dir``).
"""

from __future__ import annotations

import tarfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from wsss_ray.bench.common import (
    CpuMeter,
    Report,
    Target,
    consume,
    paired_ratio,
    rate_cells,
    rounds,
    say,
    stat_row,
)

TOKENIZER = "ViT-B-16"


@dataclass
class DataBenchConfig:
    num_images: int = 8192  # 2,048 are too few for a steady state (docs/PERFORMANCE.md)
    source_size: int = 224  # side of the synthetic JPEGs
    image_size: int = 224  # crop side (vit_s)
    crop_scale: tuple[float, float] = (0.08, 1.0)
    context_length: int = 77
    samples_per_shard: int = 256
    cpus: int = 2  # actors of ours = DataLoader workers of plain = cores of the ceiling
    actors: int = 0  # decode actors of ours on those cpus (cpus / actors CPUs each); 0: = cpus
    decode_batch: int = 256  # rows per decode call (= data.decode_batch_size's default)
    batch: int = 64  # what the consumer asks for (iter_torch_batches batch_size)
    ceiling_images: int = 2048  # images decoded in-process for the one-core rate (512: +-35%)
    repeats: int = 3
    warmup: int = 1
    data_dir: str = "outputs/bench/shards"
    seed: int = 0
    shards: list[str] = field(default_factory=list)  # existing tars/dirs/globs: no synthetic


def _decoder_kwargs(cfg: DataBenchConfig) -> dict[str, Any]:
    return {
        "tokenizer_name": TOKENIZER,
        "image_size": cfg.image_size,
        "crop_scale": tuple(cfg.crop_scale),
        "hflip": True,
        "context_length": cfg.context_length,
    }


def expand_shards(entries: list[str]) -> list[str]:
    """Tar files, directories of tars and globs -> sorted tar paths."""
    import glob
    import os

    out: list[str] = []
    for entry in entries:
        if os.path.isdir(entry):
            out += sorted(glob.glob(os.path.join(entry, "*.tar")))
        else:
            out += sorted(glob.glob(entry)) or [entry]
    if not out:
        raise FileNotFoundError(f"no WebDataset shards in {entries}")
    return out


def make_shards(cfg: DataBenchConfig) -> list[str]:
    """``cfg.shards`` when given, else the synthetic shards (written once, then reused)."""
    from wsss_ray.data.synthetic import ensure_synthetic_shards

    if cfg.shards:
        paths = expand_shards(cfg.shards)
        say(f"{len(paths)} given shards ({paths[0]} ...)")
        return paths
    folder = f"{cfg.data_dir}/n{cfg.num_images}_s{cfg.source_size}_p{cfg.samples_per_shard}"
    t0 = time.perf_counter()
    paths = ensure_synthetic_shards(
        folder, cfg.num_images, cfg.seed, cfg.source_size, cfg.samples_per_shard
    )
    dt = time.perf_counter() - t0
    say(f"{len(paths)} shards of {cfg.source_size}px JPEGs in {folder} ({dt:.0f}s)")
    return paths


def load_raw(paths: list[str], limit: int) -> list[tuple[bytes, bytes]]:
    """(JPEG bytes, caption bytes) of the first ``limit`` samples, read into memory."""
    out: list[tuple[bytes, bytes]] = []
    for path in paths:
        with tarfile.open(path) as tar:
            files: dict[str, dict[str, bytes]] = {}
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.rpartition(".")
                files.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for parts in files.values():
            if "jpg" in parts and "txt" in parts:
                out.append((parts["jpg"], parts["txt"]))
            if len(out) >= limit:
                return out
    return out


def _images(batch: dict) -> int:
    return int(batch["image"].shape[0])


# ------------------------------------------------------------------------------------- ours
def default_reader() -> str:
    """``data.reader``'s default: the reader the targets are evaluated on."""
    from wsss_ray.config import DataConfig

    return DataConfig().reader


def ours_pass(
    paths: list[str], cfg: DataBenchConfig, reader: str = "read_webdataset"
) -> dict[str, float]:
    from wsss_ray.data.webdataset import image_text_dataset

    k = _decoder_kwargs(cfg)
    actors = decode_actors(cfg)
    ds = image_text_dataset(
        paths,
        k["tokenizer_name"],
        k["image_size"],
        k["crop_scale"],
        k["hflip"],
        batch_size=cfg.decode_batch,
        actors=(actors, actors),
        cpus_per_actor=cfg.cpus / actors,  # the same cpus, however many actors share them
        context_length=k["context_length"],
        reader=reader,
    )
    shard = ds.streaming_split(1, equal=False)[0]  # what ray.train.get_dataset_shard returns
    batches = shard.iter_torch_batches(batch_size=cfg.batch, drop_last=True)
    meter = CpuMeter()
    until = cfg.num_images * 9 // 10  # stop metering before the actors exit
    out = consume(batches, _images, skip=first_outputs(cfg), meter=meter, meter_images=until)
    if meter.seconds:  # where the cores went in the steady state
        for group in CPU_REPORT_GROUPS:
            out[f"cores/{group}"] = meter.cores().get(group, 0.0)
        out["decode_images_per_cpu_s"] = meter.images_per_cpu_second("decode actors")
    return out


#: the process groups the report shows (``wsss_ray.bench.common.CPU_GROUPS``)
CPU_REPORT_GROUPS = (
    "decode actors",
    "split coordinator",
    "consumer",
    "ray daemons",
    "other ray workers",
    "rest of the machine",
)


def _cell(r: dict, key: str) -> str:
    return r[key].fmt(2) if key in r else "-"


def decode_actors(cfg: DataBenchConfig) -> int:
    """Decode actors of ours: ``cfg.actors``, or one per CPU."""
    return cfg.actors or cfg.cpus


def first_outputs(cfg: DataBenchConfig) -> int:
    """Consumer batches that hold the producers' first outputs (start-up, not steady state):
    each of the ``cpus`` actors' first decode batch is ``decode_batch / batch`` of them."""
    return decode_actors(cfg) * max(1, -(-cfg.decode_batch // cfg.batch))


# ------------------------------------------------------------------------------------ plain
class LazyDecoder:
    """The decode callable, built in the worker on first use (as Ray builds its actors)."""

    def __init__(self, kwargs: dict[str, Any]):
        self.kwargs, self.fn = kwargs, None

    def __call__(self, batch: dict[str, list]) -> dict[str, Any]:
        if self.fn is None:
            from wsss_ray.data.webdataset import ImageTextDecoder

            self.fn = ImageTextDecoder(**self.kwargs)
        return self.fn(batch)


def rows_to_columns(samples: list[dict]) -> dict[str, list]:
    """``wds.batched`` collation: a list of samples -> the column dict the decoder takes."""
    return {k: [s.get(k) for s in samples] for k in ("__key__", "jpg", "txt")}


_MP_CONTEXT = None


def _mp_context():
    """A forkserver context with torch and the decoder preloaded: workers start in
    milliseconds and never fork the Ray-initialised parent (gRPC threads)."""
    global _MP_CONTEXT
    if _MP_CONTEXT is None:
        import multiprocessing

        _MP_CONTEXT = multiprocessing.get_context("forkserver")
        _MP_CONTEXT.set_forkserver_preload(["torch", "webdataset", "wsss_ray.data.webdataset"])
    return _MP_CONTEXT


def plain_loader(paths: list[str], cfg: DataBenchConfig, batch: int | None = None):
    """webdataset + DataLoader doing the decoder's work in ``cfg.cpus`` worker processes."""
    import webdataset as wds
    from torch.utils.data import DataLoader

    ds = (
        wds.WebDataset(
            paths,
            shardshuffle=False,
            nodesplitter=None,
            workersplitter=wds.split_by_worker,
            empty_check=False,
        )
        .batched(batch or cfg.decode_batch, collation_fn=rows_to_columns, partial=True)
        .map(LazyDecoder(_decoder_kwargs(cfg)))
    )
    return DataLoader(
        ds,
        batch_size=None,
        num_workers=cfg.cpus,
        multiprocessing_context=_mp_context() if cfg.cpus > 0 else None,
    )


def plain_pass(paths: list[str], cfg: DataBenchConfig) -> dict[str, float]:
    return consume(plain_loader(paths, cfg), _images, skip=cfg.cpus)


# ---------------------------------------------------------------------------------- ceiling
def ceiling_pass(raw: list[tuple[bytes, bytes]], cfg: DataBenchConfig) -> dict[str, float]:
    """One core (one torch thread), bytes in memory: decode + crop, and + tokenize."""
    from wsss_ray.data.webdataset import ImageTextDecoder

    decoder = ImageTextDecoder(**_decoder_kwargs(cfg))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        for jpg, _ in raw:
            decoder._image(jpg)
        t_img = time.perf_counter() - t0
        t0 = time.perf_counter()
        decoder.tokenizer([txt.decode("utf-8") for _, txt in raw])
        t_tok = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    per_core = len(raw) / max(t_img, 1e-9)
    return {
        "per_core_images_per_s": per_core,
        "images_per_s": per_core * cfg.cpus,
        "with_tokenize_images_per_s": len(raw) / max(t_img + t_tok, 1e-9) * cfg.cpus,
    }


# -------------------------------------------------------------------------------------- run
def run(cfg: DataBenchConfig, out: str | None = None) -> Report:
    report = Report("data", asdict(cfg))
    paths = make_shards(cfg)
    raw = load_raw(paths, cfg.ceiling_images)
    # the actors, one read task at a time, and nothing else: the same CPUs as the DataLoader
    res = rounds(
        {
            "ceiling": lambda: ceiling_pass(raw, cfg),
            "plain": lambda: plain_pass(paths, cfg),
            "ours": lambda: ours_pass(paths, cfg, "read_webdataset"),
            "ours_fused": lambda: ours_pass(paths, cfg, "fused"),
        },
        cfg,
        f"{len(paths)} shards, crop {cfg.image_size}, {cfg.cpus} CPUs",
        ray_cpus=cfg.cpus,
    )
    ours, fused, plain, ceil = res["ours"], res["ours_fused"], res["plain"], res["ceiling"]
    vs_plain = paired_ratio(ours["images_per_s"], plain["images_per_s"])
    vs_ceiling = paired_ratio(ours["images_per_s"], ceil["images_per_s"])
    fused_vs_plain = paired_ratio(fused["images_per_s"], plain["images_per_s"])
    fused_vs_ceiling = paired_ratio(fused["images_per_s"], ceil["images_per_s"])
    fused_vs_ours = paired_ratio(fused["images_per_s"], ours["images_per_s"])
    plain_vs_ceiling = paired_ratio(plain["images_per_s"], ceil["images_per_s"])
    reader = default_reader()

    n_act = decode_actors(cfg)
    on_cpus = f" on {cfg.cpus} CPUs" if n_act != cfg.cpus else ""

    def pipeline_row(name: str, r: dict) -> list[str]:
        return [name, *rate_cells(r)]

    def mark(name: str) -> str:
        return f"{name} (default)" if name == reader else name

    report.table(
        "images/s (steady state, first batch to last)",
        ["pipeline", "images/s", "spread", "images/pass", "first batch (s)", "incl. start-up"],
        [
            pipeline_row(
                f"ours: Ray Data, {n_act} decode actors{on_cpus}, {mark('read_webdataset')}", ours
            ),
            pipeline_row(
                f"ours (fused): {n_act} actors{on_cpus} read + decode, {mark('fused')}", fused
            ),
            pipeline_row(f"plain: webdataset + DataLoader({cfg.cpus} workers)", plain),
            [
                f"ceiling: 1-core decode+crop x {cfg.cpus}",
                ceil["images_per_s"].fmt(),
                f"{100 * ceil['images_per_s'].spread:.0f}%",
                f"{len(raw)} (in memory)",
                "-",
                "-",
            ],
        ],
    )
    report.table(
        "ratios (median of paired per-round ratios)",
        ["ratio", "value", "spread"],
        [
            stat_row("ours / plain", vs_plain),
            stat_row("ours / ceiling", vs_ceiling),
            stat_row("ours (fused) / plain", fused_vs_plain),
            stat_row("ours (fused) / ceiling", fused_vs_ceiling),
            stat_row("ours (fused) / ours", fused_vs_ours),
            stat_row("plain / ceiling", plain_vs_ceiling),
        ],
    )
    report.table(
        "one core, bytes in memory",
        ["work", "images/s per core", "spread"],
        [
            stat_row("decode + crop", ceil["per_core_images_per_s"]),
            stat_row(
                f"decode + crop + tokenize (x{cfg.cpus} = images/s)",
                ceil["with_tokenize_images_per_s"],
            ),
        ],
    )
    per_core = ceil["per_core_images_per_s"]
    eff = {
        name: paired_ratio(r["decode_images_per_cpu_s"], per_core)
        for name, r in (("ours", ours), ("ours_fused", fused))
        if "decode_images_per_cpu_s" in r
    }
    if eff:
        report.table(
            "where the cores go (steady state: cores busy on average, from psutil)",
            ["process group", "ours (read_webdataset)", "ours (fused)"],
            [[g, *(_cell(r, f"cores/{g}") for r in (ours, fused))] for g in CPU_REPORT_GROUPS]
            + [
                [
                    "decode actors: images per CPU-second / 1-core ceiling",
                    *(eff[n].fmt() if n in eff else "-" for n in ("ours", "ours_fused")),
                ]
            ],
        )
    on_plain, on_ceiling = (
        (fused_vs_plain, fused_vs_ceiling) if reader == "fused" else (vs_plain, vs_ceiling)
    )
    report.targets = [
        Target(f"ours ({reader}) >= 1.0x plain webdataset loader", on_plain.median, ">=", 1.0),
        Target(f"ours ({reader}) >= 0.8x decode ceiling", on_ceiling.median, ">=", 0.8),
    ]
    report.figures = {
        "default_reader": reader,
        "ours": ours,
        "ours_fused": fused,
        "plain": plain,
        "ceiling": ceil,
        "ours_over_plain": vs_plain,
        "ours_over_ceiling": vs_ceiling,
        "fused_over_plain": fused_vs_plain,
        "fused_over_ceiling": fused_vs_ceiling,
        "fused_over_ours": fused_vs_ours,
        "plain_over_ceiling": plain_vs_ceiling,
        "decode_efficiency": eff,
    }
    for name, r in (("ours", ours), ("ours (fused)", fused)):
        if r["images"].values != plain["images"].values:
            report.notes.append(
                f"image counts differ: {name} {r['images'].values}, plain {plain['images'].values}"
            )
    report.notes.append(
        "the ceiling assumes every core is free for decoding; on a 2-core node the consumer, "
        "Ray's own processes and other users' jobs share those cores"
    )
    report.finish(out)
    return report
