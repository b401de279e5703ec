"""Decoding the images that survived the cheap stages, for the model stages (run by the model actors).

JPEGs are decoded in PIL's draft mode: the decoder scales by 1/2, 1/4 or 1/8 in the DCT domain to the smallest
size that is still at least the requested one, so a 2400-pixel product photo is never decoded at full size for
a 224-pixel model. The result (shorter side resized to ``size``, centre-cropped square, RGB, uint8) travels to the
model stages in the transient ``pixels`` column, which is never written to manifests or shards. The stage runs
inside each model actor, on the batch the actor is about to score (see ``pipeline.steps``): pixels never cross
a process.

Image bytes are hostile: the header's width x height is checked against ``max_pixels`` before any pixel is decoded
(``models.imaging.open_bounded``), so a decompression bomb is a per-sample drop (``decode:too_many_pixels``),
never gigabytes of memory.
"""

from __future__ import annotations

import dataclasses
import math

import polars as pl
import pyarrow as pa
from PIL import Image

from models.imaging import DEFAULT_MAX_PIXELS, ImageTooLarge, open_bounded
from stages.base import SampleBatch, Stage, StageParams, error_text, first_reason

PIXELS = "pixels"
_TOO_LARGE = ImageTooLarge.__name__ + ":"  # how a refused bomb reads in decode_error


def decode_square(data: bytes, size: int, draft: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode, convert to RGB, resize the shorter side to ``size`` (bicubic) and centre-crop a square.

    Raises ``ImageTooLarge`` without decoding when the header declares more than ``max_pixels`` pixels."""
    with open_bounded(data, max_pixels) as image:
        width, height = image.size
        scale = size / min(width, height)
        target = (max(size, math.ceil(width * scale)), max(size, math.ceil(height * scale)))
        if draft and image.format == "JPEG":
            image.draft("RGB", target)  # DCT-domain downscale to the nearest size at or above target
        image = image.convert("RGB")
    if image.size != target:
        image = image.resize(target, Image.Resampling.BICUBIC)
    left, top = (target[0] - size) // 2, (target[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def pixels_to_image(data: bytes, size: int) -> Image.Image:
    return Image.frombytes("RGB", (size, size), data)


@dataclasses.dataclass
class DecodeParams(StageParams):
    size: int = 224  # the largest input of the model stages that follow
    draft: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS  # images whose header declares more are refused before decoding


class DecodeStage(Stage):
    """Decode and resize the surviving images once, on CPU, for the model stages after it."""

    name = "decode"
    Params = DecodeParams
    columns = {"decode_error": pa.string(), "decode_size": pa.int32()}
    transient_columns = {PIXELS: pa.large_binary()}
    only_survivors = True

    def annotate(self, batch: SampleBatch) -> dict[str, list]:
        pixels, errors = [], []
        for data in batch.images:
            try:
                pixels.append(decode_square(data, self.params.size, self.params.draft,
                                            self.params.max_pixels).tobytes())
                errors.append("")
            except Exception as exc:  # noqa: BLE001 - a corrupt body is this sample's verdict
                pixels.append(None)
                errors.append(error_text(exc))
        return {PIXELS: pixels, "decode_error": errors, "decode_size": [self.params.size] * len(batch)}

    def reject_reason(self) -> pl.Expr:
        return first_reason((pl.col("decode_error").str.starts_with(_TOO_LARGE), "too_many_pixels"),
                            (pl.col("decode_error") != "", "undecodable_image"))


def batch_images(batch: SampleBatch, size: int, draft: bool = True) -> list[Image.Image]:
    """The batch's images as PIL images: from the decode stage's pixels, or decoded here if it did not run."""
    pixels = batch.annotation(PIXELS)
    sizes = batch.annotation("decode_size")
    images = []
    for i, data in enumerate(batch.images if pixels is None else pixels):
        if pixels is not None and data is not None:
            images.append(pixels_to_image(data, sizes[i]))
        else:
            images.append(decode_square(batch.images[i], size, draft))
    return images
