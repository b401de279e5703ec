"""What a run does to a batch of samples, step by step, without Ray (``pipeline.plan`` maps the steps onto Ray).

A recipe's stages are grouped into steps:

* the **source step** reads an input shard as bounded batches and runs every CPU stage up to the first model
  stage on each batch, as one function over one in-memory Arrow table;
* one **model step** per model stage, run by an actor pool (one loaded model per actor). Model actors receive a
  slim table: the position and key of every sample of the batch, and the caption of only the samples still
  alive; the full rows (image bytes, metadata, earlier annotations) wait in a carry file of the shard's parts
  folder, and each actor reads the image bytes of the batch it is about to score from there. So the object
  store holds only slim rows, however far the source step runs ahead of the actors. The stages that make the
  models' inputs (the decode stage: decoded pixels) run inside each model step, on that batch, so decoded
  pixels never cross a process and an actor holds at most one batch of them;
* the **sink step** joins the model results back onto the carried rows, applies the verdicts and writes the
  batch's part of the shard's outputs. Without model stages the source step does this itself, and fills its
  batches across consecutive shards (``curate_shards``).

The input shard stays the unit of completion: parts are keyed by the position of their first sample, and a
shard is committed (parts joined in position order, completion record last) once its parts cover every sample.
Nothing here depends on how Ray groups rows into blocks: every function works on any contiguous run of samples.
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import dataclasses
import json
import time
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import StageSpec
from pipeline.curate import READ_STAGE, annotate_batch, finish_batch, stage_names, verdicts
from pipeline.outputs import OutputDir, PartInfo, ShardWriter, read_carry, write_carry, write_part
from pipeline.shards import ReadParams, ShardError, iter_sample_batches
from stages import Stage

# Columns of the slim table that travels through model actor pools.
SLIM_FIXED = {
    "stem": pa.string(),
    "source": pa.string(),
    "position": pa.int64(),
    "key": pa.string(),
    "caption": pa.string(),
    "read_error": pa.string(),  # null for samples still alive, "-" for the others (they are carried, not scored)
    "shard_total": pa.int64(),  # set on the row that ends a shard (position -1): how many samples it had
    "shard_error": pa.string(),  # set on the row that ends a shard that could not be read to the end
}
SECONDS_PREFIX = "seconds:"  # per-sample share of a step's CPU seconds, per stage (summed into each part)
SAMPLES_PREFIX = "samples:"  # per-sample share of the samples a CPU stage annotated (summed likewise)


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """Which stages run where, as stage indices: ``source`` and ``sink`` CPU stages, ``models`` the model stages
    (one actor pool each), and ``model_inputs`` the CPU stages that make the models' inputs (decoded pixels),
    run by every model step on its own batch instead of by the source."""

    source: tuple[int, ...]
    models: tuple[int, ...]
    sink: tuple[int, ...]
    model_inputs: tuple[int, ...] = ()

    @classmethod
    def of(cls, specs: list[StageSpec]) -> "StepPlan":
        model_positions = [i for i, s in enumerate(specs) if s.stage_class.uses_actor_pool]
        if not model_positions:
            return cls(tuple(range(len(specs))), (), ())
        first, last = model_positions[0], model_positions[-1]
        between = [specs[i].name for i in range(first, last) if i not in model_positions]
        if between:
            raise ValueError(
                f"CPU stage(s) {between} sit between model stages: move them before the first model stage "
                f"({specs[first].name}) or after the last one ({specs[last].name})"
            )
        makers = [i for i in range(first) if specs[i].stage_class.transient_columns]
        inputs = tuple(range(makers[0], first)) if makers else ()
        rewriting = [specs[i].name for i in inputs if specs[i].stage_class.rewrites_caption]
        if rewriting:
            raise ValueError(
                f"caption stage(s) {rewriting} sit between {specs[inputs[0]].name} and the model stages: "
                f"move them before {specs[inputs[0]].name}"
            )
        source = tuple(range(makers[0] if makers else first))
        return cls(source, tuple(model_positions), tuple(range(last + 1, len(specs))), inputs)

    @property
    def in_actors(self) -> tuple[int, ...]:
        """Every stage whose columns come back from the actor pools."""
        return self.model_inputs + self.models


@dataclasses.dataclass
class RunContext:
    """Everything a step needs besides its data; built on the driver, shipped to Ray workers. The step plan
    and the key of the stage cache are worked out once here, not on every batch."""

    specs: list[StageSpec]
    read: ReadParams
    out_root: str
    fingerprint: str
    config_name: str
    plan: StepPlan = dataclasses.field(init=False)
    stages_key: str = dataclasses.field(init=False)

    def __post_init__(self):
        self.plan = StepPlan.of(self.specs)
        self.stages_key = stages_key(self.specs)

    def stages(self) -> list[Stage]:
        return cached_stages(self.specs, self.stages_key)


_STAGE_CACHE: dict[str, list[Stage]] = {}


def stages_key(specs: list[StageSpec]) -> str:
    return json.dumps([[s.name, s.kind, dataclasses.asdict(s.params), dataclasses.asdict(s.resources)] for s in specs],
                      sort_keys=True, default=str)


def cached_stages(specs: list[StageSpec], key: str | None = None) -> list[Stage]:
    """Stages are built once per worker process, so models, tokenizers and fastText load once."""
    key = key or stages_key(specs)
    if key not in _STAGE_CACHE:
        _STAGE_CACHE[key] = [spec.build() for spec in specs]
    return _STAGE_CACHE[key]


class StageTimer:
    """CPU seconds and annotated samples per stage, accumulated over the batches of one part."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.samples: dict[str, int] = {}
        self.rows: dict[str, list[int]] = {}  # the rows of the current batch each stage annotated, where known

    def add(self, name: str, seconds: float, samples: int, rows: list[int] | None = None) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.samples[name] = self.samples.get(name, 0) + samples
        if rows is not None:
            self.rows[name] = rows

    def as_dict(self) -> dict[str, dict]:
        return {name: {"cpu_seconds": round(self.seconds[name], 6), "samples": self.samples[name]}
                for name in self.seconds}

    def take(self) -> dict[str, dict]:
        """The figures so far, and start again from zero (one part's worth)."""
        figures = self.as_dict()
        self.seconds, self.samples, self.rows = {}, {}, {}
        return figures

    def take_split(self, sizes: list[int]) -> list[dict[str, dict]]:
        """The figures of one batch made of consecutive runs of ``sizes`` rows (the pieces of several shards), one
        dict per run, and start again from zero. Samples are exact: the rows each stage annotated in that run (a
        stage without a row list annotated every row). CPU seconds are shared by rows: a batch's time has no
        finer attribution."""
        bounds = np.cumsum([0, *sizes])
        total = int(bounds[-1]) or 1
        split = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            figures = {}
            for name, seconds in self.seconds.items():
                rows = self.rows.get(name)
                samples = (int(end - start) if rows is None
                           else bisect.bisect_left(rows, end) - bisect.bisect_left(rows, start))
                figures[name] = {"cpu_seconds": round(seconds * (end - start) / total, 6), "samples": samples}
            split.append(figures)
        self.seconds, self.samples, self.rows = {}, {}, {}
        return split


