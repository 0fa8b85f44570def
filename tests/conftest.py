"""Shared fixtures: a small local Ray for integration tests, started per test module and shut
down after it, so no Ray driver state (actors, executor threads, raylet links) outlives the
module that needed it: unit tests that spawn their own processes run without Ray alive."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="module")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=6,
            include_dashboard=False,
            runtime_env={"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}},
        )
    yield ray
    ray.shutdown()
