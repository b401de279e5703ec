"""The dedup stage: fingerprints per sample, duplicate verdicts over the whole output.

Per sample (cheap, CPU) the stage writes these fingerprints:

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
* ``dedup_window_phash`` and ``dedup_window_chroma``: the same two hashes of 16 windows of the image, for crops.
  A copy cut by up to 10% per side is, at the scale of a 64-bit hash, a zoom into a window of its original: its
  whole-image pHash is far from the original's (the framing moved), but close to the hash of the original's
  window at the same box. A pHash tolerates about 1% of misframing per side (within 3 bits), so the windows sit
  on a grid of cuts of 2.5% and 7.5% per side (``CROP_CUTS``; top, bottom, left, right: 2**4 windows), none
  more than 2.5% from any crop of up to 10%, and a crop is matched at a looser distance (``crop_hamming``).
  The windows are resampled from the same decoded image (box-reduced to a shorter side of 64 to 127 pixels) by
  area averaging, with the DCT folded in: per window axis one 8 x side matrix, so the 16 windows cost a few
  small matrix products, not 16 resizes;
* ``dedup_probe_bits``: the 7 bits of the pHash, among its 24 lowest-frequency ones (``KEY_BITS``), whose
  coefficients lie closest to the threshold: the bits most likely to differ in a copy. The search for crops
  looks up the whole-image pHash, with every combination of these bits flipped, among the windows' values of
  the 24 key bits (``pipeline.dedup.crop_pairs``);
* ``dedup_thumbnail``: the image's luma as ``THUMBNAIL_SIDE`` x ``THUMBNAIL_SIDE`` area averages over the whole
  image, whatever its aspect ratio (400 bytes, row by row), from the same box-reduced decode as the windows. A
  crop pair the hashes find is verified with it (``pipeline.dedup.crop_residuals``): the crop's thumbnail must
  match the other's thumbnail cut to the best-aligned box near the matched window. At 64 bits, catalogue photos
  of look-alike products shot the same way are a few bits from each other's windows; their thumbnails differ
  in grey levels where the hashes keep only signs;
* ``dedup_colour`` and ``dedup_window_colour``: the mean colour of the image and of each of its 16 windows, Y,
  Cb and Cr averaged over the same box-reduced decode and packed into one integer (``Y << 16 | Cb << 8 | Cr``,
  0-255 each). The hashes compare each DCT coefficient with the median of its plane, so they record where the
  light and dark parts are, not which colour they have: a red and a green circle at the same place on the same
  background hash alike, as do the photos of one product in several colours. A near pair must also have mean
  colours within ``max_colour_distance`` levels in every channel; a crop pair, the crop's mean colour within
  ``crop_colour_distance`` of a matched window's;
* ``dedup_caption_hash``: a 64-bit BLAKE2b hash of the normalised caption (NFKC, case-folded, words only), for
  the ``image_and_caption`` scope.

A sample whose image cannot be hashed (undecodable, or more pixels than ``max_pixels``: checked from the header
before decoding) gets the reason in ``dedup_error`` and null perceptual hashes; it still takes part in exact
matching.

The verdict is not per sample: which member of a duplicate group is kept depends on every completed shard, so
it is decided at selection time (after a run's shards complete, and by ``vlcurate select``) by
``pipeline.dedup``, which fills ``dedup_duplicate_of``, ``dedup_match`` and ``dedup_distance`` (and drops the
samples that duplicate an image of the ``evaluation`` set, fingerprinted then with ``fingerprint``). Until then the
stage drops nothing (so the model stages still score every member, and the best-scored one can be kept).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import hashlib
import itertools
import re
import tarfile
import unicodedata
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
from PIL import Image

from models.imaging import DEFAULT_MAX_PIXELS, open_bounded
from stages.base import ResolvedOverOutput, SampleBatch, Stage, StageParams, error_text

HASH_SIDE = 32  # the planes the DCT is taken of are reduced to this side
LUMA_BLOCK = 8  # the top-left block of luma DCT coefficients the pHash reads (63 AC coefficients)
CHROMA_BLOCK, CHROMA_BITS = 6, 32  # per chroma plane: the first 32 AC coefficients of the top-left 6x6 block
DRAFT_SIZE = (128, 128)  # JPEG draft target: the decoder's smallest scale at or above it
# The windows are resampled from the decoded image box-reduced by an integer factor to a shorter side of 64 to
# 127 pixels: enough for 32 samples per window, and small enough for the matrix products to stay cheap (and
# single-threaded in BLAS).
WINDOW_SOURCE_SIDE = 64
DEAD_ZONE = 10.0  # in orthonormal DCT units of 0-255 levels: about 0.6 level of amplitude
SCOPES = ("image", "image_and_caption")
CROP_CUTS = (0.025, 0.075)  # shares of a side cut off by the windows (each side independently)
CUT_PAIRS = tuple(itertools.product(CROP_CUTS, repeat=2))  # (first, last) cut along one axis
WINDOWS = len(CUT_PAIRS) ** 2  # row-major: (top, bottom) pair, then (left, right) pair
KEY_BLOCK = 5  # the crop search looks up the pHash bits of the top-left 5x5 DCT block (24 bits)
PROBE_BITS = 7  # ... with every combination of the 7 least certain of them flipped (128 probes)
THUMBNAIL_SIDE = 20  # the luma thumbnail crop matches are verified with: 20 x 20 bytes
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")


def _dct_basis(size: int, count: int) -> np.ndarray:
    """The first ``count`` rows of the orthonormal DCT-II matrix of order ``size``."""
    frequency = np.arange(count)[:, None]
    sample = np.arange(size)[None, :]
    basis = np.cos(np.pi * (2 * sample + 1) * frequency / (2 * size)) * np.sqrt(2.0 / size)
    basis[0] /= np.sqrt(2.0)
    return basis


_BASIS = _dct_basis(HASH_SIDE, LUMA_BLOCK)
_BIT_VALUES = np.left_shift(np.uint64(1), np.arange(64, dtype=np.uint64))
# Positions, in the 63-bit pHash (bit i: AC coefficient i + 1 in row-major order of the 8x8 block), of the
# coefficients of the top-left KEY_BLOCK x KEY_BLOCK block.
KEY_POSITIONS = np.array([row * LUMA_BLOCK + col - 1 for row in range(KEY_BLOCK) for col in range(KEY_BLOCK)
                          if row or col])
KEY_BITS = int(_BIT_VALUES[KEY_POSITIONS].sum())  # mask of those bits


def median(values: np.ndarray) -> np.ndarray:
    """The median along the last axis (as ``np.median``, with less overhead for these small arrays)."""
    count = values.shape[-1]
    middle = count // 2
    if count % 2:
        return np.partition(values, middle, axis=-1)[..., middle:middle + 1]
    halves = np.partition(values, (middle - 1, middle), axis=-1)[..., middle - 1:middle + 1]
    return (halves[..., :1] + halves[..., 1:]) / 2


def plane_bits(plane: np.ndarray, block: int, count: int) -> np.ndarray:
    """The hash bits of one 32x32 plane: the first ``count`` AC coefficients (row-major) of its top-left
    ``block`` x ``block`` DCT coefficients, above their median plus the dead zone."""
    basis = _BASIS[:block]
    coefficients = (basis @ plane @ basis.T).ravel()[1:count + 1]
    return coefficients > median(coefficients) + DEAD_ZONE


def _as_int64(bits: np.ndarray) -> int:
    value = int(_BIT_VALUES[: len(bits)][bits].sum())
    return value - (1 << 64) if value >= 1 << 63 else value


def hash_planes(image: Image.Image) -> tuple[int, int]:
    """(luma pHash, chroma hash) of a decoded image of any mode and size: see the module docstring. The image is
    reduced to 32x32 in one pass (a JPEG decoded in draft mode arrives in YCbCr already)."""
    luma, chroma, _ = _whole_image(_hashable(image))
    return luma, chroma


def _hashable(image: Image.Image) -> Image.Image:
    return image if image.mode in ("YCbCr", "RGB") else image.convert("RGB")


def _whole_image(image: Image.Image) -> tuple[int, int, int]:
    """(luma pHash, chroma hash, probe bits) of a YCbCr or RGB image."""
    # reducing_gap: a fast integer box reduction first, then Lanczos over the last factor of 2 or more
    small = image.resize((HASH_SIDE, HASH_SIDE), Image.Resampling.LANCZOS, reducing_gap=2.0)
    planes = np.asarray(small if small.mode == "YCbCr" else small.convert("YCbCr"), dtype=np.float64)
    luma_plane = planes[:, :, 0]
    coefficients = (_BASIS @ luma_plane @ _BASIS.T).ravel()[1:LUMA_BLOCK**2]
    margin = coefficients - (median(coefficients) + DEAD_ZONE)
    uncertain = KEY_POSITIONS[np.argsort(np.abs(margin[KEY_POSITIONS]), kind="stable")[:PROBE_BITS]]
    chroma = np.concatenate([plane_bits(planes[:, :, 1], CHROMA_BLOCK, CHROMA_BITS),
                             plane_bits(planes[:, :, 2], CHROMA_BLOCK, CHROMA_BITS)])
    return _as_int64(margin > 0), _as_int64(chroma), int(_BIT_VALUES[uncertain].sum())


def area_matrix(length: int, first: float, last: float, samples: int) -> np.ndarray:
    """The area resampling of the part of an axis of ``length`` pixels left when the shares ``first`` and
    ``last`` are cut off its ends, to ``samples`` samples: a ``samples`` x ``length`` matrix whose rows sum to
    1 (each sample averages the pixels under it, partial pixels weighted by their covered share)."""
    pixels = np.arange(length)[None, :]
    start, stop = first * length, (1 - last) * length
    edges = start + (stop - start) * np.arange(samples + 1) / samples
    overlap = np.clip(np.minimum(pixels + 1, edges[1:, None]) - np.maximum(pixels, edges[:-1, None]), 0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


@functools.lru_cache(maxsize=512)
def window_matrix(length: int) -> np.ndarray:
    """For an axis of ``length`` pixels: per pair of cuts in ``CUT_PAIRS``, the window's area resampling to
    ``HASH_SIDE`` samples followed by the first ``LUMA_BLOCK`` DCT rows (a ``LUMA_BLOCK`` x ``length`` block),
    stacked."""
    return np.concatenate([_BASIS @ area_matrix(length, first, last, HASH_SIDE) for first, last in CUT_PAIRS])


@functools.lru_cache(maxsize=512)
def thumbnail_matrix(length: int) -> np.ndarray:
    """The area resampling of a whole axis of ``length`` pixels to ``THUMBNAIL_SIDE`` samples."""
    return area_matrix(length, 0.0, 0.0, THUMBNAIL_SIDE)


def packed_colours(means: np.ndarray) -> np.ndarray:
    """Mean Y, Cb and Cr (the last axis) rounded and packed: ``Y << 16 | Cb << 8 | Cr``, int64."""
    levels = np.clip(np.rint(means), 0, 255).astype(np.int64)
    return levels[..., 0] << 16 | levels[..., 1] << 8 | levels[..., 2]


def mean_colour(planes: np.ndarray) -> int:
    """The packed mean colour (``packed_colours``) of a height x width x 3 YCbCr array."""
    # summed one axis at a time: far faster than a mean over the flattened pixels, the same to the rounding
    return int(packed_colours(planes.sum(axis=0).sum(axis=0) / (planes.shape[0] * planes.shape[1])))


def colour_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The largest per-channel difference between packed mean colours (``mean_colour``), element by element."""
    a, b = a.astype(np.int64), b.astype(np.int64)
    return np.maximum.reduce([np.abs((a >> shift & 255) - (b >> shift & 255)) for shift in (16, 8, 0)])


