"""configs/datacomp-basic.yaml is DataComp's basic filter exactly: its stages, run the way a worker runs them,
agree sample by sample with a direct implementation of DataComp's rule on every real shard and on edge cases."""

import io
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from conftest import ROOT, SHARED_DATA, write_tar
from pipeline.config import load_config
from pipeline.curate import annotate_batch, apply_verdicts
from pipeline.shards import read_shard

RECIPE = ROOT / "configs" / "datacomp-basic.yaml"
REAL_SHARDS = sorted(SHARED_DATA.glob("*/*.tar"))


@pytest.fixture(scope="module")
def fasttext_model():
    """lid.176 loaded with the fasttext module itself, not through the project's wrapper."""
    import fasttext

    from models.langid import default_lid_path

    return fasttext.load_model(str(default_lid_path()))


def datacomp_keeps(caption: str, image: bytes, model) -> bool:
    """DataComp's basic filter on one sample: fastText top-1 English on the caption (newlines as spaces), more
    than 2 words (str.split) and 5 characters (len), shorter side >= 200 and aspect ratio <= 3."""
    labels, _ = model.predict(caption.replace("\n", " "), k=1)
    english = labels[0] == "__label__en"
    with Image.open(io.BytesIO(image)) as opened:
        width, height = opened.size
    shorter, longer = min(width, height), max(width, height)
    return english and len(caption.split()) > 2 and len(caption) > 5 and shorter >= 200 and longer / shorter <= 3.0


def shard_samples(shard: Path) -> dict[str, tuple[str, bytes]]:
    """key -> (caption, image bytes), read with tarfile."""
    captions, images = {}, {}
    with tarfile.open(shard) as archive:
        for member in archive:
            key, _, ext = member.name.partition(".")
            data = archive.extractfile(member).read()
            if ext == "txt":
                captions[key] = data.decode("utf-8")
            elif ext == "jpg":
                images[key] = data
    return {key: (captions[key], images[key]) for key in captions}


def recipe_keeps(shard: Path) -> dict[str, bool]:
    config = load_config(RECIPE)
    stages = [spec.build() for spec in config.enabled_stages]
    table = read_shard(str(shard), config.read)
    for position, stage in enumerate(stages):
        table, _ = annotate_batch(table, stage, stages[:position])
    table = apply_verdicts(table, stages)
    return dict(zip(table.column("key").to_pylist(), table.column("kept").to_pylist()))


def assert_agrees(shard: Path, model) -> dict[str, bool]:
    expected = {key: datacomp_keeps(caption, image, model) for key, (caption, image) in shard_samples(shard).items()}
    actual = recipe_keeps(shard)
    assert actual.keys() == expected.keys()
    disagreements = {key: (actual[key], expected[key]) for key in expected if actual[key] != expected[key]}
    assert not disagreements, f"{shard.name}: recipe vs DataComp (kept, kept) differ on {disagreements}"
    return expected


@pytest.mark.parametrize("shard", REAL_SHARDS, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_recipe_agrees_with_datacomp_on_every_real_shard(shard, fasttext_model):
    expected = assert_agrees(shard, fasttext_model)
    assert expected  # the shard has samples


def test_real_shards_are_present_or_skipped():
    if not REAL_SHARDS:
        pytest.skip(f"{SHARED_DATA} is absent (real data lives in ../shared/data)")
    assert len(REAL_SHARDS) >= 2


def jpeg(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 60)).save(buffer, format="JPEG")
    return buffer.getvalue()


# (caption, width, height): each sits on one side of one of DataComp's limits.
EDGE_CASES = [
    ("A dog runs on the beach", 300, 300),  # kept
    ("A big dog", 300, 300),  # 3 words, 9 characters: kept when fastText says English
    ("big dog", 300, 300),  # 2 words
    ("a b c", 300, 300),  # 3 words, 5 characters
    ("a b cd", 300, 300),  # 3 words, 6 characters
    ("  two words  ", 300, 300),  # 13 characters with the spaces, 2 words
    ("a\u00a0dog\u00a0sleeping", 300, 300),  # no-break spaces separate words for str.split
    ("a\u3000dog\u3000sleeping", 300, 300),  # ideographic spaces too
    ("A dog\nruns on\nthe beach", 300, 300),  # newlines: spaces for fastText, separators for words
    ("一只小狗在草地上奔跑", 300, 300),  # Chinese: one "word"
    ("Un chien court sur la plage", 300, 300),  # French
    ("ADIDAS Mens Red T-shirt", 300, 300),  # title-cased English that fastText calls another language
    ("A dog runs on the beach", 199, 400),  # shorter side below 200
    ("A dog runs on the beach", 200, 600),  # aspect ratio exactly 3
    ("A dog runs on the beach", 200, 601),  # aspect ratio just above 3
    ("A dog runs on the beach", 900, 300),  # 3, landscape
    ("A dog runs on the beach", 901, 300),  # just above 3, landscape
]


def test_recipe_agrees_with_datacomp_on_edge_cases(tmp_path, fasttext_model):
    members = []
    for i, (caption, width, height) in enumerate(EDGE_CASES):
        members += [(f"edge{i:03d}.jpg", jpeg(width, height)), (f"edge{i:03d}.txt", caption.encode("utf-8"))]
    expected = assert_agrees(write_tar(tmp_path / "edges.tar", members), fasttext_model)
    kept = [expected[f"edge{i:03d}"] for i in range(len(EDGE_CASES))]
    # Both sides of every limit are exercised.
    assert kept[0] and not kept[2] and not kept[3] and not kept[5]
    assert not kept[12] and kept[13] and not kept[14] and kept[15] and not kept[16]


def test_recipe_has_no_second_opinion_and_reads_the_caption_as_written():
    language = next(spec for spec in load_config(RECIPE).stages if spec.kind == "language").params
    assert not language.lingua and not language.lowercase and language.as_written
    assert language.top_k == 1 and language.require_top_allowed and language.allowed == ["en"]
