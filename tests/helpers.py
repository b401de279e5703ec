"""Running stages on in-memory samples, the way a Ray worker runs them on a shard."""

import pyarrow as pa

from pipeline.config import parse_config
from pipeline.curate import annotate_batch, finish_batch
from pipeline.shards import SAMPLE_SCHEMA


def sample_table(captions, images=None):
    images = images if images is not None else [b""] * len(captions)
    rows = [
        {"key": f"s{i:05d}", "position": i, "image": img, "image_ext": "jpg", "metadata_json": None,
         "caption_original": cap, "caption": cap, "read_error": None}
        for i, (cap, img) in enumerate(zip(captions, images))
    ]
    return pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)


def curate(stage_entries, captions, images=None):
    """Annotate with the given stage entries (dicts as in a recipe) and return the finished table as dicts."""
    config = parse_config({"stages": stage_entries}, [])
    stages = [spec.build() for spec in config.enabled_stages]
    table = sample_table(captions, images)
    for position, stage in enumerate(stages):
        table, _ = annotate_batch(table, stage, stages[:position])
    return finish_batch(table, stages).drop_columns(["image"]).to_pylist()


def reasons(stage_entries, captions, images=None):
    return [row["drop_reason"] for row in curate(stage_entries, captions, images)]


def cleaned(stage_entries, captions):
    return [row["caption"] for row in curate(stage_entries, captions)]
