"""The steps of a run (``pipeline.steps``) mapped onto Ray, top to bottom.

Without model stages the whole job is one step, run as plain Ray tasks: each task reads its input shards one after
the other in bounded batches (filled across consecutive small shards), runs every stage on each batch in memory,
writes each shard's rows and commits the shard once its last row is written; only a one-row summary per shard
travels back to the driver, so Ray Data's executor would only add its own actors and bookkeeping. With model
stages, on Ray Data:

    shards -> source step (read + CPU stages, tasks) -> one actor pool per model stage -> sink step (tasks)

Data crosses a process only into and out of the actor pools, as slim tables (see ``pipeline.steps``): keys,
positions and captions; the actors read the image bytes of each batch from the shard's carry file and decode
them themselves, so neither image bytes nor pixels sit in the object store. The source step is never fused into
an actor pool: rule-stage parallelism is the cluster's CPUs, not the pool size.
"""

from __future__ import annotations

import ctypes
import functools
import math
from typing import Iterator

import pyarrow as pa
import ray

from pipeline.raystart import ray_data
from pipeline.shards import Shard
from pipeline.steps import (SUMMARY_SCHEMA, RunContext, curate_shards, run_model_stage, slim_batches,
                            write_model_results)


def _summary_table(summaries: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(summaries, schema=SUMMARY_SCHEMA)


class ShardTasks:
    """The rule-only plan: groups of shards, one Ray task each; ``iter_rows`` yields the shards' summaries as they
    are committed, from whichever task has one. A task that fails for good (its node lost, retries spent) yields no
    more: the shards it did not report stay unfinished, and the run reports them as failed."""

    def __init__(self, groups: list[list[tuple[str, str]]], ctx: RunContext, cpus: float):
        self.groups, self.ctx, self.cpus = groups, ctx, cpus

    def iter_rows(self) -> Iterator[dict]:
        task = ray.remote(curate_shards).options(num_cpus=self.cpus, max_retries=TASK_RETRIES)
        running = [task.remote(self.ctx, group) for group in self.groups]
        while running:
            (ready,), _ = ray.wait(running, num_returns=1)
            try:
                yield ray.get(next(ready))
            except (StopIteration, ray.exceptions.RayError):  # the task is done, or failed for good
                running.remove(ready)


# Model recipes move decoded pixels: their workers free batch after batch of large buffers. glibc raises its mmap
# threshold after each large free, so later buffers come from the heap and freed memory stays with the process; a
# fixed threshold returns it. Arrow's own pool keeps freed memory too: the system allocator does not. Set inside
# the worker, not through a runtime environment: workers with environment variables of their own are started
# afresh for every run (about a second each on a small machine), while these reuse the cluster's idle workers,
# which keep the settings for the rest of their life. Rule recipes hold no large buffers and run about a fifth
# faster without them: their tasks never set them.
MMAP_THRESHOLD = 128 * 1024
M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h


@functools.cache  # once per process
def return_freed_memory() -> None:
    """In a model recipe's worker: large buffers come from mmap and go back to the system when freed, and Arrow
    allocates with the system allocator. Without glibc only the second applies."""
    try:
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (AttributeError, OSError):  # not glibc
        pass
    pa.set_memory_pool(pa.system_memory_pool())


def read_and_slim(items: pa.Table, ctx: RunContext) -> Iterator[pa.Table]:
    return_freed_memory()
    for item in items.to_pylist():
        yield from slim_batches(ctx, item["source"], item["stem"])


class ModelActor:
    """One model stage in a Ray actor: the model loads once, in the constructor, and serves many batches."""

    def __init__(self, ctx: RunContext, index: int, cpus: float):
        return_freed_memory()
        self.ctx, self.index = ctx, index
        stage = ctx.stages()[index]
        stage.load()
        if stage.device == "cpu":  # as many torch threads as CPUs reserved, not one per core of the node
            import torch

            torch.set_num_threads(max(1, round(cpus)))

    def __call__(self, table: pa.Table) -> pa.Table:
        return run_model_stage(self.ctx, self.index, table)


def write_results(table: pa.Table, ctx: RunContext) -> pa.Table:
    return_freed_memory()
    return _summary_table(write_model_results(ctx, table))


SINK_CPUS = 0.5  # a sink task joins, judges and writes: mostly I/O
TASKS_PER_CPU = 4  # shards are grouped into this many source tasks per CPU of the cluster (fewer when fewer shards)
TASK_RETRIES = 3  # a rule task lost with its worker or node is run again (its committed shards are rewritten alike)
SOURCE_BATCHES_HELD = 4  # memory a source task reserves, in batches (read, annotated, carried, slim)


def source_cpus(ctx: RunContext) -> float:
    """CPUs a source task reserves: the CPU stages run together in it, so the largest ``num_cpus`` among them
    (below 1, more tasks than cores run at once, which hides their waits on file reads and writes)."""
    return max((ctx.specs[i].resources.num_cpus for i in ctx.plan.source), default=1.0)


def actor_cpus(ctx: RunContext, node_cpus: list[float]) -> dict[int, float]:
    """CPUs each model actor reserves: its ``num_cpus``, scaled down when the pools could leave no node with room
    for a source and a sink task (the pools would then wait forever for rows that no task can produce). Ray may
    place every actor on the smallest node, so the room is what that node has beside one source and one sink
    task, and none at all when it has no more than that (actors then reserve no CPU)."""
    wanted = {i: ctx.specs[i].resources.num_cpus for i in ctx.plan.models}
    reserved = sum(cpus * ctx.specs[i].resources.pool_bounds[1] for i, cpus in wanted.items())
    working = [cpus for cpus in node_cpus if cpus > 0] or [1.0]
    room = min(sum(working), min(working)) - source_cpus(ctx) - SINK_CPUS
    if reserved <= room or reserved == 0:
        return wanted
    if room <= 0:
        return {i: 0.0 for i in wanted}
    scale = room / reserved
    return {i: round(cpus * scale, 3) for i, cpus in wanted.items()}


def cluster_node_cpus() -> list[float]:
    """CPUs of each live node of the Ray cluster."""
    return [float(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node.get("Alive")]


def task_groups(items: list, cluster_cpus: float) -> list[list]:
    """``items`` (shards) in consecutive groups, one task each, sizes differing by one at most. Several small
    shards per task (each still committed on its own), at least TASKS_PER_CPU tasks per CPU so that the work
    stays balanced: a task costs the driver and Ray more than a small shard costs a worker."""
    tasks = max(1, min(len(items), math.ceil(TASKS_PER_CPU * cluster_cpus)))
    size, extra = divmod(len(items), tasks)
    bounds = [i * size + min(i, extra) for i in range(tasks + 1)]
    return [items[a:b] for a, b in zip(bounds, bounds[1:])]


def build_plan(shards: list[Shard], ctx: RunContext, gpus_available: float = 0.0,
               node_cpus: list[float] | None = None) -> "ray.data.Dataset | ShardTasks":
    """The whole job: something whose ``iter_rows`` yields the summary rows (``pipeline.steps.SUMMARY_SCHEMA``).

    A model stage asks for GPUs only when the cluster has some: a GPU request on a CPU-only cluster would wait
    forever."""
    node_cpus = node_cpus if node_cpus is not None else cluster_node_cpus()
    cluster_cpus = sum(node_cpus) or 1.0
    items = [{"source": s.url, "stem": s.stem} for s in shards]
    groups = task_groups(items, cluster_cpus)
    plan = ctx.plan
    if not plan.models:
        return ShardTasks([[(item["source"], item["stem"]) for item in group] for group in groups], ctx,
                          source_cpus(ctx))
    data = ray_data()  # imported here: rule recipes never need it
    dataset = data.from_items(items, override_num_blocks=len(groups))
    # A source task holds a few batches at a time; reserving that memory also keeps Ray from fusing the source
    # step into the first model stage's actors (operators with different resource requests are never fused).
    dataset = dataset.map_batches(read_and_slim, fn_kwargs={"ctx": ctx}, batch_size=None, batch_format="pyarrow",
                                  num_cpus=source_cpus(ctx), memory=SOURCE_BATCHES_HELD * ctx.read.batch_bytes)
    cpus = actor_cpus(ctx, node_cpus)
    for index in plan.models:
        resources = ctx.specs[index].resources
        dataset = dataset.map_batches(
            ModelActor,
            fn_constructor_kwargs={"ctx": ctx, "index": index, "cpus": cpus[index]},
            compute=data.ActorPoolStrategy(min_size=resources.pool_bounds[0], max_size=resources.pool_bounds[1]),
            num_gpus=resources.num_gpus if gpus_available else 0,
            num_cpus=cpus[index],
            batch_size=resources.batch_size,
            batch_format="pyarrow",
        )
    return dataset.map_batches(write_results, fn_kwargs={"ctx": ctx}, batch_size=None, batch_format="pyarrow",
                               num_cpus=SINK_CPUS)
