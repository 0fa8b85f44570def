"""What one Tune trial runs: a Ray Train fit (PGSeg, VPL phase 2) or a cheap prototype solve
(VPL phase 1).

- ``train_trial`` is a Tune *function trainable* that drives a Ray Train run ("Tune + Train V2"):
  it resolves the job config with the trial's values (``run.name`` = ``<sweep>_<trial id>``),
  opens the trial's MLflow child run (tag ``mlflow.parentRunId`` = the sweep's run), builds the
  same ``TorchTrainer`` as the job (``wsss_ray.train.driver.build_trainer``) with
  ``TuneReportCallback``, and fits it. Every ``ray.train.report`` of the workers becomes one Tune
  result, so ASHA sees each report and can stop the trial, which ends its Train run with it.
- ``prototype_trial`` needs no Train run: the driver cached the dense CLIP features once and put
  them in the object store; a trial solves W for its (tau_I, tau_T, lambda) on them and scores it,
  in a fraction of a second on small sets, single-threaded (``trial_cpus`` may be a fraction),
  so many trials share one node.

Scores of ``prototype_trial`` (``score`` in the sweep file):

Every score is in percent (0-100), as every mIoU and accuracy this package reports.

- ``patch`` (default, the cheap proxy): patch-level mIoU of the argmax of ``W f`` over the rows
  the image's labels allow (its classes + every background row, background rows -> class 0)
  against the ground-truth class at each cached patch centre. It measures what the seeds are
  built from: which class W assigns each patch *given the image labels*, as the CAM softmax is.
- ``seeds``: additionally the real thing on the first ``seed_images`` images: softmax-GradCAM
  with W, CAA refinement (``cam.box_thresh``), background score (``cam.alpha``), mIoU of the raw
  CAMs (``cam/miou``) and the refined seeds (``seed/miou``). Needs the frozen CLIP in each trial
  process (loaded once per process) and a backward pass per image, so it is tens of times slower.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from wsss_ray.config import load_config
from wsss_ray.tune.spec import METHODS, override

PG_NAMESPACE = "wsss_ray_sweeps"  # Ray internal KV: trial id -> its Train placement group
TRIAL_TAG = "wsss_ray.trial_id"
SWEEP_TAG = "wsss_ray.sweep"
PARENT_TAG = "mlflow.parentRunId"


@dataclass
class TrialContext:
    """Everything a trial needs besides its sampled values (shipped once via the object store)."""

    sweep: str
    method: str
    base_config: str  # absolute path
    fixed: list[str]  # key=value overrides: the sweep's fixed keys, absolute paths, output dir
    parent_run_id: str | None = None  # MLflow parent; None = tracking off
    score: str = "patch"
    threads: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


def trial_config(ctx: TrialContext, params: dict[str, Any], run_name: str | None = None) -> Any:
    """The job config of one trial: base file <- fixed <- the trial's values (<- run.name)."""
    overrides = [*ctx.fixed, *(override(k, v) for k, v in sorted(params.items()))]
    if run_name:
        overrides.append(override("run.name", run_name))
    return load_config(METHODS[ctx.method].schema, ctx.base_config, overrides)


def trial_run_name(sweep: str, trial_id: str) -> str:
    return f"{sweep}_{trial_id}"


# ------------------------------------------------------------------------------- Train trials
def pg_key(sweep: str, trial_id: str) -> bytes:
    return f"{sweep}/{trial_id}".encode()


def _pg_recorder(key: bytes) -> Any:
    """A Train V2 worker-group callback that records the run's placement group in Ray's KV.

    Why: when ASHA stops a trial, Tune ends the trial's actor, which takes the Train controller
    with it before it can shut its worker group down; the worker placement group is scoped to
    the job, not the actor, and Train's own cleaner needs the State API (dashboard). The sweep
    driver reads this key and removes what a stopped trial left (``PlacementGroupJanitor``)."""
    from ray.experimental.internal_kv import _internal_kv_put
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback

    class RecordPlacementGroup(WorkerGroupCallback):
        def after_worker_group_start(self, worker_group: Any) -> None:
            handle = worker_group.get_worker_group_state().placement_group_handle
            pg_id = handle.placement_group.id.hex()
            _internal_kv_put(key, pg_id.encode(), overwrite=True, namespace=PG_NAMESPACE)

    return RecordPlacementGroup()


