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
