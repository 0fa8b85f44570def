"""Config: defaults <- YAML <- overrides, typed; one-line errors naming the key."""

from __future__ import annotations

import pytest

from wsss_ray.config import (
    ClipPretrainConfig,
    ConfigError,
    PGSegEvalConfig,
    PGSegPretrainConfig,
    VPLConfig,
    load_config,
    parse_job_args,
    reference,
    to_flat_dict,
)
from wsss_ray.config.loading import to_yaml
from wsss_ray.tasks.image_text import train_shards


def test_yaml_and_overrides_merge(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  max_steps: 7\n  batch_size_per_worker: 4\nmodel:\n  name: wsss-tiny\n")
    cfg = load_config(ClipPretrainConfig, str(f), ["train.max_steps=9", "optim.lr=0.5"])
    assert cfg.train.max_steps == 9 and cfg.train.batch_size_per_worker == 4
    assert cfg.optim.lr == 0.5 and isinstance(cfg.optim.lr, float)
    assert cfg.scaling.num_workers == 2  # default kept
    assert to_flat_dict(cfg)["train.max_steps"] == 9


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.max_stepz=3", "unknown key 'train.max_stepz'"),
        ("bogus=1", "unknown key 'bogus'"),
        ("train.max_steps=abc", "train.max_steps"),
        ("scaling.use_gpu=maybe", "scaling.use_gpu"),
        ("train.precision=fp8", "train.precision"),
        ("data.train_shards=[/no/such/dir]", "data.train_shards"),
        ("model.pretrained=/no/such/weights.pt", "model.pretrained"),
        ("train.max_steps", "key=value"),
    ],
)
def test_errors_name_the_key_in_one_line(override, needle):
    base = [] if override.startswith("train.max_steps") else ["train.max_steps=1"]
    with pytest.raises(ConfigError) as err:
        load_config(ClipPretrainConfig, None, [*base, override])
    msg = str(err.value)
    assert needle in msg and "\n" not in msg and msg.startswith("config error:")


def test_training_length_is_required():
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config(ClipPretrainConfig, None, [])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config(ClipPretrainConfig, "/no/such.yaml", [])


def test_cli_exits_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as ex:
        parse_job_args(ClipPretrainConfig, "x", ["train.nope=1"])
    assert ex.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "config error: unknown key 'train.nope'"


def test_shipped_configs_load(tmp_path):
    (tmp_path / "a.tar").write_bytes(b"")
    for path in ("configs/clip/tiny.yaml", "configs/clip/vit_b16.yaml"):
        cfg = load_config(ClipPretrainConfig, path, [f"data.train_shards=[{tmp_path}]"])
        assert cfg.data.train_shards == [str(tmp_path)]  # the source as given ...
        assert train_shards(cfg) == [str(tmp_path / "a.tar")]  # ... expanded on use


def test_a_shard_folder_stays_one_entry_in_the_config(tmp_path):
    """30,000 shards in a folder: the config (written to config.yaml, pickled to every worker,
    logged to MLflow) holds the folder, the expansion holds the paths."""
    for i in range(3000):
        (tmp_path / f"{i:06d}.tar").write_bytes(b"")
    cfg = load_config(
        ClipPretrainConfig, "configs/clip/tiny.yaml", [f"data.train_shards=[{tmp_path}]"]
    )
    assert cfg.data.train_shards == [str(tmp_path)]
    assert len(to_yaml(cfg)) < 5000
    assert train_shards(cfg) == sorted(str(p) for p in tmp_path.glob("*.tar"))
    glob_cfg = load_config(
        ClipPretrainConfig, "configs/clip/tiny.yaml", [f"data.train_shards=[{tmp_path}/00001*.tar]"]
    )
    assert len(train_shards(glob_cfg)) == 10


