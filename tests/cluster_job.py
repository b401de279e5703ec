"""Curation runs driven against a local multi-node Ray cluster: a head and worker nodes on this machine, each
with its own raylet, object store and resources (``ray.cluster_utils.Cluster``). A process joins one Ray cluster
only, so the tests run this file as a script, in a subprocess of their own:

    .venv/bin/python tests/cluster_job.py JOB.json

JOB.json holds ``{"head_cpus": 0, "worker_cpus": [1, 1], "runs": [RUN, ...]}``; a RUN is ``{"config": recipe path,
"overrides": [STAGE.KEY=VALUE, ...], "inputs": [...], "output": folder}``, optionally with
``"remove_worker_after_done": N`` and ``"remove_worker_running": STEP``: once the output holds N completion
records, a worker node running STEP (a step's title, e.g. ``curate_shards``) is removed (all its processes killed
at once) while the run goes on. (Any of vlcurate's steps would also count a model actor of an earlier run whose
process is still exiting.) The runs go one after the other on the same cluster; one line per run is printed,
``SUMMARY_MARK`` then JSON: shards processed, skipped and failed, samples, the steps each node's workers were seen
running, and the node removal (the steps it cut short, and the shards complete before and after).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NODE_OBJECT_STORE_BYTES = 200 * 1024 * 1024
# A lost node is declared dead after this many missed health checks, one a second (Ray's default: five, one
# every three seconds): its tasks are retried elsewhere that much sooner.
HEALTH_CHECKS = {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000,
                 "health_check_failure_threshold": 5}
# In a Ray worker's process title while it runs one of vlcurate's steps: a rule task, or a Ray Data step.
STEP_TITLES = ("curate_shards", "MapBatches(")
POLL_SECONDS = 0.05
SUMMARY_MARK = "cluster-run: "  # starts each summary line (Ray prints its nodes' logs on the same output)


@contextlib.contextmanager
def private_ray_files():
    """Ray's files for the clusters started in this block (sockets, logs, and the address file that a plain
    ``ray.init()`` on this machine would join) go to a fresh folder, removed afterwards: other Ray clusters on
    the machine neither see these nor lose theirs. Any process still holding a file in it at the end was one
    of ours, and is killed."""
    folder = tempfile.mkdtemp(prefix="vlc-ray-")  # short: Unix socket paths are limited to about 100 bytes
    previous = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = folder
    try:
        yield folder
    finally:
        if previous is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = previous
        remove_folder_of_ray_files(folder)


def remove_folder_of_ray_files(folder: str, tries: int = 5) -> None:
    """Kill what still uses ``folder``, then remove it (again a moment later while processes that were stopping
    still write their last log lines into it)."""
    for _ in range(tries):
        kill_processes_using(folder)
        shutil.rmtree(folder, ignore_errors=True)
        if not os.path.exists(folder):
            return
        time.sleep(1)


def kill_processes_using(folder: str) -> list[int]:
    """Kill the processes (other than this one) with a file open under ``folder``; returns their ids."""
    import psutil

    killed = []
    for process in psutil.process_iter():
        try:
            if process.pid != os.getpid() and any(f.path.startswith(folder + os.sep) for f in process.open_files()):
                process.kill()
                killed.append(process.pid)
        except psutil.Error:
            continue
    return killed


@dataclasses.dataclass
class LocalCluster:
    """A running local cluster: Ray's ``Cluster`` and its worker nodes in the order they were added."""

    cluster: Any
    workers: list

    @property
    def address(self) -> str:
        return self.cluster.address

    def remove_worker(self, node) -> None:
        """Kill every process of a worker node at once, as when a machine is lost."""
        self.workers.remove(node)
        self.cluster.remove_node(node, allow_graceful=False)

    def raylets(self) -> dict[int, str]:
        """Raylet process id -> "head" or "worker-N", for the nodes alive now."""
        labels = {_raylet_pid(self.cluster.head_node): "head"}
        labels.update({_raylet_pid(node): f"worker-{i}" for i, node in enumerate(self.workers)})
        return labels


def _raylet_pid(node) -> int:
    return node.all_processes["raylet"][0].process.pid


