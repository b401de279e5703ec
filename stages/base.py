"""The contract every curation stage follows.

A stage has one job and two halves, kept apart on purpose:

* ``annotate`` computes per-sample values (scores, counts, the cleaned caption) and is the costly part;
* ``reject_reason`` turns those values into a verdict with the stage's thresholds, as a polars expression.

Because verdicts only read annotation columns, changing a threshold can be re-applied from the Parquet
manifests (``vlcurate select``) without annotating again. Settings named in ``thresholds`` are the ones that
only affect the verdict; every other setting changes the annotations and therefore needs a recompute.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
from typing import Any, ClassVar

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc


@dataclasses.dataclass
class StageParams:
    """What a stage computes: each stage subclasses this with its own fields. Every field but ``enabled`` and the
    stage's thresholds is part of the output's fingerprint."""

    enabled: bool = True


@dataclasses.dataclass
class StageResources:
    """How Ray runs a stage (a recipe's ``resources:`` block): never changes a result, never fingerprinted."""

    num_cpus: float = 1.0


class SampleBatch:
    """The samples of one shard that a stage annotates.

    ``index`` holds their positions in the shard table; ``captions`` (the current caption, already cleaned by
    earlier stages) and ``images`` (raw bytes) are materialised only when a stage reads them, so text stages
    never copy image bytes.
    """

    def __init__(self, table: pa.Table, index: list[int]):
        self._table = table
        self.index = index

    def _column(self, name: str) -> list:
        return self._table.column(name).take(pa.array(self.index, pa.int64())).to_pylist()

    def annotation(self, name: str) -> list | None:
        """An earlier stage's annotation column for these samples, or None when no stage wrote it."""
        return self._column(name) if name in self._table.column_names else None

    def has_annotation(self, name: str) -> list[bool]:
        """Per sample, whether an earlier stage wrote a value in column ``name`` (without copying the values)."""
        if name not in self._table.column_names:
            return [False] * len(self)
        return self._table.column(name).take(pa.array(self.index, pa.int64())).is_valid().to_pylist()

    @functools.cached_property
    def captions(self) -> list[str]:
        return self._column("caption")

    @functools.cached_property
    def images(self) -> list[bytes]:
        return self._column("image")

    @functools.cached_property
    def keys(self) -> list[str]:
        return self._column("key")

    def __len__(self) -> int:
        return len(self.index)


class Stage:
    """Base class: subclasses set ``name``, ``Params``, ``columns`` and implement ``annotate``."""

    name: ClassVar[str]
    Params: ClassVar[type[StageParams]] = StageParams
    Resources: ClassVar[type[StageResources]] = StageResources
    # Annotation columns this stage writes into the manifest, with their Arrow types.
    columns: ClassVar[dict[str, pa.DataType]] = {}
    # Columns passed on to later stages but never written to manifests or shards (decoded pixels).
    transient_columns: ClassVar[dict[str, pa.DataType]] = {}
    # Columns (among ``columns``) kept in the manifest only, never in the output samples' .json: what a search over
    # the whole output reads, of no use to a training job.
    manifest_only: ClassVar[frozenset[str]] = frozenset()
    # Model stages run in a Ray actor pool (one model per actor) instead of plain tasks.
    uses_actor_pool: ClassVar[bool] = False
    # Settings that only change the verdict (re-applicable from manifests by `vlcurate select`).
    thresholds: ClassVar[frozenset[str]] = frozenset()
    # True when the stage rewrites the caption that later stages and the output see.
    rewrites_caption: ClassVar[bool] = False
    # Cheap stages annotate every readable sample, so that a loosened threshold upstream still finds their
    # values; expensive (model) stages set this to True and only see samples that passed every earlier stage.
    only_survivors: ClassVar[bool] = False
    # Columns (among ``columns``) decided over the whole output at selection time rather than per sample, such as
    # which copy of a duplicated image is kept: ``annotate`` leaves them null, ``selection_columns`` fills them.
    decided_at_selection: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, params: StageParams):
        self.params = params
        self.resources = self.Resources()  # a recipe's resources are set by ``StageSpec.build``

    def __reduce__(self):
        """A stage travels to another process as its settings and is built again there: loaded models and
        compiled helpers are never pickled (building loads what the stage needs)."""
        return (rebuilt_stage, (type(self), self.rebuild_args(), self.resources))

    def rebuild_args(self) -> tuple:
        """What the constructor takes to build this stage again."""
        return (self.params,)

    def for_shards(self, sources: set[str]) -> "Stage":
        """This stage as a task working on the shards read from ``sources`` needs it: itself, unless it holds
        verdicts decided over the whole output (then only those of these shards)."""
        return self

    def load(self) -> Any:
        """Load models or other heavy resources (model stages load once per actor); nothing by default."""
        return None

    def preparing_inputs(self, input_stages: list["Stage"]) -> contextlib.AbstractContextManager:
        """Around the stages that make this stage's inputs in its actor, and this stage's work on them; nothing by
        default (model stages on CUDA have the decode stage decode on their device)."""
        return contextlib.nullcontext()

    def annotate(self, batch: SampleBatch) -> dict[str, list[Any]]:
        """Return one list per column in ``columns`` (plus ``caption`` when ``rewrites_caption``)."""
        raise NotImplementedError

    def reject_reason(self) -> pl.Expr | None:
        """A polars expression over the annotation columns: a short reason string, or null to keep."""
        return None

    def selection_columns(self, table: pa.Table) -> dict[str, pa.Array | pa.ChunkedArray]:
        """Values of ``decided_at_selection`` for one shard's manifest rows, set before its verdicts are applied;
        empty (nothing to set) unless the stage has been resolved over the whole output."""
        return {}

    def output_captions(self, row: dict) -> list[str] | None:
        """Captions to write for a kept sample (first: its .txt; more: extra pairs), or None to leave them be.
        Applied at selection time, so it may only depend on annotations and thresholds."""
        return None

    @classmethod
    def annotation_settings(cls, params: StageParams) -> dict[str, Any]:
        """The settings that change annotations: every parameter but ``enabled`` and the thresholds (resources
        are not parameters)."""
        skip = cls.thresholds | {"enabled"}
        return {k: v for k, v in dataclasses.asdict(params).items() if k not in skip}


