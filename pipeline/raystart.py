"""Joining or starting Ray, the same way for curation runs, the demo and training.

This module imports nothing from the stages, the models or the curation driver, so both the pipeline and the
trainers can start Ray through it.
"""

from __future__ import annotations

import logging
import os
import socket

from pipeline.quiet import ray_driver_logging, verbose

# Blocks waiting between steps (decoded pixels before a slow model pool) may use this share of the cluster's
# object store; beyond it Ray Data holds the producing step back. Ray's default (half) lets a fast source step
# park gigabytes of pixels in front of the model actors.
OBJECT_STORE_SHARE = 0.05


CONNECT_TIMEOUT_S = 10  # how long a cluster's address may take to accept a connection


class RayUnreachable(RuntimeError):
    """The Ray cluster an address names cannot be joined; the message says what to check."""


FIX = ("check --address or RAY_ADDRESS (`ray status` on the head node prints the cluster's address), or leave "
       "both unset to start Ray on this machine")


def check_reachable(address: str) -> None:
    """Fail fast where nothing listens at a cluster's ``host:port``: Ray itself would wait without end."""
    if address in ("auto", "local"):
        return
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not colon or not port.isdigit():
        raise RayUnreachable(f"{address!r} is not a Ray address (HOST:PORT, auto or local): {FIX}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise RayUnreachable(f"no Ray cluster answers at {address} ({exc.strerror or exc}): {FIX}") from None


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join ``address`` (or $RAY_ADDRESS), else start Ray locally (on ``num_cpus``, default all); unless verbose
    (``pipeline.quiet``) keep workers' output in Ray's log files."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        if address:
            check_reachable(address)
        try:
            ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
                     logging_level=logging.INFO if verbose() else logging.ERROR, **ray_driver_logging())
        except ConnectionError as exc:  # e.g. "auto" with no cluster running, or the cluster refused this driver
            reason = (str(exc).strip().splitlines() or ["no reason given"])[0].rstrip(".")
            raise RayUnreachable(f"cannot join the Ray cluster at {address}: {reason}; {FIX}") from None


def ray_data():
    """``ray.data``, quiet and holding back its producers (``OBJECT_STORE_SHARE``). Imported only by the plans
    that use it (model recipes, training): a rule recipe's driver spares the import (a third of a second)."""
    import ray.data  # configures Ray Data's loggers on import: adjust them afterwards

    logging.getLogger("ray.data").setLevel(logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver shows one bar of its own, per shard
    context.print_on_execution_start = False
    context.override_object_store_memory_limit_fraction = OBJECT_STORE_SHARE
    return ray.data


def shutdown_ray() -> None:
    """Leave Ray, stopping it where this process started it, about a second sooner than ``ray.shutdown()`` alone.

    Ray stops the processes it started one after another, its control store (GCS) before the autoscaler's monitor;
    told to stop, the monitor first tries to report its own end to the control store that is already gone, and is
    killed after a second of that. On one machine there is nothing to autoscale and the monitor keeps nothing a
    finished command needs, so it is stopped first, at once. On a joined cluster Ray started nothing here and
    this is ``ray.shutdown()``, which only disconnects."""
    import ray

    if not ray.is_initialized():
        return
    node = getattr(ray._private.worker, "_global_node", None)  # the processes Ray started here, if any
    for started in (getattr(node, "all_processes", None) or {}).get("monitor", []):
        process = getattr(started, "process", None)
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    ray.shutdown()