def run_stages(table: pa.Table, stages: list[Stage], positions: tuple[int, ...], timer: StageTimer) -> pa.Table:
    """Annotate ``table`` with the stages at ``positions``, in order (each sees the stages before it)."""
    for position in positions:
        stage = stages[position]
        started = time.process_time()
        table, annotated = annotate_batch(table, stage, stages[:position])
        timer.add(stage.name, time.process_time() - started, len(annotated), annotated)
    return table


def read_batches(source: str, read: ReadParams, timer: StageTimer) -> Iterator[pa.Table]:
    """The shard's sample batches, with the CPU time of reading them booked to the ``read`` step."""
    batches = iter_sample_batches(source, read)
    while True:
        started = time.process_time()
        batch = next(batches, None)
        if batch is None:
            return
        timer.add(READ_STAGE, time.process_time() - started, batch.num_rows)
        yield batch


# ------------------------------------------------------------------------------- source step: read + CPU stages

@dataclasses.dataclass(eq=False)
class ShardInFlight:
    """A shard of a rule task between its first read and its summary: its writer, how many pieces of it wait in
    a batch, and once every piece is written (or it failed) its result, a summary or a commit's future."""

    source: str
    stem: str
    writer: ShardWriter | None = None
    unwritten: int = 0  # pieces read and not yet annotated and written
    read: bool = False  # every batch of it has been read
    result: object = None  # summary dict, or a Future of one

    def fail(self, exc: BaseException) -> None:
        if self.result is None:
            if self.writer is not None:
                self.writer.abort()
            self.result = shard_summary(self.stem, self.source, error=describe(exc))


