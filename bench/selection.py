"""The selection over the whole output at the end of a run (duplicates), in the driver's process vs in Ray tasks.

    .venv/bin/python bench/selection.py [--samples 20000] [--per-shard 250] [--rounds 2] [--work DIR]

Real Flickr8k samples from ../shared/data, replicated as ``bench/throughput.py`` does (keys made unique, so every
copy after the first of each image is a duplicate), are curated with the rule recipe and ``dedup`` on, into a fresh
output each time. Once the shards are curated, the run decides the duplicates over the whole output, then judges
every shard again and rewrites those whose verdicts changed: here in this process, one shard after another, or
in Ray tasks on groups of consecutive shards (what a run does). The two take turns in each round, with Ray started
once beforehand. Printed: per round, the run's wall time, its curating time and the selection's time.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import pipeline.run as run  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.raystart import init_ray  # noqa: E402
from throughput import FLICKR, replicate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--per-shard", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", default=None, help="folder for the corpus and outputs (default: a temporary one)")
    args = parser.parse_args()
    if not FLICKR.is_dir():
        sys.exit(f"{FLICKR} not found: the benchmark replicates the real Flickr8k shards")
    work = Path(args.work or tempfile.mkdtemp(prefix="vlcurate-selection-"))
    config = load_config(ROOT / "configs" / "qwen-vl-rules.yaml", ["dedup.enabled=true"])
    reselect, timed = run.reselect, []

    def selection(in_ray_tasks: bool):
        """``reselect`` timed, in Ray tasks where the run asks for them only if ``in_ray_tasks``."""
        def measured(out, config, on_ray=False, **others):
            started = time.perf_counter()
            changed = reselect(out, config, on_ray=in_ray_tasks and on_ray, **others)
            timed.append((time.perf_counter() - started, changed))
            return changed
        return measured

    try:
        corpus = replicate(work / f"in-{args.per_shard}-{args.samples}", args.samples, args.per_shard)
        init_ray()
        print(f"rule recipe with dedup, {args.samples} Flickr8k samples in {args.per_shard}-sample shards "
              f"({args.samples // 1000} copies of each image)")
        print("| round | selection in | run s | curating s | selection s | shards rewritten |")
        print("|-------|--------------|-------|------------|-------------|------------------|")
        for index in range(args.rounds):
            for in_ray_tasks in (False, True):
                run.reselect = selection(in_ray_tasks)
                out = work / "out"
                shutil.rmtree(out, ignore_errors=True)
                timed.clear()
                started = time.perf_counter()
                result = run.run_curation(config, [str(corpus)], str(out), progress=False)
                wall = time.perf_counter() - started
                seconds, changed = timed[-1]
                where = "Ray tasks" if in_ray_tasks else "this process"
                print(f"| {index + 1:>5} | {where:<12} | {wall:>5.1f} | {result.seconds:>10.1f} | {seconds:>11.1f} | "
                      f"{changed:>7} of {result.processed:<6} |", flush=True)
    finally:
        run.reselect = reselect
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
