"""Benchmarks of the data pipeline, the prototype machinery, the training step and evaluation,
each against a baseline measured in the same run (interleaved repeats, medians and spreads).

  python jobs/benchmark.py data  --out outputs/bench/data.json   # Ray Data vs webdataset
  python jobs/benchmark.py npr   --out outputs/bench/npr.json    # EM + Hungarian + L_PG vs step
  python jobs/benchmark.py train --out outputs/bench/train.json  # step breakdown (+ MFU on GPU)
  python jobs/benchmark.py eval  --out outputs/bench/eval.json   # zero-shot + pseudo-labels
  python jobs/benchmark.py serve --out outputs/bench/serve.json  # Ray Serve vs in-process
  python jobs/benchmark.py decode --out outputs/bench/decode.json  # CPU vs GPU decode rates
  python jobs/benchmark.py scale --out outputs/bench/scale.json  # start-up vs shard count

The defaults finish in a few minutes each on a 2-core CPU; flags scale them up on a GPU node:

  python jobs/benchmark.py npr --size vit_s --batches 64,256,1024
  python jobs/benchmark.py train --size vit_s --batch 256 --workers 8 --cpus-per-worker 8 \\
      --decode-actors 64 --shards /data/pgseg/shards
  python jobs/benchmark.py data --cpus 16 --shards /data/pgseg/shards
  python jobs/benchmark.py train --ab grad_checkpointing,compile      # fast-path A/B

Each prints Markdown tables (figures are ``median (min-max)`` over the rounds), the ratios to
the baseline and the speed targets (met / MISSED / not measured), and writes all figures and the
machine description to ``--out`` as JSON. See docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from wsss_ray.config import add_verbose_flag
from wsss_ray.console import configure


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


SHARDS_HELP = (
    "existing WebDataset tars, directories or globs, comma-separated, instead of the synthetic "
    "shards (on a GPU node: real data, and no time spent generating it)"
)


def _paths(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text}")


def _common(p: argparse.ArgumentParser, c: Any) -> None:
    """The flags every subcommand has: --out, and --repeats / --warmup where its config has them."""
    p.add_argument("--out", default=None, help="write every figure as JSON to this file")
    add_verbose_flag(p)
    for name, what in (("repeats", "interleaved rounds"), ("warmup", "unrecorded rounds first")):
        if hasattr(c, name):
            default = getattr(c, name)
            p.add_argument(
                f"--{name}", type=int, default=default, help=f"{what} (default {default})"
            )


def _image_flags(p: argparse.ArgumentParser, c: Any) -> None:
    """The synthetic JPEGs' flags the data and decode benchmarks share."""
    p.add_argument("--num-images", type=int, default=c.num_images, help="synthetic images")
    p.add_argument("--source-size", type=int, default=c.source_size, help="JPEG side (px)")
    p.add_argument("--image-size", type=int, default=c.image_size, help="crop side (px)")


def _data_flags(p: argparse.ArgumentParser, c: Any, cpus: int) -> None:
    _image_flags(p, c)
    p.add_argument(
        "--samples-per-shard", type=int, default=c.samples_per_shard, help="images per tar"
    )
    p.add_argument(
        "--cpus",
        type=int,
        default=cpus,
        help=f"decode actors = DataLoader workers = ceiling cores (default: nproc = {cpus})",
    )
    p.add_argument(
        "--actors",
        type=int,
        default=c.actors,
        help="decode actors of ours, sharing the --cpus CPUs (cpus/actors each; 0: one per CPU)",
    )
    p.add_argument("--decode-batch", type=int, default=c.decode_batch, help="rows per decode call")
    p.add_argument("--batch", type=int, default=c.batch, help="consumer batch size")
    p.add_argument(
        "--ceiling-images", type=int, default=c.ceiling_images, help="images for the 1-core rate"
    )
    p.add_argument("--data-dir", default=c.data_dir, help="where the synthetic shards are kept")
    p.add_argument("--shards", type=_paths, default=[], help=SHARDS_HELP)


