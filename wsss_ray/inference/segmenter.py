"""Segment your own images with a trained model: ``Segmenter`` (no Ray here).

    from wsss_ray import Segmenter
    seg = Segmenter.from_checkpoint("outputs/demo/ray_results/pgseg_tiny")
    result = seg.predict([image], class_names=["cat", "dog", "sky"])[0]
    result.mask           # H x W uint8: 0 = background, i = result.class_names[i]
    result.areas          # {class name: fraction of the image}
    seg.overlay(image, result).save("overlay.jpg")

Two kinds of model:
- **PGSeg** (zero-shot): any class list, given per call, plus a background threshold;
- **VPL** phase 2 (a decoder on a frozen CLIP): the classes it was trained on.

``from_checkpoint`` takes a training run folder, a checkpoint folder or ``.pt`` (the run's
``config.yaml`` is found beside it, or given as ``config=``), a released GroupViT / PGSeg
``.pth`` (``size=``), a *segmenter package* (what :meth:`Segmenter.save` writes: a folder with
``segmenter.json`` and the weights, self-contained, CLIP included), or an MLflow model URI
(``models:/NAME/1``, ``runs:/<id>/segmenter``). It uses the GPU when there is one.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

PACKAGE_FILE = "segmenter.json"
#: at most this many classes in one call (each one is a text embedding and a score map)
MAX_CLASSES = 512


@dataclass
class SegResult:
    """One image's segmentation: ``mask`` (H x W uint8, values index ``class_names``, 0 is
    background) and ``areas`` (class name -> fraction of the pixels, present classes only)."""

    mask: np.ndarray
    class_names: list[str]
    areas: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"classes": self.class_names, "areas": self.areas, "size": list(self.mask.shape)}


def _areas(mask: np.ndarray, names: list[str]) -> dict[str, float]:
    counts = np.bincount(mask.reshape(-1), minlength=len(names))[: len(names)]
    total = max(int(mask.size), 1)
    return {names[i]: float(c) / total for i, c in enumerate(counts) if c}


def _as_rgb(image: Any) -> np.ndarray:
    """H x W x 3 uint8 from a PIL image, an array, a path or encoded bytes."""
    from PIL import Image

    if isinstance(image, bytes | bytearray):
        image = Image.open(io.BytesIO(image))
    elif isinstance(image, str | os.PathLike):
        image = Image.open(image)
    if isinstance(image, Image.Image):
        from PIL import ImageOps

        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"want an H x W x 3 uint8 RGB image, got {arr.shape} {arr.dtype}")
    return arr


def clean_class_names(class_names: Any) -> list[str]:
    """A list of class names from a list or a comma-separated string; ValueError for an empty
    list, an empty name, a duplicate or more than :data:`MAX_CLASSES`."""
    if isinstance(class_names, str):
        class_names = class_names.split(",")
    names = [str(n).strip() for n in class_names]
    if not names or not any(names):
        raise ValueError("give at least one class name")
    if any(not n for n in names):
        raise ValueError("empty class name in the list")
    if len(names) > MAX_CLASSES:
        raise ValueError(f"{len(names)} classes: at most {MAX_CLASSES} per call")
    if len(set(names)) != len(names):
        raise ValueError("duplicate class names")
    if "background" in names:
        raise ValueError("'background' is always class 0: leave it out of the list")
    return names


class Segmenter:
    """A trained PGSeg or VPL model behind one ``predict``; see the module docstring."""

    def __init__(self, kind: str, spec: dict[str, Any], weights: dict[str, Any], device=None):
        self.kind = kind
        self.spec = spec
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if kind == "pgseg":
            from wsss_ray.models.pgseg import load_for_inference

            self.model, _ = load_for_inference(
                spec["size"], weights["model"], spec["text_act"], "segmenter"
            )
            self.model.to(self.device).eval()
            self._cache: dict[tuple, Any] = {}
        elif kind == "vpl":
            from wsss_ray.models.clip import DenseCLIP, load_frozen_clip
            from wsss_ray.tasks.vpl import build_decoder

            clip = load_frozen_clip(
                spec["clip"]["name"], state_dict=weights["clip"], origin="other"
            )
            self.dense = DenseCLIP(clip).to(self.device).eval()
            dec = _Sections(spec["decoder"])
            self.decoder = build_decoder(self.dense, len(spec["class_names"]), dec)
            self.decoder.load_state_dict(weights["decoder"])
            self.decoder.to(self.device).eval()
        else:
            raise ValueError(f"unknown segmenter kind {kind!r}")

    # ------------------------------------------------------------------------- loading
    @classmethod
    def from_checkpoint(
        cls,
        source: str | os.PathLike,
        config: str | os.PathLike | None = None,
        device: str | None = None,
        size: str = "",
        bg_thresh: float | None = None,
    ) -> Segmenter:
        """See the module docstring. ``bg_thresh`` overrides a PGSeg model's background
        threshold (default 0.95, VOC's)."""
        src = str(source)
        if src.startswith(("models:/", "runs:/")) or "://" in src and not os.path.exists(src):
            import mlflow

            src = mlflow.artifacts.download_artifacts(src)
        path = Path(src)
        if not path.exists():
            raise FileNotFoundError(f"no such checkpoint, package or run folder: {source}")
        package = _find_package(path)
        if package is not None:
            seg = cls.load(package, device)
        else:
            seg = cls._from_training(path, config, device, size)
        if bg_thresh is not None and seg.kind == "pgseg":
            seg.spec["bg_thresh"] = float(bg_thresh)
        return seg

    @classmethod
    def _from_training(cls, path: Path, config, device, size: str) -> Segmenter:
        from omegaconf import OmegaConf

        from wsss_ray.eval.checkpoint import load_state_dict

        cfg_file = Path(config) if config else _find_config(path)
        if cfg_file is None:
            if path.is_file() and size:  # a released GroupViT / PGSeg .pth
                return cls(
                    "pgseg", _pgseg_spec(size, "quick_gelu", None), {"model": _model(path)}, device
                )
            raise FileNotFoundError(
                f"no config.yaml for {path}: give config= (the run's <output_dir>/<run.name>/"
                "config.yaml), or size= for a released GroupViT / PGSeg .pth"
            )
        cfg = OmegaConf.to_container(OmegaConf.load(cfg_file), resolve=True)
        task = cfg.get("task")
        if task == "pgseg":
            m = cfg["model"]
            spec = _pgseg_spec(m["size"], m.get("text_act", "quick_gelu"), cfg)
            return cls("pgseg", spec, {"model": _model(path)}, device)
        if task == "vpl_seg":
            from wsss_ray.eval.vpl import frozen_clip

            c = cfg["clip"]
            clip = frozen_clip(c["name"], c["weights"], c.get("origin", "auto"))
            decoder = load_state_dict(str(path), prefix="decoder.")
            test = cfg.get("eval", {}).get("test", {})
            spec = {
                "clip": {"name": c["name"]},
                "decoder": cfg["decoder"],
                "test": {**test, "scales": [1.0, 0.75], "flip": True},
                "class_names": _vpl_class_names(cfg, decoder),
                "mean": cfg["data"]["mean"],
                "std": cfg["data"]["std"],
            }
            return cls("vpl", spec, {"clip": clip.state_dict(), "decoder": decoder}, device)
        raise ValueError(f"{cfg_file}: task {task!r} has no segmenter (pgseg or vpl_seg runs)")

    def save(self, folder: str | os.PathLike) -> Path:
        """A self-contained package: ``segmenter.json`` and the weights (``model.pt`` for PGSeg;
        ``decoder.pt`` and ``clip.pt`` for VPL)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.kind == "pgseg":
            weights = {"model": self.model.state_dict()}
        else:
            weights = {"clip": self.dense.clip.state_dict(), "decoder": self.decoder.state_dict()}
        for name, state in weights.items():
            torch.save({k: v.detach().cpu() for k, v in state.items()}, folder / f"{name}.pt")
        doc = {"kind": self.kind, "spec": self.spec, "weights": sorted(weights)}
        (folder / PACKAGE_FILE).write_text(json.dumps(doc, indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, device: str | None = None) -> Segmenter:
        folder = Path(folder)
        doc = json.loads((folder / PACKAGE_FILE).read_text())
        weights = {
            name: torch.load(folder / f"{name}.pt", map_location="cpu", weights_only=True)
            for name in doc["weights"]
        }
        return cls(doc["kind"], doc["spec"], weights, device)

    # ------------------------------------------------------------------------- inference
    @property
    def class_names(self) -> list[str]:
        """The default classes (without background): a PGSeg model's training-time validation
        classes, a VPL model's training classes."""
        return list(self.spec.get("class_names", []))[1:]

    def predict(self, images: list[Any], class_names: Any = None) -> list[SegResult]:
        """One :class:`SegResult` per image (same size as the image). ``class_names``: a list or
        comma-separated string (PGSeg: any words; VPL: must be left out or equal its classes)."""
        if not isinstance(images, list | tuple):
            images = [images]
        arrays = [_as_rgb(im) for im in images]
        if self.kind == "vpl":
            names = self.spec["class_names"]
            if class_names is not None and clean_class_names(class_names) != names[1:]:
                raise ValueError(
                    "this VPL model segments the classes it was trained on: " + ", ".join(names[1:])
                )
            masks = [self._vpl_mask(a) for a in arrays]
        else:
            given = class_names if class_names is not None else self.class_names
            names = ["background", *clean_class_names(given)]
            seg = self._zero_shot(names)
            with torch.no_grad():
                masks = [seg.predict(a) for a in arrays]
        return [SegResult(m, list(names), _areas(m, names)) for m in masks]

    def _zero_shot(self, names: list[str]):
        from wsss_ray.config import ZeroShotConfig
        from wsss_ray.eval.pgseg import segmenter_for

        key = tuple(names), self.spec["bg_thresh"]
        if key not in self._cache:
            self._cache.clear()
            zs = ZeroShotConfig(**self.spec["zero_shot"])
            self._cache[key] = segmenter_for(
                self.model, self.spec["size"], names, zs, self.spec["bg_thresh"], self.device,
                self.spec["mean"], self.spec["std"], dataset="custom",
            )  # fmt: skip
        return self._cache[key]

    @torch.no_grad()
    def _vpl_mask(self, image: np.ndarray) -> np.ndarray:
        from wsss_ray.data.gpu_decode import normalize_images
        from wsss_ray.tasks.vpl import predict_probs

        t = self.spec["test"]
        x = torch.from_numpy(image.copy())[None].to(self.device)
        x = normalize_images(x, self.spec["mean"], self.spec["std"])
        probs = predict_probs(
            self.dense, self.decoder, x, list(t.get("scales", [1.0])), bool(t.get("flip", False)),
            t.get("protocol", "ours"), int(t.get("long_side", 512)),
        )  # fmt: skip
        return probs.argmax(0).cpu().numpy().astype(np.uint8)

    def overlay(self, image: Any, result: SegResult, alpha: float = 0.5):
        """The image with the mask blended in (VOC palette) and a legend of the classes
        present, as a PIL image."""
        from wsss_ray.inference.render import overlay_with_legend

        return overlay_with_legend(_as_rgb(image), result.mask, result.class_names, alpha)


def segmenter_from_run(checkpoint: str, config_file: str) -> Segmenter:
    """The registry's ``package`` hook of PGSeg and VPL: a finished run's Segmenter, on CPU."""
    return Segmenter.from_checkpoint(checkpoint, config=config_file, device="cpu")


class _Sections(dict):
    """Attribute access to a decoder section read back from JSON."""

    __getattr__ = dict.get


def _pgseg_spec(size: str, text_act: str, cfg: dict | None) -> dict[str, Any]:
    from wsss_ray.config import IMAGENET_MEAN, IMAGENET_STD, ZeroShotConfig

    zs = asdict(ZeroShotConfig())
    names: list[str] = []
    mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    if cfg is not None:
        zs.update(cfg.get("eval", {}).get("zero_shot", {}))
        mean, std = cfg["data"]["mean"], cfg["data"]["std"]
        names = _dataset_names(cfg.get("eval", {}).get("data", {}))
    zs["class_names"] = "readable"
    return {
        "size": size,
        "text_act": text_act,
        "zero_shot": zs,
        "bg_thresh": 0.95 if zs.get("bg_thresh", -1) < 0 else float(zs["bg_thresh"]),
        "class_names": names,
        "mean": list(mean),
        "std": list(std),
    }


def _dataset_names(data: dict) -> list[str]:
    """The class names (with background) a segmentation data section names."""
    from wsss_ray.data.coco import COCO_CLASSES
    from wsss_ray.data.context import CONTEXT_CLASSES
    from wsss_ray.data.segmentation import class_names_override
    from wsss_ray.data.synthetic import CLASS_NAMES
    from wsss_ray.data.voc import VOC_CLASSES

    kind, root = data.get("kind", "voc"), data.get("root", "")
    if not root:
        return list(CLASS_NAMES)  # the synthetic VOC-layout world
    default = {"coco": COCO_CLASSES, "context": CONTEXT_CLASSES}.get(kind, VOC_CLASSES)
    return class_names_override(Path(root), default)


def _vpl_class_names(cfg: dict, decoder: dict[str, torch.Tensor]) -> list[str]:
    names = _dataset_names(cfg["data"]["seg"])
    k = int(decoder["classifier.weight"].shape[0])
    if len(names) != k:
        raise ValueError(f"the decoder has {k} classes, its dataset {len(names)}")
    return names


def _model(path: Path) -> dict[str, torch.Tensor]:
    from wsss_ray.eval.checkpoint import load_state_dict

    return load_state_dict(str(path))


def _find_package(path: Path) -> Path | None:
    for cand in (path, path / "artifacts" / "segmenter", path / "segmenter"):
        if (cand / PACKAGE_FILE).is_file():
            return cand
    return None


def _find_config(path: Path) -> Path | None:
    """``config.yaml`` of a training run: in the folder, beside a checkpoint, or in
    ``<output_dir>/<run.name>/`` for a run folder under ``<output_dir>/ray_results/``."""
    p = path if path.is_dir() else path.parent
    run = p
    while run.name.startswith("checkpoint") and run != run.parent:
        run = run.parent
    cands = [p / "config.yaml", run / "config.yaml"]
    if run.parent.name == "ray_results":
        cands.append(run.parent.parent / run.name / "config.yaml")
    return next((c for c in cands if c.is_file()), None)
