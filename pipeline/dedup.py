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
* **Crops**: image ``i`` may be a crop of image ``j`` when its pHash is within ``crop_hamming`` bits of one of
  ``j``'s window hashes (and its chroma hash within ``crop_chroma_hamming`` bits of that window's, unless -1):
  see ``stages.dedup``; off when ``max_hamming`` is -1 (byte copies only). Found without comparing all pairs:
  the windows are bucketed by the values of the pHash's 24 key bits (a table of ``2**24`` buckets), and each
  pHash looks its key up 128 times, with every combination of its 7 least certain key bits flipped (multi-probe
  lookup); the windows found are compared in full. A crop whose key differs from the right window's in a bit
  that is not among the 7 probed is missed (about 1% of the crops within the distances, on real photos). Cost:
  ``128 * 16 * N**2 / 2**24`` candidates for uniformly spread hashes (120 million for a million samples, about
  26 CPU seconds): see ``bench/dedup.py``.
* **Colour** (``max_colour_distance``, ``crop_colour_distance``, unless -1): a near pair's mean colours
  (``stages.dedup``) must be within ``max_colour_distance`` levels in each of Y, Cb and Cr, and a crop's mean
  colour within ``crop_colour_distance`` of the mean colour of one of the windows its pHash matched; the hashes
  alone match a picture with the same one in other colours. Samples whose hashes are equal but whose mean
  colours differ are not collapsed before the search, so this check sees them. A sample without mean colours (a
  manifest written before colours were compared) passes.
* **Crop verification** (``crop_max_residual``, unless -1): each crop pair found is checked on the two
  samples' luma thumbnails (``stages.dedup``; read only for the samples in crop pairs): the original's
  thumbnail is cut to a box and compared with the crop's, both resampled to ``COMPARE_SIDE`` x
  ``COMPARE_SIDE``; the residual is the root-mean-square difference in grey levels left after the least-squares
  gain and offset that map the box onto the crop (a brightness or contrast change is not a difference). The
  box is searched near each matched window, in steps of 1.25% a side (``crop_residuals``), and the pair is kept
  when its best residual is at most ``crop_max_residual``. Pairs where either sample has no thumbnail (manifests
  written before crops were verified) are kept on their hashes. Cost: 0.1-0.2 ms a pair, plus reading the
  thumbnails of those samples.
* **Evaluation images** (``evaluation``): hashed when the search runs, and searched together with the samples
  first, with the same distances (scope ``image``: captions play no part); every sample that is an exact, near
  or crop duplicate of one of them is dropped (``dedup_duplicate_of``: ``evaluation/NAME``) and takes no part
  in the groups.
* **Groups**: in rank order, a sample is kept unless a kept, better-ranked sample is within the distances; then
  it is dropped as that sample's duplicate. Every dropped sample is therefore within the distances of the one it
  names (a star around the kept sample, not a transitive closure: chains A~B~C of look-alike but distinct images
  do not collapse into one group).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Callable, Iterator

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline.curate import drop_reason_expr
from pipeline.outputs import OutputDir
from stages.base import Stage
from stages.dedup import (CUT_PAIRS, KEY_BITS, THUMBNAIL_SIDE, VERDICT_COLUMNS, WINDOWS, DedupParams, DedupStage,
                          ResolvedDedupStage, area_matrix, colour_distance, evaluation_images, fingerprint)

HASH_BITS = 64
PAIR_BLOCK = 1 << 22  # candidate pairs compared at once: bounds the search's working memory (about 200 MiB)
SAMPLE_SCHEMA = {"stem": pl.String, "shard": pl.String, "position": pl.Int64, "key": pl.String, "sha": pl.UInt64,
                 "phash": pl.Int64, "chroma": pl.Int64, "caption_hash": pl.Int64, "score": pl.Float64,
                 "probe": pl.Int64, "windows": pl.List(pl.Int64), "window_chroma": pl.List(pl.Int64),
                 "thumbnail": pl.Binary, "mean_colour": pl.Int32, "window_colour": pl.List(pl.Int32)}
# Absent from manifests written before crops were matched (the thumbnail: before crop matches were verified).
CROP_COLUMNS = ("probe", "windows", "window_chroma", "thumbnail")
COLOUR_COLUMNS = ("mean_colour", "window_colour")  # absent from manifests written before colours were compared
EVALUATION_STEM = "evaluation"  # the ``stem`` of evaluation images in the search's input
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
    for owners, right in _ranges(positions + 1, partners, block):
        yield positions[owners], right


def _subsets(masks: np.ndarray) -> Iterator[np.ndarray]:
    """Every subset of each mask (all masks have the same number of bits set), one array per subset."""
    subset = np.zeros_like(masks)
    for _ in range(1 << int(np.bitwise_count(masks).max(initial=0))):
        yield subset
        subset = (subset - masks) & masks  # the next subset, in counting order over the mask's bits


