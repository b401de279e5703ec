"""Running a curation job and re-selecting an existing one: the driver-side logic behind the CLI."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from pipeline.config import ConfigError, CurationConfig, StageSpec, parse_config
from pipeline.curate import READ_STAGE, apply_verdicts
from pipeline.outputs import (OutputDir, aggregate_stats, atomic_write_bytes, atomic_write_json, build_shard_tar,
                              shard_stats, write_shard_failure)
from pipeline.shards import expand_inputs, read_shard, shard_stem

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

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def init_ray(address: str | None = None) -> None:
    """Join ``address`` (or $RAY_ADDRESS), else start Ray locally on all CPUs; quiet Ray Data's own output."""
    import ray
    import ray.data  # configures Ray Data's loggers on import: adjust them afterwards

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver shows one bar of its own, per shard
    context.print_on_execution_start = False


def prepare_output(output: str | Path) -> OutputDir:
    out = OutputDir(output)
    try:
        out.create()
        probe = out.root / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"output directory {out.root} is not writable ({exc.strerror}): choose another --output")
    out.remove_temporary_files()
    return out


def stage_names(config: CurationConfig) -> list[str]:
    return [READ_STAGE, *(s.name for s in config.enabled_stages)]


def saved_config(out: OutputDir) -> CurationConfig | None:
    path = out.root / CONFIG_FILE
    if not path.is_file():
        return None
    return parse_config(yaml.safe_load(path.read_text()), [], source=str(path))


def check_compatible(saved: CurationConfig, config: CurationConfig, output: Path) -> None:
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
        changes += [f"{name}.{key}" for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]
    return ", ".join(changes) or "stage order"


def run_curation(config: CurationConfig, inputs: list[str], output: str, address: str | None = None,
                 force: bool = False, progress: bool = True) -> RunResult:
    """Curate every input shard not yet completed with this configuration; see ``pipeline.outputs``."""
    from pipeline.plan import build_plan

    shards = expand_inputs(inputs)
    out = prepare_output(output)
    saved = saved_config(out)
    reselected = 0
    if saved is not None and not force:
        check_compatible(saved, config, out.root)
        if saved.to_dict() != config.to_dict():
            # Only thresholds differ: re-apply them to the completed shards from their manifests.
            reselected = reselect(out, config)
    atomic_write_bytes(out.root / CONFIG_FILE, yaml.safe_dump(config.to_dict(), sort_keys=False).encode())
    remember_inputs(out, [s.url for s in shards])
    fingerprint = config.fingerprint()
    done = out.done_records()
    pending = [s for s in shards if force or done.get(s.stem, {}).get("fingerprint") != fingerprint]
    summaries = []
    if pending:
        init_ray(address)
    started = time.perf_counter()  # Ray start-up excluded: on a cluster it is paid once, not per run
    if pending:
        plan = build_plan(pending, config.enabled_stages, str(out.root), fingerprint, config.name,
                          gpus_available=cluster_gpus(config))
        summaries = _consume(plan, len(pending), progress)
        for failure in (s for s in summaries if s["error"] is not None):
            write_shard_failure(out, failure["stem"], failure["shard"], failure["error"], fingerprint)
    seconds = time.perf_counter() - started
    out.remove_temporary_files()
    if any(getattr(s.params, "top_fraction", 0) for s in config.enabled_stages) and summaries:
        reselected += reselect(out, config)  # a top fraction is exact only over the whole run
    stats = write_stats(out, config)
    failed = [s for s in summaries if s["error"] is not None]
    return RunResult(stats=stats, processed=len(pending), skipped=len(shards) - len(pending), failed=failed,
                     seconds=seconds, samples_processed=sum(s["total"] for s in summaries), reselected=reselected)


def cluster_gpus(config: CurationConfig) -> float:
    """GPUs the cluster offers to model stages; warns when a stage wants GPUs that are not there."""
    import ray

    wanted = [s.name for s in config.enabled_stages if s.stage_class.uses_actor_pool and s.params.num_gpus > 0]
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
    path = out.state / INPUTS_FILE
    known = set(json.loads(path.read_text())["shards"]) if path.is_file() else set()
    if not set(urls) <= known:
        atomic_write_json(path, {"shards": sorted(known | set(urls))})


def _consume(plan, total_shards: int, progress: bool) -> list[dict]:
    from tqdm import tqdm

    summaries = []
    samples = kept = 0
    with tqdm(total=total_shards, unit="shard", disable=not progress, file=sys.stderr,
              desc="curating") as bar:
        for summary in plan.iter_rows():
            summaries.append(summary)
            samples += summary["total"]
            kept += summary["kept"]
            bar.set_postfix(samples=samples, kept=kept, failed=sum(1 for s in summaries if s["error"]))
            bar.update(1)
    return summaries


def write_stats(out: OutputDir, config: CurationConfig) -> dict:
    done = list(out.done_records().values())
    failed = [f for stem, f in out.failed_records().items() if stem not in {d["stem"] for d in done}]
    stats = aggregate_stats(done, stage_names(config), failed)
    stats["config"] = config.name
    atomic_write_json(out.root / STATS_FILE, stats)
    return stats


