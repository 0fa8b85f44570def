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
- the MLflow server script binds a private address by default and refuses 0.0.0.0; beyond
  loopback it runs MLflow's basic auth (and refuses to start without its secrets), and it always
  passes --allowed-hosts;
- nothing opens the Ray ports (GCS 6379, dashboard/Jobs API 8265, Ray Client 10001) beyond the
  cluster: the AWS security group as Ray's own launcher code would build it, the GCP firewall
  rules of docs/CLUSTER.md evaluated the way GCP does, the KubeRay Services and NetworkPolicy.
"""

from __future__ import annotations

import configparser
import dataclasses
import glob
import importlib
import ipaddress
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
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
RAY_PORTS = (6379, 8265, 10001)  # GCS, dashboard + Jobs API, Ray Client
WORLD = ("0.0.0.0/0", "::/0")
SECRET_MOUNTS = {
    "~/.ray/auth_token": "~/.ray/auth_token",
    "~/.mlflow/credentials": "~/.mlflow/credentials",
}


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
    assert cfg["file_mounts"] == SECRET_MOUNTS  # only the Ray token and the MLflow login
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


AUTH_SECRETS = {
    "MLFLOW_AUTH_ADMIN_PASSWORD": "correct-horse-battery",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "f" * 64,
}


def _server(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run server.sh with a stand-in `mlflow` that prints its arguments (one a line) and the
    auth config path it was given; returns the run and that argv (empty if never started)."""
    fake = tmp_path / "fake_mlflow"
    if not fake.exists():
        fake.write_text(
            '#!/bin/sh\nprintf "%s\\n" "$@"\necho "AUTH_CONFIG=${MLFLOW_AUTH_CONFIG_PATH:-}"\n'
        )
        fake.chmod(0o755)
    full = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    full.update(
        MLFLOW_BIN=str(fake),
        HOME=str(tmp_path),
        MLFLOW_BACKEND_URI="postgresql://u:p%40ss@10.0.0.9:5432/mlflow",
        MLFLOW_ARTIFACTS="s3://bucket/mlflow",
    )
    full.update(env)
    run = subprocess.run(
        ["bash", str(CLUSTER / "mlflow" / "server.sh")],
        env=full,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return run, run.stdout.splitlines()


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_mlflow_server_script_binds_privately(tmp_path):
    default, argv = _server(tmp_path, **AUTH_SECRETS)
    assert default.returncode == 0, default.stderr
    host = _flag(argv, "--host")
    assert host == "127.0.0.1" or re.match(r"(10|192\.168|172\.(1[6-9]|2\d|3[01]))\.", host)
    assert _flag(argv, "--artifacts-destination") == "s3://bucket/mlflow"
    assert _flag(argv, "--backend-store-uri") == "postgresql://u:p%40ss@10.0.0.9:5432/mlflow"
    assert "p%40ss" not in default.stderr  # the banner does not print the password

    refused, argv = _server(tmp_path, MLFLOW_HOST="0.0.0.0")
    assert refused.returncode == 2 and "refusing" in refused.stderr and argv == []
    allowed, argv = _server(
        tmp_path, MLFLOW_HOST="0.0.0.0", MLFLOW_ALLOW_ALL_INTERFACES="1", **AUTH_SECRETS
    )
    assert allowed.returncode == 0 and _flag(argv, "--host") == "0.0.0.0"
    assert _flag(argv, "--app-name") == "basic-auth"  # every interface is not loopback


def test_mlflow_server_script_needs_auth_beyond_loopback(tmp_path):
    # loopback: no login needed, Host headers of loopback only
    run, argv = _server(tmp_path, MLFLOW_HOST="127.0.0.1")
    assert run.returncode == 0, run.stderr
    assert "--app-name" not in argv
    assert _flag(argv, "--allowed-hosts") == "127.0.0.1,127.0.0.1:*,localhost,localhost:*"

    # a private address without the secrets: one line, exit 2, mlflow never started
    for missing in AUTH_SECRETS:
        env = {k: v for k, v in AUTH_SECRETS.items() if k != missing}
        run, argv = _server(tmp_path, MLFLOW_HOST="10.0.1.23", **env)
        assert run.returncode == 2 and argv == [], missing
        assert run.stderr.count("\n") == 1 and missing in run.stderr, run.stderr
    short = {**AUTH_SECRETS, "MLFLOW_AUTH_ADMIN_PASSWORD": "short"}
    run, argv = _server(tmp_path, MLFLOW_HOST="10.0.1.23", **short)
    assert run.returncode == 2 and "12 characters" in run.stderr and argv == []

    # with them: basic auth, its config written owner-only, no secret on the command line
    run, argv = _server(tmp_path, MLFLOW_HOST="10.0.1.23", **AUTH_SECRETS)
    assert run.returncode == 0, run.stderr
    assert _flag(argv, "--app-name") == "basic-auth"
    assert _flag(argv, "--allowed-hosts") == (
        "10.0.1.23,10.0.1.23:*,localhost,localhost:*,127.0.0.1,127.0.0.1:*"
    )
    ini = tmp_path / "mlflow" / "basic_auth.ini"
    assert argv[-1] == f"AUTH_CONFIG={ini}"
    assert ini.stat().st_mode & 0o777 == 0o600
    parser = configparser.ConfigParser()
    parser.read(ini)
    auth = parser["mlflow"]
    assert auth["database_uri"] == "postgresql://u:p%40ss@10.0.0.9:5432/mlflow"  # "%" survives
    assert auth["admin_username"] == "admin" and auth["default_permission"] == "READ"
    for secret in AUTH_SECRETS.values():
        assert secret not in ini.read_text() + run.stdout + run.stderr

    # a sqlite backend keeps the users beside it; MLFLOW_ALLOWED_HOSTS replaces the default
    db = tmp_path / "store" / "mlflow.db"
    run, argv = _server(
        tmp_path,
        MLFLOW_HOST="10.0.1.23",
        MLFLOW_BACKEND_URI=f"sqlite:///{db}",
        MLFLOW_ALLOWED_HOSTS="mlflow,mlflow:*",
        **AUTH_SECRETS,
    )
    assert run.returncode == 0, run.stderr
    parser.read(ini)
    assert parser["mlflow"]["database_uri"] == f"sqlite:///{db.parent}/basic_auth.db"
    assert _flag(argv, "--allowed-hosts") == "mlflow,mlflow:*"

    # MLFLOW_AUTH=1 turns it on for loopback too; anything else is a user error
    run, argv = _server(tmp_path, MLFLOW_HOST="127.0.0.1", MLFLOW_AUTH="1", **AUTH_SECRETS)
    assert run.returncode == 0 and _flag(argv, "--app-name") == "basic-auth"
    run, argv = _server(tmp_path, MLFLOW_HOST="10.0.1.23", MLFLOW_AUTH="0", **AUTH_SECRETS)
    assert run.returncode == 2 and "MLFLOW_AUTH" in run.stderr and argv == []


def test_token_authentication_everywhere():
    """Ray's job API and GCS run code for whoever reaches them (ShadowRay, CVE-2023-48022):
    every cluster file turns Ray token authentication on (issue 24)."""
    for name in ("aws.yaml", "gcp.yaml"):
        doc = yaml.safe_load((CLUSTER / name).read_text())
        assert "--env RAY_AUTH_MODE=token" in doc["docker"]["run_options"], name
        assert doc["file_mounts"] == SECRET_MOUNTS, name
        assert any("--dashboard-host=127.0.0.1" in c for c in doc["head_start_ray_commands"])
    for path in sorted((CLUSTER / "kuberay").glob("ray*.yaml")):
        doc = yaml.safe_load(path.read_text())
        spec = doc["spec"]
        cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
        assert cluster["authOptions"] == {"mode": "token"}, path.name
        assert cluster["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", path.name


# --------------------------------------------------------------- network exposure (issue 24)
def _doc_commands(prefix: str) -> list[list[str]]:
    """argv of every `prefix ...` command in docs/CLUSTER.md (continuations joined)."""
    lines = _logical_lines((ROOT / "docs" / "CLUSTER.md").read_text())
    return [shlex.split(line.strip()) for line in lines if line.strip().startswith(prefix)]


def _opts(argv: list[str]) -> dict[str, str]:
    return {a: b for a, b in zip(argv, argv[1:]) if a.startswith("--")}


def _doc_admin_cidr() -> str:
    text = (ROOT / "docs" / "CLUSTER.md").read_text()
    values = set(re.findall(r"^ADMIN_CIDR=(\S+)", text, re.M))
    assert len(values) == 1, values
    return values.pop()


def _ray_aws_config():
    """Ray's AWS launcher module. boto3 is a dependency of the launcher's machine, not of this
    project: when absent it is stubbed, as the functions used here never call it."""
    import importlib.util
    import types
    from unittest import mock

    stubs = {}
    if importlib.util.find_spec("boto3") is None:
        for name, attrs in {
            "boto3": {"__version__": "1.34.0"},
            "boto3.exceptions": {"ResourceNotExistsError": Exception},
            "boto3.resources": {},
            "boto3.resources.base": {"ServiceResource": object},
            "botocore": {},
            "botocore.client": {"BaseClient": object},
            "botocore.config": {"Config": object},
            "botocore.exceptions": {"ClientError": Exception},
        }.items():
            stubs[name] = types.ModuleType(name)
            vars(stubs[name]).update(attrs)
    with mock.patch.dict(sys.modules, stubs):
        return importlib.import_module("ray.autoscaler._private.aws.config")


class _FakeGroup:
    """An EC2 security group as Ray's launcher sees it."""

    def __init__(self, group_id: str, rules: list[dict]):
        self.id, self.ip_permissions, self.added = group_id, rules, []

    def authorize_ingress(self, IpPermissions):  # boto3's keyword
        self.added += IpPermissions


def _aws_reaches(rules: list[dict], source: str, port: int) -> bool:
    """Whether an AWS security group with these inbound rules admits `source` (an address, or
    "sg:<id>" for a member of that group) on TCP `port`."""
    for rule in rules:
        if str(rule.get("IpProtocol")) not in ("-1", "tcp"):
            continue
        lo, hi = rule.get("FromPort", -1), rule.get("ToPort", -1)
        if str(rule["IpProtocol"]) == "tcp" and lo != -1 and not lo <= port <= hi:
            continue
        if source.startswith("sg:"):
            if any(f"sg:{p['GroupId']}" == source for p in rule.get("UserIdGroupPairs", [])):
                return True
            continue
        cidrs = [r["CidrIp"] for r in rule.get("IpRanges", [])]
        cidrs += [r["CidrIpv6"] for r in rule.get("Ipv6Ranges", [])]
        ip = ipaddress.ip_address(source)
        if any(ip.version == n.version and ip in n for n in map(ipaddress.ip_network, cidrs)):
            return True
    return False


def _aws_doc_rules(group_id: str) -> tuple[str, list[dict]]:
    """The security group docs/CLUSTER.md tells the user to make: (name, inbound rules)."""
    admin = _doc_admin_cidr()
    [create] = _doc_commands("SG=$(aws ec2 create-security-group")
    rules = []
    for argv in _doc_commands("aws ec2 authorize-security-group-ingress"):
        opts = {k: v.replace("$SG", group_id) for k, v in _opts(argv).items()}
        if "--ip-permissions" in opts:
            spec = opts["--ip-permissions"]
            rule = {"IpProtocol": re.search(r"IpProtocol=([^,]+)", spec).group(1)}
            for key in ("FromPort", "ToPort"):
                if m := re.search(rf"{key}=(-?\d+)", spec):
                    rule[key] = int(m.group(1))
            groups = re.findall(r"GroupId=([\w-]+)", spec)
            rule["UserIdGroupPairs"] = [{"GroupId": g} for g in groups]
            cidrs = re.findall(r"CidrIp=([^,}\]]+)", spec)
            rule["IpRanges"] = [{"CidrIp": c.replace("$ADMIN_CIDR", admin)} for c in cidrs]
        else:
            lo, _, hi = opts["--port"].partition("-")
            rule = {
                "IpProtocol": opts["--protocol"],
                "FromPort": int(lo),
                "ToPort": int(hi or lo),
                "IpRanges": [{"CidrIp": opts["--cidr"].replace("$ADMIN_CIDR", admin)}],
            }
        rules.append(rule)
    return _opts(create)["--group-name"], rules


INTERNET, INTERNET6, VPC_VM = "198.51.100.7", "2001:db8::7", "10.128.0.99"


def test_aws_security_group_admits_only_ssh_from_outside():
    cfg = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    group = cfg["provider"]["security_group"]
    own_rules = group["IpPermissions"]
    admin = _doc_admin_cidr()
    admin_host = str(next(ipaddress.ip_network(admin).hosts()))
    assert [r["CidrIp"] for rule in own_rules for r in rule.get("IpRanges", [])] == [admin]
    for rule in own_rules:  # the config adds SSH, nothing else, and not from everywhere
        assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 22, 22)
        cidrs = [r.get("CidrIp") or r.get("CidrIpv6") for r in rule.get("IpRanges", [])]
        assert not set(cidrs) & set(WORLD)
    ray_aws = _ray_aws_config()

    # Ray creates the group: its defaults (members: everything; SSH from anywhere) + ours
    fresh = _FakeGroup("sg-cluster", [])
    ray_aws._upsert_security_group_rules(cfg, {"head": fresh})
    assert fresh.added, "Ray's launcher added no rules to a new group"
    for port in RAY_PORTS:
        assert _aws_reaches(fresh.added, "sg:sg-cluster", port), port
        for outside in (INTERNET, INTERNET6, admin_host, VPC_VM):
            assert not _aws_reaches(fresh.added, outside, port), (outside, port)
    assert _aws_reaches(fresh.added, admin_host, 22)
    # what docs/CLUSTER.md says, and why it has the group made first:
    assert _aws_reaches(fresh.added, INTERNET, 22), "Ray no longer opens SSH: update the docs"

    # the group made first with the commands of docs/CLUSTER.md: Ray leaves its rules alone
    name, doc_rules = _aws_doc_rules("sg-cluster")
    assert name == group["GroupName"]
    premade = _FakeGroup("sg-cluster", doc_rules)
    ray_aws._upsert_security_group_rules(cfg, {"head": premade})
    assert premade.added == []
    for port in (22, *RAY_PORTS):
        assert _aws_reaches(doc_rules, "sg:sg-cluster", port), port
        for outside in (INTERNET, INTERNET6, VPC_VM):
            assert not _aws_reaches(doc_rules, outside, port), (outside, port)
        assert _aws_reaches(doc_rules, admin_host, port) == (port == 22), port


# the rules every auto-mode VPC network named `default` starts with (and one a user might add)
GCP_DEFAULT_NETWORK_RULES = [
    {"name": "default-allow-internal", "priority": 65534, "action": "allow",
     "rules": "tcp:0-65535,udp:0-65535,icmp", "source_ranges": ["10.128.0.0/9"]},
    {"name": "default-allow-ssh", "priority": 65534, "action": "allow", "rules": "tcp:22",
     "source_ranges": ["0.0.0.0/0"]},
    {"name": "someones-allow-all", "priority": 1000, "action": "allow", "rules": "all",
     "source_ranges": ["0.0.0.0/0"]},
]  # fmt: skip


def _csv_opt(opts: dict[str, str]):
    return lambda key: [v for v in opts.get(key, "").split(",") if v]


def _gcp_doc_rules() -> list[dict]:
    admin = _doc_admin_cidr()
    rules = []
    for argv in _doc_commands("gcloud compute firewall-rules create"):
        opts = _opts(argv)
        assert opts.get("--direction", "INGRESS") == "INGRESS" and "--allow" not in opts
        split = _csv_opt(opts)
        rules.append({
            "name": argv[4],
            "priority": int(opts.get("--priority", 1000)),
            "action": opts["--action"].lower(),
            "rules": opts["--rules"],
            "source_ranges": [r.replace("$ADMIN_CIDR", admin) for r in split("--source-ranges")],
            "source_tags": split("--source-tags"),
            "target_tags": split("--target-tags"),
        })  # fmt: skip
    return rules


def _gcp_covers(rules: str, port: int) -> bool:
    for item in rules.split(","):
        proto, _, ports = item.partition(":")
        if proto == "all" or (proto == "tcp" and not ports):
            return True
        if proto == "tcp":
            lo, _, hi = ports.partition("-")
            if int(lo) <= port <= int(hi or lo):
                return True
    return False


def _gcp_admits(rules: list[dict], source_ip: str, source_tags: set, target_tags: set, port):
    """GCP's ingress decision for TCP `port`: of the matching rules the lowest priority number
    wins, a deny wins a tie, and nothing matching means denied."""
    ip = ipaddress.ip_address(source_ip)
    matching = []
    for rule in rules:
        if rule.get("target_tags") and not set(rule["target_tags"]) & target_tags:
            continue
        from_range = any(ip in ipaddress.ip_network(r) for r in rule["source_ranges"])
        from_tag = bool(set(rule.get("source_tags", [])) & source_tags)
        if (from_range or from_tag) and _gcp_covers(rule["rules"], port):
            matching.append((rule["priority"], rule["action"] != "deny", rule["action"]))
    return bool(matching) and min(matching)[2] == "allow"


def test_gcp_firewall_rules_keep_the_ray_ports_inside():
    cfg = yaml.safe_load((CLUSTER / "gcp.yaml").read_text())
    node_tags = [
        set(t["node_config"]["tags"]["items"]) for t in cfg["available_node_types"].values()
    ]
    assert node_tags and all(tags == node_tags[0] for tags in node_tags), node_tags
    tags = node_tags[0]
    doc_rules = _gcp_doc_rules()
    assert {t for r in doc_rules for t in r["target_tags"]} == tags
    for rule in doc_rules:
        if rule["action"] == "allow":  # nothing is allowed from everywhere
            assert not set(rule["source_ranges"]) & set(WORLD), rule["name"]
    rules = doc_rules + GCP_DEFAULT_NETWORK_RULES
    admin_host = str(next(ipaddress.ip_network(_doc_admin_cidr()).hosts()))
    for port in RAY_PORTS:
        assert _gcp_admits(rules, "10.128.0.5", tags, tags, port), f"node to node {port}"
        for outside in (INTERNET, admin_host, VPC_VM):
            assert not _gcp_admits(rules, outside, set(), tags, port), (outside, port)
    assert _gcp_admits(rules, admin_host, set(), tags, 22)
    assert not _gcp_admits(rules, INTERNET, set(), tags, 22)
    assert _gcp_admits(rules, "10.128.0.5", tags, tags, 5000)  # MLflow on the head
    # the evaluation is not vacuous: without the doc rules the broad allow lets the internet in
    assert _gcp_admits(GCP_DEFAULT_NETWORK_RULES, INTERNET, set(), tags, 8265)


def _pod_specs(node) -> list[dict]:
    if isinstance(node, dict):
        found = [node] if "containers" in node else []
        return found + [p for v in node.values() for p in _pod_specs(v)]
    if isinstance(node, list):
        return [p for v in node for p in _pod_specs(v)]
    return []


def _ray_cluster_spec(doc: dict) -> dict | None:
    spec = doc.get("spec", {})
    if doc["kind"] == "RayCluster":
        return spec
    return spec.get("rayClusterSpec") or spec.get("rayClusterConfig")


def test_kuberay_head_is_reachable_only_inside_its_namespace():
    policy = yaml.safe_load((CLUSTER / "kuberay" / "networkpolicy.yaml").read_text())
    assert policy["kind"] == "NetworkPolicy" and "Ingress" in policy["spec"]["policyTypes"]
    selector = policy["spec"]["podSelector"]
    assert (
        set(selector) == {"matchLabels"} and selector["matchLabels"]["ray.io/node-type"] == "head"
    )
    heads = []
    for path in KUBERAY:
        for doc in yaml.safe_load_all(path.read_text()):
            where = f"{path.name}: {doc['kind']}"
            assert "namespace" not in doc["metadata"], f"{where}: not the policy's namespace"
            for pod in _pod_specs(doc):
                assert not pod.get("hostNetwork"), where
                for container in pod["containers"]:
                    assert all("hostPort" not in p for p in container.get("ports", [])), where
            if doc["kind"] == "Service":
                assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", where
            cluster = _ray_cluster_spec(doc)
            if cluster is None:
                continue
            head = cluster["headGroupSpec"]
            assert head.get("serviceType", "ClusterIP") == "ClusterIP", where
            assert not head.get("enableIngress"), where
            serve = doc["spec"].get("serveService", {}).get("spec", {})
            assert serve.get("type", "ClusterIP") == "ClusterIP", where
            # the head pod's labels: its template's, plus the ones KubeRay sets
            labels = {**head["template"].get("metadata", {}).get("labels", {})}
            labels["ray.io/node-type"] = "head"
            missing = selector["matchLabels"].items() - labels.items()
            assert not missing, f"{where}: the NetworkPolicy misses this head ({missing})"
            heads.append(path.name)
    assert len(heads) == len(MAIN_JOBS) + 2  # raycluster, the RayJobs, the RayService

    # who gets in: for the Ray ports only this namespace's pods, and the operator to 8265
    for rule in policy["spec"]["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        assert all(isinstance(p, int) for p in ports), "name ports by number"
        ray_ports = set(RAY_PORTS) & ports if ports else set(RAY_PORTS)
        for peer in rule.get("from", []):
            cidr = peer.get("ipBlock", {}).get("cidr")
            assert cidr not in WORLD, "an ipBlock of everything"
        if not ray_ports:
            continue
        assert rule.get("from"), "a rule without `from` admits every source"
        for peer in rule["from"]:
            assert "ipBlock" not in peer, peer
            if "namespaceSelector" not in peer:
                continue  # a podSelector alone: pods of the policy's own namespace
            name = peer["namespaceSelector"].get("matchLabels", {})
            assert "kubernetes.io/metadata.name" in name, f"{peer}: some other namespace"
            assert peer["podSelector"]["matchLabels"] == {
                "app.kubernetes.io/name": "kuberay-operator"
            }
            assert ray_ports == {8265}, "the operator needs the dashboard / Jobs API only"


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_mlflow_logins_are_wired():
    for path in sorted((CLUSTER / "kuberay").glob("ray*.yaml")):
        containers = [
            c for pod in _pod_specs(yaml.safe_load(path.read_text())) for c in pod["containers"]
        ]
        assert len(containers) >= 2, path.name
        for container in containers:
            env = _env(container)
            for var, key in (("USERNAME", "username"), ("PASSWORD", "password")):
                ref = {"secretKeyRef": {"name": "mlflow-client", "key": key}}
                assert env.get(f"MLFLOW_TRACKING_{var}") == ref, (path.name, container["name"])
    [deployment, _] = yaml.safe_load_all((CLUSTER / "kuberay" / "mlflow.yaml").read_text())
    [server] = deployment["spec"]["template"]["spec"]["containers"]
    env = _env(server)
    assert server["command"] == ["/home/ray/wsss_ray/cluster/mlflow/server.sh"]
    assert env["MLFLOW_HOST"] == {"fieldRef": {"fieldPath": "status.podIP"}}  # not loopback
    for var, key in (
        ("MLFLOW_AUTH_ADMIN_PASSWORD", "admin-password"),
        ("MLFLOW_FLASK_SERVER_SECRET_KEY", "secret-key"),
    ):
        assert env[var] == {"secretKeyRef": {"name": "mlflow-auth", "key": key}}
    names = [e["name"] for e in server["env"]]  # $(MLFLOW_HOST) expands only if defined first
    assert "$(MLFLOW_HOST)" in env["MLFLOW_ALLOWED_HOSTS"]
    assert names.index("MLFLOW_HOST") < names.index("MLFLOW_ALLOWED_HOSTS")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_mlflow_basic_auth_server(tmp_path, monkeypatch):
    """The real `mlflow server --app-name basic-auth`, started by server.sh (auth forced on
    loopback): no login gets 401, the admin makes a jobs user, MlflowClient as it logs a run."""
    import requests
    from mlflow.tracking import MlflowClient

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        HOME=str(tmp_path),
        MLFLOW_BIN=str(Path(sys.executable).parent / "mlflow"),
        MLFLOW_HOST="127.0.0.1",
        MLFLOW_PORT=str(port),
        MLFLOW_WORKERS="1",
        MLFLOW_AUTH="1",
        MLFLOW_BACKEND_URI=f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}",
        MLFLOW_ARTIFACTS=str(tmp_path / "artifacts"),
        **AUTH_SECRETS,
    )
    log_path = tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}"
    admin = ("admin", AUTH_SECRETS["MLFLOW_AUTH_ADMIN_PASSWORD"])
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            ["bash", str(CLUSTER / "mlflow" / "server.sh")],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # server.sh execs mlflow: its group holds the workers
        )
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, log_path.read_text()[-3000:]
            try:
                if requests.get(f"{url}/health", timeout=10).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(1)

        search = f"{url}/api/2.0/mlflow/experiments/search?max_results=5"
        assert requests.get(search, timeout=120).status_code == 401
        wrong = ("admin", "not-the-password")
        assert requests.get(search, auth=wrong, timeout=120).status_code == 401
        assert requests.get(search, auth=admin, timeout=120).status_code == 200
        foreign = requests.get(search, auth=admin, headers={"Host": "evil.example"}, timeout=120)
        assert foreign.status_code == 403, foreign.status_code  # not in --allowed-hosts

        jobs = {"username": "wsss-jobs", "password": "jobs-password-123"}
        created = requests.post(
            f"{url}/api/2.0/mlflow/users/create", auth=admin, json=jobs, timeout=120
        )
        assert created.status_code == 200, created.text
        assert created.json()["user"] == {"id": 2, "is_admin": False, "username": "wsss-jobs"}

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", jobs["username"])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", jobs["password"])
        client = MlflowClient(tracking_uri=url)
        experiment = client.create_experiment("auth-check")
        run = client.create_run(experiment)
        client.log_metric(run.info.run_id, "loss", 0.25)
        assert client.get_run(run.info.run_id).data.metrics == {"loss": 0.25}
        assert (tmp_path / "store" / "basic_auth.db").is_file()  # users beside the store
        assert "basic auth, admin admin" in log_path.read_text()
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=30)
