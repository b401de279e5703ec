"""Deduplication: recall and precision against ground truth, hashing speed, and the global search at scale.

    .venv/bin/python bench/dedup.py [--samples 6000] [--seed 11] [--rules 3:6:7:10:7.5 3:6:-1:-1 ...] [--hashes 1000000]
                                    [--scale-rules 3:-1 3:7 ...] [--skip quality speed scale]

Prints three tables:

1. Quality per rule ``MAX_HAMMING:MAX_CHROMA_HAMMING:CROP_HAMMING:CROP_CHROMA_HAMMING:CROP_MAX_RESIDUAL:
   MAX_COLOUR_DISTANCE:CROP_COLOUR_DISTANCE`` (-1, or a field left out: no chroma check, no crop matching, no
   thumbnail check, no mean-colour check), with the dedup stage's own hashing and the global search
   (``pipeline.dedup``):
   * on `vlcurate synth` data with duplicate noise (copies of earlier samples: byte-identical, re-encoded at JPEG
     quality 60-90, resized to 50-90%, cropped by up to 10% per side; look-alikes: the same scene with the shape
     moved): a copy is *found* when it matches its original (same bytes, whole-image hashes within the
     distances, or one's pHash within the crop distances of one of the other's windows with its differing key
     bits among the probed ones and, with a residual, their thumbnails aligned within it: what the search finds);
     *look-alikes apart*: the share of look-alikes not
     grouped with their original; *distinct never merged*: the share of non-copy images whose group holds no
     other non-copy image; *across layouts*: the same, counting only merges with a scene of another layout
     (shape position or size); *other scenes*: the same, counting only merges with another scene (shape,
     colours, size or position differ: synth has 2,800 scenes, so most of its samples share theirs with
     another; each drawing has a background texture of its own, but two drawings of one scene are still alike);
   * on real photos (Flickr8k and the product photos of ../shared/data), the same copies made with the same
     transforms, and the real photos themselves as the distinct images.
2. Hashing speed on the product photos (about 1800x2400 JPEGs) and on Flickr8k's web-size photos, one process
   (CPU seconds, so the figure is per core): the stage's fingerprint (whole-image and window hashes), the
   whole-image hashes alone, the draft decode alone (colour and luma only), and a full decode; then why a large
   photo cannot be hashed in 1 ms: the draft decode's cost fitted over compressed bytes and pixels (the entropy
   decoder's throughput), and the embedded EXIF thumbnails (how many, how close their hashes, their cost).
3. The global search over random fingerprints (63-bit pHashes, 64-bit chroma hashes, 16 window hashes of each,
   7 probe bits, smooth random thumbnails) in Parquet manifests of a throw-away output directory, with planted
   near-duplicates (1 to ``max_hamming`` bits flipped: all must be found), planted far copies
   (``max_hamming + 1`` to ``+ 3`` bits: none may be) and planted crops (a pHash within the crop distance of
   another sample's window, differing in key bits only where probed, with that window's box of its thumbnail:
   all must be found, with the stage's default ``crop_max_residual``): seconds to read the manifests lazily and
   to search (wall clock, and CPU seconds of all the process's threads: on a shared machine the wall clock also
   counts other people's work), and the peak resident memory of the process.
"""

from __future__ import annotations

import argparse
import io
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
from pipeline.dedup import (SAMPLE_SCHEMA, ManifestThumbnails, candidate_samples, crop_residuals,  # noqa: E402
                            find_duplicates, preference_order, thumbnail_array)
from pipeline.outputs import OutputDir, manifest_bytes  # noqa: E402
from pipeline.shards import iter_sample_batches  # noqa: E402
from pipeline.synth import COPY_TYPES, SynthOptions, copy_image, write_synth  # noqa: E402
from stages.base import SampleBatch  # noqa: E402
from stages.dedup import (CUT_PAIRS, KEY_BITS, THUMBNAIL_SIDE, WINDOWS, DedupParams, DedupStage,  # noqa: E402
                          area_matrix, colour_distance, fingerprint as image_fingerprint, hamming, hash_planes,
                          perceptual_hashes)

