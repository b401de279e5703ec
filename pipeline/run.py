"""Running a curation job and re-selecting an existing one: the driver-side logic behind the CLI."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import yaml

from pipeline.config import RESOURCES, ConfigError, CurationConfig, StageSpec, parse_config
from pipeline.curate import apply_verdicts, verdict_columns
from pipeline.curate import stage_names as funnel_names
from pipeline.lease import LEASE_PATH, OutputLease
from pipeline.outputs import (MANIFESTS, SHARDS, STATE, TMP_MARK, OutputDir, PartInfo, ShardWriter,
                              aggregate_stats, commit_shard, manifest_bytes, parts_cover, shard_stats,
                              embeddings_name, write_shard_failure)
from pipeline.raystart import init_ray
from pipeline.shards import ReadParams, expand_inputs, iter_sample_batches, shard_stem
from pipeline.storage import read_ahead

CONFIG_FILE = "config.yaml"
STATS_FILE = "stats.json"


class UsageError(ValueError):
    """A problem with how the command was called (paths, directories); exit code 2."""


@dataclasses.dataclass
class RunResult:
    stats: dict
    processed: int
    skipped: int
    failed: list[dict]
    seconds: float
    samples_processed: int
    reselected: int = 0
    ray_start_seconds: float = 0.0  # joining or starting Ray, before the first shard

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def prepare_output(output: str | Path) -> OutputDir:
    """Create the output directory, or check that an existing one is a vlcurate output (or empty) before
    touching anything in it. Writing into it, cleanup included, waits for its lease: see ``claim_output``."""
    out = OutputDir(output)
    if out.remote:
        return _prepare_remote_output(out)
    if out.root.is_symlink() and not out.root.exists():
        raise UsageError(f"output directory {out.root} is a dangling symbolic link: choose another --output")
    if out.root.exists():
        if not out.root.is_dir():
            raise UsageError(f"output {out.root} exists and is not a directory: choose another --output")
        # Ours: the _state folder (created before anything else is written) with a config.yaml or a lease (a run
        # that has just started); a folder that merely holds some config.yaml is someone else's, and nothing in
        # it may be created or removed.
        state = out.root / STATE
        is_output = (state.is_dir() and not state.is_symlink()
                     and ((out.root / CONFIG_FILE).is_file() or os.path.lexists(out.root / LEASE_PATH)))
        if not is_output and not _only_empty_folders(out):
            raise UsageError(f"output directory {out.root} is not empty and holds no vlcurate output "
                             f"(no {CONFIG_FILE} and {STATE}/): choose a new or empty --output directory")
    try:
        out.create()
        probe = out.root / f".vlcurate-write-test{TMP_MARK}{os.urandom(6).hex()}"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        probe.unlink(missing_ok=True)  # the cleanup of a run holding the lease may have removed it already
    except OSError as exc:
        raise UsageError(f"output directory {out.root} is not writable ({exc.strerror}): choose another --output")
    return out


def _prepare_remote_output(out: OutputDir) -> OutputDir:
    """An object-store prefix: empty, or a vlcurate output (its config or lease is there); and writable."""
    try:
        fs, prefix = out.store.fs, out.store.prefix
        bucket = prefix.split("/", 1)[0]
        if not fs.exists(bucket):
            raise UsageError(f"output {out.root}: bucket {bucket} does not exist (or is not visible with these "
                             "credentials): create it, or check the endpoint and credentials in the environment")
        entries = fs.ls(prefix, detail=False, refresh=True) if fs.exists(prefix) else []
        if entries and not (out.is_file(CONFIG_FILE) or out.is_file(LEASE_PATH.as_posix())):
            raise UsageError(f"output {out.root} is not empty and holds no vlcurate output (no {CONFIG_FILE}): "
                             "choose a new or empty --output prefix")
        probe = f"{STATE}/.vlcurate-write-test{TMP_MARK}{os.urandom(6).hex()}"
        out.write_bytes(probe, b"")
        out.delete(probe)
    except UsageError:
        raise
    except (OSError, ValueError) as exc:
        raise UsageError(f"output {out.root} cannot be written ({_reason(exc)}): check the endpoint and credentials "
                         "in the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), or choose another --output")
    return out


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _only_empty_folders(out: OutputDir) -> bool:
    """Nothing in the directory but the empty folders a run creates first (a run that has just started)."""
    ours = {SHARDS, MANIFESTS, STATE}
    for entry in out.root.iterdir():
        if entry.name not in ours or entry.is_symlink() or not entry.is_dir() or any(entry.iterdir()):
            return False
    return True


@contextlib.contextmanager
def claim_output(output: str | Path, purpose: str):
    """``prepare_output``, then hold the output's lease (``pipeline.lease``) while the caller writes: a second
    writer is refused. Once the lease is held, what an interrupted run left half-written is removed."""
    out = prepare_output(output)
    with OutputLease(out.root, purpose):
        out.remove_temporary_files()
        yield out


def stage_names(config: CurationConfig) -> list[str]:
    return funnel_names(config.enabled_stages)


def saved_config(out: OutputDir) -> CurationConfig | None:
    if not out.is_file(CONFIG_FILE):
        return None
    return parse_config(yaml.safe_load(out.read_bytes(CONFIG_FILE)), [], source=str(out.store.location(CONFIG_FILE)))


def check_compatible(saved: CurationConfig, config: CurationConfig, output) -> None:
    """Refuse to mix results computed with different annotation settings in one output directory."""
    if saved.fingerprint() != config.fingerprint():
        changed = _changed_settings(saved, config)
        raise UsageError(
            f"{output} holds results computed with other stage settings ({changed}): pass --force to recompute "
            "every shard, or use a new --output directory"
        )


def _changed_settings(old: CurationConfig, new: CurationConfig) -> str:
    old_stages = {s["name"] if "name" in s else s["stage"]: s for s in old.to_dict()["stages"]}
    new_stages = {s["name"] if "name" in s else s["stage"]: s for s in new.to_dict()["stages"]}
    changes = []
    for name in sorted(set(old_stages) | set(new_stages)):
        a, b = old_stages.get(name, {}), new_stages.get(name, {})
        changes += [f"{name}.{key}" for key in sorted(set(a) | set(b))
                    if a.get(key) != b.get(key) and key != RESOURCES]  # resources never change a result
    return ", ".join(changes) or "stage order"


def run_curation(config: CurationConfig, inputs: list[str], output: str, address: str | None = None,
                 force: bool = False, progress: bool = True) -> RunResult:
    """Curate every input shard not yet completed with this configuration; see ``pipeline.outputs``. The run
    holds the output directory's lease from start to end."""
    shards = expand_inputs(inputs)
    with claim_output(output, "run --force" if force else "run") as out:
        return _curate(config, shards, out, address, force, progress)


