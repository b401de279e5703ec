"""The output directory: cleaned shards, Parquet manifests, per-shard completion records and statistics.

Layout of ``OUT``::

    shards/{stem}.tar            kept samples: original image bytes, cleaned .txt, input .json + results
    manifests/{stem}.parquet     every sample of the input shard: captions, every score, kept, drop_reason
    embeddings/{stem}.npy        CLIP image embeddings (float16, a row per sample, NaN where not scored), when
                                 clip_score saves them (``save_embeddings``) for semantic deduplication
    _state/{stem}.done.json      written last: the shard is complete iff this exists (counts, fingerprint, timing)
    _state/{stem}.failed.json    the shard could not be processed, with the reason
    _state/parts/{stem}/         work in progress: one part per run of consecutive samples (a tar fragment and
                                 its manifest rows, named by the first sample's position), and the rows carried
                                 past the model actors; joined into the shard's outputs, then removed
    _state/lease.json            the lease of the one process writing the output (``pipeline.lease``)
    stats.json                   exact totals over all completed shards
    config.yaml                  the resolved configuration of the run

``OUT`` is a local folder or a URL prefix in an object store (``pipeline.storage``). Every file appears whole
(locally: written under a temporary name and renamed into place; in an object store: one atomic put or a
completed multipart upload), and the completion record comes last, so a crash at any moment leaves either a
complete shard or one that the next run redoes from scratch. Readers go through the completion records. Output
bytes do not depend on how samples were batched: a shard's tar is its parts' fragments in position order plus
the end-of-archive blocks, and its manifest is written from the parts' rows joined into one table.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import tarfile
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.shards import byte_sum
from pipeline.storage import TMP_MARK, open_storage
from stages.semantic_dedup import EMBEDDING_COLUMN  # saved beside the manifest (float16 .npy), never in it

MANIFEST_EXCLUDED = ("image", "metadata_json")
SHARDS, MANIFESTS, STATE, EMBEDDINGS = "shards", "manifests", "_state", "embeddings"
PARTS = f"{STATE}/parts"

__all__ = ["TMP_MARK"]


class OutputDir:
    """An output directory, local or in an object store (``pipeline.storage``); files are named relative to it."""

    def __init__(self, root: str | os.PathLike):
        self.store = open_storage(root)
        self.root = self.store.root  # a Path for a local folder, the URL otherwise
        self.remote = self.store.remote

    def __str__(self) -> str:
        return str(self.store)

    def create(self) -> None:
        if not self.remote:
            for folder in (SHARDS, MANIFESTS, STATE):
                (self.root / folder).mkdir(parents=True, exist_ok=True)

    @staticmethod
    def shard_name(stem: str) -> str:
        return f"{SHARDS}/{stem}.tar"

    @staticmethod
    def manifest_name(stem: str) -> str:
        return f"{MANIFESTS}/{stem}.parquet"

    @staticmethod
    def done_name(stem: str) -> str:
        return f"{STATE}/{stem}.done.json"

    @staticmethod
    def failed_name(stem: str) -> str:
        return f"{STATE}/{stem}.failed.json"

    @staticmethod
    def parts_name(stem: str) -> str:
        return f"{PARTS}/{stem}"

    def shard_path(self, stem: str):
        return self.store.location(self.shard_name(stem))

    def manifest_path(self, stem: str):
        return self.store.location(self.manifest_name(stem))

    def read_bytes(self, name: str) -> bytes:
        return self.store.read_bytes(name)

    def write_bytes(self, name: str, data: bytes, durable: bool = True) -> None:
        self.store.write_bytes(name, data, durable)

    def write_json(self, name: str, payload: Any) -> None:
        self.store.write_bytes(name, json_bytes(payload))

    def read_json(self, name: str) -> Any:
        return json.loads(self.store.read_bytes(name))

    def is_file(self, name: str) -> bool:
        return self.store.is_file(name)

    def delete(self, name: str) -> None:
        self.store.delete(name)

    def read_manifest(self, stem: str, columns: list[str] | None = None) -> pa.Table:
        with self.store.open_input(self.manifest_name(stem)) as source:
            return pq.read_table(source, columns=columns)

    def _stems(self, folder: str, suffix: str) -> list[str]:
        """The shard stems of the files in ``folder`` named STEM + ``suffix``, sorted (one listing)."""
        return [name[: -len(suffix)] for name in self.store.list_names(folder, suffix)]

    def manifest_stems(self) -> list[str]:
        return self._stems(MANIFESTS, ".parquet")

    def polars_manifests(self, stems: list[str] | None = None) -> tuple[list[str], dict | None]:
        """The manifests as sources for ``polars.scan_parquet``: paths or URLs, and storage options."""
        stems = self.manifest_stems() if stems is None else stems
        return self.store.polars_source([self.manifest_name(stem) for stem in stems])

    def remove_empty_parts_folder(self) -> None:
        self.store.remove_empty_folder(PARTS)  # only when empty: parts of shards in flight elsewhere stay

    def stems_with_parts(self) -> set[str]:
        """The shards with work in progress (one listing, whatever the number of shards)."""
        return set(self.store.list_folders(PARTS))

    def stems_with_failures(self) -> set[str]:
        return set(self._stems(STATE, ".failed.json"))

    def stems_with_embeddings(self) -> set[str]:
        return set(self._stems(EMBEDDINGS, ".npy"))

    def clear_parts(self, stem: str) -> None:
        """Remove a shard's work in progress (an earlier attempt's parts must never be joined with new ones)."""
        self.store.delete_folder(self.parts_name(stem))

    def remove_temporary_files(self) -> int:
        """Delete what an interrupted run left half-written (temporary files locally, open uploads in an object
        store). Returns how many were removed."""
        return self.store.remove_temporary_files([SHARDS, MANIFESTS, STATE, ""])

    def done_records(self) -> dict[str, dict]:
        return self._records(".done.json")

    def failed_records(self) -> dict[str, dict]:
        return self._records(".failed.json")

    def _records(self, suffix: str) -> dict[str, dict]:
        """Records by shard stem; the stem comes from the record's file name (never from its content), so an
        edited record cannot point a later write elsewhere."""
        stems = [stem for stem in self._stems(STATE, suffix) if is_safe_stem(stem)]
        records = {}
        for stem, data in zip(stems, self.store.read_many([f"{STATE}/{stem}{suffix}" for stem in stems])):
            try:
                record = json.loads(data) if data is not None else None
            except ValueError:
                record = None
            if isinstance(record, dict):  # else unreadable: the shard counts as not done, and is redone
                records[stem] = {**record, "stem": stem}
        return records


def is_safe_stem(stem: str) -> bool:
    """A shard name usable as a file name inside the output: no path separators, not '.', '..' or hidden."""
    return bool(stem) and not stem.startswith(".") and "/" not in stem and "\\" not in stem and stem.isprintable()


def embeddings_name(stem: str) -> str:
    return f"{EMBEDDINGS}/{stem}.npy"


def embeddings_bytes(column: pa.ChunkedArray | pa.Array) -> bytes | None:
    """One float16 row per sample (NaN rows where there is no embedding) as .npy bytes; None without any."""
    import numpy as np

    values = column.to_pylist()
    width = next((len(v) for v in values if v is not None), None)
    if width is None:
        return None
    rows = np.full((len(values), width), np.nan, np.float16)
    for index, value in enumerate(values):
        if value is not None and len(value) == width:
            rows[index] = value
    buffer = io.BytesIO()
    np.save(buffer, rows, allow_pickle=False)
    return buffer.getvalue()


def json_bytes(payload: Any) -> bytes:
    return (json.dumps(payload, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def annotation_columns(table: pa.Table) -> list[str]:
    """The stages' columns that go into each output sample's .json."""
    from stages import STAGES

    fixed = {"key", "position", "image", "image_ext", "metadata_json", "caption_original", "caption", "read_error",
             "error_stage", "error_message", "drop_reason", "kept", "shard", "output_captions", EMBEDDING_COLUMN}
    fixed.update(*(stage.manifest_only for stage in STAGES.values()))
    return [name for name in table.column_names if name not in fixed]


def sample_json(metadata_json: str | None, results: dict[str, Any]) -> bytes:
    """The output .json: the input metadata with vlcurate's results under the "vlcurate" key."""
    metadata: dict[str, Any] = {}
    if metadata_json:
        try:
            parsed = json.loads(metadata_json)
            metadata = parsed if isinstance(parsed, dict) else {"metadata": parsed}
        except (ValueError, RecursionError):  # the reader drops such samples as read:bad_json
            metadata = {"metadata_raw": metadata_json[:1000]}
    metadata["vlcurate"] = results
    try:
        return json.dumps(metadata, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # valid JSON may escape lone surrogates ("\\ud800"): they stay escaped
        return json.dumps(metadata).encode("ascii")


_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK  # tar files are padded to whole records of 10240 bytes
_NUL_BLOCK = b"\0" * _TAR_BLOCK


_MODE_OWNER = b"0000644\x000000000\x000000000\x00"  # mode, uid, gid
_MTIME = b"00000000000\x00"  # 0: deterministic bytes, a rerun writes the same archive
_AFTER_CHECKSUM = b"0" + b"\0" * 100 + b"ustar\x0000" + b"\0" * 247  # type, linkname, magic, version, rest
_FIXED_SUM = sum(_MODE_OWNER) + sum(_MTIME) + 8 * 32 + sum(_AFTER_CHECKSUM)  # checksum field counts as spaces


def tar_member(name: str, data: bytes) -> bytes:
    """One regular-file member (header, data, padding) with fixed owner, mode and mtime: same input, same bytes."""
    return b"".join(tar_member_pieces(name, data))


def tar_member_pieces(name: str, data: bytes | memoryview) -> tuple[bytes, bytes | memoryview, bytes]:
    """``tar_member`` as its header, data and padding, to join many members without copying each one first."""
    size = len(data)
    encoded = name.encode("utf-8", "surrogateescape")
    if len(encoded) > 100 or not name.isascii() or size >= 8**11:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, 0o644, 0
        header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    else:
        size_field = b"%011o\x00" % size
        checksum = _FIXED_SUM + byte_sum(encoded) + byte_sum(size_field)
        header = (encoded + b"\0" * (100 - len(encoded)) + _MODE_OWNER + size_field + _MTIME
                  + b"%06o\x00 " % checksum + _AFTER_CHECKSUM)
    return header, data, _PADDING[-size % _TAR_BLOCK]


_PADDING = [b"\0" * n for n in range(_TAR_BLOCK)]


def tar_trailer(fragment_bytes: int) -> bytes:
    """The end-of-archive blocks after ``fragment_bytes`` of members, padded to a whole record (as tarfile)."""
    end = fragment_bytes + 2 * _TAR_BLOCK
    return b"\0" * (2 * _TAR_BLOCK + (-end % _TAR_RECORD))


def tar_fragment(table: pa.Table, source: str) -> bytes:
    """The kept samples of a run of samples as tar members: image bytes unchanged, the output caption, the
    input metadata plus results. When a caption policy added extra pairs (CapFilt's ``extra_pairs``), each
    becomes a sample of its own, ``KEY_pairN``, with the same image bytes."""
    from pipeline.shards import binary_views

    extra = annotation_columns(table)
    # Column by column, with the image bytes as views of the Arrow buffers: a row dict per sample, holding a copy
    # of its image, costs more than the rest of the fragment.
    fixed = ["key", "caption_original", "caption", "image_ext", "metadata_json"]
    if "output_captions" in table.column_names:
        fixed.append("output_captions")
    kept = table.column("kept")
    if not pc.any(kept).as_py():
        return b""
    columns = table.select([*fixed, *extra]).filter(kept).to_pydict()
    every_image = binary_views(table.column("image"))
    images = [every_image[i] for i in pc.indices_nonzero(kept).to_pylist()]
    extra_values = [columns[name] for name in extra]
    output_captions = columns.get("output_captions")
    originals, cleaned, extensions, metadata = (columns["caption_original"], columns["caption"],
                                                columns["image_ext"], columns["metadata_json"])
    chunks: list = []
    for i, key in enumerate(columns["key"]):
        results = {"source_shard": source, "caption_original": originals[i]}
        for name, values in zip(extra, extra_values):
            if values[i] is not None:
                results[name] = values[i]
        captions = (output_captions[i] if output_captions is not None else None) or [cleaned[i]]
        for index, caption in enumerate(captions):
            member = key if index == 0 else f"{key}_pair{index}"
            pair_results = results if index == 0 else {**results, "pair_of": key}
            chunks += tar_member_pieces(f"{member}.{extensions[i]}", images[i])
            chunks += tar_member_pieces(f"{member}.txt", caption.encode("utf-8"))
            chunks += tar_member_pieces(f"{member}.json", sample_json(metadata[i], pair_results))
    return b"".join(chunks)


def manifest_table(table: pa.Table, source: str) -> pa.Table:
    sizes = pc.binary_length(table.column("image")).cast(pa.int64())
    manifest = table.drop_columns([c for c in MANIFEST_EXCLUDED if c in table.column_names])
    manifest = manifest.add_column(1, "shard", pa.array([source] * table.num_rows, pa.string()))
    return manifest.append_column("image_bytes", sizes)


def manifest_bytes(manifest: pa.Table) -> bytes:
    """The Parquet bytes of a shard's manifest; one row group, whatever the batches it was built from. Plain
    encoding under zstd: on real manifests a quarter smaller and a third faster to write than with dictionaries
    (zstd finds the repeats that dictionaries would)."""
    sink = pa.BufferOutputStream()
    pq.write_table(manifest.combine_chunks(), sink, compression="zstd", use_dictionary=False, row_group_size=1 << 30)
    return sink.getvalue().to_pybytes()


# ------------------------------------------------------------------------------------ parts and shard commit

@dataclasses.dataclass
class PartInfo:
    first: int  # position of the part's first sample in the input shard
    rows: int
    tar_bytes: int
    timing: dict[str, dict]


def _part_name(first: int) -> str:
    return f"{first:010d}"


def write_part(out: OutputDir, stem: str, source: str, table: pa.Table, timing: dict[str, dict]) -> PartInfo:
    """Write one run of consecutive, judged samples: its tar fragment and its manifest rows (Arrow IPC)."""
    first = table.column("position")[0].as_py()
    folder = out.parts_name(stem)
    fragment = tar_fragment(table, source)
    out.write_bytes(f"{folder}/{_part_name(first)}.tar", fragment, durable=False)
    out.write_bytes(f"{folder}/{_part_name(first)}.arrow", ipc_bytes(manifest_table(table, source)), durable=False)
    return PartInfo(first=first, rows=table.num_rows, tar_bytes=len(fragment), timing=timing)


def ipc_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def write_carry(out: OutputDir, stem: str, table: pa.Table) -> None:
    """Rows that wait in the parts folder while the model actors score their slim copies."""
    first = table.column("position")[0].as_py()
    last = first + table.num_rows - 1
    out.write_bytes(f"{out.parts_name(stem)}/carry-{_part_name(first)}-{_part_name(last)}.arrow", ipc_bytes(table),
                    durable=False)


def read_carry(out: OutputDir, stem: str, first: int, rows: int, columns: list[str] | None = None) -> pa.Table:
    """The carried rows of positions ``first`` .. ``first + rows - 1`` (only ``columns`` when given), from
    whichever carry files hold them."""
    last = first + rows - 1
    pieces = []
    folder = out.parts_name(stem)
    for name in out.store.list_names(folder, ".arrow"):
        if not name.startswith("carry-") or TMP_MARK in name:
            continue
        start, end = (int(x) for x in name[: -len(".arrow")].split("-")[1:3])
        if end < first or start > last:
            continue
        with out.store.open_input(f"{folder}/{name}") as source:
            table = pa.ipc.open_file(source).read_all()
        if columns is not None:
            table = table.select(columns)
        lo, hi = max(first, start), min(last, end)
        pieces.append(table.slice(lo - start, hi - lo + 1))
    if not pieces:
        raise FileNotFoundError(f"no carried rows for positions {first}..{last} of {stem}")
    return pa.concat_tables(pieces, promote_options="permissive").combine_chunks()


def parts_cover(parts: list[PartInfo], total: int) -> bool:
    """Whether the parts tile positions 0 .. total-1 exactly, each sample once."""
    expected = 0
    for part in sorted(parts, key=lambda p: p.first):
        if part.first != expected:
            return False
        expected += part.rows
    return expected == total


class ShardWriter:
    """Writes one shard's outputs in position order, a run of samples at a time: tar members stream into the
    shard's file (a temporary file renamed into place, or an object upload completed at the end), manifest rows
    (small: no image bytes) are kept until ``commit`` writes the manifest, then the completion record, last."""

    def __init__(self, out: OutputDir, stem: str, source: str):
        self.out, self.stem, self.source = out, stem, source
        self.file = out.store.open_writer(out.shard_name(stem))
        self.tar_bytes = 0
        self.manifests: list[pa.Table] = []
        self.timings: list[dict] = []

    def add_members(self, table: pa.Table) -> None:
        """The tar members of a run of judged samples, in position order after the ones added before."""
        fragment = tar_fragment(table, self.source)
        self.file.write(fragment)
        self.tar_bytes += len(fragment)

    def add(self, table: pa.Table, timing: dict[str, dict]) -> None:
        """A run of judged samples: its tar members and its manifest rows."""
        self.add_members(table)
        self.manifests.append(manifest_table(table, self.source))
        self.timings.append(timing)

    def add_part(self, part: PartInfo) -> None:
        """A part written by another worker (model stages), in position order."""
        folder = self.out.parts_name(self.stem)
        with self.out.store.open_input(f"{folder}/{_part_name(part.first)}.tar") as fragment:
            self.file.copy_from(fragment)
        self.tar_bytes += part.tar_bytes
        with self.out.store.open_input(f"{folder}/{_part_name(part.first)}.arrow") as source_file:
            self.manifests.append(pa.ipc.open_file(source_file).read_all())
        self.timings.append(part.timing)

    def commit(self, stage_names: list[str], fingerprint: str, config_name: str) -> dict[str, Any]:
        try:
            self.finish_tar()
            manifest = (pa.concat_tables(self.manifests, promote_options="permissive") if self.manifests
                        else empty_manifest())
            embeddings = None
            if EMBEDDING_COLUMN in manifest.column_names:
                embeddings = embeddings_bytes(manifest.column(EMBEDDING_COLUMN))
                manifest = manifest.drop_columns([EMBEDDING_COLUMN])
            # An earlier computation's failure record and embeddings went before the run (``forget_pending``):
            # a commit sends no request beyond its own writes.
            if embeddings is not None:
                self.out.write_bytes(embeddings_name(self.stem), embeddings)
            self.out.write_bytes(self.out.manifest_name(self.stem), manifest_bytes(manifest))
            record = {
                "stem": self.stem,
                "source": self.source,
                "fingerprint": fingerprint,
                "config": config_name,
                **shard_stats(manifest.column("drop_reason").to_pylist(), stage_names),
                "timing": sum_timing(self.timings),
            }
            self.out.write_json(self.out.done_name(self.stem), record)
            return record
        finally:
            self.abort()

    def finish_tar(self) -> None:
        """End the archive and put it in place, durably."""
        self.file.write(tar_trailer(self.tar_bytes))
        self.file.commit()

    def abort(self) -> None:
        """Drop what was written and not committed."""
        self.file.abort()


def commit_shard(out: OutputDir, stem: str, source: str, parts: list[PartInfo], total: int, stage_names: list[str],
                 fingerprint: str, config_name: str) -> dict[str, Any]:
    """Join a shard's parts (written by several workers) into its outputs, then remove the parts. The caller has
    checked that the parts cover every sample of the shard."""
    parts = sorted(parts, key=lambda p: p.first)
    if not parts_cover(parts, total):
        raise RuntimeError(f"the parts of {stem} do not cover its {total} samples exactly")
    writer = ShardWriter(out, stem, source)
    try:
        for part in parts:
            writer.add_part(part)
        record = writer.commit(stage_names, fingerprint, config_name)
    finally:
        writer.abort()
    out.clear_parts(stem)
    return record


def empty_manifest() -> pa.Table:
    """The manifest of a shard without samples."""
    return pa.table({"key": pa.array([], pa.string()), "shard": pa.array([], pa.string()),
                     "position": pa.array([], pa.int32()), "kept": pa.array([], pa.bool_()),
                     "drop_reason": pa.array([], pa.string())})


def sum_timing(timings) -> dict[str, dict]:
    total: dict[str, dict] = {}
    for timing in timings:
        for name, figures in (timing or {}).items():
            entry = total.setdefault(name, {"cpu_seconds": 0.0, "samples": 0})
            entry["cpu_seconds"] = round(entry["cpu_seconds"] + figures["cpu_seconds"], 6)
            entry["samples"] += figures["samples"]
    return total


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


def write_shard_failure(out: OutputDir, stem: str, source: str, reason: str, fingerprint: str) -> dict[str, Any]:
    record = {"stem": stem, "source": source, "fingerprint": fingerprint, "error": reason}
    out.write_json(out.failed_name(stem), record)
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
        "timing": sum_timing(r.get("timing") for r in records),
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
