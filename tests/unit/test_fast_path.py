"""The training fast path (docs/PERFORMANCE.md), each option against the reference computation:
overlapped Hungarian matching vs synchronous, device-side metric sums vs host floats, activation
checkpointing vs plain backward, compiled encoders vs eager, worker-side JPEG decode vs the decode
actors, the ZeRO stage for one worker, and the new config checks."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from wsss_ray.config import ConfigError, PGSegPretrainConfig, load_config
from wsss_ray.models.pgseg import SIZES
from wsss_ray.ops.matching import hungarian_match, hungarian_match_async
from wsss_ray.tasks import build_task
from wsss_ray.train.deepspeed_config import deepspeed_config, zero_stage

TINY = "configs/pgseg/tiny.yaml"
TWO_STAGES = ["model.size=tiny"]  # the demo config uses tiny_seg; these tests need both stages


def _batch(b: int = 4) -> dict[str, torch.Tensor]:
    s = SIZES["tiny"]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 1000, (b, s.context_length), generator=g)
    tokens[:, 9:] = 0
    image = torch.randn(b, 3, s.image_size, s.image_size, generator=g)
    return {"image": image, "text": tokens}


def _task(overrides: list[str] | None = None):
    torch.manual_seed(0)
    return build_task(load_config(PGSegPretrainConfig, TINY, TWO_STAGES + (overrides or [])))


def _forward_backward(task, seed: int = 1):
    torch.manual_seed(seed)  # the Gumbel noise
    losses, metrics = task.training_forward(_batch())
    total = sum(v for k, v in losses.items() if k.endswith("_loss"))
    total.backward()
    grads = {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}
    task.zero_grad(set_to_none=True)
    return losses, metrics, grads


# ---------------------------------------------------------------------------- 1: matching
def test_async_matching_equals_sync():
    g = torch.Generator().manual_seed(3)
    for k in (8, 64):  # serial and threaded solves
        groups, protos = torch.randn(70, k, 16, generator=g), torch.randn(70, k, 16, generator=g)
        for maximize in (True, False):
            sync = hungarian_match(groups, protos, maximize=maximize)
            pending = hungarian_match_async(groups, protos, maximize=maximize)
            assert torch.equal(pending.result(), sync)


def test_task_overlapped_matching_is_identical_to_synchronous():
    overlapped = _task(["npr.text_mode=tokens"])  # two identical tasks: EM's EMA buffers
    synchronous = _task(["npr.text_mode=tokens"])  # move with every forward
    assert overlapped.overlap_matching
    synchronous.overlap_matching = False
    losses_a, metrics_a, grads_a = _forward_backward(overlapped)
    losses_b, metrics_b, grads_b = _forward_backward(synchronous)
    assert set(losses_a) == set(losses_b) == {"it_loss", "pg1_loss", "pg2_loss", "pg_text_loss"}
    for k in losses_a:
        assert torch.equal(losses_a[k], losses_b[k]), k
    assert set(metrics_a) == set(metrics_b)
    for k in metrics_a:
        assert torch.equal(metrics_a[k], metrics_b[k]), k
    assert grads_a.keys() == grads_b.keys()
    for k in grads_a:
        assert torch.equal(grads_a[k], grads_b[k]), k


# ------------------------------------------------------------------------- 2: host syncs
def test_task_metrics_are_detached_device_tensors():
    _, metrics, _ = _forward_backward(_task())
    for k, v in metrics.items():
        assert isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad, k
    for k in ("hrs_kept_1", "hrs_kept_2", "group_usage_1", "group_usage_2"):
        assert 0 <= float(metrics[k]) <= 1


def test_prototype_loss_kept_tensor_equals_fraction():
    from wsss_ray.losses.prototype import PrototypeLoss, hard_rejection_keep

    g = torch.Generator().manual_seed(1)
    groups, protos = torch.randn(3, 8, 16, generator=g), torch.randn(3, 8, 16, generator=g)
    _, kept = PrototypeLoss(phi=0.3)(groups, protos, torch.zeros(1))
    cos = torch.nn.functional.normalize(groups, dim=-1) @ torch.nn.functional.normalize(
        protos, dim=-1
    ).transpose(1, 2)
    # one mask per CE term: over the groups (per prototype) and over the prototypes (per group)
    both = torch.cat([hard_rejection_keep(cos, 0.3), hard_rejection_keep(cos.transpose(1, 2), 0.3)])
    expected = both.float().mean().item()
    assert isinstance(kept, torch.Tensor) and kept.item() == expected


def test_window_sums_tensors_once_like_host_floats():
    from wsss_ray.train.monitor import _Window

    g = torch.Generator().manual_seed(2)
    steps = [
        (
            {"a_loss": torch.rand((), generator=g), "b_loss": torch.rand(1, generator=g)},
            {"m": torch.rand((), generator=g).to(torch.bfloat16), "f": float(i)},
            torch.rand((), generator=g),
            torch.tensor([i, 0, 0]),
        )
        for i in range(5)
    ]
    window = _Window()
    reference: dict[str, float] = {}
    for losses, metrics, total, skipped in steps:
        window.add_skipped(skipped)
        window.add(losses, metrics, total)
        for k, v in {**losses, **metrics, "loss": total}.items():
            reference[k] = reference.get(k, 0.0) + float(v)  # the old per-step float() path
    totals, skipped = window.totals()
    assert totals == reference  # exact: float64 sums in the same order
    assert skipped == sum(range(5)) and window.steps == 5
    assert _Window().totals() == ({}, 0)


# --------------------------------------------------------------- 3: checkpointing, compile
def test_grad_checkpointing_gives_the_same_gradients():
    from wsss_ray.train.loop import apply_fast_path

    plain = _task()
    ckpt = _task()
    cfg = load_config(PGSegPretrainConfig, TINY, [*TWO_STAGES, "train.grad_checkpointing=true"])
    applied = apply_fast_path(ckpt, cfg, log=lambda msg: None)
    assert applied["grad_checkpointing"] and ckpt.model.img_encoder.grad_checkpointing
    assert not plain.model.img_encoder.grad_checkpointing
    losses_a, _, grads_a = _forward_backward(plain)
    losses_b, _, grads_b = _forward_backward(ckpt)
    for k in losses_a:
        assert torch.allclose(losses_a[k], losses_b[k], atol=1e-6), k
    assert grads_a.keys() == grads_b.keys()
    for k in grads_a:
        assert torch.allclose(grads_a[k], grads_b[k], atol=1e-6, rtol=1e-5), k


def test_compile_falls_back_to_eager_with_a_message(monkeypatch):
    from wsss_ray.train import loop

    monkeypatch.setattr(loop, "compile_works", lambda device="cpu": "RuntimeError: no compiler")
    task = _task()
    said: list[str] = []
    cfg = load_config(PGSegPretrainConfig, TINY, [*TWO_STAGES, "train.compile=true"])
    applied = loop.apply_fast_path(task, cfg, log=said.append)
    assert applied["compile"] is False and "no compiler" in said[0] and "eager" in said[0]
    assert task.model.img_encoder._compiled_call_impl is None


def _compiled_equals_eager(backend: str) -> None:
    task = _task()
    task.eval()  # no Gumbel noise: the same function both ways
    batch = _batch()
    with torch.no_grad():
        eager = task.model.encode_image(batch["image"])["embed"]
        text = task.model.encode_text(batch["text"])["embed"]
        task.model.img_encoder.compile(backend=backend, dynamic=False)
        task.model.text_encoder.compile(backend=backend, dynamic=False)
        compiled = task.model.encode_image(batch["image"])["embed"]
        compiled_text = task.model.encode_text(batch["text"])["embed"]
    assert torch.allclose(eager, compiled, atol=1e-4, rtol=1e-4)
    assert torch.allclose(text, compiled_text, atol=1e-4, rtol=1e-4)
    assert "img_encoder.patch_embed.proj.weight" in task.model.state_dict()  # keys unchanged


def test_compiled_encoders_equal_eager_aot_eager():
    _compiled_equals_eager("aot_eager")


@pytest.mark.slow  # inductor builds C++ kernels: a minute or more on 2 cores
def test_compiled_encoders_equal_eager_inductor():
    from wsss_ray.train.loop import compile_works

    why = compile_works("cpu")
    if why:
        pytest.skip(f"inductor cannot compile here: {why}")
    _compiled_equals_eager("inductor")


# --------------------------------------------------------------------------- ZeRO stage
def test_zero_stage_zero_for_one_fp32_worker_only():
    one = load_config(PGSegPretrainConfig, TINY, ["scaling.num_workers=1", "train.zero_stage=2"])
    assert zero_stage(one) == 0 and deepspeed_config(one)["zero_optimization"]["stage"] == 0
    assert zero_stage(one, world_size=2) == 2
    bf16 = load_config(
        PGSegPretrainConfig,
        TINY,
        ["scaling.num_workers=1", "train.zero_stage=2", "train.precision=bf16"],
    )
    assert deepspeed_config(bf16)["zero_optimization"]["stage"] == 2


# --------------------------------------------------------------------------- 4: GPU decode
def _jpeg(seed: int, size: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.BILINEAR)  # smooth: JPEG-friendly
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _rows(n: int = 6) -> dict[str, np.ndarray]:
    sizes = [(96, 80), (64, 64), (120, 100), (70, 90), (100, 64), (64, 110)]
    jpgs = np.empty(n, dtype=object)
    jpgs[:] = [_jpeg(i, sizes[i % len(sizes)]) for i in range(n)]
    txts = np.empty(n, dtype=object)
    txts[:] = [b"a red circle" for _ in range(n)]
    return {"__key__": np.array([str(i) for i in range(n)]), "jpg": jpgs, "txt": txts}


def _decoder(on_worker: bool):
    from wsss_ray.data.webdataset import ImageTextDecoder

    # sources under 2x the crop: PIL's draft keeps full resolution, as nvJPEG does
    return ImageTextDecoder("ViT-B-16", 64, (0.3, 1.0), True, seed=7, decode_on_worker=on_worker)


@pytest.mark.parametrize("method", ["loop", "roi_align"])
def test_worker_decode_matches_the_decode_actors(method):
    """Both crop methods of the train-worker decode (``roi_align`` is CUDA's default) give the
    actors' crops of the same boxes, within JPEG decoders' tolerance."""
    from wsss_ray.data.gpu_decode import decode_crop_batch

    rows = _rows()
    actor = _decoder(False)(rows)
    parsed = _decoder(True)(rows)  # same seed: the same crop boxes and flips
    assert set(parsed) == {"jpeg", "crop", "flip", "text", "skipped"}
    assert np.array_equal(parsed["text"], actor["text"])
    assert parsed["flip"].any() and not parsed["flip"].all()  # both branches exercised
    jpegs = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in parsed["jpeg"]]
    images = decode_crop_batch(
        jpegs, torch.from_numpy(parsed["crop"]), torch.from_numpy(parsed["flip"]), 64, "cpu", method
    )
    ref = torch.from_numpy(actor["image"])
    assert images.shape == ref.shape == (6, 64, 64, 3) and images.dtype == torch.uint8
    diff = (images.int() - ref.int()).abs()
    assert diff.float().mean() < 1.0 and diff.max() <= 16  # JPEG decoders' tolerance


def test_collate_and_prepare_decode_on_the_worker():
    from wsss_ray.data.gpu_decode import jpeg_collate_fn, normalize_images
    from wsss_ray.train.loop import _prepare

    cfg = load_config(PGSegPretrainConfig, TINY, ["data.image_size=64"])
    parsed = _decoder(True)(_rows())
    batch = jpeg_collate_fn()(parsed)
    assert isinstance(batch["jpeg"], list) and batch["jpeg"][0].dtype == torch.uint8
    out = _prepare(dict(batch), cfg, torch.float32, torch.device("cpu"))
    actor = _decoder(False)(_rows())
    ref = normalize_images(torch.from_numpy(actor["image"]), cfg.data.mean, cfg.data.std)
    assert set(out) == {"image", "text", "skipped"} and out["image"].shape == (6, 3, 64, 64)
    assert (out["image"] - ref).abs().mean() < 0.02  # ~1 grey level / std
    assert torch.equal(out["text"], torch.from_numpy(actor["text"]))


def test_non_jpeg_is_reencoded_for_the_gpu_decoder():
    rows = _rows(2)
    buf = io.BytesIO()
    Image.new("RGB", (80, 80), (200, 10, 10)).save(buf, format="PNG")
    rows["jpg"][1] = buf.getvalue()
    parsed = _decoder(True)(rows)
    assert len(parsed["jpeg"]) == 2 and parsed["jpeg"][1][:2] == b"\xff\xd8"  # JPEG magic


def test_decode_device_config_checks():
    cfg = load_config(PGSegPretrainConfig, TINY, [])
    assert cfg.data.decode_device == "cpu"
    with pytest.raises(ConfigError, match="needs scaling.use_gpu=true"):
        load_config(PGSegPretrainConfig, TINY, ["data.decode_device=cuda"])
    with pytest.raises(ConfigError, match="data.decode_device"):
        load_config(PGSegPretrainConfig, TINY, ["data.decode_device=gpu"])
    gpu = load_config(
        PGSegPretrainConfig, TINY, ["data.decode_device=cuda", "scaling.use_gpu=true"]
    )
    assert gpu.data.decode_device == "cuda"
    # auto (the default): the GPU decodes on GPU nodes, the actors on CPU ones
    assert load_config(PGSegPretrainConfig, TINY, ["scaling.use_gpu=true"]).data.decode_device == (
        "cuda"
    )
    cpu = load_config(PGSegPretrainConfig, TINY, ["scaling.use_gpu=true", "data.decode_device=cpu"])
    assert cpu.data.decode_device == "cpu"  # the CPU path stays, by choice


# ------------------------------------------------------------------- 5: the decode actors
def test_channels_last_crop_is_bit_identical_to_the_v2_transform():
    from torchvision.transforms import v2

    rows = _rows()
    rows["jpg"][2] = _jpeg(9, (300, 260))  # > 2x the crop: PIL's draft reduces it first
    decoder = _decoder(False)
    reference = v2.Compose(
        [v2.RandomResizedCrop(64, scale=(0.3, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    )
    torch.manual_seed(11)
    ours = [decoder._image(b) for b in rows["jpg"]]
    torch.manual_seed(11)
    for raw, got in zip(rows["jpg"], ours):
        with Image.open(io.BytesIO(raw)) as im:
            im.draft("RGB", (64, 64))
            rgb = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
        want = reference(rgb).permute(1, 2, 0).numpy()
        assert got.flags["C_CONTIGUOUS"] and got.shape == (64, 64, 3)
        assert np.array_equal(got, want)


def test_batch_array_holds_the_same_crops_as_single_decodes():
    """The decoder writes crops straight into its batch array; an undecodable image in the
    middle leaves no hole (the next crop takes its row) and the array is trimmed to the kept."""
    rows = _rows()
    rows["jpg"][3] = b"not a jpeg"
    decoder = _decoder(False)
    torch.manual_seed(5)
    batch = decoder(rows)
    torch.manual_seed(5)
    single = [decoder._image(b) for i, b in enumerate(rows["jpg"]) if i != 3]
    assert batch["image"].shape == (5, 64, 64, 3) and batch["skipped"][0] == 1
    assert np.array_equal(batch["image"], np.stack(single))