def _curate(config: CurationConfig, shards: list, out: OutputDir, address: str | None, force: bool,
            progress: bool) -> RunResult:
    from pipeline.plan import build_plan
    from pipeline.steps import RunContext

    saved = saved_config(out)
    done = out.done_records()  # re-applying thresholds below rewrites their counts, never their fingerprints
    reselected = 0
    if saved is not None and not force:
        check_compatible(saved, config, out.root)
        if done and saved.to_dict() != config.to_dict():
            # Only thresholds differ: re-apply them to the completed shards from their manifests.
            reselected = reselect(out, config, records=done)
    out.write_bytes(CONFIG_FILE, yaml.safe_dump(config.to_dict(), sort_keys=False).encode())
    remember_inputs(out, [s.url for s in shards])
    fingerprint = config.fingerprint()
    pending = [s for s in shards if force or done.get(s.stem, {}).get("fingerprint") != fingerprint]
    forget_pending(out, pending, done)
    ray_started = time.perf_counter()
    if pending:
        init_ray(address)
    started = time.perf_counter()  # Ray start-up is reported on its own: on a cluster it is paid once
    committed: list[dict] = []
    if pending:
        ctx = RunContext(specs=config.enabled_stages, read=config.read, out_root=str(out.root),
                         fingerprint=fingerprint, config_name=config.name)
        plan = build_plan(pending, ctx, gpus_available=cluster_gpus(config))
        committed = _consume(plan, pending, out, ctx, progress)
        for failure in (s for s in committed if s["error"] is not None):
            write_shard_failure(out, failure["stem"], failure["source"], failure["error"], fingerprint)
            out.clear_parts(failure["stem"])
    seconds = time.perf_counter() - started
    out.remove_temporary_files()
    out.remove_empty_parts_folder()
    if committed and any(getattr(s.params, "top_fraction", 0) or s.stage_class.decided_at_selection
                         for s in config.enabled_stages):
        # Top fractions and duplicates are decided over the whole output: new shards move them. The run's Ray
        # workers have just written these shards, so Ray tasks judge and rewrite them (with duplicates, most).
        reselect(out, config, on_ray=True)
    stats = write_stats(out, config)
    failed = [s for s in committed if s["error"] is not None]
    return RunResult(stats=stats, processed=len(pending), skipped=len(shards) - len(pending), failed=failed,
                     seconds=seconds, samples_processed=sum(s["total"] or 0 for s in committed),
                     reselected=reselected, ray_start_seconds=started - ray_started)


