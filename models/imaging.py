"""Opening untrusted image bytes with a bound on what decoding them may allocate.

Every place that decodes pixels (the decode stage, report thumbnails, training) opens images through
``open_bounded``: PIL reads the header lazily, the declared width x height is checked against ``max_pixels`` before
a single pixel is decoded, and only the common web formats are tried, so a file that declares 20,000 x 20,000
pixels in a few hundred bytes (a decompression bomb) is refused in microseconds instead of allocating gigabytes,
and exotic decoders (EPS via Ghostscript, and the like) are never reached from shard bytes. The bound is checked
here, at the call, and does not depend on ``PIL.Image.MAX_IMAGE_PIXELS`` (PIL's own limit still applies on top
when it is lower).

On CUDA the model actors decode JPEGs on the device instead (``decode_jpegs_on_device``: nvJPEG through
torchvision, the header checked the same way first, PIL for whatever the device decoder refuses) and preprocess
uint8 tensors there (``normalized_pixels``). torch is imported
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


DEVICE_DECODE_MODES = ("L", "RGB")  # JPEG colour modes sent to the device decoder; CMYK and the rest go to PIL
DEVICE_CHUNK_IMAGES = 64  # JPEGs per batched device decode call ...
DEVICE_CHUNK_PIXELS = 1 << 28  # ... and at most this many decoded pixels (768 MiB as RGB) held before resizing


def device_jpeg_candidates(datas: list[bytes], max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[int, tuple[int, int]]:
    """{index: (width, height)} of the images worth sending to the device decoder: JPEGs whose header PIL reads,
    declaring at most ``max_pixels`` pixels, in a colour mode the device decoder turns into RGB. Only headers are
    read; everything else is left to the CPU decoder, which gives it its own verdict."""
    candidates = {}
    for i, data in enumerate(datas):
        if not is_jpeg(data):
            continue
        try:
            with open_bounded(data, max_pixels, formats=("JPEG",)) as image:
                if image.format == "JPEG" and image.mode in DEVICE_DECODE_MODES:
                    candidates[i] = image.size
        except Exception:  # noqa: BLE001 - the CPU decoder gives this image its real error
            continue
    return candidates


def _decode_chunk(encoded: list, device, decoder: Callable) -> list:
    """The device decoder on a list of encoded streams; if the batched call fails, each stream alone (None where
    it fails too)."""
    try:
        return list(decoder(encoded, device))
    except Exception:  # noqa: BLE001 - one bad stream fails the whole batched call: try them one by one
        decoded = []
        for tensor in encoded:
            try:
                decoded.append(decoder([tensor], device)[0])
            except Exception:  # noqa: BLE001 - left to the CPU decoder
                decoded.append(None)
        return decoded


def decode_jpegs_on_device(datas: list[bytes], size: int, device: str, max_pixels: int = DEFAULT_MAX_PIXELS,
                           decoder: Callable | None = None) -> list:
    """Per image, a uint8 (3, size, size) tensor on ``device`` (shorter side to ``size``, centre crop) where the
    device decoder decoded it, else None (not a JPEG, header unreadable, over ``max_pixels``, CMYK, or a stream
    the decoder refused or decoded to another size than its header declares).

    The candidates (``device_jpeg_candidates``: headers only) are decoded in batched calls
    (``torchvision.io.decode_jpeg(..., device=device)``: nvJPEG on CUDA) of at most ``DEVICE_CHUNK_IMAGES``
    images and ``DEVICE_CHUNK_PIXELS`` pixels, each chunk resized before the next is decoded, so full-size
    decodes never pile up on the device. ``decoder(list_of_byte_tensors, device)`` replaces torchvision's (tests).
    """
    import torch

    decoder = decoder or _device_jpeg_decoder
    candidates = device_jpeg_candidates(datas, max_pixels)
    results: list = [None] * len(datas)
    chunks: list[list[int]] = []
    held = 0
    for i, (width, height) in candidates.items():
        if not chunks or len(chunks[-1]) >= DEVICE_CHUNK_IMAGES or held + width * height > DEVICE_CHUNK_PIXELS:
            chunks.append([])
            held = 0
        chunks[-1].append(i)
        held += width * height
    for chunk in chunks:
        encoded = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in chunk]
        for i, pixels in zip(chunk, _decode_chunk(encoded, device, decoder)):
            width, height = candidates[i]
            if pixels is not None and tuple(pixels.shape) == (3, height, width):
                results[i] = resize_square(pixels, size)
    return results


def decode_on_device(datas: list[bytes], size: int, device: str,
                     fallback: Callable[[bytes, int], Image.Image], max_pixels: int = DEFAULT_MAX_PIXELS,
                     decoder: Callable | None = None) -> list:
    """Each image as a uint8 (3, size, size) tensor on ``device`` (shorter side to ``size``, centre crop).

    JPEGs are decoded on the device where ``decode_jpegs_on_device`` can; whatever is not a JPEG, and any JPEG
    the device decoder refuses (CMYK, a damaged stream, ...), is decoded by ``fallback(data, size)`` on the CPU
    (the decode stage's PIL draft decode) and copied to the device; so is an image over ``max_pixels``, which the
    fallback refuses with ``ImageTooLarge``. ``decoder`` replaces torchvision's decoder (tests).
    """
    decoded = decode_jpegs_on_device(datas, size, device, max_pixels, decoder)
    return [tensor if tensor is not None else pil_to_tensor(fallback(data, size), device)
            for data, tensor in zip(datas, decoded)]


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