def train_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """Tune function trainable: one Ray Train run of the job with the trial's values."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from wsss_ray.tasks.registry import spec_for
    from wsss_ray.tracking import Tracker
    from wsss_ray.train.driver import build_trainer, open_tracker, prepare

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(ctx, config, trial_run_name(ctx.sweep, trial_id))
    spec_for(cfg).hook("trial_setup")(cfg)  # e.g. VPL: the prototypes path absolute for workers
    setup = prepare(cfg)
    if ctx.parent_run_id:  # a child of the sweep's MLflow run, never a resumed one
        tracker = open_tracker(cfg, setup, resume=False)
    else:
        tracker = Tracker(setup.uri, None)
    if tracker.run_id:
        for key, value in {
            PARENT_TAG: ctx.parent_run_id,
            SWEEP_TAG: ctx.sweep,
            TRIAL_TAG: trial_id,
        }.items():
            tracker.set_tag(key, value)
    callbacks = [TuneReportCallback(), _pg_recorder(pg_key(ctx.sweep, trial_id))]
    trainer = build_trainer(cfg, setup, tracker.run_id, callbacks=callbacks)
    # On an exception the run is left open: the sweep driver (ChildRuns) closes it, and only it
    # knows whether ASHA stopped the trial (FINISHED, early) or it failed. Closing it here raced
    # the driver: an early-stopped trial's interrupted fit() could mark FAILED after the driver
    # had written FINISHED.
    result = trainer.fit()
    if result.checkpoint:
        tracker.set_tag("checkpoint/final", result.checkpoint.path)
    tracker.finish("FINISHED")


def full_trial_reports(cfg: Any) -> int:
    """How many times a complete run of ``cfg`` calls ``ray.train.report`` (the loop reports at
    every ``log_every``, ``ckpt_every`` and validation step, and at the last step): ASHA's
    ``max_t`` in Tune iterations."""
    from wsss_ray.train.deepspeed_config import total_steps

    steps, t = total_steps(cfg), cfg.train
    ev = getattr(getattr(cfg, "eval", None), "every", 0) or 0
    return sum(
        1
        for s in range(1, steps + 1)
        if s % t.log_every == 0 or s % t.ckpt_every == 0 or (ev and s % ev == 0) or s == steps
    )


# --------------------------------------------------------------------------- VPL phase 1 trials
def prototype_data(cfg: Any, seed_images: int = 0) -> dict[str, Any]:
    """Cache the dense features of ``cfg``'s split once (``cache_features``: Ray Data batch
    inference, resumable, shared with ``jobs/vpl_prototypes.py`` as the same folder
    ``<run.output_dir>/<run.name>/features``) and return plain numpy arrays for ``ray.put``: F
    (N x D float32), allowed (N x K bool), patch_gt (N uint8), Z (K x D), and with
    ``seed_images`` the first images of the split (JPEG bytes, mask, labels) for seed scoring."""
    from pathlib import Path

    from wsss_ray.data.segmentation import image_labels, read_mask
    from wsss_ray.eval.datasets import resolve_source
    from wsss_ray.eval.vpl import VPLModel, cache_features, load_features

    out = Path(cfg.run.output_dir).resolve()
    folder = out / cfg.run.name
    folder.mkdir(parents=True, exist_ok=True)
    source = resolve_source(cfg.data, out)
    if not source.records:
        raise ValueError(f"{cfg.data.kind} split '{cfg.data.split}' has no images")
    model = VPLModel.for_config(cfg, source.class_names)
    paths = cache_features(cfg, source, folder)
    feats = load_features(paths, model.num_fg, len(model.background))
    data: dict[str, Any] = {
        "F": feats["F"].numpy(),
        "allowed": feats["allowed"].numpy(),
        "patch_gt": feats["patch_gt"].numpy().astype(np.uint8),
        "Z": model.text.cpu().float().numpy(),
        "num_fg": model.num_fg,
        "class_names": list(source.class_names),
        "box_default": 0.7 if source.name == "coco" else 0.4,
        "images": [],
    }
    for rec in source.records[:seed_images]:
        mask = read_mask(rec.mask)
        data["images"].append((Path(rec.image).read_bytes(), mask, image_labels(mask)))
    return data


def _tensor(a: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():  # zero-copy, read-only views of the object store
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


@torch.no_grad()
def patch_scores(
    F: torch.Tensor,
    W: torch.Tensor,
    allowed: torch.Tensor,
    gt: torch.Tensor,
    num_fg: int,
    chunk_size: int = 65536,
) -> dict[str, float]:
    """Patch mIoU and accuracy (percent) of argmax_k W f over the allowed rows (background
    rows = 0); patches with ground truth 255 are ignored. Same argmax as
    ``eval.vpl.patch_accuracy``."""
    from wsss_ray.eval.miou import confusion_matrix, iou_from_confusion, percent

    Wf = W.float()
    pred = torch.empty(F.shape[0], dtype=torch.long)
    for a in range(0, F.shape[0], chunk_size):
        s = F[a : a + chunk_size].float() @ Wf.T
        pred[a : a + chunk_size] = s.masked_fill(~allowed[a : a + chunk_size], -torch.inf).argmax(1)
    pred = torch.where(pred < num_fg, pred + 1, torch.zeros_like(pred))
    conf = confusion_matrix(pred.numpy(), gt.numpy(), num_fg + 1)
    res = iou_from_confusion(conf)
    return {"patch/miou": percent(res.miou), "patch/acc": percent(res.pixel_acc)}


_MODELS: dict[tuple, Any] = {}


def _clip_model(cfg: Any, class_names: list[str]) -> Any:
    """One frozen CLIP per trial process (Tune reuses the process for later trials)."""
    from wsss_ray.eval.vpl import VPLModel

    key = (
        cfg.clip.name,
        cfg.clip.weights,
        tuple(class_names),
        tuple(cfg.prompts.templates),
        tuple(cfg.prompts.background),
        cfg.clip.origin,
        cfg.prompts.reference_typos,
    )
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = VPLModel.for_config(cfg, class_names)
    return _MODELS[key]


def seed_scores(cfg: Any, W: torch.Tensor, data: dict[str, Any]) -> dict[str, float]:
    """mIoU (percent) of the raw CAMs and the CAA-refined seeds with W on the shipped images
    (what ``jobs/vpl_pseudo_labels.py`` with ``cam.prototypes=vision`` reports as cam/ and
    seed/)."""
    import io

    from PIL import Image

    from wsss_ray.eval.miou import confusion_matrix, iou_from_confusion, percent
    from wsss_ray.ops.crf import pseudo_label

    names = data["class_names"]
    model = _clip_model(cfg, names)
    c = len(names)
    box = cfg.cam.box_thresh if cfg.cam.box_thresh >= 0 else data["box_default"]
    conf = np.zeros((2, c, c), np.int64)
    for jpeg, mask, labels in data["images"]:
        image = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
        cams, refined = model.seeds(
            image, list(labels), W.float(), cfg.cam.scale, cfg.cam.refine_layers, box,
            cfg.prototypes.tau_i,
        )  # fmt: skip
        conf[0] += confusion_matrix(pseudo_label(cams.numpy(), labels, cfg.cam.alpha), mask, c)
        conf[1] += confusion_matrix(pseudo_label(refined.numpy(), labels, cfg.cam.alpha), mask, c)
    return {
        "cam/miou": percent(iou_from_confusion(conf[0]).miou),
        "seed/miou": percent(iou_from_confusion(conf[1]).miou),
    }


def solve_and_score(
    cfg: Any, data: dict[str, Any], score: str = "patch"
) -> tuple[torch.Tensor, dict[str, float]]:
    """W for ``cfg.prototypes`` on the cached features, and its scores."""
    from wsss_ray.ops.prototypes import solve_vision_prototypes

    p = cfg.prototypes
    F, allowed = _tensor(data["F"]), _tensor(data["allowed"])
    gt = _tensor(data["patch_gt"]).long()
    W, log = solve_vision_prototypes(
        F, _tensor(data["Z"]), allowed, tau_T=p.tau_t, tau_I=p.tau_i,
        lam=p.mean_lam(len(F)), init=p.init,
        max_iter=p.max_iter, tol=p.tol, chunk_size=p.chunk_size,
    )  # fmt: skip
    metrics = patch_scores(F, W, allowed, gt, int(data["num_fg"]), p.chunk_size)
    metrics.update(
        {
            "proto/objective": float(log.objective[-1] if log.objective else log.initial_objective),
            "proto/iterations": int(log.iterations),
            "proto/converged": float(log.converged),
            "proto/solve_seconds": float(log.seconds),
        }
    )
    if score == "seeds":
        metrics.update(seed_scores(cfg, W, data))
    return W, metrics


def prototype_trial(config: dict[str, Any], ctx: TrialContext, data: dict[str, Any]) -> None:
    """Tune function trainable for VPL phase 1: solve W with the trial's values, report once."""
    from ray import tune

    t0 = time.perf_counter()
    torch.set_num_threads(ctx.threads)
    cfg = trial_config(ctx, config)
    _, metrics = solve_and_score(cfg, data, ctx.score)
    metrics["trial_seconds"] = time.perf_counter() - t0
    metrics["pid"] = os.getpid()
    tune.report(metrics)
