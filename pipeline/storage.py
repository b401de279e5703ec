"""Where an output directory lives: a local folder or a prefix in an object store (any fsspec filesystem: s3://,
gs://, ...). Everything vlcurate writes goes through one of the two classes here, by names relative to the
output's root (``shards/x.tar``, ``_state/x.done.json``).

A local folder replaces files atomically: content is written under a temporary name, made durable and renamed
into place; links are never followed. An object store has no rename, but a single put is atomic: an object is
either absent or complete (a large object is a multipart upload, visible only once it is completed), so content
is put under its final name and a reader never sees a partial object. In both, a shard counts as done only once
its completion record exists, and the record is written last: outputs without one are leftovers that the next
run replaces. Multipart uploads that a crash left open under the output's prefix are aborted at the start of
the next run that holds the output's lease.

Object stores are reached with the client stack and settings the user already has: credentials, region and
endpoint come from the environment (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ...), as for any fsspec client.
"""

from __future__ import annotations

import collections
import itertools
import os
import re
import stat
import uuid
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")

TMP_MARK = ".tmp-"
TEMPORARY_NAME = re.compile(r".+" + re.escape(TMP_MARK) + r"[0-9a-f]{12}")
UPLOAD_PART_BYTES = 16 * 2**20  # an object being written holds at most this much in memory before it uploads a part
READS_IN_FLIGHT = 32  # small objects read at once from an object store (completion records at the start of a run)
SHARDS_READ_AHEAD = 8  # per-shard files (manifests, embeddings) read ahead of the shard being worked on


