"""``benchmark eval``: images/s of the two batch-inference jobs against a plain loop.

- **zero-shot segmentation** (``jobs/eval_pgseg.py``): the Ray Data actor
  :class:`~wsss_ray.eval.pgseg.ZeroShotPredictor` (decode, sliding-window PGSeg, confusion
  matrices of the model and the two baselines) on the synthetic VOC-layout set, PGSeg ``tiny``
  untrained (speed does not depend on the weights);
- **pseudo-labels** (``jobs/vpl_pseudo_labels.py``): the actor
  :class:`~wsss_ray.eval.vpl.PseudoLabeler` (GradCAM seeds with text prototypes, CAA
  refinement, label PNGs, confusion matrices) with a randomly initialised ``wsss-tiny`` CLIP.

Each runs two ways on the same images, interleaved: **ours**, Ray Data reading the files and
``map_batches`` on an actor pool of ``cpus`` one-CPU actors (what the jobs do), and **plain**,
the same callable on the same batches in this process with ``plain_threads`` torch threads (1 by
default: on a contended machine two intra-op threads on two cores run 10-20x *slower* than one,
as every op waits for a descheduled thread). ``ours / (plain x cpus)`` is the scaling
efficiency. The headline is the steady state (from the arrival of output ``cpus`` to the last;
actor start-up, which imports torch and builds the model and the class text embeddings, is the
time to the first batch).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsss_ray.bench.common import Report, consume, paired_ratio, rate_cells, rounds, say, stat_row


@dataclass
class EvalBenchConfig:
    num_images: int = 512  # synthetic VOC-layout val images
    image_size: int = 96  # their side
    cpus: int = 2  # actors of ours (one CPU each)
    plain_threads: int = 1  # torch threads of the plain loop
    batch: int = 8  # images per map_batches call (the jobs' infer.batch_size)
    size: str = "tiny"  # PGSeg size for zero-shot
    short_side: int = 64  # zero-shot: the tiny model's 64-px input, one window
    window: int = 64
    stride: int = 32
    clip: str = "wsss-tiny"  # CLIP of the pseudo-labels (random init)
    refine_layers: int = 4  # CAA layers (wsss-tiny has 4 blocks)
    repeats: int = 3
    warmup: int = 0  # each pass builds its actors from scratch anyway
    data_dir: str = "outputs/bench"
    what: tuple[str, ...] = ("zero_shot", "pseudo_labels")


def _source(cfg: EvalBenchConfig):
    from wsss_ray.config import SegDataConfig, SyntheticSegConfig
    from wsss_ray.eval.datasets import resolve_source

    data = SegDataConfig(
        kind="voc",
        split="val",
        synthetic=SyntheticSegConfig(
            num_train=8, num_val=cfg.num_images, image_size=cfg.image_size
        ),
    )
    t0 = time.perf_counter()
    source = resolve_source(data, Path(cfg.data_dir) / f"voc_n{cfg.num_images}_s{cfg.image_size}")
    say(f"{len(source.records)} synthetic VOC val images ({time.perf_counter() - t0:.0f}s)")
    return source


def _row_batches(source, batch: int) -> list[dict[str, Any]]:
    """The rows ``segmentation_dataset`` yields (id, JPEG, mask PNG, labels), in memory."""
    from wsss_ray.data.segmentation import _load_rows

    recs = source.records
    out = []
    for i in range(0, len(recs), batch):
        chunk = recs[i : i + batch]
        out.append(
            _load_rows(
                {
                    "id": np.array([r.id for r in chunk]),
                    "image_path": np.array([r.image for r in chunk]),
                    "mask_path": np.array([r.mask for r in chunk]),
                }
            )
        )
    return out


def _zero_shot_actor(cfg: EvalBenchConfig, source) -> tuple[type, tuple]:
    from wsss_ray.config import ZeroShotConfig
    from wsss_ray.eval.pgseg import ZeroShotPredictor

    zs = ZeroShotConfig(short_side=cfg.short_side, window=cfg.window, stride=cfg.stride)
    return ZeroShotPredictor, (cfg.size, "", source.class_names, zs, source.bg_thresh, [], 0)


def _pseudo_label_actor(cfg: EvalBenchConfig, source) -> tuple[type, tuple]:
    from wsss_ray.config import VPLConfig
    from wsss_ray.eval.vpl import PseudoLabeler
    from wsss_ray.models.clip import create_clip

    weights = Path(cfg.data_dir).resolve() / f"{cfg.clip}_random.pt"
    if not weights.is_file():
        torch.manual_seed(0)
        state = create_clip(cfg.clip).state_dict()
        state["logit_scale"] = state["logit_scale"].reshape(())  # as open_clip saves it
        weights.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, weights)
    vpl = VPLConfig()
    vpl.clip.name, vpl.clip.weights = cfg.clip, str(weights)
    vpl.prompts.templates = ["a photo of a {}."]
    vpl.cam.refine_layers = cfg.refine_layers
    vpl.cam.prototypes = "text"
    return PseudoLabeler, (vpl, source.class_names, 0.4, [])


def _count(out: dict[str, Any]) -> int:
    return int(out["images"].sum()) if "images" in out else len(out["id"])


class _Timed:
    """Iterate the callable over in-memory batches (construction included in the pass)."""

    def __init__(self, actor: tuple[type, tuple], batches: list[dict]):
        self.actor, self.batches = actor, batches

    def __iter__(self):
        fn = self.actor[0](*self.actor[1])
        for b in self.batches:
            yield fn(b)


def plain_pass(actor: tuple[type, tuple], batches: list[dict], threads: int) -> dict[str, float]:
    """The callable over the in-memory batches in this process with ``threads`` torch threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return consume(_Timed(actor, batches), _count, skip=1)
    finally:
        torch.set_num_threads(before)


