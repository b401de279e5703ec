"""The rule recipe on one node against a local three-node cluster with the same CPUs in all, back to back.

    .venv/bin/python bench/cluster.py [--samples 20000] [--per-shard 250] [--cpus 2] [--rounds 1]

Real Flickr8k samples from ../shared/data are replicated (keys made unique, ``bench/throughput.py``) into shards of
``--per-shard`` samples. Then, this process as the driver each time:

* one node: Ray started locally on ``--cpus`` CPUs;
* three nodes: a head without CPUs and two worker nodes of ``--cpus / 2`` CPUs each, every node with its own
  raylet and object store (``ray.cluster_utils.Cluster``, the cluster of ``tests/cluster_job.py``), so every
  shard is read, curated and written by a worker node and only summaries travel to the driver's node.

Each setting starts its Ray, runs a small warm-up corpus (not counted), then the corpus ``--rounds`` times into a
fresh output; the table gives the start-up and, per round, the wall seconds of ``run_curation`` and samples/s.
Ray's files go to a private temporary folder, so no other Ray cluster on the machine is joined or disturbed.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from cluster_job import local_cluster, private_ray_files  # noqa: E402
from throughput import FLICKR, replicate  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.raystart import init_ray  # noqa: E402
from pipeline.run import run_curation  # noqa: E402

WARM_UP_SAMPLES = 2_000


@contextlib.contextmanager
def one_node(cpus: int):
    """Ray started in this process on ``cpus`` CPUs."""
    import ray

    with private_ray_files():
        init_ray(num_cpus=cpus)
        try:
            yield
        finally:
            ray.shutdown()


@contextlib.contextmanager
def three_nodes(cpus: int):
    """A head without CPUs and two worker nodes sharing ``cpus``; this process joins it as the driver."""
    with local_cluster(head_cpus=0, worker_cpus=[cpus / 2, cpus / 2]) as cluster:
        init_ray(address=cluster.address)
        yield


def timed_run(config, corpus: Path, output: Path) -> tuple[float, int]:
    """Wall seconds of one run into a fresh ``output``, and the samples it curated."""
    shutil.rmtree(output, ignore_errors=True)
    started = time.perf_counter()
    result = run_curation(config, [str(corpus)], str(output), progress=False)
    seconds = time.perf_counter() - started
    if result.failed:
        sys.exit(f"{len(result.failed)} shard(s) failed: {result.failed[:3]}")
    shutil.rmtree(output, ignore_errors=True)
    return seconds, result.samples_processed


def measure(setting, cpus: int, config, warm: Path, corpus: Path, work: Path, rounds: int) -> dict:
    """Start-up seconds and one (wall seconds, samples) pair per round, on a fresh Ray of ``setting``."""
    started = time.perf_counter()
    with setting(cpus):
        run_curation(config, [str(warm)], str(work / "out-warm"), progress=False)
        start_up = time.perf_counter() - started  # Ray start-up and the warm-up run
        measured = [timed_run(config, corpus, work / "out") for _ in range(rounds)]
    shutil.rmtree(work / "out-warm", ignore_errors=True)
    return {"start_up": start_up, "rounds": measured}


def print_table(results: dict[str, dict]) -> None:
    print(f"\n{'setting':<40}{'round':>6}{'samples':>9}{'wall s':>8}{'samples/s':>11}{'start-up + warm-up s':>22}")
    for name, result in results.items():
        for index, (seconds, samples) in enumerate(result["rounds"], start=1):
            print(f"{name:<40}{index:>6}{samples:>9}{seconds:>8.1f}{samples / seconds:>11.0f}"
                  f"{result['start_up']:>22.1f}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--per-shard", type=int, default=250)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the one node; the workers share as many")
    parser.add_argument("--rounds", type=int, default=1, help="measured runs per setting")
    parser.add_argument("--config", default=str(ROOT / "configs" / "qwen-vl-rules.yaml"))
    parser.add_argument("--work", default=None, help="folder for the corpora (default: a temporary one)")
    args = parser.parse_args()
    if not FLICKR.is_dir():
        sys.exit(f"{FLICKR} not found: the benchmark replicates the real Flickr8k shards")
    config = load_config(args.config)
    work = Path(args.work or tempfile.mkdtemp(prefix="vlcurate-bench-"))
    try:
        corpus = replicate(work / f"in-{args.samples}-{args.per_shard}", args.samples, args.per_shard)
        warm = replicate(work / "in-warm", WARM_UP_SAMPLES, args.per_shard)
        print(f"rule stages of {Path(args.config).name}: {args.samples} real Flickr8k samples in shards of "
              f"{args.per_shard}, {args.cpus} CPUs in all")
        settings = {f"1 node ({args.cpus} CPUs)": one_node,
                    f"3 nodes (head 0 + 2 workers x {args.cpus / 2:g} CPU)": three_nodes}
        results = {name: measure(setting, args.cpus, config, warm, corpus, work, args.rounds)
                   for name, setting in settings.items()}
        print_table(results)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
