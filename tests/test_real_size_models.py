"""The shipped qwen-vl recipe with its real-size models (open_clip ViT-L-14, BLIP-large captioner and ITM filter
with random weights, built offline by ``models.real_size``) on real photos, on Ray's CPU actors: every model
column is written for the samples that reached the model stages, and ``vlcurate select`` re-applies thresholds
on the output."""

import math
import tarfile

import polars as pl
import pytest

from conftest import FLICKR, MYNTRA, ROOT, flickr_members, require, write_tar
from pipeline.config import load_config
from pipeline.run import run_curation, select_thresholds

RECIPE = ROOT / "configs" / "qwen-vl.yaml"
# A sample costs the BLIP vision tower (about 0.4 TFLOP at 384 px) once per synthetic caption and once more for
# the ITM filter, and ViT-L/14 once (0.2 TFLOP): on one CPU core each, a handful of samples from both data sets.
SAMPLES_PER_SHARD = {"flickr8k-00000.tar": (FLICKR, 2), "myntra-00000.tar": (MYNTRA, 2)}
# The rules drop the two Flickr8k photos (200-px thumbnails, under MIN_SIDE); the two product photos (about
# 1800x2400) reach the model stages.
REACHING_MODELS = 2
MIN_SIDE = 1000
NUM_CAPTIONS = 1
MAX_LENGTH = 8  # the prompt's four tokens ([DEC] a picture of) and up to four generated ones
MODEL_COLUMNS = ["clip_score", "capfilt_web_itm", "capfilt_synthetic", "capfilt_synthetic_itm"]


@pytest.fixture(scope="session")
def real_size_models():
    """Built once into the cache folder (``models.real_size.default_folder``), then reused across sessions; not
    built at all when the photos the test needs are absent."""
    from models.real_size import real_size_models

    for name, (data, _) in SAMPLES_PER_SHARD.items():
        require(data / name)
    return real_size_models()


def few_real_samples(folder):
    """Small shards holding the first samples of a Flickr8k and a Myntra shard; the number of samples."""
    folder.mkdir()
    total = 0
    for name, (data, count) in SAMPLES_PER_SHARD.items():
        write_tar(folder / name, flickr_members(require(data / name), count))
        total += count
    return total


def recipe_overrides(models):
    return [
        f"clip_score.pretrained={models['clip_pretrained']}",
        f"capfilt.captioner={models['captioner']}",
        f"capfilt.filter={models['filter']}",
        f"image_size.min_side={MIN_SIDE}",
        "clip_score.resources.num_gpus=0",
        "capfilt.resources.num_gpus=0",
        f"capfilt.num_captions={NUM_CAPTIONS}",
        f"capfilt.max_length={MAX_LENGTH}",
    ]


def reached_model_stages(manifests: pl.DataFrame) -> pl.DataFrame:
    reason = pl.col("drop_reason")
    return manifests.filter(reason.is_null() | reason.str.starts_with("clip_score") | reason.str.starts_with("capfilt"))


def check_model_columns(reached: pl.DataFrame) -> None:
    for row in reached.iter_rows(named=True):
        assert -1.0 <= row["clip_score"] <= 1.0 and math.isfinite(row["clip_score"])
        assert 0.0 <= row["capfilt_web_itm"] <= 1.0
        synthetic, scores = row["capfilt_synthetic"], row["capfilt_synthetic_itm"]
        assert len(synthetic) == len(scores) == NUM_CAPTIONS
        assert all(isinstance(text, str) and text for text in synthetic)
        assert all(0.0 <= p <= 1.0 for p in scores)
    assert reached["clip_score"].n_unique() == reached.height  # real scores, one per image-caption pair


def test_blip_tokenizer_has_the_hub_layout():
    """Cheap: no model is built. Special tokens at the hub tokenizer's ids, 30,524 entries, real-looking pieces."""
    from models.real_size import BLIP_BASE_TEXT, blip_processor, wordpiece_vocabulary

    processor = blip_processor()
    tokenizer = processor.tokenizer
    assert len(tokenizer) == len(wordpiece_vocabulary()) == BLIP_BASE_TEXT["vocab_size"] == 30524
    ids = {token: tokenizer.convert_tokens_to_ids(token)
           for token in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]")}
    assert ids == {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, "[DEC]": 30522,
                   "[ENC]": 30523}
    assert tokenizer.bos_token_id == BLIP_BASE_TEXT["bos_token_id"] and tokenizer.sep_token_id == 102
    encoded = tokenizer("A black dog is running in a grassy garden")["input_ids"]
    assert encoded[0] == 101 and encoded[-1] == 102 and 100 not in encoded
    assert tokenizer.decode(encoded, skip_special_tokens=True) == "a black dog is running in a grassy garden"
    assert processor.image_processor.size == {"height": 384, "width": 384}


def written_samples(output) -> int:
    count = 0
    for shard in (output / "shards").glob("*.tar"):
        with tarfile.open(shard) as archive:
            count += sum(member.name.endswith(".txt") for member in archive)
    return count


@pytest.mark.slow
def test_qwen_vl_recipe_with_real_size_models(ray_cluster, real_size_models, tmp_path):
    total = few_real_samples(tmp_path / "in")
    config = load_config(RECIPE, recipe_overrides(real_size_models))
    output = tmp_path / "out"
    result = run_curation(config, [str(tmp_path / "in")], str(output), progress=False)
    assert not result.failed and result.samples_processed == total

    manifests = pl.read_parquet(output / "manifests" / "*.parquet")
    reached = reached_model_stages(manifests)
    assert reached.height == REACHING_MODELS, manifests.select("key", "drop_reason").to_dicts()
    check_model_columns(reached)
    dropped_by_rules = manifests.filter(~pl.col("key").is_in(reached["key"].implode()))
    assert dropped_by_rules["drop_reason"].to_list() == ["image_size:too_small"] * 2
    assert all(dropped_by_rules[column].null_count() == 2 for column in MODEL_COLUMNS)  # never scored

    # Every caption passes a threshold of 0: all of them are kept, with what the stages computed unchanged.
    stats = select_thresholds(str(output), ["capfilt.itm_threshold=0.0"])
    after = pl.read_parquet(output / "manifests" / "*.parquet")
    assert stats["kept"] == after["kept"].sum() == REACHING_MODELS == written_samples(output)
    assert after.sort("key").select(MODEL_COLUMNS).equals(manifests.sort("key").select(MODEL_COLUMNS))
    kept = after.filter(pl.col("kept"))
    assert all(captions == [caption] for captions, caption in kept.select("output_captions", "caption").rows())

    # The best CLIP score alone passes a threshold at that score.
    best = float(reached["clip_score"].max())
    stats = select_thresholds(str(output), [f"clip_score.threshold={best}", "capfilt.itm_threshold=0.0"])
    after = pl.read_parquet(output / "manifests" / "*.parquet")
    assert stats["kept"] == 1 == written_samples(output)
    assert after.filter(pl.col("drop_reason") == "clip_score:low_score").height == REACHING_MODELS - 1
