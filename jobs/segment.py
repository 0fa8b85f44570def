"""Segment your own images with a trained PGSeg or VPL model, as Ray Data batch inference
(actors with the model loaded once, on GPUs when the cluster has them).

  python jobs/segment.py --checkpoint outputs/demo/ray_results/pgseg_tiny \\
      --classes "circle,square,triangle" --input photos/ --out masks/
  python jobs/segment.py --checkpoint models:/pgseg/1 --classes "cat,dog,sky" \\
      --input a.jpg b.png "shots/*.jpg" shards/shapes-000000.tar --out masks/

Inputs: folders (recursive), image files, globs, WebDataset .tar shards, object-store prefixes
(s3://bucket/photos/, gs://..., through pyarrow). Per image <key> (its
path under the input folder without the extension) it writes <out>/<key>.png (palette PNG of
the class indices), <out>/<key>_overlay.jpg (mask blended in, with a legend) and
<out>/<key>.json (classes, area of each, size). Images already done are skipped, so a rerun
resumes; an unreadable image is reported and skipped. --checkpoint takes a training run
folder, a checkpoint, a released GroupViT / PGSeg .pth (with --size), a segmenter package or an
MLflow model URI (models:/NAME/VERSION, runs:/ID/model). PGSeg segments any --classes
(zero-shot); a VPL model segments the classes it was trained on.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from wsss_ray.config import add_verbose_flag
from wsss_ray.console import LOG_NAME, configure


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="run folder, checkpoint, package or URI")
    p.add_argument("--classes", default="", help="comma-separated class names (PGSeg)")
    p.add_argument(
        "--input", nargs="+", required=True, help="folders, files, globs, .tar shards, s3://..."
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--config", default=None, help="the run's config.yaml, if not found beside it")
    p.add_argument("--size", default="", help="model size of a released GroupViT / PGSeg .pth")
    p.add_argument("--bg-thresh", type=float, default=None, help="PGSeg background threshold")
    p.add_argument("--actors", type=int, nargs=2, default=[1, 2], metavar=("MIN", "MAX"))
    p.add_argument("--batch-size", type=int, default=4, help="images per actor call")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--gpus-per-actor", type=float, default=-1, help="-1 = 1 when GPUs exist")
    p.add_argument("--redo", action="store_true", help="segment images that are done again")
    add_verbose_flag(p)
    a = p.parse_args(argv)
    configure(a.verbose, Path(a.out) / LOG_NAME)

    from wsss_ray.inference.batch import is_done, list_inputs
    from wsss_ray.inference.segmenter import Segmenter, clean_class_names

    try:
        names = clean_class_names(a.classes) if a.classes else None
        rows = list_inputs(a.input)
        # load once here: a checkpoint that does not load fails before Ray starts
        kwargs = {"config": a.config, "size": a.size, "bg_thresh": a.bg_thresh}
        seg = Segmenter.from_checkpoint(a.checkpoint, device="cpu", **kwargs)
        if seg.kind == "pgseg" and names is None and not seg.class_names:
            raise ValueError("give --classes: this PGSeg model has no default class list")
        if names is not None:
            seg.predict([_probe()], names)  # class-list errors now, not in every actor
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    todo = rows if a.redo else [r for r in rows if not is_done(a.out, r["key"])]
    print(
        f"[wsss_ray] {len(rows)} images, {len(rows) - len(todo)} done already, {len(todo)} to "
        f"segment with {seg.kind} ({', '.join(names or seg.class_names)}) -> {a.out}",
        flush=True,
    )
    if not todo:
        return 0
    failed = _run(a, todo, names, kwargs)
    for key, status in failed:
        print(f"[wsss_ray] skipped {key}: {status}", flush=True)
    return 1 if failed and len(failed) == len(todo) else 0


def _probe():
    import numpy as np

    return np.zeros((32, 32, 3), np.uint8)


def _run(a, todo, names, kwargs) -> list[tuple[str, str]]:
    import ray

    from wsss_ray.eval.collect import on_actor_pool, progress
    from wsss_ray.inference.batch import SegmentActor

    ds = on_actor_pool(
        lambda: ray.data.from_items(todo), SegmentActor, (a.checkpoint, names, a.out), a, 0, kwargs
    )
    done, failed, t0, next_print = 0, [], time.perf_counter(), 0.1
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for key, status in zip(batch["key"], batch["status"]):
            done += 1
            if status != "ok":
                failed.append((str(key), str(status)))
        next_print = progress("segment", done, len(todo), t0, next_print)
    print(
        f"[wsss_ray] done: {done - len(failed)} segmented, {len(failed)} skipped -> {a.out}",
        flush=True,
    )
    return failed


if __name__ == "__main__":
    sys.exit(main())