def is_remote(location: str | os.PathLike) -> bool:
    """A URL with a scheme other than file:// names an object store (or another fsspec filesystem)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def open_storage(location: str | os.PathLike) -> LocalStorage | ObjectStorage:
    if is_remote(location):
        return ObjectStorage(str(location))
    text = str(location)
    return LocalStorage(text[len("file://"):] if text.startswith("file://") else text)


class LocalStorage:
    remote = False

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __str__(self) -> str:
        return str(self.root)

    def location(self, name: str) -> Path:
        return self.root / name

    def is_file(self, name: str) -> bool:
        try:
            return stat.S_ISREG(os.lstat(self.root / name).st_mode)
        except OSError:
            return False

    def read_bytes(self, name: str) -> bytes:
        fd = os.open(self.root / name, os.O_RDONLY | os.O_NOFOLLOW)
        with open(fd, "rb") as handle:
            return handle.read()

    def read_many(self, names: list[str]) -> list[bytes | None]:
        """Each file's bytes, in order; None where it cannot be read (gone, a link)."""
        return [_read_or_none(self.read_bytes, name) for name in names]

    def open_input(self, name: str):
        """A file for Arrow readers (memory-mapped)."""
        import pyarrow as pa

        return pa.memory_map(str(self.root / name))

    def write_bytes(self, name: str, data: bytes, durable: bool = True) -> None:
        """Write under a temporary name in the same folder, rename into place; ``durable``: fsync the file before
        and the folder after the rename (outputs and records; work in progress skips it)."""
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}{TMP_MARK}{uuid.uuid4().hex[:12]}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            with open(fd, "wb") as handle:
                handle.write(data)
                if durable:
                    handle.flush()
                    os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)  # only still there when writing failed
        if durable:
            _fsync_folder(path.parent)

    def open_writer(self, name: str) -> LocalWriter:
        return LocalWriter(self.root / name)

    def _entries(self, folder: str) -> list[os.DirEntry]:
        path = self.root / folder
        if not path.is_dir() or path.is_symlink():
            return []
        with os.scandir(path) as entries:
            return list(entries)

    def list_names(self, folder: str, suffix: str = "") -> list[str]:
        """Names of the regular files directly in ``folder`` ending in ``suffix``, sorted (links are skipped)."""
        return sorted(entry.name for entry in self._entries(folder)
                      if entry.name.endswith(suffix) and entry.is_file(follow_symlinks=False))

    def list_folders(self, folder: str) -> list[str]:
        """Names of the folders directly in ``folder``, sorted (links are skipped)."""
        return sorted(entry.name for entry in self._entries(folder) if entry.is_dir(follow_symlinks=False))

    def delete(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def delete_folder(self, folder: str) -> None:
        """Remove a folder of vlcurate's work in progress with its files."""
        import shutil

        shutil.rmtree(self.root / folder, ignore_errors=True)

    def remove_empty_folder(self, folder: str) -> None:
        try:
            (self.root / folder).rmdir()  # only when empty
        except OSError:
            pass

    def remove_temporary_files(self, folders: list[str]) -> int:
        """Delete what an interrupted run left half-written: only regular files (never links or folders) whose
        names end in vlcurate's temporary mark with its random suffix. Returns how many were removed."""
        removed = 0
        for folder in folders:
            path = self.root / folder
            if path.is_dir() and not path.is_symlink():
                for entry in path.iterdir():
                    if TEMPORARY_NAME.fullmatch(entry.name) and stat.S_ISREG(entry.lstat().st_mode):
                        entry.unlink(missing_ok=True)
                        removed += 1
        return removed

    def polars_source(self, names: list[str]) -> tuple[list[str], dict | None]:
        return [str(self.root / name) for name in names], None


class LocalWriter:
    """A file written in pieces under a temporary name, renamed into place by ``commit`` (durable)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = path.with_name(f"{path.name}{TMP_MARK}{uuid.uuid4().hex[:12]}")
        self.file: BinaryIO = open(os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644),
                                   "wb")

    def write(self, data: bytes) -> None:
        self.file.write(data)

    def copy_from(self, source: BinaryIO) -> None:
        import shutil

        shutil.copyfileobj(source, self.file, 8 * 2**20)

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        _fsync_folder(self.path.parent)  # the name too is durable before the completion record follows

    def abort(self) -> None:
        """Drop what was written (after a commit, only the already-renamed temporary name is gone)."""
        if not self.file.closed:
            self.file.close()
        self.tmp.unlink(missing_ok=True)


def read_ahead(items: Iterable[T], read: Callable[[T], R], ahead: int = SHARDS_READ_AHEAD) -> Iterator[R]:
    """``read(item)`` for each item, in order, with the reads of the next ``ahead`` items running meanwhile on
    threads (at most ``ahead`` results held). A pass over every shard's manifest thus waits for an object
    store's answer once, not once per shard. A read that raises raises here, when its turn comes."""
    from concurrent.futures import ThreadPoolExecutor

    pending = iter(items)
    with ThreadPoolExecutor(max_workers=ahead, thread_name_prefix="vlcurate-read-ahead") as pool:
        running = collections.deque(pool.submit(read, item) for item in itertools.islice(pending, ahead))
        while running:
            result = running.popleft().result()
            for item in itertools.islice(pending, 1):
                running.append(pool.submit(read, item))
            yield result


def _read_or_none(read, name: str) -> bytes | None:
    try:
        return read(name)
    except OSError:
        return None


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself is durable before the completion record follows
    finally:
        os.close(fd)


class ObjectStorage:
    """An output under a URL prefix, through fsspec. Each write is one atomic put under the final name."""

    remote = True

    def __init__(self, url: str):
        import fsspec

        self.url = url.rstrip("/")
        try:
            # Listings are never cached: other processes (Ray workers, the next run) write beside this one.
            self.fs, self.prefix = fsspec.core.url_to_fs(self.url, use_listings_cache=False)
        except TypeError:  # a filesystem without a listings cache
            self.fs, self.prefix = fsspec.core.url_to_fs(self.url)
        self.prefix = self.prefix.rstrip("/")
        self.protocol = self.url.split("://", 1)[0]

    def __str__(self) -> str:
        return self.url

    @property
    def root(self) -> str:
        return self.url

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if name else self.prefix

    def location(self, name: str) -> str:
        return f"{self.url}/{name}"

    def is_file(self, name: str) -> bool:
        return self.fs.isfile(self._key(name))

    def read_bytes(self, name: str) -> bytes:
        return self.fs.cat_file(self._key(name))

    def read_many(self, names: list[str]) -> list[bytes | None]:
        """Each object's bytes, in order; None where it cannot be read. Up to ``READS_IN_FLIGHT`` requests are
        in flight at once: one after another, the completion records of 100,000 shards would take an hour at a
        typical 30 ms per request. (Not ``fs.cat`` of a list: it expands names holding glob characters.)"""
        return list(read_ahead(names, lambda name: _read_or_none(self.read_bytes, name), READS_IN_FLIGHT))

    def open_input(self, name: str):
        import pyarrow as pa

        return pa.BufferReader(self.read_bytes(name))

    def write_bytes(self, name: str, data: bytes, durable: bool = True) -> None:
        self.fs.pipe_file(self._key(name), data)

    def open_writer(self, name: str) -> ObjectWriter:
        return ObjectWriter(self.fs, self._key(name))

    def _entries(self, folder: str, kind: str) -> list[str]:
        """Names of the entries of ``kind`` (fsspec's "file" or "directory") directly under ``folder``."""
        try:
            entries = self.fs.ls(self._key(folder), detail=True, refresh=True)
        except FileNotFoundError:
            return []
        return [entry["name"].rstrip("/").rsplit("/", 1)[-1] for entry in entries if entry.get("type") == kind]

    def list_names(self, folder: str, suffix: str = "") -> list[str]:
        return sorted(name for name in self._entries(folder, "file") if name.endswith(suffix))

    def list_folders(self, folder: str) -> list[str]:
        """Names of the common prefixes directly under ``folder`` (the store's folders), sorted."""
        return sorted(self._entries(folder, "directory"))

    def delete(self, name: str) -> None:
        try:
            self.fs.rm_file(self._key(name))
        except FileNotFoundError:
            pass

    def delete_folder(self, folder: str) -> None:
        """Remove a folder of vlcurate's work in progress with its objects."""
        try:
            self.fs.rm(self._key(folder), recursive=True)
        except FileNotFoundError:
            pass

    def remove_empty_folder(self, folder: str) -> None:
        pass  # an object store has no folders of its own

    def remove_temporary_files(self, folders: list[str]) -> int:
        """Abort the multipart uploads that a crashed run left open under the output's prefix (only S3 has them;
        they are invisible, but hold storage). Returns how many were aborted."""
        if self.protocol not in ("s3", "s3a"):
            return 0
        bucket, _, prefix = self.prefix.partition("/")
        removed = 0
        listing = self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=f"{prefix}/" if prefix else "")
        for upload in listing.get("Uploads", []) or []:
            self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
            removed += 1
        return removed

    def polars_source(self, names: list[str]) -> tuple[list[str], dict | None]:
        """URLs and storage options for polars' own object-store reader (it reads the same environment)."""
        options = {}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
        if self.protocol in ("s3", "s3a") and endpoint.startswith("http://"):
            options["aws_allow_http"] = "true"
        return [self.location(name) for name in names], options or None

    def lease_store(self, name: str) -> ObjectLeaseStore:
        return ObjectLeaseStore(self, name)


