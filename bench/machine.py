"""Measuring a run from outside: machine memory in use above idle, and peak memory per Ray worker.

Machine memory is ``total - available`` (psutil), sampled every 50 ms (the process tree's PSS every second:
reading every process's memory map is costly and would steal CPU from the run it measures): it counts Ray's object store (shared
memory) once, where summed RSS would count every mapping of it again. Beside it, the proportional set size (PSS)
summed over this process and its descendants (with a local Ray: the raylet, the object store, every worker):
shared pages are split between the processes that map them, so the sum also counts the object store once, and
other programs on the machine do not disturb it.
"""

from __future__ import annotations

import threading
import time

import psutil


def memory_in_use() -> int:
    memory = psutil.virtual_memory()
    return memory.total - memory.available


def tree_pss() -> int:
    return sum(tree_pss_by_process().values())


def tree_pss_by_process() -> dict[str, int]:
    """PSS of this process and each of its descendants, by process title."""
    root = psutil.Process()
    sizes: dict[str, int] = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            title = " ".join(process.cmdline())[:60] or process.name()
            sizes[f"{title} [{process.pid}]"] = process.memory_full_info().pss
        except (psutil.Error, AttributeError):
            continue
    return sizes


class MachineMonitor:
    """Peak machine memory above the level measured at start, and peak RSS of each Ray worker process."""

    def __init__(self, interval: float = 0.05, tree_interval: float = 1.0):
        self.interval, self.tree_interval = interval, tree_interval
        self.idle = memory_in_use()
        self.peak = self.idle
        self.tree_idle = tree_pss()
        self.tree_peak = self.tree_idle
        self.tree_at_peak: dict[str, int] = {}
        self.worker_peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        tree_due = 0.0
        while not self._stop.is_set():
            self.peak = max(self.peak, memory_in_use())
            if time.monotonic() < tree_due:
                time.sleep(self.interval)
                continue
            tree_due = time.monotonic() + self.tree_interval
            sizes = tree_pss_by_process()
            if sum(sizes.values()) > self.tree_peak:
                self.tree_peak, self.tree_at_peak = sum(sizes.values()), sizes
            for process in psutil.process_iter(["name", "cmdline", "memory_info"]):
                try:
                    title = " ".join(process.info["cmdline"] or [])
                    if not title.startswith("ray::") or "IDLE" in title:
                        continue
                    kind = title.split()[0].split(".")[0]
                    rss = process.info["memory_info"].rss
                    self.worker_peak[kind] = max(self.worker_peak.get(kind, 0), rss)
                except (psutil.Error, TypeError, AttributeError):
                    continue
            time.sleep(self.interval)

    @property
    def above_idle(self) -> int:
        return self.peak - self.idle

    @property
    def tree_above_idle(self) -> int:
        return self.tree_peak - self.tree_idle

    @property
    def largest_worker(self) -> int:
        return max(self.worker_peak.values(), default=0)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


GIB = 2**30
MIB = 2**20