def thumbnail(luma: np.ndarray) -> bytes:
    """The luma thumbnail of an image given as its height x width luma plane: ``THUMBNAIL_SIDE`` x
    ``THUMBNAIL_SIDE`` area averages over the whole image (whatever its aspect ratio), rounded to bytes, row by
    row."""
    small = thumbnail_matrix(luma.shape[0]) @ luma @ thumbnail_matrix(luma.shape[1]).T
    return np.clip(np.rint(small), 0, 255).astype(np.uint8).tobytes()


def _block_bits(coefficients: np.ndarray, count: int) -> np.ndarray:
    """Per row of flattened DCT blocks: the hash of its first ``count`` AC coefficients, as uint64."""
    values = coefficients[:, 1:count + 1]
    bits = values > median(values) + DEAD_ZONE
    return (bits * _BIT_VALUES[:count]).sum(axis=1, dtype=np.uint64)


def window_blocks(planes: np.ndarray) -> list[np.ndarray]:
    """Per plane (Y, Cb, Cr) of a height x width x 3 YCbCr array: the ``LUMA_BLOCK`` x ``LUMA_BLOCK`` lowest DCT
    coefficients of each of the ``WINDOWS`` windows (see the module docstring), a WINDOWS x 8 x 8 array."""
    rows, cols = window_matrix(planes.shape[0]), window_matrix(planes.shape[1])
    pairs = len(CUT_PAIRS)
    blocks = []
    for plane in range(3):
        coefficients = rows @ planes[:, :, plane] @ cols.T  # (pairs * 8) x (pairs * 8): every window's block
        blocks.append(coefficients.reshape(pairs, LUMA_BLOCK, pairs, LUMA_BLOCK).transpose(0, 2, 1, 3)
                      .reshape(WINDOWS, LUMA_BLOCK, LUMA_BLOCK))
    return blocks


