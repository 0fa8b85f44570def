"""VPL end to end on a local Ray, on the synthetic VOC-layout set with a tiny CLIP pretrained by
the training spine on synthetic shapes (trained once per module).

Phase 1: ``jobs/vpl_prototypes.py`` (features cached in shards, W solved, resume recomputes only
a missing shard) and ``jobs/vpl_pseudo_labels.py`` with text and with vision prototypes on the
train split: a label PNG for every image, seed mIoU above the all-background floor, MLflow runs.

Phase 2: ``jobs/train_vpl.py`` trains the decoder on 2 workers with DeepSpeed on the vision
pseudo-labels, with and without RSC, validating on the val split; ``jobs/eval_vpl.py`` reproduces
the in-training validation exactly at the same scales and reports multi-scale + flip mIoU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from jobs import eval_vpl, train_vpl, vpl_prototypes, vpl_pseudo_labels
from wsss_ray.data.segmentation import open_source, read_mask
from wsss_ray.eval.miou import confusion_matrix, iou_from_confusion


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, ray_local, tiny_clip_checkpoint):
    """(a folder every test of the module writes into, the session's tiny CLIP checkpoint:
    80 steps, see ``tests/conftest.py``)."""
    return tmp_path_factory.mktemp("vpl"), tiny_clip_checkpoint


def _common(tmp_path, checkpoint) -> list[str]:
    return [
        "--config",
        "configs/vpl/tiny.yaml",
        f"run.output_dir={tmp_path}",
        f"clip.weights={checkpoint}",
        "data.synthetic.num_train=32",
        f"data.synthetic.num_val={NUM_VAL}",
        "prototypes.shard_images=8",
        "infer.actors=[1,1]",
    ]


NUM_VAL = 16


def test_vpl_phase1_prototypes_and_pseudo_labels(workdir, capsys):
    tmp_path, checkpoint = workdir
    common = _common(tmp_path, checkpoint)
    assert vpl_prototypes.main(common) == 0
    folder = tmp_path / "vpl_tiny"
    shards = sorted((folder / "features").glob("shard_*.npz"))
    assert len(shards) == 4
    report = json.loads((folder / "prototypes.json").read_text())
    objective = report["objective_log"]
    assert all(b <= a for a, b in zip(objective, objective[1:]))  # never increases
    assert report["proto/grad_norm"] < 1e-2 * report["proto/grad_norm_start"]
    assert report["features/patches"] == 32 * 12 * 12  # 96-px images, 8-px patches
    # the learned prototypes localise the image's classes better than the text ones
    assert report["proto/patch_acc_vision"] > report["proto/patch_acc_text"], report
    saved = torch.load(folder / "prototypes.pt", weights_only=False)
    assert saved["W"].shape == saved["Z"].shape == (5 + 3, 128)

    # resume: a lost shard is recomputed, the others are reused, W comes out the same
    shards[2].unlink()
    capsys.readouterr()
    assert vpl_prototypes.main([*common, "tracking.enabled=false"]) == 0
    assert "3 cached, 1 to compute" in capsys.readouterr().out
    again = torch.load(folder / "prototypes.pt", weights_only=False)
    torch.testing.assert_close(again["W"], saved["W"], atol=1e-4, rtol=1e-3)

    source = open_source("voc", str(tmp_path / "synthetic_voc" / "VOC2012"), "train")
    # the trivial baseline on these very images: every pixel called background
    masks = [read_mask(r.mask) for r in source.records]
    conf = sum(confusion_matrix(np.zeros_like(m), m, 6) for m in masks)
    floor = 100 * iou_from_confusion(conf).miou  # percent, as the jobs report mIoU
    assert floor < 17
    results = {}
    for mode in ("text", "vision"):
        assert vpl_pseudo_labels.main([*common, f"cam.prototypes={mode}"]) == 0
        labels_dir = folder / f"pseudo_labels_{mode}"
        for rec in source.records:
            label = read_mask(labels_dir / f"{rec.id}.png")
            gt = read_mask(rec.mask)
            assert label.shape == gt.shape
            present = set(np.unique(gt).tolist()) - {0, 255}
            assert set(np.unique(label).tolist()) <= present | {0}  # only the image's classes
        results[mode] = res = json.loads((folder / f"results_{mode}.json").read_text())
        # without CRF the all-pixel label is the seed; the exponent sweep holds alpha=1 (the
        # seed's own exponent) and reports its best
        assert res["pseudo_all/miou"] == res["seed/miou"] == res["seed_alpha1/miou"]
        best = max((1, 2), key=lambda a: res[f"seed_alpha{a}/miou"])
        assert res["seed/best_alpha"] == best and "seed_alpha2/miou" in res
    for mode, res in results.items():
        # seeds beat the all-background floor in both modes; the tiny CLIP's scores vary
        # from machine to machine by a few points (threaded CPU kernels), so the margins are
        # loose: CAMs clearly, seeds (after CAA on a 4-block attention) by a little
        assert res["cam/miou"] > floor + 6 and res["seed/miou"] > floor + 1.5, (
            mode,
            floor,
            res,
        )
    print(
        "seed mIoU text {:.1f} / vision {:.1f}; CAM mIoU text {:.1f} / vision {:.1f}".format(
            *[results[m][k] for k in ("seed/miou", "cam/miou") for m in ("text", "vision")]
        )
    )

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    names = {
        r.info.run_name
        for r in client.search_runs(client.get_experiment_by_name("wsss_ray").experiment_id)
    }
    assert {"vpl_tiny_prototypes", "vpl_tiny_pseudo_text", "vpl_tiny_pseudo_vision"} <= names


def test_vpl_phase2_decoder_with_and_without_rsc(workdir):
    tmp_path, checkpoint = workdir
    common = _common(tmp_path, checkpoint)
    folder = tmp_path / "vpl_tiny"
    if not (folder / "prototypes.pt").is_file():  # phase 1, when this test runs alone
        assert vpl_prototypes.main([*common, "tracking.enabled=false"]) == 0
    if not (folder / "results_vision.json").is_file():
        assert vpl_pseudo_labels.main([*common, "cam.prototypes=vision"]) == 0
    pseudo = json.loads((folder / "results_vision.json").read_text())["pseudo/miou"]

    train = [
        "--config",
        "configs/vpl/train_tiny.yaml",
        f"run.output_dir={tmp_path}",
        f"clip.weights={checkpoint}",
        "data.seg.synthetic.num_train=32",
        f"data.seg.synthetic.num_val={NUM_VAL}",
        "eval.data.synthetic.num_train=32",
        f"eval.data.synthetic.num_val={NUM_VAL}",
        "train.max_steps=40",
        "train.log_every=10",
        "train.ckpt_every=40",
        "eval.every=40",
    ]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    val = {}
    for name, extra in (("rsc", []), ("no_rsc", ["rsc.weight=0"])):
        assert train_vpl.main([*train, f"run.name=vpl_{name}", *extra]) == 0
        run_info = client.search_runs(
            [client.get_experiment_by_name("wsss_ray").experiment_id],
            filter_string=f"attributes.run_name = 'vpl_{name}'",
        )[0]
        seg = [m.value for m in client.get_metric_history(run_info.info.run_id, "seg_loss")]
        assert len(seg) == 4 and seg[-1] < 0.8 * seg[0], seg  # the decoder learns
        has_rsc = bool(client.get_metric_history(run_info.info.run_id, "rsc_loss"))
        assert has_rsc == (name == "rsc")
        val[name] = run_info.data.metrics["val/miou"]

    # the eval job at the training validation's settings reproduces its number exactly
    evaluate = [
        "--config",
        "configs/vpl/eval_tiny.yaml",
        f"run.output_dir={tmp_path}",
        f"clip.weights={checkpoint}",
        f"checkpoint={tmp_path}/ray_results/vpl_rsc",
        "data.synthetic.num_train=32",
        f"data.synthetic.num_val={NUM_VAL}",
        "infer.actors=[1,1]",
    ]
    assert eval_vpl.main([*evaluate, "test.scales=[1.0]", "test.flip=false"]) == 0
    same = json.loads((tmp_path / "eval_vpl_tiny" / "results.json").read_text())
    assert same["miou"] == pytest.approx(val["rsc"], abs=1e-7)
    assert eval_vpl.main([*evaluate, "run.name=eval_ms"]) == 0  # scales 1, 0.75 + flip
    ms = json.loads((tmp_path / "eval_ms" / "results.json").read_text())
    floor = ms["baseline/all_background_miou"]
    for v in (val["rsc"], val["no_rsc"], ms["miou"]):
        assert v > floor + 3, (v, floor)  # the tiny CLIP varies by run: a loose margin
    assert len(list((tmp_path / "eval_ms" / "overlays").glob("*.png"))) == 4
    print(
        f"pseudo-label mIoU (train) {pseudo:.1f}; decoder val mIoU with RSC "
        f"{val['rsc']:.1f}, without {val['no_rsc']:.1f}; multi-scale + flip "
        f"{ms['miou']:.1f}; all background {floor:.1f}"
    )


def _online_label_miou(cfg_args: list[str], source) -> float:
    """mIoU of the frozen CLIP's online labels (the phase-2 targets, before any RFM) on the
    split's whole images, given their image-level labels."""
    from PIL import Image

    from wsss_ray.config import VPLTrainConfig, load_config
    from wsss_ray.data.gpu_decode import normalize_images
    from wsss_ray.data.segmentation import image_labels
    from wsss_ray.tasks.vpl import VPLSegTask

    cfg = load_config(VPLTrainConfig, "configs/vpl/train_tiny.yaml", cfg_args)
    names = source.class_names
    task = VPLSegTask(cfg, len(names), names, source.name)
    conf = np.zeros((len(names), len(names)), np.int64)
    for rec in source.records:
        image = np.asarray(Image.open(rec.image).convert("RGB"))
        gt = read_mask(rec.mask)
        x = normalize_images(torch.from_numpy(image.copy())[None], cfg.data.mean, cfg.data.std)
        present = torch.zeros(1, len(names), dtype=torch.uint8)
        present[0, [0, *image_labels(gt)]] = 1
        out = task.dense(x.float(), attn_layers=task.labeler.attn_layers, cam=True, tokens=True)
        valid = torch.ones(1, *gt.shape, dtype=torch.bool)
        labels = task.labeler(x.float(), out, present, valid)[0].numpy()
        conf += confusion_matrix(labels, gt, len(names))
    return 100 * iou_from_confusion(conf).miou  # percent, as val/miou