def forget_pending(out: OutputDir, pending: list, done: dict[str, dict]) -> None:
    """Before shards are curated (again): a stale completion record must not vouch for outputs about to be
    replaced, an earlier attempt's parts must never be joined with new ones, and an earlier failure record or
    embeddings (computed with other settings) must not outlive the new outputs. Only what exists is removed,
    found with one listing per folder, so that a first run over 100,000 shards into an object store sends no
    request per shard before it starts, and its commits none beyond their own writes."""
    with_parts, with_failures, with_embeddings = (out.stems_with_parts(), out.stems_with_failures(),
                                                  out.stems_with_embeddings())
    for shard in pending:
        if shard.stem in done:
            out.delete(out.done_name(shard.stem))
        if shard.stem in with_failures:
            out.delete(out.failed_name(shard.stem))
        if shard.stem in with_embeddings:
            out.delete(embeddings_name(shard.stem))
        if shard.stem in with_parts:
            out.clear_parts(shard.stem)


def cluster_gpus(config: CurationConfig) -> float:
    """GPUs the cluster offers to model stages; warns when a stage wants GPUs that are not there."""
    import ray

    wanted = [s.name for s in config.enabled_stages if s.stage_class.uses_actor_pool and s.resources.num_gpus > 0]
    if not wanted:
        return 0.0
    gpus = float(ray.cluster_resources().get("GPU", 0))
    if gpus == 0:
        print(f"vlcurate: warning: no GPU in the Ray cluster; {', '.join(wanted)} will run on CPU actors",
              file=sys.stderr)
    return gpus


INPUTS_FILE = "inputs.json"


def remember_inputs(out: OutputDir, urls: list[str]) -> None:
    """Every shard ever given for this output directory, so that `vlcurate status` can list pending ones."""
    name = f"{STATE}/{INPUTS_FILE}"
    known = set(out.read_json(name)["shards"]) if out.is_file(name) else set()
    if not set(urls) <= known:
        out.write_json(name, {"shards": sorted(known | set(urls))})


DRIVER_COMMITS_REMOTE = 8  # shards the driver commits at once into an object store (one at a time locally)


