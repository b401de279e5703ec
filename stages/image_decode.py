"""Decoding the images that survived the cheap stages, for the model stages (run by the model actors).

JPEGs are decoded in PIL's draft mode: the decoder scales by 1/2, 1/4 or 1/8 in the DCT domain to the smallest
size that is still at least the requested one, so a 2400-pixel product photo is never decoded at full size for
a 224-pixel model. The result (shorter side resized to ``size``, centre-cropped square, RGB, uint8) travels to the
model stages in the transient ``pixels`` column, which is never written to manifests or shards. The stage runs
inside each model actor, on the batch the actor is about to score (see ``pipeline.steps``): pixels never cross
a process.

When the model actor running the stage is on CUDA (``resources.on_device``, on by default), JPEGs are decoded on
the device by nvJPEG instead (``models.imaging.decode_jpegs_on_device``) and stay there, in a per-process store
(``HELD_PIXELS``) that the transient ``device_pixels`` column points into; every image the device decoder does
not take (not a JPEG, CMYK, a stream it refuses) is decoded on the CPU exactly as above, so its pixels and its
verdict are the CPU's.

Image bytes are hostile: the header's width x height is checked against ``max_pixels`` before any pixel is decoded
(``models.imaging.open_bounded``), so a decompression bomb is a per-sample drop (``decode:too_many_pixels``),
never gigabytes of memory; on the device path too, the header is checked before a stream reaches nvJPEG.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import polars as pl
import pyarrow as pa
from PIL import Image

from models.imaging import DEFAULT_MAX_PIXELS, ImageTooLarge, open_bounded
from stages.base import SampleBatch, Stage, StageParams, StageResources, error_text, first_reason

PIXELS = "pixels"
DEVICE_PIXELS = "device_pixels"  # handles into HELD_PIXELS for the images decoded on the device
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


@dataclasses.dataclass
class DecodeResources(StageResources):
    on_device: bool = True  # in a model actor on CUDA, decode JPEGs there (nvJPEG); PIL for what it refuses


class HeldPixels:
    """Images decoded on the device, held for the model stage of the same actor: the decode stage's transient
    ``device_pixels`` column stores their handles. Emptied once the actor has scored the batch."""

    def __init__(self):
        self._tensors: list = []

    def hold(self, tensor) -> int:
        self._tensors.append(tensor)
        return len(self._tensors) - 1

    def get(self, handle: int):
        return self._tensors[handle]

    def release(self) -> None:
        self._tensors = []

    def __len__(self) -> int:
        return len(self._tensors)


HELD_PIXELS = HeldPixels()  # one per process: pixels never leave the actor that decoded them


class DecodeStage(Stage):
    """Decode and resize the surviving images once, for the model stages after it: on CPU, or with nvJPEG on the
    device of the model actor running it (``decoding_on``)."""

    name = "decode"
    Params = DecodeParams
    Resources = DecodeResources
    columns = {"decode_error": pa.string(), "decode_size": pa.int32()}
    transient_columns = {PIXELS: pa.large_binary(), DEVICE_PIXELS: pa.int64()}
    only_survivors = True

    def __init__(self, params: DecodeParams):
        super().__init__(params)
        self.device: str | None = None  # set by ``decoding_on`` while a model actor on CUDA runs the stage

    @contextlib.contextmanager
    def decoding_on(self, device: str | None):
        """While the block runs, JPEGs are decoded on ``device`` (None, or ``resources.on_device`` false: on the
        CPU) and held there for the model stage; the held images are released when it ends."""
        self.device = device if self.resources.on_device else None
        try:
            yield
        finally:
            self.device = None
            HELD_PIXELS.release()

    def annotate(self, batch: SampleBatch) -> dict[str, list]:
        datas = batch.images
        on_device = [None] * len(datas)
        if self.device is not None:
            from models.imaging import decode_jpegs_on_device

            on_device = decode_jpegs_on_device(datas, self.params.size, self.device, self.params.max_pixels)
        pixels, handles, errors = [], [], []
        for data, tensor in zip(datas, on_device):
            if tensor is not None:
                pixels.append(None)
                handles.append(HELD_PIXELS.hold(tensor))
                errors.append("")
                continue
            handles.append(None)
            try:
                pixels.append(decode_square(data, self.params.size, self.params.draft,
                                            self.params.max_pixels).tobytes())
                errors.append("")
            except Exception as exc:  # noqa: BLE001 - a corrupt body is this sample's verdict
                pixels.append(None)
                errors.append(error_text(exc))
        return {PIXELS: pixels, DEVICE_PIXELS: handles, "decode_error": errors,
                "decode_size": [self.params.size] * len(batch)}

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
