"""What a job prints: its own ``[wsss_ray]`` lines on the console, everything else in a file.

Ray streams every worker's stdout and stderr to the driver, each line prefixed with its process
(``(RayTrainWorker pid=...)``) in colour: on a tiny CLIP run that is 53 lines of Ray, DeepSpeed,
open_clip and torch start-up messages around 8 of ours. By default (``--verbose`` not given) a
job started from the command line therefore shows:

- its own lines, ``[wsss_ray] ...``, from the driver and from the workers (the rank-0 step
  lines), the latter without Ray's prefix;
- warnings and errors logged in the driver (Python ``logging`` at WARNING or above, e.g. Ray's
  "a worker died" messages), and the driver's exceptions with their traceback: a failing Train
  worker or Ray Data actor re-raises there with the worker's traceback;
- the last line of every exception a worker or actor prints (``RuntimeError: ...``), once per
  distinct text, with its process named, on stderr, as it happens (its traceback: in the file).

Everything else (worker output, driver-side INFO logs of Ray and MLflow, and what the driver's
library calls wrapped in :func:`library_output` print: DeepSpeed's ZeRO merge, MLflow's model
logging) goes to ``console.log`` in the run's folder, which the job names in one line when it
starts Ray. ``--verbose`` leaves Ray's console as it is. Jobs call :func:`configure` from their
argument parser; a program that does not (a library user, the tests) keeps Ray's console
untouched. The filter replaces Ray's own log printer on the driver (``ray._private.worker``'s
"ray_print_logs" handler), so it also holds on a joined cluster (``RAY_ADDRESS``, ``ray job
submit``), where no worker-side hook runs. It is installed only when the job starts Ray itself.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

#: the prefix of every line a job prints for its user
PREFIX = "[wsss_ray]"
#: the file name of the routed output, in the run's folder
LOG_NAME = "console.log"

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
#: the last line of a Python traceback: ``RuntimeError: ...``, ``ray.exceptions.X: ...``
_EXCEPTION = re.compile(r"^(?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception|Interrupt)\b:?")
#: Ray's name of its printer of worker lines (Ray's disconnect removes it by this name)
_RAY_HANDLER = "ray_print_logs"


class Console:
    """The job's console settings and the open log file (created on first write)."""

    def __init__(self) -> None:
        self.configured = False
        self.verbose = True
        self.log_path: Path | None = None
        self.worker_lines = True
        self._file: TextIO | None = None
        self._lock = threading.Lock()
        self._seen: set[str] = set()

    @property
    def quiet(self) -> bool:
        return self.configured and not self.verbose and self.log_path is not None

    def write(self, text: str) -> None:
        """Append ``text`` (a line) to the log file."""
        if self.log_path is None:
            return
        with self._lock:
            if self._file is None or self._file.closed:
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.log_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
                stamp = time.strftime("%Y-%m-%d %H:%M:%S")
                self._file.write(f"==== {stamp} {' '.join(sys.argv)}\n")
            self._file.write(text.rstrip("\n") + "\n")

    def once(self, text: str) -> bool:
        """True the first time ``text`` is seen."""
        with self._lock:
            if text in self._seen:
                return False
            self._seen.add(text)
            return True

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


CONSOLE = Console()


def configure(verbose: bool, log_path: str | Path | None, worker_lines: bool = True) -> None:
    """Set how the job's console behaves once it starts Ray. ``log_path``: the file for
    everything filtered out (None: nothing is filtered). ``worker_lines``: show the workers'
    ``[wsss_ray]`` lines (a sweep shows only its own: every trial's steps go to the file)."""
    CONSOLE.close()
    CONSOLE.configured = True
    CONSOLE.verbose = verbose
    CONSOLE.log_path = Path(log_path).resolve() if log_path else None
    CONSOLE.worker_lines = worker_lines
    CONSOLE._seen.clear()


def run_log_path(cfg: Any) -> Path | None:
    """``<run.output_dir>/<run.name>/console.log`` of a job config, None without a ``run``."""
    run = getattr(cfg, "run", None)
    if run is None or not getattr(run, "output_dir", "") or not getattr(run, "name", ""):
        return None
    return Path(run.output_dir) / run.name / LOG_NAME


def is_quiet() -> bool:
    return CONSOLE.quiet