class SharedBatch:
    """Pieces of consecutive shards held until they fill one batch (``read.batch_samples``, ``read.batch_bytes``),
    then annotated and judged as one table; each shard's rows go to its own writer."""

    def __init__(self, ctx: RunContext, stages: list[Stage], timer: StageTimer):
        self.ctx, self.stages, self.timer = ctx, stages, timer
        self.pieces: list[tuple[ShardInFlight, pa.Table]] = []
        self.rows = self.bytes = 0

    def room(self) -> int:
        return self.ctx.read.batch_samples - self.rows

    def add(self, shard: ShardInFlight, piece: pa.Table) -> bool:
        """Hold ``piece`` (at most ``room()`` rows); True when the batch is full."""
        self.pieces.append((shard, piece))
        shard.unwritten += 1
        self.rows += piece.num_rows
        self.bytes += piece.nbytes
        return self.rows >= self.ctx.read.batch_samples or self.bytes >= self.ctx.read.batch_bytes

    def drop(self, shard: ShardInFlight) -> None:
        """Let go of a failed shard's pieces."""
        self.pieces = [(owner, piece) for owner, piece in self.pieces if owner is not shard]
        self.rows = sum(piece.num_rows for _, piece in self.pieces)
        self.bytes = sum(piece.nbytes for _, piece in self.pieces)
        shard.unwritten = 0

    def write(self) -> None:
        """Annotate and judge the pieces held, hand each shard its rows, and start an empty batch. If the stages
        raise, every shard with rows in the batch fails; if a writer raises, its shard fails."""
        pieces, self.pieces, self.rows, self.bytes = self.pieces, [], 0, 0
        if not pieces:
            return
        try:
            table = pa.concat_tables([piece for _, piece in pieces]) if len(pieces) > 1 else pieces[0][1]
            table = finish_batch(run_stages(table, self.stages, self.ctx.plan.source, self.timer), self.stages)
            timings = self.timer.take_split([piece.num_rows for _, piece in pieces])
        except Exception as exc:  # noqa: BLE001 - the shards of this batch fail; the others go on
            self.timer.take()
            for shard, _ in pieces:
                shard.unwritten -= 1
                shard.fail(exc)
            return
        offset = 0
        for (shard, piece), timing in zip(pieces, timings):
            shard.unwritten -= 1
            if shard.result is None:
                try:
                    shard.writer.add(table.slice(offset, piece.num_rows), timing)
                except Exception as exc:  # noqa: BLE001 - this shard fails; the others go on
                    shard.fail(exc)
            offset += piece.num_rows


def curate_shards(ctx: RunContext, shards: list[tuple[str, str]]) -> Iterator[dict]:
    """Without model stages: read, annotate, judge and write every sample of each (source, stem), then commit the
    shard. Yields one summary per shard (the completion record's counts, or the shard's error), in the order of
    ``shards``, each only once its commit has returned.

    Batches are bounded by ``read.batch_samples`` and ``read.batch_bytes``, not by shards: the samples of
    consecutive small shards are annotated and judged together (stages are per sample: grouping never changes a
    result), then each shard's rows go to its own writer (``SharedBatch``). Small shards thus pay the per-batch
    costs once per batch, not once each. A shard that cannot be read fails alone.

    A commit mostly waits (fsync on a local disk, uploads to an object store), so commits run on threads of their
    own while the next batches are read and judged: one on a local disk, ``REMOTE_COMMITS`` into an object store
    (where each of a commit's writes waits a round trip); at most as many again wait behind them."""
    out = OutputDir(ctx.out_root)
    timer = StageTimer()
    batch = SharedBatch(ctx, ctx.stages(), timer)
    in_flight: collections.deque[ShardInFlight] = collections.deque()  # in the order of ``shards``
    committers = REMOTE_COMMITS if out.remote else 1
    with concurrent.futures.ThreadPoolExecutor(max_workers=committers, thread_name_prefix="commit") as committer:

        def finished() -> Iterator[dict]:
            """Commit the shards fully written; yield the summaries at the head of the line that are ready (or
            wait for the first when more than twice ``committers`` commits are waiting)."""
            for shard in in_flight:
                if shard.result is None and shard.read and shard.unwritten == 0:
                    shard.result = committer.submit(commit_written, ctx, shard.writer)
            while in_flight and in_flight[0].result is not None:
                waiting = sum(1 for s in in_flight if isinstance(s.result, concurrent.futures.Future))
                if not (_ready(in_flight[0].result) or waiting > 2 * committers):
                    return
                yield _result(in_flight.popleft().result)

        for source, stem in shards:
            shard = ShardInFlight(source, stem)
            in_flight.append(shard)
            try:  # a rule task writes no parts; those of earlier attempts went before the run (forget_pending)
                shard.writer = ShardWriter(out, stem, source)
                for read in read_batches(source, ctx.read, timer):
                    while read.num_rows and shard.result is None:
                        room = batch.room()
                        if batch.add(shard, read.slice(0, room)):
                            batch.write()
                            yield from finished()
                        read = read.slice(room)
                    if shard.result is not None:  # its rows failed in a batch: read no more of it
                        break
            except Exception as exc:  # noqa: BLE001 - a bad shard fails alone, with its reason
                shard.fail(exc)
                batch.drop(shard)
            shard.read = True
            yield from finished()
        batch.write()
        while in_flight:
            yield from finished()
            if in_flight:
                concurrent.futures.wait([in_flight[0].result])


