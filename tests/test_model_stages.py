"""Model stages with tiny models built by the tests: loading through the real code paths, scoring real
Flickr8k photos, decode in draft mode, and a run on Ray with `vlcurate select` changing the CLIP threshold."""

import io
import json
import shutil
import tarfile

import numpy as np
import polars as pl
import pytest
from PIL import Image

from conftest import FLICKR, MYNTRA, photos_and_captions, require
from helpers import curate
from pipeline.config import ConfigError, parse_config
from pipeline.run import run_curation, select_thresholds
from stages.image_decode import decode_square
from models.tiny import TINY_CLIP


@pytest.fixture(scope="session")
def tiny(tiny_models):
    return tiny_models


def real_photos(shard, limit):
    return photos_and_captions(shard, limit)


def clip_entry(tiny, **extra):
    return {"stage": "clip_score", "model": TINY_CLIP, "pretrained": tiny["clip"]["checkpoint"],
            "model_config": tiny["clip"]["model_config"], "resources": {"num_gpus": 0, "batch_size": 4}, **extra}


def capfilt_entry(tiny, **extra):
    return {"stage": "capfilt", "captioner": tiny["blip"]["captioner"], "filter": tiny["blip"]["filter"],
            "resources": {"num_gpus": 0, "batch_size": 4}, "num_captions": 2, "max_length": 12, "image_size": 32,
            **extra}


def test_draft_decode_matches_full_decode_size_and_content():
    photos, _ = real_photos(require(MYNTRA / "myntra-00000.tar"), 3)
    for data in photos:
        draft = decode_square(data, 224, draft=True)
        full = decode_square(data, 224, draft=False)
        assert draft.size == full.size == (224, 224) and draft.mode == full.mode == "RGB"
        difference = np.abs(np.asarray(draft, dtype=np.int16) - np.asarray(full, dtype=np.int16)).mean()
        assert difference < 4.0  # same picture: a few levels of resampling noise on 0-255
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (300, 400))
            assert max(image.size) < 2400 / 2  # the decoder really scaled down in the DCT domain


def test_clip_score_loads_checkpoint_and_local_dir_alike(tiny):
    photos, captions = real_photos(require(FLICKR / "flickr8k-00002.tar"), 6)
    from_checkpoint = curate([clip_entry(tiny)], captions, photos)
    local_dir = {"stage": "clip_score", "model": "local-dir:" + tiny["clip"]["local_dir"], "pretrained": "",
                 "resources": {"num_gpus": 0}}
    from_dir = curate([local_dir], captions, photos)
    scores = [r["clip_score"] for r in from_checkpoint]
    assert all(-1.0 <= s <= 1.0 for s in scores) and len(set(scores)) == 6
    assert scores == pytest.approx([r["clip_score"] for r in from_dir], abs=1e-5)


def test_clip_score_is_cosine_similarity_of_normalised_embeddings(tiny):
    import open_clip
    import torch

    photos, captions = real_photos(require(FLICKR / "flickr8k-00002.tar"), 2)
    rows = curate([clip_entry(tiny, image_size=32)], captions, photos)
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_CLIP, pretrained=tiny["clip"]["checkpoint"])
    tokenizer = open_clip.get_tokenizer(TINY_CLIP)
    with torch.no_grad():
        image = preprocess(decode_square(photos[0], 32)).unsqueeze(0)
        a = model.encode_image(image)
        b = model.encode_text(tokenizer([captions[0]]))
    expected = torch.nn.functional.cosine_similarity(a, b).item()
    assert rows[0]["clip_score"] == pytest.approx(expected, abs=1e-5)


def test_missing_pretrained_is_a_config_error(tiny):
    with pytest.raises(ConfigError, match="needs 'pretrained'"):
        parse_config({"stages": [clip_entry(tiny, pretrained="")]}, [])


def test_capfilt_writes_synthetic_captions_and_scores_every_candidate(tiny):
    photos, captions = real_photos(require(FLICKR / "flickr8k-00002.tar"), 4)
    rows = curate([capfilt_entry(tiny, itm_threshold=0.0)], captions, photos)
    for row in rows:
        assert len(row["capfilt_synthetic"]) == 2 and len(row["capfilt_synthetic_itm"]) == 2
        assert all(0.0 <= p <= 1.0 for p in [row["capfilt_web_itm"], *row["capfilt_synthetic_itm"]])
        assert not any(text.startswith("a picture of") for text in row["capfilt_synthetic"])
        assert row["drop_reason"] is None and row["output_captions"] == [row["caption"]]
    again = curate([capfilt_entry(tiny, itm_threshold=0.0)], captions, photos)
    assert [r["capfilt_synthetic"] for r in again] == [r["capfilt_synthetic"] for r in rows]  # reproducible