@contextlib.contextmanager
def local_cluster(head_cpus: float, worker_cpus: list[float]):
    """A head node with ``head_cpus`` CPUs and one worker node per entry of ``worker_cpus``, all alive when the
    block starts; every node's processes are stopped when it ends. This process is not connected to it."""
    import ray
    from ray.cluster_utils import Cluster

    with private_ray_files():
        head_args = {"num_cpus": head_cpus, "include_dashboard": False, "_system_config": HEALTH_CHECKS}
        cluster = Cluster(initialize_head=True,
                          head_node_args={**head_args, "object_store_memory": NODE_OBJECT_STORE_BYTES})
        try:
            workers = [cluster.add_node(num_cpus=cpus, object_store_memory=NODE_OBJECT_STORE_BYTES)
                       for cpus in worker_cpus]
            cluster.wait_for_nodes()
            yield LocalCluster(cluster, workers)
        finally:
            if ray.is_initialized():
                ray.shutdown()
            cluster.shutdown()


class NodeActivity(threading.Thread):
    """Watches which of vlcurate's steps each node runs: Ray names a busy worker process after its task or actor
    (``ray::curate_shards``, ``ray::MapWorker(MapBatches(ModelActor))``, ...), and a worker process
    is a child of its node's raylet."""

    def __init__(self, cluster: LocalCluster):
        super().__init__(daemon=True)
        self.labels = cluster.raylets()
        self.steps: dict[str, set[str]] = {label: set() for label in self.labels.values()}
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.is_set():
            for pid, label in self.labels.items():
                self.steps[label] |= _steps_running(pid)
            time.sleep(POLL_SECONDS)

    def stop(self) -> dict[str, list[str]]:
        """Node label -> the titles of the steps seen running there."""
        self.stopped.set()
        self.join()
        return {label: sorted(steps) for label, steps in self.steps.items()}


def _steps_running(raylet: int) -> set[str]:
    import psutil

    try:
        children = psutil.Process(raylet).children()
    except psutil.Error:
        return set()  # the node was removed
    titles = set()
    for child in children:
        try:
            title = " ".join(child.cmdline()).strip()
        except psutil.Error:
            continue
        if title.startswith("ray::") and any(step in title for step in STEP_TITLES):
            titles.add(title.removeprefix("ray::").removesuffix(".submit"))
    return titles


class WorkerRemover(threading.Thread):
    """Once ``output`` holds ``after_done`` completion records, removes a worker node that is running ``step``
    at that moment (the last such node)."""

    def __init__(self, cluster: LocalCluster, output: Path, after_done: int, step: str):
        super().__init__(daemon=True)
        self.cluster, self.state, self.after_done, self.step = cluster, output / "_state", after_done, step
        self.stopped = threading.Event()
        self.removal: dict | None = None

    def run(self):
        while not self.stopped.is_set():
            if self._done() >= self.after_done:
                for node in reversed(self.cluster.workers):
                    running = _steps_running(_raylet_pid(node))
                    if any(self.step in title for title in running):
                        done_before = self._done()
                        self.cluster.remove_worker(node)
                        self.removal = {"done_before": done_before, "done_after": self._done(),
                                        "steps_running": sorted(running)}
                        return
            time.sleep(POLL_SECONDS / 5)

    def _done(self) -> int:
        return len(list(self.state.glob("*.done.json")))

    def stop(self) -> dict | None:
        """What was running on the node removed, and how many shards were complete before and after."""
        self.stopped.set()
        self.join()
        return self.removal


def run_on_cluster(cluster: LocalCluster, run: dict) -> dict:
    """One curation run, this process as the driver joined to ``cluster``; its summary."""
    from pipeline.config import load_config
    from pipeline.run import run_curation

    config = load_config(run["config"], run.get("overrides", []))
    output = Path(run["output"])
    watchers = [NodeActivity(cluster)]
    if run.get("remove_worker_after_done") is not None:
        watchers.append(WorkerRemover(cluster, output, run["remove_worker_after_done"],
                                      run["remove_worker_running"]))
    for watcher in watchers:
        watcher.start()
    try:
        result = run_curation(config, run["inputs"], str(output), address=cluster.address, progress=False)
    finally:
        outcomes = [watcher.stop() for watcher in watchers]
    return {"processed": result.processed, "skipped": result.skipped, "failed": result.failed,
            "samples": result.samples_processed, "seconds": round(result.seconds, 2), "steps_by_node": outcomes[0],
            "node_removal": outcomes[1] if len(outcomes) > 1 else None}


def stop_on_terminate(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through the cluster's shutdown


def main(job_path: str) -> int:
    signal.signal(signal.SIGTERM, stop_on_terminate)
    job = json.loads(Path(job_path).read_text())
    with local_cluster(job["head_cpus"], job["worker_cpus"]) as cluster:
        for run in job["runs"]:
            print(SUMMARY_MARK + json.dumps(run_on_cluster(cluster, run)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