def _ranges(starts: np.ndarray, counts: np.ndarray, block: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(owner, position) for every position in ``starts[k] .. starts[k] + counts[k] - 1``, about ``block`` at a
    time."""
    cumulative = np.cumsum(counts)
    begin = 0
    while begin < len(counts):
        base = cumulative[begin - 1] if begin else 0
        end = max(begin + 1, int(np.searchsorted(cumulative, base + block, side="right")))
        part = counts[begin:end]
        total = int(part.sum())
        if total:
            owners = np.repeat(np.arange(begin, end), part)
            offsets = np.arange(total) - np.repeat(np.cumsum(part) - part, part)
            yield owners, np.repeat(starts[begin:end], part) + offsets
        begin = end


def _compactor(mask: int) -> list[tuple[int, np.ndarray]]:
    """Per byte of a 64-bit value that holds bits of ``mask``: (shift, 256-entry table) giving those bits packed
    next to each other (the lowest mask bit first), so that OR-ing the tables' entries packs the whole mask."""
    positions = [bit for bit in range(64) if mask >> bit & 1]
    tables = []
    for byte in range(8):
        inside = [(index, bit - 8 * byte) for index, bit in enumerate(positions) if 8 * byte <= bit < 8 * byte + 8]
        if inside:
            values = np.arange(256)
            table = np.zeros(256, dtype=np.uint32)
            for index, offset in inside:
                table |= ((values >> offset) & 1).astype(np.uint32) << np.uint32(index)
            tables.append((8 * byte, table))
    return tables


_KEY_COMPACTOR = _compactor(KEY_BITS)
KEY_WIDTH = bin(KEY_BITS).count("1")


def compact_keys(values: np.ndarray) -> np.ndarray:
    """The key bits (``stages.dedup.KEY_BITS``) of 64-bit values, packed into the low bits of uint32 values."""
    packed = np.zeros(values.shape, dtype=np.uint32)
    for shift, table in _KEY_COMPACTOR:
        packed |= table[(values >> np.uint64(shift)) & np.uint64(0xFF)]
    return packed


def crop_pairs(hashes: np.ndarray, probes: np.ndarray, windows: np.ndarray, max_distance: int,
               chroma: np.ndarray | None = None, window_chroma: np.ndarray | None = None, max_chroma: int = -1,
               groups: np.ndarray | None = None,
               block: int = PAIR_BLOCK) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pairs ``(i, j)``, ``i != j``, where hash ``i`` is within ``max_distance`` bits of one of the window hashes
    ``windows[j]`` (and ``chroma[i]`` within ``max_chroma`` bits of that window's ``window_chroma``, when
    given; ``groups`` equal, when given) and differs from it, among the key bits, only in bits set in
    ``probes[i]``: image ``i`` looks like a crop of image ``j``. The windows' keys are bucketed in a table
    addressed by the packed key (``2**24`` entries); each hash looks up its key with every combination of its
    probe bits flipped, and the windows found are compared in full. Returns ``(i, j, distance, matched)`` as
    int64 arrays sorted by ``(i, j)``, each pair once, with the distance to its closest window and the mask of
    every window of ``j`` that matched (bit ``k``: ``windows[j, k]``)."""
    values, masks = as_bits(hashes), as_bits(probes)
    table = as_bits(windows).ravel()
    colours = as_bits(window_chroma).ravel() if chroma is not None and max_chroma >= 0 else None
    queries_colour = as_bits(chroma) if colours is not None else None
    per_row = windows.shape[1] if windows.ndim == 2 else 1
    found_i, found_j, found_d, found_w = [], [], [], []
    if len(values) >= 2 and len(table) and max_distance >= 0:
        keys = compact_keys(table)
        order = np.argsort(keys, kind="stable")
        offsets = np.zeros((1 << KEY_WIDTH) + 1, dtype=np.int64)
        np.cumsum(np.bincount(keys, minlength=1 << KEY_WIDTH), out=offsets[1:])
        ordered, owners, slots = table[order], order // per_row, (order % per_row).astype(np.uint8)
        ordered_colours = colours[order] if colours is not None else None
        del keys, order
        own_keys, own_masks = compact_keys(values), compact_keys(masks)
        for subset in _subsets(own_masks):
            probe = own_keys ^ subset
            starts = offsets[probe]
            for query, position in _ranges(starts, offsets[probe + 1] - starts, block):
                distance = np.bitwise_count(values[query] ^ ordered[position])
                close = (distance <= max_distance) & (owners[position] != query)
                if ordered_colours is not None:
                    close &= np.bitwise_count(queries_colour[query] ^ ordered_colours[position]) <= max_chroma
                if groups is not None:
                    close &= groups[query] == groups[owners[position]]
                found_i.append(query[close])
                found_j.append(owners[position][close])
                found_d.append(distance[close])
                found_w.append(slots[position][close])
    if not found_i:
        return tuple(np.empty(0, np.int64) for _ in range(4))
    i, j, d, w = (np.concatenate(part).astype(np.int64) for part in (found_i, found_j, found_d, found_w))
    order = np.lexsort((d, j, i))
    i, j, d, w = i[order], j[order], d[order], w[order]
    first = np.ones(len(i), dtype=bool)
    first[1:] = (i[1:] != i[:-1]) | (j[1:] != j[:-1])
    starts = np.flatnonzero(first)
    matched = np.bitwise_or.reduceat(np.left_shift(1, w), starts) if len(starts) else w[:0]
    return i[first], j[first], d[first], matched


# ------------------------------------------------------------------------------------ crop alignment

COMPARE_SIDE = 12  # thumbnails are compared resampled to this side (below the stored side: both equally blurred)
CUT_STEP = 0.0125  # the alignment search moves each side of the box by multiples of this share
CUT_VALUES = 9  # cuts of 0 to 10% per side, in CUT_STEPs
SEARCH_REACH = 2  # ... at most this many CUT_STEPs from the matched window's cuts in one move
ALIGN_ROUNDS = 2  # moves of the top and bottom cuts, then of the left and right ones, each round
ALIGN_BLOCK = 2048  # (pair, window) alignments searched at once: bounds the working memory (about 60 MiB)
_MOVES = np.array([(a, b) for a in range(-SEARCH_REACH, SEARCH_REACH + 1)
                   for b in range(-SEARCH_REACH, SEARCH_REACH + 1)])


@functools.lru_cache(maxsize=1)
def _box_matrices() -> np.ndarray:
    """``[first, last]``: the area resampling of a thumbnail axis cut by ``first`` and ``last`` CUT_STEPs at its
    ends, to ``COMPARE_SIDE`` samples (CUT_VALUES x CUT_VALUES x COMPARE_SIDE x THUMBNAIL_SIDE, float32)."""
    return np.array([[area_matrix(THUMBNAIL_SIDE, first * CUT_STEP, last * CUT_STEP, COMPARE_SIDE)
                      for last in range(CUT_VALUES)] for first in range(CUT_VALUES)], dtype=np.float32)


def thumbnail_array(values: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """(rows whose thumbnail is present and well formed, their thumbnails as an n x side x side float32 array)."""
    size = THUMBNAIL_SIDE * THUMBNAIL_SIDE
    rows = np.flatnonzero((values.bin.size().fill_null(0) == size).to_numpy())
    data = np.frombuffer(b"".join(values.gather(rows).to_list()), dtype=np.uint8) if len(rows) else np.empty(0)
    return rows, data.reshape(-1, THUMBNAIL_SIDE, THUMBNAIL_SIDE).astype(np.float32)


def _residuals(boxes: np.ndarray, crops: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """Mean squared residual of each crop (n x side x side, mean removed; ``norms``: their squared norms)
    against each of its candidate boxes (n x candidates x side x side) after the least-squares gain and offset
    fit of the box to the crop; a box whose fitted gain would not be positive explains nothing."""
    count = boxes.shape[-1] * boxes.shape[-2]
    sums = boxes.sum(axis=(-1, -2))
    energy = (boxes * boxes).sum(axis=(-1, -2)) - sums * sums / count  # squared norm of the box, mean removed
    dot = np.einsum("ncij,nij->nc", boxes, crops)
    explained = np.where((dot > 0) & (energy > 0), dot * dot / np.maximum(energy, 1e-12), 0.0)
    return (norms[:, None] - explained) / count


def crop_residuals(crops: np.ndarray, originals: np.ndarray, matched: np.ndarray,
                   block: int = ALIGN_BLOCK) -> np.ndarray:
    """For each pair of thumbnails (``crops[k]`` looks like a crop of ``originals[k]`` at the windows of the
    mask ``matched[k]``, bit ``w``: window ``w``): the root-mean-square residual, in grey levels, of the crop's
    thumbnail against the best-aligned box of the original's, after a gain and offset fit (both resampled to
    ``COMPARE_SIDE``). Per matched window, the box starts at the window's cuts and each pair of opposite cuts
    moves in turn, ``ALIGN_ROUNDS`` times, to the best of the cuts within ``SEARCH_REACH`` steps of
    ``CUT_STEP`` (0 to 10% a side): a crop of up to 10% a side is within 2.5% of a window on every side, so
    it is aligned to 1.25%. Pairs with no matched window get infinity."""
    pair, slot = np.nonzero((np.asarray(matched, dtype=np.int64)[:, None] >> np.arange(WINDOWS)) & 1)
    best = np.full(len(crops), np.inf)
    boxes = _box_matrices()
    whole = boxes[0, 0]
    starts = np.round(np.array(CUT_PAIRS) / CUT_STEP).astype(np.int64)  # per cut pair: (first, last) in steps
    arange = np.arange(min(block, len(pair)))
    for begin in range(0, len(pair), block):
        owner, window = pair[begin:begin + block], slot[begin:begin + block]
        original = originals[owner]
        target = whole @ crops[owner] @ whole.T
        target -= target.mean(axis=(1, 2), keepdims=True)
        norms = (target * target).sum(axis=(1, 2))
        rows, cols = starts[window // len(CUT_PAIRS)], starts[window % len(CUT_PAIRS)]
        squared = np.full(len(owner), np.inf)
        index = arange[:len(owner)]
        for _ in range(ALIGN_ROUNDS):
            for moving in (rows, cols):
                candidates = np.clip(moving[:, None, :] + _MOVES[None], 0, CUT_VALUES - 1)
                moved = boxes[candidates[..., 0], candidates[..., 1]]  # n x moves x compare x side
                if moving is rows:
                    fixed = boxes[cols[:, 0], cols[:, 1]]
                    found = moved @ (original @ fixed.transpose(0, 2, 1))[:, None]
                else:
                    fixed = boxes[rows[:, 0], rows[:, 1]]
                    found = (fixed @ original)[:, None] @ moved.transpose(0, 1, 3, 2)
                residual = _residuals(found, target, norms)
                choice = residual.argmin(axis=1)
                moving[:] = candidates[index, choice]
                squared = np.minimum(squared, residual[index, choice])
        np.minimum.at(best, owner, np.sqrt(np.maximum(squared, 0.0)))
    return best


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

def _window_arrays(frame: pl.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row indices with all their window hashes, their window pHashes, their window chroma hashes): (n, WINDOWS)
    uint64 arrays."""
    complete = (frame["windows"].list.len().fill_null(0) == WINDOWS) & (
        frame["window_chroma"].list.len().fill_null(0) == WINDOWS) & frame["probe"].is_not_null()
    rows = np.flatnonzero(complete.to_numpy())
    chosen = frame[rows]
    luma = chosen["windows"].explode().to_numpy().astype(np.int64).view(np.uint64).reshape(-1, WINDOWS)
    colour = chosen["window_chroma"].explode().to_numpy().astype(np.int64).view(np.uint64).reshape(-1, WINDOWS)
    return rows, luma, colour


