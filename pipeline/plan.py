"""The Ray Data plan, top to bottom: read shards -> stages in config order -> finish -> write outputs.

Each row of the dataset is one input shard: ``shard`` (URL), ``stem`` (output name), ``samples`` (the shard's
sample table, Arrow IPC bytes) and ``error`` (why the shard failed, or null). Keeping a shard in one row is what
lets outputs, manifests and completion be keyed on the input shard (exactly-once reruns), while Ray Data streams
shards through the stages, fuses consecutive CPU stages into one task, and runs each shard's stages in parallel
with other shards'. Every function here catches failures per shard: one bad shard becomes a failed row, never a
lost block.
"""

from __future__ import annotations

import dataclasses
import json
import traceback
from typing import Any

import pyarrow as pa
import ray

from pipeline.config import StageSpec
from pipeline.curate import READ_STAGE, annotate_shard, finish_shard
from pipeline.outputs import OutputDir, write_shard_outputs
from pipeline.shards import Shard, ShardError, read_shard
from stages import Stage

ROW_SCHEMA = pa.schema([("shard", pa.string()), ("stem", pa.string()), ("samples", pa.large_binary()),
                        ("error", pa.string())])


def pack(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def unpack(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(data).read_all()


def _rows(batch: pa.Table) -> list[dict[str, Any]]:
    return batch.to_pylist()


def _to_batch(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ShardError):
        return str(exc)
    last = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" at {last.filename}:{last.lineno}" if last else ""
    return f"{type(exc).__name__}: {exc}{where}"[:1000]


def read_shards(batch: pa.Table) -> pa.Table:
    rows = _rows(batch)
    for row in rows:
        try:
            row["samples"] = pack(read_shard(row["shard"]))
            row["error"] = None
        except Exception as exc:  # noqa: BLE001 - a bad shard fails alone
            row["samples"], row["error"] = None, _describe(exc)
    return _to_batch(rows)


_STAGE_CACHE: dict[str, list[Stage]] = {}


def _cached_stages(specs: list[StageSpec]) -> list[Stage]:
    """Stages are built once per worker process, so models and tokenizers load once."""
    key = json.dumps([[s.name, s.kind, dataclasses.asdict(s.params)] for s in specs], sort_keys=True)
    if key not in _STAGE_CACHE:
        _STAGE_CACHE[key] = [spec.build() for spec in specs]
    return _STAGE_CACHE[key]


def run_stage(batch: pa.Table, specs: list[StageSpec], position: int) -> pa.Table:
    """Annotate every shard in the batch with stage ``specs[position]``."""
    stages = _cached_stages(specs)
    stage, earlier = stages[position], stages[:position]
    rows = _rows(batch)
    for row in rows:
        if row["error"] is not None:
            continue
        try:
            row["samples"] = pack(annotate_shard(unpack(row["samples"]), stage, earlier))
        except Exception as exc:  # noqa: BLE001
            row["samples"], row["error"] = None, f"stage {stage.name}: {_describe(exc)}"
    return _to_batch(rows)


class StageActor:
    """One model stage in a Ray actor: the model loads once, in the constructor, and serves many shards."""

    def __init__(self, specs: list[StageSpec], position: int):
        self.specs, self.position = specs, position
        stage = _cached_stages(specs)[position]
        stage.load()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return run_stage(batch, self.specs, self.position)


def write_outputs(batch: pa.Table, specs: list[StageSpec], out_root: str, fingerprint: str,
                  config_name: str) -> pa.Table:
    """Finish verdicts and write each shard's outputs; returns one small summary row per shard, with the error
    of a shard that failed anywhere along the plan."""
    stages = _cached_stages(specs)
    stage_names = [READ_STAGE, *(s.name for s in stages)]
    out = OutputDir(out_root)
    summaries = []
    for row in _rows(batch):
        summary = {"stem": row["stem"], "shard": row["shard"], "total": 0, "kept": 0, "error": row["error"]}
        if row["error"] is None:
            try:
                table = finish_shard(unpack(row["samples"]), stages)
                record = write_shard_outputs(out, row["stem"], row["shard"], table, stage_names, fingerprint,
                                             config_name)
                summary.update(total=record["total"], kept=record["kept"])
            except Exception as exc:  # noqa: BLE001
                summary["error"] = f"writing outputs: {_describe(exc)}"
        summaries.append(summary)  # the driver records failed shards
    return pa.Table.from_pylist(summaries, schema=SUMMARY_SCHEMA)


SUMMARY_SCHEMA = pa.schema([("stem", pa.string()), ("shard", pa.string()), ("total", pa.int64()),
                            ("kept", pa.int64()), ("error", pa.string())])


def build_plan(shards: list[Shard], specs: list[StageSpec], out_root: str, fingerprint: str,
               config_name: str, gpus_available: float = 0.0) -> ray.data.Dataset:
    """The whole job as one lazy Ray dataset of per-shard summary rows.

    CPU stages are plain tasks (Ray fuses consecutive ones, so one worker reads, annotates and writes a shard);
    model stages are actor pools, so CPU stages of other shards overlap with their model work. A model stage asks
    for GPUs only when the cluster has some: a GPU request on a CPU-only cluster would wait forever."""
    items = [{"shard": s.url, "stem": s.stem} for s in shards]
    dataset = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    dataset = dataset.map_batches(read_shards, batch_size=1, batch_format="pyarrow", num_cpus=1)
    for position, spec in enumerate(specs):
        if spec.stage_class.uses_actor_pool:
            params = spec.params
            dataset = dataset.map_batches(
                StageActor,
                fn_constructor_kwargs={"specs": specs, "position": position},
                compute=ray.data.ActorPoolStrategy(size=params.pool_size),
                num_gpus=params.num_gpus if gpus_available else 0,
                num_cpus=params.num_cpus,
                batch_size=1,
                batch_format="pyarrow",
            )
        else:
            dataset = dataset.map_batches(
                run_stage,
                fn_kwargs={"specs": specs, "position": position},
                batch_size=1,
                batch_format="pyarrow",
                num_cpus=spec.params.num_cpus,
            )
    return dataset.map_batches(
        write_outputs,
        fn_kwargs={"specs": specs, "out_root": out_root, "fingerprint": fingerprint, "config_name": config_name},
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=1,
    )