def window_hashes(blocks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(luma pHashes, chroma hashes) of the ``WINDOWS`` windows of an image, from its ``window_blocks``, each a
    uint64 array in window order (see the module docstring)."""
    luma = _block_bits(blocks[0].reshape(WINDOWS, LUMA_BLOCK**2), LUMA_BLOCK**2 - 1)
    cb, cr = (_block_bits(block[:, :CHROMA_BLOCK, :CHROMA_BLOCK].reshape(WINDOWS, CHROMA_BLOCK**2), CHROMA_BITS)
              for block in blocks[1:])
    return luma, cb | (cr << np.uint64(CHROMA_BITS))


def window_colours(blocks: list[np.ndarray]) -> list[int]:
    """The packed mean colours of the windows, from their ``window_blocks``: each window is resampled to
    ``HASH_SIDE`` x ``HASH_SIDE`` samples, whose orthonormal 2-D DCT has ``HASH_SIDE`` times their mean as its DC
    coefficient."""
    means = np.stack([block[:, 0, 0] for block in blocks], axis=-1) / HASH_SIDE
    return packed_colours(means).tolist()


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """An image's perceptual fingerprints: see the module docstring. Hashes are signed 64-bit values."""

    phash: int
    chroma: int
    probe: int
    windows: list[int]
    window_chroma: list[int]
    thumbnail: bytes
    colour: int
    window_colours: list[int]


def _signed(values: np.ndarray) -> list[int]:
    return np.ascontiguousarray(values, dtype=np.uint64).view(np.int64).tolist()


@contextlib.contextmanager
def draft_opened(data: bytes, max_pixels: int):
    """The image of encoded bytes, a JPEG set to draft decoding. Raises ``ImageTooLarge`` from the header alone
    when the image declares more than ``max_pixels`` pixels, and PIL's errors for undecodable bytes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # palette transparency and the like: only the planes matter
        with open_bounded(data, max_pixels) as image:
            if image.format == "JPEG":
                image.draft("YCbCr", DRAFT_SIZE)
            yield image


def fingerprint(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Fingerprint:
    """The perceptual fingerprints of encoded image bytes (see ``draft_opened``)."""
    with draft_opened(data, max_pixels) as image:
        image = _hashable(image)
        luma, chroma, probe = _whole_image(image)
        factor = min(image.size) // WINDOW_SOURCE_SIDE
        source = image.reduce(factor) if factor > 1 else image
        planes = np.asarray(source if source.mode == "YCbCr" else source.convert("YCbCr"), dtype=np.float64)
    blocks = window_blocks(planes)
    windows, window_chroma = window_hashes(blocks)
    return Fingerprint(luma, chroma, probe, _signed(windows), _signed(window_chroma), thumbnail(planes[:, :, 0]),
                       mean_colour(planes), window_colours(blocks))


def perceptual_hashes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(luma pHash, chroma hash) of encoded image bytes (see ``draft_opened``)."""
    with draft_opened(data, max_pixels) as image:
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
    "dedup_probe_bits": pa.int64(),
    "dedup_window_phash": pa.list_(pa.int64()),
    "dedup_window_chroma": pa.list_(pa.int64()),
    "dedup_thumbnail": pa.binary(),
    "dedup_colour": pa.int32(),
    "dedup_window_colour": pa.list_(pa.int32()),
    "dedup_caption_hash": pa.int64(),
    "dedup_error": pa.string(),
}
# Filled at selection time, over the whole output (null until then, and for every kept sample).
VERDICT_COLUMNS = {
    "dedup_duplicate_of": pa.string(),  # "SHARD_STEM/KEY" of the kept sample, or "evaluation/NAME"
    "dedup_match": pa.string(),  # "exact" (same bytes), "near" (whole-image hashes), "crop" or "evaluation"
    "dedup_distance": pa.int32(),  # pHash Hamming distance to it (for a crop: to the closest window)
}