class ShardBook:
    """The driver's view of the shards in flight: the parts written so far and how many samples each shard has.
    A shard is committed once its parts cover all of its samples (retried tasks rewrite the same parts, so a
    part is counted once by its first position).

    A commit reads the shard's parts and writes its outputs: into an object store that is a round trip per part
    and per file, so commits run on ``committer``'s threads while the driver takes in more summaries; the book
    itself is only touched by the driver's thread (``add`` and ``committed``)."""

    def __init__(self, shards, out: OutputDir, ctx, committer: concurrent.futures.Executor):
        self.sources = {s.stem: s.url for s in shards}
        self.out, self.ctx, self.committer = out, ctx, committer
        self.parts: dict[str, dict[int, PartInfo]] = {stem: {} for stem in self.sources}
        self.totals: dict[str, int] = {}
        self.committing: dict[str, concurrent.futures.Future] = {}
        self.finished: dict[str, dict] = {}  # stem -> {"stem", "source", "total", "kept", "error"}

    def add(self, summary: dict) -> dict | None:
        """Take one summary row; returns the shard's final result when this row finished it (a commit it
        started finishes later: ``committed``)."""
        stem = summary["stem"]
        if stem in self.finished or stem in self.committing or stem not in self.sources:
            return None
        if summary["error"] is not None:
            return self._finish(stem, total=0, kept=0, error=summary["error"])
        if summary["committed"]:
            return self._finish(stem, total=summary["total"], kept=summary["kept"], error=None)
        if summary["end"]:
            self.totals[stem] = summary["total"]
        else:
            self.parts[stem][summary["first"]] = PartInfo(first=summary["first"], rows=summary["rows"],
                                                          tar_bytes=summary["part_bytes"],
                                                          timing=json.loads(summary["timing"] or "{}"))
        total = self.totals.get(stem)
        if total is not None and parts_cover(list(self.parts[stem].values()), total):
            self.committing[stem] = self.committer.submit(
                commit_shard, self.out, stem, self.sources[stem], list(self.parts.pop(stem).values()), total,
                funnel_names(self.ctx.stages()), self.ctx.fingerprint, self.ctx.config_name)
        return None

    def committed(self, wait: bool = False) -> list[dict]:
        """The final results of the commits that have returned (with ``wait``, of every commit started)."""
        from pipeline.steps import describe

        if wait:
            concurrent.futures.wait(list(self.committing.values()))
        results = []
        for stem, future in list(self.committing.items()):
            if not future.done():
                continue
            del self.committing[stem]
            try:
                record = future.result()
            except Exception as exc:  # noqa: BLE001 - this shard fails; the others go on
                results.append(self._finish(stem, total=0, kept=0, error=f"committing outputs: {describe(exc)}"))
            else:
                results.append(self._finish(stem, total=record["total"], kept=record["kept"], error=None))
        return results

    def _finish(self, stem: str, total: int, kept: int, error: str | None) -> dict:
        self.parts.pop(stem, None)
        self.finished[stem] = {"stem": stem, "source": self.sources[stem], "total": total, "kept": kept,
                               "error": error}
        return self.finished[stem]

    def unfinished(self) -> list[dict]:
        """Shards the run ended without committing: their parts do not cover their samples."""
        return [self._finish(stem, 0, 0, "incomplete: the parts written do not cover every sample of the shard "
                                         "(rerun to redo it)")
                for stem in list(self.sources) if stem not in self.finished and stem not in self.committing]


def _consume(plan, shards, out: OutputDir, ctx, progress: bool) -> list[dict]:
    from tqdm import tqdm

    results: list[dict] = []
    samples = kept = 0
    committers = DRIVER_COMMITS_REMOTE if out.remote else 1
    with (concurrent.futures.ThreadPoolExecutor(max_workers=committers, thread_name_prefix="commit") as committer,
          tqdm(total=len(shards), unit="shard", disable=not progress, file=sys.stderr, desc="curating") as bar):
        book = ShardBook(shards, out, ctx, committer)

        def count(finished: list[dict]) -> None:
            nonlocal samples, kept
            for result in finished:
                results.append(result)
                samples += result["total"]
                kept += result["kept"]
                bar.set_postfix(samples=samples, kept=kept, failed=sum(1 for r in results if r["error"]))
                bar.update(1)

        for summary in plan.iter_rows():
            result = book.add(summary)
            count(([result] if result is not None else []) + book.committed())
        count(book.committed(wait=True))
    return results + book.unfinished()


def write_stats(out: OutputDir, config: CurationConfig) -> dict:
    done = list(out.done_records().values())
    failed = [f for stem, f in out.failed_records().items() if stem not in {d["stem"] for d in done}]
    stats = aggregate_stats(done, stage_names(config), failed)
    stats["config"] = config.name
    out.write_json(STATS_FILE, stats)
    return stats


def load_saved_config(output: str | Path | OutputDir, overrides: list[str] | None = None) -> CurationConfig:
    out = output if isinstance(output, OutputDir) else OutputDir(output)
    if not out.is_file(CONFIG_FILE):
        raise UsageError(f"{output} is not a vlcurate output directory (no {CONFIG_FILE}): run 'vlcurate run' first")
    return parse_config(yaml.safe_load(out.read_bytes(CONFIG_FILE)), overrides or [],
                        source=str(out.store.location(CONFIG_FILE)))