def _with_crop_columns(samples: pl.DataFrame) -> pl.DataFrame:
    missing = [pl.lit(None, dtype=SAMPLE_SCHEMA[name]).alias(name) for name in (*CROP_COLUMNS, *COLOUR_COLUMNS)
               if name not in samples.columns]
    return samples.with_columns(missing) if missing else samples


def in_frame(rows: pl.DataFrame) -> pl.Series:
    """The thumbnails of search input rows: their ``thumbnail`` column."""
    return rows["thumbnail"]


def _aligned(rows: pl.DataFrame, crops: np.ndarray, originals: np.ndarray, matched: np.ndarray,
             max_residual: float, thumbnails: Callable[[pl.DataFrame], pl.Series]) -> np.ndarray:
    """Which crop pairs (row indices into ``rows``) are verified: both thumbnails within ``max_residual`` when
    aligned (``crop_residuals``). A pair where either side has no thumbnail (a manifest written before crop
    matches were verified) is kept on its hashes alone."""
    needed = np.unique(np.concatenate([crops, originals]))
    present, images = thumbnail_array(thumbnails(rows[needed]))
    slot = np.full(len(rows), -1)
    slot[needed[present]] = np.arange(len(present))
    known = (slot[crops] >= 0) & (slot[originals] >= 0)
    keep = np.ones(len(crops), dtype=bool)
    residual = crop_residuals(images[slot[crops[known]]], images[slot[originals[known]]], matched[known])
    keep[known] = residual <= max_residual
    return keep


