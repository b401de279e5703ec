"""Throughput of the rule stages: vlcurate on Ray versus a single-process loop over the same shards.

    .venv/bin/python bench/throughput.py [--samples 20000] [--scales 1 4]

The real Flickr8k samples of ../shared/data are replicated (keys made unique) into shards of ``--per-shard``
samples, to the requested number of samples.
For each scale it prints samples/s, CPU-seconds per 1000 samples and peak resident memory of the whole process
tree (driver, Ray's daemons and workers), beside the baseline measured in the same run: one Python process that
reads the same tars with tarfile (``pipeline.shards.read_shard``), applies the same stages and writes the same
outputs, shard after shard, with no Ray.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import load_config  # noqa: E402
from pipeline.curate import READ_STAGE, annotate_shard, finish_shard  # noqa: E402
from pipeline.outputs import OutputDir, write_shard_outputs  # noqa: E402
from pipeline.run import init_ray, run_curation  # noqa: E402
from pipeline.shards import expand_inputs, read_shard  # noqa: E402

FLICKR = ROOT.parent / "shared" / "data" / "flickr8k"


class TreeMonitor:
    """CPU seconds and peak RSS of this process and all its descendants, sampled every 50 ms."""

    def __init__(self):
        self.root = psutil.Process()
        self.peak_rss = 0
        self._cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _processes(self):
        processes = [self.root]
        try:
            processes += self.root.children(recursive=True)
        except psutil.Error:
            pass
        return processes

    def _sample(self):
        while not self._stop.is_set():
            rss = 0
            for process in self._processes():
                try:
                    times = process.cpu_times()
                    self._cpu[process.pid] = times.user + times.system
                    rss += process.memory_info().rss
                except psutil.Error:
                    continue
            self.peak_rss = max(self.peak_rss, rss)
            self._stop.wait(0.05)

    def __enter__(self):
        self._start_cpu = {p.pid: sum(p.cpu_times()[:2]) for p in self._processes()}
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def cpu_seconds(self) -> float:
        return sum(cpu - self._start_cpu.get(pid, 0.0) for pid, cpu in self._cpu.items())


def replicate(folder: Path, samples: int, per_shard: int) -> Path:
    """Shards of ``per_shard`` real Flickr8k samples each (keys made unique), ``samples`` in all."""
    members = []
    for source in sorted(FLICKR.glob("*.tar")):
        with tarfile.open(source) as archive:
            members += [(m.name, archive.extractfile(m).read()) for m in archive if m.isfile()]
    folder.mkdir(parents=True, exist_ok=True)
    position, written = 0, 0
    for index in range(-(-samples // per_shard)):
        with tarfile.open(folder / f"bench-{index:05d}.tar", "w") as archive:
            keys = set()
            while len(keys) < min(per_shard, samples - written) or (position % 3):
                name, data = members[position % len(members)]
                key = f"{position // len(members):04d}-{name}"
                keys.add(key.split(".", 1)[0])
                info = tarfile.TarInfo(key)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
                position += 1
        written += len(keys)
    return folder


def baseline_stages(config):
    """Build the stages and run them once on a shard, so that the timed loop excludes one-off start-up
    (importing torch for the CLIP tokenizer, loading fastText), as the Ray warm-up run does for Ray."""
    stages = [spec.build() for spec in config.enabled_stages]
    table = read_shard(str(sorted(FLICKR.glob("*.tar"))[0]))
    for position, stage in enumerate(stages):
        table = annotate_shard(table, stage, stages[:position])
    return stages


def baseline(stages, config, inputs: Path, out_root: Path) -> int:
    names = [READ_STAGE, *(s.name for s in stages)]
    out = OutputDir(out_root)
    out.create()
    total = 0
    for shard in expand_inputs([str(inputs)]):
        table = read_shard(shard.url)
        for position, stage in enumerate(stages):
            table = annotate_shard(table, stage, stages[:position])
        table = finish_shard(table, stages)
        total += write_shard_outputs(out, shard.stem, shard.url, table, names, "bench", config.name)["total"]
    return total


def row(name, samples, seconds, monitor):
    rate = samples / seconds
    cpu = monitor.cpu_seconds / samples * 1000
    print(f"{name:<34}{samples:>8}{seconds:>9.1f}{rate:>11.0f}{cpu:>14.2f}{monitor.peak_rss / 2**20:>12.0f}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--per-shard", type=int, default=1000, help="samples per shard (img2dataset: 10000)")
    parser.add_argument("--config", default=str(ROOT / "configs" / "qwen-vl-rules.yaml"))
    args = parser.parse_args()
    if not FLICKR.is_dir():
        sys.exit(f"{FLICKR} not found: the benchmark replicates the real Flickr8k shards")
    config = load_config(args.config)
    work = Path(tempfile.mkdtemp(prefix="vlcurate-bench-"))
    try:
        print(f"rule stages of {Path(args.config).name} on {os.cpu_count()} CPU cores")
        print(f"{'run':<34}{'samples':>8}{'wall s':>9}{'samples/s':>11}{'CPU s/1000':>14}{'peak MiB':>12}")
        small = replicate(work / "in-small", min(args.samples, 4_000), args.per_shard)
        stages = baseline_stages(config)
        with TreeMonitor() as monitor:
            started = time.perf_counter()
            n = baseline(stages, config, small, work / "out-baseline")
            row("baseline: one process, no Ray", n, time.perf_counter() - started, monitor)
        init_ray()
        warm = run_curation(config, [str(small)], str(work / "out-warmup"), progress=False)
        print(f"{'(Ray warm-up run: ' + str(warm.samples_processed) + ' samples, not counted)':<34}")
        for scale in args.scales:
            inputs = replicate(work / f"in-{scale}x", args.samples * scale, args.per_shard)
            with TreeMonitor() as monitor:
                result = run_curation(config, [str(inputs)], str(work / f"out-{scale}x"), progress=False)
            row(f"vlcurate on Ray, {scale}x", result.samples_processed, result.seconds, monitor)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