SHARED = ROOT.parent / "shared" / "data"
KINDS = [name.removeprefix("duplicate_") for name in COPY_TYPES]
SCENE_FIELDS = ("shape", "colour", "size", "position", "background")  # what makes two synth scenes differ


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
        "score": [None] * len(samples), "probe": values["dedup_probe_bits"],
        "windows": values["dedup_window_phash"], "window_chroma": values["dedup_window_chroma"],
        "thumbnail": pl.Series(values["dedup_thumbnail"], dtype=pl.Binary), "mean_colour": values["dedup_colour"],
        "window_colour": values["dedup_window_colour"]},
        schema=SAMPLE_SCHEMA))


def matches(a: tuple, b: tuple, max_hamming: int, max_chroma: int, crop: int = -1, crop_chroma: int = -1,
            residual: float = -1, max_colour: int = -1, crop_colour: int = -1, probed: bool = True) -> bool:
    """Whether two (sha, pHash, chroma hash, probe bits, window pHashes, window chroma hashes, thumbnail, mean
    colour, window mean colours) fingerprints match: the same bytes, whole-image hashes (and mean colours) within
    the distances, or one's pHash within the crop distances of one of the other's windows (and its mean colour
    within ``crop_colour`` of that window's) and, unless ``residual`` is -1, the thumbnails within it once
    aligned at those windows. The near-duplicate search finds every such pair (tests/test_dedup.py checks it
    against all pairs); the crop search finds a crop pair when the differing key bits are among the probed ones,
    which this checks too (``probed``), so this is the recall of the search itself."""
    if a[0] == b[0]:
        return True
    if a[1] is None or b[1] is None:
        return False
    if max_hamming >= 0 and hamming(a[1], b[1]) <= max_hamming and (
            max_chroma < 0 or hamming(a[2], b[2]) <= max_chroma) and colours_within(a[7], b[7], max_colour):
        return True
    if crop < 0 or max_hamming < 0:  # max_hamming -1: byte-identical copies only
        return False
    for query, original in ((a, b), (b, a)):
        matched = 0
        for slot, (window, colour) in enumerate(zip(original[4], original[5])):
            mean = original[8][slot] if original[8] is not None else None
            if hamming(query[1], window) <= crop and (crop_chroma < 0 or hamming(query[2], colour) <= crop_chroma) \
                    and colours_within(query[7], mean, crop_colour):
                differing = (query[1] ^ window) & KEY_BITS & ~query[3]
                if differing == 0 or not probed:
                    matched |= 1 << slot
        if matched and (residual < 0 or aligned(query[6], original[6], matched, residual)):
            return True
    return False


def colours_within(first: int | None, second: int | None, limit: int) -> bool:
    """Whether two packed mean colours are within ``limit`` levels per channel (as the search checks them: an
    unknown side, or a limit of -1, passes)."""
    if limit < 0 or first is None or second is None:
        return True
    return int(colour_distance(np.array(first), np.array(second))) <= limit


def aligned(crop: bytes | None, original: bytes | None, matched: int, residual: float) -> bool:
    """Whether a crop's thumbnail is within ``residual`` of its original's aligned at the ``matched`` windows
    (as the search verifies it: a side without a thumbnail is not checked)."""
    _, images = thumbnail_array(pl.Series([crop, original], dtype=pl.Binary))
    if len(images) < 2:
        return True
    return bool(crop_residuals(images[:1], images[1:], np.array([matched]))[0] <= residual)


def groups_of(frame: pl.DataFrame, rule: tuple) -> dict[str, str]:
    """Each sample's group: the "stem/key" of the sample kept for it (its own when it is kept)."""
    max_hamming, max_chroma, crop, crop_chroma, residual, max_colour, crop_colour = rule
    duplicates = find_duplicates(frame, max_hamming, max_chroma_hamming=max_chroma, crop_hamming=crop,
                                 crop_chroma_hamming=crop_chroma, crop_max_residual=residual,
                                 max_colour_distance=max_colour, crop_colour_distance=crop_colour)
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
    other_scene = [s for members in roots.values() if len(members) > 1 for s in members
                   if any(m.get("scene") != s.get("scene") for m in members)]
    return {"found": {k: (sum(v), len(v)) for k, v in found.items()}, "apart": (sum(apart), len(apart)),
            "distinct": (len(distinct) - len(merged), len(distinct)),
            "across_layouts": (len(distinct) - len(across), len(distinct)),
            "other_scenes": (len(distinct) - len(other_scene), len(distinct))}