def _keepers_of(samples: pl.DataFrame, rule: DedupParams, protected: int = 0,
                thumbnails: Callable[[pl.DataFrame], pl.Series] = in_frame) -> np.ndarray:
    """Each sample's keeper (its own index when kept) under ``rule``'s distances and scope; the first
    ``protected`` samples are never dropped (and never drop one another). ``thumbnails`` gives the thumbnails
    of the rows that take part in crop pairs."""
    count = samples.height
    caption = pl.col("caption_hash").fill_null(0) if rule.scope == "image_and_caption" else pl.lit(0, pl.Int64)
    rows = samples.with_row_index("id").with_columns(caption.alias("same_caption"))
    keeper = rows.select(pl.col("id").min().over("sha", "phash", "same_caption")).to_series().to_numpy().astype(
        np.int64)
    if rule.max_hamming < 0:  # byte-identical copies only (no near or crop matching)
        return np.where(np.arange(count) < protected, np.arange(count), keeper)
    colour = pl.col("chroma").fill_null(0) if rule.max_chroma_hamming >= 0 else pl.lit(0, pl.Int64)
    # equal hashes are collapsed before the search; with a colour check, only those of one mean colour
    checked = max(rule.max_colour_distance, rule.crop_colour_distance) >= 0
    mean = pl.col("mean_colour").fill_null(-1) if checked else pl.lit(-1, pl.Int32)
    hashed = rows.filter(pl.col("phash").is_not_null()).with_columns(colour.alias("colour"), mean.alias("mean"))
    hashed = hashed.with_columns(pl.col("id").min().over("phash", "colour", "mean", "same_caption").alias("hash_rep"))
    unique = hashed.filter(pl.col("id") == pl.col("hash_rep"))
    unique_ids = unique["id"].to_numpy().astype(np.int64)
    groups = unique["same_caption"].to_numpy() if rule.scope == "image_and_caption" else None
    lows, highs = near_pairs(unique["phash"].to_numpy(), rule.max_hamming, groups, unique["colour"].to_numpy(),
                             rule.max_chroma_hamming)
    means = unique["mean"].to_numpy()
    close = colours_close(means, lows, highs, rule.max_colour_distance)
    lows, highs = lows[close], highs[close]
    if rule.crop_hamming >= 0:
        rows_with, windows, window_chroma = _window_arrays(unique)
        if len(rows_with):
            crops, originals, _, matched = crop_pairs(
                unique["phash"][rows_with].to_numpy(), unique["probe"][rows_with].to_numpy(), windows,
                rule.crop_hamming, unique["chroma"][rows_with].fill_null(0).to_numpy(), window_chroma,
                rule.crop_chroma_hamming, groups[rows_with] if groups is not None else None)
            crops, originals = rows_with[crops], rows_with[originals]
            window_means = _window_colour_array(unique) if rule.crop_colour_distance >= 0 else None
            close = crop_colours_close(means, window_means, crops, originals, matched, rule.crop_colour_distance)
            crops, originals, matched = crops[close], originals[close], matched[close]
            if rule.crop_max_residual >= 0 and len(crops):
                keep = _aligned(unique, crops, originals, matched, rule.crop_max_residual, thumbnails)
                crops, originals = crops[keep], originals[keep]
            lows = np.concatenate([lows, np.minimum(crops, originals)])
            highs = np.concatenate([highs, np.maximum(crops, originals)])
            code = np.unique(lows * len(unique_ids) + highs)
            lows, highs = code // len(unique_ids), code % len(unique_ids)
    if protected:
        among = unique_ids[highs] < protected  # both protected (lows rank before highs)
        lows, highs = lows[~among], highs[~among]
    lead = np.arange(count)
    lead[unique_ids] = unique_ids[keepers(len(unique_ids), lows, highs)]
    keeper[hashed["id"].to_numpy()] = lead[hashed["hash_rep"].to_numpy()]
    keeper[:protected] = np.arange(min(protected, count))
    return keeper


