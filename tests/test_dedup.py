"""Deduplication: the perceptual hash on real photos, the global search, synth's duplicate noise, and duplicates
across shards, refreshes and `vlcurate select` (tiny generated shards: no shared data needed for the runs)."""

import io
import json
import random
import tarfile
import zlib

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from PIL import Image, ImageDraw

from conftest import FLICKR, MYNTRA, photos_and_captions, require, write_tar
from pipeline.config import parse_config
from pipeline.cli import main as vlcurate
from pipeline.dedup import (SAMPLE_SCHEMA, crop_pairs, crop_residuals, duplicate_groups, find_duplicates, keepers,
                            near_pairs, preference_order, thumbnail_array)
from pipeline.run import manifests_frame, run_curation, select_thresholds
from pipeline.synth import DUPLICATE_TYPES, SynthOptions, draw, jpeg_bytes, write_synth
from stages.base import SampleBatch
from stages.dedup import (KEY_BITS, THUMBNAIL_SIDE, WINDOWS, DedupParams, DedupStage, caption_hash,
                          evaluation_images, fingerprint, hamming, perceptual_hash, perceptual_hashes)


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def picture(seed: int, size: int = 96) -> Image.Image:
    """A smooth random picture: distinct seeds give perceptually distinct images."""
    grid = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC)


def resized(image: Image.Image, scale: float) -> Image.Image:
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)


# ------------------------------------------------------------------------------------ hashing


def test_phash_is_deterministic_and_finds_reencoded_and_resized_photos():
    photos, _ = photos_and_captions(sorted(require(FLICKR).glob("*.tar"))[0], limit=30)
    hashes = [perceptual_hash(p) for p in photos]
    assert hashes == [perceptual_hash(p) for p in photos]
    assert all(0 <= h < 2**63 for h in hashes)
    for photo, original in zip(photos, hashes):
        image = Image.open(io.BytesIO(photo))
        assert hamming(original, perceptual_hash(jpeg(image, quality=65))) <= 4
        assert hamming(original, perceptual_hash(jpeg(resized(image, 0.6)))) <= 4
    distances = [hamming(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1:]]
    assert min(distances) > 8, "distinct photos must stay far apart"
    for photo in photos[:10]:
        luma, chroma = perceptual_hashes(photo)
        copy = perceptual_hashes(jpeg(resized(Image.open(io.BytesIO(photo)), 0.7), quality=70))
        assert hamming(luma, copy[0]) <= 3 and hamming(chroma, copy[1]) <= 6


def flat_scene(background: tuple, colour: tuple, polygon: list[tuple[float, float]]) -> bytes:
    """One flat shape (corners as shares of the side) on a flat background, 224 pixels square."""
    image = Image.new("RGB", (224, 224), background)
    ImageDraw.Draw(image).polygon([(224 * x, 224 * y) for x, y in polygon], fill=colour)
    return jpeg(image)


def test_the_chroma_hash_tells_apart_scenes_the_luma_hash_cannot():
    """A large red triangle at the top of a blue background and a small blue diamond at the bottom of a red one
    have about the same luma (red and blue are about as bright): only the colour check keeps them apart."""
    red, blue = (220, 30, 30), (40, 85, 220)  # luma 86.8 and 87.0
    triangle = flat_scene(blue, red, [(0.5, 0.05), (0.75, 0.5), (0.25, 0.5)])
    diamond = flat_scene(red, blue, [(0.5, 0.62), (0.6, 0.73), (0.5, 0.84), (0.4, 0.73)])
    a, b = perceptual_hashes(triangle), perceptual_hashes(diamond)
    rule = DedupParams()
    assert hamming(a[0], b[0]) <= rule.max_hamming  # a near pair by luma alone
    assert hamming(a[1], b[1]) > 2 * max(rule.max_chroma_hamming, rule.crop_chroma_hamming)


