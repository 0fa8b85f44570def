"""jobs/benchmark.py: every subcommand runs end to end at toy sizes, prints its tables and the
ratio to its baseline, writes the JSON, and the baseline and ours process the same samples.
No timing is ever asserted (speed targets live in the benchmark, not in tests)."""

from __future__ import annotations

import json
import math
import time

import pytest

from jobs import benchmark
from wsss_ray.bench.common import (
    Stat,
    Target,
    consume,
    interleave,
    markdown_table,
    paired_ratio,
)
from wsss_ray.bench.data import CPU_REPORT_GROUPS


# ------------------------------------------------------------------------------- machinery
def test_stat_median_spread_and_format():
    s = Stat([3.0, 1.0, 2.0])
    assert s.median == 2.0 and s.lo == 1.0 and s.hi == 3.0 and s.spread == 1.0
    assert s.fmt() == "2 (1-3)"
    assert Stat([]).fmt() == "n/a" and math.isnan(Stat([]).median)
    assert paired_ratio(Stat([2.0, 6.0]), Stat([1.0, 3.0])).values == [2.0, 2.0]


def test_interleave_alternates_and_skips_warmup():
    order: list[str] = []

    def runner(name, value):
        def fn():
            order.append(name)
            return value

        return fn

    res = interleave(
        {"a": runner("a", 1.0), "b": runner("b", {"x": 2.0})}, repeats=2, warmup=1, log=None
    )
    assert order == ["a", "b"] * 3
    assert res["a"]["value"].values == [1.0, 1.0] and res["b"]["x"].values == [2.0, 2.0]


def test_targets_and_table():
    assert Target("t", 1.0, ">=", 0.9).met is True
    assert Target("t", 6.0, "<=", 5.0, "%").met is False
    assert Target("t", None, "<=", 5.0).met is None
    assert "not measured" in Target("t", None, "<=", 5.0).row()
    table = markdown_table(["a", "bb"], [["1", "2"]])
    assert table.splitlines()[0] == "| a | bb |" and table.splitlines()[2] == "| 1 | 2  |"


def test_consume_counts_every_image():
    batches = [{"image": [0] * 4} for _ in range(5)]
    out = consume(iter(batches), lambda b: len(b["image"]), skip=2)
    assert out["images"] == 20 and out["images_per_s"] > 0