def ours_pass(actor: tuple[type, tuple], source, cfg: EvalBenchConfig) -> dict[str, float]:
    """Ray Data: read the files, ``map_batches`` on ``cpus`` one-CPU actors, stream the rows."""
    import ray.data

    from wsss_ray.data.segmentation import segmentation_dataset

    ds = segmentation_dataset(source).map_batches(
        actor[0],
        fn_constructor_args=actor[1],
        batch_size=cfg.batch,
        compute=ray.data.ActorPoolStrategy(min_size=cfg.cpus, max_size=cfg.cpus),
        num_cpus=1,
        num_gpus=0,
        batch_format="numpy",
    )
    return consume(ds.iter_batches(batch_size=None, batch_format="numpy"), _count, cfg.cpus)


def run(cfg: EvalBenchConfig, out: str | None = None) -> Report:
    report = Report("eval", asdict(cfg))
    source = _source(cfg)
    batches = _row_batches(source, cfg.batch)
    builders = {"zero_shot": _zero_shot_actor, "pseudo_labels": _pseudo_label_actor}
    labels = {
        "zero_shot": f"zero-shot segmentation (PGSeg {cfg.size}, {cfg.short_side}px)",
        "pseudo_labels": f"pseudo-labels (GradCAM + CAA, {cfg.clip})",
    }
    runners: dict[str, Any] = {}
    for what in cfg.what:
        actor = builders[what](cfg, source)
        runners[f"{what}/plain"] = lambda a=actor: plain_pass(a, batches, cfg.plain_threads)
        runners[f"{what}/ours"] = lambda a=actor: ours_pass(a, source, cfg)
    setup = f"{len(source.records)} images, {cfg.cpus} CPUs, batch {cfg.batch}"
    res = rounds(runners, cfg, setup, ray_cpus=cfg.cpus)
    rows, ratio_rows, figures = [], [], {}
    for what in cfg.what:
        ours, plain = res[f"{what}/ours"], res[f"{what}/plain"]
        ratio = paired_ratio(ours["images_per_s"], plain["images_per_s"])
        scale = cfg.cpus / cfg.plain_threads
        efficiency = ratio.scaled(1 / scale)
        for name, r in (
            (f"ours: Ray Data, {cfg.cpus} one-CPU actors", ours),
            (f"plain: in-process loop, {cfg.plain_threads} torch thread(s)", plain),
        ):
            rows.append([labels[what], name, *rate_cells(r)])
        ratio_rows.append(stat_row(f"{what}: ours / plain", ratio))
        ratio_rows.append(
            stat_row(f"{what}: scaling efficiency, ours / (plain x {scale:g})", efficiency)
        )
        figures[what] = {
            "ours": ours,
            "plain": plain,
            "ours_over_plain": ratio,
            "scaling_efficiency": efficiency,
        }
        if ours["images"].values != plain["images"].values:
            report.notes.append(f"{what}: image counts differ between ours and plain")
    report.table(
        "images/s (steady state, first batch to last)",
        ["job", "path", "images/s", "spread", "images/pass", "first batch (s)", "incl. start-up"],
        rows,
    )
    report.table(
        "ratios (median of paired per-round ratios)", ["ratio", "value", "spread"], ratio_rows
    )
    report.figures = figures
    report.finish(out)
    return report
