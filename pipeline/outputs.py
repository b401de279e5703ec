"""The output directory: cleaned shards, Parquet manifests, per-shard completion records and statistics.

Layout of ``OUT``::

    shards/{stem}.tar            kept samples: original image bytes, cleaned .txt, input .json + results
    manifests/{stem}.parquet     every sample of the input shard: captions, every score, kept, drop_reason
    _state/{stem}.done.json      written last: the shard is complete iff this exists (counts, fingerprint)
    _state/{stem}.failed.json    the shard could not be processed, with the reason
    stats.json                   exact totals over all completed shards
    config.yaml                  the resolved configuration of the run

Every file is written under a temporary name and renamed into place, and the completion record comes last,
so a crash at any moment leaves either a complete shard or one that the next run redoes from scratch.
"""

from __future__ import annotations

import collections
import io
import json
import os
import tarfile
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

TMP_MARK = ".tmp-"
MANIFEST_EXCLUDED = ("image", "metadata_json")


class OutputDir:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.shards = self.root / "shards"
        self.manifests = self.root / "manifests"
        self.state = self.root / "_state"

    def create(self) -> None:
        for folder in (self.shards, self.manifests, self.state):
            folder.mkdir(parents=True, exist_ok=True)

    def shard_path(self, stem: str) -> Path:
        return self.shards / f"{stem}.tar"

    def manifest_path(self, stem: str) -> Path:
        return self.manifests / f"{stem}.parquet"

    def done_path(self, stem: str) -> Path:
        return self.state / f"{stem}.done.json"

    def failed_path(self, stem: str) -> Path:
        return self.state / f"{stem}.failed.json"

    def remove_temporary_files(self) -> int:
        """Delete what an interrupted run left half-written; returns how many files were removed."""
        removed = 0
        for folder in (self.shards, self.manifests, self.state, self.root):
            if folder.is_dir():
                for path in folder.glob(f"*{TMP_MARK}*"):
                    path.unlink(missing_ok=True)
                    removed += 1
        return removed

    def done_records(self) -> dict[str, dict]:
        return self._records("*.done.json")

    def failed_records(self) -> dict[str, dict]:
        return self._records("*.failed.json")

    def _records(self, pattern: str) -> dict[str, dict]:
        records = {}
        if self.state.is_dir():
            for path in sorted(self.state.glob(pattern)):
                record = json.loads(path.read_text())
                records[record["stem"]] = record
        return records


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, fsync, rename into place, fsync the folder."""
    tmp = path.with_name(f"{path.name}{TMP_MARK}{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only still there when writing failed
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself is durable before the completion record follows
    finally:
        os.close(folder)


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def annotation_columns(table: pa.Table) -> list[str]:
    fixed = {"key", "position", "image", "image_ext", "metadata_json", "caption_original", "caption", "read_error",
             "error_stage", "error_message", "drop_reason", "kept", "shard", "output_captions"}
    return [name for name in table.column_names if name not in fixed]


def sample_json(metadata_json: str | None, results: dict[str, Any]) -> bytes:
    """The output .json: the input metadata with vlcurate's results under the "vlcurate" key."""
    metadata: dict[str, Any] = {}
    if metadata_json:
        try:
            parsed = json.loads(metadata_json)
            metadata = parsed if isinstance(parsed, dict) else {"metadata": parsed}
        except json.JSONDecodeError:
            metadata = {"metadata_raw": metadata_json}
    metadata["vlcurate"] = results
    return json.dumps(metadata, ensure_ascii=False).encode("utf-8")


def _tar_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0  # deterministic bytes: a rerun writes the same archive
    archive.addfile(info, io.BytesIO(data))


