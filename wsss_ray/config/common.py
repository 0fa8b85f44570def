"""The sections every Ray Train job shares (data, optimiser, training, scaling, run, tracking,
Ray) and the CLIP pretraining job, each with the checks of its own keys."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field

from omegaconf import MISSING

from wsss_ray.config.base import CLIP_MEAN, CLIP_STD, ConfigError, _f, need


@dataclass
class SyntheticDataConfig:
    num_images: int = _f(512, "images in the generated shapes world")
    image_size: int = _f(128, "side of the generated images (pixels)")
    samples_per_shard: int = _f(128, "samples per generated WebDataset shard")
    seed: int = _f(0, "generator seed (same seed, same bytes)")


@dataclass
class DecodeConfig:
    """The augmentation and decode-actor keys of every training data section."""

    hflip: bool = _f(True, "random horizontal flip")
    mean: list[float] = _f(CLIP_MEAN, "normalisation mean (RGB)")
    std: list[float] = _f(CLIP_STD, "normalisation std (RGB)")
    decode_batch_size: int = _f(256, "rows per map_batches call of the decode actors")
    decode_actors: list[int] = _f([1, 2], "decode actor pool size (min, max)")
    cpus_per_decode_actor: float = _f(1.0, "logical CPUs per decode actor")
    local_shuffle_buffer: int = _f(0, "iter_torch_batches local shuffle buffer (0 = off)")

    def check_decode(self) -> None:
        """``decode_actors`` and ``mean/std``."""
        actors = self.decode_actors
        need(
            len(actors) == 2 and 1 <= actors[0] <= actors[1],
            "data.decode_actors",
            "needs (min, max) with 1 <= min <= max",
        )
        need(len(self.mean) == 3 and len(self.std) == 3, "data.mean", "mean and std need 3 values")


@dataclass
class DataConfig(DecodeConfig):
    train_shards: list[str] = _f(
        [], "WebDataset tar files, directories of tars or globs; empty = generate synthetic shards"
    )
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    image_size: int = _f(224, "training crop side")
    crop_scale: list[float] = _f([0.08, 1.0], "RandomResizedCrop area range")
    decode_device: str = _f(
        "auto",
        "auto (cuda when scaling.use_gpu, else cpu) | cpu (decode actors decode) | "
        "cuda (actors parse, train workers decode on GPU)",
    )
    reader: str = _f(
        "fused",
        "fused (each decode actor reads its own tars; parallelism <= number of shards) | "
        "read_webdataset (read tasks pass raw bytes to the decode actors)",
    )
    passes_per_execution: int = _f(
        1,
        "epochs per Ray Data execution (fused reader): every shard is listed this many times, "
        "in one shuffled order, so the decode actors start once per N epochs, not every epoch",
    )
    exact_resume: bool = _f(
        True,
        "fused reader: checkpoints record the samples consumed (by id), a resume goes on "
        "mid-epoch with exactly the rest, for any number of workers",
    )
    record_samples: bool = _f(
        False,
        "write the ids of the samples each worker consumed, per report, under "
        "<run storage>/samples/ (an audit of what the model saw; needs exact_resume)",
    )

    def check(self, use_gpu: bool) -> None:
        self.check_decode()
        need(
            self.decode_device in ("auto", "cpu", "cuda"), "data.decode_device", "auto | cpu | cuda"
        )
        if self.decode_device == "auto":
            self.decode_device = "cuda" if use_gpu else "cpu"
        need(self.reader in ("fused", "read_webdataset"), "data.reader", "fused | read_webdataset")
        need(self.passes_per_execution >= 1, "data.passes_per_execution", "must be >= 1")
        need(
            self.passes_per_execution == 1 or self.reader == "fused",
            "data.passes_per_execution",
            "needs data.reader=fused (read_webdataset runs one pass per execution)",
        )
        need(
            self.decode_device == "cpu" or use_gpu,
            "data.decode_device",
            "cuda decodes on the train workers' GPUs: needs scaling.use_gpu=true",
        )
        need(
            not self.record_samples or (self.exact_resume and self.reader == "fused"),
            "data.record_samples",
            "needs data.exact_resume=true and data.reader=fused (its ids come from that reader)",
        )
        need(len(self.crop_scale) == 2, "data.crop_scale", "needs two numbers (min, max)")
        lo_hi = self.crop_scale
        need(0 < lo_hi[0] <= lo_hi[1] <= 1, "data.crop_scale", "0 < min <= max <= 1")
        check_paths("data.train_shards", self.train_shards)  # kept as given: expanded on use


@dataclass
class OptimConfig:
    lr: float = _f(1e-4, "peak learning rate")
    min_lr: float = _f(1e-5, "final learning rate of the cosine schedule")
    warmup_start_lr: float = _f(1e-6, "learning rate at step 0 of the warm-up")
    warmup_steps: int = _f(0, "linear warm-up steps")
    weight_decay: float = _f(0.05, "AdamW weight decay (not applied to 1-d params)")
    betas: list[float] = _f([0.9, 0.999], "AdamW betas")
    eps: float = _f(1e-8, "AdamW eps")
    grad_clip: float = _f(5.0, "gradient clipping norm (0 = off)")
    decay_logit_scales: bool = _f(
        False, "weight decay on the logit scales too (the GroupViT/PGSeg optimizer decays them)"
    )
    schedule: str = _f(
        "cosine",
        "after the warm-up: cosine (to min_lr, over the steps after it) | timm_cosine (timm's "
        "CosineLRScheduler as GroupViT/PGSeg: cosine of the absolute step) | poly (to 0)",
    )
    poly_power: float = _f(0.9, "power of the poly schedule")

    def check(self) -> None:
        need(
            self.schedule in ("cosine", "timm_cosine", "poly"),
            "optim.schedule",
            "cosine | timm_cosine | poly",
        )


@dataclass
class TrainConfig:
    max_steps: int = _f(0, "optimizer steps to train (or give max_samples)")
    max_samples: int = _f(0, "samples to see in total, converted to steps")
    batch_size_per_worker: int = _f(32, "micro-batch per worker")
    grad_accum: int = _f(1, "gradient accumulation micro-steps per optimizer step")
    log_every: int = _f(10, "report metrics every N steps")
    ckpt_every: int = _f(100, "checkpoint every M steps (and at the end)")
    max_nonfinite: int = _f(5, "stop after this many non-finite losses in a row")
    stall_reports: int = _f(
        5,
        "warn when the loss stops moving or the gradient norm collapses/explodes for this many "
        "reports in a row; still so at the end = the job exits 1 (0 = off)",
    )
    seed: int = _f(0, "random seed")
    zero_stage: int = _f(2, "DeepSpeed ZeRO stage (0-3); one fp32 worker runs stage 0")
    precision: str = _f("auto", "auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32")
    compile: bool = _f(False, "torch.compile the image and text encoders (eager if it fails)")
    grad_checkpointing: bool = _f(False, "recompute transformer blocks in the backward")
    tf32: bool = _f(False, "TF32 matmuls and convolutions on CUDA workers (ignored on CPU)")
    fused_adamw: bool = _f(True, "torch AdamW with fused=True on CUDA workers (ignored on CPU)")

    def check(self) -> None:
        need(
            self.max_steps > 0 or self.max_samples > 0,
            "train.max_steps",
            "give max_steps or max_samples",
        )
        need(self.batch_size_per_worker > 0, "train.batch_size_per_worker", "must be > 0")
        need(self.grad_accum >= 1, "train.grad_accum", "must be >= 1")
        need(self.log_every > 0, "train.log_every", "must be > 0")
        need(self.ckpt_every > 0, "train.ckpt_every", "must be > 0")
        need(self.zero_stage in (0, 1, 2, 3), "train.zero_stage", "must be 0, 1, 2 or 3")
        need(self.precision in ("auto", "bf16", "fp32"), "train.precision", "auto | bf16 | fp32")


@dataclass
class ScalingConfig:
    num_workers: int = _f(2, "Ray Train workers")
    use_gpu: bool = _f(False, "one GPU per worker, NCCL, bf16")
    cpus_per_worker: float = _f(1.0, "logical CPUs per train worker")
    resources_per_worker: dict[str, float] = _f({}, "extra Ray resources per worker")
    startup_timeout_s: float = _f(
        600.0,
        "on a joined cluster (RAY_ADDRESS), how long to wait for room for the workers (an "
        "autoscaler adding nodes) before exit 2; the embedded local Ray fails at once",
    )

    def check(self) -> None:
        need(self.num_workers >= 1, "scaling.num_workers", "must be >= 1")
        need(self.startup_timeout_s >= 0, "scaling.startup_timeout_s", "must be >= 0")


@dataclass
class RunConfig:
    name: str = _f("run", "run name: same storage_path + name resumes")
    output_dir: str = _f("outputs", "local folder for the resolved config, MLflow db, data")
    storage_path: str = _f(
        "", "Ray Train storage (local, s3://, gs://, NFS); '' = <output_dir>/ray_results"
    )
    num_checkpoints_to_keep: int = _f(2, "checkpoints kept in storage")
    max_failures: int = _f(0, "worker-group restarts before the run fails (-1 = unlimited)")

    def check(self) -> None:
        need(bool(self.name.strip()), "run.name", "must not be empty")


@dataclass
class TrackingConfig:
    enabled: bool = _f(True, "log to MLflow")
    uri: str = _f("", "tracking URI; '' = sqlite:///<output_dir>/mlflow.db; env overrides")
    experiment: str = _f("wsss_ray", "MLflow experiment name")
    log_model: bool = _f(
        True, "training jobs: log the final model as an MLflow model (pyfunc; PGSeg and VPL)"
    )
    register_as: str = _f("", "also register that model under this name ('' = do not)")


@dataclass
class RayConfig:
    num_cpus: int = _f(0, "embedded Ray only: logical CPUs (0 = enough for the job)")


@dataclass
class ClipModelConfig:
    name: str = _f("wsss-tiny", "open_clip architecture name (wsss-tiny for CPU)")
    pretrained: str = _f("", "local weights file to start from ('' = random init)")
    init_logit_scale: float = _f(1 / 0.07, "initial logit scale s (learnable, exp-parametrised)")
    max_logit_scale: float = _f(100.0, "clamp on the logit scale")


@dataclass
class TrainJobConfig:
    """Sections shared by every Ray Train job; tasks add a ``model`` section."""

    task: str = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def check(self) -> None:
        """The shared sections; a job adds its own after calling this."""
        self.optim.check()
        self.train.check()
        self.scaling.check()
        self.run.check()
        self.data.check(self.scaling.use_gpu)  # VPL phase 2 has a data section of its own


@dataclass
class ClipPretrainConfig(TrainJobConfig):
    task: str = "clip"
    model: ClipModelConfig = field(default_factory=ClipModelConfig)

    def check(self) -> None:
        super().check()
        check_pretrained(self.model.pretrained)


def check_pretrained(path: str, folder_ok: bool = False) -> None:
    """``model.pretrained``: '' or an existing weights file (or folder, where allowed)."""
    if path:
        need(
            os.path.isfile(path) or (folder_ok and os.path.isdir(path)),
            "model.pretrained",
            f"weights file not found: {path}",
        )


def _is_remote(entry: str) -> bool:
    return entry.startswith(("s3://", "gs://", "gcs://", "abfs://"))


def check_paths(key: str, entries: list[str]) -> None:
    """Each local entry (tar, folder of tars, glob) names at least one tar: the check of
    :func:`expand_paths` without listing everything (a folder of 30,000 shards stays one entry
    in the config, its list is written at run start)."""
    for entry in entries:
        if _is_remote(entry):
            continue
        pattern = os.path.join(entry, "**", "*.tar") if os.path.isdir(entry) else entry
        if next(glob.iglob(pattern, recursive=os.path.isdir(entry)), None) is None:
            raise ConfigError(f"config error: {key}: no such file or no .tar files in '{entry}'")


def expand_paths(key: str, entries: list[str]) -> list[str]:
    """Tar files, folders of tars (recursive) and globs -> the sorted tar paths; object-store
    URLs pass as they are."""
    files: list[str] = []
    for entry in entries:
        if _is_remote(entry):
            files.append(entry)
            continue
        if os.path.isdir(entry):
            found = sorted(glob.glob(os.path.join(entry, "**", "*.tar"), recursive=True))
        else:
            found = sorted(glob.glob(entry))
        if not found:
            raise ConfigError(f"config error: {key}: no such file or no .tar files in '{entry}'")
        files.extend(os.path.abspath(f) for f in found)
    return files
