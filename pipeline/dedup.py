"""Duplicates over a whole output: which samples repeat an image that another sample keeps.

Nothing here uses Ray. The fingerprints the dedup stage wrote (``stages.dedup``) are read lazily from every
completed shard's manifest (only the columns needed, only the samples that take part), searched, and handed back
as a resolved stage that the selection step (``pipeline.run.reselect``) applies shard by shard, the way a top
fraction is resolved. A first run, a rerun, a refresh with more shards and ``vlcurate select`` therefore give the
same verdicts as one fresh run over all the shards.

* **Who takes part**: the samples that pass every other stage (their thresholds applied, top fractions
  resolved), so a group never loses all of its members to another stage's verdict.
* **Who is kept**: the members are ranked by the ``prefer`` column (highest first, e.g. the CLIP score, when the
  manifests have it), then by shard stem and position; the ranking is a total order, so the choice is
  deterministic.
* **Exact copies**: the same SHA-256 (compared on its first 64 bits together with the pHash) and, with scope
  ``image_and_caption``, the same caption hash.
* **Near-duplicates**: pHash Hamming distance at most ``max_hamming`` (and chroma hashes at most
  ``max_chroma_hamming`` apart, unless it is -1), found by multi-index hashing on the pHash: its bits (63: bit
  63 is always 0) are split into ``max_hamming + 1`` bands, and two hashes within that distance agree exactly on
  at least one band (pigeonhole), so only hashes sharing a band value are compared (popcount of the XOR), never
  all pairs. Identical hashes are collapsed first. Cost: a bucket of ``b`` hashes costs ``b * (b - 1) / 2``
  comparisons per band; with uniformly spread hashes that is about ``N**2 * bands / 2**(63 / bands + 1)`` in
  all: for a million samples 2-3 CPU seconds at ``max_hamming`` 3, 8 at 4, and several times more for each
  further bit (``bench/dedup.py``).
* **Groups**: in rank order, a sample is kept unless a kept, better-ranked sample is within the distances; then
  it is dropped as that sample's duplicate. Every dropped sample is therefore within the distances of the one it
  names (a star around the kept sample, not a transitive closure: chains A~B~C of look-alike but distinct images
  do not collapse into one group).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline.curate import drop_reason_expr
from pipeline.outputs import OutputDir
from stages.base import Stage
from stages.dedup import VERDICT_COLUMNS, DedupStage, ResolvedDedupStage

HASH_BITS = 64
PAIR_BLOCK = 1 << 22  # candidate pairs compared at once: bounds the search's working memory (about 200 MiB)
SAMPLE_SCHEMA = {"stem": pl.String, "shard": pl.String, "position": pl.Int64, "key": pl.String, "sha": pl.UInt64,
                 "phash": pl.Int64, "chroma": pl.Int64, "caption_hash": pl.Int64, "score": pl.Float64}
RESULT_SCHEMA = {"shard": pl.String, "position": pl.Int64, "dedup_duplicate_of": pl.String,
                 "dedup_match": pl.String, "dedup_distance": pl.Int32}


# ------------------------------------------------------------------------------------ Hamming search

def band_layout(max_distance: int, bits: int = HASH_BITS) -> list[tuple[int, int]]:
    """(shift, width) of the ``max_distance + 1`` bands the hash is split into, widths as even as possible."""
    bands = max_distance + 1
    if not 1 <= bands <= bits:
        raise ValueError(f"max_distance must be between 0 and {bits - 1}, got {max_distance}")
    layout, shift = [], 0
    for index in range(bands):
        width = bits // bands + (1 if index < bits % bands else 0)
        layout.append((shift, width))
        shift += width
    return layout


def as_bits(hashes: np.ndarray) -> np.ndarray:
    values = np.ascontiguousarray(hashes)
    return values.view(np.uint64) if values.dtype == np.int64 else values.astype(np.uint64)


def near_pairs(hashes: np.ndarray, max_distance: int, groups: np.ndarray | None = None,
               second: np.ndarray | None = None, max_second: int = -1,
               block: int = PAIR_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Every pair of indices ``(i, j)``, ``i < j``, whose hashes are within ``max_distance`` bits (and whose
    ``groups`` values are equal, and whose ``second`` hashes are within ``max_second`` bits, when given):
    multi-index hashing on ``hashes``, see the module docstring. Returns two int64 arrays, sorted by ``(i, j)``,
    each pair once."""
    values = as_bits(hashes)
    seconds = as_bits(second) if second is not None and max_second >= 0 else None
    count = len(values)
    lows: list[np.ndarray] = []
    highs: list[np.ndarray] = []
    if count >= 2 and max_distance >= 0:
        used_bits = max(1, int(np.bitwise_or.reduce(values)).bit_length())  # pHashes leave bit 63 at 0
        for shift, width in band_layout(max_distance, max(used_bits, max_distance + 1)):
            keys = (values >> np.uint64(shift)) & np.uint64((1 << width) - 1)
            if width <= 16 and groups is None:
                keys = keys.astype(np.uint16)  # a stable sort of 16-bit keys is a radix sort
            order = np.argsort(keys, kind="stable") if groups is None else np.lexsort((keys, groups))
            ordered = values[order]  # compared in sorted order: both sides of a pair lie close in memory
            ordered_seconds = seconds[order] if seconds is not None else None
            sorted_keys = keys[order]
            same = sorted_keys[1:] == sorted_keys[:-1]
            if groups is not None:
                sorted_groups = groups[order]
                same &= sorted_groups[1:] == sorted_groups[:-1]
            for left, right in _pairs_within_runs(same, block):
                close = np.bitwise_count(ordered[left] ^ ordered[right]) <= max_distance
                if ordered_seconds is not None:
                    close &= np.bitwise_count(ordered_seconds[left] ^ ordered_seconds[right]) <= max_second
                a, b = order[left[close]], order[right[close]]
                lows.append(np.minimum(a, b))
                highs.append(np.maximum(a, b))
    if not lows:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    pairs = np.unique(np.concatenate(lows).astype(np.int64) * count + np.concatenate(highs))
    return pairs // count, pairs % count


