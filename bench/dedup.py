"""Deduplication: recall and precision against ground truth, hashing speed, and the global search at scale.

    .venv/bin/python bench/dedup.py [--samples 6000] [--rules 3:-1 2:6 3:6 ...] [--hashes 1000000]
                                    [--scale-hamming 3 4] [--skip quality speed scale]

Prints three tables:

1. Quality per ``max_hamming`` and ``max_chroma_hamming`` (-1: no colour check), with the dedup stage's own
   hashing and the global search (``pipeline.dedup``):
   * on `vlcurate synth` data with duplicate noise (copies of earlier samples: byte-identical, re-encoded at JPEG
     quality 60-90, resized to 50-90%, cropped by up to 10% per side; look-alikes: the same scene with the shape
     moved): a copy is *found* when it matches its original (same bytes, or hashes within the distances: the
     search finds every matching pair); *look-alikes apart*: the share of
     look-alikes not grouped with their original; *distinct never merged*: the share of non-copy images whose
     group holds no other non-copy image; *across layouts*: the same, counting only merges with a scene of
     another layout (shape position or size): synthetic scenes of one layout that differ only in colour, shape
     outline or jitter are nearly the same picture at the scale of a 64-bit hash;
   * on real photos (Flickr8k and the product photos of ../shared/data), the same copies made with the same
     transforms, and the real photos themselves as the distinct images.
2. Perceptual hashing speed on the product photos (about 1800x2400 JPEGs) and on Flickr8k's web-size photos,
   one process (CPU seconds, so the figure is per core): draft decode (what the stage does), the draft decode
   alone, and a full decode.
3. The global search over synthetic 63-bit hashes (the pHash leaves bit 63 at 0) and 64-bit chroma hashes
   (default ``max_chroma_hamming``) in Parquet manifests of a
   throw-away output directory, with planted near-duplicates (1 to ``max_hamming`` bits flipped: all must be
   found) and planted far copies (``max_hamming + 1`` to ``+ 3`` bits: none may be): seconds to read the
   manifests lazily and to search (wall clock, and CPU seconds of all the process's threads: on a shared
   machine the wall clock also counts other people's work), and the peak resident memory of the process.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import resource
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.imaging import open_bounded  # noqa: E402
from pipeline.dedup import SAMPLE_SCHEMA, candidate_samples, find_duplicates, preference_order  # noqa: E402
from pipeline.outputs import OutputDir, atomic_write_json, manifest_bytes  # noqa: E402
from pipeline.shards import iter_sample_batches  # noqa: E402
from pipeline.synth import COPY_TYPES, SynthOptions, copy_image, write_synth  # noqa: E402
from stages.base import SampleBatch  # noqa: E402
from stages.dedup import DedupParams, DedupStage, hamming, hash_planes, perceptual_hashes  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
KINDS = [name.removeprefix("duplicate_") for name in COPY_TYPES]


# ------------------------------------------------------------------------------------ quality

def fingerprint(samples: list[dict]) -> pl.DataFrame:
    """The dedup stage's annotations of samples ({stem, key, image, caption}) as the search's input frame."""
    stage = DedupStage(DedupParams())
    table = pa.table({"key": [s["key"] for s in samples], "caption": [s["caption"] for s in samples],
                      "image": pa.array([s["image"] for s in samples], pa.binary())})
    values = stage.annotate(SampleBatch(table, list(range(len(samples)))))
    sha = [int(h[:16], 16) for h in values["dedup_sha256"]]
    return preference_order(pl.DataFrame({
        "stem": [s["stem"] for s in samples], "shard": [s["stem"] for s in samples],
        "position": [s["position"] for s in samples], "key": [s["key"] for s in samples], "sha": sha,
        "phash": values["dedup_phash"], "chroma": values["dedup_chroma_hash"],
        "caption_hash": values["dedup_caption_hash"],
        "score": [None] * len(samples)}, schema=SAMPLE_SCHEMA))


def matches(a: tuple, b: tuple, max_hamming: int, max_chroma: int) -> bool:
    """Whether two (sha, pHash, chroma hash) fingerprints match: the search finds every such pair
    (tests/test_dedup.py checks it against all pairs), so this is the recall of the search itself."""
    if a[0] == b[0]:
        return True
    if max_hamming < 0 or a[1] is None or b[1] is None:
        return False
    return hamming(a[1], b[1]) <= max_hamming and (max_chroma < 0 or hamming(a[2], b[2]) <= max_chroma)


def groups_of(frame: pl.DataFrame, max_hamming: int, max_chroma: int) -> dict[str, str]:
    """Each sample's group: the "stem/key" of the sample kept for it (its own when it is kept)."""
    duplicates = find_duplicates(frame, max_hamming, max_chroma_hamming=max_chroma)
    named = frame.select((pl.col("stem") + "/" + pl.col("key")).alias("name"), "shard", "position")
    joined = named.join(duplicates, on=["shard", "position"], how="left")
    return dict(zip(joined["name"], joined["dedup_duplicate_of"].fill_null(joined["name"])))