def rebuilt_stage(cls: type[Stage], args: tuple, resources: StageResources) -> Stage:
    stage = cls(*args)
    stage.resources = resources
    return stage


class ResolvedOverOutput:
    """Mixin for a stage once the whole output has been searched (duplicates): per input shard (its source), the
    rows (``position`` and ``selection_verdicts``) that it decided; ``selection_columns`` fills them in that
    shard's manifest, every other row gets nulls."""

    selection_verdicts: ClassVar[dict[str, pa.DataType]] = {}

    def __init__(self, params: StageParams, duplicates: dict[str, pa.Table]):
        super().__init__(params)
        self.duplicates = duplicates

    def selection_columns(self, table: pa.Table) -> dict[str, pa.ChunkedArray | pa.Array]:
        return shard_verdicts(table, self.duplicates, self.selection_verdicts)

    def rebuild_args(self) -> tuple:
        return (self.params, self.duplicates)

    def for_shards(self, sources: set[str]) -> Stage:
        chosen = {source: rows for source, rows in self.duplicates.items() if source in sources}
        return rebuilt_stage(type(self), (self.params, chosen), self.resources)


def first_reason(*cases: tuple[pl.Expr, str]) -> pl.Expr:
    """Chain ``(condition, reason)`` pairs into one expression that yields the first matching reason."""
    expr: Any = pl
    for condition, reason in cases:
        expr = expr.when(condition).then(pl.lit(reason))
    return expr.otherwise(pl.lit(None, dtype=pl.String))


_OBJECT_REPR = re.compile(r"<[^<>]{0,200} at 0x[0-9a-fA-F]+>")


def error_text(exc: BaseException, limit: int = 200) -> str:
    """``Type: message`` for a manifest column, without the memory addresses of object reprs (PIL names the
    BytesIO it could not read): the same sample gets the same text on every run."""
    return _OBJECT_REPR.sub("<object>", f"{type(exc).__name__}: {exc}")[:limit]


def shard_verdicts(table: pa.Table, found: dict[str, pa.Table],
                   columns: dict[str, pa.DataType]) -> dict[str, pa.ChunkedArray | pa.Array]:
    """Columns decided over the whole output, for one shard's manifest rows: ``found`` maps a shard's source to
    the rows (``position`` and ``columns``) that have values; every other row gets nulls."""
    if "shard" not in table.column_names or "position" not in table.column_names:
        return {}
    rows = table.num_rows
    values = found.get(table.column("shard")[0].as_py()) if rows else None
    if values is None:
        return {name: pa.nulls(rows, dtype) for name, dtype in columns.items()}
    positions = values.column("position").cast(pa.int64())
    index = pc.index_in(table.column("position").cast(pa.int64()), value_set=positions)
    return {name: values.column(name).take(index).cast(dtype) for name, dtype in columns.items()}