def cropped(data: bytes, sides: tuple[float, float, float, float]) -> bytes:
    """The image cut by these shares of its width or height: left, top, right, bottom."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    width, height = image.size
    box = (round(sides[0] * width), round(sides[1] * height), width - round(sides[2] * width),
           height - round(sides[3] * height))
    return jpeg(image.crop(box))


def closest_window(query: bytes, original: bytes) -> tuple[int, int]:
    """(pHash bits, chroma bits) from the query's whole-image hashes to the original's closest window."""
    a, b = fingerprint(query), fingerprint(original)
    return min((hamming(a.phash, w), hamming(a.chroma, c)) for w, c in zip(b.windows, b.window_chroma))


def test_window_hashes_find_crops_of_real_photos_that_the_whole_image_hash_misses():
    photos, _ = photos_and_captions(sorted(require(FLICKR).glob("*.tar"))[1], limit=40)
    rng = random.Random(3)
    whole, windowed = [], []
    for photo in photos:
        sides = tuple(rng.uniform(0.0, 0.10) for _ in range(4))
        copy = cropped(photo, sides)
        whole.append(hamming(perceptual_hash(copy), perceptual_hash(photo)))
        luma, chroma = closest_window(copy, photo)
        windowed.append(luma <= 6 and chroma <= 10)
    assert sum(d <= 3 for d in whole) <= 4, "a crop moves the whole-image pHash"
    assert sum(windowed) >= 34, f"only {sum(windowed)} of 40 crops within 6 bits of a window"
    found = fingerprint(photos[0])
    assert len(found.windows) == len(found.window_chroma) == WINDOWS
    assert found == fingerprint(photos[0]) and (found.phash, found.chroma) == perceptual_hashes(photos[0])
    assert bin(found.probe).count("1") == 7 and found.probe & ~KEY_BITS == 0
    # A distinct photo is never within the crop distances of another's windows.
    for other in photos[1:8]:
        luma, chroma = closest_window(other, photos[0])
        assert not (luma <= 6 and chroma <= 10)


def test_crop_search_finds_exactly_the_probed_pairs_within_the_distances():
    """Every pair (query, window) within the distances whose key bits differ only where the query's probe bits
    are set, compared with a brute-force check of all pairs."""
    rng = np.random.default_rng(7)
    count, windows_per = 400, 4
    hashes = rng.integers(0, 2**63, count, dtype=np.int64).view(np.uint64)
    windows = rng.integers(0, 2**63, (count, windows_per), dtype=np.int64).view(np.uint64)
    chroma = rng.integers(0, 4, count).astype(np.uint64)
    window_chroma = rng.integers(0, 4, (count, windows_per)).astype(np.uint64)
    key_positions = [p for p in range(64) if KEY_BITS >> p & 1]
    probes = np.array([sum(1 << int(p) for p in rng.choice(key_positions, 7, replace=False)) for _ in range(count)],
                      dtype=np.uint64)
    other_positions = [p for p in range(63) if not KEY_BITS >> p & 1]
    for query in range(200):  # plant windows near queries: flips in probed key bits, outside the key, and a few
        owner, slot = int(rng.integers(0, count)), int(rng.integers(0, windows_per))  # in unprobed key bits
        probed_bits = [p for p in key_positions if int(probes[query]) >> p & 1]
        unprobed_bits = [p for p in key_positions if not int(probes[query]) >> p & 1]
        flips = list(rng.choice(probed_bits, int(rng.integers(0, 4)), replace=False))
        flips += list(rng.choice(other_positions, int(rng.integers(0, 5)), replace=False))
        if query % 5 == 0:
            flips.append(int(rng.choice(unprobed_bits)))
        value = int(hashes[query])
        for bit in flips:
            value ^= 1 << int(bit)
        windows[owner, slot] = value
    for max_distance, max_chroma in ((4, -1), (6, 1), (0, -1)):
        i, j, d, matched = crop_pairs(hashes.view(np.int64), probes.view(np.int64), windows.view(np.int64),
                                      max_distance, chroma.view(np.int64), window_chroma.view(np.int64), max_chroma,
                                      block=97)
        distance = np.bitwise_count(hashes[:, None, None] ^ windows[None])
        probed = ((hashes[:, None, None] ^ windows[None]) & np.uint64(KEY_BITS) & ~probes[:, None, None]) == 0
        within = (distance <= max_distance) & probed
        if max_chroma >= 0:
            within &= np.bitwise_count(chroma[:, None, None] ^ window_chroma[None]) <= max_chroma
        within[np.arange(count), np.arange(count)] = False
        expected = np.argwhere(within.any(axis=2))
        assert len(expected) > (20 if max_distance else 2)
        assert np.array_equal(np.stack([i, j], axis=1), expected)
        closest = np.where(within, distance, 99).min(axis=2)
        assert np.array_equal(d, closest[i, j])
        assert np.array_equal(matched, (within << np.arange(windows_per)).sum(axis=2)[i, j])


def png_declaring(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb's header)."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def test_unhashable_images_get_a_reason_and_their_exact_fingerprint():
    good = jpeg(picture(1))
    images = [good, b"not an image", good[: len(good) // 4], png_declaring(60_000, 60_000)]
    table = pa.table({"key": [f"k{i}" for i in range(4)], "caption": ["a cat"] * 4,
                      "image": pa.array(images, pa.binary())})
    values = DedupStage(DedupParams()).annotate(SampleBatch(table, [0, 1, 2, 3]))
    assert values["dedup_phash"][0] is not None and values["dedup_error"][0] is None
    for i in (1, 2, 3):
        assert values["dedup_phash"][i] is None and values["dedup_error"][i]
    assert values["dedup_error"][3].startswith("ImageTooLarge")
    assert all(len(h) == 64 for h in values["dedup_sha256"])
    assert values["dedup_chroma_hash"][0] is not None and values["dedup_chroma_hash"][1:] == [None] * 3
    assert values["dedup_duplicate_of"] == [None] * 4


def test_caption_hash_normalises_case_spacing_and_punctuation():
    assert caption_hash("A  Dog, running!") == caption_hash("a dog running") is not None
    assert caption_hash("a dog") != caption_hash("a cat")
    assert caption_hash("!!!") is None and caption_hash(None) is None


def test_settings_are_checked():
    with pytest.raises(ValueError, match="max_hamming"):
        DedupStage(DedupParams(max_hamming=40))
    with pytest.raises(ValueError, match="max_chroma_hamming"):
        DedupStage(DedupParams(max_chroma_hamming=-2))
    with pytest.raises(ValueError, match="scope"):
        DedupStage(DedupParams(scope="pixels"))
    with pytest.raises(ValueError, match="crop_hamming"):
        DedupStage(DedupParams(crop_hamming=33))
    with pytest.raises(ValueError, match="crop_chroma_hamming"):
        DedupStage(DedupParams(crop_chroma_hamming=65))
    with pytest.raises(ValueError, match="crop_max_residual"):
        DedupStage(DedupParams(crop_max_residual=-0.5))


# ------------------------------------------------------------------------------------ the search


@pytest.mark.parametrize("max_distance", [0, 1, 3, 4, 6])
def test_multi_index_search_finds_exactly_the_pairs_within_the_distance(max_distance):
    rng = np.random.default_rng(max_distance)
    hashes = rng.integers(0, 2**63, 1200, dtype=np.int64)
    for target in range(300):  # near and far copies of other hashes
        value = int(hashes[rng.integers(300, 1200)])
        for bit in rng.choice(63, int(rng.integers(0, max_distance + 3)), replace=False):
            value ^= 1 << int(bit)
        hashes[target] = value
    groups = rng.integers(0, 3, len(hashes))
    bits = hashes.view(np.uint64)
    within = np.bitwise_count(bits[:, None] ^ bits[None, :]) <= max_distance
    colours = rng.integers(0, 8, len(hashes))  # a second hash of 3 bits: within 1 bit of each other, or not
    colours_near = np.bitwise_count(colours[:, None] ^ colours[None, :]) <= 1
    for group_values, second in ((None, None), (groups, None), (None, colours), (groups, colours)):
        expected = within if group_values is None else within & (groups[:, None] == groups[None, :])
        expected = expected if second is None else expected & colours_near
        lows, highs = near_pairs(hashes, max_distance, group_values, second, 1, block=5000)
        brute_lows, brute_highs = np.nonzero(np.triu(expected, 1))
        assert np.array_equal(lows, brute_lows) and np.array_equal(highs, brute_highs)


def test_a_sample_is_kept_unless_a_kept_better_one_is_near_it():
    # 0 ~ 1 ~ 2 but 0 is not near 2: 1 goes (near 0), 2 stays (its only near neighbour was dropped)
    assert keepers(4, np.array([0, 1]), np.array([1, 2])).tolist() == [0, 0, 2, 3]


def samples_frame(rows):
    """Rows of the whole-image columns of ``SAMPLE_SCHEMA`` (no window hashes: no crop matching)."""
    names = list(SAMPLE_SCHEMA)[: len(rows[0])]
    return preference_order(pl.DataFrame(rows, schema={n: SAMPLE_SCHEMA[n] for n in names}, orient="row"))


def test_the_best_scored_copy_is_kept_then_the_first_shard():
    rows = [("a", "A", 0, "x", 1, 15, 7, None, 0.2), ("b", "B", 0, "y", 1, 15, 7, None, 0.9),
            ("c", "C", 0, "z", 2, 15 ^ 0b11, 7 ^ 0b1, None, None), ("c", "C", 1, "w", 3, 2**62, 7, None, None)]
    duplicates = find_duplicates(samples_frame(rows), 4)
    assert duplicates.sort("shard").rows() == [("A", 0, "b/y", "exact", 0), ("C", 0, "b/y", "near", 2)]
    assert find_duplicates(samples_frame(rows), -1).rows() == [("A", 0, "b/y", "exact", 0)]
    unscored = [row[:8] + (None,) for row in rows]
    assert find_duplicates(samples_frame(unscored), 4).sort("shard")["dedup_duplicate_of"].to_list() == ["a/x"] * 2
    # The colour check: the near copy's chroma hash is 1 bit away; with a limit of 0 bits it is a distinct image.
    assert find_duplicates(samples_frame(rows), 4, max_chroma_hamming=1).height == 2
    assert find_duplicates(samples_frame(rows), 4, max_chroma_hamming=0).rows() == [("A", 0, "b/y", "exact", 0)]


# ------------------------------------------------------------------------------------ synth


def test_synth_duplicate_noise_names_its_originals_and_leaves_other_samples_alone(tmp_path):
    plain = write_synth(tmp_path / "plain", SynthOptions(samples=60, size=64, noise={"html": 0.2}))
    zero = write_synth(tmp_path / "zero", SynthOptions(samples=60, size=64,
                                                       noise={"html": 0.2, "duplicate_resized": 0.0}))
    assert plain[0].read_bytes() == zero[0].read_bytes()
    noise = {"html": 0.2, **{name: 0.1 for name in DUPLICATE_TYPES}}
    noisy = write_synth(tmp_path / "noisy", SynthOptions(samples=60, size=64, noise=noise))
    with tarfile.open(plain[0]) as a, tarfile.open(noisy[0]) as b:
        before = {m.name: a.extractfile(m).read() for m in a}
        after = {m.name: b.extractfile(m).read() for m in b}
    kinds = set()
    for name, data in after.items():
        if not name.endswith(".json"):
            continue
        truth = json.loads(data)["synth"]
        key = name[:-5]
        if "duplicate" in truth:
            kinds.add(truth["duplicate"]["kind"])
            original = truth["duplicate"]["of"]
            assert original < key and "duplicate" not in json.loads(after[f"{original}.json"])["synth"]
            assert after[f"{key}.txt"] == after[f"{original}.txt"]
            if truth["duplicate"]["kind"] == "exact":
                assert after[f"{key}.jpg"] == after[f"{original}.jpg"]
        elif "lookalike_of" in truth:
            kinds.add("lookalike")
        else:  # not drawn as duplicate noise: the same sample as without it
            assert all(after[f"{key}.{ext}"] == before[f"{key}.{ext}"] for ext in ("jpg", "txt", "json"))
    assert kinds == {"exact", "reencoded", "resized", "cropped", "lookalike"}


# ------------------------------------------------------------------------------------ runs


def shard(path, samples):
    """A shard of (key, JPEG bytes) samples, each with a caption naming its key."""
    members = []
    for key, image in samples:
        members += [(f"{key}.jpg", image), (f"{key}.txt", f"a picture number {key}".encode())]
    return str(write_tar(path, members))


def dedup_config(*overrides):
    return parse_config({"name": "dedup", "stages": [{"stage": "dedup"}]}, list(overrides))


def verdicts(output):
    frame = pl.read_parquet(f"{output}/manifests/*.parquet")
    frame = frame.with_columns(pl.col("shard").str.split("/").list.last())
    return {(row["shard"], row["key"]): (row["drop_reason"], row["dedup_duplicate_of"])
            for row in frame.iter_rows(named=True)}


def members(output, stem):
    with tarfile.open(f"{output}/shards/{stem}.tar") as archive:
        return sorted(m.name for m in archive)


def outputs(output):
    """What a consumer reads: shard bytes, manifests and stats without timing."""
    shards = {p.name: p.read_bytes() for p in sorted((output / "shards").glob("*.tar"))}
    manifests = {p.name: pl.read_parquet(p) for p in sorted((output / "manifests").glob("*.parquet"))}
    stats = json.loads((output / "stats.json").read_text())
    stats.pop("timing")
    return shards, manifests, stats


def assert_same_outputs(a, b):
    shards_a, manifests_a, stats_a = outputs(a)
    shards_b, manifests_b, stats_b = outputs(b)
    assert shards_a == shards_b and stats_a == stats_b
    assert manifests_a.keys() == manifests_b.keys()
    for name in manifests_a:
        assert manifests_a[name].equals(manifests_b[name]), name


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory):
    """a: three distinct pictures; b: a byte copy and a resized copy of two of them, a new picture and a byte
    copy of that new picture."""
    folder = tmp_path_factory.mktemp("dedup-inputs")
    pictures = [jpeg(picture(seed)) for seed in range(4)]
    a = shard(folder / "a.tar", [("k0", pictures[0]), ("k1", pictures[1]), ("k2", pictures[2])])
    b = shard(folder / "b.tar", [("k0", pictures[1]), ("k1", jpeg(resized(picture(2), 0.7))), ("k2", pictures[3]),
                                 ("k3", pictures[3])])
    return a, b


def test_duplicates_across_two_shards_keep_exactly_one(ray_cluster, two_shards, tmp_path):
    result = run_curation(dedup_config(), list(two_shards), str(tmp_path / "out"), progress=False)
    found = verdicts(tmp_path / "out")
    assert found == {
        ("a.tar", "k0"): (None, None), ("a.tar", "k1"): (None, None), ("a.tar", "k2"): (None, None),
        ("b.tar", "k0"): ("dedup:exact_duplicate", "a/k1"), ("b.tar", "k1"): ("dedup:near_duplicate", "a/k2"),
        ("b.tar", "k2"): (None, None), ("b.tar", "k3"): ("dedup:exact_duplicate", "b/k2"),
    }
    assert result.stats["kept"] == 4
    assert result.stats["dropped_by_reason"] == {"dedup:exact_duplicate": 2, "dedup:near_duplicate": 1}
    assert members(tmp_path / "out", "b") == ["k2.jpg", "k2.json", "k2.txt"]
    assert len(members(tmp_path / "out", "a")) == 9
    # The search's fingerprints stay in the manifest; the sample's .json carries the image's hashes only.
    with tarfile.open(tmp_path / "out" / "shards" / "b.tar") as archive:
        written = json.loads(archive.extractfile("k2.json").read())["vlcurate"]
    assert written["dedup_phash"] is not None and written["dedup_sha256"]
    assert not set(written) & DedupStage.manifest_only
    assert pl.read_parquet(tmp_path / "out" / "manifests" / "b.parquet")["dedup_thumbnail"].dtype == pl.Binary


def test_a_refresh_drops_new_copies_and_equals_one_fresh_run(ray_cluster, two_shards, tmp_path):
    a, _ = two_shards
    out = tmp_path / "out"
    run_curation(dedup_config(), [a], str(out), progress=False)
    kept_a = (out / "shards" / "a.tar").read_bytes()
    copy = jpeg(Image.open(io.BytesIO(jpeg(picture(1)))), quality=70)  # a re-encoded copy of a/k1
    later = shard(tmp_path / "c.tar", [("k0", copy), ("k1", jpeg(picture(9)))])
    run_curation(dedup_config(), [a, later], str(out), progress=False)
    found = verdicts(out)
    assert found[("c.tar", "k0")] == ("dedup:near_duplicate", "a/k1") and found[("a.tar", "k1")] == (None, None)
    assert (out / "shards" / "a.tar").read_bytes() == kept_a  # the old shard keeps its copy, untouched
    run_curation(dedup_config(), [a, later], str(tmp_path / "fresh"), progress=False)
    assert_same_outputs(out, tmp_path / "fresh")

    # A new shard that ranks first (its stem sorts before "a") takes the group over: the old shard is rewritten.
    earlier = shard(tmp_path / "0.tar", [("k0", jpeg(picture(1)))])
    run_curation(dedup_config(), [a, later, earlier], str(out), progress=False)
    found = verdicts(out)
    assert found[("a.tar", "k1")] == ("dedup:exact_duplicate", "0/k0")
    assert found[("c.tar", "k0")] == ("dedup:near_duplicate", "0/k0")
    assert "k1.jpg" not in members(out, "a")
    run_curation(dedup_config(), [a, later, earlier], str(tmp_path / "fresh3"), progress=False)
    assert_same_outputs(out, tmp_path / "fresh3")


def test_select_with_a_new_max_hamming_equals_a_fresh_run(ray_cluster, two_shards, tmp_path):
    run_curation(dedup_config(), list(two_shards), str(tmp_path / "out"), progress=False)
    stats = select_thresholds(str(tmp_path / "out"), ["dedup.max_hamming=-1"])
    assert stats["shards_reselected"] == 1 and stats["dropped_by_reason"] == {"dedup:exact_duplicate": 2}
    run_curation(dedup_config("dedup.max_hamming=-1"), list(two_shards), str(tmp_path / "exact"), progress=False)
    assert_same_outputs(tmp_path / "out", tmp_path / "exact")
    select_thresholds(str(tmp_path / "out"), ["dedup.max_hamming=4"])
    run_curation(dedup_config(), list(two_shards), str(tmp_path / "near"), progress=False)
    assert_same_outputs(tmp_path / "out", tmp_path / "near")


def test_scope_image_and_caption_needs_equal_captions_too():
    rows = [("a", "A", 0, "x", 1, 15, 7, 100, None), ("a", "A", 1, "y", 1, 15, 7, 200, None),
            ("a", "A", 2, "z", 2, 15 ^ 1, 7, 100, None)]
    assert find_duplicates(samples_frame(rows), 3).height == 2
    assert find_duplicates(samples_frame(rows), 3, "image_and_caption").rows() == [("A", 2, "a/x", "near", 1)]


def test_find_duplicates_names_crops_with_their_closest_window():
    photos, _ = photos_and_captions(sorted(require(FLICKR).glob("*.tar"))[2], limit=6)
    images = photos + [cropped(photos[1], (0.06, 0.02, 0.03, 0.08)), cropped(photos[4], (0.03, 0.07, 0.08, 0.02))]
    table = pa.table({"key": [f"k{i}" for i in range(len(images))], "caption": [""] * len(images),
                      "image": pa.array(images, pa.binary())})
    values = DedupStage(DedupParams()).annotate(SampleBatch(table, list(range(len(images)))))
    frame = preference_order(pl.DataFrame({
        "stem": ["s"] * len(images), "shard": ["S"] * len(images), "position": list(range(len(images))),
        "key": [f"k{i}" for i in range(len(images))], "sha": list(range(len(images))),
        "phash": values["dedup_phash"], "chroma": values["dedup_chroma_hash"], "caption_hash": [None] * len(images),
        "score": [None] * len(images), "probe": values["dedup_probe_bits"], "windows": values["dedup_window_phash"],
        "window_chroma": values["dedup_window_chroma"], "thumbnail": [None] * len(images),
        "mean_colour": values["dedup_colour"],
        "window_colour": values["dedup_window_colour"]}, schema=SAMPLE_SCHEMA))
    found = find_duplicates(frame, 3, max_chroma_hamming=6, crop_hamming=6, crop_chroma_hamming=10)
    assert found.select("position", "dedup_duplicate_of", "dedup_match").rows() == [(6, "s/k1", "crop"),
                                                                                 (7, "s/k4", "crop")]
    assert all(0 <= d <= 6 for d in found["dedup_distance"])
    assert find_duplicates(frame, 3, max_chroma_hamming=6).height == 0  # the whole-image hash alone misses them
    # Their thumbnails align: the same verdicts with the check on (without thumbnails, pairs are not checked).
    thumbnails = pl.Series("thumbnail", values["dedup_thumbnail"], dtype=pl.Binary)
    checked = find_duplicates(frame.with_columns(thumbnails), 3,
                              max_chroma_hamming=6, crop_hamming=6, crop_chroma_hamming=10,
                              crop_max_residual=DedupParams().crop_max_residual)
    assert checked.equals(found)


def annotated_frame(images: list[bytes]) -> pl.DataFrame:
    """The search input of images annotated by the dedup stage (one shard "s", keys k0, k1, ...)."""
    keys = [f"k{i}" for i in range(len(images))]
    table = pa.table({"key": keys, "caption": [""] * len(images), "image": pa.array(images, pa.binary())})
    values = DedupStage(DedupParams()).annotate(SampleBatch(table, list(range(len(images)))))
    return preference_order(pl.DataFrame({
        "stem": ["s"] * len(images), "shard": ["S"] * len(images), "position": list(range(len(images))),
        "key": keys, "sha": list(range(len(images))), "phash": values["dedup_phash"],
        "chroma": values["dedup_chroma_hash"], "caption_hash": [None] * len(images), "score": [None] * len(images),
        "probe": values["dedup_probe_bits"], "windows": values["dedup_window_phash"],
        "window_chroma": values["dedup_window_chroma"],
        "thumbnail": pl.Series(values["dedup_thumbnail"], dtype=pl.Binary), "mean_colour": values["dedup_colour"],
        "window_colour": values["dedup_window_colour"]},
        schema=SAMPLE_SCHEMA))


def test_aligned_thumbnails_keep_crops_and_part_look_alike_product_shots():
    """Three catalogue photos of black shoes shot the same way: each one's pHash is within the crop distances of
    a window of another's, so the hashes alone merge them; their aligned thumbnails do not match, while crops
    of them still do."""
    wanted = {"myntra-00001.tar": ["myntra00898", "myntra00763"], "myntra-00002.tar": ["myntra00897"]}
    photos = []
    for name, keys in wanted.items():
        with tarfile.open(require(MYNTRA / name)) as archive:
            photos += [archive.extractfile(f"{key}.jpg").read() for key in keys]
    rng = random.Random(4)
    crops = [cropped(photo, tuple(rng.uniform(0.0, 0.10) for _ in range(4))) for photo in photos]
    frame = annotated_frame(photos + crops)
    rule = DedupParams()
    hashes_only = find_duplicates(frame, rule.max_hamming, max_chroma_hamming=rule.max_chroma_hamming,
                                  crop_hamming=rule.crop_hamming, crop_chroma_hamming=rule.crop_chroma_hamming)
    assert {"s/k0", "s/k1", "s/k2"} & set(hashes_only.filter(pl.col("position") < 3)["dedup_duplicate_of"])
    found = find_duplicates(frame, rule.max_hamming, max_chroma_hamming=rule.max_chroma_hamming,
                            crop_hamming=rule.crop_hamming, crop_chroma_hamming=rule.crop_chroma_hamming,
                            crop_max_residual=rule.crop_max_residual)
    assert found.select("position", "dedup_duplicate_of", "dedup_match").rows() == [
        (3, "s/k0", "crop"), (4, "s/k1", "crop"), (5, "s/k2", "crop")]


def test_crop_residuals_are_small_only_for_the_box_a_crop_was_cut_from():
    original = jpeg(picture(5, size=160))
    copy = cropped(original, (0.08, 0.01, 0.04, 0.09))
    _, thumbnails = thumbnail_array(pl.Series([fingerprint(original).thumbnail, fingerprint(copy).thumbnail,
                                               fingerprint(jpeg(picture(6, size=160))).thumbnail]))
    assert thumbnails.shape == (3, THUMBNAIL_SIDE, THUMBNAIL_SIDE)
    every = (1 << WINDOWS) - 1
    residuals = crop_residuals(thumbnails[[1, 2, 1]], thumbnails[[0, 0, 0]], np.array([every, every, 0]))
    assert residuals[0] < 3 < 20 < residuals[1]
    assert residuals[2] == np.inf  # no window matched


@pytest.fixture(scope="module")
def evaluation_folder(tmp_path_factory):
    """A PNG of picture 1 (another encoding of a/k1 and b/k0) and a crop of picture 3 (b/k2 and b/k3)."""
    folder = tmp_path_factory.mktemp("evaluation")
    (folder / "sub").mkdir()
    picture(1).save(folder / "one.png")
    (folder / "sub" / "three.jpg").write_bytes(cropped(jpeg(picture(3)), (0.04, 0.06, 0.02, 0.05)))
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_evaluation_images_are_read_from_a_folder_or_a_glob(evaluation_folder):
    assert [name for name, _ in evaluation_images(str(evaluation_folder))] == ["one.png", "sub/three.jpg"]
    assert [name for name, _ in evaluation_images(f"{evaluation_folder}/*.png")] == ["one.png"]
    assert evaluation_images("") == []
    with pytest.raises(ValueError, match="no files"):
        evaluation_images(str(evaluation_folder / "missing" / "*.jpg"))


def test_samples_that_duplicate_evaluation_images_are_dropped(ray_cluster, two_shards, evaluation_folder, tmp_path,
                                                              capsys):
    out = tmp_path / "out"
    run_curation(dedup_config(f"dedup.evaluation={evaluation_folder}"), list(two_shards), str(out), progress=False)
    found = verdicts(out)
    assert found == {
        ("a.tar", "k0"): (None, None), ("a.tar", "k1"): ("dedup:evaluation_duplicate", "evaluation/one.png"),
        ("a.tar", "k2"): (None, None),
        ("b.tar", "k0"): ("dedup:evaluation_duplicate", "evaluation/one.png"),
        ("b.tar", "k1"): ("dedup:near_duplicate", "a/k2"),
        ("b.tar", "k2"): ("dedup:evaluation_duplicate", "evaluation/sub/three.jpg"),
        ("b.tar", "k3"): ("dedup:evaluation_duplicate", "evaluation/sub/three.jpg"),
    }
    assert members(out, "b") == []
    groups = duplicate_groups(manifests_frame(str(out)))
    assert groups["groups"] == 1 and groups["group_sizes"] == {"2": 1}
    assert groups["evaluation_duplicates"] == 4 and groups["evaluation_images_matched"] == 2

    # Without evaluation images (select re-applies it from the manifests): the same as a fresh run without them.
    select_thresholds(str(out), ["dedup.evaluation="])
    run_curation(dedup_config(), list(two_shards), str(tmp_path / "plain"), progress=False)
    assert_same_outputs(out, tmp_path / "plain")


def test_select_with_a_new_crop_residual_equals_a_fresh_run(ray_cluster, two_shards, evaluation_folder, tmp_path):
    """The crop of picture 3 among the evaluation images matches b/k2 on its hashes and its thumbnail; with no
    residual allowed, the thumbnail check parts them (the thumbnails come from the manifests)."""
    out = tmp_path / "out"
    run_curation(dedup_config(f"dedup.evaluation={evaluation_folder}"), list(two_shards), str(out), progress=False)
    assert verdicts(out)[("b.tar", "k2")] == ("dedup:evaluation_duplicate", "evaluation/sub/three.jpg")
    select_thresholds(str(out), ["dedup.crop_max_residual=0"])
    found = verdicts(out)
    assert found[("b.tar", "k2")] == (None, None)
    assert found[("b.tar", "k3")] == ("dedup:exact_duplicate", "b/k2")
    fresh = tmp_path / "fresh"
    run_curation(dedup_config(f"dedup.evaluation={evaluation_folder}", "dedup.crop_max_residual=0"),
                 list(two_shards), str(fresh), progress=False)
    assert_same_outputs(out, fresh)


def test_stats_explain_and_report_show_duplicate_groups(ray_cluster, two_shards, tmp_path, capsys):
    from pipeline.report import write_report

    out = str(tmp_path / "out")
    run_curation(dedup_config(), list(two_shards), out, progress=False)
    capsys.readouterr()
    assert vlcurate(["stats", out]) == 0
    printed = capsys.readouterr().out
    assert "duplicate groups: 3 (a kept sample and 3 duplicates: exact 2, near 1)" in printed
    assert vlcurate(["stats", out, "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)["duplicate_groups"]
    assert groups["group_sizes"] == {"2": 3} and groups["by_match"] == {"exact": 2, "near": 1}

    assert vlcurate(["explain", out, "k3"]) == 0  # only b has a k3: an exact copy of b/k2
    lines = capsys.readouterr().out.splitlines()
    assert "DROPPED (dedup:exact_duplicate)" in next(line for line in lines if line.startswith("verdict:"))
    dedup_line = next(line for line in lines if line.strip().startswith("dedup "))
    assert "dedup:exact_duplicate" in dedup_line and "dedup_duplicate_of='b/k2'" in dedup_line
    assert "[16 values]" in dedup_line and "dedup_thumbnail=<400 bytes>" in dedup_line
    assert vlcurate(["explain", out, "k2"]) == 0  # a/k2 is kept, b/k2 keeps its copy b/k3
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("dedup ")]
    assert len(lines) == 2 and all(line.split()[1] == "pass" for line in lines)

    page = write_report(out).read_text()
    section = page[page.index("Duplicate groups"):]
    assert section.count("<h3>") == 3 and "a/k1 (2 samples)" in section
    assert section.count('class="thumb"') == 6  # each group: its kept sample and its duplicate
    assert "k1: near" in section


def test_one_picture_in_another_colour_is_not_a_duplicate_but_its_copies_are():
    """The hashes see where light and dark parts are, not their colour: the same scene drawn in another colour
    matches them, and only the mean colour parts it from a re-encoded or resized copy."""
    def picture(colour: str) -> Image.Image:
        scene = {"shape": "circle", "colour": colour, "size": "large", "position": "center", "background": "blue"}
        return draw(scene, 256, 192, random.Random(3))

    white = picture("white")
    images = [jpeg_bytes(white), jpeg_bytes(picture("yellow")), jpeg_bytes(white, quality=70),
              jpeg_bytes(white.resize((180, 135)))]
    frame = annotated_frame(images)
    params = DedupParams()
    defaults = dict(max_chroma_hamming=params.max_chroma_hamming, crop_hamming=params.crop_hamming,
                    crop_chroma_hamming=params.crop_chroma_hamming, crop_max_residual=params.crop_max_residual)
    colour_blind = find_duplicates(frame, params.max_hamming, **defaults)
    assert set(colour_blind["position"]) == {1, 2, 3}  # the yellow one too
    found = find_duplicates(frame, params.max_hamming, **defaults, max_colour_distance=params.max_colour_distance,
                            crop_colour_distance=params.crop_colour_distance)
    assert found.select("position", "dedup_duplicate_of").rows() == [(2, "s/k0"), (3, "s/k0")]