def colours_close(means: np.ndarray, firsts: np.ndarray, seconds: np.ndarray, max_distance: int) -> np.ndarray:
    """Which pairs ``(firsts[k], seconds[k])`` of rows have mean colours (packed, -1: unknown) within
    ``max_distance`` levels in each channel; a pair with an unknown side passes, and every pair when
    ``max_distance`` is -1."""
    if max_distance < 0 or not len(firsts):
        return np.ones(len(firsts), dtype=bool)
    a, b = means[firsts], means[seconds]
    return (a < 0) | (b < 0) | (colour_distance(a, b) <= max_distance)


def _window_colour_array(frame: pl.DataFrame) -> np.ndarray:
    """Each row's window mean colours (packed) as an (n, WINDOWS) int64 array, -1 where the row has none."""
    complete = (frame["window_colour"].list.len().fill_null(0) == WINDOWS).to_numpy()
    colours = np.full((frame.height, WINDOWS), -1, np.int64)
    if complete.any():
        chosen = frame["window_colour"].filter(pl.Series(complete))
        colours[complete] = chosen.explode().to_numpy().astype(np.int64).reshape(-1, WINDOWS)
    return colours


def crop_colours_close(means: np.ndarray, window_means: np.ndarray | None, crops: np.ndarray, originals: np.ndarray,
                       matched: np.ndarray, max_distance: int) -> np.ndarray:
    """Which crop pairs have the crop's mean colour (``means``, packed, -1: unknown) within ``max_distance`` levels
    in each channel of the mean colour of one of the original's windows its pHash matched (``window_means``:
    ``_window_colour_array``; ``matched``: a mask of window slots); a pair with an unknown side passes, and every
    pair when ``max_distance`` is -1."""
    if max_distance < 0 or not len(crops):
        return np.ones(len(crops), dtype=bool)
    theirs, own = window_means[originals], means[crops][:, None]
    within = (own < 0) | (theirs < 0) | (colour_distance(own, theirs) <= max_distance)
    slots = ((matched[:, None] >> np.arange(WINDOWS)) & 1).astype(bool)
    return (within & slots).any(axis=1)


