"""Image stages read the header only: real Flickr8k and large product photos, plus broken and hostile files."""

import io
import struct
import tarfile
import zlib

import pytest
from PIL import Image

from conftest import FLICKR, MYNTRA, require
from helpers import curate

IMAGE_STAGES = [{"stage": "image_size"}, {"stage": "aspect_ratio"}]


def real_images(shard, limit):
    images = []
    with tarfile.open(shard) as archive:
        for member in archive:
            if member.name.endswith(".jpg"):
                images.append(archive.extractfile(member).read())
                if len(images) == limit:
                    break
    return images


def png_chunk(kind, payload):
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header(width, height):
    """A PNG whose header claims the given size, followed by a few bytes of pixel data (far too few)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + png_chunk(b"IEND", b""))


def jpeg(width, height):
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (120, 30, 200)).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_real_photos_sizes_match_their_metadata():
    flickr = real_images(require(FLICKR / "flickr8k-00003.tar"), 20)
    myntra = real_images(require(MYNTRA / "myntra-00000.tar"), 5)
    rows = curate(IMAGE_STAGES, ["caption"] * 25, flickr + myntra)
    for row, data in zip(rows, flickr + myntra):
        with Image.open(io.BytesIO(data)) as image:
            assert (row["image_width"], row["image_height"]) == image.size
        assert row["image_format"] == "JPEG"
        expected = None
        if min(image.size) < 200:
            expected = "image_size:too_small"
        elif max(image.size) / min(image.size) > 3:
            expected = "aspect_ratio:extreme_aspect_ratio"
        assert row["drop_reason"] == expected
    assert all(r["drop_reason"] is None for r in rows[20:])  # 1800x2400 product photos pass


def test_small_flickr_images_are_dropped_by_the_shorter_side():
    images = real_images(require(FLICKR / "flickr8k-00000.tar"), 10)
    rows = curate(IMAGE_STAGES, ["caption"] * 10, images)
    small = [r for r in rows if min(r["image_width"], r["image_height"]) < 200]
    assert small and all(r["drop_reason"] == "image_size:too_small" for r in small)


def test_header_only_broken_and_hostile_images():
    good = jpeg(400, 300)
    images = [
        b"",  # zero-byte file
        b"this is not an image",
        good[: len(good) // 3],  # truncated body: the header is intact, and no stage decodes pixels
        png_header(100_000, 100_000),  # decompression bomb: refused from the header alone
        png_header(640, 480),  # a PNG named .jpg (the helper names every image .jpg)
        jpeg(1000, 200),  # 5:1 panorama
        jpeg(300, 300),
    ]
    rows = curate(IMAGE_STAGES, ["caption"] * len(images), images)
    assert [r["drop_reason"] for r in rows] == [
        "image_size:empty_file",
        "image_size:undecodable_header",
        "image_size:truncated",  # the header is intact: found from the missing end-of-image marker
        "image_size:too_many_pixels",
        "image_size:extension_mismatch",  # a PNG named .jpg
        "aspect_ratio:extreme_aspect_ratio",
        None,
    ]
    assert rows[0]["image_error"] == "empty_file"
    assert rows[3]["image_width"] == 100_000 and rows[4]["image_format"] == "PNG"
    assert [r["image_complete"] for r in rows[2:]] == [False, True, True, True, True]
    assert rows[5]["aspect_ratio"] == pytest.approx(5.0)


def test_extension_mismatch_can_be_allowed():
    rows = curate([{"stage": "image_size"}], ["c"], [png_header(640, 480)])
    assert rows[0]["drop_reason"] == "image_size:extension_mismatch"
    rows = curate([{"stage": "image_size", "require_matching_extension": False}], ["c"], [png_header(640, 480)])
    assert rows[0]["drop_reason"] is None


def test_thresholds_are_configurable():
    images = [jpeg(150, 150), jpeg(700, 200)]
    entries = [{"stage": "image_size", "min_side": 100}, {"stage": "aspect_ratio", "max_ratio": 4.0}]
    assert [r["drop_reason"] for r in curate(entries, ["c", "c"], images)] == [None, None]


def test_aspect_ratio_reads_headers_itself_when_image_size_is_off():
    images = [jpeg(900, 200), jpeg(300, 200), b"junk"]
    alone = curate([{"stage": "aspect_ratio"}], ["c"] * 3, images)
    after = curate(IMAGE_STAGES, ["c"] * 3, images)
    assert [r["aspect_ratio"] for r in alone] == [r["aspect_ratio"] for r in after] == [4.5, 1.5, None]
    assert alone[2]["drop_reason"] == "aspect_ratio:undecodable_header"


def test_an_unreadable_header_is_described_the_same_way_on_every_run():
    """PIL names the in-memory file it could not read (with its address): the manifest gets a stable text."""
    from stages.image_header import read_header

    garbage = b"neither JPEG, PNG, WebP nor GIF: plain text where an image should be"
    first, second = read_header(garbage)[3], read_header(bytes(garbage))[3]
    assert first == second == "UnidentifiedImageError: cannot identify image file <object>"