def manifests_frame(output: str | Path | OutputDir) -> pl.LazyFrame:
    out = output if isinstance(output, OutputDir) else OutputDir(output)
    sources, options = out.polars_manifests()
    if not sources:
        raise UsageError(f"{output} has no manifests yet: run 'vlcurate run' first")
    return pl.scan_parquet(sources, missing_columns="insert", extra_columns="ignore", storage_options=options)


def select_thresholds(output: str, overrides: list[str], address: str | None = None) -> dict:
    """Re-apply new thresholds from the manifests: verdicts, manifests, output shards and stats change; no stage
    annotates again. Only settings listed in a stage's ``thresholds`` may change. Holds the output directory's
    lease, as a run does. With ``address``, the shards are judged and rewritten in tasks on that Ray cluster
    (its workers must reach the output and the input shards), else in this process."""
    load_saved_config(output, overrides)  # a vlcurate output and valid settings, else nothing is touched
    out = OutputDir(output)
    with OutputLease(out.root, "select"):
        current = load_saved_config(output)
        new = load_saved_config(output, overrides)
        if new.fingerprint() != current.fingerprint():
            raise ConfigError(
                f"select can only change thresholds, not {_changed_settings(current, new)}; thresholds are: "
                + ", ".join(_threshold_keys(new.enabled_stages))
                + ". Other settings change the scores: rerun 'vlcurate run ... --force' instead"
            )
        out.remove_temporary_files()
        if address:
            init_ray(address)
        changed = reselect(out, new, on_ray=bool(address))
        stats = write_stats(out, new)
    stats["shards_reselected"] = changed
    return stats


def reselect(out: OutputDir, config: CurationConfig, on_ray: bool = False,
             records: dict[str, dict] | None = None) -> int:
    """Recompute verdicts of every completed shard with ``config``'s thresholds; rewrite the shards that change.
    Returns how many shards changed. What depends on every shard (top fractions, duplicates) is decided here;
    the shards are then judged and rewritten here, one after another, or with ``on_ray`` in Ray tasks (whose
    workers must reach the output and the input shards, as a run's do). ``records``: the completion records,
    where the caller has just read them. The saved config is updated last."""
    from pipeline.dedup import resolve_duplicates
    from pipeline.semantic_dedup import resolve_semantic_duplicates

    stages = resolve_top_fractions(out, [s.build() for s in config.enabled_stages])
    stages = resolve_semantic_duplicates(out, resolve_duplicates(out, stages))
    names = stage_names(config)
    completed = list((out.done_records() if records is None else records).items())
    if on_ray and len(completed) > 1:
        changed_shards = _reselect_on_ray(out, completed, stages, names, config.read)
    else:
        changed_shards = reselect_shards(str(out.root), completed, stages, names, config.read)
    out.write_bytes(CONFIG_FILE, yaml.safe_dump(config.to_dict(), sort_keys=False).encode())
    return changed_shards


def reselect_shards(out_root: str, records: list[tuple[str, dict]], stages: list, names: list[str],
                    read: ReadParams) -> int:
    """Judge completed shards (stem, completion record) again with resolved ``stages``; rewrite those whose
    verdicts change (tar from the input shard, manifest, then the record). Returns how many changed."""
    out = OutputDir(out_root)
    changed_shards = 0
    stems = [stem for stem, _ in records]
    for (stem, record), manifest in zip(records, read_ahead(stems, out.read_manifest)):
        updated = apply_verdicts(manifest, stages)
        if all(updated.column(c).equals(manifest.column(c)) for c in verdict_columns(stages)
               if c in manifest.column_names):
            continue
        changed_shards += 1
        _rewrite_shard(out, stem, record["source"], updated, read)
        out.write_bytes(out.manifest_name(stem), manifest_bytes(updated))
        out.write_json(out.done_name(stem), {**record, **shard_stats(updated.column("drop_reason").to_pylist(), names)})
    return changed_shards