def test_every_shipped_config_has_only_known_keys():
    """Every YAML under configs/ merges into its job's schema (paths are placeholders there, so
    only the keys and types are checked, not the files they name)."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from wsss_ray.config import VPLEvalConfig, VPLTrainConfig

    def schema(path: Path):
        if path.parent.name == "vpl":
            if path.name.startswith("train_") or path.name == "reference_weclip_voc.yaml":
                return VPLTrainConfig
            return VPLEvalConfig if path.name.startswith("eval_") else VPLConfig
        if path.parent.name == "pgseg":
            return PGSegEvalConfig if path.name.startswith("eval_") else PGSegPretrainConfig
        return ClipPretrainConfig if path.parent.name == "clip" else None

    root = Path(__file__).resolve().parents[2] / "configs"
    checked = 0
    for path in sorted(root.glob("*/*.yaml")):
        if schema(path) is None:
            continue
        merged = OmegaConf.merge(OmegaConf.structured(schema(path)), OmegaConf.load(path))
        OmegaConf.to_object(merged)
        checked += 1
    assert checked >= 16


def test_reference_lists_every_key():
    ref = reference(ClipPretrainConfig)
    for key in (
        "train.max_steps",
        "data.synthetic.num_images",
        "scaling.num_workers",
        "model.name",
        "run.storage_path",
        "tracking.uri",
    ):
        assert f"  {key} = " in ref


def test_readme_config_reference_is_current():
    from pathlib import Path

    readme = Path(__file__).resolve().parents[2] / "docs" / "CONFIG.md"
    text = readme.read_text()
    from wsss_ray.config import VPLEvalConfig, VPLTrainConfig

    for schema in (ClipPretrainConfig, PGSegEvalConfig, VPLConfig, VPLEvalConfig):
        assert reference(schema) in text, (
            f"docs/CONFIG.md is stale: paste reference({schema.__name__})"
        )
    pgseg_only = [
        line for line in reference(PGSegPretrainConfig).splitlines() if line.startswith("  eval.")
    ]
    assert pgseg_only and all(line in text for line in pgseg_only)
    vpl_train = [  # the sections VPL phase 2 adds to the training job's
        line
        for line in reference(VPLTrainConfig).splitlines()
        if line.startswith(("  data.", "  phase1.", "  decoder.", "  rsc.", "  eval.", "  optim."))
    ]
    assert vpl_train and all(line in text for line in vpl_train)


def test_eval_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.kind: one of voc, coco, coco_object, context"):
        load_config(PGSegEvalConfig, None, ["data.kind=ade"])
    with pytest.raises(ConfigError, match=r"data\.root: no such folder"):
        load_config(PGSegEvalConfig, None, [f"data.root={tmp_path}/nope"])
    with pytest.raises(ConfigError, match=r"zero_shot\.stride"):
        load_config(PGSegEvalConfig, None, ["zero_shot.stride=600"])
    with pytest.raises(ConfigError, match=r"zero_shot\.templates"):
        load_config(PGSegEvalConfig, None, ["zero_shot.templates=[a photo]"])
    with pytest.raises(ConfigError, match=r"model\.checkpoint: no such"):
        load_config(PGSegEvalConfig, None, [f"model.checkpoint={tmp_path}/none"])
    with pytest.raises(ConfigError, match=r"eval\.data\.kind"):
        load_config(
            PGSegPretrainConfig, "configs/pgseg/tiny.yaml", ["eval.every=5", "eval.data.kind=x"]
        )


def test_vpl_config_errors_name_the_key(tmp_path):

    with pytest.raises(ConfigError, match=r"clip\.weights: give a local CLIP weights file"):
        load_config(VPLConfig, None, [])
    with pytest.raises(ConfigError, match=r"clip\.weights: no such file or folder"):
        load_config(VPLConfig, None, [f"clip.weights={tmp_path}/ViT-B-16.pt"])
    w = tmp_path / "w.pt"
    w.write_bytes(b"")
    ok = [f"clip.weights={w}"]
    assert load_config(VPLConfig, None, ok).data.split == "train_aug"
    with pytest.raises(ConfigError, match=r"cam\.prototypes: text \| vision"):
        load_config(VPLConfig, None, [*ok, "cam.prototypes=both"])
    with pytest.raises(ConfigError, match=r"prototypes\.init: text \| zero"):
        load_config(VPLConfig, None, [*ok, "prototypes.init=random"])
    with pytest.raises(ConfigError, match=r"cam\.prototype_file: no such file"):
        load_config(VPLConfig, None, [*ok, f"cam.prototype_file={tmp_path}/p.pt"])
    for name in ("voc", "coco"):  # the shipped configs parse (placeholder weights aside)
        with pytest.raises(ConfigError, match=r"clip\.weights: no such file or folder"):
            load_config(VPLConfig, f"configs/vpl/{name}.yaml", [f"data.root={tmp_path}"])
    cfg = load_config(VPLConfig, "configs/vpl/tiny.yaml", [f"clip.weights={w}"])
    assert cfg.clip.name == "wsss-tiny" and cfg.cam.refine_layers == 4


def test_pgseg_size_is_validated_before_any_cluster_work():
    from wsss_ray.config import PGSEG_SIZES
    from wsss_ray.models.pgseg import SIZES

    assert set(PGSEG_SIZES) == set(SIZES)
    with pytest.raises(ConfigError, match="model.size.*tiny_seg"):
        load_config(PGSegPretrainConfig, "configs/pgseg/tiny.yaml", ["model.size=tiny_sseg"])
    with pytest.raises(ConfigError, match="model.size"):
        load_config(PGSegEvalConfig, None, ["model.size=huge"])