def test_capfilt_policy_decides_the_written_captions(tiny):
    from stages.model_scores import CapFiltParams, CapFiltStage

    row = {"caption": "web", "capfilt_web_itm": 0.2, "capfilt_synthetic": ["syn a", "syn b", "syn c"],
           "capfilt_synthetic_itm": [0.7, 0.4, 0.9]}
    replace = CapFiltStage(CapFiltParams(policy="replace"))
    extra = CapFiltStage(CapFiltParams(policy="extra_pairs"))
    assert replace.output_captions(row) == ["syn c"]  # the noisy web caption is replaced by the best synthetic
    assert extra.output_captions(row) == ["syn c", "syn a"]
    assert extra.output_captions({**row, "capfilt_web_itm": 0.8}) == ["web", "syn c", "syn a"]
    assert replace.output_captions({**row, "capfilt_synthetic_itm": [0.1, 0.1, 0.1]}) is None


def test_model_stages_on_ray_then_select_a_new_clip_threshold(ray_cluster, tiny, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("flickr8k-00002.tar", "flickr8k-00003.tar"):
        shutil.copy(require(FLICKR / name), inputs / name)
    raw = {"name": "tiny-models", "stages": [
        {"stage": "html"}, {"stage": "length"}, {"stage": "image_size"},
        {"stage": "decode", "size": 32},
        clip_entry(tiny, image_size=32),
        capfilt_entry(tiny, itm_threshold=0.0),
    ]}
    config = parse_config(raw, [])
    out = tmp_path / "out"
    result = run_curation(config, [str(inputs)], str(out), progress=False)
    assert not result.failed
    manifests = pl.read_parquet(out / "manifests" / "*.parquet")
    reached = manifests.filter(pl.col("drop_reason").is_null() | pl.col("drop_reason").str.starts_with("clip_score")
                               | pl.col("drop_reason").str.starts_with("capfilt"))
    assert reached.height > 100
    assert reached["clip_score"].null_count() == 0 and reached["capfilt_web_itm"].null_count() == 0
    assert (reached["capfilt_synthetic"].list.len() == 2).all()
    too_small = manifests.filter(pl.col("drop_reason") == "image_size:too_small")
    assert too_small.height > 0 and too_small["clip_score"].null_count() == too_small.height  # never scored
    assert "pixels" not in manifests.columns

    median = float(reached["clip_score"].median())
    stats = select_thresholds(str(out), [f"clip_score.threshold={median}"])
    after = pl.read_parquet(out / "manifests" / "*.parquet")
    assert stats["kept"] == (reached["clip_score"] >= median).sum()
    assert after["clip_score"].equals(manifests["clip_score"])  # nothing recomputed
    assert (after.filter(pl.col("drop_reason") == "clip_score:low_score")["clip_score"] < median).all()
    kept_written = 0
    for shard in (out / "shards").glob("*.tar"):
        with tarfile.open(shard) as archive:
            for member in archive:
                if member.name.endswith(".json"):
                    metadata = json.loads(archive.extractfile(member).read())
                    assert metadata["vlcurate"]["clip_score"] >= median
                    kept_written += 1
    assert kept_written == stats["kept"]


def test_top_fraction_keeps_exactly_that_share_over_the_run(ray_cluster, tiny, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("flickr8k-00002.tar", "flickr8k-00003.tar"):
        shutil.copy(require(FLICKR / name), inputs / name)
    config = parse_config({"stages": [{"stage": "image_size"}, clip_entry(tiny, image_size=32, top_fraction=0.3)]},
                          [])
    result = run_curation(config, [str(inputs)], str(tmp_path / "out"), progress=False)
    manifests = pl.read_parquet(tmp_path / "out" / "manifests" / "*.parquet")
    scored = manifests["clip_score"].drop_nulls()
    assert result.stats["kept"] == manifests["kept"].sum() == int(np.ceil(0.3 * scored.len()))
