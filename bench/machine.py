"""Measuring a run from outside: machine memory in use above idle, and peak memory per Ray worker.

Machine memory is ``total - available`` (psutil), sampled every 50 ms: it counts Ray's object store (shared
memory) once, where summed RSS would count every mapping of it again.
"""

from __future__ import annotations

import threading
import time

import psutil


def memory_in_use() -> int:
    memory = psutil.virtual_memory()
    return memory.total - memory.available


class MachineMonitor:
    """Peak machine memory above the level measured at start, and peak RSS of each Ray worker process."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.idle = memory_in_use()
        self.peak = self.idle
        self.worker_peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, memory_in_use())
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
