"""Stages that judge the image from its header alone: PIL opens lazily and no pixel is decoded."""

from __future__ import annotations

import dataclasses
import io
import warnings

import polars as pl
import pyarrow as pa
from PIL import Image

from pipeline.shards import binary_views
from stages.base import SampleBatch, Stage, StageParams, error_text, first_reason


def read_header(data: bytes | memoryview) -> tuple[int | None, int | None, str | None, str | None]:
    """(width, height, format, error) from the image header; never decodes pixels.

    JPEG, PNG, WebP and GIF headers are parsed here from the first bytes; anything else (or a header this parser
    cannot follow) goes to PIL's lazy open, which also reads only the header."""
    if not data:
        return None, None, None, "empty_file"
    parsed = parse_header(data)
    if parsed is not None:
        return parsed[0], parsed[1], parsed[2], None
    if isinstance(data, memoryview):
        data = data.tobytes()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: max_pixels is our own threshold
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                return width, height, image.format, None
    except Image.DecompressionBombError:
        return None, None, None, "DecompressionBombError: image header declares too many pixels"
    except Exception as exc:  # noqa: BLE001 - any unreadable header is a per-sample verdict
        return None, None, None, error_text(exc)


# JPEG start-of-frame markers (C0-CF except DHT C4, JPG C8 and DAC CC) carry the frame size.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_SCAN_LIMIT = 1 * 2**20  # a header whose frame size is not found within this many bytes goes to PIL


def parse_header(data: bytes | memoryview) -> tuple[int, int, str] | None:
    """(width, height, format) of a JPEG, PNG, WebP or GIF from its first bytes, or None to let PIL decide."""
    head = data[:4]
    if head[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        if len(data) >= 24 and data[12:16] == b"IHDR":
            width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
            return (width, height, "PNG") if width and height else None
        return None
    if head == b"RIFF" and data[8:12] == b"WEBP":
        return _webp_size(data)
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        width, height = int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
        return (width, height, "GIF") if width and height else None
    return None


def _jpeg_size(data: bytes | memoryview) -> tuple[int, int, str] | None:
    offset, end = 2, min(len(data), _JPEG_SCAN_LIMIT)
    while offset + 4 <= end:
        if data[offset] != 0xFF:
            return None
        marker = data[offset + 1]
        if marker == 0xFF:  # fill byte
            offset += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            offset += 2
            continue
        length = int.from_bytes(data[offset + 2:offset + 4], "big")
        if length < 2:
            return None
        if marker in _JPEG_SOF:
            if offset + 9 > len(data):
                return None
            height = int.from_bytes(data[offset + 5:offset + 7], "big")
            width = int.from_bytes(data[offset + 7:offset + 9], "big")
            return (width, height, "JPEG") if width and height else None
        if marker == 0xDA:  # start of scan before any frame header
            return None
        offset += 2 + length
    return None


def _webp_size(data: bytes | memoryview) -> tuple[int, int, str] | None:
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        width = int.from_bytes(data[26:28], "little") & 0x3FFF
        height = int.from_bytes(data[28:30], "little") & 0x3FFF
    elif chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        width, height = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    elif chunk == b"VP8X" and len(data) >= 30:
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
    else:
        return None
    return (width, height, "WEBP") if width and height else None


HEADER_COLUMNS = {
    "image_width": pa.int32(),
    "image_height": pa.int32(),
    "image_format": pa.string(),
    "image_error": pa.string(),
    "image_complete": pa.bool_(),
}

# What a complete file of each format ends with (trailing NUL padding is tolerated for JPEG).
_JPEG_END = b"\xff\xd9"
_PNG_END = b"IEND\xaeB`\x82"


def file_is_complete(data: bytes | memoryview, image_format: str | None) -> bool | None:
    """Whether the file ends where its format says it should: catches truncated downloads without decoding."""
    if image_format == "JPEG":
        return _without_trailing_nul(data).endswith(_JPEG_END)
    if image_format == "PNG":
        return bytes(data[-len(_PNG_END):]).endswith(_PNG_END)
    if image_format == "WEBP":
        return len(data) >= 8 and int.from_bytes(data[4:8], "little") + 8 <= len(data)
    return None


def _without_trailing_nul(data: bytes | memoryview, keep: int = 16) -> bytes:
    """The last ``keep`` bytes of ``data`` (fewer if it is shorter) once its trailing NUL bytes are cut."""
    end = len(data)
    while end > 0:
        start = max(0, end - 4096)
        kept = len(bytes(data[start:end]).rstrip(b"\0"))
        if kept:
            end = start + kept
            return bytes(data[max(0, end - keep):end])
        end = start
    return b""


def image_values(batch: SampleBatch) -> list:
    """The batch's image files, as views of the table's buffers where it can (the header and the last bytes are
    all that is read: copying every file out of the table costs more than parsing its header)."""
    table = getattr(batch, "_table", None)
    if not isinstance(table, pa.Table) or "image" not in table.column_names:
        return batch.images
    views = binary_views(table.column("image"))
    return [views[i] for i in batch.index]


def annotate_headers(batch: SampleBatch) -> dict[str, list]:
    columns: dict[str, list] = {name: [] for name in HEADER_COLUMNS}
    for data in image_values(batch):
        width, height, image_format, error = read_header(data)
        for name, value in zip(HEADER_COLUMNS, (width, height, image_format, error,
                                                file_is_complete(data, image_format))):
            columns[name].append(value)
    return columns


# The format each file extension promises.
EXTENSION_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}


