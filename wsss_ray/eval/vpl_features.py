"""VPL phase 1's dense-feature cache (``jobs/vpl_prototypes.py``): the frozen CLIP's normalised
patch features and patch labels of every image, computed once by Ray Data batch inference into
``features/shard_*.npz`` (a finished shard is never recomputed, so an interrupted run resumes),
read back for the prototype solve; and the patch accuracy of a set of prototypes on them."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsss_ray.config import VPLConfig


def patch_labels(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """The ground-truth class at each patch centre (nearest pixel), h*w uint8."""
    h, w = grid
    ys = ((np.arange(h) + 0.5) * mask.shape[0] / h).astype(int).clip(0, mask.shape[0] - 1)
    xs = ((np.arange(w) + 0.5) * mask.shape[1] / w).astype(int).clip(0, mask.shape[1] - 1)
    return mask[np.ix_(ys, xs)].reshape(-1).astype(np.uint8)


def _decode(img_bytes: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(bytes(img_bytes))).convert("RGB"))


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class FeatureExtractor:
    """Ray Data actor: a batch of images -> per image its patch features (float16), patch
    ground truth (for diagnostics only) and image-level labels."""

    def __init__(self, cfg: VPLConfig, class_names: list[str]):
        from wsss_ray.eval.vpl import VPLModel  # the model side lives there

        self.model = VPLModel.for_config(cfg, class_names, _device())
        self.scale = cfg.cam.scale
        self.keep = cfg.prototypes.patches_per_image
        self.seed = cfg.seed

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import zlib

        from wsss_ray.data.segmentation import decode_mask_bytes

        feats, gts = [], []
        for key, img, mask in zip(batch["id"], batch["image"], batch["mask"]):
            f, grid = self.model.features(_decode(img), self.scale)
            gt = patch_labels(decode_mask_bytes(mask), grid)
            if self.keep and f.shape[0] > self.keep:
                rng = np.random.default_rng([self.seed, zlib.crc32(str(key).encode())])
                idx = np.sort(rng.choice(f.shape[0], self.keep, replace=False))
                f, gt = f[idx], gt[idx]
            feats.append(f.half().cpu().numpy())
            gts.append(gt)
        return {
            "id": batch["id"],
            "labels": batch["labels"],
            "feats": np.array(feats + [None], dtype=object)[:-1],
            "patch_gt": np.array(gts + [None], dtype=object)[:-1],
        }


# ----------------------------------------------------------------------------- shared driver bits
def _folder(cfg: VPLConfig) -> tuple[Path, Path]:
    out = Path(cfg.run.output_dir).resolve()
    folder = out / cfg.run.name
    folder.mkdir(parents=True, exist_ok=True)
    return out, folder


def _source(cfg: VPLConfig, out: Path):
    from wsss_ray.eval.datasets import resolve_source

    source = resolve_source(cfg.data, out)
    if not source.records:
        raise ValueError(f"{cfg.data.kind} split '{cfg.data.split}' has no images")
    return source


def _clip_weights(cfg: VPLConfig) -> VPLConfig:
    """A copy with the weights path made absolute (actors may run elsewhere)."""
    import copy

    cfg = copy.deepcopy(cfg)
    cfg.clip.weights = str(Path(cfg.clip.weights).resolve())
    return cfg


def _actor_kwargs(cfg: VPLConfig) -> dict[str, Any]:
    import ray

    from wsss_ray.runtime import cluster_has_gpus

    inf = cfg.infer
    gpus = inf.gpus_per_actor if inf.gpus_per_actor >= 0 else float(cluster_has_gpus())
    return {
        "batch_size": inf.batch_size,
        "compute": ray.data.ActorPoolStrategy(min_size=inf.actors[0], max_size=inf.actors[1]),
        "num_cpus": inf.cpus_per_actor,
        "num_gpus": gpus,
        "batch_format": "numpy",
    }


def _progress(label: str, done: int, total: int, t0: float) -> None:
    rate = done / max(time.perf_counter() - t0, 1e-9)
    print(f"[wsss_ray] {label} {done}/{total} images ({rate:.1f} images/s)", flush=True)


# ----------------------------------------------------------------------------- features + solve
def feature_shards(folder: Path) -> list[Path]:
    return sorted((folder / "features").glob("shard_*.npz"))


def cache_features(cfg: VPLConfig, source, folder: Path) -> list[Path]:
    """Compute the dense features of every image whose shard is not on disk yet."""
    from wsss_ray.data.segmentation import SegSource, segmentation_dataset
    from wsss_ray.runtime import start_ray

    feat_dir = folder / "features"
    feat_dir.mkdir(exist_ok=True)
    per = cfg.prototypes.shard_images
    shards = [source.records[i : i + per] for i in range(0, len(source.records), per)]
    shard_of = {r.id: k for k, recs in enumerate(shards) for r in recs}
    todo = [k for k in range(len(shards)) if not (feat_dir / f"shard_{k:05d}.npz").exists()]
    print(
        f"[wsss_ray] features: {len(source.records)} images in {len(shards)} shards, "
        f"{len(shards) - len(todo)} cached, {len(todo)} to compute",
        flush=True,
    )
    if todo:
        records = [r for k in todo for r in shards[k]]
        sub = SegSource(source.name, source.split, source.class_names, records, source.bg_thresh)
        inf = cfg.infer
        start_ray(inf.actors[1] * inf.cpus_per_actor + 1, cfg.ray.num_cpus)
        ds = segmentation_dataset(sub).map_batches(
            FeatureExtractor, fn_constructor_args=(_clip_weights(cfg), source.class_names),
            **_actor_kwargs(cfg),
        )  # fmt: skip
        pending: dict[int, dict[str, Any]] = {}
        done, t0, next_print = 0, time.perf_counter(), 0.1
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i, key in enumerate(batch["id"]):
                k = shard_of[str(key)]
                entry = pending.setdefault(k, {})
                entry[str(key)] = (batch["feats"][i], batch["patch_gt"][i], batch["labels"][i])
                if len(entry) == len(shards[k]):
                    _write_shard(feat_dir / f"shard_{k:05d}.npz", shards[k], entry)
                    del pending[k]
            done += len(batch["id"])
            if done / len(records) >= next_print or done == len(records):
                _progress("features", done, len(records), t0)
                next_print = done / len(records) + 0.1
    return feature_shards(folder)


def _write_shard(path: Path, records: list, entry: dict[str, tuple]) -> None:
    ids = [r.id for r in records]
    feats = [np.asarray(entry[i][0]) for i in ids]
    counts = np.array([len(f) for f in feats], np.int64)
    labels = json.dumps([[int(c) for c in entry[i][2]] for i in ids])
    tmp = path.with_suffix(".tmp.npz")
    np.savez(
        tmp,
        ids=np.array(ids),
        counts=counts,
        feats=np.concatenate(feats).astype(np.float16),
        patch_gt=np.concatenate([np.asarray(entry[i][1]) for i in ids]).astype(np.uint8),
        labels=np.array(labels),
    )
    tmp.replace(path)  # a shard is on disk whole or not at all


def load_features(paths: list[Path], num_fg: int, num_bg: int) -> dict[str, torch.Tensor]:
    """The cached features as the solver wants them: F (N x D float32), ``allowed``
    (N x (C + B): the image's classes + every background row) and patch ground truth."""
    feats, allowed, gts = [], [], []
    for p in paths:
        z = np.load(p)
        labels = json.loads(str(z["labels"]))
        rows = np.zeros((len(labels), num_fg + num_bg), bool)
        rows[:, num_fg:] = True
        for i, labs in enumerate(labels):
            rows[i, [c - 1 for c in labs]] = True
        allowed.append(np.repeat(rows, z["counts"], axis=0))
        feats.append(z["feats"].astype(np.float32))
        gts.append(z["patch_gt"])
    return {
        "F": torch.from_numpy(np.concatenate(feats)),
        "allowed": torch.from_numpy(np.concatenate(allowed)),
        "patch_gt": torch.from_numpy(np.concatenate(gts).astype(np.int64)),
    }


def patch_accuracy(
    F_: torch.Tensor,
    P: torch.Tensor,
    gt: torch.Tensor,
    num_fg: int,
    allowed: torch.Tensor | None = None,
) -> float:
    """Share of patches (gt != 255) whose argmax over the prototypes is their class (any
    background row counts as class 0). Over all classes by default (where the modality gap
    shows); with ``allowed`` only over the image's classes + background (what the target of the
    objective uses). Rows are used as they are: Z is unit-norm, W's row lengths are learned."""
    scores = F_ @ P.float().T
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    idx = scores.argmax(1)
    pred = torch.where(idx < num_fg, idx + 1, torch.zeros_like(idx))
    valid = gt != 255
    return float((pred[valid] == gt[valid]).float().mean()) if bool(valid.any()) else float("nan")
