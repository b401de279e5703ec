"""Joining or starting Ray, the same way for curation runs, the demo and training.

This module imports nothing from the stages, the models or the curation driver, so both the pipeline and the
trainers can start Ray through it.
"""

from __future__ import annotations

import logging
import os

from pipeline.quiet import ray_driver_logging, verbose

# Blocks waiting between steps (decoded pixels before a slow model pool) may use this share of the cluster's
# object store; beyond it Ray Data holds the producing step back. Ray's default (half) lets a fast source step
# park gigabytes of pixels in front of the model actors.
OBJECT_STORE_SHARE = 0.05


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join ``address`` (or $RAY_ADDRESS), else start Ray locally (on ``num_cpus``, default all); quiet Ray
    Data's own output, and unless verbose (``pipeline.quiet``) keep workers' output in Ray's log files."""
    import ray
    import ray.data  # configures Ray Data's loggers on import: adjust them afterwards

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
                 logging_level=logging.INFO if verbose() else logging.ERROR, **ray_driver_logging())
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver shows one bar of its own, per shard
    context.print_on_execution_start = False
    context.override_object_store_memory_limit_fraction = OBJECT_STORE_SHARE