@dataclasses.dataclass
class DedupParams(StageParams):
    # Near-duplicates: pHash Hamming distance at most this (threshold); -1 keeps only byte-identical matching (no
    # near or crop matching).
    max_hamming: int = 3
    # Near-duplicates must also have chroma hashes at most this many bits apart (threshold); -1: luma alone.
    max_chroma_hamming: int = 6
    # ... and mean colours at most this many levels apart in each of Y, Cb and Cr (threshold); -1: no check.
    max_colour_distance: int = 8
    # Crops: one image's pHash within this many bits of one of the other's window hashes (threshold); -1: off.
    crop_hamming: int = 7
    # ... and its chroma hash within this many bits of that window's chroma hash (threshold); -1: luma alone.
    crop_chroma_hamming: int = 7
    # ... and its luma thumbnail, against the best-aligned box of the other's thumbnail near a matched window, at
    # most this root-mean-square residual in grey levels after a gain and offset fit (threshold); -1: no check.
    crop_max_residual: float = 7.5
    # ... and the crop's mean colour at most this many levels from a matched window's in each of Y, Cb and Cr
    # (threshold); -1: no check.
    crop_colour_distance: int = 4
    # "image": one sample per image whatever its caption; "image_and_caption": only samples whose normalised
    # captions are also equal count as duplicates (threshold).
    scope: str = "image"
    # The kept member of a group is the one with the highest value of this manifest column (when the output has
    # it), then the first by (shard stem, position) (threshold).
    prefer: str = "clip_score"
    # Evaluation images (a folder, searched recursively, a glob, or WebDataset .tar shards): every sample whose
    # image is an exact, near or crop duplicate of one of them is dropped (threshold; empty: none).
    evaluation: str = ""
    max_pixels: int = DEFAULT_MAX_PIXELS  # images whose header declares more are not decoded (no pHash)


