"""Shared benchmark machinery: interleaved repeats, medians with spreads, ratios to a baseline,
speed targets, Markdown tables, the machine description and the JSON report.

The machines these run on are often shared, and CPU contention from other jobs moves a figure by
2-5x within a minute. So every figure that is compared with a baseline is measured interleaved
(A, B, A, B, ... for several repeats) and reported as the median with its min-max range; a ratio
is the median of the *paired* per-repeat ratios (repeat i of ours over repeat i of the baseline,
taken back to back), which cancels most of the drift a slow minute causes.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: dense bf16 peak of one GPU in TFLOP/s (vendor datasheets, no sparsity), matched on the name
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


@dataclass
class Stat:
    """Repeated measurements of one figure."""

    values: list[float]
    unit: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def lo(self) -> float:
        return min(self.values) if self.values else float("nan")

    @property
    def hi(self) -> float:
        return max(self.values) if self.values else float("nan")

    @property
    def spread(self) -> float:
        """(max - min) / median: 0.1 means the repeats span 10% of the median."""
        m = self.median
        return (self.hi - self.lo) / m if m else float("nan")

    def fmt(self, digits: int = 3) -> str:
        """``median (min-max)`` with ``digits`` significant digits."""
        if not self.values:
            return "n/a"
        if len(self.values) == 1:
            return _num(self.median, digits)
        return f"{_num(self.median, digits)} ({_num(self.lo, digits)}-{_num(self.hi, digits)})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "median": self.median,
            "min": self.lo,
            "max": self.hi,
            "spread": self.spread,
            "n": len(self.values),
            "unit": self.unit,
            "values": list(self.values),
        }

    def scaled(self, factor: float, unit: str | None = None) -> Stat:
        """Every value times ``factor`` (e.g. a ratio per core), in ``unit`` (default: the same)."""
        return Stat([v * factor for v in self.values], self.unit if unit is None else unit)


def _num(x: float, digits: int) -> str:
    if x != x:  # nan
        return "n/a"
    if abs(x) >= 10**digits:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def paired_ratio(num: Stat, den: Stat, unit: str = "x") -> Stat:
    """Per-repeat ratios num[i] / den[i] of two interleaved series."""
    return Stat([a / b for a, b in zip(num.values, den.values) if b], unit)


Runner = Callable[[], "float | dict[str, float]"]


def interleave(
    runners: dict[str, Runner],
    repeats: int,
    warmup: int = 0,
    log: Callable[[str], None] | None = print,
) -> dict[str, dict[str, Stat]]:
    """Run every runner once per round, in order, for ``warmup`` unrecorded rounds and then
    ``repeats`` recorded ones. A runner returns one figure or a dict of named figures; the
    result is ``{runner: {figure: Stat}}`` (a bare figure is named ``value``)."""
    out: dict[str, dict[str, Stat]] = {name: {} for name in runners}
    for r in range(warmup + repeats):
        for name, fn in runners.items():
            t0 = time.perf_counter()
            got = fn()
            figures = got if isinstance(got, dict) else {"value": float(got)}
            if r < warmup:
                if log:
                    log(f"  warm-up {name} ({time.perf_counter() - t0:.1f}s)")
                continue
            for key, value in figures.items():
                out[name].setdefault(key, Stat([])).values.append(float(value))
            if log:
                shown = ", ".join(f"{k} {_num(float(v), 4)}" for k, v in figures.items())
                log(f"  [{r - warmup + 1}/{repeats}] {name}: {shown}")
    return out


def rounds(
    runners: dict[str, Runner], cfg: Any, what: str, ray_cpus: int | None = None
) -> dict[str, dict[str, Stat]]:
    """A benchmark's measured rounds: the embedded Ray for ``ray_cpus`` actors started first
    (:func:`start_bench_ray`, when given), ``what`` is measured said, then :func:`interleave`
    of the runners over ``cfg.warmup`` (0 when it has none) + ``cfg.repeats`` rounds, logged."""
    if ray_cpus is not None:
        start_bench_ray(ray_cpus)
    warmup = getattr(cfg, "warmup", 0)
    say(f"{what}; {warmup} warm-up + {cfg.repeats} interleaved rounds of {', '.join(runners)}")
    return interleave(runners, cfg.repeats, warmup, log=say)


@dataclass
class Target:
    """A speed target: ``measured op threshold`` (op is ``>=`` or ``<=``). ``measured`` None:
    not measurable on this machine (e.g. a GPU target on a CPU node)."""

    name: str
    measured: float | None
    op: str
    threshold: float
    unit: str = "x"
    note: str = ""

    @property
    def met(self) -> bool | None:
        if self.measured is None or self.measured != self.measured:
            return None
        if self.op == ">=":
            return self.measured >= self.threshold
        return self.measured <= self.threshold

    def row(self) -> list[str]:
        value = "n/a" if self.measured is None else f"{self.measured:.3g}{self.unit}"
        verdict = {True: "met", False: "MISSED", None: "not measured"}[self.met]
        return [self.name, f"{self.op} {self.threshold:g}{self.unit}", value, verdict, self.note]

    def to_dict(self) -> dict[str, Any]:
        keys = ("name", "measured", "op", "threshold", "unit", "met", "note")
        return {k: getattr(self, k) for k in keys}


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub Markdown table with padded columns (readable in a terminal too)."""
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def machine_info() -> dict[str, Any]:
    """What the figures came from: cores, CPU model, load, torch and the GPU if any."""
    import torch

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor()
    info: dict[str, Any] = {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_count": os.cpu_count(),
        "cpu_model": model or platform.processor() or "unknown",
        "loadavg_1m_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def peak_bf16_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a known GPU (``PEAK_BF16_TFLOPS``), None when unknown."""
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in device_name.upper():
            return value
    return None


@dataclass
class Report:
    """One subcommand's outcome: tables to print, figures and targets to save."""

    name: str
    config: dict[str, Any]
    machine: dict[str, Any] = field(default_factory=machine_info)
    tables: list[tuple[str, list[str], list[list[str]]]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def table(self, title: str, headers: list[str], rows: list[list[str]]) -> None:
        self.tables.append((title, headers, rows))

    def render(self) -> str:
        m = self.machine
        head = (
            f"## benchmark {self.name}: {m['nproc']} cores ({m['cpu_model']}), "
            f"{m.get('gpu', 'no GPU')}, torch {m['torch']}, load {m['loadavg_1m_at_start']:.1f} "
            f"at start, {m.get('loadavg_1m_at_end', float('nan')):.1f} at end"
        )
        parts = [head, "figures: median (min-max) over the interleaved repeats"]
        for title, headers, rows in self.tables:
            parts += ["", f"### {title}", "", markdown_table(headers, rows)]
        if self.targets:
            parts += ["", "### targets", ""]
            parts.append(
                markdown_table(
                    ["target", "wanted", "measured", "verdict", "note"],
                    [t.row() for t in self.targets],
                )
            )
        if self.notes:
            parts += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(parts)

    def to_json(self) -> dict[str, Any]:
        def plain(v: Any) -> Any:
            if isinstance(v, Stat):
                return v.to_dict()
            if isinstance(v, dict):
                return {str(k): plain(x) for k, x in v.items()}
            if isinstance(v, list | tuple):
                return [plain(x) for x in v]
            return v

        return {
            "benchmark": self.name,
            "config": plain(self.config),
            "machine": self.machine,
            "figures": plain(self.figures),
            "targets": [t.to_dict() for t in self.targets],
            "notes": self.notes,
            "tables": [{"title": t, "headers": h, "rows": r} for t, h, r in self.tables],
        }

    def finish(self, out: str | None) -> str:
        """Record the end load, write the JSON (when ``out``), return the printed text."""
        if hasattr(os, "getloadavg"):
            self.machine["loadavg_1m_at_end"] = os.getloadavg()[0]
        if out:
            path = Path(out)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return self.render()


#: process groups of :class:`CpuMeter`: (group, substring of the command line), first match wins
CPU_GROUPS = (
    ("decode actors", "MapBatches("),
    ("split coordinator", "SplitCoordinator"),
    ("ray daemons", "raylet"),
    ("ray daemons", "gcs_server"),
    ("ray daemons", "ray/dashboard"),
    ("ray daemons", "log_monitor"),
    ("other ray workers", "ray::"),
    ("other ray workers", "default_worker.py"),
)


def _cpu_group(cmdline: str, pid: int) -> str:
    if pid == os.getpid():
        return "consumer"
    for group, needle in CPU_GROUPS:
        if needle in cmdline:
            return group
    return "rest of the machine"


class CpuMeter:
    """CPU seconds per process group (:data:`CPU_GROUPS`, the consumer = this process) between
    :meth:`start` and :meth:`stop`, from psutil. Only processes alive at both ends count, so call
    both while the pipeline's processes run (``consume`` does: at the steady state's first batch
    and when ``meter_images`` images have arrived). Answers where a pipeline's cores go."""

    def __init__(self) -> None:
        self._start: dict[int, tuple[str, float]] = {}
        self._t0 = 0.0
        self.seconds: dict[str, float] = {}
        self.wall = 0.0
        self.images = 0

    @staticmethod
    def _snapshot() -> dict[int, tuple[str, float]]:
        import psutil

        out = {}
        for proc in psutil.process_iter(["pid", "cmdline", "cpu_times"]):
            info = proc.info
            times = info.get("cpu_times")
            if times is None:
                continue
            cmd = " ".join(info.get("cmdline") or [])
            out[info["pid"]] = (_cpu_group(cmd, info["pid"]), times.user + times.system)
        return out

    def start(self) -> None:
        self._start, self._t0 = self._snapshot(), time.perf_counter()

    def stop(self, images: int) -> None:
        end, self.wall = self._snapshot(), time.perf_counter() - self._t0
        self.images = images
        self.seconds = {}
        for pid, (group, cpu) in end.items():
            if pid in self._start:
                self.seconds[group] = self.seconds.get(group, 0.0) + cpu - self._start[pid][1]

    def cores(self) -> dict[str, float]:
        """Average cores busy per group over the window."""
        return {g: sec / max(self.wall, 1e-9) for g, sec in self.seconds.items()}

    def images_per_cpu_second(self, group: str) -> float:
        """Images per CPU-second of ``group``; NaN when it used no measurable CPU (e.g. its
        processes exited before the window closed)."""
        sec = self.seconds.get(group, 0.0)
        return self.images / sec if sec > 0 else float("nan")


def consume(
    batches: Any,
    count: Callable[[Any], int],
    skip: int = 1,
    meter: CpuMeter | None = None,
    meter_images: int = 0,
) -> dict[str, float]:
    """Drain an iterator of batches. ``images_per_s`` is the steady state: from the arrival of
    batch ``skip`` to the last (with N parallel producers the first N batches arrive together
    after start-up, so ``skip`` = N); ``first_batch_s`` is the start-up. With ``meter``, CPU
    time is measured from batch ``skip`` until ``meter_images`` images have arrived (before the
    last batch, while the producers are still alive)."""
    t0 = time.perf_counter()
    n = seen = 0
    t_first = t_skip = None
    n_skip = 0
    metering = False
    for batch in batches:
        n += count(batch)
        seen += 1
        if t_first is None:
            t_first = time.perf_counter()
        if seen == skip:
            t_skip, n_skip = time.perf_counter(), n
            if meter is not None:
                meter.start()
                metering = True
        elif metering and n >= meter_images:
            meter.stop(n - n_skip)
            metering = False
    t_end = time.perf_counter()
    if t_first is None:
        raise RuntimeError("the pipeline produced no batch")
    if t_skip is None or n == n_skip:  # too few batches for a steady state
        t_skip, n_skip = t0, 0
    return {
        "images_per_s": (n - n_skip) / max(t_end - t_skip, 1e-9),
        "end_to_end_images_per_s": n / max(t_end - t0, 1e-9),
        "first_batch_s": t_first - t0,
        "images": float(n),
    }


def rate_cells(r: dict[str, Any]) -> list[str]:
    """The table cells of one measured pipeline: images/s, its spread, images per pass, time to
    the first batch, images/s including start-up (``bench data`` and ``bench eval`` share them)."""
    return [
        r["images_per_s"].fmt(),
        f"{100 * r['images_per_s'].spread:.0f}%",
        f"{r['images'].median:.0f}",
        r["first_batch_s"].fmt(),
        r["end_to_end_images_per_s"].fmt(),
    ]


def stat_row(label: str, stat: Stat, digits: int = 3) -> list[str]:
    return [label, stat.fmt(digits), f"{100 * stat.spread:.0f}%"]


def say(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def start_bench_ray(cpus: int) -> None:
    """An embedded Ray of ``cpus`` + 1 logical CPUs (the measured actors plus one read task),
    with Ray Data's progress bars and INFO lines off so they do not interleave with the log."""
    import logging

    from wsss_ray.runtime import start_ray

    start_ray(cpus + 1, cpus + 1)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
