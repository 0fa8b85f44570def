"""User-input errors end a job with one line and exit status 2 (wsss_ray.errors), also when
they come back from a Ray task wrapped in Ray's error, and in the jobs that call the work."""

from __future__ import annotations

import pytest

from wsss_ray.data.segmentation import DatasetError
from wsss_ray.errors import UserInputError, message, user_errors
from wsss_ray.models.pgseg import PartialCheckpointError, UntrustedPickleError


def test_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as stop, user_errors():
        raise DatasetError("/data/instances.json: annotation 6 has category_id 999")
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: /data/instances.json: annotation 6 has category_id 999\n"
    for cls in (DatasetError, PartialCheckpointError, UntrustedPickleError):
        assert issubclass(cls, UserInputError) and issubclass(cls, ValueError)


def test_other_errors_pass_through():
    with pytest.raises(RuntimeError), user_errors():
        raise RuntimeError("a bug: keep its traceback")


def test_ray_wrapped_error_prints_the_cause():
    """Ray's own wrapper of an error raised in a task or actor (no cluster needed to build
    it): an instance of the user error, with the traceback-laden message, and the cause."""
    from ray.exceptions import RayTaskError

    cause = DatasetError("mask.png: 30 x 20 differs")
    wrapped = RayTaskError(
        "Actor.__call__", "Traceback ...", cause, proctitle="ray::Actor", pid=1, ip="127.0.0.1"
    ).as_instanceof_cause()
    assert isinstance(wrapped, DatasetError) and str(wrapped) != str(cause)
    assert message(wrapped) == "mask.png: 30 x 20 differs"


@pytest.mark.parametrize("job", ["eval_pgseg", "eval_vpl"])
def test_eval_jobs_report_dataset_errors(job, monkeypatch, capsys):
    import importlib

    mod = importlib.import_module(f"jobs.{job}")
    target = "wsss_ray.eval.pgseg" if job == "eval_pgseg" else "wsss_ray.eval.vpl_seg"

    def broken(cfg):
        raise DatasetError("/data/coco/annotations/instances_val2014.json: not JSON")

    monkeypatch.setattr(importlib.import_module(target), "run", broken)
    monkeypatch.setattr(mod, "parse_job_args", lambda *a, **k: object())  # no inputs needed
    with pytest.raises(SystemExit) as stop:
        mod.main([])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: /data/coco/annotations/instances_val2014.json: not JSON"
    )
