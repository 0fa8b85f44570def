"""``benchmark train``: PGSeg training throughput and where a step's time goes.

- **ours**: the production path: Ray Data decodes synthetic WebDataset shards on an actor pool,
  Ray Train workers stream their shard with ``iter_torch_batches`` and step a DeepSpeed engine
  (ZeRO stage, bf16 on GPU, gloo on CPU) exactly as ``wsss_ray.train.loop`` does (its
  ``_prepare``, non-finite all-reduce and per-step metric window are reused, ``ray.train.report``
  every ``log_every`` steps), with a timer around each phase: data wait, forward, backward,
  optimizer, the loop's bookkeeping, and the time spent inside ``torch.distributed`` collectives
  (communication; measurable on gloo, where collectives block; NCCL launches are asynchronous);
- **DeepSpeed alone**: the same engine (same DeepSpeed config) stepping on an in-memory batch in
  this process (world size 1): what DeepSpeed costs, apart from Ray Train and Ray Data;
- **plain**: the same task in this process, batches already in memory (no data pipeline), torch
  AdamW, no DeepSpeed, no Ray, with as many torch threads as a train worker has CPUs (on CUDA:
  bf16 autocast and fused AdamW): the bare model's speed on the same hardware.

``--ab OPTION,...`` adds, per option, the "DeepSpeed alone" loop with that ``train.*`` fast-path
option flipped from its default (``grad_checkpointing``, ``compile``; on CUDA also ``tf32`` and
``fused_adamw``), interleaved in the same rounds, with its paired ratio to "DeepSpeed alone".
``--decode-device cuda`` runs ours with the JPEG decode on the train workers' GPUs.

FLOPs per sample come from ``torch.utils.flop_counter.FlopCounterMode`` over one forward +
backward; model FLOPs utilisation is printed only on CUDA, against the GPU's dense bf16 peak
(``wsss_ray.bench.common.PEAK_BF16_TFLOPS``). On CUDA every phase boundary synchronizes, so the
breakdown is exact and the throughput slightly pessimistic.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import torch

from wsss_ray.bench.common import (
    Report,
    Stat,
    Target,
    interleave,
    paired_ratio,
    peak_bf16_tflops,
    say,
    start_bench_ray,
    stat_row,
)

#: train.* options ``--ab`` can flip; the CUDA-only ones are skipped (with a note) on CPU
from wsss_ray.bench.train_baselines import DeepSpeedLoop, PlainLoop, flop_counter  # noqa: E402, F401, I001
from wsss_ray.bench.train_worker import (  # noqa: E402, F401, I001
    COLLECTIVES,
    PHASES,
    CommTimer,
    _uint8_batch,
    bench_loop_per_worker,
)

AB_OPTIONS = ("grad_checkpointing", "compile", "tf32", "fused_adamw")
CUDA_ONLY = ("tf32", "fused_adamw")


@dataclass
class TrainBenchConfig:
    size: str = "tiny"
    batch: int = 0  # per worker; 0 = 32 for tiny, 8 (CPU) / 128 (CUDA) for vit_s
    workers: int = 1
    cpus_per_worker: int = 1
    decode_actors: int = 1
    steps: int = 30  # measured steps per run
    warmup_steps: int = 5
    repeats: int = 2
    log_every: int = 10
    zero_stage: int = 2
    use_gpu: bool | None = None  # None = when CUDA is present
    precision: str = "auto"  # auto = bf16 on GPU, fp32 on CPU (as the trainer)
    source_size: int = 0  # synthetic JPEG side; 0 = 96 for tiny, 256 for vit_s
    data_dir: str = "outputs/bench/shards"
    storage: str = "outputs/bench/ray_results"
    peak_tflops: float = 0.0  # override the GPU peak table
    isolate: bool = False  # also Ray Train + DeepSpeed on an in-memory batch (no Ray Data)
    # A/B of the fast-path options: each one named adds "DeepSpeed alone" with that train.*
    # option flipped from its default, interleaved with the rest (AB_OPTIONS)
    ab: list[str] = field(default_factory=list)
    decode_device: str = "cpu"  # ours: data.decode_device (cuda: JPEG decode on the GPU)
    shards: list[str] = field(default_factory=list)  # existing tars/dirs/globs: no synthetic

    def resolved(self) -> TrainBenchConfig:
        from wsss_ray.models.pgseg import SIZES

        out = TrainBenchConfig(**asdict(self))
        out.use_gpu = torch.cuda.is_available() if self.use_gpu is None else self.use_gpu
        if not out.batch:
            out.batch = 32 if self.size == "tiny" else (128 if out.use_gpu else 8)
        if not out.source_size:
            out.source_size = 96 if self.size == "tiny" else 256
        if out.precision == "auto":
            out.precision = "bf16" if out.use_gpu else "fp32"
        SIZES[self.size]  # noqa: B018 - KeyError on an unknown size, before any work
        bad = sorted(set(self.ab) - set(AB_OPTIONS))
        if bad:
            raise ValueError(f"unknown --ab option(s) {bad}; choose from {list(AB_OPTIONS)}")
        if self.decode_device not in ("cpu", "cuda"):
            raise ValueError(f"decode_device must be cpu or cuda, not {self.decode_device!r}")
        if self.decode_device == "cuda" and not out.use_gpu:
            raise ValueError("--decode-device cuda needs a GPU (--use-gpu true)")
        return out


def train_config(bench: TrainBenchConfig, shards: list[str]):
    """The PGSegPretrainConfig this benchmark trains (defaults + the bench's choices)."""
    from wsss_ray.config import PGSegPretrainConfig, load_config
    from wsss_ray.models.pgseg import SIZES

    size = SIZES[bench.size]
    tiny = bench.size == "tiny"
    total = bench.warmup_steps + bench.steps
    overrides = [
        f"model.size={bench.size}",
        f"data.image_size={size.image_size}",
        f"data.crop_scale=[{0.5 if tiny else 0.08},1.0]",
        f"data.decode_actors=[{bench.decode_actors},{bench.decode_actors}]",
        f"train.max_steps={total}",
        f"train.batch_size_per_worker={bench.batch}",
        f"train.log_every={bench.log_every}",
        f"train.ckpt_every={10 * total}",
        f"train.zero_stage={bench.zero_stage}",
        f"train.precision={bench.precision}",
        f"scaling.num_workers={bench.workers}",
        f"scaling.use_gpu={str(bench.use_gpu).lower()}",
        f"scaling.cpus_per_worker={bench.cpus_per_worker}",
        f"optim.warmup_steps={min(10, total)}",
        f"data.decode_device={bench.decode_device}",
        "tracking.enabled=false",
    ]
    cfg = load_config(PGSegPretrainConfig, None, overrides)
    cfg.data.train_shards = list(shards)
    return cfg


# --------------------------------------------------------------------------- communication
def ours_run(
    bench: TrainBenchConfig, cfg, shards: list[str], index: list[int], synthetic: bool = False
) -> dict:
    """One Ray Train fit of the instrumented loop (``synthetic``: on an in-memory batch instead
    of the Ray Data pipeline); returns rank 0's summary."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from wsss_ray.train.driver import build_datasets

    s = cfg.scaling
    dataset = build_datasets(cfg, shards)["train"]  # the very pipeline a training run builds
    resources = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = 1
    index[0] += 1
    trainer = TorchTrainer(
        bench_loop_per_worker,
        train_loop_config={
            "cfg": cfg,
            "warmup_steps": bench.warmup_steps,
            "synthetic": synthetic,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=f"bench_train_{os.getpid()}_{index[0]}",
            storage_path=os.path.abspath(bench.storage),
        ),
        datasets={} if synthetic else {"train": dataset},
    )
    result = trainer.fit()
    if result.metrics and "bench" in result.metrics:
        return json.loads(result.metrics["bench"])
    with result.checkpoint.as_directory() as folder:
        with open(os.path.join(folder, "bench.json")) as f:
            return json.load(f)


# -------------------------------------------------------------------------------- plain
def _flatten(summary: dict) -> dict[str, float]:
    out = {"samples_per_s": summary["samples_per_s"], "samples": float(summary["samples"])}
    for k, v in summary["mean_s"].items():
        out[k if k == "comm_calls" else f"{k}_s"] = v
    return out


def run(bench: TrainBenchConfig, out: str | None = None) -> Report:
    from wsss_ray.bench.data import DataBenchConfig, make_shards
    from wsss_ray.models.pgseg import SIZES

    bench = bench.resolved()
    report = Report("train", asdict(bench))
    size = SIZES[bench.size]
    need = (bench.warmup_steps + bench.steps) * bench.batch * bench.workers
    per_shard = 256 if need > 1024 else 64
    num_images = -(-(need + bench.batch * bench.workers) // per_shard) * per_shard
    shards = make_shards(
        DataBenchConfig(
            num_images=num_images,
            source_size=bench.source_size,
            samples_per_shard=per_shard,
            data_dir=bench.data_dir,
            shards=list(bench.shards),
        )
    )
    cfg = train_config(bench, shards)
    from wsss_ray.train.deepspeed_config import zero_stage

    stage = zero_stage(cfg, bench.workers)
    say(
        f"PGSeg {bench.size}, {bench.workers} worker(s) x batch {bench.batch}, "
        f"{bench.precision}, ZeRO-{stage}, {bench.warmup_steps} + {bench.steps} steps "
        f"per run, {bench.repeats} interleaved rounds of {{plain, DeepSpeed alone, "
        + "".join(f"DeepSpeed alone with {opt} flipped, " for opt in bench.ab)
        + ("Ray Train in-memory, " if bench.isolate else "")
        + "ours}"
    )
    # first: Ray's processes must not inherit this process's torch.distributed
    start_bench_ray(bench.workers * bench.cpus_per_worker + bench.decode_actors)
    plain = PlainLoop(cfg, bench)
    flops = plain.flops_per_sample()
    ds_loop = DeepSpeedLoop(cfg, bench)
    counter = [0]
    raw: dict[str, list[dict]] = {"plain": [], "deepspeed": [], "ours": []}

    def plain_fn() -> dict[str, float]:
        s = plain.run()
        raw["plain"].append(s)
        return _flatten(s)

    def deepspeed_fn() -> dict[str, float]:
        s = ds_loop.run()
        raw["deepspeed"].append(s)
        return _flatten(s)

    def ours_fn() -> dict[str, float]:
        s = ours_run(bench, cfg, shards, counter)
        raw["ours"].append(s)
        return _flatten(s)

    runners = {"plain": plain_fn, "deepspeed": deepspeed_fn, "ours": ours_fn}
    cuda = bool(bench.use_gpu) and torch.cuda.is_available()
    variants: dict[str, str] = {}  # runner key -> label
    for opt in bench.ab:
        if opt in CUDA_ONLY and not cuda:
            report.notes.append(f"--ab {opt}: skipped, it only acts on CUDA workers")
            continue
        flipped = not getattr(cfg.train, opt)
        key = f"ab_{opt}"
        variants[key] = f"DeepSpeed alone, train.{opt}={str(flipped).lower()}"
        loop = DeepSpeedLoop(cfg, bench, {opt: flipped})

        def variant_fn(loop: DeepSpeedLoop = loop, key: str = key) -> dict[str, float]:
            s = loop.run()
            raw.setdefault(key, []).append(s)
            return _flatten(s)

        runners[key] = variant_fn
    if bench.isolate:

        def ray_train_fn() -> dict[str, float]:
            s = ours_run(bench, cfg, shards, counter, synthetic=True)
            raw.setdefault("ray_train", []).append(s)
            return _flatten(s)

        extra = {k: v for k, v in runners.items() if k.startswith("ab_")}
        runners = {"plain": plain_fn, "deepspeed": deepspeed_fn, **extra}
        runners["ray_train"] = ray_train_fn
        runners["ours"] = ours_fn
    res = interleave(runners, bench.repeats, 0, log=say)
    ours, base, dsp = res["ours"], res["plain"], res["deepspeed"]
    labels = {
        "ours": f"ours: Ray Train x{bench.workers} + DeepSpeed + Ray Data",
        "ray_train": f"Ray Train in-memory: x{bench.workers} + DeepSpeed, no Ray Data",
        "deepspeed": "DeepSpeed engine alone: in-memory batch, this process",
        "plain": "plain: torch loop + AdamW, in-memory batch, this process",
        **{k: f"{v}: in-memory batch, this process" for k, v in variants.items()},
    }
    paths = [k for k in ("ours", "ray_train", "deepspeed", *variants, "plain") if k in res]
    workers = {"ours": bench.workers, "ray_train": bench.workers}
    per_worker = Stat([v / bench.workers for v in ours["samples_per_s"].values])
    rows = []
    for k in paths:
        sps = res[k]["samples_per_s"]
        rows.append(
            [
                labels[k],
                sps.fmt(),
                f"{100 * sps.spread:.0f}%",
                Stat([v / workers.get(k, 1) for v in sps.values]).fmt(),
                f"{res[k]['samples'].median:.0f}",
            ]
        )
    report.table(
        "throughput",
        ["path", "samples/s", "spread", "samples/s per worker", "samples measured"],
        rows,
    )
    ratios = {"ours_over_plain": paired_ratio(ours["samples_per_s"], base["samples_per_s"])}
    ratio_rows = [stat_row("ours / plain (samples/s)", ratios["ours_over_plain"])]
    ratios["deepspeed_over_plain"] = paired_ratio(dsp["samples_per_s"], base["samples_per_s"])
    ratio_rows.append(
        stat_row("DeepSpeed alone / plain: what the engine costs", ratios["deepspeed_over_plain"])
    )
    if "ray_train" in res:
        rt = res["ray_train"]["samples_per_s"]
        ratios["ray_train_over_deepspeed"] = paired_ratio(rt, dsp["samples_per_s"])
        ratios["ours_over_ray_train"] = paired_ratio(ours["samples_per_s"], rt)
        ratio_rows += [
            stat_row(
                "Ray Train / DeepSpeed alone: what Ray Train costs",
                ratios["ray_train_over_deepspeed"],
            ),
            stat_row(
                "ours / Ray Train in-memory: what streaming from Ray Data costs",
                ratios["ours_over_ray_train"],
            ),
        ]
    else:
        ratios["ours_over_deepspeed"] = paired_ratio(ours["samples_per_s"], dsp["samples_per_s"])
        ratio_rows.append(
            stat_row(
                "ours / DeepSpeed alone: what Ray Train + Ray Data cost",
                ratios["ours_over_deepspeed"],
            )
        )
    for key, label in variants.items():
        ratios[f"{key}_over_deepspeed"] = paired_ratio(
            res[key]["samples_per_s"], dsp["samples_per_s"]
        )
        ratio_rows.append(stat_row(f"{label} / DeepSpeed alone", ratios[f"{key}_over_deepspeed"]))
    report.table(
        "ratios (median of paired per-round ratios)", ["ratio", "value", "spread"], ratio_rows
    )
    names = {
        "comm": "communication (inside the above)",
        "bookkeeping": "bookkeeping (finite check, metric syncs)",
        "report": "ray.train.report every log_every",
        "other": "other (untimed)",
    }
    rows = []
    for phase in (*PHASES, "other", "comm", "step"):
        row = [names.get(phase, phase)]
        for k in paths:
            v, step = res[k].get(f"{phase}_s"), res[k]["step_s"].median
            if v is None:
                row.append("-")
            elif phase == "step":
                row.append(f"{1e3 * v.median:.1f}")
            else:
                row.append(f"{1e3 * v.median:.1f} ({100 * v.median / step:.0f}%)")
        rows.append(row)
    report.table(
        "mean step-time breakdown, ms (share of the step), median over rounds (rank 0)",
        ["phase", *[labels[k].split(":")[0] for k in paths]],
        rows,
    )
    peak = bench.peak_tflops or (
        peak_bf16_tflops(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else None
    )
    tflops_rows = []
    for k in paths:
        achieved = flops * res[k]["samples_per_s"].median / 1e12
        row = [labels[k].split(":")[0], f"{achieved:.3g}"]
        if bench.use_gpu and torch.cuda.is_available() and peak:
            row.append(f"{100 * achieved / (peak * workers.get(k, 1)):.1f}%")
        else:
            row.append("n/a (no GPU)" if not torch.cuda.is_available() else "n/a (unknown peak)")
        tflops_rows.append(row)
    report.table(
        f"model FLOPs ({flops / 1e9:.3g} GFLOP per sample, forward + backward)",
        ["path", "achieved TFLOP/s", "MFU (bf16 dense peak)"],
        tflops_rows,
    )
    mfu = None
    if bench.use_gpu and torch.cuda.is_available() and peak:
        mfu = 100 * flops * per_worker.median / 1e12 / peak
    report.targets = [
        Target(
            "vit_s PGSeg bf16 >= 35% MFU on GPU",
            mfu if bench.size == "vit_s" and bench.precision == "bf16" else None,
            ">=",
            35.0,
            "%",
            "" if mfu is not None else "needs a GPU (MFU is printed only with CUDA)",
        )
    ]
    report.figures = {
        **{k: res[k] for k in paths},
        **ratios,
        "flops_per_sample": flops,
        "raw": raw,
        "image_size": size.image_size,
    }
    threads = sorted({r.get("torch_threads") for r in raw["ours"]} - {None})
    report.notes.append(
        f"torch threads: {threads} in the train worker(s), {bench.cpus_per_worker} in the "
        "plain and DeepSpeed loops (= CPUs per worker)"
    )
    if bench.workers == 1:
        report.notes.append(
            "communication with one worker: only DeepSpeed's own world-size-1 collectives "
            "(run --workers 2 to see gradient reduction)"
        )
    elif bench.use_gpu:
        report.notes.append(
            "communication on NCCL is asynchronous: the time inside collectives is launch "
            "time; the reduction itself overlaps the backward"
        )
    report.finish(out)
    return report
