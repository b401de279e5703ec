"""Semantic dedup at scale: spherical k-means and the within-cluster keep rule on synthetic CLIP-like embeddings.

Embeddings are drawn around topic centres (as real image embeddings cluster by subject), and a share of them get
planted near copies (cosine similarity about 0.97: a crop or re-encode of the same image). Prints, per size:
wall and CPU seconds, peak RSS, how many planted copies were found, and how many other samples were dropped.

    .venv/bin/python bench/semantic_dedup.py                 # 100,000 and 1,000,000 samples, 512 dimensions
    .venv/bin/python bench/semantic_dedup.py --sizes 200000 --dim 768
    .venv/bin/python bench/semantic_dedup.py --ray --sizes 1000000   # the search a run does, on a local Ray

With ``--ray`` the embeddings go to Ray's object store in parts of ``--part`` samples (float16, as saved) and the
search runs as ``find_semantic_duplicates_on_ray`` does; CPU seconds are then the driver's only, and the peak RSS
the driver's (workers and the object store are shared memory, counted apart).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.semantic_dedup import duplicates_of_parts, find_semantic_duplicates, normalised  # noqa: E402
from stages.semantic_dedup import SemanticDedupParams  # noqa: E402


def unit(rows: np.ndarray) -> np.ndarray:
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows


def corpus(size: int, dim: int, topics: int, copy_share: float, seed: int):
    rng = np.random.default_rng(seed)
    copies = int(size * copy_share)
    originals = size - copies
    centres = unit(rng.normal(size=(topics, dim)).astype(np.float32))
    topic = rng.integers(0, topics, originals)
    vectors = np.empty((size, dim), np.float32)
    for start in range(0, originals, 100_000):  # topic spread: samples of a topic at cosine about 0.5 to each other
        end = min(originals, start + 100_000)
        vectors[start:end] = unit(centres[topic[start:end]] + rng.normal(size=(end - start, dim)).astype(np.float32)
                                  / np.sqrt(dim))
    source = rng.choice(originals, size=copies, replace=False)
    vectors[originals:] = unit(vectors[source] + 0.25 * rng.normal(size=(copies, dim)).astype(np.float32)
                               / np.sqrt(dim))
    samples = pl.DataFrame({"stem": np.where(np.arange(size) < originals, "a", "b"),
                            "shard": np.where(np.arange(size) < originals, "/in/a.tar", "/in/b.tar"),
                            "position": np.concatenate([np.arange(originals), np.arange(copies)]),
                            "key": [f"k{i}" for i in range(size)], "score": np.full(size, np.nan)})
    return samples, vectors, originals, source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--topics", type=int, default=2000)
    parser.add_argument("--copy-share", type=float, default=0.01)
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--cluster-size", type=int, default=1000)
    parser.add_argument("--ray", action="store_true", help="search on a local Ray cluster (all cores)")
    parser.add_argument("--part", type=int, default=10_000, help="samples per part with --ray")
    args = parser.parse_args()
    if args.ray:
        import ray

        ray.init(include_dashboard=False, logging_level="ERROR")

    print(f"dim {args.dim}, {args.topics} topics, {args.copy_share:.0%} planted copies, threshold {args.threshold}, "
          f"cluster_size {args.cluster_size}")
    print(f"{'samples':>10} {'clusters':>8} {'wall s':>7} {'CPU s':>7} {'peak RSS MiB':>12} {'copies found':>14} "
          f"{'others dropped':>14}")
    for size in args.sizes:
        samples, vectors, originals, source = corpus(size, args.dim, args.topics, args.copy_share, seed=size)
        vectors = vectors.astype(np.float16)  # as clip_score saves them
        params = SemanticDedupParams(threshold=args.threshold, cluster_size=args.cluster_size)
        if args.ray:
            import ray

            cuts = list(range(0, size, args.part)) + [size]
            frames = [samples[a:b] for a, b in zip(cuts, cuts[1:])]
            refs = [ray.put(vectors[a:b]) for a, b in zip(cuts, cuts[1:])]
            del vectors
        wall, cpu = time.perf_counter(), time.process_time()
        if args.ray:
            found = duplicates_of_parts(frames, refs, params, partitions=round(2 * ray.cluster_resources()["CPU"]))
        else:
            found = find_semantic_duplicates(samples, normalised(vectors), params)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        copies = found.filter(pl.col("stem") == "b") if "stem" in found.columns else found.filter(
            pl.col("shard") == "/in/b.tar")
        named = set(zip(copies["position"].to_list(), copies["semantic_duplicate_of"].to_list()))
        right = sum((p, f"a/k{source[p]}") in named for p in range(size - originals))
        others = found.height - copies.height
        clusters = -(-size // args.cluster_size)
        print(f"{size:>10,} {clusters:>8,} {wall:>7.1f} {cpu:>7.1f} {peak:>12,.0f} "
              f"{right:>7,}/{size - originals:<6,} {others:>14,}")


if __name__ == "__main__":
    main()