def _reselect_on_ray(out: OutputDir, records: list[tuple[str, dict]], stages: list, names: list[str],
                     read: ReadParams) -> int:
    """``reselect_shards`` on groups of consecutive shards, one Ray task each; each task carries only its own
    shards' share of the verdicts decided over the whole output. Every task has ended when this returns or
    raises (none may write once the output's lease is let go); a task's error is raised as it was raised."""
    import ray

    from pipeline.plan import TASK_RETRIES, task_groups

    task = ray.remote(reselect_shards).options(num_cpus=1, max_retries=TASK_RETRIES)
    running = []
    for group in task_groups(records, ray.cluster_resources().get("CPU", 0) or 1.0):
        sources = {record.get("source") for _, record in group}
        running.append(task.remote(str(out.root), group, [s.for_shards(sources) for s in stages], names, read))
    changed_shards, failure = 0, None
    for ref in running:
        try:
            changed_shards += ray.get(ref)
        except ray.exceptions.RayError as exc:
            failure = failure or exc
    if isinstance(failure, ray.exceptions.RayTaskError) and isinstance(failure.cause, Exception):
        raise failure.cause from None
    if failure is not None:
        raise failure
    return changed_shards


def resolve_top_fractions(out: OutputDir, stages: list) -> list:
    """A stage with ``top_fraction`` keeps the best-scored fraction of the samples that reach it, over every
    completed shard: its threshold becomes the score of the last sample in that fraction (exact, from the
    manifests)."""
    from pipeline.curate import drop_reason_expr

    resolved = list(stages)
    for position, stage in enumerate(stages):
        fraction = getattr(stage.params, "top_fraction", 0.0)
        if not fraction or not out.manifest_stems():
            continue
        score = next(iter(stage.columns))
        frame = manifests_frame(out)  # lazy: only the verdict columns and the score are read
        if "error_stage" not in frame.collect_schema().names():
            frame = frame.with_columns(pl.lit(None, dtype=pl.String).alias("error_stage"))
        reached = frame.filter(drop_reason_expr(resolved[:position]).is_null() & pl.col(score).is_not_null())
        count = reached.select(pl.len()).collect().item()
        if count == 0:
            continue
        keep = max(1, math.ceil(fraction * count))
        cutoff = float(reached.select(pl.col(score).sort(descending=True).get(keep - 1)).collect().item())
        params = dataclasses.replace(stage.params, threshold=max(stage.params.threshold, cutoff))
        resolved[position] = type(stage)(params)
    return resolved


def _threshold_keys(specs: list[StageSpec]) -> list[str]:
    return [f"{s.name}.{key}" for s in specs for key in sorted(s.stage_class.thresholds)]


def _rewrite_shard(out: OutputDir, stem: str, source: str, manifest: pa.Table, read: ReadParams) -> None:
    """Write the output shard again from the input shard's bytes and the manifest's (unchanged) annotations,
    batch by batch, so memory stays bounded whatever the shard's size."""
    rows = manifest.drop_columns(["shard", "image_bytes"]).sort_by("position")
    positions = rows.column("position").to_pylist()
    if positions != list(range(len(positions))):
        raise UsageError(f"manifest of {stem} does not list positions 0..{len(positions) - 1}: rerun with --force")
    writer = ShardWriter(out, stem, source)
    try:
        for batch in iter_sample_batches(source, read):
            first = batch.column("position")[0].as_py()
            part = rows.slice(first, batch.num_rows)
            if part.column("key").to_pylist() != batch.column("key").to_pylist():
                raise UsageError(f"input shard {source} changed since it was curated: rerun with --force")
            part = part.append_column("image", batch.column("image"))
            writer.add_members(part.append_column("metadata_json", batch.column("metadata_json")))
        writer.finish_tar()
    finally:
        writer.abort()


def shard_status(output: str, inputs: list[str] | None = None) -> dict[str, list[str]]:
    """Completed, failed and pending shards; pending is judged against ``inputs`` or every input seen so far."""
    out = OutputDir(output)
    if not out.is_file(CONFIG_FILE):
        raise UsageError(f"{output} is not a vlcurate output directory (no {CONFIG_FILE}): run 'vlcurate run' first")
    done = out.done_records()
    failed = {stem: rec for stem, rec in out.failed_records().items() if stem not in done}
    if inputs:
        known = [s.stem for s in expand_inputs(inputs)]
    else:
        name = f"{STATE}/{INPUTS_FILE}"
        known = [shard_stem(url) for url in out.read_json(name)["shards"]] if out.is_file(name) else []
    return {
        "completed": sorted(done),
        "failed": sorted(f"{stem}: {rec['error']}" for stem, rec in failed.items()),
        "pending": sorted(stem for stem in known if stem not in done and stem not in failed),
    }