def quality(samples: list[dict], group: dict[str, str], fingerprints: dict[str, tuple], rule: tuple) -> dict:
    """Recall per copy kind, look-alikes kept apart, and distinct images never merged (see the module doc)."""
    name = {s["key"]: f"{s['stem']}/{s['key']}" for s in samples}
    found = {kind: [] for kind in KINDS}
    apart, roots = [], {}
    for s in samples:
        own = name[s["key"]]
        if s["copy_of"]:
            found[s["kind"]].append(matches(fingerprints[own], fingerprints[name[s["copy_of"]]], *rule))
        else:
            roots.setdefault(group[own], []).append(s)
            if s["lookalike_of"]:
                apart.append(group[own] != group[name[s["lookalike_of"]]])
    distinct = [s for s in samples if not s["copy_of"]]
    merged = [s for members in roots.values() if len(members) > 1 for s in members]
    across = [s for members in roots.values() if len(members) > 1 for s in members
              if any(m.get("layout") != s.get("layout") for m in members)]
    return {"found": {k: (sum(v), len(v)) for k, v in found.items()}, "apart": (sum(apart), len(apart)),
            "distinct": (len(distinct) - len(merged), len(distinct)),
            "across_layouts": (len(distinct) - len(across), len(distinct))}


def synth_samples(folder: Path, count: int) -> list[dict]:
    noise = {name: 0.05 for name in COPY_TYPES} | {"lookalike": 0.05}
    paths = write_synth(folder, SynthOptions(samples=count, shard_size=1000, noise=noise, seed=11))
    samples = []
    for path in paths:
        for batch in iter_sample_batches(str(path)):
            for row in batch.select(["key", "position", "image", "caption", "metadata_json"]).to_pylist():
                truth = json.loads(row["metadata_json"])["synth"]
                copy = truth.get("duplicate")
                samples.append({"stem": path.stem, "key": row["key"], "position": row["position"],
                                "image": row["image"], "caption": row["caption"],
                                "copy_of": copy["of"] if copy else None, "kind": copy["kind"] if copy else None,
                                "lookalike_of": None if copy else truth.get("lookalike_of"),
                                "layout": (truth["position"], truth["size"])})
    return samples


def real_samples(seed: int = 5) -> list[dict]:
    """The real photos, then one copy of each (kinds in turn), transformed as synth transforms its copies."""
    photos = []
    for shard in sorted(SHARED.glob("flickr8k/*.tar")) + sorted(SHARED.glob("myntra-large/*.tar")):
        with tarfile.open(shard) as archive:
            photos += [(f"{shard.stem}-{m.name[:-4]}", archive.extractfile(m).read())
                       for m in archive if m.name.endswith(".jpg")]
    rng = random.Random(seed)
    samples = [{"stem": "a-photos", "key": key, "position": i, "image": data, "caption": "", "copy_of": None,
                "kind": None, "lookalike_of": None} for i, (key, data) in enumerate(photos)]
    for i, (key, data) in enumerate(photos):
        kind = COPY_TYPES[i % len(COPY_TYPES)]
        image, _ = copy_image(data, kind, rng)
        samples.append({"stem": "b-copies", "key": f"copy-{key}", "position": i, "image": image, "caption": "",
                        "copy_of": key, "kind": kind.removeprefix("duplicate_"), "lookalike_of": None})
    return samples


def share(pair: tuple[int, int]) -> str:
    hits, total = pair
    return f"{100 * hits / total:6.2f}%" if total else "     -"


def quality_table(sets: dict[str, list[dict]], rules: list[tuple[int, int]]) -> None:
    header = (f"{'data':<8}{'max_hamming':>12}{'chroma':>7}" + "".join(f"{k:>11}" for k in KINDS)
              + f"{'look-alikes apart':>19}{'distinct never merged':>23}{'(across layouts)':>18}")
    print(header)
    for label, samples in sets.items():
        frame = fingerprint(samples)
        fingerprints = {f"{stem}/{key}": (sha, phash, chroma) for stem, key, sha, phash, chroma
                        in frame.select("stem", "key", "sha", "phash", "chroma").iter_rows()}
        with_layout = any(s.get("layout") for s in samples)
        for rule in rules:
            result = quality(samples, groups_of(frame, *rule), fingerprints, rule)
            layout = share(result["across_layouts"]) if with_layout else "-"
            print(f"{label:<8}{rule[0]:>12}{rule[1]:>7}" + "".join(f"{share(result['found'][k]):>11}" for k in KINDS)
                  + f"{share(result['apart']):>19}{share(result['distinct']):>23}{layout:>18}")
        print(f"{'':<8}{'(samples)':>19}" + "".join(f"{result['found'][k][1]:>11}" for k in KINDS)
              + f"{result['apart'][1]:>19}{result['distinct'][1]:>23}")