def _pairs_within_runs(same: np.ndarray, block: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Positions ``(p, q)``, ``p < q``, in the same run of a sorted sequence (``same[p]``: positions ``p`` and
    ``p + 1`` are in one run), about ``block`` pairs at a time."""
    size = len(same) + 1
    starts = np.flatnonzero(np.concatenate(([True], ~same)))
    ends = np.append(starts[1:], size)
    lengths = ends - starts
    multiple = lengths > 1
    starts, ends, lengths = starts[multiple], ends[multiple], lengths[multiple]
    if not len(starts):
        return
    offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    positions = np.repeat(starts, lengths) + offsets
    partners = np.repeat(ends, lengths) - positions - 1  # later positions in the same run
    cumulative = np.cumsum(partners)
    begin = 0
    while begin < len(positions):
        base = cumulative[begin - 1] if begin else 0
        end = max(begin + 1, int(np.searchsorted(cumulative, base + block, side="right")))
        counts = partners[begin:end]
        total = int(counts.sum())
        if total:
            left = np.repeat(positions[begin:end], counts)
            right = left + 1 + np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
            yield left, right
        begin = end


def keepers(count: int, lows: np.ndarray, highs: np.ndarray) -> np.ndarray:
    """For ``count`` items in rank order (best first) and the pairs ``(lows[k], highs[k])`` that are near each
    other (``lows < highs``): each item's keeper, itself when it is kept. In rank order an item is kept unless a
    kept, better-ranked item is near it; it then names the best such item."""
    keeper = np.arange(count)
    if not len(lows):
        return keeper
    order = np.lexsort((highs, lows))
    lows, highs = lows[order], highs[order]
    heads, firsts = np.unique(lows, return_index=True)
    lasts = np.append(firsts[1:], len(lows))
    dropped = np.zeros(count, dtype=bool)
    for head, first, last in zip(heads.tolist(), firsts.tolist(), lasts.tolist()):
        if dropped[head]:
            continue
        near = highs[first:last]
        fresh = near[~dropped[near]]
        dropped[fresh] = True
        keeper[fresh] = head
    return keeper


# ------------------------------------------------------------------------------------ duplicate verdicts

def find_duplicates(samples: pl.DataFrame, max_hamming: int, scope: str = "image",
                    max_chroma_hamming: int = -1) -> pl.DataFrame:
    """The duplicates among ``samples`` (columns of ``SAMPLE_SCHEMA``, in keep-preference order: best first),
    one row each: shard, position and the verdict columns (``stages.dedup.VERDICT_COLUMNS``). Near-duplicates
    have pHashes within ``max_hamming`` bits and, unless ``max_chroma_hamming`` is -1, chroma hashes within
    that many bits."""
    count = samples.height
    if count == 0:
        return pl.DataFrame(schema=RESULT_SCHEMA)
    caption = pl.col("caption_hash").fill_null(0) if scope == "image_and_caption" else pl.lit(0, pl.Int64)
    rows = samples.with_row_index("id").with_columns(caption.alias("same_caption"))
    keeper = rows.select(pl.col("id").min().over("sha", "phash", "same_caption")).to_series().to_numpy().astype(
        np.int64)
    if max_hamming >= 0:
        colour = pl.col("chroma").fill_null(0) if max_chroma_hamming >= 0 else pl.lit(0, pl.Int64)
        hashed = rows.filter(pl.col("phash").is_not_null()).with_columns(colour.alias("colour")).select(
            "id", "phash", "colour", "same_caption",
            pl.col("id").min().over("phash", "colour", "same_caption").alias("hash_rep"))
        unique = hashed.filter(pl.col("id") == pl.col("hash_rep"))
        unique_ids = unique["id"].to_numpy().astype(np.int64)
        groups = unique["same_caption"].to_numpy() if scope == "image_and_caption" else None
        lows, highs = near_pairs(unique["phash"].to_numpy(), max_hamming, groups, unique["colour"].to_numpy(),
                                 max_chroma_hamming)
        lead = np.arange(count)
        lead[unique_ids] = unique_ids[keepers(len(unique_ids), lows, highs)]
        keeper[hashed["id"].to_numpy()] = lead[hashed["hash_rep"].to_numpy()]
    dropped = np.flatnonzero(keeper != np.arange(count))
    if not len(dropped):
        return pl.DataFrame(schema=RESULT_SCHEMA)
    copies = samples[dropped]
    kept = samples[keeper[dropped]]
    same_bytes = (copies["sha"] == kept["sha"]) & copies["phash"].eq_missing(kept["phash"])
    both_hashed = copies["phash"].is_not_null() & kept["phash"].is_not_null()
    xor = np.bitwise_xor(copies["phash"].fill_null(0).to_numpy().view(np.uint64),
                         kept["phash"].fill_null(0).to_numpy().view(np.uint64))
    return pl.DataFrame({
        "shard": copies["shard"],
        "position": copies["position"],
        "dedup_duplicate_of": kept["stem"] + "/" + kept["key"],
        "dedup_match": pl.Series(np.where(same_bytes.to_numpy(), "exact", "near"), dtype=pl.String),
        "dedup_distance": pl.Series(np.bitwise_count(xor).astype(np.int32)),
    }).with_columns(pl.when(both_hashed).then(pl.col("dedup_distance")).alias("dedup_distance"))


def preference_order(samples: pl.DataFrame) -> pl.DataFrame:
    """Best first: the highest ``score`` (null and NaN last), then shard stem, then position."""
    samples = samples.with_columns(pl.col("score").fill_nan(None))
    return samples.sort(["score", "stem", "position"], descending=[True, False, False], nulls_last=True)


def candidate_samples(out: OutputDir, stages: list[Stage], index: int) -> pl.DataFrame:
    """The samples that take part in the search of ``stages[index]``, read lazily from every completed shard's
    manifest (only the fingerprint columns, the ranking column and what the other stages' verdicts read), in
    keep-preference order."""
    dedup = stages[index]
    others = stages[:index] + stages[index + 1:]
    passes = drop_reason_expr(others).is_null() & (pl.col("error_stage").fill_null("") != dedup.name)
    prefer = dedup.params.prefer
    frames = []
    for stem in sorted(out.done_records()):
        path = out.manifest_path(stem)
        if not path.is_file():
            continue
        scan = pl.scan_parquet(path)
        schema = scan.collect_schema()
        names = schema.names()
        if "dedup_sha256" not in names:  # a shard without samples
            continue
        if "error_stage" not in names:
            scan = scan.with_columns(pl.lit(None, dtype=pl.String).alias("error_stage"))
        ranked = prefer in names and schema[prefer].is_numeric()  # a missing or non-numeric column ranks nothing
        score = pl.col(prefer).cast(pl.Float64) if ranked else pl.lit(None, dtype=pl.Float64)
        frames.append(scan.filter(passes).select(
            pl.lit(stem).alias("stem"), "shard", pl.col("position").cast(pl.Int64), "key",
            pl.col("dedup_sha256").str.slice(0, 16).str.to_integer(base=16, dtype=pl.UInt64).alias("sha"),
            pl.col("dedup_phash").alias("phash"), pl.col("dedup_chroma_hash").alias("chroma"),
            pl.col("dedup_caption_hash").alias("caption_hash"),
            score.alias("score")))
    if not frames:
        return pl.DataFrame(schema=SAMPLE_SCHEMA)
    return preference_order(pl.concat(frames).collect(engine="streaming"))


def by_shard(duplicates: pl.DataFrame) -> dict[str, pa.Table]:
    """The duplicates of each input shard (keyed by its source, the manifests' ``shard`` column), as Arrow."""
    return {source: frame.drop("shard").to_arrow().cast(pa.schema({"position": pa.int64(), **VERDICT_COLUMNS}))
            for (source,), frame in duplicates.partition_by("shard", as_dict=True).items()}


def resolve_duplicates(out: OutputDir, stages: list[Stage]) -> list[Stage]:
    """Search the whole output for each dedup stage, and return the stages with those replaced by resolved ones
    that drop the duplicates found (``ResolvedDedupStage``); other stages are returned as they are."""
    resolved = list(stages)
    for index, stage in enumerate(stages):
        if not isinstance(stage, DedupStage) or isinstance(stage, ResolvedDedupStage):
            continue
        samples = candidate_samples(out, stages, index) if out.manifests.is_dir() else pl.DataFrame(
            schema=SAMPLE_SCHEMA)
        duplicates = find_duplicates(samples, stage.params.max_hamming, stage.params.scope,
                                     stage.params.max_chroma_hamming)
        resolved[index] = ResolvedDedupStage(stage.params, by_shard(duplicates))
        resolved[index].resources = stage.resources
    return resolved
