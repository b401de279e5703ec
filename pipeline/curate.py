"""Applying stages to a batch of samples, and turning annotations into verdicts.

This module knows nothing about Ray or shards: the steps (``pipeline.steps``) call it on bounded batches, the
tests call it directly, and ``vlcurate select`` reuses ``drop_reason_expr`` on the manifests. Every function
works on any set of samples: nothing depends on how samples are grouped into batches.
"""

from __future__ import annotations

import traceback
from typing import Iterable

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from stages import SampleBatch, Stage
from stages.base import error_text

READ_STAGE = "read"


def stage_names(stages) -> list[str]:
    """The funnel's stage names: ``read`` first, then the stages (built stages or their specs) in order."""
    return [READ_STAGE, *(stage.name for stage in stages)]


class StageContractError(TypeError):
    """A stage's ``annotate`` returned other columns than the ones it declares (a programming error)."""


def annotate_batch(table: pa.Table, stage: Stage, earlier: list[Stage]) -> tuple[pa.Table, list[int]]:
    """Run ``stage.annotate`` on the samples it should see and add its columns to ``table``; returns the table
    and the rows (indices, ascending) the stage annotated.

    Cheap stages see every readable sample; stages with ``only_survivors`` see only the samples that pass
    every earlier stage. A sample on which the stage raises gets ``error_stage``/``error_message`` and is
    dropped with reason ``<stage>:error``; the other samples of the shard are unaffected.
    """
    readable = table.column("read_error").is_null()
    if stage.only_survivors:
        reasons = verdicts(table, earlier)
        readable = readable.to_pylist()
        targets = [i for i, ok in enumerate(readable) if ok and reasons[i] is None]
    else:
        if "error_stage" in table.column_names:
            readable = pc.and_(readable, table.column("error_stage").is_null())
        targets = np.flatnonzero(readable.to_numpy()).tolist()
    values, failures = _annotate_isolating_failures(stage, table, targets)

    n = table.num_rows
    every_row = len(values["index"]) == n  # (indices are distinct and in order)
    for name, dtype in {**stage.columns, **stage.transient_columns}.items():
        if every_row:
            column = values[name]
        else:
            column = [None] * n
            for i, value in zip(values["index"], values.get(name, [])):
                column[i] = value
        table = _set_column(table, name, pa.array(column, type=dtype))
    if stage.rewrites_caption:
        if every_row:
            captions = values["caption"]
        else:
            captions = table.column("caption").to_pylist()
            for i, value in zip(values["index"], values["caption"]):
                captions[i] = value
        table = _set_column(table, "caption", pa.array(captions, type=pa.string()))
    if failures:
        error_stage = table.column("error_stage").to_pylist() if "error_stage" in table.column_names else [None] * n
        error_message = (
            table.column("error_message").to_pylist() if "error_message" in table.column_names else [None] * n
        )
        for i, message in failures.items():
            if error_stage[i] is None:
                error_stage[i], error_message[i] = stage.name, message
        table = _set_column(table, "error_stage", pa.array(error_stage, type=pa.string()))
        table = _set_column(table, "error_message", pa.array(error_message, type=pa.string()))
    return table, targets


def _annotate_isolating_failures(
    stage: Stage, table: pa.Table, targets: list[int]
) -> tuple[dict[str, list], dict[int, str]]:
    """Annotate all targets at once; if that raises, retry one sample at a time to find the bad ones."""

    def batch_of(indices: list[int]) -> SampleBatch:
        return SampleBatch(table, indices)

    expected = {*stage.columns, *stage.transient_columns, *(["caption"] if stage.rewrites_caption else [])}
    try:
        result = stage.annotate(batch_of(targets))
    except Exception:  # noqa: BLE001 - isolate the failing samples below
        pass
    else:
        check_contract(stage, result, expected, len(targets))
        return {"index": targets, **result}, {}
    merged: dict[str, list] = {"index": []}
    failures: dict[int, str] = {}
    for i in targets:
        try:
            result = stage.annotate(batch_of([i]))
        except Exception as exc:  # noqa: BLE001 - recorded per sample
            failures[i] = error_text(exc, 500) or traceback.format_exc(limit=1)
            continue
        check_contract(stage, result, expected, 1)
        merged["index"].append(i)
        for name, values in result.items():
            merged.setdefault(name, []).extend(values)
    return merged, failures


def check_contract(stage: Stage, result: dict, expected: set[str], count: int) -> None:
    if set(result) != expected:
        raise StageContractError(
            f"stage {stage.name!r} returned columns {sorted(result)} but declares {sorted(expected)}: "
            "fix the names in its annotate() or its columns"
        )
    wrong = sorted(name for name, values in result.items() if len(values) != count)
    if wrong:
        raise StageContractError(f"stage {stage.name!r} returned {wrong} with a length other than {count} samples")


def _set_column(table: pa.Table, name: str, values: pa.Array | pa.ChunkedArray) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)


def stage_reason_expr(stage: Stage) -> pl.Expr:
    """This stage's drop reason for one sample, prefixed with the stage name, or null."""
    errored = pl.col("error_stage") == stage.name
    reason = stage.reject_reason()
    if stage.only_survivors:
        # Never scored (it was dropped earlier when the stage ran, and a threshold upstream was loosened since).
        first_column = next(iter(stage.columns))
        missing = pl.when(pl.col(first_column).is_null()).then(pl.lit("not_scored"))
        reason = missing.otherwise(reason) if reason is not None else missing.otherwise(None)
    expr = pl.when(errored).then(pl.lit("error"))
    expr = expr.otherwise(reason) if reason is not None else expr.otherwise(pl.lit(None, dtype=pl.String))
    return pl.concat_str([pl.lit(stage.name + ":"), expr])