# ------------------------------------------------------------------------------------ hashing speed

def full_decode_hash(data: bytes) -> tuple[int, int]:
    with open_bounded(data) as image:
        decoded = image.convert("RGB")
    return hash_planes(decoded)


def photos_of(pattern: str) -> list[bytes]:
    photos = []
    for shard in sorted(SHARED.glob(pattern)):
        with tarfile.open(shard) as archive:
            photos += [archive.extractfile(m).read() for m in archive if m.name.endswith(".jpg")]
    return photos


def draft_decode(data: bytes) -> None:
    with open_bounded(data) as image:
        image.draft("YCbCr", (128, 128))
        image.load()


def per_core(photos: list[bytes], function, repeat: int) -> float:
    """Seconds per image, best of ``repeat`` passes, in CPU time of this process."""
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        for data in photos:
            function(data)
        best = min(best, time.process_time() - started)
    return best / len(photos)


def hashing_speed(repeat: int = 3) -> None:
    sets = {"product photos (myntra-large)": photos_of("myntra-large/*.tar"),
            "web photos (flickr8k)": photos_of("flickr8k/*.tar")}
    print(f"best of {repeat} passes, CPU time of one process (per core)")
    print(f"{'photos':<32}{'images':>7}{'KiB/image':>10}  {'path':<34}{'images/s':>9}{'ms/image':>9}")
    for label, photos in sets.items():
        if not photos:
            continue
        size = sum(map(len, photos)) / len(photos) / 1024
        paths = (("draft decode + hashes (the stage)", perceptual_hashes),
                 ("of which the draft decode", draft_decode), ("full decode + hashes", full_decode_hash))
        for index, (path, function) in enumerate(paths):
            seconds = per_core(photos, function, repeat)
            lead = f"{label:<32}{len(photos):>7}{size:>10.0f}" if index == 0 else " " * 49
            print(f"{lead}  {path:<34}{1 / seconds:>9.0f}{1000 * seconds:>9.2f}")


# ------------------------------------------------------------------------------------ search at scale

