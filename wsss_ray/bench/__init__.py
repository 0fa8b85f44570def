"""Benchmarks of the paths users pay for, each against a baseline measured in the same run.

``jobs/benchmark.py`` is the entry point; one module per subcommand:

- :mod:`wsss_ray.bench.data`: the Ray Data image-text pipeline vs a plain ``webdataset`` +
  ``DataLoader`` and vs the one-core JPEG decode + crop rate times the cores;
- :mod:`wsss_ray.bench.npr`: EM prototypes + Hungarian matching + L_PG vs the PGSeg step;
- :mod:`wsss_ray.bench.train`: the PGSeg training step on Ray Train + DeepSpeed + Ray Data,
  broken down by phase, vs a bare PyTorch loop on in-memory batches;
- :mod:`wsss_ray.bench.eval`: zero-shot segmentation and pseudo-label generation as Ray Data
  batch inference vs a plain in-process loop.

:mod:`wsss_ray.bench.common` is the harness they share (``jobs/benchmark.py`` builds each
subcommand's flags from its config and calls its ``run(config, out)``): ``rounds`` starts the
embedded Ray when asked, says what is measured and interleaves the runners; ``Stat``, ratios,
targets, tables and the report. A benchmark module holds only what it measures.

Every subcommand returns a JSON-able report (:class:`wsss_ray.bench.common.Report`) with the raw
repeats, medians and spreads, ratios and the speed targets; targets live here, never in tests.
"""
