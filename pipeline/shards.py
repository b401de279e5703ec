"""Finding input shards and streaming one WebDataset shard as bounded batches of samples (Arrow tables).

A shard is read by one worker, front to back, in batches of at most ``batch_samples`` samples and about
``batch_bytes`` bytes, so memory does not grow with the shard's size. Problems with a single sample (missing
caption, undecodable text, an oversized or unsafe member) become that sample's ``read_error``; problems with the
archive itself (truncated tar, bad header checksum, a member that is not a regular file, samples that are not
contiguous) raise ``ShardError`` and fail the shard as a whole, with the reason.

The tar format is parsed here directly (ustar, GNU and pax headers): the standard library's ``tarfile`` builds a
``TarInfo`` object and a file wrapper per member, which costs more than everything else a rule stage does. Every
member's size is checked against its limit from the header, before its bytes are read; members with a suffix no
stage uses are skipped without being read.
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import json
import os
import posixpath
import re
import stat
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Iterator

import braceexpand
import fsspec
import numpy as np
import pyarrow as pa

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
ORIGINAL_CAPTION_KEEP = 1_000  # characters of an oversized caption kept in the manifest
MAX_KEY_BYTES = 512  # longer member names are not keys of a real dataset
MAX_JSON_DEPTH = 64  # metadata nested deeper is read:bad_json (img2dataset writes a flat object)

SAMPLE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("position", pa.int32()),
        ("image", pa.large_binary()),
        ("image_ext", pa.string()),
        ("metadata_json", pa.string()),
        ("caption_original", pa.string()),
        ("caption", pa.string()),
        ("read_error", pa.string()),
    ]
)


@dataclasses.dataclass
class ReadParams:
    """How shards are read: batch bounds (resources: they never change a result) and per-member limits
    (they decide ``read`` verdicts, so they are part of the configuration's fingerprint)."""

    batch_samples: int = 1_000  # samples per batch
    batch_bytes: int = 64 * 2**20  # member bytes per batch (a batch closes at the sample that crosses it)
    max_image_bytes: int = 32 * 2**20  # larger image files are dropped as read:image_too_large, unread
    max_caption_bytes: int = 16_384  # a caption this long is scraped page text, not alt-text
    max_json_bytes: int = 1 * 2**20  # larger .json members are dropped as read:json_too_large, unread

    RESOURCES = ("batch_samples", "batch_bytes")

    def annotation_settings(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.RESOURCES}

    def validate(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            if value < 1:
                raise ValueError(f"read.{name} must be at least 1, got {value}")


class InputError(ValueError):
    """An input path or pattern that matches nothing; the message says what was looked for."""


class ShardError(RuntimeError):
    """The shard as a whole cannot be read; the message is recorded as the shard's failure reason."""


@dataclass(frozen=True)
class Shard:
    url: str  # as given to fsspec: a local path or a URL
    stem: str  # output name: the input file name without ".tar"


def _is_url(path: str) -> bool:
    return "://" in path


def expand_inputs(patterns: list[str]) -> list[Shard]:
    """Expand paths, directories, globs, brace ranges and fsspec URLs into a sorted, de-duplicated shard list."""
    urls: list[str] = []
    for pattern in patterns:
        for item in braceexpand.braceexpand(pattern):
            matches = _expand_one(item)
            if not matches:
                raise InputError(
                    f"input '{item}' matches no .tar shard: check the path, or quote globs and brace ranges "
                    "so that the shell does not expand them"
                )
            urls.extend(matches)
    unique = sorted(set(urls))
    stems: dict[str, str] = {}
    for url in unique:
        stem = shard_stem(url)
        if not stem or stem.startswith(".") or not stem.isprintable() or "\\" in stem:
            raise InputError(f"input shard {url!r} has a name that cannot name an output file (empty, hidden or with "
                             "control characters): rename it")
        if stem in stems:
            raise InputError(
                f"two input shards share the file name '{stem}.tar' ({stems[stem]} and {url}); outputs are named "
                "after input shards, so curate each dataset into its own output directory"
            )
        stems[stem] = url
    return [Shard(url=url, stem=shard_stem(url)) for url in unique]


def _is_regular_file(path: str) -> bool:
    """Only regular files are shards: a FIFO or device named ``x.tar`` would block or never end."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _expand_one(item: str) -> list[str]:
    if _is_url(item) and not item.startswith("file://"):
        fs, _, paths = fsspec.get_fs_token_paths(item)
        protocol = item.split("://", 1)[0]
        found = []
        for path in paths:
            if fs.isdir(path):
                found.extend(p for p in fs.ls(path, detail=False) if p.endswith(".tar"))
            elif fs.exists(path):
                found.append(path)
        return [p if "://" in p else f"{protocol}://{p}" for p in found]
    local = item[len("file://"):] if item.startswith("file://") else item
    if any(ch in local for ch in "*?["):
        found = [p for p in globlib.glob(local) if p.endswith(".tar") and _is_regular_file(p)]
    elif os.path.isdir(local):
        found = [os.path.join(local, name) for name in os.listdir(local)
                 if name.endswith(".tar") and _is_regular_file(os.path.join(local, name))]
    else:
        found = [local] if _is_regular_file(local) else []
    return [f"file://{p}" for p in found] if item.startswith("file://") else found


def shard_stem(url: str) -> str:
    name = posixpath.basename(url.rstrip("/"))
    return name[: -len(".tar")] if name.endswith(".tar") else name


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is everything before the first '.' of the file name."""
    directory, base = posixpath.split(name)
    stem, dot, suffix = base.partition(".")
    key = posixpath.join(directory, stem) if directory else stem
    return key, suffix.lower() if dot else ""


def unsafe_key_reason(key: str) -> str | None:
    """Why a key cannot be written as a member name of an output shard (a plain relative name), or None."""
    if not key or key == ".":
        return "empty key"
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        return "key longer than 512 bytes"
    if key.startswith("/"):
        return "absolute path"
    if any(part in ("", ".", "..") for part in key.split("/")):
        return "'.', '..' or empty path component"
    if not key.isprintable() or "\\" in key:
        return "control character or backslash"
    if _RESERVED_KEY.search(key):
        return "ends in _pairN, reserved for the extra pairs a caption policy writes"
    return None


_RESERVED_KEY = re.compile(r"_pair[0-9]+$")


# ---------------------------------------------------------------------------------------------------- tar format

BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")  # regular file (7: contiguous file, read as regular)
_SKIPPED_TYPES = (b"5", b"g")  # directories; pax global headers
_LONG_NAME, _PAX = b"L", b"x"
_MAX_EXTENSION_HEADER = 1 * 2**20  # a pax or GNU long-name header larger than this is not a real shard


def _octal(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256 for sizes over 8 GiB
        value = int.from_bytes(field[1:], "big")
        return -value if field[:1] == b"\xff" else value
    text = field.rstrip(b"\0 ").lstrip(b" ")
    return int(text, 8) if text else 0


def byte_sum(data: bytes) -> int:
    """The sum of the bytes of ``data`` (at most 256 bytes): adler32's low half is 1 + that sum modulo 65521,
    and 256 bytes sum to at most 65280, so it is exact; far faster than ``sum()`` over Python ints."""
    return (zlib.adler32(data) & 0xFFFF) - 1


def _checksum_ok(header: bytes) -> bool:
    stored = _octal(header[148:156])
    # The checksum field itself counts as eight spaces.
    computed = byte_sum(header[:148]) + 256 + byte_sum(header[156:356]) + byte_sum(header[356:])
    return stored == computed


class _TarStream:
    """Members of a tar stream as (name, size, type); the caller reads or skips each member's data."""

    def __init__(self, raw: BinaryIO):
        self.raw = raw
        self.index = 0

    def _read_exact(self, n: int) -> bytes:
        data = self.raw.read(n)
        if len(data) != n:
            raise ShardError(f"unreadable tar archive (ReadError: unexpected end of data at member {self.index})")
        return data

    def read_data(self, size: int) -> bytes:
        data = self._read_exact(size)
        pad = -size % BLOCK
        if pad:
            self._read_exact(pad)
        return data

    def read_prefix(self, size: int, keep: int) -> bytes:
        """The first ``keep`` bytes of a member; the rest is skipped."""
        data = self._read_exact(min(size, keep))
        self.skip_data(size - len(data), already_padded=False, total=size)
        return data

    def skip_data(self, size: int, already_padded: bool = False, total: int | None = None) -> None:
        remaining = size + (0 if already_padded else -(total if total is not None else size) % BLOCK)
        while remaining > 0:
            chunk = self.raw.read(min(remaining, 4 * 2**20))
            if not chunk:
                raise ShardError(f"unreadable tar archive (ReadError: unexpected end of data at member {self.index})")
            remaining -= len(chunk)

    def members(self) -> Iterator[tuple[str, int, bytes]]:
        long_name: str | None = None
        pax: dict[str, str] = {}
        while True:
            header = self.raw.read(BLOCK)
            if not header or (not header[0] and not header.strip(b"\0")):  # (a member's name starts at byte 0)
                # End of archive, a stream that simply stops between members, or one cut inside the end-of-archive
                # blocks (every member is whole; as tarfile reads it).
                return
            if len(header) != BLOCK:
                raise ShardError("unreadable tar archive (ReadError: truncated header)")
            if not _checksum_ok(header):
                raise ShardError(f"unreadable tar archive (ReadError: bad checksum at member {self.index})")
            try:
                size = _octal(header[124:136])
            except ValueError:
                raise ShardError(f"unreadable tar archive (ReadError: bad size field at member {self.index})") from None
            if size < 0:
                raise ShardError(f"unreadable tar archive (ReadError: negative size at member {self.index})")
            kind = header[156:157]
            if kind in (_LONG_NAME, _PAX):
                if size > _MAX_EXTENSION_HEADER:
                    raise ShardError(f"unreadable tar archive (extension header of {size} bytes)")
                data = self.read_data(size)
                if kind == _LONG_NAME:
                    long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
                else:
                    pax = _parse_pax(data)
                continue
            name = long_name or pax.get("path") or _header_name(header)
            if "size" in pax:
                try:
                    size = int(pax["size"])
                except ValueError:
                    raise ShardError("unreadable tar archive (bad pax size)") from None
                if size < 0:  # read(-1) would read the rest of the shard into memory
                    raise ShardError(f"unreadable tar archive (negative pax size at member {self.index})")
            long_name, pax = None, {}
            self.index += 1
            if kind in _SKIPPED_TYPES:
                self.skip_data(size)
                continue
            if kind not in _REGULAR:
                raise ShardError(f"member {name!r} is not a regular file (links and devices are refused)")
            yield name, size, kind


def _header_name(header: bytes) -> str:
    name = header[0:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _parse_pax(data: bytes) -> dict[str, str]:
    """pax extended header records: "LEN key=value\\n" each."""
    records: dict[str, str] = {}
    offset = 0
    while offset < len(data) and data[offset:offset + 1] != b"\0":
        space = data.find(b" ", offset)
        if space < 0:
            raise ShardError("unreadable tar archive (bad pax header)")
        try:
            length = int(data[offset:space])
        except ValueError:
            raise ShardError("unreadable tar archive (bad pax header)") from None
        if length <= 0 or offset + length > len(data):
            raise ShardError("unreadable tar archive (bad pax header)")
        key, _, value = data[space + 1:offset + length - 1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        offset += length
    return records


# ------------------------------------------------------------------------------------------------ sample batches

_CAPTION, _JSON = "txt", "json"
_USED = {*IMAGE_EXTENSIONS, _CAPTION, _JSON}


class _Sample:
    __slots__ = ("key", "files", "error", "bytes")

    def __init__(self, key: str):
        self.key = key
        self.files: dict[str, bytes] = {}
        self.error: str | None = unsafe_key_reason(key) and "unsafe_key"
        self.bytes = 0


def iter_sample_batches(url: str, params: ReadParams | None = None) -> Iterator[pa.Table]:
    """Stream a shard as tables with ``SAMPLE_SCHEMA``, in archive order, each a bounded batch of samples."""
    params = params or ReadParams()
    try:
        with _open(url) as raw:
            yield from _batches(_TarStream(raw), params)
    except ShardError:
        raise
    except (EOFError, OSError, ValueError, UnicodeError) as exc:
        raise ShardError(f"unreadable tar archive ({type(exc).__name__}: {exc})"[:1000]) from None


def _open(url: str):
    if _is_url(url) and not url.startswith("file://"):
        fs, path = fsspec.core.url_to_fs(url)
        return fs.open(path, "rb", block_size=8 * 2**20)  # read ahead in 8 MiB requests
    path = url[len("file://"):] if url.startswith("file://") else url
    if not _is_regular_file(path):
        raise ShardError(f"{path} is not a regular file")
    return open(path, "rb", buffering=1 * 2**20)


def _batches(stream: _TarStream, params: ReadParams) -> Iterator[pa.Table]:
    seen: set[str] = set()
    batch: list[_Sample] = []
    batch_bytes = 0
    position = 0
    current: _Sample | None = None
    limits = {_CAPTION: params.max_caption_bytes, _JSON: params.max_json_bytes}
    for name, size, _ in stream.members():
        if "/" in name:
            key, suffix = split_member_name(name)
        else:  # (split_member_name without a folder)
            key, dot, suffix = name.partition(".")
            suffix = suffix.lower() if dot else ""
        if current is None or key != current.key:
            if key in seen:
                raise ShardError(
                    f"samples are not contiguous: key {key[:200]!r} appears again at member {stream.index - 1}; "
                    "rebuild the shard with its files grouped by key (tar --sort=name)"
                )
            if current is not None and (len(batch) >= params.batch_samples or batch_bytes >= params.batch_bytes):
                yield _to_table(batch, position, params)
                position += len(batch)
                batch, batch_bytes = [], 0
            seen.add(key)
            current = _Sample(key)
            batch.append(current)
        if suffix not in _USED or suffix in current.files:
            stream.skip_data(size)  # unused suffixes (and repeated ones) are never read into memory
            continue
        if size > limits.get(suffix, params.max_image_bytes):
            if suffix == _CAPTION:  # keep the beginning for the manifest
                current.files[suffix] = stream.read_prefix(size, 4 * ORIGINAL_CAPTION_KEEP)
                current.error = current.error or "caption_too_large"
            else:
                stream.skip_data(size)
                current.files[suffix] = b""
                current.error = current.error or ("json_too_large" if suffix == _JSON else "image_too_large")
            continue
        data = stream.read_data(size)
        current.files[suffix] = data
        batch_bytes += size
    if batch:
        yield _to_table(batch, position, params)


def _to_table(batch: list[_Sample], first_position: int, params: ReadParams) -> pa.Table:
    """The batch's samples as a table, built column by column."""
    rows = [_sample_values(sample, params) for sample in batch]
    keys, images, image_exts, metadata, originals, captions, errors = (
        [row[i] for row in rows] for i in range(7))
    positions = np.arange(first_position, first_position + len(batch), dtype=np.int64)  # (int32 checked below)
    columns = [keys, positions, _binary_array(images), image_exts, metadata, originals, captions, errors]
    return pa.Table.from_arrays([pa.array(values, type=field.type) for values, field in zip(columns, SAMPLE_SCHEMA)],
                                schema=SAMPLE_SCHEMA)


def _binary_array(values: list[bytes | None]) -> pa.Array:
    """A large_binary array of ``values``: the bytes joined once into its data buffer (the builder behind
    ``pa.array`` copies them again as its buffer grows)."""
    if None in values or not values:
        return pa.array(values, type=pa.large_binary())
    offsets = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum([len(value) for value in values], out=offsets[1:])
    data = pa.py_buffer(b"".join(values))
    return pa.Array.from_buffers(pa.large_binary(), len(values), [None, pa.py_buffer(offsets), data])


def binary_views(column: pa.ChunkedArray | pa.Array) -> list:
    """The values of a large_binary column as memoryviews of its Arrow buffers, without copying them (None for
    nulls)."""
    views: list = []
    for chunk in column.chunks if isinstance(column, pa.ChunkedArray) else [column]:
        if chunk.null_count or not pa.types.is_large_binary(chunk.type) or not len(chunk):
            views += chunk.to_pylist()
            continue
        _, offsets, data = chunk.buffers()
        bounds = np.frombuffer(offsets, dtype=np.int64)[chunk.offset:chunk.offset + len(chunk) + 1].tolist()
        values = memoryview(data).cast("B") if data is not None else memoryview(b"")  # (Arrow exports signed chars)
        views += [values[start:end] for start, end in zip(bounds, bounds[1:])]
    return views


def _sample_values(sample: _Sample, params: ReadParams) -> tuple:
    """One sample's row, in ``SAMPLE_SCHEMA`` order without ``position``. Its ``read_error``, first applicable:
    unsafe_key, missing_image, missing_caption, a member over its limit (image/caption/json_too_large),
    caption_not_utf8 or empty_caption, bad_json."""
    files = sample.files
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in files), None)
    caption_bytes = files.get(_CAPTION)
    caption_original, caption_error = None, None
    if caption_bytes is not None:
        try:
            caption_original = caption_bytes.decode("utf-8")
        except UnicodeDecodeError:
            caption_original = caption_bytes.decode("utf-8", errors="replace")
            caption_error = "caption_not_utf8"
        if not caption_original.strip():
            caption_error = caption_error or "empty_caption"
    metadata_text, json_error = _checked_json(files[_JSON]) if files.get(_JSON) else (None, None)
    if sample.error in ("caption_too_large", "image_too_large", "json_too_large"):
        caption_error = json_error = None  # the member over its limit is the reason (a prefix may be cut mid-character)
    error = (
        ("unsafe_key" if sample.error == "unsafe_key" else None)
        or ("missing_image" if image_ext is None else None)
        or ("missing_caption" if caption_bytes is None else None)
        or sample.error
        or caption_error
        or json_error
    )
    if caption_original is not None and len(caption_original) > ORIGINAL_CAPTION_KEEP and error:
        caption_original = caption_original[:ORIGINAL_CAPTION_KEEP] + "…"
    return (
        _manifest_key(sample.key) if sample.error == "unsafe_key" else sample.key,
        files[image_ext] if image_ext else None,
        image_ext,
        metadata_text,
        caption_original,
        caption_original if error is None else None,
        error,
    )


def _manifest_key(key: str) -> str:
    """An unsafe key as manifest text: bytes of the member name that are not UTF-8 (surrogate escapes, which
    Arrow refuses) become ``\\xNN``; any other key is stored as it is."""
    try:
        key.encode("utf-8")
        return key
    except UnicodeEncodeError:
        return key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _checked_json(data: bytes) -> tuple[str | None, str | None]:
    """The metadata text, and ``bad_json`` when it is not JSON that Python can load (invalid UTF-8, syntax,
    integers beyond Python's digit limit) or is nested deeper than ``MAX_JSON_DEPTH``. The depth bound is what
    makes the verdict the same everywhere: how deep ``json.loads`` can go depends on the caller's stack, so
    metadata just under the recursion limit here would fail whoever loads the output .json next."""
    try:
        text = data.decode("utf-8")
        value = json.loads(text)
        # Nesting needs an opening bracket per level: most metadata has too few to be worth walking.
        if text.count("[") + text.count("{") > MAX_JSON_DEPTH and not _depth_within(value, MAX_JSON_DEPTH):
            raise ValueError("nested too deeply")
    except (ValueError, RecursionError):
        return data[:ORIGINAL_CAPTION_KEEP].decode("utf-8", "replace"), "bad_json"
    return text, None


def _depth_within(value, limit: int) -> bool:
    """Whether JSON arrays and objects nest at most ``limit`` deep (level by level: no recursion)."""
    level = [value] if isinstance(value, (dict, list)) else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return False
        below = []
        for item in level:
            for child in item.values() if isinstance(item, dict) else item:
                if isinstance(child, (dict, list)):
                    below.append(child)
        level = below
    return True


def read_shard(url: str, params: ReadParams | None = None) -> pa.Table:
    """A whole shard as one table (tests, reports, small tools; the pipeline streams batches instead)."""
    batches = list(iter_sample_batches(url, params))
    return pa.concat_tables(batches) if batches else SAMPLE_SCHEMA.empty_table()