def _distances(copies: pl.DataFrame, kept: pl.DataFrame, rule: DedupParams) -> tuple[np.ndarray, np.ndarray]:
    """(match kind, pHash distance) of each copy to the sample it duplicates: ``exact`` (same bytes), ``near``
    (whole-image hashes within the distances) or ``crop`` (then the distance to the closest window, either
    way); the distance is -1 when either side has no pHash."""
    same_bytes = ((copies["sha"] == kept["sha"]) & copies["phash"].eq_missing(kept["phash"])).to_numpy()
    both_hashed = (copies["phash"].is_not_null() & kept["phash"].is_not_null()).to_numpy()
    a = copies["phash"].fill_null(0).to_numpy().view(np.uint64)
    b = kept["phash"].fill_null(0).to_numpy().view(np.uint64)
    distance = np.bitwise_count(a ^ b).astype(np.int64)
    colour = np.bitwise_count(copies["chroma"].fill_null(0).to_numpy().view(np.uint64)
                              ^ kept["chroma"].fill_null(0).to_numpy().view(np.uint64))
    near = (distance <= rule.max_hamming) & ((rule.max_chroma_hamming < 0) | (colour <= rule.max_chroma_hamming))
    means = pl.concat([copies["mean_colour"], kept["mean_colour"]]).fill_null(-1).to_numpy()
    pairs = np.arange(copies.height)
    near &= colours_close(means, pairs, pairs + copies.height, rule.max_colour_distance)
    kind = np.where(same_bytes, "exact", np.where(near & both_hashed, "near", "crop"))
    cropped = np.flatnonzero((kind == "crop") & both_hashed)
    if len(cropped):
        pair = pl.concat([copies[cropped].select(CROP_COLUMNS), kept[cropped].select(CROP_COLUMNS)])
        rows_with, windows, _ = _window_arrays(pair)
        closest = np.full(2 * len(cropped), 64, dtype=np.int64)
        other = np.concatenate([b[cropped], a[cropped]])  # each side's pHash against the other's windows
        closest[rows_with] = np.bitwise_count(other[rows_with, None] ^ windows).min(axis=1)
        distance[cropped] = np.minimum(closest[: len(cropped)], closest[len(cropped):])
    return kind, np.where(both_hashed, distance, -1)


def find_duplicates(samples: pl.DataFrame, max_hamming: int, scope: str = "image",
                    max_chroma_hamming: int = -1, crop_hamming: int = -1, crop_chroma_hamming: int = -1,
                    evaluation: pl.DataFrame | None = None, crop_max_residual: float = -1,
                    thumbnails: Callable[[pl.DataFrame], pl.Series] = in_frame, max_colour_distance: int = -1,
                    crop_colour_distance: int = -1) -> pl.DataFrame:
    """The duplicates among ``samples`` (columns of ``SAMPLE_SCHEMA``, in keep-preference order: best first),
    one row each: shard, position and the verdict columns (``stages.dedup.VERDICT_COLUMNS``). Near-duplicates
    have pHashes within ``max_hamming`` bits and, unless ``max_chroma_hamming`` is -1, chroma hashes within
    that many bits; crops are matched with ``crop_hamming`` and ``crop_chroma_hamming`` (-1: no crop matching)
    and, unless ``crop_max_residual`` is -1, verified by aligning their thumbnails (``crop_residuals``), which
    ``thumbnails`` reads for the rows of the crop pairs found (by default their ``thumbnail`` column); pairs
    must also have mean colours within ``max_colour_distance`` (crops: ``crop_colour_distance``) levels, unless
    -1.
    ``evaluation`` (the same columns, ``stem`` "evaluation", ``key`` the image's name): every sample that
    duplicates one of these images is dropped first, naming it."""
    rule = DedupParams(max_hamming=max_hamming, max_chroma_hamming=max_chroma_hamming, crop_hamming=crop_hamming,
                       crop_chroma_hamming=crop_chroma_hamming, crop_max_residual=crop_max_residual, scope=scope,
                       max_colour_distance=max_colour_distance, crop_colour_distance=crop_colour_distance)
    samples = _with_crop_columns(samples)
    found = []
    if evaluation is not None and evaluation.height and samples.height:
        protected = evaluation.height
        combined = pl.concat([_with_crop_columns(evaluation).select(list(SAMPLE_SCHEMA)),
                              samples.select(list(SAMPLE_SCHEMA))])
        keeper = _keepers_of(combined, dataclasses.replace(rule, scope="image"), protected, thumbnails)
        flagged = np.flatnonzero(keeper[protected:] < protected)
        found.append(_verdicts(samples[flagged], combined[keeper[protected + flagged]], rule, "evaluation"))
        samples = samples.with_row_index("_row").filter(~pl.col("_row").is_in(flagged)).drop("_row")
    if samples.height:
        keeper = _keepers_of(samples, rule, thumbnails=thumbnails)
        dropped = np.flatnonzero(keeper != np.arange(samples.height))
        found.append(_verdicts(samples[dropped], samples[keeper[dropped]], rule))
    found = [frame for frame in found if frame.height]
    return pl.concat(found) if found else pl.DataFrame(schema=RESULT_SCHEMA)


