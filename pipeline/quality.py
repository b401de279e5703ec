"""Curation quality against `vlcurate synth`'s ground truth: which injected noise was dropped, and whether the
written captions truly describe their images."""

from __future__ import annotations

import json
import re

import polars as pl

from pipeline.run import manifests_frame
from pipeline.shards import expand_inputs, read_shard
from pipeline.synth import COLOURS, NOISE_EXPECTED_DROP, SHAPES


def ground_truth(inputs: str) -> pl.DataFrame:
    rows = []
    for shard in expand_inputs([inputs]):
        table = read_shard(shard.url).select(["key", "metadata_json"])
        for key, metadata in zip(table.column("key").to_pylist(), table.column("metadata_json").to_pylist()):
            truth = json.loads(metadata)["synth"]
            rows.append({"shard": shard.url, "key": key, "noise": noise_label(truth), **{
                k: truth[k] for k in ("shape", "colour", "background", "language", "true_caption")}})
    return pl.DataFrame(rows)


def noise_label(truth: dict) -> str:
    """The sample's noise type; duplicate noise (a copy of an earlier sample, or a look-alike) comes first."""
    if "duplicate" in truth:
        return f"duplicate_{truth['duplicate']['kind']}"
    if "lookalike_of" in truth:
        return "lookalike"
    return truth["noise"] or "clean"


def describes(caption: str | None, truth: dict) -> bool:
    """A caption describes a scene when it names the scene's shape, colour and background colour (in English or
    Chinese) and no other shape."""
    if not caption:
        return False
    text = caption.lower()
    words = set(re.findall(r"[a-z]+", text))
    shape_en, shape_zh = truth["shape"], SHAPES[truth["shape"]]
    colour_zh, background_zh = COLOURS[truth["colour"]][0], COLOURS[truth["background"]][0]
    other_shapes = {s for s in SHAPES if s != shape_en} & words
    english = shape_en in words and truth["colour"] in words and truth["background"] in words and not other_shapes
    chinese = shape_zh in caption and colour_zh in caption and background_zh in caption
    return english or chinese


def joined(output: str, inputs: str) -> pl.DataFrame:
    """Ground truth of every input sample beside its manifest row."""
    manifests = manifests_frame(output).collect()
    columns = [c for c in ("key", "kept", "drop_reason", "caption", "output_captions") if c in manifests.columns]
    stem = pl.col("shard").str.split("/").list.last()  # the same shard, however its path was written
    manifests = manifests.with_columns(stem.alias("shard_name")).select("shard_name", *columns)
    truth = ground_truth(inputs).with_columns(stem.alias("shard_name"))
    return truth.join(manifests, on=["shard_name", "key"], how="left")


def drop_quality(frame: pl.DataFrame) -> dict:
    """Per noise type: how many, how many dropped; overall precision and recall of the drop decision."""
    per_type = {}
    for noise, group in frame.group_by("noise"):
        noise = noise[0]
        dropped = int((~group["kept"]).sum())
        per_type[noise] = {"samples": group.height, "dropped": dropped, "dropped_share": dropped / group.height,
                           "should_drop": NOISE_EXPECTED_DROP.get(noise, False)}
    should = frame["noise"].map_elements(lambda n: NOISE_EXPECTED_DROP.get(n, False), return_dtype=pl.Boolean)
    dropped = ~frame["kept"]
    true_drops = int((should & dropped).sum())
    return {"per_type": dict(sorted(per_type.items())),
            "precision": true_drops / max(1, int(dropped.sum())),
            "recall": true_drops / max(1, int(should.sum()))}


def caption_truth(frame: pl.DataFrame) -> float:
    """Share of the kept samples whose written caption describes their image."""
    kept = frame.filter(pl.col("kept"))
    if kept.height == 0:
        return float("nan")
    hits = 0
    for row in kept.to_dicts():
        written = (row.get("output_captions") or [row["caption"]])[0]
        hits += describes(written, row)
    return hits / kept.height


def format_quality(drops: dict, truth_before: float | None = None, truth_after: float | None = None) -> str:
    lines = [f"{'noise type':<16}{'samples':>8}{'dropped':>9}{'share':>8}  expected"]
    for noise, row in drops["per_type"].items():
        expected = "drop" if row["should_drop"] else "keep (cleaned)"
        lines.append(f"{noise:<16}{row['samples']:>8}{row['dropped']:>9}{row['dropped_share']:>8.2f}  {expected}")
    lines.append(f"drop decision: precision {drops['precision']:.3f}, recall {drops['recall']:.3f}")
    if truth_before is not None:
        lines.append(f"kept captions that describe their image: {truth_before:.3f} after the rules")
    if truth_after is not None:
        lines.append(f"kept captions that describe their image: {truth_after:.3f} after CLIP score + CapFilt")
    return "\n".join(lines)