class ObjectWriter:
    """An object written in pieces: fsspec uploads it in parts, and it appears only when ``commit`` completes the
    upload; ``abort`` cancels the upload, leaving nothing."""

    def __init__(self, fs, key: str):
        self.file = fs.open(key, "wb", block_size=UPLOAD_PART_BYTES)

    def write(self, data: bytes) -> None:
        self.file.write(data)

    def copy_from(self, source: BinaryIO) -> None:
        while chunk := source.read(8 * 2**20):
            self.file.write(chunk)

    def commit(self) -> None:
        self.file.close()

    def abort(self) -> None:
        if not self.file.closed:
            discard = getattr(self.file, "discard", None)
            if discard is not None:
                discard()  # cancels the multipart upload, if one was started
            self.file.closed = True  # never completed: closing would upload what was written


class ObjectLeaseStore:
    """A lease record as an object, with conditional requests: create is a put with ``If-None-Match: *``, replace
    and delete carry ``If-Match`` with the ETag of the record as last read, so of two writers exactly one wins.
    A filesystem without conditional requests (not S3) creates with fsspec's exclusive mode and compares the
    record before a replace or delete, which leaves a short race there."""

    def __init__(self, storage: ObjectStorage, name: str):
        self.storage, self.key = storage, storage._key(name)
        self.fs = storage.fs
        self.s3 = storage.protocol in ("s3", "s3a")
        self.bucket, _, self.object_key = self.key.partition("/")
        self._etag_of: tuple[bytes, str] | None = None  # the record last seen and its ETag

    def __str__(self) -> str:
        return f"{self.storage.protocol}://{self.key}"

    def read(self) -> tuple[bytes, float] | None:
        try:
            info = self.fs.info(self.key, refresh=True) if self.s3 else self.fs.info(self.key)
            data = self.fs.cat_file(self.key)
        except FileNotFoundError:
            return None
        # The ETag is taken before the content: when the record changed in between, the ETag is the older one
        # and a conditional request with it fails, which is the safe outcome.
        self._etag_of = (data, info.get("ETag", ""))
        modified = info.get("LastModified") or self.fs.modified(self.key)
        return data, modified.timestamp()

    def create(self, data: bytes) -> bool:
        try:
            if self.s3:
                response = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.object_key, Body=data,
                                           IfNoneMatch="*")
                self._etag_of = (data, response["ETag"])
            else:
                with self.fs.open(self.key, "xb") as handle:
                    handle.write(data)
        except FileExistsError:
            return False
        except OSError as exc:
            if _precondition_failed(exc):
                return False
            raise
        return True

    def replace(self, expected: bytes, data: bytes) -> bool:
        etag = self._etag(expected)
        if etag is None:
            return False
        if not self.s3:
            self.fs.pipe_file(self.key, data)
            return True
        response = self._if_match("put_object", etag, Body=data)
        if response is None:
            return False
        self._etag_of = (data, response["ETag"])
        return True

    def delete(self, expected: bytes) -> bool:
        etag = self._etag(expected)
        if etag is None:
            return False
        if self.s3:
            if self._if_match("delete_object", etag) is None:
                return False
        else:
            try:
                self.fs.rm_file(self.key)
            except FileNotFoundError:
                return False
        self._etag_of = None
        return True

    def _if_match(self, operation: str, etag: str, **arguments) -> dict | None:
        """An S3 request on the record that holds only while its ETag is ``etag``; None when the condition fails
        or the record is gone."""
        try:
            return self.fs.call_s3(operation, Bucket=self.bucket, Key=self.object_key, IfMatch=etag, **arguments)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if _precondition_failed(exc):
                return None
            raise

    def _etag(self, expected: bytes) -> str | None:
        """The ETag of the record while it is still ``expected``; None when it changed or is gone."""
        if self._etag_of is None or self._etag_of[0] != expected:
            current = self.read()
            if current is None or current[0] != expected:
                return None
        return self._etag_of[1] if self._etag_of else None


def _precondition_failed(exc: OSError) -> bool:
    """S3 answers a failed condition with 412 PreconditionFailed; s3fs raises it as an OSError with this text."""
    return "pre-conditions you specified did not hold" in str(exc) or "PreconditionFailed" in str(exc)