def drop_reason_expr(stages: Iterable[Stage]) -> pl.Expr:
    """The first failing stage's reason, in stage order; null when the sample is kept."""
    read = pl.concat_str([pl.lit(READ_STAGE + ":"), pl.col("read_error")])
    return pl.coalesce([read, *(stage_reason_expr(s) for s in stages)]).alias("drop_reason")


def verdict_frame(table: pa.Table | pl.DataFrame, stages: Iterable[Stage] = ()) -> pl.DataFrame:
    """The columns verdicts need, with ``error_stage`` present even when no stage has failed, and every column
    that ``stages`` declare: a manifest written before a stage declared a column judges its samples as that
    stage did then (its rule reads a missing column as null)."""
    if isinstance(table, pa.Table):
        table = table.drop_columns([c for c in ("image", "pixels") if c in table.column_names])
        table = pl.from_arrow(table)
    frame = table
    missing = {"error_stage": pa.string()}
    for stage in stages:
        missing.update(stage.columns)
    missing = {name: kind for name, kind in missing.items() if name not in frame.columns}
    if missing:
        frame = frame.with_columns(pl.from_arrow(pa.table({name: pa.nulls(frame.height, kind)
                                                           for name, kind in missing.items()})))
    return frame


def verdicts(table: pa.Table, stages: list[Stage]) -> list[str | None]:
    return verdict_frame(table, stages).select(drop_reason_expr(stages)).to_series().to_list()


def output_captions(frame: pl.DataFrame, stages: list[Stage]) -> list[list[str] | None]:
    """Per sample, the captions to write if kept: a stage with a caption policy (CapFilt) may replace the
    caption or add extra pairs; otherwise the cleaned caption. Null for dropped samples."""
    deciders = [s for s in stages if type(s).output_captions is not Stage.output_captions]
    if not deciders:  # the cleaned caption of every kept sample
        return [[caption] if reason is None else None
                for caption, reason in zip(frame["caption"].to_list(), frame["drop_reason"].to_list())]
    results: list[list[str] | None] = []
    for row in frame.to_dicts():
        if row["drop_reason"] is not None:
            results.append(None)
            continue
        captions = [row["caption"]]
        for stage in deciders:
            captions = stage.output_captions(row) or captions
        results.append(captions)
    return results


_DROP_REASONS: dict[tuple, pl.Expr] = {}


def _drop_reason_expr(stages: list[Stage]) -> pl.Expr:
    """``drop_reason_expr``, built once per list of stages and their settings: a worker judges every batch with
    the same stages, and building the expression costs more than evaluating it on a batch."""
    key = tuple((stage, repr(stage.params)) for stage in stages)  # (stages hash by identity, and are kept alive)
    if key not in _DROP_REASONS:
        if len(_DROP_REASONS) >= 8:
            _DROP_REASONS.clear()
        _DROP_REASONS[key] = drop_reason_expr(stages)
    return _DROP_REASONS[key]


def apply_verdicts(table: pa.Table, stages: list[Stage]) -> pa.Table:
    """Set ``drop_reason``, ``kept`` and ``output_captions`` from the annotations and the stages' thresholds;
    first the columns that stages decided over the whole output (``Stage.selection_columns``), if any."""
    for stage in stages:
        for name, values in stage.selection_columns(table).items():
            table = _set_column(table, name, values)
    deciders = any(type(s).output_captions is not Stage.output_captions for s in stages)
    frame = verdict_frame(table, stages)
    reasons = frame.select(_drop_reason_expr(stages)).to_series()
    drop_reason = reasons.to_arrow().cast(pa.string())
    kept = pc.is_null(drop_reason)
    table = _set_column(table, "drop_reason", drop_reason)
    table = _set_column(table, "kept", kept)
    if deciders:
        captions = pa.array(output_captions(frame.with_columns(reasons), stages), pa.list_(pa.string()))
    else:
        captions = kept_captions(table.column("caption"), kept)
    return _set_column(table, "output_captions", captions)


def kept_captions(caption: pa.ChunkedArray | pa.Array, kept: pa.Array) -> pa.ListArray:
    """``[caption]`` for every kept sample, null for the others: ``output_captions`` without a caption policy."""
    if isinstance(caption, pa.ChunkedArray):
        caption = caption.combine_chunks()
    kept_values = kept.to_numpy(zero_copy_only=False)
    offsets = np.zeros(len(kept) + 1, dtype=np.int32)
    np.cumsum(kept_values, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), caption.filter(kept), mask=pc.invert(kept))


def verdict_columns(stages: list[Stage]) -> tuple[str, ...]:
    """The manifest columns a selection may change: verdicts, written captions and columns decided over the whole
    output; a shard is rewritten when one of them changes."""
    decided = [name for stage in stages for name in sorted(stage.decided_at_selection)]
    return ("drop_reason", "output_captions", *decided)


def finish_batch(table: pa.Table, stages: list[Stage]) -> pa.Table:
    """Final verdicts, without the transient columns (decoded pixels) that only stages needed."""
    transient = {name for stage in stages for name in stage.transient_columns}
    table = table.drop_columns([c for c in table.column_names if c in transient])
    return apply_verdicts(table, stages)
