"""Every job has --help; a config error exits 2 with one line, before any Ray work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
JOBS = sorted(p.name for p in (ROOT / "jobs").glob("*.py") if p.name != "__init__.py")


@pytest.mark.parametrize("job", JOBS)
def test_help(job):
    out = subprocess.run(
        [sys.executable, f"jobs/{job}", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "usage:" in out.stdout
    if job not in ("make_shards.py", "benchmark.py"):  # no Ray; benchmark: per subcommand
        assert "--verbose" in out.stdout  # Ray's output on the console (wsss_ray.console)


def test_config_error_is_one_line_before_ray():
    out = subprocess.run(
        [sys.executable, "jobs/pretrain_clip.py", "train.max_stepz=3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip() == "config error: unknown key 'train.max_stepz'"
    assert "Ray" not in out.stdout + out.stderr


def test_bad_model_name_caught_before_ray():
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from wsss_ray.config import *; from wsss_ray.tasks import check_config;"
            "check_config(load_config(ClipPretrainConfig, 'configs/clip/tiny.yaml',"
            " ['data.image_size=96']))",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0 and "data.image_size: wsss-tiny takes 64px" in out.stderr


def _job(args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("value", ["yes", "1", "on", "y"])
def test_booleans_are_true_or_false_only(value):
    out = _job(["jobs/pretrain_pgseg.py", f"scaling.use_gpu={value}"])
    assert out.returncode == 2 and out.stderr.strip() == (
        f"config error: scaling.use_gpu: '{value}' is not a boolean (true or false)"
    )


def test_a_job_runs_from_another_folder(tmp_path):
    """The default config is found next to the package, not in the current folder."""
    out = _job([str(ROOT / "jobs/pretrain_pgseg.py"), "--print-config"], cwd=tmp_path)
    assert out.returncode == 0 and "task: pgseg" in out.stdout, out.stderr


@pytest.mark.parametrize(
    "job", ["vpl_prototypes.py", "vpl_pseudo_labels.py", "train_vpl.py", "eval_vpl.py"]
)
def test_print_config_before_the_inputs_exist(job, tmp_path):
    """--print-config shows a VPL phase's config before phase 1 has run, saying what is still
    missing (exit 0); running it is the one-line error (exit 2)."""
    args = [f"jobs/{job}", f"run.output_dir={tmp_path}", "clip.weights=/no/such/clip"]
    shown = _job([*args, "--print-config"])
    assert shown.returncode == 0 and "clip:" in shown.stdout
    assert shown.stderr.startswith("note: not runnable yet: config error:")
    run = _job(args)
    assert run.returncode == 2 and run.stderr.startswith("config error:")
