"""Opening untrusted image bytes with a bound on what decoding them may allocate.

Every place that decodes pixels (the decode stage, report thumbnails, training) opens images through
``open_bounded``: PIL reads the header lazily, the declared width x height is checked against ``max_pixels`` before
a single pixel is decoded, and only the common web formats are tried, so a file that declares 20,000 x 20,000
pixels in a few hundred bytes (a decompression bomb) is refused in microseconds instead of allocating gigabytes,
and exotic decoders (EPS via Ghostscript, and the like) are never reached from shard bytes. The bound is checked
here, at the call, and does not depend on ``PIL.Image.MAX_IMAGE_PIXELS`` (PIL's own limit still applies on top
when it is lower).

On CUDA the model stages decode on the device instead (``decode_on_device``: nvJPEG through torchvision, the
header checked the same way first) and preprocess uint8 tensors there (``normalized_pixels``). torch is imported
only by those functions: CPU-only stages import this module.
"""

from __future__ import annotations

import io
import math
from typing import Callable

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


JPEG_SIGNATURE = b"\xff\xd8\xff"


def is_jpeg(data: bytes) -> bool:
    return data[:3] == JPEG_SIGNATURE


def square_target(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after resizing the shorter side to ``size``, before the centre crop."""
    scale = size / min(width, height)
    return max(size, math.ceil(width * scale)), max(size, math.ceil(height * scale))


def resize_square(pixels, size: int):
    """A uint8 (3, H, W) tensor with its shorter side resized to ``size`` (bicubic, antialiased) and centre-cropped
    to a square: what ``stages.image_decode.decode_square`` does with PIL, on any device."""
    from torchvision.transforms.v2 import functional as F

    height, width = pixels.shape[-2:]
    target_width, target_height = square_target(width, height, size)
    if (target_width, target_height) != (width, height):
        pixels = F.resize(pixels, [target_height, target_width], interpolation=F.InterpolationMode.BICUBIC,
                          antialias=True)
    top, left = (target_height - size) // 2, (target_width - size) // 2
    return pixels[..., top:top + size, left:left + size]


def pil_to_tensor(image: Image.Image, device):
    """An RGB PIL image as a uint8 (3, H, W) tensor on ``device``."""
    import numpy as np
    import torch

    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous().to(device)


def _device_jpeg_decoder(batch, device):
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision 0.29 points to TorchCodec for decoding; nvJPEG here still works
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(batch, mode=ImageReadMode.RGB, device=device)


def decode_on_device(datas: list[bytes], size: int, device: str,
                     fallback: Callable[[bytes, int], Image.Image], max_pixels: int = DEFAULT_MAX_PIXELS,
                     decoder: Callable | None = None) -> list:
    """Each image as a uint8 (3, size, size) tensor on ``device`` (shorter side to ``size``, centre crop).

    JPEGs whose header passes ``max_pixels`` are decoded on the device in one batched call
    (``torchvision.io.decode_jpeg(..., device=device)``: nvJPEG on CUDA); if that call fails, each is tried alone.
    Whatever is not a JPEG, and any JPEG the device decoder refuses (CMYK, a damaged stream, ...), is decoded by
    ``fallback(data, size)`` on the CPU (the decode stage's PIL draft decode) and copied to the device; so is an
    image over ``max_pixels``, which the fallback refuses with ``ImageTooLarge``. ``decoder(list_of_byte_tensors,
    device)`` replaces torchvision's decoder (tests).
    """
    import torch

    decoder = decoder or _device_jpeg_decoder
    on_device: dict[int, torch.Tensor] = {}
    candidates = []
    for i, data in enumerate(datas):
        if not is_jpeg(data):
            continue
        try:
            with open_bounded(data, max_pixels, formats=("JPEG",)) as image:
                if image.format != "JPEG":
                    continue
        except Exception:  # noqa: BLE001 - the fallback gives this image's real error
            continue
        candidates.append(i)
    if candidates:
        encoded = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in candidates]
        try:
            decoded = decoder(encoded, device)
        except Exception:  # noqa: BLE001 - one bad stream fails the whole batched call: try them one by one
            decoded = []
            for tensor in encoded:
                try:
                    decoded.append(decoder([tensor], device)[0])
                except Exception:  # noqa: BLE001 - decoded on the CPU below
                    decoded.append(None)
        for i, pixels in zip(candidates, decoded):
            if pixels is not None and pixels.ndim == 3 and pixels.shape[0] == 3:
                on_device[i] = resize_square(pixels, size)
    return [on_device[i] if i in on_device else pil_to_tensor(fallback(data, size), device)
            for i, data in enumerate(datas)]


def normalized_pixels(pixels, size: int, mean, std, channels_last: bool = False):
    """Model input from uint8 (B, 3, H, W) square images on any device: resized to ``size`` when they are not that
    size already (bicubic, antialiased), scaled to [0, 1], normalised with ``mean`` and ``std`` (float32);
    channels-last memory format when asked (on CUDA)."""
    import torch

    if pixels.shape[-2:] != (size, size):
        pixels = resize_square(pixels, size)
    values = pixels.float().div_(255.0)
    mean = torch.tensor(mean, dtype=values.dtype, device=values.device).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=values.dtype, device=values.device).view(1, -1, 1, 1)
    values = values.sub_(mean).div_(std)
    return values.contiguous(memory_format=torch.channels_last) if channels_last else values