def _npr_flags(p: argparse.ArgumentParser, c: Any, cpus: int) -> None:
    p.add_argument("--size", default="vit_s", choices=["tiny", "vit_s"], help="PGSeg size")
    p.add_argument(
        "--batches",
        type=_ints,
        default=[],
        help="comma-separated batch sizes (default 64,256,1024 on CUDA, 2,4,8 on CPU)",
    )
    p.add_argument(
        "--ablation",
        type=_bool,
        default=None,
        help="also time the step without PG units (default: on with CUDA, off on CPU)",
    )
    p.add_argument(
        "--loop-batch",
        type=int,
        default=0,
        help="batch of the batched-vs-loop checks (default 256 on CUDA, 64 on CPU)",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument(
        "--threads", type=int, default=0, help="torch threads (default 1 on CPU, all on CUDA)"
    )


def _train_flags(p: argparse.ArgumentParser, c: Any, cpus: int) -> None:
    p.add_argument("--size", default=c.size, choices=["tiny", "vit_s"], help="PGSeg size")
    p.add_argument(
        "--batch", type=int, default=0, help="per worker (default 32 tiny; vit_s 8 CPU, 128 GPU)"
    )
    p.add_argument("--workers", type=int, default=c.workers, help="Ray Train workers")
    p.add_argument("--cpus-per-worker", type=int, default=c.cpus_per_worker)
    p.add_argument("--decode-actors", type=int, default=c.decode_actors)
    p.add_argument("--steps", type=int, default=c.steps, help="measured steps per run")
    p.add_argument("--warmup-steps", type=int, default=c.warmup_steps)
    p.add_argument("--zero-stage", type=int, default=c.zero_stage)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--use-gpu", type=_bool, default=None, help="default: when CUDA is present")
    p.add_argument(
        "--peak-tflops", type=float, default=0.0, help="GPU bf16 peak (default: from the table)"
    )
    p.add_argument(
        "--isolate",
        type=_bool,
        default=False,
        help="also run Ray Train + DeepSpeed on an in-memory batch (splits Ray Train's cost "
        "from Ray Data's; one more Ray Train run per round)",
    )
    p.add_argument(
        "--ab",
        type=_paths,
        default=[],
        help="comma-separated train.* fast-path options to A/B in the same rounds: each adds "
        "'DeepSpeed alone' with the option flipped from its default "
        "(grad_checkpointing, compile; on CUDA also tf32, fused_adamw)",
    )
    p.add_argument(
        "--decode-device",
        default=c.decode_device,
        choices=["cpu", "cuda"],
        help="ours: data.decode_device (cuda = JPEG decode on the train workers' GPUs)",
    )
    p.add_argument("--data-dir", default=c.data_dir)
    p.add_argument("--shards", type=_paths, default=[], help=SHARDS_HELP)
    p.add_argument("--storage", default=c.storage, help="Ray Train storage of the runs")


def _eval_flags(p: argparse.ArgumentParser, c: Any, cpus: int) -> None:
    p.add_argument("--num-images", type=int, default=c.num_images)
    p.add_argument("--image-size", type=int, default=c.image_size)
    p.add_argument("--cpus", type=int, default=cpus, help="one-CPU actors of ours")
    p.add_argument(
        "--plain-threads", type=int, default=c.plain_threads, help="torch threads of the plain loop"
    )
    p.add_argument("--batch", type=int, default=c.batch, help="images per map_batches call")
    p.add_argument("--short-side", type=int, default=c.short_side, help="zero-shot resize")
    p.add_argument("--window", type=int, default=c.window)
    p.add_argument("--stride", type=int, default=c.stride)
    p.add_argument(
        "--what",
        default=",".join(c.what),
        help="comma-separated: zero_shot,pseudo_labels (default both)",
    )
    p.add_argument("--data-dir", default=c.data_dir)


def _serve_flags(p: argparse.ArgumentParser, c: Any, cpus: int) -> None:
    p.add_argument("--size", default=c.size, choices=["tiny_seg", "tiny", "vit_s"])
    p.add_argument("--image-size", type=int, default=c.image_size, help="JPEG side (px)")
    p.add_argument("--requests", type=int, default=c.requests, help="requests per round")
    p.add_argument("--concurrency", type=int, default=c.concurrency, help="clients at once")
    p.add_argument("--max-batch-size", type=int, default=c.max_batch_size)


def _decode_flags(p: argparse.ArgumentParser, c: Any, cpus: int) -> None:
    _image_flags(p, c)
    p.add_argument("--batch", type=int, default=c.batch, help="GPU decode batch")
    p.add_argument(
        "--step-rate", type=float, default=c.step_rate, help="samples/s of one GPU's step"
    )
    p.add_argument(
        "--with-step",
        type=_bool,
        default=c.with_step,
        help="CUDA: also time the vit_s PGSeg step with the GPU decode inside and without",
    )


def _scale_flags(p: argparse.ArgumentParser, c: Any, cpus: int) -> None:
    p.add_argument(
        "--shard-counts",
        type=lambda t: tuple(_ints(t)),
        default=c.shard_counts,
        help="comma-separated (default 30,3000,30000)",
    )
    p.add_argument("--passes", type=int, default=c.passes, help="data.passes_per_execution")
    p.add_argument("--executions", type=int, default=c.executions)
    p.add_argument("--actors", type=int, default=c.actors, help="decode actors")
    p.add_argument("--baseline-shards", type=int, default=c.baseline_shards, help="0 = no baseline")
    p.add_argument("--data-dir", default=c.data_dir)


#: subcommand -> (its module's config class, its flags, one-line help, description); the
#: module's ``run(config, out)`` measures it and returns the Report
SUBCOMMANDS = {
    "data": (
        "wsss_ray.bench.data:DataBenchConfig",
        _data_flags,
        "images/s: Ray Data pipeline vs webdataset + DataLoader vs the decode ceiling",
        "Ray Data image-text pipeline (decode + RandomResizedCrop + tokenize, "
        "consumed by iter_torch_batches) vs webdataset + torch DataLoader with as many workers, "
        "vs one core's decode + crop rate times the cores.",
    ),
    "npr": (
        "wsss_ray.bench.npr:NPRBenchConfig",
        _npr_flags,
        "EM prototypes + Hungarian + L_PG vs the PGSeg forward+backward",
        "Per batch size: the PGSeg step (forward+backward) vs EM prototypes + "
        "Hungarian matching + L_PG on the same tensors; batched EM vs a per-sample loop; "
        "Hungarian serial vs threads.",
    ),
    "train": (
        "wsss_ray.bench.train:TrainBenchConfig",
        _train_flags,
        "PGSeg samples/s and step-time breakdown on Ray Train + DeepSpeed (+ MFU on GPU)",
        "The PGSeg training step on Ray Train + DeepSpeed + Ray Data, timed by "
        "phase (data wait, forward, backward, optimizer, bookkeeping, communication), vs the "
        "same task in a bare torch loop on an in-memory batch; FLOPs by FlopCounterMode, MFU "
        "on CUDA only.",
    ),
    "eval": (
        "wsss_ray.bench.eval:EvalBenchConfig",
        _eval_flags,
        "images/s of zero-shot segmentation and pseudo-label generation",
        "Zero-shot segmentation (PGSeg tiny, untrained) and VPL pseudo-labels "
        "(GradCAM + CAA on a random wsss-tiny CLIP) as Ray Data batch inference vs the same "
        "callable in a plain in-process loop, on the synthetic VOC-layout set.",
    ),
    "serve": (
        "wsss_ray.bench.serve:ServeBenchConfig",
        _serve_flags,
        "requests/s and p50/p99 latency of the Ray Serve app vs the Segmenter in-process",
        "POST /segment on 127.0.0.1 under a bounded concurrent load (one replica, "
        "dynamic batching) vs Segmenter.predict called directly in this process.",
    ),
    "decode": (
        "wsss_ray.bench.decode:DecodeBenchConfig",
        _decode_flags,
        "images/s of the CPU decode, the CPU parse (GPU-decode mode) and the GPU decode",
        "Per core: the decode actors' decode + crop + tokenize, and what they do "
        "when the GPU decodes (header, crop box, tokenize); on CUDA: batched nvJPEG + crops; "
        "with --step-rate, the decode cores each GPU needs (docs/DATA.md).",
    ),
    "scale": (
        "wsss_ray.bench.scale:ScaleBenchConfig",
        _scale_flags,
        "start-up and memory of the training data path at 30 / 3,000 / 30,000 shards",
        "Seconds to the first batch and driver / Ray actor memory for growing "
        "shard counts (tiny one-sample shards), memory over several executions, and the old "
        "one-block-per-shard input at --baseline-shards for comparison.",
    ),
}


def _config_class(command: str) -> type:
    module, _, name = SUBCOMMANDS[command][0].partition(":")
    return getattr(importlib.import_module(module), name)


def build_parser() -> argparse.ArgumentParser:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parser = argparse.ArgumentParser(
        prog="benchmark.py",
        description=__doc__,
        epilog="Run 'benchmark.py SUBCOMMAND --help' for each subcommand's flags.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    for command, (_, flags, help_, description) in SUBCOMMANDS.items():
        p = sub.add_parser(command, help=help_, description=description)
        c = _config_class(command)()
        flags(p, c, cpus)
        _common(p, c)
    return parser


def _fill(cls: type, args: argparse.Namespace, **extra: Any):
    names = {f.name for f in fields(cls)}
    kwargs = {k: v for k, v in vars(args).items() if k in names}
    kwargs.update(extra)
    return cls(**kwargs)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    extra: dict[str, Any] = {}
    if args.command == "eval":
        what = tuple(w.strip() for w in args.what.split(",") if w.strip())
        bad = sorted(set(what) - {"zero_shot", "pseudo_labels"})
        if bad:
            print(f"benchmark eval: unknown --what {bad}", file=sys.stderr)
            return 2
        extra["what"] = what
    cls = _config_class(args.command)
    # Ray's and the libraries' output beside the JSON (outputs/bench/ without --out)
    log = Path(args.out).parent if args.out else Path("outputs/bench")
    configure(args.verbose, log / f"console_{args.command}.log")
    report = sys.modules[cls.__module__].run(_fill(cls, args, **extra), args.out)
    print("\n" + report.render(), flush=True)
    if args.out:
        print(f"\n[bench] wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