def _verdicts(copies: pl.DataFrame, kept: pl.DataFrame, rule: DedupParams, kind: str | None = None) -> pl.DataFrame:
    if not copies.height:
        return pl.DataFrame(schema=RESULT_SCHEMA)
    kinds, distance = _distances(copies, kept, rule)
    return pl.DataFrame({
        "shard": copies["shard"],
        "position": copies["position"],
        "dedup_duplicate_of": kept["stem"] + "/" + kept["key"],
        "dedup_match": pl.Series(np.full(copies.height, kind) if kind else kinds, dtype=pl.String),
        "dedup_distance": pl.Series(distance.astype(np.int32)),
    }, schema=RESULT_SCHEMA).with_columns(
        pl.when(pl.col("dedup_distance") >= 0).then(pl.col("dedup_distance")).alias("dedup_distance"))


def preference_order(samples: pl.DataFrame) -> pl.DataFrame:
    """Best first: the highest ``score`` (null and NaN last), then shard stem, then position."""
    samples = samples.with_columns(pl.col("score").fill_nan(None))
    return samples.sort(["score", "stem", "position"], descending=[True, False, False], nulls_last=True)


def taking_part(stages: list[Stage], index: int) -> pl.Expr:
    """The samples a search over the whole output judges for ``stages[index]``: those that pass every other stage
    and did not fail in this one."""
    others = stages[:index] + stages[index + 1:]
    return drop_reason_expr(others).is_null() & (pl.col("error_stage").fill_null("") != stages[index].name)


def preference_score(schema: pl.Schema, prefer: str) -> pl.Expr:
    """``score``: the ranking column as a float; null when the manifest lacks it or it is not numeric."""
    ranked = prefer in schema.names() and schema[prefer].is_numeric()
    return (pl.col(prefer).cast(pl.Float64) if ranked else pl.lit(None, dtype=pl.Float64)).alias("score")


def candidate_samples(out: OutputDir, stages: list[Stage], index: int) -> pl.DataFrame:
    """The samples that take part in the search of ``stages[index]``, read lazily from every completed shard's
    manifest (only the fingerprint columns, the ranking column and what the other stages' verdicts read), in
    keep-preference order."""
    dedup = stages[index]
    passes = taking_part(stages, index)
    frames = []
    for stem in sorted(out.done_records()):
        if not out.is_file(out.manifest_name(stem)):
            continue
        sources, options = out.polars_manifests([stem])
        scan = pl.scan_parquet(sources, storage_options=options)
        schema = scan.collect_schema()
        names = schema.names()
        if "dedup_sha256" not in names:  # a shard without samples
            continue
        if "error_stage" not in names:
            scan = scan.with_columns(pl.lit(None, dtype=pl.String).alias("error_stage"))
        crops = [pl.col(column).alias(name) if column in names and min(dedup.params.max_hamming,
                                                                        dedup.params.crop_hamming) >= 0
                 else pl.lit(None, dtype=SAMPLE_SCHEMA[name]).alias(name)  # window hashes: read only when used
                 for name, column in (("probe", "dedup_probe_bits"), ("windows", "dedup_window_phash"),
                                      ("window_chroma", "dedup_window_chroma"))]
        frames.append(scan.filter(passes).select(
            pl.lit(stem).alias("stem"), "shard", pl.col("position").cast(pl.Int64), "key",
            pl.col("dedup_sha256").str.slice(0, 16).str.to_integer(base=16, dtype=pl.UInt64).alias("sha"),
            pl.col("dedup_phash").alias("phash"), pl.col("dedup_chroma_hash").alias("chroma"),
            pl.col("dedup_caption_hash").alias("caption_hash"),
            preference_score(schema, dedup.params.prefer), *crops,
            pl.lit(None, dtype=pl.Binary).alias("thumbnail"),  # read for the crop pairs only (ManifestThumbnails)
            (pl.col("dedup_colour") if "dedup_colour" in names else pl.lit(None)).cast(pl.Int32).alias("mean_colour"),
            (pl.col("dedup_window_colour") if "dedup_window_colour" in names and min(
                dedup.params.max_hamming, dedup.params.crop_hamming, dedup.params.crop_colour_distance) >= 0
             else pl.lit(None)).cast(pl.List(pl.Int32)).alias("window_colour")))
    if not frames:
        return pl.DataFrame(schema=SAMPLE_SCHEMA)
    return preference_order(pl.concat(frames).collect(engine="streaming"))


class ManifestThumbnails:
    """The thumbnails of search input rows: their ``thumbnail`` column where set (evaluation images), otherwise
    read from their shard's manifest (``dedup_thumbnail``), only for the rows asked for."""

    def __init__(self, out: OutputDir):
        self.out = out

    def __call__(self, rows: pl.DataFrame) -> pl.Series:
        wanted = rows.select("stem", "position", "thumbnail").with_row_index("row")
        missing = wanted.filter(pl.col("thumbnail").is_null() & (pl.col("stem") != EVALUATION_STEM))
        scans = []
        for (stem,), part in missing.partition_by("stem", as_dict=True).items():
            sources, options = self.out.polars_manifests([stem])
            scan = pl.scan_parquet(sources, storage_options=options)
            if "dedup_thumbnail" in scan.collect_schema().names():
                scans.append(scan.filter(pl.col("position").cast(pl.Int64).is_in(part["position"].implode())).select(
                    pl.lit(stem).alias("stem"), pl.col("position").cast(pl.Int64),
                    pl.col("dedup_thumbnail").alias("read")))
        if not scans:
            return wanted["thumbnail"]
        read = pl.concat(scans).collect(engine="streaming")
        joined = wanted.join(read, on=["stem", "position"], how="left").sort("row")
        return joined.select(pl.coalesce("thumbnail", "read").alias("thumbnail")).to_series()