@pytest.mark.parametrize("sub", ["data", "npr", "train", "eval", "decode"])
def test_subcommand_help(sub, capsys):
    with pytest.raises(SystemExit) as exit_:
        benchmark.main([sub, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--out" in out and "--repeats" in out


# ------------------------------------------------------------------------------ subcommands
def _run(argv, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert benchmark.main([*argv, "--out", str(out), "--repeats", "1"]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["machine"]["nproc"] >= 1 and report["tables"]
    return report, printed


def test_npr_toy(tmp_path, capsys):
    report, printed = _run(
        [
            "npr",
            "--size",
            "tiny",
            "--batches",
            "2",
            "--warmup",
            "0",
            "--loop-batch",
            "4",
            "--ablation",
            "true",
        ],
        tmp_path,
        capsys,
    )
    assert "share of step" in printed and "baseline / ours" in printed
    fig = report["figures"]["batch_2"]
    for key in ("step_s", "em_s", "match_s", "lpg_s", "npr_s", "share", "step_no_pg_s"):
        assert fig[key]["n"] == 1
    assert report["figures"]["em_batched_vs_loop"]["loop_over_batched"]["n"] == 1
    (target,) = report["targets"]
    assert target["met"] is None and "batch 2" in target["note"]  # a GPU target, not on CPU


def test_data_toy(tmp_path, capsys, ray_local):
    report, printed = _run(
        [
            "data",
            "--num-images",
            "64",
            "--source-size",
            "48",
            "--image-size",
            "32",
            "--samples-per-shard",
            "16",
            "--cpus",
            "2",
            "--actors",
            "3",
            "--decode-batch",
            "8",
            "--batch",
            "8",
            "--ceiling-images",
            "8",
            "--warmup",
            "0",
            "--data-dir",
            str(tmp_path / "shards"),
        ],
        tmp_path,
        capsys,
    )
    assert "ours / plain" in printed and "ours / ceiling" in printed
    fig = report["figures"]
    assert fig["ours"]["images"]["values"] == fig["plain"]["images"]["values"] == [64.0]
    assert fig["ours_over_plain"]["n"] == 1
    assert [t["met"] is not None for t in report["targets"]] == [True, True]
    assert "3 actors on 2 CPUs" in printed and "where the cores go" in printed
    for name in ("ours", "ours_fused"):  # the steady state's CPU time, per process group
        # a 64-image toy may finish decoding before its window closes (the actors exit), so only
        # the figures' presence is checked here; the meter itself is tested below
        cores = [fig[name][f"cores/{g}"]["values"][0] for g in CPU_REPORT_GROUPS]
        assert all(c >= 0 for c in cores)


def test_cpu_meter_counts_this_process_as_the_consumer():
    from wsss_ray.bench.common import CpuMeter

    meter = CpuMeter()
    meter.start()
    t0 = time.process_time()
    while time.process_time() - t0 < 0.3:  # 0.3 s of this process's CPU
        sum(range(1000))
    meter.stop(images=30)
    sec = meter.seconds["consumer"]
    assert 0.25 < sec < 1.5  # this loop, plus whatever threads the process runs besides
    assert meter.cores()["consumer"] == sec / meter.wall > 0
    assert meter.images_per_cpu_second("consumer") == 30 / sec
    assert math.isnan(CpuMeter().images_per_cpu_second("decode actors"))  # no CPU measured


def test_eval_toy(tmp_path, capsys, ray_local):
    report, printed = _run(
        [
            "eval",
            "--num-images",
            "8",
            "--image-size",
            "64",
            "--cpus",
            "1",
            "--batch",
            "4",
            "--warmup",
            "0",
            "--data-dir",
            str(tmp_path / "eval"),
        ],
        tmp_path,
        capsys,
    )
    assert "zero_shot: ours / plain" in printed and "pseudo_labels: ours / plain" in printed
    for what in ("zero_shot", "pseudo_labels"):
        fig = report["figures"][what]
        assert fig["ours"]["images"]["values"] == fig["plain"]["images"]["values"] == [8.0]


@pytest.mark.slow  # ~50 s: a Ray Train run plus in-process baselines
def test_train_toy(tmp_path, capsys, ray_local):
    report, printed = _run(
        [
            "train",
            "--size",
            "tiny",
            "--batch",
            "4",
            "--steps",
            "2",
            "--warmup-steps",
            "1",
            "--decode-actors",
            "1",
            "--use-gpu",
            "false",
            "--isolate",
            "true",
            "--ab",
            "grad_checkpointing,tf32",
            "--data-dir",
            str(tmp_path / "shards"),
            "--storage",
            str(tmp_path / "ray_results"),
        ],
        tmp_path,
        capsys,
    )
    assert "ours / plain" in printed and "GFLOP per sample" in printed
    fig = report["figures"]
    for path in ("ours", "ray_train", "deepspeed", "ab_grad_checkpointing"):
        assert fig[path]["samples"]["values"] == fig["plain"]["samples"]["values"] == [8.0]
    assert fig["ab_grad_checkpointing_over_deepspeed"]["n"] == 1
    assert "ab_tf32" not in fig and any("--ab tf32: skipped" in n for n in report["notes"])
    assert fig["flops_per_sample"] > 0
    for phase in ("data_s", "forward_s", "backward_s", "optimizer_s", "comm_s"):
        assert phase in fig["ours"]
    assert report["targets"][0]["met"] is None  # MFU needs a GPU


# ------------------------------------------- the hot-path change the npr benchmark motivated
def test_hungarian_thread_slices_and_async_equal_serial():
    """64 x 64 matchings take the per-thread-slice path; results equal the serial ones, and
    the asynchronous handle gives the same permutation (on CPU it is ready at once)."""
    import torch

    from wsss_ray.ops import matching

    g = torch.Generator().manual_seed(7)
    groups, protos = torch.randn(40, 64, 16, generator=g), torch.randn(40, 64, 16, generator=g)
    assert 64 >= matching.THREAD_MIN_K
    serial = matching.hungarian_match(groups, protos, threads=1)
    assert torch.equal(matching.hungarian_match(groups, protos, threads=4), serial)
    assert torch.equal(matching.hungarian_match_async(groups, protos, threads=3).result(), serial)
    assert sorted(serial[0].tolist()) == list(range(64))  # a permutation


def test_decode_toy(tmp_path, capsys):
    """On CPU: the actors' parse (GPU-decode mode) is cheaper per image than their decode, and
    the cores-per-GPU table follows the formula; the GPU rows are CUDA-only."""
    report, printed = _run(
        ["decode", "--num-images", "16", "--source-size", "256", "--step-rate", "1000"],
        tmp_path,
        capsys,
    )
    fig = report["figures"]
    decode = fig["decode_tokenize_per_core"]["median"]
    assert fig["parse_tokenize_per_core"]["median"] > decode
    assert fig["cores_per_gpu"]["cpu"] == pytest.approx(1000 / decode)
    (target,) = report["targets"]
    assert target["met"] is None and "GPU decode" in target["name"]


@pytest.mark.slow  # seven actor-pool starts: ~50 s on 2 cores
def test_scale_toy(tmp_path, capsys, ray_local):
    out = tmp_path / "scale.json"
    argv = ["scale", "--shard-counts", "4,40", "--passes", "2", "--executions", "2"]
    argv += ["--baseline-shards", "8", "--data-dir", str(tmp_path / "d"), "--out", str(out)]
    assert benchmark.main(argv) == 0
    report = json.loads(out.read_text())
    fig = report["figures"]
    assert [e["samples"] for e in fig["40"]["executions"]] == [40, 40]  # every shard, each time
    assert fig["4"]["startup"]["first_batch_s"] > 0 and fig["before"]["shards"] == 8
    assert len(report["targets"]) == 5
    import ray

    assert ray.is_initialized()  # the fixture's Ray is left up