def build_shard_tar(table: pa.Table, source: str) -> bytes:
    """The kept samples as a WebDataset tar: image bytes unchanged, the output caption, metadata plus results.

    When a caption policy added extra pairs (CapFilt's ``extra_pairs``), each becomes a sample of its own,
    ``KEY_pairN``, with the same image bytes."""
    extra = annotation_columns(table)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for row in table.filter(table.column("kept")).to_pylist():
            results = {"source_shard": source, "caption_original": row["caption_original"]}
            results.update({name: row[name] for name in extra if row[name] is not None})
            captions = row.get("output_captions") or [row["caption"]]
            for index, caption in enumerate(captions):
                key = row["key"] if index == 0 else f"{row['key']}_pair{index}"
                pair_results = results if index == 0 else {**results, "pair_of": row["key"]}
                _tar_member(archive, f"{key}.{row['image_ext']}", row["image"])
                _tar_member(archive, f"{key}.txt", caption.encode("utf-8"))
                _tar_member(archive, f"{key}.json", sample_json(row["metadata_json"], pair_results))
    return buffer.getvalue()


def manifest_table(table: pa.Table, source: str) -> pa.Table:
    sizes = pa.array([len(b) if b is not None else None for b in table.column("image").to_pylist()], pa.int64())
    manifest = table.drop_columns([c for c in MANIFEST_EXCLUDED if c in table.column_names])
    manifest = manifest.add_column(1, "shard", pa.array([source] * table.num_rows, pa.string()))
    return manifest.append_column("image_bytes", sizes)


def shard_stats(drop_reasons: list[str | None], stage_names: list[str]) -> dict[str, Any]:
    """Exact counts for one shard: totals, drops per reason, and the funnel stage by stage."""
    by_reason = collections.Counter(r for r in drop_reasons if r is not None)
    by_stage = collections.Counter(r.split(":", 1)[0] for r in drop_reasons if r is not None)
    return {
        "total": len(drop_reasons),
        "kept": sum(1 for r in drop_reasons if r is None),
        "dropped_by_reason": dict(sorted(by_reason.items())),
        "dropped_by_stage": {name: by_stage.get(name, 0) for name in stage_names},
    }


def write_shard_outputs(out: OutputDir, stem: str, source: str, table: pa.Table, stage_names: list[str],
                        fingerprint: str, config_name: str) -> dict[str, Any]:
    """Write shard, manifest and then the completion record; returns the record."""
    atomic_write_bytes(out.shard_path(stem), build_shard_tar(table, source))
    sink = pa.BufferOutputStream()
    pq.write_table(manifest_table(table, source), sink, compression="zstd")
    atomic_write_bytes(out.manifest_path(stem), sink.getvalue().to_pybytes())
    record = {
        "stem": stem,
        "source": source,
        "fingerprint": fingerprint,
        "config": config_name,
        **shard_stats(table.column("drop_reason").to_pylist(), stage_names),
    }
    out.failed_path(stem).unlink(missing_ok=True)
    atomic_write_json(out.done_path(stem), record)
    return record


def write_shard_failure(out: OutputDir, stem: str, source: str, reason: str, fingerprint: str) -> dict[str, Any]:
    record = {"stem": stem, "source": source, "fingerprint": fingerprint, "error": reason}
    atomic_write_json(out.failed_path(stem), record)
    return record


def aggregate_stats(records: list[dict], stage_names: list[str], failed: list[dict]) -> dict[str, Any]:
    """Global statistics: sums of the per-shard records (exact integers), with the funnel in stage order."""
    total = sum(r["total"] for r in records)
    kept = sum(r["kept"] for r in records)
    by_reason: collections.Counter = collections.Counter()
    by_stage: collections.Counter = collections.Counter()
    for r in records:
        by_reason.update(r["dropped_by_reason"])
        by_stage.update(r["dropped_by_stage"])
    funnel, remaining = [], total
    for name in stage_names:
        dropped = by_stage.get(name, 0)
        funnel.append({"stage": name, "in": remaining, "dropped": dropped, "out": remaining - dropped})
        remaining -= dropped
    return {
        "total": total,
        "kept": kept,
        "dropped": total - kept,
        "dropped_by_reason": dict(sorted(by_reason.items())),
        "funnel": funnel,
        "shards_completed": len(records),
        "shards_failed": [{"source": f["source"], "error": f["error"]} for f in failed],
        "per_shard": {
            r["stem"]: {"source": r["source"], "total": r["total"], "kept": r["kept"],
                        "dropped_by_reason": r["dropped_by_reason"]}
            for r in records
        },
    }
