"""Segment everything at scale: ``anyseg auto ... --ray [ADDRESS]`` on a Ray cluster (Ray Data).

This package never imports Ray at import time: the options are registered with the local ``anyseg
auto`` parser, and Ray is imported only when ``--ray`` is given (:func:`run`). Install it with
``pip install "anyseg[ray]"``. The pipeline itself is in :mod:`anyseg.scale.ray_auto`; the listing of
inputs (local paths and pyarrow-filesystem URIs) in :mod:`anyseg.scale.sources`.
"""
from __future__ import annotations

import argparse

from ..cli.common import positive_int

RAY_EXTRA_HINT = 'Ray is not installed: install the extra with  pip install "anyseg[ray]"  (Ray Data, pyarrow)'


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 (fractions allowed), got {text!r}")
    return value


def _retries(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -2
    if value < -1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, or -1 for no limit, got {text!r}")
    return value


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--ray`` options of ``anyseg auto`` (no Ray import)."""
    group = parser.add_argument_group(
        "Ray cluster (pip install \"anyseg[ray]\"; see docs/scale.md)",
        "Run the same job on Ray Data: images are read and decoded in CPU tasks and segmented in a pool of "
        "actors that each load the model once; the outputs are the same files as without --ray, plus "
        "OUTDIR/masks.parquet (one row per mask). INPUT may also be a pyarrow file-system URI such as "
        "s3://bucket/prefix or gs://bucket/prefix; OUTDIR must be a folder every worker can write "
        "(a shared file system on a multi-node cluster).")
    group.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                       help="run on Ray: 'auto' (the running cluster, or $RAY_ADDRESS), HOST:PORT, "
                            "ray://HOST:PORT (Ray Client), or nothing to start a local Ray instance")
    group.add_argument("--workers", type=positive_int, default=None, metavar="N",
                       help="model actors (default: the cluster's GPUs / --gpus-per-worker, else its "
                            "CPUs / --cpus-per-worker, at least 1)")
    group.add_argument("--cpus-per-worker", type=_fraction, default=1.0, metavar="X",
                       help="CPUs reserved per model actor; also its torch thread count (default: 1)")
    group.add_argument("--gpus-per-worker", type=_fraction, default=0.0, metavar="X",
                       help="GPUs per model actor, fractions allowed (0.5: two actors share a GPU; default: 0)")
    group.add_argument("--max-restarts", type=_retries, default=-1, metavar="N",
                       help="times a dead model actor is replaced (-1: no limit, the default)")
    group.add_argument("--max-task-retries", type=_retries, default=3, metavar="N",
                       help="times the images of a dead actor are retried on another one (-1: no limit; "
                            "default: 3)")


def run(args: argparse.Namespace) -> int:
    """``anyseg auto --ray``: import Ray (saying which extra to install when it is missing) and run."""
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"--ray: {RAY_EXTRA_HINT} ({exc})") from exc
    from .ray_auto import run_ray

    return run_ray(args)