def evaluation_images(spec: str) -> list[tuple[str, bytes]]:
    """(name, bytes) of the evaluation images: ``spec`` is a folder (image files under it, recursively), a glob
    of image files, or .tar shards (their image members, named SHARD/MEMBER), in name order."""
    if not spec:
        return []
    root = Path(spec).expanduser()
    paths = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else sorted(
        Path(p) for p in glob.glob(str(root), recursive=True))
    if not paths:
        raise ValueError(f"dedup.evaluation: no files match {spec!r}")
    images = []
    for path in paths:
        if path.suffix.lower() == ".tar":
            with tarfile.open(path) as archive:
                images += [(f"{path.name}/{member.name}", archive.extractfile(member).read()) for member in archive
                           if member.isfile() and member.name.lower().endswith(IMAGE_SUFFIXES)]
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            images.append((str(path.relative_to(root)) if root.is_dir() else path.name, path.read_bytes()))
    return sorted(images)


class DedupStage(Stage):
    """Fingerprint every readable sample; duplicates are dropped at selection time, over the whole output."""

    name = "dedup"
    Params = DedupParams
    columns = {**FINGERPRINT_COLUMNS, **VERDICT_COLUMNS}
    decided_at_selection = frozenset(VERDICT_COLUMNS)
    manifest_only = frozenset({"dedup_probe_bits", "dedup_window_phash", "dedup_window_chroma", "dedup_thumbnail",
                               "dedup_colour", "dedup_window_colour"})
    thresholds = frozenset({"max_hamming", "max_chroma_hamming", "max_colour_distance", "crop_hamming",
                            "crop_chroma_hamming", "crop_max_residual", "crop_colour_distance", "scope", "prefer",
                            "evaluation"})

    def __init__(self, params: DedupParams):
        if not -1 <= params.max_hamming <= 32:
            raise ValueError(f"max_hamming must be between -1 (exact copies only) and 32, got {params.max_hamming}")
        if not -1 <= params.crop_hamming <= 32:
            raise ValueError(f"crop_hamming must be between -1 (no crop matching) and 32, got {params.crop_hamming}")
        for name in ("max_chroma_hamming", "crop_chroma_hamming"):
            if not -1 <= getattr(params, name) <= 64:
                raise ValueError(f"{name} must be between -1 (no colour check) and 64, got {getattr(params, name)}")
        for name in ("max_colour_distance", "crop_colour_distance"):
            if not -1 <= getattr(params, name) <= 255:
                raise ValueError(f"{name} must be between -1 (no colour check) and 255 levels, got "
                                 f"{getattr(params, name)}")
        if not (params.crop_max_residual == -1 or 0 <= params.crop_max_residual <= 255):
            raise ValueError(f"crop_max_residual must be -1 (no check) or between 0 and 255 grey levels, got "
                             f"{params.crop_max_residual}")
        if params.scope not in SCOPES:
            raise ValueError(f"scope must be one of {list(SCOPES)}, got {params.scope!r}")
        super().__init__(params)

    def annotate(self, batch: SampleBatch) -> dict[str, list]:
        columns: dict[str, list] = {name: [] for name in self.columns}
        for data, caption in zip(batch.images, batch.captions):
            columns["dedup_sha256"].append(hashlib.sha256(data).hexdigest())
            try:
                found, error = fingerprint(data, self.params.max_pixels), None
            except Exception as exc:  # noqa: BLE001 - an unhashable image is this sample's annotation
                found, error = None, error_text(exc)
            columns["dedup_phash"].append(None if found is None else found.phash)
            columns["dedup_chroma_hash"].append(None if found is None else found.chroma)
            columns["dedup_probe_bits"].append(None if found is None else found.probe)
            columns["dedup_window_phash"].append(None if found is None else found.windows)
            columns["dedup_window_chroma"].append(None if found is None else found.window_chroma)
            columns["dedup_thumbnail"].append(None if found is None else found.thumbnail)
            columns["dedup_colour"].append(None if found is None else found.colour)
            columns["dedup_window_colour"].append(None if found is None else found.window_colours)
            columns["dedup_error"].append(error)
            columns["dedup_caption_hash"].append(caption_hash(caption))
        for name in VERDICT_COLUMNS:
            columns[name] = [None] * len(batch)
        return columns

    def reject_reason(self) -> pl.Expr | None:
        # Decided over the whole output at selection time (``ResolvedDedupStage``); a shard alone cannot tell.
        return None


class ResolvedDedupStage(ResolvedOverOutput, DedupStage):
    """The dedup stage once the whole output has been searched: it holds, per input shard, the samples that
    duplicate a kept one or an evaluation image (``duplicates``: shard source -> position + VERDICT_COLUMNS),
    fills the verdict columns of that shard's manifest and drops those samples (``dedup:exact_duplicate``,
    ``dedup:near_duplicate``, ``dedup:crop_duplicate`` or ``dedup:evaluation_duplicate``)."""

    selection_verdicts = VERDICT_COLUMNS

    def reject_reason(self) -> pl.Expr:
        return pl.when(pl.col("dedup_duplicate_of").is_not_null()).then(
            pl.concat_str([pl.col("dedup_match"), pl.lit("_duplicate")]))
