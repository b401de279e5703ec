"""Throughput of the rule stages against the two-core floor, for small and large shards, and linearity.

    .venv/bin/python bench/throughput.py [--samples 100000] [--per-shard 250 10000] [--scales 1 4] [--rounds 3]
                                         [--work DIR] [--outputs DIR]

Real Flickr8k samples from ../shared/data are replicated (keys made unique) into shards of each ``--per-shard``
size. Measured in the same run, back to back:

* the floor: one process per core that only reads the same tars (standard library ``tarfile``, streaming) and
  parses each image header (PIL's lazy open), times two cores; and the same with vlcurate's own tar reader and
  header parser;
* vlcurate on Ray (this process as driver, Ray started once and warmed up on a small run, not counted): samples/s
  in steady state, its ratio to the floor, and for ``--scales`` the same corpus replicated 1x and 4x (linearity);
  each corpus is run first under a memory monitor (machine memory in use above idle, the largest Ray worker's
  peak RSS); then every corpus is timed alone (the monitor's own reads would slow it on a small machine), with
  every worker process started and its models loaded, ``--rounds`` times, the corpora taking turns within each
  round so that a slow spell of the machine weighs on all of them alike. The table shows each corpus's median
  round; the rounds themselves are printed below it, with the ratio of each corpus to the first in that round.

Every shard's outputs are three files (tar, manifest, completion record), so on a disk the file system's cost of
creating files weighs on small shards: ``--outputs /dev/shm/...`` (a tmpfs, where the memory column then also
counts the outputs) measures vlcurate without it.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import MIB, MachineMonitor  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.raystart import init_ray  # noqa: E402
from pipeline.run import run_curation  # noqa: E402
from pipeline.shards import iter_sample_batches  # noqa: E402
from stages.image_header import read_header  # noqa: E402

FLICKR = ROOT.parent / "shared" / "data" / "flickr8k"


def replicate(folder: Path, samples: int, per_shard: int) -> Path:
    """Shards of ``per_shard`` real Flickr8k samples each (keys made unique), ``samples`` in all."""
    if folder.is_dir():
        return folder
    members = []
    for source in sorted(FLICKR.glob("*.tar")):
        with tarfile.open(source) as archive:
            members += [(m.name, archive.extractfile(m).read()) for m in archive if m.isfile()]
    folder.mkdir(parents=True)
    per_copy = len({name.split(".", 1)[0] for name, _ in members})
    written = 0
    shard = None
    for copy in range(-(-samples // per_copy)):
        for name, data in members:
            key, _, suffix = name.partition(".")
            if suffix == "jpg":
                if written == samples:
                    break
                if written % per_shard == 0:
                    if shard is not None:
                        shard.close()
                    shard = tarfile.open(folder / f"bench-{written // per_shard:05d}.tar", "w")
                written += 1
            info = tarfile.TarInfo(f"c{copy:04d}-{key}.{suffix}")
            info.size = len(data)
            shard.addfile(info, io.BytesIO(data))
    shard.close()
    return folder


def floor_stdlib(folder: Path) -> float:
    """One process: tarfile streaming + PIL header of every image; samples/s."""
    samples, started = 0, time.perf_counter()
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path, mode="r|") as archive:
            for member in archive:
                data = archive.extractfile(member).read()
                if member.name.endswith(".jpg"):
                    with Image.open(io.BytesIO(data)) as image:
                        image.size
                    samples += 1
    return samples / (time.perf_counter() - started)


def floor_vlcurate(folder: Path) -> float:
    """One process: vlcurate's batch reader + header parser; samples/s."""
    samples, started = 0, time.perf_counter()
    for path in sorted(folder.glob("*.tar")):
        for batch in iter_sample_batches(str(path)):
            for data in batch.column("image").to_pylist():
                read_header(data)
            samples += batch.num_rows
    return samples / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--per-shard", type=int, nargs="+", default=[250, 10_000])
    parser.add_argument("--scales", type=int, nargs="*", default=[1, 4], help="linearity check, first shard size")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs of each corpus, taking turns")
    parser.add_argument("--config", default=str(ROOT / "configs" / "qwen-vl-rules.yaml"))
    parser.add_argument("--work", default=None, help="folder for the corpora (default: a temporary one)")
    parser.add_argument("--outputs", default=None,
                        help="folder for vlcurate's outputs (default: --work); e.g. a tmpfs such as /dev/shm, to "
                             "leave out the file system's cost of creating files (three per shard)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if not FLICKR.is_dir():
        sys.exit(f"{FLICKR} not found: the benchmark replicates the real Flickr8k shards")
    config = load_config(args.config)
    work = Path(args.work or tempfile.mkdtemp(prefix="vlcurate-bench-"))
    outputs = Path(args.outputs) if args.outputs else work
    cores = os.cpu_count()
    try:
        corpora = {n: replicate(work / f"in-{n}", args.samples, n) for n in args.per_shard}
        first = corpora[args.per_shard[0]]
        floor_stdlib(first)  # page cache warm
        stdlib = cores * floor_stdlib(first)
        fast = cores * floor_vlcurate(first)
        print(f"rule stages of {Path(args.config).name}, {args.samples} real Flickr8k samples, {cores} CPU cores")
        print(f"floor ({cores} x one process: tarfile + PIL header):        {stdlib:>9.0f} samples/s")
        print(f"floor ({cores} x one process: vlcurate reader + header parser): {fast:>9.0f} samples/s")

        started = time.perf_counter()
        init_ray()
        print(f"Ray start-up: {time.perf_counter() - started:.1f} s")
        warm = replicate(work / "in-warm", 2_000, 250)
        warm_out = outputs / "out-warm"
        shutil.rmtree(warm_out, ignore_errors=True)  # the corpora may be reused with another recipe
        run_curation(config, [str(warm)], str(warm_out), progress=False)

        print(f"\n{'run':<28}{'samples':>9}{'wall s':>8}{'samples/s':>11}{'/floor':>8}{'/fast floor':>12}"
              f"{'mem above idle MiB':>20}{'largest worker MiB':>20}")
        runs = [(f"{n}-sample shards", corpora[n]) for n in args.per_shard]
        for scale in args.scales:
            if scale != 1:
                runs.append((f"{scale}x, {args.per_shard[0]}-sample shards",
                             replicate(work / f"in-{args.per_shard[0]}-{scale}x", args.samples * scale,
                                       args.per_shard[0])))
        # Each corpus under the memory monitor for the memory columns; the timed runs go without it: its reads of
        # every process's memory map cost CPU that the run would miss on a small machine, and this first pass
        # leaves every worker process started, with its models loaded (the steady state).
        monitored = {}
        for name, corpus in runs:
            out = outputs / f"out-{corpus.name}"
            shutil.rmtree(out, ignore_errors=True)
            with MachineMonitor() as monitor:
                run_curation(config, [str(corpus)], str(out), progress=False)
            shutil.rmtree(out, ignore_errors=True)
            monitored[name] = monitor
        timed = {name: [] for name, _ in runs}  # (seconds, samples) per round
        for _ in range(args.rounds):
            for name, corpus in runs:
                out = outputs / f"out-{corpus.name}"
                result = run_curation(config, [str(corpus)], str(out), progress=False)
                timed[name].append((result.seconds, result.samples_processed))
                shutil.rmtree(out, ignore_errors=True)
        for name, _ in runs:
            seconds, samples = sorted(timed[name])[len(timed[name]) // 2]
            rate = samples / seconds
            monitor = monitored[name]
            print(f"{name:<28}{samples:>9}{seconds:>8.1f}{rate:>11.0f}{rate / stdlib:>8.2f}"
                  f"{rate / fast:>12.2f}{monitor.above_idle / MIB:>20.0f}{monitor.largest_worker / MIB:>20.0f}")
        first = runs[0][0]
        print(f"\nrounds (samples/s, and as a ratio to {first} in the same round):")
        for index in range(args.rounds):
            base_rate = timed[first][index][1] / timed[first][index][0]
            cells = [f"{name}: {samples / seconds:.0f} ({samples / seconds / base_rate:.2f})"
                     for name, rounds in timed.items() for seconds, samples in [rounds[index]]]
            print(f"  {index + 1}: " + ", ".join(cells))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
