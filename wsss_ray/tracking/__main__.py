"""``python -m wsss_ray.tracking --flush DIR [--uri URI]``: send the MLflow records a run left
queued on disk (see :mod:`wsss_ray.tracking.queue`) once the server is back. A module of its own
so that ``python -m`` runs it; :mod:`wsss_ray.tracking` still offers ``main`` for callers.
"""

from __future__ import annotations

import sys

from wsss_ray.tracking.queue import flush_queue, queue_files


def main(argv: list[str] | None = None) -> int:
    """``python -m wsss_ray.tracking --flush DIR [--uri URI]``: send a run's queued MLflow
    records (left by a run that ended while the server was down). Exit 0 when all were sent,
    1 when the server is still unreachable, 2 when DIR holds no queue."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m wsss_ray.tracking", description=main.__doc__)
    parser.add_argument("--flush", required=True, metavar="DIR", help="a run's mlflow_queue folder")
    parser.add_argument("--uri", default=None, help="send there instead of the queued URI")
    args = parser.parse_args(argv)
    if not queue_files(args.flush):
        print(f"--flush: no queued MLflow records in {args.flush}", file=sys.stderr)
        return 2
    result = flush_queue(args.flush, args.uri)
    print(
        f"[wsss_ray] MLflow: {result.sent} queued records sent, {result.rejected} rejected,"
        f" {result.left} left" + (" (server unreachable)" if result.left else ""),
        flush=True,
    )
    return 1 if result.left else 0


if __name__ == "__main__":
    sys.exit(main())