REMOTE_COMMITS = 4  # commits at once into an object store, per task


def commit_written(ctx: RunContext, writer: ShardWriter) -> dict:
    try:
        record = writer.commit(stage_names(ctx.stages()), ctx.fingerprint, ctx.config_name)
    except Exception as exc:  # noqa: BLE001 - commit aborts the writer: nothing half-written stays in place
        return shard_summary(writer.stem, writer.source, error=describe(exc))
    return shard_summary(writer.stem, writer.source, total=record["total"], kept=record["kept"], committed=True)


def _ready(item) -> bool:
    return isinstance(item, dict) or item.done()


def _result(item) -> dict:
    return item if isinstance(item, dict) else item.result()


def slim_batches(ctx: RunContext, source: str, stem: str) -> Iterator[pa.Table]:
    """With model stages: read and annotate every batch with the source stages, carry the full rows to the
    shard's parts folder, and yield the slim table the model actors need. The shard ends with one more row that
    says how many samples it had, or why it could not be read to the end."""
    stages = ctx.stages()
    out = OutputDir(ctx.out_root)
    total = 0
    try:
        out.clear_parts(stem)
        timer = StageTimer()
        for batch in read_batches(source, ctx.read, timer):
            batch = run_stages(batch, stages, ctx.plan.source, timer)
            yield slim_table(ctx, out, stem, source, batch, stages, timer.take())
            total += batch.num_rows
    except Exception as exc:  # noqa: BLE001
        yield end_row(ctx, stem, source, error=describe(exc))
        return
    yield end_row(ctx, stem, source, total=total)


def slim_table(ctx: RunContext, out: OutputDir, stem: str, source: str, batch: pa.Table, stages: list[Stage],
               timing: dict[str, dict]) -> pa.Table:
    alive = pa.array([reason is None for reason in verdicts(batch, [stages[i] for i in ctx.plan.source])],
                     pa.bool_())
    write_carry(out, stem, batch)
    n = batch.num_rows
    columns = {
        "stem": pa.array([stem] * n, pa.string()),
        "source": pa.array([source] * n, pa.string()),
        "position": batch.column("position").cast(pa.int64()),
        "key": batch.column("key"),
        "caption": pc.if_else(alive, batch.column("caption"), pa.nulls(n, pa.string())),
        "read_error": pc.if_else(alive, pa.nulls(n, pa.string()), pa.scalar("-", pa.string())),
        "shard_total": pa.nulls(n, pa.int64()),
        "shard_error": pa.nulls(n, pa.string()),
    }
    for name, figures in timing.items():
        columns[SECONDS_PREFIX + name] = pa.array([figures["cpu_seconds"] / n] * n, pa.float64())
        columns[SAMPLES_PREFIX + name] = pa.array([figures["samples"] / n] * n, pa.float64())
    return pa.table(columns)


def end_row(ctx: RunContext, stem: str, source: str, total: int | None = None, error: str | None = None) -> pa.Table:
    row = {"stem": stem, "source": source, "position": -1, "key": None, "caption": None, "read_error": "-",
           "shard_total": total, "shard_error": error}
    return pa.Table.from_pylist([row], schema=pa.schema(SLIM_FIXED))


# ------------------------------------------------------------------------------------------------ model steps

