"""Every registered stage keeps the stage contract, so that a new filter is one class, one registry line and one
recipe entry, and this file covers it; and a recipe's resources never change what a run computes."""

import dataclasses

import pyarrow as pa
import pytest

from conftest import FLICKR, ROOT, photos_and_captions, require
from helpers import curate, sample_table
from pipeline.config import ConfigError, load_config, parse_config
from pipeline.curate import StageContractError, annotate_batch
from stages import STAGES, Stage


def recipe_entry(kind: str, tiny_models) -> dict:
    """The smallest recipe entry that builds the stage offline (model stages get the tiny test models)."""
    entry = {"stage": kind}
    if kind == "clip_score":
        entry.update(model=tiny_models["clip_name"], pretrained=tiny_models["clip"]["checkpoint"],
                     model_config=tiny_models["clip"]["model_config"], image_size=32)
    elif kind == "capfilt":
        entry.update(captioner=tiny_models["blip"]["captioner"], filter=tiny_models["blip"]["filter"],
                     image_size=32, num_captions=1, max_length=8)
    if STAGES[kind].uses_actor_pool:
        entry["resources"] = {"num_gpus": 0, "batch_size": 4}
    return entry


def recipe_entries(kind: str, tiny_models) -> list[dict]:
    """The stage's entry after the stages it reads from (semantic_dedup reads clip_score's saved embeddings)."""
    if kind == "semantic_dedup":
        return [{**recipe_entry("clip_score", tiny_models), "save_embeddings": True}, recipe_entry(kind, tiny_models)]
    return [recipe_entry(kind, tiny_models)]


@pytest.mark.parametrize("kind", sorted(STAGES))
def test_stage_declares_its_settings_and_fills_every_column_on_real_samples(kind, tiny_models):
    cls = STAGES[kind]
    params = {f.name for f in dataclasses.fields(cls.Params)}
    assert cls.thresholds <= params, f"{kind}: thresholds {sorted(cls.thresholds - params)} are not settings"
    assert not params & {f.name for f in dataclasses.fields(cls.Resources)}, f"{kind}: a setting is also a resource"
    assert cls.columns, f"{kind} declares no manifest column"
    photos, captions = photos_and_captions(require(FLICKR / "flickr8k-00002.tar"), 6)
    rows = curate(recipe_entries(kind, tiny_models), captions, photos)
    assert len(rows) == 6
    assert all(set(cls.columns) <= set(row) for row in rows)
    filled = [column for column in cls.columns if any(row[column] is not None for row in rows)]
    assert filled, f"{kind}: every column is empty on real samples"
    assert all(row.get("error_stage") is None for row in rows), [row.get("error_message") for row in rows]


@pytest.mark.parametrize("kind", sorted(STAGES))
def test_stage_travels_to_a_ray_task_as_its_settings(kind, tiny_models):
    """A stage pickles as its settings and resources and is built again on the other side (loaded models and
    compiled helpers never travel), judging the same way."""
    import pickle

    spec = parse_config({"name": "travel", "stages": recipe_entries(kind, tiny_models)}, []).stages[-1]
    stage = spec.build()
    again = pickle.loads(pickle.dumps(stage))
    assert type(again) is type(stage) and again is not stage
    assert again.params == stage.params and again.resources == stage.resources
    assert str(again.reject_reason()) == str(stage.reject_reason())


def test_a_resolved_stage_sends_a_task_only_its_own_shards_verdicts():
    from stages.dedup import DedupParams, ResolvedDedupStage

    rows = {source: pa.table({"position": [0]}) for source in ("a.tar", "b.tar", "c.tar")}
    stage = ResolvedDedupStage(DedupParams(), rows)
    stage.resources = dataclasses.replace(stage.resources, num_cpus=0.5)
    narrowed = stage.for_shards({"b.tar", "z.tar"})
    assert type(narrowed) is ResolvedDedupStage and narrowed.resources.num_cpus == 0.5
    assert list(narrowed.duplicates) == ["b.tar"] and list(stage.duplicates) == ["a.tar", "b.tar", "c.tar"]
    import pickle

    assert list(pickle.loads(pickle.dumps(narrowed)).duplicates) == ["b.tar"]


class MisspeltStage(Stage):
    name = "misspelt"
    columns = {"misspelt_score": pa.float32()}

    def annotate(self, batch):
        return {"mispelt_score": [1.0] * len(batch)}


def test_a_stage_returning_undeclared_columns_is_a_clear_error():
    stage = MisspeltStage(MisspeltStage.Params())
    with pytest.raises(StageContractError, match="declares"):
        annotate_batch(sample_table(["a caption"]), stage, [])


def test_resources_are_not_fingerprinted_but_precision_is():
    qwen = ROOT / "configs" / "qwen-vl.yaml"
    base = load_config(qwen)
    for override in ("clip_score.resources.pool_size=4", "capfilt.resources.batch_size=8",
                     "clip_score.resources.device=cpu", "html.resources.num_cpus=0.5"):
        changed = load_config(qwen, [override])
        assert changed.fingerprint() == base.fingerprint(), override
        assert changed.to_dict() != base.to_dict()  # saved with the output, for the record
    assert load_config(qwen, ["clip_score.precision=fp32"]).fingerprint() != base.fingerprint()
    by_name = {s.name: s for s in load_config(qwen, ["clip_score.resources.pool_size=4"]).stages}
    assert by_name["clip_score"].resources.pool_size == 4 and by_name["clip_score"].build().resources.pool_size == 4


def test_a_resource_written_as_a_setting_names_the_block_to_use():
    with pytest.raises(ConfigError, match=r"'resources' block .*--set clip_score.resources.num_gpus"):
        parse_config({"stages": [{"stage": "clip_score", "pretrained": "x.pt", "num_gpus": 0}]}, [])
    with pytest.raises(ConfigError, match="unknown setting"):
        parse_config({"stages": [{"stage": "html", "resources": {"num_gpu": 1}}]}, [])


def test_an_actor_pool_is_fixed_or_grows_between_bounds():
    def pool(value):
        entry = {"stage": "clip_score", "pretrained": "x.pt", "resources": {"pool_size": value}}
        return parse_config({"stages": [entry]}, []).stages[0].resources.pool_bounds

    assert pool(3) == (3, 3) and pool([1, 4]) == (1, 4)
    for wrong in ([3, 1], [0, 2], [1, 2, 3], 0, "two"):
        with pytest.raises(ConfigError, match="pool_size"):
            pool(wrong)
