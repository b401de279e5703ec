"""Opening untrusted image bytes with a bound on what decoding them may allocate.

Every place that decodes pixels (the decode stage, report thumbnails, training) opens images through
``open_bounded``: PIL reads the header lazily, the declared width x height is checked against ``max_pixels`` before
a single pixel is decoded, and only the common web formats are tried, so a file that declares 20,000 x 20,000
pixels in a few hundred bytes (a decompression bomb) is refused in microseconds instead of allocating gigabytes,
and exotic decoders (EPS via Ghostscript, and the like) are never reached from shard bytes. The bound is checked
here, at the call, and does not depend on ``PIL.Image.MAX_IMAGE_PIXELS`` (PIL's own limit still applies on top
when it is lower).
"""

from __future__ import annotations

import io

from PIL import Image

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's default decompression-bomb limit (about 9,459 x 9,459)
DECODE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")


class ImageTooLarge(ValueError):
    """The image header declares more pixels than the caller allows to be decoded."""


def open_bounded(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                 formats: tuple[str, ...] = DECODE_FORMATS) -> Image.Image:
    """Open image bytes lazily (header only) and refuse them when width x height is over ``max_pixels``.

    Use it as a context manager, like ``Image.open``. Raises ``ImageTooLarge`` for a too large image and PIL's
    usual errors (``UnidentifiedImageError``, ...) for anything unreadable.
    """
    try:
        image = Image.open(io.BytesIO(data), formats=list(formats))
    except Image.DecompressionBombError as exc:  # PIL's own limit is lower than ours: same verdict
        raise ImageTooLarge(f"over PIL's limit: {exc}") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageTooLarge(f"{width}x{height} image has {width * height:,} pixels, over max_pixels={max_pixels:,}")
    return image