def synth_samples(folder: Path, count: int, seed: int = 11) -> list[dict]:
    noise = {name: 0.05 for name in COPY_TYPES} | {"lookalike": 0.05}
    paths = write_synth(folder, SynthOptions(samples=count, shard_size=1000, noise=noise, seed=seed))
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
                                "layout": (truth["position"], truth["size"]),
                                "scene": tuple(truth[k] for k in SCENE_FIELDS)})
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
    header = (f"{'data':<8}{'max_hamming':>12}{'chroma':>7}{'crop':>6}{'c.chr':>6}{'resid':>6}{'col':>5}{'c.col':>6}"
              + "".join(f"{k:>11}" for k in KINDS)
              + f"{'look-alikes apart':>19}{'distinct never merged':>23}{'(across layouts)':>18}"
              + f"{'(other scenes)':>16}")
    print(header)
    for label, samples in sets.items():
        frame = fingerprint(samples)
        fingerprints = {f"{row[0]}/{row[1]}": row[2:] for row in frame.select(
            "stem", "key", "sha", "phash", "chroma", "probe", "windows", "window_chroma", "thumbnail",
            "mean_colour", "window_colour").iter_rows()}
        with_layout = any(s.get("layout") for s in samples)
        for rule in rules:
            result = quality(samples, groups_of(frame, rule), fingerprints, rule)
            layout = share(result["across_layouts"]) if with_layout else "-"
            scenes = share(result["other_scenes"]) if with_layout else "-"
            print(f"{label:<8}{rule[0]:>12}{rule[1]:>7}{rule[2]:>6}{rule[3]:>6}{rule[4]:>6g}{rule[5]:>5}{rule[6]:>6}"
                  + "".join(f"{share(result['found'][k]):>11}" for k in KINDS)
                  + f"{share(result['apart']):>19}{share(result['distinct']):>23}{layout:>18}{scenes:>16}")
        print(f"{'':<8}{'(samples)':>48}" + "".join(f"{result['found'][k][1]:>11}" for k in KINDS)
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


def draft_decode(data: bytes, mode: str = "YCbCr") -> None:
    with open_bounded(data) as image:
        image.draft(mode, (128, 128))
        image.load()


def luma_draft_decode(data: bytes) -> None:
    draft_decode(data, "L")


def per_core(photos: list[bytes], function, repeat: int) -> float:
    """Seconds per image, best of ``repeat`` passes, in CPU time of this process."""
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        for data in photos:
            function(data)
        best = min(best, time.process_time() - started)
    return best / len(photos)


def exif_thumbnail(data: bytes) -> bytes | None:
    """The JPEG thumbnail embedded in the EXIF block (IFD1), if any."""
    from PIL import ExifTags, Image

    with Image.open(io.BytesIO(data)) as image:
        raw = image.info.get("exif")
        if not raw:
            return None
        ifd1 = image.getexif().get_ifd(ExifTags.IFD.IFD1)
    offset, length = ifd1.get(0x0201), ifd1.get(0x0202)
    if offset is None or not length:
        return None
    return raw[6 + offset: 6 + offset + length]  # offsets count from the TIFF header, after b"Exif\0\0"


def hashing_speed(repeat: int = 3) -> None:
    sets = {"product photos (myntra-large)": photos_of("myntra-large/*.tar"),
            "web photos (flickr8k)": photos_of("flickr8k/*.tar")}
    print(f"best of {repeat} passes, CPU time of one process (per core)")
    print(f"{'photos':<32}{'images':>7}{'KiB/image':>10}  {'path':<44}{'images/s':>9}{'ms/image':>9}")
    for label, photos in sets.items():
        if not photos:
            continue
        size = sum(map(len, photos)) / len(photos) / 1024
        paths = (("the stage: hashes and window hashes", image_fingerprint),
                 ("whole-image hashes only", perceptual_hashes),
                 ("draft decode (DCT-domain 1/8 at most)", draft_decode),
                 ("draft decode, luma only", luma_draft_decode),
                 ("full decode + hashes", full_decode_hash))
        for index, (path, function) in enumerate(paths):
            seconds = per_core(photos, function, repeat)
            lead = f"{label:<32}{len(photos):>7}{size:>10.0f}" if index == 0 else " " * 49
            print(f"{lead}  {path:<44}{1 / seconds:>9.0f}{1000 * seconds:>9.2f}")
    decode_floor(sets["product photos (myntra-large)"], repeat)


def decode_floor(photos: list[bytes], repeat: int) -> None:
    """Why large photos cannot be hashed 1,000 times a second per core: at 1/8 scale libjpeg computes only the DC
    term of each block (no inverse DCT), but it must still Huffman-decode every coefficient of every block (a
    baseline JPEG's blocks follow one another in one entropy-coded stream); so the draft decode's time grows
    with the compressed bytes. A least-squares fit of the draft decode's time over bytes and pixels gives the
    entropy decoder's throughput, and the throughput 1,000 images/s would need. Embedded EXIF thumbnails
    are measured too: how many photos have one, how far its hashes are from the photo's, and their cost."""
    if not photos:
        return
    seconds, kib, megapixels = [], [], []
    for data in photos:
        seconds.append(per_core([data], draft_decode, repeat))
        kib.append(len(data) / 1024)
        with open_bounded(data) as image:
            megapixels.append(image.width * image.height / 1e6)
    design = np.column_stack([np.ones(len(photos)), kib, megapixels])
    (fixed, per_kib, per_megapixel), *_ = np.linalg.lstsq(design, np.array(seconds) * 1000, rcond=None)
    mean_kib = float(np.mean(kib))
    print(f"\ndraft decode of the product photos: ms = {fixed:.2f} + {per_kib * 100:.2f} per 100 KiB + "
          f"{per_megapixel:.2f} per megapixel (least squares over {len(photos)} photos); entropy decoding "
          f"{1 / per_kib / 1024 * 1000:.0f} MB/s of compressed data")
    print(f"  at {mean_kib:.0f} KiB a photo the compressed bytes alone cost {per_kib * mean_kib:.2f} ms: "
          f"1,000 photos/s per core needs {mean_kib * 1000 / 1024:.0f} MB/s, "
          f"{mean_kib * 1000 / 1024 / (1 / per_kib / 1024 * 1000):.1f}x this decoder")
    thumbnails = [(data, thumb) for data in photos if (thumb := exif_thumbnail(data))]
    if thumbnails:
        luma = [hamming(perceptual_hashes(d)[0], perceptual_hashes(t)[0]) for d, t in thumbnails]
        chroma = [hamming(perceptual_hashes(d)[1], perceptual_hashes(t)[1]) for d, t in thumbnails]
        cost = per_core([t for _, t in thumbnails], image_fingerprint, repeat)
        print(f"  EXIF thumbnails: {len(thumbnails)} of {len(photos)} photos; hashes of the thumbnail vs the photo: "
              f"luma at most {max(luma)} bits, chroma at most {max(chroma)}; fingerprinting the thumbnail "
              f"{1000 * cost:.2f} ms")


# ------------------------------------------------------------------------------------ search at scale

THUMBNAIL_SEED = 6  # planted thumbnails: a random 6 x 6 grid, interpolated to the thumbnail's side


def smooth(seeds: np.ndarray) -> np.ndarray:
    """Thumbnails (n x side x side uint8) interpolated linearly from n x 6 x 6 grids of grey levels."""
    position = np.linspace(0, THUMBNAIL_SEED - 1, THUMBNAIL_SIDE)
    low = np.minimum(position.astype(int), THUMBNAIL_SEED - 2)
    weights = np.zeros((THUMBNAIL_SIDE, THUMBNAIL_SEED))
    weights[np.arange(THUMBNAIL_SIDE), low] = 1 - (position - low)
    weights[np.arange(THUMBNAIL_SIDE), low + 1] = position - low
    return np.rint(weights @ seeds.astype(np.float64) @ weights.T).astype(np.uint8)


def window_thumbnail(thumbnail: np.ndarray, window: int) -> np.ndarray:
    """A thumbnail's window ``window`` resampled to a whole thumbnail: the thumbnail of that crop."""
    (top, bottom), (left, right) = CUT_PAIRS[window // len(CUT_PAIRS)], CUT_PAIRS[window % len(CUT_PAIRS)]
    rows = area_matrix(THUMBNAIL_SIDE, top, bottom, THUMBNAIL_SIDE)
    cols = area_matrix(THUMBNAIL_SIDE, left, right, THUMBNAIL_SIDE)
    return np.rint(rows @ thumbnail.astype(np.float64) @ cols.T).astype(np.uint8)


def planted_hashes(count: int, max_hamming: int, crop_hamming: int, seed: int = 0) -> dict:
    """``count`` random fingerprints: 63-bit pHashes, 64-bit chroma hashes, ``WINDOWS`` random window hashes of
    each kind, 7 random probe bits among the key bits and a smooth random thumbnail. 1% are near copies
    (1..max_hamming pHash bits flipped, the same chroma hash and thumbnail) of others, 0.5% far copies
    (max_hamming + 1 .. + 3 bits flipped) and, when ``crop_hamming`` >= 0, 0.5% crops: a pHash within
    1..crop_hamming bits of one of another sample's windows (bits outside the key or among the crop's probe bits:
    the crops the search finds by design), with that window's chroma hash and its box of the thumbnail."""
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, 256, (count, THUMBNAIL_SEED, THUMBNAIL_SEED), dtype=np.uint8)
    thumbnails = {}  # of the crops: not interpolated from a grid
    hashes = rng.integers(0, 2**63, count, dtype=np.int64)
    chroma = rng.integers(-(2**63), 2**63 - 1, count, dtype=np.int64)
    windows = rng.integers(0, 2**63, (count, WINDOWS), dtype=np.int64)
    window_chroma = rng.integers(-(2**63), 2**63 - 1, (count, WINDOWS), dtype=np.int64)
    key_positions = np.array([bit for bit in range(63) if KEY_BITS >> bit & 1])
    probe_positions = np.array([rng.choice(key_positions, 7, replace=False) for _ in range(count // 20)])
    probes = np.left_shift(np.int64(1), probe_positions).sum(axis=1)[rng.integers(0, count // 20, count)]
    near, far, crops = count // 100, count // 200, count // 200 if crop_hamming >= 0 else 0
    chosen = rng.permutation(count)[: 2 * (near + far + crops)]  # sources are never targets: their hashes stay
    targets, sources = chosen[: near + far + crops], chosen[near + far + crops:]
    for index, (target, source) in enumerate(zip(targets, sources)):
        if index < near + far:
            flips = rng.integers(1, max_hamming + 1) if index < near else rng.integers(max_hamming + 1,
                                                                                          max_hamming + 4)
            value, allowed = int(hashes[source]), np.arange(63)
            chroma[target] = chroma[source]
            seeds[target] = seeds[source]
        else:
            window = int(rng.integers(0, WINDOWS))
            flips, value = rng.integers(1, crop_hamming + 1), int(windows[source, window])
            allowed = np.array([bit for bit in range(63) if not KEY_BITS >> bit & 1 or int(probes[target]) >> bit & 1])
            chroma[target] = window_chroma[source, window]
            thumbnails[int(target)] = window_thumbnail(smooth(seeds[source:source + 1])[0], window)
        for bit in rng.choice(allowed, int(flips), replace=False):
            value ^= 1 << int(bit)
        hashes[target] = value
    pairs = list(zip(sources.tolist(), targets.tolist()))
    return {"hashes": hashes, "chroma": chroma, "probes": probes, "windows": windows, "window_chroma": window_chroma,
            "seeds": seeds, "thumbnails": thumbnails,
            "near": pairs[:near], "far": pairs[near:near + far], "crop": pairs[near + far:]}


def write_manifests(out: OutputDir, planted: dict, shards: int) -> None:
    """Manifests of a dedup-only output (``shards`` completed shards) holding the planted fingerprints."""
    out.create()
    count = len(planted["hashes"])
    per_shard = -(-count // shards)
    for index in range(shards):
        stem = f"part-{index:05d}"
        rows = slice(index * per_shard, (index + 1) * per_shard)
        part = planted["hashes"][rows]
        size = len(part)
        lists = {name: pa.FixedSizeListArray.from_arrays(planted[name][rows].ravel(), WINDOWS).cast(
            pa.list_(pa.int64())) for name in ("windows", "window_chroma")}
        thumbnails = smooth(planted["seeds"][rows])
        for target, thumbnail in planted["thumbnails"].items():
            if index * per_shard <= target < index * per_shard + size:
                thumbnails[target - index * per_shard] = thumbnail
        side = THUMBNAIL_SIDE * THUMBNAIL_SIDE
        raw = pa.FixedSizeBinaryArray.from_buffers(pa.binary(side), size, [None, pa.py_buffer(thumbnails.tobytes())])
        table = pa.table({
            "key": [f"k{i:07d}" for i in range(size)], "shard": [f"/in/{stem}.tar"] * size,
            "position": pa.array(range(size), pa.int32()), "read_error": pa.nulls(size, pa.string()),
            "dedup_sha256": [f"{(int(h) * 0x9E3779B97F4A7C15) % 2**64:016x}" + "0" * 48 for h in part],
            "dedup_phash": pa.array(part, pa.int64()), "dedup_chroma_hash": pa.array(planted["chroma"][rows]),
            "dedup_probe_bits": pa.array(planted["probes"][rows]), "dedup_window_phash": lists["windows"],
            "dedup_window_chroma": lists["window_chroma"], "dedup_thumbnail": raw.cast(pa.binary()),
            "dedup_caption_hash": pa.nulls(size, pa.int64()),
        })
        out.write_bytes(out.manifest_name(stem), manifest_bytes(table))
        out.write_json(out.done_name(stem), {"source": f"/in/{stem}.tar", "total": size})


def search_at_scale(count: int, max_hamming: int, crop_hamming: int, shards: int, queue) -> None:
    """Runs in a fresh process, so that its peak memory is the search's own."""
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    planted = planted_hashes(count, max_hamming, crop_hamming)
    with tempfile.TemporaryDirectory() as folder:
        out = OutputDir(folder)
        write_manifests(out, planted, shards)
        for name in ("hashes", "chroma", "probes", "windows", "window_chroma", "seeds", "thumbnails"):
            del planted[name]
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        params = DedupParams(max_hamming=max_hamming, crop_hamming=crop_hamming)
        stage = DedupStage(params)
        started, cpu_started = time.perf_counter(), time.process_time()
        samples = candidate_samples(out, [stage], 0)
        loaded, cpu_loaded = time.perf_counter(), time.process_time()
        duplicates = find_duplicates(samples, max_hamming, params.scope, params.max_chroma_hamming, crop_hamming,
                                     params.crop_chroma_hamming, crop_max_residual=params.crop_max_residual,
                                     thumbnails=ManifestThumbnails(out))
        searched, cpu_searched = time.perf_counter(), time.process_time()
    per_shard = -(-count // shards)

    def name(i: int) -> str:
        return f"part-{i // per_shard:05d}/k{i % per_shard:07d}"

    dropped = dict(zip((f"{Path(s).stem}/k{p:07d}"
                        for s, p in zip(duplicates["shard"].to_list(), duplicates["position"].to_list())),
                       duplicates["dedup_duplicate_of"].to_list()))
    # A near copy or crop is found when it and its source are not both kept; a far copy is merged when it lands
    # in its source's group.
    found = {kind: sum(name(a) in dropped or name(b) in dropped for a, b in planted[kind]) for kind in ("near", "crop")}
    far_merged = sum(dropped.get(name(a), name(a)) == dropped.get(name(b), name(b)) for a, b in planted["far"])
    queue.put({"rows": samples.height, "load_s": loaded - started, "search_s": searched - loaded,
               "load_cpu": cpu_loaded - cpu_started, "search_cpu": cpu_searched - cpu_loaded,
               "duplicates": duplicates.height, "near_found": found["near"], "near": len(planted["near"]),
               "crop_found": found["crop"], "crop": len(planted["crop"]),
               "far_merged": far_merged, "far": len(planted["far"]),
               "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "before_mib": before, "baseline_mib": baseline})


def scale_table(count: int, rules: list[tuple[int, int]], shards: int) -> None:
    print(f"{count:,} fingerprints in {shards} manifests, 1% planted near copies, 0.5% planted far copies, 0.5% "
          f"planted crops (with crop matching)")
    print(f"{'max_hamming':>11}{'crop':>5}{'read s':>8}{'search s':>10}{'total s':>9}{'CPU s':>7}{'near found':>13}"
          f"{'crops found':>14}{'far merged':>12}{'dropped':>9}{'peak RSS MiB':>14}{'(after imports)':>17}")
    context = multiprocessing.get_context("spawn")
    for distance, crop in rules:
        queue = context.Queue()
        worker = context.Process(target=search_at_scale, args=(count, distance, crop, shards, queue))
        worker.start()
        result = queue.get()
        worker.join()
        print(f"{distance:>11}{crop:>5}{result['load_s']:>8.1f}{result['search_s']:>10.1f}"
              f"{result['load_s'] + result['search_s']:>9.1f}{result['load_cpu'] + result['search_cpu']:>7.1f}"
              f"{result['near_found']:>8}/{result['near']:<5}{result['crop_found']:>8}/{result['crop']:<5}"
              f"{result['far_merged']:>6}/{result['far']:<5}"
              f"{result['duplicates']:>9}{result['peak_mib']:>14.0f}{result['baseline_mib']:>17.0f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=6000, help="synthetic samples for the quality table")
    parser.add_argument("--seed", type=int, default=11, help="synth's seed for the quality table (the defaults "
                        "were chosen on 11, with a look at 12; 13, 14 and 15 played no part)")
    parser.add_argument("--rules", nargs="+", default=["3:-1:-1:-1", "3:6:-1:-1", "3:6:-1:-1:-1:8", "3:6:7:8",
                                                       "3:6:7:8:7.5", "3:6:7:8:7.5:8:4", "3:6:7:7:7.5:8:4",
                                                       "3:6:8:7:7.5:8:4"],
                        help="MAX_HAMMING:MAX_CHROMA_HAMMING[:CROP_HAMMING:CROP_CHROMA_HAMMING[:CROP_MAX_RESIDUAL"
                             "[:MAX_COLOUR_DISTANCE[:CROP_COLOUR_DISTANCE]]]] for the quality table (-1 or left out: "
                             "no colour check, no crop matching, no thumbnail check, no mean-colour check)")
    parser.add_argument("--hashes", type=int, default=1_000_000)
    parser.add_argument("--scale-rules", nargs="+", default=["3:-1", "3:6", "4:6"],
                        help="MAX_HAMMING:CROP_HAMMING pairs for the search at scale (-1: no crop matching)")
    parser.add_argument("--shards", type=int, default=100)
    parser.add_argument("--skip", nargs="*", default=[], choices=["quality", "speed", "scale"])
    args = parser.parse_args()
    if "scale" not in args.skip:
        print("== global search at scale")
        scale_table(args.hashes, [tuple(int(x) for x in rule.split(":")) for rule in args.scale_rules], args.shards)
    if "speed" not in args.skip:
        print("\n== perceptual hashing speed")
        if (SHARED / "myntra-large").is_dir() or (SHARED / "flickr8k").is_dir():
            hashing_speed()
        else:
            print(f"skipped: no photos in {SHARED}")
    if "quality" not in args.skip:
        print("\n== quality (a copy is found when it matches its original)")
        with tempfile.TemporaryDirectory() as folder:
            sets = {"synth": synth_samples(Path(folder), args.samples, args.seed)}
            if (SHARED / "flickr8k").is_dir():
                sets["real"] = real_samples()
            rules = [tuple(float(x) if index == 4 else int(x) for index, x in enumerate(rule.split(":")))
                     for rule in args.rules]
            quality_table(sets, [rule + (-1,) * (7 - len(rule)) for rule in rules])


if __name__ == "__main__":
    main()