def ray_env() -> dict[str, str]:
    """Environment for a quiet job, set before ``ray.init``: MLflow's INFO lines off (table
    creation on every new store; only where MLflow is not imported yet, else its handler is
    filtered like Ray's). Empty when verbose."""
    if not CONSOLE.quiet:
        return {}
    return {"MLFLOW_LOGGING_LEVEL": os.environ.get("MLFLOW_LOGGING_LEVEL", "WARNING")}


#: driver warnings that are notices, not problems: (logger, start of the message). A new local
#: Ray turns token authentication on by default and warns that it did (the cluster files turn
#: it on themselves: docs/CLUSTER.md); Ray Data warns that its progress bars are off, which
#: ``wsss_ray.runtime`` does on purpose (the jobs print their own progress). The file keeps them.
NOTICES = (
    (
        "ray._private.authentication.authentication_token_setup",
        "Token authentication is enabled for this Ray cluster",
    ),
    ("ray.data._internal.progress", "Progress bars disabled"),
)


# ----------------------------------------------------------------------- the driver's loggers
class _InfoToFile(logging.Filter):
    """On a console handler of the driver: records under WARNING go to the log file only."""

    def __init__(self, handler: logging.Handler) -> None:
        super().__init__("wsss_ray.console")
        self.handler = handler

    def filter(self, record: logging.LogRecord) -> bool:
        if not CONSOLE.quiet:
            return True
        try:
            CONSOLE.write(self.handler.format(record))
        except Exception:  # noqa: BLE001 - a log line must never break the job
            pass
        return record.levelno >= logging.WARNING


def _console_handlers() -> list[logging.Handler]:
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    return [
        h
        for lg in loggers
        for h in lg.handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]


class _NoticeToFile(logging.Filter):
    """On a logger: its :data:`NOTICES` go to the log file only."""

    def __init__(self, start: str) -> None:
        super().__init__("wsss_ray.console")
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        if not CONSOLE.quiet or not str(record.msg).startswith(self.start):
            return True
        CONSOLE.write(f"{record.levelname} {record.name}: {record.getMessage()}")
        return False


def quiet_driver_logs() -> int:
    """Route the INFO lines of every console log handler that exists now (Ray's, Ray Data's,
    MLflow's when imported) and Ray's :data:`NOTICES` to the log file; returns how many
    handlers were filtered."""
    for name, start in NOTICES:
        lg = logging.getLogger(name)
        if not any(isinstance(f, _NoticeToFile) for f in lg.filters):
            lg.addFilter(_NoticeToFile(start))
    n = 0
    for h in _console_handlers():
        if not any(isinstance(f, _InfoToFile) for f in h.filters):
            h.addFilter(_InfoToFile(h))
            n += 1
    return n


# ------------------------------------------------------------------------ the workers' lines
def _who(data: dict[str, Any]) -> str:
    pid = data.get("pid")
    if pid in ("raylet", "autoscaler"):
        return f"({pid})"
    name = data.get("actor_name") or data.get("task_name") or ""
    ip = data.get("ip")
    where = "" if ip == data.get("localhost") else f", ip={ip}"
    return f"({name + ' ' if name else ''}pid={pid}{where})"


def _autoscaler_events(lines: list[str]) -> list[str]:
    """What Ray itself prints of the autoscaler's stream: its events (the rest is the status
    table it publishes every few seconds)."""
    try:
        from ray._private.worker import filter_autoscaler_events
    except ImportError:
        return []
    return list(filter_autoscaler_events(lines))


#: raylet messages (Ray's error channel) that are no problem of the job's: the embedded Ray
#: starts more Python workers at once than its default concurrency (Ray Data's actor pools)
RAYLET_NOISE = ("PYTHON worker processes have been started on node",)


#: actors whose errors are no problem of the job's on the embedded Ray (no ``RAY_ADDRESS``):
#: Ray Train's PlacementGroupCleaner asks the State API, which the embedded Ray (no dashboard)
#: does not have, or fails to find the cluster when other Rays run on the machine; all it does
#: is remove a dead controller's placement group, and the embedded cluster ends with the job
#: (``wsss_ray.runtime``). On a joined cluster its errors are shown.
EMBEDDED_NOISE_ACTORS = ("PlacementGroupCleaner",)