def planted_hashes(count: int, max_hamming: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    """``count`` random 63-bit pHashes and 64-bit chroma hashes; 1% are near copies (1..max_hamming pHash bits
    flipped, the same chroma hash) of others, 0.5% far copies (max_hamming + 1 .. + 3 bits flipped)."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**63, count, dtype=np.int64)
    chroma = rng.integers(-(2**63), 2**63 - 1, count, dtype=np.int64)
    near, far = count // 100, count // 200
    chosen = rng.permutation(count)[: 2 * (near + far)]  # sources are never targets: their hashes stay
    targets, sources = chosen[: near + far], chosen[near + far:]
    for index, (target, source) in enumerate(zip(targets, sources)):
        flips = rng.integers(1, max_hamming + 1) if index < near else rng.integers(max_hamming + 1, max_hamming + 4)
        value = int(hashes[source])
        for bit in rng.choice(63, int(flips), replace=False):
            value ^= 1 << int(bit)
        hashes[target] = value
        chroma[target] = chroma[source]
    return hashes, chroma, {"near": list(zip(sources[:near].tolist(), targets[:near].tolist())),
                    "far": list(zip(sources[near:].tolist(), targets[near:].tolist()))}


def write_manifests(out: OutputDir, hashes: np.ndarray, chroma: np.ndarray, shards: int) -> None:
    """Manifests of a dedup-only output (``shards`` completed shards) holding ``hashes``."""
    out.create()
    per_shard = -(-len(hashes) // shards)
    for index in range(shards):
        stem = f"part-{index:05d}"
        part = hashes[index * per_shard:(index + 1) * per_shard]
        colours = chroma[index * per_shard:(index + 1) * per_shard]
        rows = len(part)
        table = pa.table({
            "key": [f"k{i:07d}" for i in range(rows)], "shard": [f"/in/{stem}.tar"] * rows,
            "position": pa.array(range(rows), pa.int32()), "read_error": pa.nulls(rows, pa.string()),
            "dedup_sha256": [f"{(int(h) * 0x9E3779B97F4A7C15) % 2**64:016x}" + "0" * 48 for h in part],
            "dedup_phash": pa.array(part, pa.int64()), "dedup_chroma_hash": pa.array(colours, pa.int64()),
            "dedup_caption_hash": pa.nulls(rows, pa.int64()),
        })
        out.manifest_path(stem).write_bytes(manifest_bytes(table))
        atomic_write_json(out.done_path(stem), {"source": f"/in/{stem}.tar", "total": rows})


def search_at_scale(count: int, max_hamming: int, shards: int, queue) -> None:
    """Runs in a fresh process, so that its peak memory is the search's own."""
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    hashes, chroma, planted = planted_hashes(count, max_hamming)
    with tempfile.TemporaryDirectory() as folder:
        out = OutputDir(folder)
        write_manifests(out, hashes, chroma, shards)
        del hashes, chroma
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        stage = DedupStage(DedupParams(max_hamming=max_hamming))
        started, cpu_started = time.perf_counter(), time.process_time()
        samples = candidate_samples(out, [stage], 0)
        loaded, cpu_loaded = time.perf_counter(), time.process_time()
        duplicates = find_duplicates(samples, max_hamming)
        searched, cpu_searched = time.perf_counter(), time.process_time()
    per_shard = -(-count // shards)

    def name(i: int) -> str:
        return f"part-{i // per_shard:05d}/k{i % per_shard:07d}"

    dropped = dict(zip((f"{Path(s).stem}/k{p:07d}"
                        for s, p in zip(duplicates["shard"].to_list(), duplicates["position"].to_list())),
                       duplicates["dedup_duplicate_of"].to_list()))
    # A near copy is found when it and its source are not both kept; a far copy is merged when it lands in its
    # source's group.
    near_found = sum(name(a) in dropped or name(b) in dropped for a, b in planted["near"])
    far_merged = sum(dropped.get(name(a), name(a)) == dropped.get(name(b), name(b)) for a, b in planted["far"])
    queue.put({"rows": samples.height, "load_s": loaded - started, "search_s": searched - loaded,
               "load_cpu": cpu_loaded - cpu_started, "search_cpu": cpu_searched - cpu_loaded,
               "duplicates": duplicates.height, "near_found": near_found, "near": len(planted["near"]),
               "far_merged": far_merged, "far": len(planted["far"]),
               "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "before_mib": before, "baseline_mib": baseline})


def scale_table(count: int, distances: list[int], shards: int) -> None:
    print(f"{count:,} hashes in {shards} manifests, 1% planted near copies, 0.5% planted far copies")
    print(f"{'max_hamming':>11}{'read s':>8}{'search s':>10}{'total s':>9}{'CPU s':>7}{'near found':>13}"
          f"{'far merged':>12}{'dropped':>9}{'peak RSS MiB':>14}{'(after imports)':>17}")
    context = multiprocessing.get_context("spawn")
    for distance in distances:
        queue = context.Queue()
        worker = context.Process(target=search_at_scale, args=(count, distance, shards, queue))
        worker.start()
        result = queue.get()
        worker.join()
        print(f"{distance:>11}{result['load_s']:>8.1f}{result['search_s']:>10.1f}"
              f"{result['load_s'] + result['search_s']:>9.1f}{result['load_cpu'] + result['search_cpu']:>7.1f}"
              f"{result['near_found']:>8}/{result['near']:<5}{result['far_merged']:>6}/{result['far']:<5}"
              f"{result['duplicates']:>9}{result['peak_mib']:>14.0f}{result['baseline_mib']:>17.0f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=6000, help="synthetic samples for the quality table")
    parser.add_argument("--rules", nargs="+", default=["3:-1", "2:6", "3:6", "4:6", "6:6", "8:6"],
                        help="MAX_HAMMING:MAX_CHROMA_HAMMING pairs for the quality table (-1: no colour check)")
    parser.add_argument("--hashes", type=int, default=1_000_000)
    parser.add_argument("--scale-hamming", type=int, nargs="+", default=[3, 4])
    parser.add_argument("--shards", type=int, default=100)
    parser.add_argument("--skip", nargs="*", default=[], choices=["quality", "speed", "scale"])
    args = parser.parse_args()
    if "scale" not in args.skip:
        print("== global search at scale")
        scale_table(args.hashes, args.scale_hamming, args.shards)
    if "speed" not in args.skip:
        print("\n== perceptual hashing speed")
        if (SHARED / "myntra-large").is_dir() or (SHARED / "flickr8k").is_dir():
            hashing_speed()
        else:
            print(f"skipped: no photos in {SHARED}")
    if "quality" not in args.skip:
        print("\n== quality (a copy is found when it matches its original)")
        with tempfile.TemporaryDirectory() as folder:
            sets = {"synth": synth_samples(Path(folder), args.samples)}
            if (SHARED / "flickr8k").is_dir():
                sets["real"] = real_samples()
            quality_table(sets, [tuple(int(x) for x in rule.split(":")) for rule in args.rules])


if __name__ == "__main__":
    main()
