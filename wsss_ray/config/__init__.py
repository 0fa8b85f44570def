"""Typed configuration for every job.

Dataclasses are the schema; YAML files in ``configs/`` hold small diffs over the defaults, and
``key.sub=value`` command-line overrides go on top (OmegaConf structured configs do the merging
and type checks). Everything is validated before Ray starts, and every error is one line that
names the offending key, so a typo never costs a cluster start-up. Each section checks its own
keys (its ``check`` method, beside its fields); a job schema's ``check`` runs its sections'.

Modules: ``base`` (constants, the error, ``need``), ``common`` (the sections every training job
shares, CLIP pretraining), ``seg`` (segmentation data, zero-shot inference, batch inference),
``pgseg``, ``vpl`` (the method schemas) and ``loading`` (load, validate, views, the command line).
"""

from wsss_ray.config.base import *  # noqa: F403
from wsss_ray.config.base import _f  # noqa: F401
from wsss_ray.config.common import *  # noqa: F403
from wsss_ray.config.loading import *  # noqa: F403
from wsss_ray.config.pgseg import *  # noqa: F403
from wsss_ray.config.seg import *  # noqa: F403
from wsss_ray.config.vpl import *  # noqa: F403