def route_worker_lines(
    data: dict[str, Any], out: TextIO | None = None, err: TextIO | None = None
) -> None:
    """Ray's batch of worker lines (``pid``, ``actor_name``/``task_name``, ``is_err``,
    ``lines``): ``[wsss_ray]`` lines to ``out`` as they are, the first of each distinct
    exception line to ``err`` with its process named, every line to the log file. The raylet's
    messages (worker deaths, out-of-memory kills) go to ``err`` but for :data:`RAYLET_NOISE`."""
    out = out or sys.stdout
    err = err or sys.stderr
    who = _who(data)
    lines = data.get("lines", [])
    if data.get("pid") == "autoscaler":
        lines = _autoscaler_events(lines)
    noise = data.get("actor_name") in EMBEDDED_NOISE_ACTORS and not os.environ.get("RAY_ADDRESS")
    shown = False
    for raw in lines:
        line = _ANSI.sub("", raw)
        CONSOLE.write(f"{who} {line}")
        text = line.strip()
        if text.startswith(PREFIX):
            if CONSOLE.worker_lines:
                print(text, file=out)
                shown = True
        elif data.get("pid") == "raylet":
            if not any(n in text for n in RAYLET_NOISE) and CONSOLE.once(text):
                print(f"{who} {text}", file=err)
                shown = True
        elif data.get("is_err") and not noise and _EXCEPTION.match(text) and CONSOLE.once(text):
            print(f"{who} {text}", file=err)
            shown = True
    if shown:
        out.flush()
        err.flush()


def filter_ray_output() -> bool:
    """Replace Ray's printer of worker lines on this driver by :func:`route_worker_lines`, and
    its printer of the raylet's error channel likewise; False when this Ray has no printer
    (``log_to_driver=False``) or another layout."""
    try:
        import ray._private.worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    ray_printer = next((h for name, h in dispatcher.handlers if name == _RAY_HANDLER), None)
    if ray_printer is None:
        return False

    def print_worker_lines(data: dict[str, Any]) -> None:
        if CONSOLE.quiet:
            route_worker_lines(data)
        else:  # a later job of this process asked for --verbose
            ray_printer(data)

    dispatcher.remove_handler(_RAY_HANDLER)
    dispatcher.add_handler(_RAY_HANDLER, print_worker_lines)  # removed by Ray's disconnect
    printer = ray_worker.print_to_stdstream  # what listen_error_messages calls for raylet lines
    if not getattr(printer, "_wsss_console", False):

        def print_to_stdstream(data: dict[str, Any], ignore_prefix: bool) -> None:
            if CONSOLE.quiet:
                route_worker_lines(data)
            else:
                printer(data, ignore_prefix)

        print_to_stdstream._wsss_console = True  # type: ignore[attr-defined]
        ray_worker.print_to_stdstream = print_to_stdstream
    return True


class _ToFile(io.TextIOBase):
    """A stand-in for sys.stdout / sys.stderr: whole lines to the log file, but ``[wsss_ray]``
    lines (ours, or a worker's printed by Ray's thread meanwhile) to the real stream."""

    def __init__(self, real: TextIO) -> None:
        self.real = real
        self.pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = re.split(r"[\r\n]", self.pending)
        for line in lines:
            self._line(line)
        return len(text)

    def _line(self, line: str) -> None:
        if line.startswith(PREFIX):
            self.real.write(line + "\n")
            self.real.flush()
        elif line.strip():
            CONSOLE.write(_ANSI.sub("", line))

    def flush(self) -> None:
        self.real.flush()

    def close_pending(self) -> None:
        if self.pending:
            self._line(self.pending)
            self.pending = ""


@contextlib.contextmanager
def library_output() -> Iterator[None]:
    """Around library calls of the driver that print, warn and draw progress bars (DeepSpeed's
    ZeRO merge, MLflow's model logging): when quiet, their stdout and stderr go to the log file
    (``[wsss_ray]`` lines still to the console); exceptions pass through unchanged."""
    if not CONSOLE.quiet:
        yield
        return
    out, err = _ToFile(sys.stdout), _ToFile(sys.stderr)
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
        out.close_pending()
        err.close_pending()


def announce() -> None:
    """The one line that says where the filtered output goes."""
    print(
        f"{PREFIX} Ray, DeepSpeed and library output: {CONSOLE.log_path} (--verbose shows it here)",
        flush=True,
    )
