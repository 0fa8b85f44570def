"""VPL phase 1 at scale: dense CLIP features, vision prototypes, CAM seeds and pseudo-labels.

Two jobs share one config (``VPLConfig``) and one folder, ``<output_dir>/<run.name>/``:

- ``run_prototypes``: Ray Data batch inference on an actor pool computes each image's
  normalised dense CLIP features (the patch tokens after ``ln_post`` and the projection) once
  and the driver writes them in shards of ``prototypes.shard_images`` images to ``features/``
  (a shard is the unit of resume: a rerun computes only missing shards). The convex KL
  objective of METHODS 2.2 is then solved on the driver (``wsss_ray.ops.prototypes``) with a
  convergence log, and ``prototypes.pt`` (W, the text prototypes Z, the names) is written and
  logged to MLflow together with the patch accuracies of Z and W on the cached features.
- ``run_pseudo_labels``: per image, softmax-GradCAM over (present classes + background words)
  with text or vision prototypes, CAA refinement, background score, optional dense CRF with the
  confidence filter -> a grey label PNG per image under ``pseudo_labels_<mode>/``, plus the
  mIoU of the raw CAMs, the refined seeds and the final pseudo-labels against the split's
  masks (confusion matrices summed over batches).

Actors return bytes and arrays to the driver, which writes every file: the output folder only
has to exist where the driver runs.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from wsss_ray.config import VPLConfig, save_resolved, to_flat_dict
from wsss_ray.eval.miou import percent
from wsss_ray.eval.vpl_features import (  # noqa: F401 - re-exported for callers of this module
    FeatureExtractor,
    _actor_kwargs,
    _clip_weights,
    _decode,
    _device,
    _folder,
    _progress,
    _source,
    _write_shard,
    cache_features,
    feature_shards,
    load_features,
    patch_accuracy,
    patch_labels,
)
from wsss_ray.tracking import log_job_run

#: confusion-matrix kinds the pseudo-label job reports: the raw CAM, the refined seed, the
#: final pseudo-label over the pixels it labels, and the final label before the confidence
#: filter on every pixel (CLIP-ES ``eval_cam_with_crf.py --eval_only``)
PL_KINDS = ("cam", "seed", "pseudo", "pseudo_all")


def _sweep_line(metrics: dict[str, Any]) -> str:
    if "seed/best_alpha" not in metrics:
        return ""
    a, m = metrics["seed/best_alpha"], metrics["seed/best_alpha_miou"]
    return f" | best background exponent {a:g}: seed mIoU {m:.1f}"


def pl_kinds(cam: Any) -> tuple[str, ...]:
    """:data:`PL_KINDS` plus one seed kind per background exponent of ``cam.alpha_sweep``."""
    return PL_KINDS + tuple(f"seed_alpha{a:g}" for a in cam.alpha_sweep)


# ----------------------------------------------------------------------------- the model side
def frozen_clip(name: str, weights: str, origin: str = "auto") -> torch.nn.Module:
    """``load_frozen_clip`` for a weights file or a ``pretrain_clip`` run/checkpoint folder
    (``origin``: ``clip.origin``)."""
    import os

    from wsss_ray.eval.checkpoint import load_state_dict
    from wsss_ray.models.clip import load_frozen_clip

    if weights and os.path.isdir(weights):
        return load_frozen_clip(name, state_dict=load_state_dict(weights), origin=origin)
    return load_frozen_clip(name, weights, origin=origin)


class VPLModel:
    """A frozen dense CLIP with the dataset's prompts: text prototypes Z (foreground classes,
    then background words), preprocessing, dense features and seeds for one image."""

    def __init__(
        self,
        name: str,
        weights: str,
        class_names: list[str],
        templates: list[str],
        background: list[str],
        device: str | torch.device = "cpu",
        origin: str = "auto",
        reference_typos: bool = False,
    ):
        from wsss_ray.config import CLIP_MEAN, CLIP_STD
        from wsss_ray.data.text import class_prompts, text_prototypes
        from wsss_ray.models.clip import DenseCLIP, context_length, tokenizer

        self.device = torch.device(device)
        clip = frozen_clip(name, weights, origin).to(self.device)
        self.dense = DenseCLIP(clip)
        self.patch = self.dense.patch
        fg, default_bg = class_prompts(class_names, reference_typos)
        self.background = list(background) or default_bg
        self.num_fg = len(fg)
        tok = tokenizer(name, context_length(name))
        self.text = text_prototypes(clip, tok, fg + self.background, templates, self.device)
        self.mean = torch.tensor(CLIP_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(CLIP_STD, device=self.device).view(1, 3, 1, 1)

    @classmethod
    def for_config(
        cls, cfg: Any, class_names: list[str], device: str | torch.device = "cpu"
    ) -> VPLModel:
        """The model of a config's ``clip`` and ``prompts`` sections."""
        p = cfg.prompts
        return cls(
            cfg.clip.name,
            cfg.clip.weights,
            class_names,
            list(p.templates),
            list(p.background),
            device,
            cfg.clip.origin,
            p.reference_typos,
        )

    def prepare(self, image: np.ndarray, scale: float = 1.0) -> torch.Tensor:
        """1 x 3 x H' x W' normalised input: ``image`` resized by ``scale`` and up to the next
        multiple of the patch size (CLIP-ES)."""
        h0, w0 = image.shape[:2]
        h = max(self.patch, math.ceil(h0 * scale / self.patch) * self.patch)
        w = max(self.patch, math.ceil(w0 * scale / self.patch) * self.patch)
        x = torch.from_numpy(np.array(image, copy=True)).to(self.device)
        x = x.permute(2, 0, 1)[None].float() / 255.0
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def features(self, image: np.ndarray, scale: float = 1.0) -> tuple[torch.Tensor, tuple]:
        """N x D normalised patch features and the (h, w) patch grid."""
        out = self.dense(self.prepare(image, scale))
        return F.normalize(out["patch_feats"][0].float(), dim=-1), out["grid"]

    def seeds(
        self,
        image: np.ndarray,
        labels: list[int],
        prototypes: torch.Tensor,
        scale: float = 1.0,
        refine_layers: int = 8,
        box_thresh: float = 0.4,
        tau: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw CAMs, CAA-refined CAMs), each len(labels) x H x W in [0, 1] at the image size,
        for the present classes ``labels`` (1-based class ids). ``prototypes``: K x D rows for
        the foreground classes then the background words. Text prototypes (``tau=None``) give
        CLIP's logits s cos(f, z); vision prototypes W give the logits they were learned with,
        W f / tau_I (rows not normalised: their lengths are part of what was learned)."""
        from wsss_ray.ops.affinity import attention_transition, caa_refine
        from wsss_ray.ops.cam import softmax_gradcam, upsample_cams

        h0, w0 = image.shape[:2]
        if not labels:
            empty = torch.zeros(0, h0, w0)
            return empty, empty
        fg = [c - 1 for c in labels]
        rows = fg + list(range(self.num_fg, prototypes.shape[0]))
        protos = prototypes[rows].float().to(self.device)
        with torch.enable_grad():
            out = self.dense(self.prepare(image, scale), attn_layers=refine_layers, cam=True)
            feat = F.normalize(out["image_feat"].float(), dim=-1)
            if tau is None:
                logits = self.dense.logit_scale * feat @ F.normalize(protos, dim=-1).T
            else:
                logits = feat @ protos.T / tau
            cams = softmax_gradcam(out["ln1"], logits, list(range(len(fg))), out["grid"])[0]
        refined = cams
        if refine_layers > 0:
            trans = attention_transition(out["attn"][:, 0].detach().float())
            refined = caa_refine(cams, trans, box_thresh)
        return upsample_cams(cams, (h0, w0)).cpu(), upsample_cams(refined, (h0, w0)).cpu()


def run_prototypes(cfg: VPLConfig) -> dict[str, Any]:
    """Cache features (resumable), solve for W, write ``prototypes.pt``; returns metrics."""
    from wsss_ray.ops.prototypes import solve_vision_prototypes

    out, folder = _folder(cfg)
    config_file = save_resolved(cfg, folder)
    source = _source(cfg, out)
    print(
        f"[wsss_ray] VPL prototypes: {source.name} {source.split}, {len(source.records)} "
        f"images, CLIP {cfg.clip.name} from {cfg.clip.weights}",
        flush=True,
    )
    model = VPLModel.for_config(cfg, source.class_names)
    Z = model.text.cpu()
    t0 = time.perf_counter()
    paths = cache_features(cfg, source, folder)
    feat_s = time.perf_counter() - t0
    data = load_features(paths, model.num_fg, len(model.background))
    p = cfg.prototypes
    print(
        f"[wsss_ray] solving W ({Z.shape[0]} x {Z.shape[1]}) on {data['F'].shape[0]} patch "
        f"features: tau_T {p.tau_t} tau_I {p.tau_i} lambda {p.lam} init {p.init}",
        flush=True,
    )

    def log(msg: str) -> None:
        print(f"[wsss_ray] {msg}", flush=True)

    W, slog = solve_vision_prototypes(
        data["F"], Z, data["allowed"], tau_T=p.tau_t, tau_I=p.tau_i,
        lam=p.mean_lam(len(data["F"])), init=p.init,
        max_iter=p.max_iter, tol=p.tol, chunk_size=p.chunk_size, log_every=p.log_every,
        log_fn=log,
    )  # fmt: skip
    acc = {  # percent, as every accuracy and IoU we report
        f"{name}{suffix}": percent(
            patch_accuracy(data["F"], P, data["patch_gt"], model.num_fg, allowed)
        )
        for name, P in (("text", Z), ("vision", W))
        for suffix, allowed in (("", None), ("_given_labels", data["allowed"]))
    }
    acc_text, acc_vis = acc["text"], acc["vision"]
    names = source.class_names[1:] + [f"bg:{w}" for w in model.background]
    torch.save(
        {
            "W": W.cpu(),
            "Z": Z,
            "tau_i": p.tau_i,
            "names": names,
            "num_fg": model.num_fg,
            "config": to_flat_dict(cfg),
        },
        folder / "prototypes.pt",
    )
    objective = [slog.initial_objective, *slog.objective]
    grad_norm = [slog.initial_grad_norm, *slog.grad_norm]
    metrics = {
        "proto/objective": float(objective[-1]),
        "proto/objective_start": float(objective[0]),
        "proto/grad_norm": float(grad_norm[-1]),
        "proto/grad_norm_start": float(grad_norm[0]),
        "proto/iterations": int(slog.iterations),
        "proto/converged": float(bool(slog.converged)),
        "proto/solve_seconds": float(slog.seconds),
        **{f"proto/patch_acc_{k}": v for k, v in acc.items()},
        "features/images": len(source.records),
        "features/patches": int(data["F"].shape[0]),
        "features/seconds": feat_s,
    }
    (folder / "prototypes.json").write_text(
        json.dumps(
            {**metrics, "reason": slog.reason, "objective_log": list(slog.objective)}, indent=2
        )
    )
    print(
        f"[wsss_ray] W: {slog.iterations} iterations ({slog.reason}), objective "
        f"{objective[0]:.4f} -> {objective[-1]:.4f}, gradient norm {grad_norm[0]:.2e} -> "
        f"{grad_norm[-1]:.2e} | patch accuracy over all classes: text {acc_text:.1f} vs "
        f"vision {acc_vis:.1f} (given the image labels: {acc['text_given_labels']:.1f}"
        f" vs {acc['vision_given_labels']:.1f}) | {folder / 'prototypes.pt'}",
        flush=True,
    )
    series = [
        {"proto/objective_iter": o, "proto/grad_norm_iter": g} for o, g in zip(objective, grad_norm)
    ]
    files = [folder / "prototypes.pt", folder / "prototypes.json"]
    _track(cfg, out, config_file, "prototypes", metrics, files, series=series)
    metrics["output"] = str(folder)
    return metrics


def _track(
    cfg: VPLConfig,
    out: Path,
    config_file: Path,
    suffix: str,
    metrics: dict[str, Any],
    files: list[Path],
    folders: dict[str, str] | None = None,
    series: list[dict[str, float]] | None = None,
) -> None:
    """The MLflow run ``<run.name>_<suffix>`` of a VPL step (when tracking is on); its id goes
    into ``metrics``."""
    if cfg.tracking.enabled:
        metrics["mlflow_run_id"] = log_job_run(
            cfg,
            str(out),
            str(out / cfg.run.name),
            f"{cfg.run.name}_{suffix}",
            str(config_file),
            metrics,
            [str(p) for p in files],
            folders,
            series,
        )


# ----------------------------------------------------------------------------- pseudo-labels
def prototype_file(cfg: VPLConfig) -> Path:
    if cfg.cam.prototype_file:
        return Path(cfg.cam.prototype_file)
    return Path(cfg.run.output_dir).resolve() / cfg.run.name / "prototypes.pt"


class PseudoLabeler:
    """Ray Data actor: seeds -> refinement -> (CRF) -> label PNG bytes and confusion matrices
    (raw CAM, refined seed, final pseudo-label) for a batch of images."""

    def __init__(
        self,
        cfg: VPLConfig,
        class_names: list[str],
        bg_default: float,
        overlays,
        vision: tuple[torch.Tensor, float] | None = None,
    ):
        """``vision`` = (W, tau_I), read by the driver (the prototype file only has to exist
        where the driver runs); None = text prototypes."""
        from wsss_ray.ops.crf import crf_available

        self.model = VPLModel.for_config(cfg, class_names, _device())
        if vision is not None:
            W, tau = vision
            if W.shape != self.model.text.shape:
                raise ValueError(
                    f"prototypes {tuple(W.shape)} do not fit this dataset's "
                    f"{tuple(self.model.text.shape)} prompts"
                )
            self.protos, self.tau = W.to(self.model.device), float(tau)
        else:
            self.protos, self.tau = self.model.text, None
        self.cam = cfg.cam
        self.box = cfg.cam.box_thresh if cfg.cam.box_thresh >= 0 else bg_default
        self.c = len(class_names)
        self.overlays = set(overlays)
        if cfg.cam.crf and not crf_available():
            raise ImportError("cam.crf needs pydensecrf: pip install 'wsss_ray[crf]'")

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from wsss_ray.data.segmentation import decode_mask_bytes, encode_mask
        from wsss_ray.eval.miou import confusion_matrix
        from wsss_ray.eval.pgseg import overlay_png
        from wsss_ray.ops.crf import (
            confidence_filter,
            crf_image,
            dense_crf,
            pseudo_label,
            stack_background,
        )

        kinds = pl_kinds(self.cam)
        conf = np.zeros((len(kinds), self.c, self.c), np.int64)
        pngs, overlays = [], []
        for key, img, mask, labels in zip(
            batch["id"], batch["image"], batch["mask"], batch["labels"]
        ):  # noqa: E501
            image, gt = _decode(img), decode_mask_bytes(mask)
            labels = [int(c) for c in labels]
            cams, refined = self.model.seeds(
                image, labels, self.protos, self.cam.scale, self.cam.refine_layers, self.box,
                self.tau,
            )  # fmt: skip
            cam_label = pseudo_label(cams.numpy(), labels, self.cam.alpha)
            seed = pseudo_label(refined.numpy(), labels, self.cam.alpha)
            final = every = seed
            if self.cam.crf:
                scores = stack_background(refined.numpy(), self.cam.alpha)
                post = dense_crf(crf_image(image, self.cam.crf_input), scores)
                final = confidence_filter(post, self.cam.conf_thresh, 255, [0, *labels])
                every = confidence_filter(post, 0.0, 255, [0, *labels])
            conf[0] += confusion_matrix(cam_label, gt, self.c)
            conf[1] += confusion_matrix(seed, gt, self.c)
            valid = final != 255  # pseudo-label quality on the pixels it labels
            conf[2] += confusion_matrix(np.where(valid, final, 0), np.where(valid, gt, 255), self.c)
            conf[3] += confusion_matrix(every, gt, self.c)
            for i, a in enumerate(self.cam.alpha_sweep):
                swept = pseudo_label(refined.numpy(), labels, a)
                conf[len(PL_KINDS) + i] += confusion_matrix(swept, gt, self.c)
            pngs.append(encode_mask(final))
            overlays.append(overlay_png(image, gt, final) if str(key) in self.overlays else b"")
        n = len(pngs)
        confs = np.zeros((n, *conf.shape), np.int64)
        confs[0] = conf
        return {
            "id": batch["id"],
            "png": np.array(pngs + [None], dtype=object)[:-1],
            "overlay": np.array(overlays + [None], dtype=object)[:-1],
            "confusion": confs,
        }


def run_pseudo_labels(cfg: VPLConfig) -> dict[str, Any]:
    """Seeds and pseudo-labels for a whole split; returns the mIoUs."""
    from wsss_ray.data.segmentation import segmentation_dataset
    from wsss_ray.eval.miou import iou_from_confusion
    from wsss_ray.runtime import start_ray

    out, folder = _folder(cfg)
    config_file = save_resolved(cfg, folder)
    source = _source(cfg, out)
    mode = cfg.cam.prototypes
    if mode == "vision" and not prototype_file(cfg).is_file():
        raise FileNotFoundError(
            f"no vision prototypes at {prototype_file(cfg)}: run jobs/vpl_prototypes.py with "
            "the same config first, or set cam.prototype_file"
        )
    vision = None
    if mode == "vision":  # read here and shipped to the actors: workers need no shared folder
        saved = torch.load(prototype_file(cfg), map_location="cpu", weights_only=True)
        vision = (saved["W"].float(), float(saved.get("tau_i", cfg.prototypes.tau_i)))
    box_default = 0.7 if source.name == "coco" else 0.4
    label_dir = folder / f"pseudo_labels_{mode}"
    label_dir.mkdir(exist_ok=True)
    n_img = len(source.records)
    step = max(1, n_img // max(cfg.num_overlays, 1))
    overlay_ids = [r.id for r in source.records[::step][: cfg.num_overlays]]
    print(
        f"[wsss_ray] VPL pseudo-labels ({mode} prototypes): {source.name} {source.split}, "
        f"{n_img} images -> {label_dir}",
        flush=True,
    )
    inf = cfg.infer
    start_ray(inf.actors[1] * inf.cpus_per_actor + 1, cfg.ray.num_cpus)
    ds = segmentation_dataset(source).map_batches(
        PseudoLabeler,
        fn_constructor_args=(
            _clip_weights(cfg),
            source.class_names,
            box_default,
            overlay_ids,
            vision,
        ),
        **_actor_kwargs(cfg),
    )
    c = len(source.class_names)
    kinds = pl_kinds(cfg.cam)
    total = np.zeros((len(kinds), c, c), np.int64)
    (folder / f"overlays_{mode}").mkdir(exist_ok=True)
    done, t0, next_print = 0, time.perf_counter(), 0.1
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        total += batch["confusion"].sum(0)
        for key, png, ov in zip(batch["id"], batch["png"], batch["overlay"]):
            (label_dir / f"{key}.png").write_bytes(bytes(png))
            if len(ov):
                (folder / f"overlays_{mode}" / f"{key}.png").write_bytes(bytes(ov))
        done += len(batch["id"])
        if done / n_img >= next_print or done == n_img:
            _progress("pseudo-labels", done, n_img, t0)
            next_print = done / n_img + 0.1
    elapsed = time.perf_counter() - t0
    results = {k: iou_from_confusion(total[i], source.class_names) for i, k in enumerate(kinds)}
    metrics: dict[str, Any] = {}
    for k, r in results.items():
        metrics.update(r.metrics(f"{k}/"))
    if cfg.cam.alpha_sweep:  # CLIP-ES eval_cam.py: the best exponent of the sweep
        best = max(cfg.cam.alpha_sweep, key=lambda a: results[f"seed_alpha{a:g}"].miou)
        metrics["seed/best_alpha"] = float(best)
        metrics["seed/best_alpha_miou"] = percent(results[f"seed_alpha{best:g}"].miou)
    labelled = total[2].sum() / max(total[1].sum(), 1)
    metrics.update({"pseudo/coverage": percent(labelled), "images": done})
    metrics["images_per_s"] = done / max(elapsed, 1e-9)
    table = results["seed"].table()
    (folder / f"seed_miou_{mode}.txt").write_text(table + "\n")
    (folder / f"results_{mode}.json").write_text(json.dumps(metrics, indent=2))
    print(table)
    print(
        f"[wsss_ray] {mode} prototypes: CAM mIoU {100 * results['cam'].miou:.1f} | seed (CAA) "
        f"mIoU {100 * results['seed'].miou:.1f} | pseudo-label mIoU "
        f"{100 * results['pseudo'].miou:.1f} on {percent(labelled):.0f}% of pixels, "
        f"{100 * results['pseudo_all'].miou:.1f} on all (CLIP-ES --eval_only)"
        f"{_sweep_line(metrics)} | {done} images in {elapsed:.1f}s",
        flush=True,
    )
    files = [folder / f"seed_miou_{mode}.txt", folder / f"results_{mode}.json"]
    folders = {str(folder / f"overlays_{mode}"): f"overlays_{mode}"}
    _track(cfg, out, config_file, f"pseudo_{mode}", metrics, files, folders)
    metrics["output"] = str(folder)
    metrics["labels_dir"] = str(label_dir)
    return metrics