def run_model_stage(ctx: RunContext, index: int, table: pa.Table) -> pa.Table:
    """One model step over a slim table: make the model's inputs (decode the images still alive), score the
    samples that are alive and not dropped by an earlier model stage, and book the CPU time to the rows seen.
    The inputs are made here, on the actor, and never leave it: the first model step records the input
    stages' annotations (decode errors are verdicts); later steps make the transient inputs again, for the
    samples still alive only."""
    timer = StageTimer()
    started = time.process_time()
    table = with_carried_images(OutputDir(ctx.out_root), table)
    timer.add(READ_STAGE, time.process_time() - started, 0)
    return annotate_in_actor(table, ctx.stages(), ctx.plan, index, timer)


def annotate_in_actor(table: pa.Table, stages: list[Stage], plan: StepPlan, index: int,
                      timer: StageTimer) -> pa.Table:
    """``run_model_stage`` once the image bytes are in ``table``: the input stages, then model stage ``index``
    (on CUDA, inside the model stage's ``preparing_inputs``: the decode stage decodes on its device), then the
    transient columns and the image bytes dropped and the CPU time booked to the rows."""
    stage = stages[index]
    first = index == plan.models[0]
    inputs = [stages[position] for position in plan.model_inputs]
    with stage.preparing_inputs(inputs):
        for position in plan.model_inputs:
            maker = stages[position]
            started = time.process_time()
            if first:
                table, _ = annotate_batch(table, maker, [stages[i] for i in plan.model_inputs if i < position])
            else:
                earlier = [stages[i] for i in plan.in_actors if i < index]
                remade, _ = annotate_batch(table, maker, earlier)
                for name in maker.transient_columns:
                    table = table.append_column(name, remade.column(name))
            timer.add(maker.name, time.process_time() - started, 0)
        started = time.process_time()
        table, _ = annotate_batch(table, stage, [stages[i] for i in plan.in_actors if i < index])
        timer.add(stage.name, time.process_time() - started, 0)
    transient = [name for i in plan.model_inputs for name in stages[i].transient_columns]
    table = table.drop_columns([c for c in [*transient, "image"] if c in table.column_names])
    n = table.num_rows
    for name, seconds in timer.seconds.items():
        column = SECONDS_PREFIX + name
        share = pa.array([seconds / n if n else 0.0] * n, pa.float64())
        if column in table.column_names:
            share = pc.add(table.column(column), share)
            table = table.set_column(table.column_names.index(column), column, share)
        else:
            table = table.append_column(column, share)
    return table


def with_carried_images(out: OutputDir, table: pa.Table) -> pa.Table:
    """The slim table with the image bytes of its live samples, read from their shards' carry files. A run of
    rows whose carry cannot be read (its shard is being recomputed) gets ``shard_error``: the sink then fails that
    shard cleanly, to be redone by the next run."""
    alive = table.column("read_error").is_null()
    images, errors = [], table.column("shard_error").to_pylist()
    offset = 0
    for stem, _, rows in contiguous_runs(table):
        first, count = rows.column("position")[0].as_py(), rows.num_rows
        piece = pa.nulls(count, pa.large_binary())
        if first >= 0:
            try:
                piece = read_carry(out, stem, first, count, ["image"]).column("image").combine_chunks()
            except Exception as exc:  # noqa: BLE001 - this shard fails; the others go on
                errors[offset:offset + count] = [f"reading carried rows: {describe(exc)}"] * count
        images.append(piece.cast(pa.large_binary()))
        offset += count
    image = pa.concat_arrays(images) if images else pa.array([], pa.large_binary())
    table = table.set_column(table.column_names.index("shard_error"), "shard_error", pa.array(errors, pa.string()))
    return table.append_column("image", pc.if_else(alive, image, pa.nulls(len(image), pa.large_binary())))


# -------------------------------------------------------------------------------------------------- sink step

