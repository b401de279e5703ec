"""The dedup stage: fingerprints per sample, duplicate verdicts over the whole output.

Per sample (cheap, CPU) the stage writes four fingerprints:

* ``dedup_sha256``: SHA-256 of the image bytes (hex), for byte-identical copies;
* ``dedup_phash``: a 64-bit perceptual hash (pHash) of the image's luma, for re-encoded, resized and lightly
  edited copies. JPEGs are decoded in PIL's draft mode (the decoder scales by 1/2, 1/4 or 1/8 in the DCT domain),
  so a 2400-pixel photo is never decoded at full size. The image is reduced to 32x32 (a box reduction, then
  Lanczos over the last factor of two or more), the 2-D DCT-II (orthonormal) of its luma is taken, and the 63
  lowest-frequency AC coefficients (the top-left 8x8 block without its DC term) are compared with their median:
  bit ``i`` is set when coefficient ``i`` (row-major order) exceeds the median by more than ``DEAD_ZONE``. The
  dead zone is a noise floor of about half a grey level of amplitude: on flat or low-contrast images many
  coefficients sit at the median, and without it their bits flip with any re-encoding. Bit 63 is always 0, so
  the hash is a non-negative int64;
* ``dedup_chroma_hash``: the same construction on the two chroma planes (Cb, then Cr), 32 bits each from the 32
  lowest-frequency AC coefficients of their top-left 6x6 blocks. The luma hash is blind to hue: a red shape on a
  blue background of the same brightness is, in luma, just the background; the selection step also requires
  the chroma hashes to be close (``max_chroma_hamming``). An image without colour has chroma bits all 0;
* ``dedup_caption_hash``: a 64-bit BLAKE2b hash of the normalised caption (NFKC, case-folded, words only), for
  the ``image_and_caption`` scope.

A sample whose image cannot be hashed (undecodable, or more pixels than ``max_pixels``: checked from the header
before decoding) gets the reason in ``dedup_error`` and null perceptual hashes; it still takes part in exact
matching.

The verdict is not per sample: which member of a duplicate group is kept depends on every completed shard, so
it is decided at selection time (after a run's shards complete, and by ``vlcurate select``) by
``pipeline.dedup``, which fills ``dedup_duplicate_of``, ``dedup_match`` and ``dedup_distance``. Until then the
stage drops nothing (so the model stages still score every member, and the best-scored one can be kept).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import unicodedata
import warnings

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from models.imaging import DEFAULT_MAX_PIXELS, open_bounded
from stages.base import SampleBatch, Stage, StageParams

HASH_SIDE = 32  # the planes the DCT is taken of are reduced to this side
LUMA_BLOCK = 8  # the top-left block of luma DCT coefficients the pHash reads (63 AC coefficients)
CHROMA_BLOCK, CHROMA_BITS = 6, 32  # per chroma plane: the first 32 AC coefficients of the top-left 6x6 block
DRAFT_SIZE = (128, 128)  # JPEG draft target: the decoder's smallest scale at or above it
DEAD_ZONE = 10.0  # in orthonormal DCT units of 0-255 levels: about 0.6 level of amplitude
SCOPES = ("image", "image_and_caption")


def _dct_basis(size: int, count: int) -> np.ndarray:
    """The first ``count`` rows of the orthonormal DCT-II matrix of order ``size``."""
    frequency = np.arange(count)[:, None]
    sample = np.arange(size)[None, :]
    basis = np.cos(np.pi * (2 * sample + 1) * frequency / (2 * size)) * np.sqrt(2.0 / size)
    basis[0] /= np.sqrt(2.0)
    return basis


_BASIS = _dct_basis(HASH_SIDE, LUMA_BLOCK)
_BIT_VALUES = np.left_shift(np.uint64(1), np.arange(64, dtype=np.uint64))


def plane_bits(plane: np.ndarray, block: int, count: int) -> np.ndarray:
    """The hash bits of one 32x32 plane: the first ``count`` AC coefficients (row-major) of its top-left
    ``block`` x ``block`` DCT coefficients, above their median plus the dead zone."""
    basis = _BASIS[:block]
    coefficients = (basis @ plane @ basis.T).ravel()[1:count + 1]
    return coefficients > np.median(coefficients) + DEAD_ZONE


def _as_int64(bits: np.ndarray) -> int:
    value = int(_BIT_VALUES[: len(bits)][bits].sum())
    return value - (1 << 64) if value >= 1 << 63 else value


def hash_planes(image: Image.Image) -> tuple[int, int]:
    """(luma pHash, chroma hash) of a decoded image of any mode and size: see the module docstring. The image is
    reduced to 32x32 in one pass (a JPEG decoded in draft mode arrives in YCbCr already)."""
    if image.mode not in ("YCbCr", "RGB"):
        image = image.convert("RGB")
    # reducing_gap: a fast integer box reduction first, then Lanczos over the last factor of 2 or more
    small = image.resize((HASH_SIDE, HASH_SIDE), Image.Resampling.LANCZOS, reducing_gap=2.0)
    planes = np.asarray(small if small.mode == "YCbCr" else small.convert("YCbCr"), dtype=np.float64)
    luma = plane_bits(planes[:, :, 0], LUMA_BLOCK, LUMA_BLOCK**2 - 1)
    chroma = np.concatenate([plane_bits(planes[:, :, 1], CHROMA_BLOCK, CHROMA_BITS),
                             plane_bits(planes[:, :, 2], CHROMA_BLOCK, CHROMA_BITS)])
    return _as_int64(luma), _as_int64(chroma)


def perceptual_hashes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(luma pHash, chroma hash) of encoded image bytes, JPEGs through a draft decode. Raises ``ImageTooLarge``
    from the header alone when the image declares more than ``max_pixels`` pixels, and PIL's errors for
    undecodable bytes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # palette transparency and the like: only the planes matter
        with open_bounded(data, max_pixels) as image:
            if image.format == "JPEG":
                image.draft("YCbCr", DRAFT_SIZE)
            return hash_planes(image)


def perceptual_hash(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """The 64-bit luma pHash of encoded image bytes."""
    return perceptual_hashes(data, max_pixels)[0]


def hamming(a: int, b: int) -> int:
    """Bits that differ between two 64-bit hashes, stored signed or not."""
    return ((a ^ b) & 0xFFFF_FFFF_FFFF_FFFF).bit_count()


_WORDS = re.compile(r"\w+")


def caption_hash(caption: str | None) -> int | None:
    """A signed 64-bit hash of the caption's words (NFKC, case-folded); None for a caption without words."""
    words = _WORDS.findall(unicodedata.normalize("NFKC", caption or "").casefold())
    if not words:
        return None
    digest = hashlib.blake2b(" ".join(words).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


FINGERPRINT_COLUMNS = {
    "dedup_sha256": pa.string(),
    "dedup_phash": pa.int64(),
    "dedup_chroma_hash": pa.int64(),
    "dedup_caption_hash": pa.int64(),
    "dedup_error": pa.string(),
}
# Filled at selection time, over the whole output (null until then, and for every kept sample).
VERDICT_COLUMNS = {
    "dedup_duplicate_of": pa.string(),  # "SHARD_STEM/KEY" of the kept sample this one duplicates
    "dedup_match": pa.string(),  # "exact" (same bytes) or "near" (hashes within the distances)
    "dedup_distance": pa.int32(),  # pHash Hamming distance to the kept sample
}


@dataclasses.dataclass
class DedupParams(StageParams):
    # Near-duplicates: pHash Hamming distance at most this (threshold); -1 keeps only byte-identical matching.
    max_hamming: int = 3
    # Near-duplicates must also have chroma hashes at most this many bits apart (threshold); -1: luma alone.
    max_chroma_hamming: int = 6
    # "image": one sample per image whatever its caption; "image_and_caption": only samples whose normalised
    # captions are also equal count as duplicates (threshold).
    scope: str = "image"
    # The kept member of a group is the one with the highest value of this manifest column (when the output has
    # it), then the first by (shard stem, position) (threshold).
    prefer: str = "clip_score"
    max_pixels: int = DEFAULT_MAX_PIXELS  # images whose header declares more are not decoded (no pHash)


class DedupStage(Stage):
    """Fingerprint every readable sample; duplicates are dropped at selection time, over the whole output."""

    name = "dedup"
    Params = DedupParams
    columns = {**FINGERPRINT_COLUMNS, **VERDICT_COLUMNS}
    decided_at_selection = frozenset(VERDICT_COLUMNS)
    thresholds = frozenset({"max_hamming", "max_chroma_hamming", "scope", "prefer"})

    def __init__(self, params: DedupParams):
        if not -1 <= params.max_hamming <= 32:
            raise ValueError(f"max_hamming must be between -1 (exact copies only) and 32, got {params.max_hamming}")
        if not -1 <= params.max_chroma_hamming <= 64:
            raise ValueError(f"max_chroma_hamming must be between -1 (no colour check) and 64, "
                             f"got {params.max_chroma_hamming}")
        if params.scope not in SCOPES:
            raise ValueError(f"scope must be one of {list(SCOPES)}, got {params.scope!r}")
        super().__init__(params)

    def annotate(self, batch: SampleBatch) -> dict[str, list]:
        columns: dict[str, list] = {name: [] for name in self.columns}
        for data, caption in zip(batch.images, batch.captions):
            columns["dedup_sha256"].append(hashlib.sha256(data).hexdigest())
            try:
                luma, chroma = perceptual_hashes(data, self.params.max_pixels)
                error = None
            except Exception as exc:  # noqa: BLE001 - an unhashable image is this sample's annotation
                luma = chroma = None
                error = f"{type(exc).__name__}: {exc}"[:200]
            columns["dedup_phash"].append(luma)
            columns["dedup_chroma_hash"].append(chroma)
            columns["dedup_error"].append(error)
            columns["dedup_caption_hash"].append(caption_hash(caption))
        for name in VERDICT_COLUMNS:
            columns[name] = [None] * len(batch)
        return columns

    def reject_reason(self) -> pl.Expr | None:
        # Decided over the whole output at selection time (``ResolvedDedupStage``); a shard alone cannot tell.
        return None


class ResolvedDedupStage(DedupStage):
    """The dedup stage once the whole output has been searched: it holds, per input shard, the samples that
    duplicate a kept one, fills the verdict columns of that shard's manifest and drops those samples
    (``dedup:exact_duplicate`` or ``dedup:near_duplicate``)."""

    def __init__(self, params: DedupParams, duplicates: dict[str, pa.Table]):
        super().__init__(params)
        self.duplicates = duplicates  # shard source -> position + VERDICT_COLUMNS of its duplicate samples

    def selection_columns(self, table: pa.Table) -> dict[str, pa.ChunkedArray | pa.Array]:
        if "shard" not in table.column_names or "position" not in table.column_names:
            return {}
        rows = table.num_rows
        found = self.duplicates.get(table.column("shard")[0].as_py()) if rows else None
        if found is None:
            return {name: pa.nulls(rows, dtype) for name, dtype in VERDICT_COLUMNS.items()}
        index = pc.index_in(table.column("position").cast(pa.int64()),
                            value_set=found.column("position").cast(pa.int64()))
        return {name: found.column(name).take(index).cast(dtype) for name, dtype in VERDICT_COLUMNS.items()}

    def reject_reason(self) -> pl.Expr:
        return pl.when(pl.col("dedup_duplicate_of").is_not_null()).then(
            pl.concat_str([pl.col("dedup_match"), pl.lit("_duplicate")]))