def evaluation_frame(spec: str, max_pixels: int) -> pl.DataFrame | None:
    """The evaluation images of ``spec`` (``stages.dedup.evaluation_images``) fingerprinted, as search input
    (stem ``evaluation``, key the image's name); None when ``spec`` is empty."""
    if not spec:
        return None
    rows = []
    for position, (name, data) in enumerate(evaluation_images(spec)):
        try:
            found = fingerprint(data, max_pixels)
        except Exception:  # noqa: BLE001 - unhashable: matched by its bytes only
            found = None
        rows.append({"stem": EVALUATION_STEM, "shard": "", "position": position, "key": name,
                     "sha": int(hashlib.sha256(data).hexdigest()[:16], 16),
                     "phash": found.phash if found else None, "chroma": found.chroma if found else None,
                     "caption_hash": None,
                     "score": None, "probe": found.probe if found else None,
                     "windows": found.windows if found else None,
                     "window_chroma": found.window_chroma if found else None,
                     "thumbnail": found.thumbnail if found else None, "mean_colour": found.colour if found else None,
                     "window_colour": found.window_colours if found else None})
    return pl.DataFrame(rows, schema=SAMPLE_SCHEMA)


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
        samples = candidate_samples(out, stages, index)
        params = stage.params
        duplicates = find_duplicates(samples, params.max_hamming, params.scope, params.max_chroma_hamming,
                                     params.crop_hamming, params.crop_chroma_hamming,
                                     evaluation_frame(params.evaluation, params.max_pixels),
                                     params.crop_max_residual, ManifestThumbnails(out),
                                     params.max_colour_distance, params.crop_colour_distance)
        resolved[index] = ResolvedDedupStage(stage.params, by_shard(duplicates))
        resolved[index].resources = stage.resources
    return resolved


# ------------------------------------------------------------------------------------ duplicate groups

def _size_label(size: int) -> str:
    """Group sizes are counted one by one up to 5, then as 6-10 and 11+."""
    if size <= 5:
        return str(size)
    return "6-10" if size <= 10 else "11+"


def duplicate_groups(frame: pl.DataFrame | pl.LazyFrame) -> dict | None:
    """Duplicate groups of an output from its manifests (the verdict columns the selection step filled): a
    group is a kept sample with the samples dropped as its duplicates. Returns the number of groups, of
    duplicates (per match kind), the distribution of group sizes (members, the kept one included) and the
    largest group, plus the samples dropped as duplicates of evaluation images; None when the output has no
    dedup stage."""
    lazy = frame.lazy()
    names = lazy.collect_schema().names()
    if "dedup_duplicate_of" not in names or "dedup_match" not in names:
        return None
    dropped = lazy.filter(pl.col("dedup_duplicate_of").is_not_null()).select("dedup_duplicate_of", "dedup_match")
    dropped = dropped.collect()
    evaluation = dropped.filter(pl.col("dedup_match") == "evaluation")
    within = dropped.filter(pl.col("dedup_match") != "evaluation")
    sizes = within.group_by("dedup_duplicate_of").len()["len"] + 1
    distribution: dict[str, int] = {}
    for size, count in sorted(sizes.value_counts().rows()):
        label = _size_label(size)
        distribution[label] = distribution.get(label, 0) + count
    return {
        "groups": sizes.len(),
        "duplicates": within.height,
        "by_match": dict(sorted(within["dedup_match"].value_counts().rows())),
        "group_sizes": distribution,
        "largest_group": int(sizes.max()) if sizes.len() else 0,
        "evaluation_duplicates": evaluation.height,
        "evaluation_images_matched": evaluation["dedup_duplicate_of"].n_unique(),
    }


def format_duplicate_groups(groups: dict) -> str:
    """The duplicate groups of ``duplicate_groups`` as the lines ``vlcurate stats`` prints."""
    kinds = ", ".join(f"{kind} {count}" for kind, count in groups["by_match"].items())
    lines = [f"duplicate groups: {groups['groups']} (a kept sample and {groups['duplicates']} duplicates"
             + (f": {kinds})" if kinds else ")")]
    if groups["group_sizes"]:
        lines.append("  group size      groups")
        lines += [f"  {size:<10}{count:>12}" for size, count in groups["group_sizes"].items()]
        lines.append(f"  largest group: {groups['largest_group']} samples")
    if groups["evaluation_duplicates"]:
        lines.append(f"evaluation duplicates: {groups['evaluation_duplicates']} samples, of "
                     f"{groups['evaluation_images_matched']} evaluation images")
    return "\n".join(lines)
