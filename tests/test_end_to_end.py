"""The whole rule pipeline on a local Ray cluster over the real Flickr8k shards plus a shard of broken samples."""

import collections
import json
import shutil
import tarfile

import polars as pl
import pytest

from conftest import FLICKR, ROOT, flickr_members, require, write_tar
from pipeline.cli import funnel_from_manifests
from pipeline.config import ConfigError, load_config
from pipeline.run import run_curation, select_thresholds


def tar_members(path):
    with tarfile.open(path) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive if m.isfile()}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    require(FLICKR)
    folder = tmp_path_factory.mktemp("inputs")
    for shard in sorted(FLICKR.glob("*.tar")):
        shutil.copy(shard, folder / shard.name)
    # Three large-enough Flickr photos with their captions, under new keys (keys are unique across shards).
    good = [("copy-" + name, data) for name, data in flickr_members(FLICKR / "flickr8k-00003.tar", 3)]
    caption = good[1][1]
    write_tar(folder / "broken-samples.tar", good + [
        ("corrupt.jpg", b"\xff\xd8\xff\xe0 not really a jpeg"), ("corrupt.txt", caption),
        ("nocaption.jpg", good[0][1]), ("nocaption.json", b'{"url": "http://example.com/x.jpg"}'),
    ])
    return folder


@pytest.fixture(scope="module")
def curated(ray_cluster, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("curated")
    config = load_config(ROOT / "configs" / "qwen-vl-rules.yaml")
    result = run_curation(config, [str(inputs)], str(out), progress=False)
    return config, result, out


def test_statistics_add_up(curated):
    _, result, out = curated
    stats = json.loads((out / "stats.json").read_text())
    assert stats == result.stats
    assert stats["total"] == 1000 + 5 and stats["shards_completed"] == 5 and not stats["shards_failed"]
    assert stats["kept"] + sum(stats["dropped_by_reason"].values()) == stats["total"]
    assert stats["funnel"][0]["in"] == stats["total"] and stats["funnel"][-1]["out"] == stats["kept"]
    for before, after in zip(stats["funnel"], stats["funnel"][1:]):
        assert after["in"] == before["out"]
    assert sum(s["total"] for s in stats["per_shard"].values()) == stats["total"]
    # The funnel recounted from the manifests alone (vlcurate stats) agrees exactly.
    assert funnel_from_manifests(str(out))["funnel"] == stats["funnel"]


def test_manifests_have_one_row_per_input_sample(curated, inputs):
    _, _, out = curated
    manifests = pl.read_parquet(out / "manifests" / "*.parquet")
    for shard in inputs.glob("*.tar"):
        keys = {name.split(".", 1)[0] for name in tar_members(shard)}
        rows = manifests.filter(pl.col("shard") == str(shard))
        assert rows.height == len(keys) and set(rows["key"]) == keys
    assert manifests.select(pl.struct("shard", "key").is_unique().all()).item()
    assert (manifests["kept"] == manifests["drop_reason"].is_null()).all()


def test_kept_samples_are_written_once_with_identical_image_bytes(curated, inputs):
    _, _, out = curated
    manifests = pl.read_parquet(out / "manifests" / "*.parquet")
    kept_keys = collections.Counter()
    for shard in sorted(inputs.glob("*.tar")):
        source = tar_members(shard)
        written = tar_members(out / "shards" / shard.name)
        keys = [name[: -len(".jpg")] for name in written if name.endswith(".jpg")]
        kept_keys.update(keys)
        for key in keys:
            assert written[f"{key}.jpg"] == source[f"{key}.jpg"]  # never re-encoded
            row = manifests.filter((pl.col("key") == key) & (pl.col("shard") == str(shard))).row(0, named=True)
            assert written[f"{key}.txt"].decode() == row["caption"]
            metadata = json.loads(written[f"{key}.json"])
            assert metadata["vlcurate"]["caption_original"] == row["caption_original"]
            assert metadata["vlcurate"]["language_code"] == row["language_code"]
            if f"{key}.json" in source:  # the input metadata is carried over
                assert json.loads(source[f"{key}.json"]).items() <= metadata.items()
    assert set(kept_keys.values()) == {1}
    assert len(kept_keys) == manifests["kept"].sum()


def test_output_shards_load_with_webdataset(curated):
    import webdataset as wds

    _, result, out = curated
    urls = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg", "txt", "json"))
    assert len(samples) == result.stats["kept"]
    image, text, metadata = samples[0]
    assert image.size[0] > 0 and text and "vlcurate" in metadata


def test_corrupt_image_and_missing_caption_are_dropped_with_reasons(curated):
    _, _, out = curated
    rows = pl.read_parquet(out / "manifests" / "broken-samples.parquet")
    reasons = dict(zip(rows["key"], rows["drop_reason"]))
    assert reasons["corrupt"] == "image_size:undecodable_header"
    assert reasons["nocaption"] == "read:missing_caption"
    assert sum(r is None for r in reasons.values()) >= 1  # the good samples of that shard are kept


def test_rerun_skips_completed_shards_and_changes_nothing(curated, inputs):
    config, first, out = curated
    before = {p.name: p.read_bytes() for p in (out / "shards").glob("*.tar")}
    again = run_curation(config, [str(inputs)], str(out), progress=False)
    assert again.processed == 0 and again.skipped == 5
    assert again.stats == first.stats
    assert {p.name: p.read_bytes() for p in (out / "shards").glob("*.tar")} == before


def test_select_reapplies_thresholds_without_recomputing(curated, tmp_path):
    _, first, out = curated
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    manifests_before = pl.read_parquet(copy / "manifests" / "*.parquet")
    stats = select_thresholds(str(copy), ["image_size.min_side=100"])
    manifests_after = pl.read_parquet(copy / "manifests" / "*.parquet")
    assert stats["kept"] > first.stats["kept"]
    assert stats["kept"] == manifests_after["kept"].sum()
    # The scores are those computed by the run: only verdicts changed.
    scores = [c for c in manifests_before.columns if c not in ("kept", "drop_reason", "output_captions")]
    assert manifests_after.select(scores).equals(manifests_before.select(scores))
    written = sum(1 for p in (copy / "shards").glob("*.tar") for n in tar_members(p) if n.endswith(".jpg"))
    assert written == stats["kept"]
    assert "min_side: 100" in (copy / "config.yaml").read_text()


def test_select_refuses_settings_that_change_scores(curated):
    _, _, out = curated
    with pytest.raises(ConfigError, match="select can only change thresholds"):
        select_thresholds(str(out), ["language.allowed=[en]"])