@dataclasses.dataclass
class ImageSizeParams(StageParams):
    min_side: int = 200  # DataComp's shorter-side minimum
    max_pixels: int = 89_478_485  # PIL's decompression-bomb limit: larger images are refused
    allowed_formats: list[str] = dataclasses.field(default_factory=lambda: ["JPEG", "PNG", "WEBP"])
    # A PNG named .jpg breaks loaders that trust the extension (DALI, torchvision.io.decode_jpeg).
    require_matching_extension: bool = True


class ImageSizeStage(Stage):
    """Drop unreadable, truncated or mislabelled files, decompression bombs (pixel count) and small images
    (shorter side), all from the header and the file's last bytes."""

    name = "image_size"
    Params = ImageSizeParams
    columns = HEADER_COLUMNS
    thresholds = frozenset({"min_side", "max_pixels", "allowed_formats", "require_matching_extension"})

    def annotate(self, batch: SampleBatch) -> dict[str, list]:
        return annotate_headers(batch)

    def reject_reason(self) -> pl.Expr:
        p: ImageSizeParams = self.params
        width, height = pl.col("image_width"), pl.col("image_height")
        promised = pl.col("image_ext").replace_strict(EXTENSION_FORMATS, default=None)
        return first_reason(
            (pl.col("image_error") == "empty_file", "empty_file"),
            (pl.col("image_error").is_not_null(), "undecodable_header"),
            (width.cast(pl.Int64) * height.cast(pl.Int64) > p.max_pixels, "too_many_pixels"),
            (~pl.col("image_format").is_in(p.allowed_formats), "unsupported_format"),
            (pl.lit(p.require_matching_extension) & (promised != pl.col("image_format")), "extension_mismatch"),
            (pl.col("image_complete") == False, "truncated"),  # noqa: E712 - polars expression
            (pl.min_horizontal(width, height) < p.min_side, "too_small"),
        )


@dataclasses.dataclass
class AspectRatioParams(StageParams):
    max_ratio: float = 3.0


class AspectRatioStage(Stage):
    """Drop extreme aspect ratios: longer side / shorter side above ``max_ratio``."""

    name = "aspect_ratio"
    Params = AspectRatioParams
    columns = {"aspect_ratio": pa.float32()}
    thresholds = frozenset({"max_ratio"})

    def annotate(self, batch: SampleBatch) -> dict[str, list]:
        widths, heights = batch.annotation("image_width"), batch.annotation("image_height")
        if widths is None or heights is None:  # image_size is switched off: read the headers here
            headers = [read_header(data) for data in batch.images]
            widths, heights = [h[0] for h in headers], [h[1] for h in headers]
        ratios = [max(w, h) / min(w, h) if w and h else None for w, h in zip(widths, heights)]
        return {"aspect_ratio": ratios}

    def reject_reason(self) -> pl.Expr:
        ratio = pl.col("aspect_ratio")
        return first_reason(
            (ratio.is_null(), "undecodable_header"),
            (ratio > self.params.max_ratio, "extreme_aspect_ratio"),
        )