def load_saved_config(output: str | Path, overrides: list[str] | None = None) -> CurationConfig:
    path = Path(output) / CONFIG_FILE
    if not path.is_file():
        raise UsageError(f"{output} is not a vlcurate output directory (no {CONFIG_FILE}): run 'vlcurate run' first")
    return parse_config(yaml.safe_load(path.read_text()), overrides or [], source=str(path))


def manifests_frame(output: str | Path) -> pl.LazyFrame:
    out = OutputDir(output)
    files = sorted(out.manifests.glob("*.parquet"))
    if not files:
        raise UsageError(f"{output} has no manifests yet: run 'vlcurate run' first")
    return pl.scan_parquet(files, missing_columns="insert", extra_columns="ignore")


def select_thresholds(output: str, overrides: list[str]) -> dict:
    """Re-apply new thresholds from the manifests: verdicts, manifests, output shards and stats change; no stage
    annotates again. Only settings listed in a stage's ``thresholds`` may change."""
    current = load_saved_config(output)
    new = load_saved_config(output, overrides)
    if new.fingerprint() != current.fingerprint():
        raise ConfigError(
            f"select can only change thresholds, not {_changed_settings(current, new)}; thresholds are: "
            + ", ".join(_threshold_keys(new.enabled_stages))
            + ". Other settings change the scores: rerun 'vlcurate run ... --force' instead"
        )
    out = OutputDir(output)
    out.remove_temporary_files()
    changed = reselect(out, new)
    stats = write_stats(out, new)
    stats["shards_reselected"] = changed
    return stats


def reselect(out: OutputDir, config: CurationConfig) -> int:
    """Recompute verdicts of every completed shard with ``config``'s thresholds; rewrite the shards that change.
    Returns how many shards changed. The saved config is updated last."""
    stages = resolve_top_fractions(out, [s.build() for s in config.enabled_stages])
    names = stage_names(config)
    changed_shards = 0
    for stem, record in out.done_records().items():
        manifest = pq.read_table(out.manifest_path(stem))
        updated = apply_verdicts(manifest, stages)
        if all(updated.column(c).equals(manifest.column(c)) for c in ("drop_reason", "output_captions")
               if c in manifest.column_names):
            continue
        changed_shards += 1
        _rewrite_shard(out, stem, record["source"], updated)
        sink = pa.BufferOutputStream()
        pq.write_table(updated, sink, compression="zstd")
        atomic_write_bytes(out.manifest_path(stem), sink.getvalue().to_pybytes())
        atomic_write_json(out.done_path(stem),
                          {**record, **shard_stats(updated.column("drop_reason").to_pylist(), names)})
    atomic_write_bytes(out.root / CONFIG_FILE, yaml.safe_dump(config.to_dict(), sort_keys=False).encode())
    return changed_shards


def resolve_top_fractions(out: OutputDir, stages: list) -> list:
    """A stage with ``top_fraction`` keeps the best-scored fraction of the samples that reach it, over every
    completed shard: its threshold becomes the score of the last sample in that fraction (exact, from the
    manifests)."""
    from pipeline.curate import drop_reason_expr

    resolved = list(stages)
    for position, stage in enumerate(stages):
        fraction = getattr(stage.params, "top_fraction", 0.0)
        if not fraction or not out.manifests.is_dir() or not any(out.manifests.glob("*.parquet")):
            continue
        score = next(iter(stage.columns))
        frame = manifests_frame(out.root)  # lazy: only the verdict columns and the score are read
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


def _rewrite_shard(out: OutputDir, stem: str, source: str, manifest: pa.Table) -> None:
    """Write the output shard again from the input shard's bytes and the manifest's (unchanged) annotations."""
    original = read_shard(source)
    row_of = {key: i for i, key in enumerate(original.column("key").to_pylist())}
    rows = pa.array([row_of[key] for key in manifest.column("key").to_pylist()], pa.int64())
    table = manifest.drop_columns(["shard", "image_bytes"])
    table = table.append_column("image", original.column("image").take(rows))
    table = table.append_column("metadata_json", original.column("metadata_json").take(rows))
    atomic_write_bytes(out.shard_path(stem), build_shard_tar(table, source))


def shard_status(output: str, inputs: list[str] | None = None) -> dict[str, list[str]]:
    """Completed, failed and pending shards; pending is judged against ``inputs`` or every input seen so far."""
    out = OutputDir(output)
    if not (out.root / CONFIG_FILE).is_file():
        raise UsageError(f"{output} is not a vlcurate output directory (no {CONFIG_FILE}): run 'vlcurate run' first")
    done = out.done_records()
    failed = {stem: rec for stem, rec in out.failed_records().items() if stem not in done}
    if inputs:
        known = [s.stem for s in expand_inputs(inputs)]
    else:
        path = out.state / INPUTS_FILE
        known = [shard_stem(url) for url in json.loads(path.read_text())["shards"]] if path.is_file() else []
    return {
        "completed": sorted(done),
        "failed": sorted(f"{stem}: {rec['error']}" for stem, rec in failed.items()),
        "pending": sorted(stem for stem in known if stem not in done and stem not in failed),
    }
