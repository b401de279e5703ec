"""Real WebDataset clients read what a run writes: the `webdataset` library and Ray Data's reader see exactly the
manifests' kept samples, with the input's image bytes and the output captions."""

import json
import shutil
import tarfile

import polars as pl
import pytest

from conftest import FLICKR, ROOT, require
from pipeline.config import load_config
from pipeline.run import run_curation


@pytest.fixture(scope="module")
def curated(ray_cluster, tmp_path_factory):
    inputs = tmp_path_factory.mktemp("inputs")
    for name in ("flickr8k-00000.tar", "flickr8k-00001.tar"):
        shutil.copy(require(FLICKR / name), inputs / name)
    out = tmp_path_factory.mktemp("out")
    config = load_config(ROOT / "configs" / "qwen-vl-rules.yaml")  # keeps about a third of these photos
    result = run_curation(config, [str(inputs)], str(out), progress=False)
    assert not result.failed
    kept = pl.read_parquet(out / "manifests" / "*.parquet").filter(pl.col("kept"))
    assert 0 < kept.height < result.stats["total"]
    return inputs, out, kept


def input_images(inputs) -> dict[str, bytes]:
    images = {}
    for shard in sorted(inputs.glob("*.tar")):
        with tarfile.open(shard) as archive:
            for member in archive:
                if member.name.endswith(".jpg"):
                    images[member.name[:-4]] = archive.extractfile(member).read()
    return images


def test_webdataset_library_reads_the_kept_samples(curated):
    import webdataset as wds

    inputs, out, kept = curated
    originals = input_images(inputs)
    urls = [str(path) for path in sorted((out / "shards").glob("*.tar"))]
    seen = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        seen[sample["__key__"]] = sample
    expected = dict(zip(kept["key"].to_list(), kept["output_captions"].to_list()))
    assert set(seen) == set(expected)
    for key, sample in seen.items():
        assert sample["jpg"] == originals[key]
        assert sample["txt"].decode("utf-8") == expected[key][0]
        assert "vlcurate" in json.loads(sample["json"])  # the input's metadata plus vlcurate's results


def test_ray_data_reads_the_kept_samples(curated):
    import ray

    inputs, out, kept = curated
    originals = input_images(inputs)
    rows = ray.data.read_webdataset(str(out / "shards"), decoder=None).take_all()
    assert sorted(row["__key__"] for row in rows) == sorted(kept["key"].to_list())
    assert all(row["jpg"] == originals[row["__key__"]] for row in rows)
