"""The cluster files, checked without a cloud: launcher configs, KubeRay manifests, the
Dockerfile, the MLflow server script and docs/CLUSTER.md.

- every YAML parses; the launcher configs pass Ray's own cluster-config schema;
- every `jobs/...`, `configs/...`, `cluster/...` and `docs/...` path they mention exists;
- the Ray version (image tags, KubeRay `rayVersion`, the Dockerfile's base) is the `ray[...]==`
  pin of pyproject.toml, the Python version is the one the tests run on (and satisfies
  requires-python), torch/torchvision are the Makefile's pins;
- every `python jobs/X.py --config ... key=value` command in them loads with
  ``load_config`` against that job's schema (unknown keys, wrong types and failed validation
  are caught here, not after a cluster start), with paths that only exist on the cluster
  (/mnt/shared, /data, /weights) taken as present; training commands checkpoint to shared
  storage and every command tracks to an MLflow server;
- the MLflow server script binds a private address by default and refuses 0.0.0.0.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet

import wsss_ray.config as config_module
from wsss_ray.config import TrainJobConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
YAMLS = sorted(CLUSTER.rglob("*.yaml"))
LAUNCHER = [CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml"]
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))
DOCKERFILE = CLUSTER / "docker" / "Dockerfile"
DOCS = [ROOT / "docs" / "CLUSTER.md", CLUSTER / "mlflow" / "README.md"]
TEXT_FILES = [*YAMLS, DOCKERFILE, CLUSTER / "mlflow" / "server.sh", *DOCS]
MAIN_JOBS = [
    "pretrain_pgseg",
    "pretrain_clip",
    "eval_pgseg",
    "vpl_prototypes",
    "vpl_pseudo_labels",
    "train_vpl",
    "eval_vpl",
]
# Paths that exist only on the cluster (shared volume, datasets, weights).
CLUSTER_SIDE = ("/mnt/shared/", "/data/", "/weights/")
SHARED_STORAGE = ("s3://", "gs://", "/mnt/shared/")


# ------------------------------------------------------------------------------ helpers
def _pins() -> dict[str, str]:
    pyproject = (ROOT / "pyproject.toml").read_text()
    makefile = (ROOT / "Makefile").read_text()
    return {
        "ray": re.search(r'"ray\[[^\]]*\]==([\d.]+)"', pyproject).group(1),
        "version": re.search(r'^version\s*=\s*"([^"]+)"', pyproject, re.M).group(1),
        "requires_python": re.search(r'requires-python\s*=\s*"([^"]+)"', pyproject).group(1),
        "torch": re.search(r'"torch==([\d.]+)"', makefile).group(1),
        "torchvision": re.search(r'"torchvision==([\d.]+)"', makefile).group(1),
    }


def _images(node) -> list[str]:
    """Every `image:` value in a parsed YAML document."""
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "image" and isinstance(v, str):
                found.append(v)
            else:
                found += _images(v)
    elif isinstance(node, list):
        for v in node:
            found += _images(v)
    return found


def _strings(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


def _logical_lines(text: str) -> list[str]:
    """Lines with comment markers stripped and backslash continuations joined."""
    out, cur = [], ""
    for raw in text.splitlines():
        line = re.sub(r"^\s*#+ ?", "", raw).rstrip()
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        out.append(cur + line)
        cur = ""
    if cur:
        out.append(cur)
    return out


STOP = {"&&", "||", ";", "|", "&", ">", ">>", "2>&1"}


def _commands() -> list[tuple[str, list[str]]]:
    """(file, argv from `python jobs/...` on) for every job command in the cluster files:
    raw text (comments and docs included) and, for YAML, the parsed strings (folded blocks)."""
    sources: list[tuple[str, str]] = []
    for path in TEXT_FILES:
        text = path.read_text()
        if path.suffix == ".yaml":  # comments from the text, values (folded) from the parse
            text = "\n".join(ln for ln in text.splitlines() if ln.lstrip().startswith("#"))
            for doc in yaml.safe_load_all(path.read_text()):
                for s in _strings(doc):
                    sources += [(path.name, line) for line in _logical_lines(s)]
        sources += [(path.name, line) for line in _logical_lines(text)]
    found, seen = [], set()
    for name, line in sources:
        for m in re.finditer(r"\bpython3? +jobs/", line):
            tokens = []
            for tok in shlex.split(line[m.start() :].split(" #")[0]):
                if tok in STOP:
                    break
                tokens.append(tok.rstrip(";"))
            key = (name, tuple(tokens))
            if key not in seen:
                seen.add(key)
                found.append((name, tokens))
    return found


def _schema(job_file: str) -> type:
    """The config dataclass the job parses (each job imports exactly one)."""
    module = importlib.import_module(job_file[:-3].replace("/", "."))
    schemas = {
        v
        for v in vars(module).values()
        if isinstance(v, type)
        and dataclasses.is_dataclass(v)
        and v.__module__.startswith("wsss_ray.config")
    }
    assert len(schemas) == 1, f"{job_file}: cannot tell its config schema from {schemas}"
    return schemas.pop()


class _Proxy:
    """A module stand-in that overrides some attributes."""

    def __init__(self, real, **overrides):
        self._real, self._overrides = real, overrides

    def __getattr__(self, name):
        return self._overrides[name] if name in self._overrides else getattr(self._real, name)


@pytest.fixture()
def cluster_side_paths(monkeypatch):
    """Inside the wsss_ray.config modules only: paths under CLUSTER_SIDE exist (and hold a
    shard)."""

    def remote(p) -> bool:
        return str(p).startswith(CLUSTER_SIDE)

    path = _Proxy(
        os.path,
        isdir=lambda p: remote(p) or os.path.isdir(p),
        isfile=lambda p: remote(p) or os.path.isfile(p),
        exists=lambda p: remote(p) or os.path.exists(p),
    )
    fake_glob = _Proxy(
        glob,
        glob=lambda pattern, **kw: [pattern] if remote(pattern) else glob.glob(pattern, **kw),
        iglob=lambda pattern, **kw: (
            iter([pattern]) if remote(pattern) else glob.iglob(pattern, **kw)
        ),
    )

    for module in (config_module.common, config_module.seg, config_module.pgseg, config_module.vpl):
        monkeypatch.setattr(module, "os", _Proxy(os, path=path))
        if hasattr(module, "glob"):
            monkeypatch.setattr(module, "glob", fake_glob)
    monkeypatch.chdir(ROOT)


# -------------------------------------------------------------------------------- tests
def test_the_cluster_files_are_there():
    names = {p.relative_to(CLUSTER).as_posix() for p in YAMLS}
    assert {"aws.yaml", "gcp.yaml", "kuberay/raycluster.yaml"} <= names
    for job in MAIN_JOBS:
        assert f"kuberay/rayjob_{job}.yaml" in names, f"no RayJob for jobs/{job}.py"
    for path in [DOCKERFILE, *DOCS]:
        assert path.is_file(), path


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.relative_to(CLUSTER).as_posix())
def test_yaml_parses(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_config_passes_rays_schema(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load(path.read_text())
    validate_config(prepare_config(cfg))  # raises on unknown fields or bad node types
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head should take no tasks"
    workers = [t for n, t in cfg["available_node_types"].items() if n != cfg["head_node_type"]]
    assert workers and all(0 <= t["min_workers"] <= t["max_workers"] for t in workers)
    gpu_types = [t for t in workers if "GPU" in str(t["node_config"]) or t["resources"].get("GPU")]
    assert gpu_types or any(
        re.match(r"(g\d|p\d)", str(t["node_config"].get("InstanceType", ""))) for t in workers
    )
    # nothing installed at start-up: the image carries everything
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert cfg[key] == [], key
    assert cfg["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}  # only the token
    start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start, "the job API must not listen on every interface"


def test_versions_match_the_pins():
    pins = _pins()
    py = f"{sys.version_info.major}{sys.version_info.minor}"
    assert SpecifierSet(pins["requires_python"]).contains(
        f"{sys.version_info.major}.{sys.version_info.minor}"
    )

    docker = DOCKERFILE.read_text()
    base = re.search(r"^FROM\s+rayproject/ray:([\d.]+)-py(\d+)-gpu\s*$", docker, re.M)
    assert base, "the Dockerfile should build on rayproject/ray:<ray>-py<xy>-gpu"
    assert base.group(1) == pins["ray"], "Dockerfile Ray != pyproject pin"
    assert base.group(2) == py, f"Dockerfile Python {base.group(2)} != tested Python {py}"
    for pkg in ("torch", "torchvision"):
        assert f'"{pkg}=={pins[pkg]}"' in docker, f"Dockerfile {pkg} != the Makefile's pin"
    assert re.search(r"DS_BUILD_OPS=0 pip install[^\n]*-e \"?\.", docker)

    expected_tag = f"wsss-ray:{pins['version']}-ray{pins['ray']}-py{py}-gpu"
    images = []
    for path in YAMLS:
        for doc in yaml.safe_load_all(path.read_text()):
            images += [(path.name, img) for img in _images(doc)]
            spec = (doc or {}).get("spec", {})
            for cluster in (spec, spec.get("rayClusterSpec") or {}):
                if "rayVersion" in cluster:
                    assert cluster["rayVersion"] == pins["ray"], f"{path.name}: rayVersion"
    assert len({p for p, _ in images}) >= 3 + len(MAIN_JOBS)
    for name, image in images:
        assert image.rsplit("/", 1)[-1] == expected_tag, f"{name}: {image} != .../{expected_tag}"


def test_every_referenced_path_exists():
    missing = []
    mention = re.compile(r"(?<![\w.-])(?:jobs|configs|cluster|docs)/[\w./-]*\w")
    for path in TEXT_FILES:
        for m in mention.finditer(path.read_text()):
            if not (ROOT / m.group(0)).exists():
                missing.append(f"{path.relative_to(ROOT)}: {m.group(0)}")
    assert not missing, "\n".join(missing)


def test_rayjobs_run_their_job():
    for job in MAIN_JOBS:
        doc = yaml.safe_load((CLUSTER / "kuberay" / f"rayjob_{job}.yaml").read_text())
        assert doc["kind"] == "RayJob"
        assert re.search(rf"\bpython jobs/{job}\.py\b", doc["spec"]["entrypoint"])
        assert doc["spec"]["shutdownAfterJobFinishes"] is True


def test_job_commands_load_against_their_schema(cluster_side_paths, monkeypatch):
    # the cluster image installs the crf extra (checked below); this machine need not have it
    monkeypatch.setattr("wsss_ray.ops.crf.crf_available", lambda: True)
    assert '-e ".[crf]"' in (ROOT / "cluster" / "docker" / "Dockerfile").read_text()
    commands = _commands()
    jobs_seen = {tokens[1] for _, tokens in commands}
    assert {f"jobs/{j}.py" for j in MAIN_JOBS} <= jobs_seen, jobs_seen
    errors = []
    for name, tokens in commands:
        where = f"{name}: {' '.join(tokens)}"
        script, args = tokens[1], tokens[2:]
        if not (ROOT / script).is_file():
            errors.append(f"{where}: no such job")
            continue
        config, overrides = None, []
        it = iter(args)
        for arg in it:
            if arg == "--config":
                config = next(it, None)
            elif "=" in arg and not arg.startswith("-"):
                overrides.append(arg)
            else:
                errors.append(f"{where}: unexpected argument {arg!r}")
        if config is None or not (ROOT / config).is_file():
            errors.append(f"{where}: needs an existing --config file (got {config})")
            continue
        try:
            cfg = load_config(_schema(script), config, overrides)
        except Exception as err:  # noqa: BLE001 - collect every failure
            errors.append(f"{where}: {err}")
            continue
        if not cfg.tracking.uri.startswith(("http://", "https://")):
            errors.append(f"{where}: tracking.uri should point at the MLflow server")
        if isinstance(cfg, TrainJobConfig) and not cfg.run.storage_path.startswith(SHARED_STORAGE):
            errors.append(f"{where}: run.storage_path should be shared storage (s3/gs/NFS)")
    assert not errors, "\n".join(errors)


def test_a_typo_in_a_cluster_command_would_be_caught(cluster_side_paths):
    """The check above is not vacuous: a misspelt key fails with the key named."""
    from wsss_ray.config import ConfigError, PGSegPretrainConfig

    with pytest.raises(ConfigError, match="run.storage_pth"):
        load_config(
            PGSegPretrainConfig, "configs/pgseg/vit_s_24m.yaml", ["run.storage_pth=s3://b/x"]
        )


def _server_args(**env) -> subprocess.CompletedProcess:
    full = {**os.environ, "MLFLOW_BIN": "echo", **env}
    full.setdefault("MLFLOW_BACKEND_URI", "postgresql://u:p@10.0.0.9:5432/mlflow")
    full.setdefault("MLFLOW_ARTIFACTS", "s3://bucket/mlflow")
    return subprocess.run(
        ["bash", str(CLUSTER / "mlflow" / "server.sh")], env=full, capture_output=True, text=True
    )


def test_mlflow_server_script_binds_privately():
    default = _server_args()
    assert default.returncode == 0, default.stderr
    argv = default.stdout.split()
    host = argv[argv.index("--host") + 1]
    assert host == "127.0.0.1" or re.match(r"(10|192\.168|172\.(1[6-9]|2\d|3[01]))\.", host)
    assert argv[argv.index("--artifacts-destination") + 1] == "s3://bucket/mlflow"
    assert argv[argv.index("--backend-store-uri") + 1].startswith("postgresql://")
    assert "p@10" not in default.stderr  # the banner does not print the password

    refused = _server_args(MLFLOW_HOST="0.0.0.0")
    assert refused.returncode == 2 and "refusing" in refused.stderr
    allowed = _server_args(MLFLOW_HOST="0.0.0.0", MLFLOW_ALLOW_ALL_INTERFACES="1")
    assert allowed.returncode == 0 and "--host 0.0.0.0" in allowed.stdout


def test_token_authentication_everywhere():
    """Ray's job API and GCS run code for whoever reaches them (ShadowRay, CVE-2023-48022):
    every cluster file turns Ray token authentication on (issue 24)."""
    for name in ("aws.yaml", "gcp.yaml"):
        doc = yaml.safe_load((CLUSTER / name).read_text())
        assert "--env RAY_AUTH_MODE=token" in doc["docker"]["run_options"], name
        assert doc["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}, name
        assert any("--dashboard-host=127.0.0.1" in c for c in doc["head_start_ray_commands"])
    for path in sorted((CLUSTER / "kuberay").glob("ray*.yaml")):
        doc = yaml.safe_load(path.read_text())
        spec = doc["spec"]
        cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
        assert cluster["authOptions"] == {"mode": "token"}, path.name
        assert cluster["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", path.name