def test_weclip_phase2_online_labels_rfm_affinity(workdir):
    """WeCLIP's phase 2 end to end: labels made online from the frozen CLIP's CAMs (no phase-1
    label files), RFM from step 20, the affinity loss, WeCLIP's decoder.

    On the held-out split both the online labels (given each image's classes) and the decoder
    (not given them) must beat the all-background floor (14.3), the decoder by 2 points: a
    decoder that learned nothing predicts background, the floor itself. How far it gets depends
    on the tiny CLIP of the session (not deterministic: Ray Data hands blocks to whichever
    worker asks first): decoder val mIoU over eight 40-step CLIPs 20.2 (CI), 23.9, 28.8, 35.7,
    35.9, 39.2, 45.4, 46.9 (the weak ones end at a contrastive loss of 3.0, the strong at 2.6),
    over two 80-step CLIPs (the session's now) 40.5 and 34.6 (docs/VPL.md). Decoder vs labels
    is printed, not asserted: on this 96-px world the labels are PAR-refined at pixel level
    (sharp edges on flat shapes) while the decoder predicts on the 12 x 12 patch grid."""
    tmp_path, checkpoint = workdir
    args = [
        "--config",
        "configs/vpl/train_tiny.yaml",
        f"run.output_dir={tmp_path}",
        f"clip.weights={checkpoint}",
        "phase1.name=no_phase1_here",  # online labels: phase 1 is not read
        "data.seg.synthetic.num_train=32",
        f"data.seg.synthetic.num_val={NUM_VAL}",
        "eval.data.synthetic.num_train=32",
        f"eval.data.synthetic.num_val={NUM_VAL}",
        "online.enabled=true",
        "online.rfm_start=20",
        "decoder.style=weclip",
        "rsc.weight=0",
        "train.max_steps=40",
        "train.log_every=10",
        "train.ckpt_every=40",
        "eval.every=40",
        "run.name=vpl_weclip",
    ]
    assert train_vpl.main(args) == 0
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.search_runs(
        [client.get_experiment_by_name("wsss_ray").experiment_id],
        filter_string="attributes.run_name = 'vpl_weclip'",
    )[0]
    rid = run.info.run_id
    aff = [m.value for m in client.get_metric_history(rid, "aff_loss")]
    rfm = [m.value for m in client.get_metric_history(rid, "online/rfm")]
    seg = [m.value for m in client.get_metric_history(rid, "seg_loss")]
    assert len(aff) == 4 and all(a > 0 for a in aff)  # the affinity loss is on
    assert rfm[:2] == [0.0, 0.0] and rfm[-1] == 1.0, rfm  # RFM after step 20
    assert seg[-1] < seg[0], seg
    decoder_miou = run.data.metrics["val/miou"]
    val = open_source("voc", str(tmp_path / "synthetic_voc" / "VOC2012"), "val")
    label_miou = _online_label_miou(args[2:], val)
    print(f"WeCLIP phase 2: decoder val mIoU {decoder_miou:.1f}, online labels on val "
          f"{label_miou:.1f}")  # fmt: skip
    masks = [read_mask(r.mask) for r in val.records]
    conf = sum(confusion_matrix(np.zeros_like(m), m, len(val.class_names)) for m in masks)
    floor = 100 * iou_from_confusion(conf).miou
    assert label_miou > floor, (label_miou, floor)  # the frozen CLIP's labels are informative
    assert decoder_miou > floor + 2, (decoder_miou, floor)  # ... and the decoder learned them

    # the trained VPL model as a Segmenter: its own classes, masks of each image's size
    from PIL import Image

    from wsss_ray import Segmenter

    seg = Segmenter.from_checkpoint(tmp_path / "ray_results" / "vpl_weclip")
    assert seg.kind == "vpl" and seg.class_names == val.class_names[1:]
    image = np.asarray(Image.open(val.records[0].image).convert("RGB"))
    result = seg.predict([image, image[:40, :56]])
    assert [r.mask.shape for r in result] == [image.shape[:2], (40, 56)]
    assert int(result[0].mask.max()) < len(val.class_names)
    with pytest.raises(ValueError, match="trained on"):
        seg.predict([image], ["cat", "dog"])
