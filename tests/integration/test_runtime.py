"""The embedded Ray's worker setup: Ray Train's PlacementGroupCleaner, which polls the State API
that a dashboard-less Ray lacks, is silenced in every worker (and only that logger)."""

from __future__ import annotations

import logging

from wsss_ray.runtime import PG_CLEANER_LOGGER


def test_the_cleaner_logger_is_ray_trains():
    """If Ray renames the module, the hook would silence nothing: fail here instead."""
    from ray.train.v2._internal.execution.controller import placement_group_cleaner

    assert placement_group_cleaner.logger.name == PG_CLEANER_LOGGER


def test_workers_of_the_embedded_ray_silence_only_the_cleaner(ray_local):
    ray = ray_local

    @ray.remote(num_cpus=0)
    def levels() -> tuple[int, int]:
        return (
            logging.getLogger(PG_CLEANER_LOGGER).getEffectiveLevel(),
            logging.getLogger("ray.train").getEffectiveLevel(),
        )

    cleaner, train = ray.get(levels.remote())
    assert cleaner == logging.ERROR
    assert train < logging.ERROR  # Ray Train's other warnings still reach the user


def test_resource_shortfall_names_what_does_not_fit():
    from wsss_ray.runtime import resource_shortfall

    cpu_node = {"CPU": 16.0, "memory": 1e10}
    gpu_node = {"CPU": 16.0, "GPU": 8.0}
    why = resource_shortfall({"CPU": 1, "GPU": 1}, 2, nodes=[cpu_node])
    assert why and "no node" in why and "GPU 1" in why
    why = resource_shortfall({"CPU": 4, "GPU": 1}, 8, nodes=[gpu_node])  # 4 fit by CPU
    assert why and "room for 4" in why and "scaling.num_workers=4" in why
    assert resource_shortfall({"CPU": 2, "GPU": 1}, 8, nodes=[gpu_node]) is None
    assert resource_shortfall({"CPU": 2, "GPU": 1}, 12, nodes=[gpu_node, gpu_node]) is None
    why = resource_shortfall({"CPU": 6}, 2, extra_cpus=8, nodes=[cpu_node])  # 12 + 8 > 16
    assert why and "20 CPUs" in why
    assert resource_shortfall({"CPU": 1, "accel": 1}, 1, nodes=[cpu_node]) is not None


def test_a_gpu_run_on_a_cpu_cluster_exits_2_at_once(ray_local, tmp_path, capsys):
    """Ray Train would retry the worker group every 60 s forever (issue 24): one line, exit 2."""
    import time

    from wsss_ray.config import PGSegPretrainConfig, load_config
    from wsss_ray.train.driver import train_job

    cfg = load_config(
        PGSegPretrainConfig,
        "configs/pgseg/tiny.yaml",
        [f"run.output_dir={tmp_path}", "scaling.use_gpu=true", "data.synthetic.num_images=64"],
    )
    t0 = time.monotonic()
    status, summary = train_job(cfg)
    took = time.monotonic() - t0
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and summary is None
    assert len(err) == 1 and err[0].startswith("config error: scaling: a train worker needs")
    assert "GPU 1" in err[0]
    assert took < 60, took  # synthetic shards + the check; never the 60-s worker-group retries