def write_model_results(ctx: RunContext, table: pa.Table) -> list[dict]:
    """The sink after the model stages: for each run of consecutive samples of one shard, join the model
    columns onto the carried rows, judge, and write the part. Returns one summary per part or shard end."""
    stages = ctx.stages()
    out = OutputDir(ctx.out_root)
    summaries = []
    for stem, source, rows in contiguous_runs(table):
        first = rows.column("position")[0].as_py()
        if first < 0:  # the row that ends a shard
            total, error = rows.column("shard_total")[0].as_py(), rows.column("shard_error")[0].as_py()
            summaries.append(shard_summary(stem, source, total=total, error=error, end=True))
            continue
        if rows.column("shard_error").null_count < rows.num_rows:  # a model step could not read its inputs
            error = next(e for e in rows.column("shard_error").to_pylist() if e is not None)
            summaries.append(shard_summary(stem, source, error=error, end=True))
            continue
        try:
            full = join_model_columns(read_carry(out, stem, first, rows.num_rows), rows, stages, ctx.plan)
            timer = StageTimer()
            for name in (c for c in rows.column_names if c.startswith(SECONDS_PREFIX)):
                stage = name[len(SECONDS_PREFIX):]
                shares = rows.column(SAMPLES_PREFIX + stage) if SAMPLES_PREFIX + stage in rows.column_names else None
                samples = round(pc.sum(shares).as_py() or 0) if shares is not None else 0
                timer.add(stage, pc.sum(rows.column(name)).as_py() or 0.0, samples)
            for name, count in annotated_counts(full, stages, ctx.plan).items():
                timer.samples[name] = count
            full = run_stages(full, stages, ctx.plan.sink, timer)
            part = write_part(out, stem, source, finish_batch(full, stages), timer.as_dict())
            summaries.append(shard_summary(stem, source, part=part))
        except Exception as exc:  # noqa: BLE001 - this shard fails; other shards' parts go on
            summaries.append(shard_summary(stem, source, error=f"writing outputs: {describe(exc)}", end=True))
    return summaries


def contiguous_runs(table: pa.Table) -> Iterator[tuple[str, str, pa.Table]]:
    """Maximal runs of rows of one shard with consecutive positions; a shard-end row is a run of its own."""
    stems = table.column("stem").to_pylist()
    positions = table.column("position").to_pylist()
    start = 0
    for i in range(1, len(stems) + 1):
        if (i == len(stems) or stems[i] != stems[start] or positions[i] != positions[i - 1] + 1
                or positions[i] < 0 or positions[start] < 0):
            yield stems[start], table.column("source")[start].as_py(), table.slice(start, i - start)
            start = i


def join_model_columns(carried: pa.Table, slim: pa.Table, stages: list[Stage], plan: StepPlan) -> pa.Table:
    """The carried rows with the model stages' columns (and any error they recorded) added, in position order."""
    if carried.column("position").cast(pa.int64()).to_pylist() != slim.column("position").to_pylist():
        raise ShardError("carried rows do not match the model results (positions differ)")
    table = carried
    for index in plan.in_actors:
        for name in stages[index].columns:
            if name in table.column_names:
                table = table.drop_columns([name])
            table = table.append_column(name, slim.column(name))
    if "error_stage" in slim.column_names:
        model_stage, model_message = slim.column("error_stage"), slim.column("error_message")
        if "error_stage" in table.column_names:
            keep = table.column("error_stage").is_valid()
            model_stage = pc.if_else(keep, table.column("error_stage"), model_stage)
            model_message = pc.if_else(keep, table.column("error_message"), model_message)
            table = table.drop_columns(["error_stage", "error_message"])
        table = table.append_column("error_stage", model_stage).append_column("error_message", model_message)
    return table


def annotated_counts(table: pa.Table, stages: list[Stage], plan: StepPlan) -> dict[str, int]:
    """How many samples each stage run by the actors annotated in this run of rows (for the timing record)."""
    return {stages[i].name: table.num_rows - table.column(next(iter(stages[i].columns))).null_count
            for i in plan.in_actors if stages[i].columns}


# ------------------------------------------------------------------------------------------------- summaries

SUMMARY_SCHEMA = pa.schema([
    ("stem", pa.string()), ("source", pa.string()),
    ("first", pa.int64()), ("rows", pa.int64()), ("part_bytes", pa.int64()),  # a written part
    ("end", pa.bool_()), ("total", pa.int64()),  # the shard ends here, with this many samples
    ("committed", pa.bool_()), ("kept", pa.int64()),  # the shard was committed by the worker that read it
    ("error", pa.string()), ("timing", pa.string()),
])


def shard_summary(stem: str, source: str, part: PartInfo | None = None, total: int | None = None,
                  kept: int | None = None, error: str | None = None, end: bool = False,
                  committed: bool = False) -> dict:
    return {
        "stem": stem, "source": source,
        "first": part.first if part else None, "rows": part.rows if part else None,
        "part_bytes": part.tar_bytes if part else None,
        "end": end or committed, "total": total, "committed": committed, "kept": kept, "error": error,
        "timing": json.dumps(part.timing) if part else None,
    }


def describe(exc: BaseException) -> str:
    import traceback

    if isinstance(exc, ShardError):
        return str(exc)[:1000]
    last = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" at {last.filename}:{last.lineno}" if last else ""
    return f"{type(exc).__name__}: {exc}{where}"[:1000]
