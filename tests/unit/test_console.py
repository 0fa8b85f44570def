"""The job's console (wsss_ray.console): its own lines shown, Ray's stream and the libraries'
INFO logs routed to console.log, exceptions and raylet errors still shown; --verbose on every
job's parser. Fed with Ray's own batch format, no Ray started (the end-to-end check with real
jobs is tests/integration/test_console_job.py, slow)."""

from __future__ import annotations

import io
import logging

import pytest

from wsss_ray import console
from wsss_ray.config import ClipPretrainConfig, parse_job_args


@pytest.fixture()
def quiet(tmp_path, monkeypatch):
    """A quiet console logging to tmp_path/console.log; the process's settings restored (but
    its open log file: ``configure`` closes it, and a closed file restored would fail the next
    write, e.g. from Ray's printer thread of a later test)."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    saved = {k: v for k, v in vars(console.CONSOLE).items() if k != "_file"}
    console.configure(False, tmp_path / "console.log")
    yield tmp_path / "console.log"
    console.CONSOLE.close()
    vars(console.CONSOLE).update(saved)


def _route(data: dict) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    console.route_worker_lines({"localhost": "10.0.0.1", "ip": "10.0.0.1", **data}, out, err)
    return out.getvalue(), err.getvalue()


def test_worker_lines_job_lines_shown_the_rest_in_the_file(quiet):
    out, err = _route(
        {
            "pid": 4242,
            "actor_name": "RayTrainWorker",
            "is_err": False,
            "lines": [
                "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully",
                "\x1b[36m[wsss_ray] step 10/20 loss 3.9062 lr 1.00e-03\x1b[0m",
                "Checkpoint successfully created at: Checkpoint(...)",
            ],
        }
    )
    assert out == "[wsss_ray] step 10/20 loss 3.9062 lr 1.00e-03\n" and err == ""
    logged = quiet.read_text().splitlines()
    assert logged[0].startswith("==== ")  # a header per job start: time and command line
    assert logged[1:] == [
        "(RayTrainWorker pid=4242) DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built "
        "successfully",
        "(RayTrainWorker pid=4242) [wsss_ray] step 10/20 loss 3.9062 lr 1.00e-03",
        "(RayTrainWorker pid=4242) Checkpoint successfully created at: Checkpoint(...)",
    ]


def test_a_worker_exception_reaches_stderr_once(quiet):
    failure = {
        "pid": 7,
        "actor_name": "RayTrainWorker",
        "is_err": True,
        "lines": [
            "Traceback (most recent call last):",
            '  File "loop.py", line 559, in train_loop_per_worker',
            "    raise RuntimeError(",
            "RuntimeError: the training data yields no full batch of 32 per worker",
        ],
    }
    out, err = _route(failure)
    assert out == ""
    assert err == (
        "(RayTrainWorker pid=7) RuntimeError: the training data yields no full batch of 32 per "
        "worker\n"
    )
    assert _route(failure) == ("", "")  # the same text again (rank 1, Ray's dedup): once
    assert "Traceback (most recent call last):" in quiet.read_text()  # the whole of it: the file
    # a warning a library prints on stderr is not an exception line
    _, err = _route({"pid": 8, "is_err": True, "lines": ["x.py:3: UserWarning: careful"]})
    assert err == ""


def test_raylet_errors_shown_its_noise_and_the_cleaner_not(quiet):
    out, err = _route(
        {
            "pid": "raylet",
            "is_err": False,
            "lines": [
                "WARNING: 8 PYTHON worker processes have been started on node: abc with address",
                "A worker died or was killed while executing a task by an unexpected system error",
            ],
        }
    )
    assert out == ""
    assert err == (
        "(raylet) A worker died or was killed while executing a task by an unexpected system "
        "error\n"
    )
    _, err = _route(
        {
            "pid": 9,
            "actor_name": "PlacementGroupCleaner",
            "is_err": True,
            "lines": ["ConnectionError: Found multiple active Ray instances"],
        }
    )
    assert err == ""  # embedded Ray: the cleaner has no State API (wsss_ray.runtime)


def test_a_sweep_keeps_its_trials_step_lines_in_the_file(quiet):
    console.configure(False, quiet, worker_lines=False)
    out, _ = _route({"pid": 3, "is_err": False, "lines": ["[wsss_ray] step 10/20 loss 3.0"]})
    assert out == "" and "[wsss_ray] step 10/20 loss 3.0" in quiet.read_text()


def test_driver_info_logs_go_to_the_file_warnings_stay(quiet):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    lg = logging.getLogger("wsss_test_console_driver")
    lg.addHandler(handler)
    lg.setLevel(logging.INFO)
    lg.propagate = False
    try:
        assert console.quiet_driver_logs() >= 1
        lg.info("Started a local Ray instance.")
        lg.warning("a worker died")
        assert stream.getvalue() == "WARNING a worker died\n"
        logged = quiet.read_text()
        assert "INFO Started a local Ray instance." in logged and "WARNING a worker died" in logged
        console.configure(True, quiet)  # --verbose: the same handler prints everything
        lg.info("again")
        assert stream.getvalue().endswith("INFO again\n")
    finally:
        lg.removeHandler(handler)


def test_verbose_flag_of_the_shared_parser(quiet, tmp_path):
    args = ["--config", "configs/clip/tiny.yaml", f"run.output_dir={tmp_path}"]
    parse_job_args(ClipPretrainConfig, "x", args)
    assert console.is_quiet()
    assert console.CONSOLE.log_path == tmp_path / "clip_tiny" / "console.log"
    parse_job_args(ClipPretrainConfig, "x", ["--verbose", *args])
    assert not console.is_quiet() and console.ray_env() == {}


def test_a_write_after_the_log_file_was_closed_reopens_it(quiet):
    """Ray's printer thread may write after the file was closed under it (a configure() of
    another job in the process): the line is appended, never a ValueError in that thread."""
    console.CONSOLE.write("first")
    console.CONSOLE._file.close()
    console.CONSOLE.write("second")
    lines = quiet.read_text().splitlines()
    assert lines[1] == "first" and lines[-1] == "second"
