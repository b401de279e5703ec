"""Finding input shards and reading one WebDataset shard into an Arrow table of samples.

A shard is read whole by one worker: work, outputs and completion are keyed on the input shard, which is what
makes reruns exactly-once. Problems with a single sample (missing caption, undecodable text) become that
sample's ``read_error``; problems with the archive itself (truncated tar, non-file member, samples that are not
contiguous) raise ``ShardError`` and fail the shard as a whole, with the reason.
"""

from __future__ import annotations

import glob as globlib
import os
import posixpath
import tarfile
from dataclasses import dataclass

import braceexpand
import fsspec
import pyarrow as pa

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
MAX_CAPTION_BYTES = 16_384  # a caption this long is junk (scraped page text), not alt-text
ORIGINAL_CAPTION_KEEP = 1_000  # characters of an oversized caption kept in the manifest

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
        if stem in stems:
            raise InputError(
                f"two input shards share the file name '{stem}.tar' ({stems[stem]} and {url}); outputs are named "
                "after input shards, so curate each dataset into its own output directory"
            )
        stems[stem] = url
    return [Shard(url=url, stem=shard_stem(url)) for url in unique]


def _expand_one(item: str) -> list[str]:
    if _is_url(item):
        fs, _, paths = fsspec.get_fs_token_paths(item)
        protocol = item.split("://", 1)[0]
        found = []
        for path in paths:
            if fs.isdir(path):
                found.extend(p for p in fs.ls(path, detail=False) if p.endswith(".tar"))
            elif fs.exists(path):
                found.append(path)
        return [p if "://" in p else f"{protocol}://{p}" for p in found]
    if any(ch in item for ch in "*?["):
        return [p for p in globlib.glob(item) if p.endswith(".tar") and os.path.isfile(p)]
    if os.path.isdir(item):
        return [os.path.join(item, name) for name in os.listdir(item) if name.endswith(".tar")]
    return [item] if os.path.isfile(item) else []


def shard_stem(url: str) -> str:
    name = posixpath.basename(url.rstrip("/"))
    return name[: -len(".tar")] if name.endswith(".tar") else name


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is everything before the first '.' of the file name."""
    directory, base = posixpath.split(name)
    stem, dot, suffix = base.partition(".")
    key = posixpath.join(directory, stem) if directory else stem
    return key, suffix.lower() if dot else ""


def read_shard(url: str) -> pa.Table:
    """Read a whole shard into a table with ``SAMPLE_SCHEMA`` (one row per key, in archive order)."""
    samples: list[dict] = []
    seen: set[str] = set()
    current: dict | None = None
    try:
        with fsspec.open(url, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as archive:
            for index, member in enumerate(archive):
                if member.isdir():
                    continue
                if not member.isfile():
                    raise ShardError(f"member {member.name!r} is not a regular file (links and devices are refused)")
                key, suffix = split_member_name(member.name)
                if current is None or key != current["key"]:
                    if key in seen:
                        raise ShardError(
                            f"samples are not contiguous: key {key!r} appears again at member {index}; "
                            "rebuild the shard with its files grouped by key (tar --sort=name)"
                        )
                    seen.add(key)
                    current = {"key": key, "files": {}}
                    samples.append(current)
                data = archive.extractfile(member).read()
                current["files"].setdefault(suffix, data)
    except ShardError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise ShardError(f"unreadable tar archive ({type(exc).__name__}: {exc})") from None
    return pa.Table.from_pylist([_sample_row(i, s) for i, s in enumerate(samples)], schema=SAMPLE_SCHEMA)


def _sample_row(position: int, sample: dict) -> dict:
    files: dict[str, bytes] = sample["files"]
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in files), None)
    caption_bytes = files.get("txt")
    metadata = files.get("json")
    caption_original, error = None, None
    if caption_bytes is not None:
        try:
            caption_original = caption_bytes.decode("utf-8")
        except UnicodeDecodeError:
            caption_original = caption_bytes.decode("utf-8", errors="replace")
            error = "caption_not_utf8"
        else:
            if len(caption_bytes) > MAX_CAPTION_BYTES:
                error = "caption_too_large"
            elif not caption_original.strip():
                error = "empty_caption"
        if len(caption_original) > ORIGINAL_CAPTION_KEEP and error:
            caption_original = caption_original[:ORIGINAL_CAPTION_KEEP] + "…"
    if image_ext is None:
        error = "missing_image"
    elif caption_bytes is None:
        error = "missing_caption"
    return {
        "key": sample["key"],
        "position": position,
        "image": files[image_ext] if image_ext else None,
        "image_ext": image_ext,
        "metadata_json": metadata.decode("utf-8", errors="replace") if metadata is not None else None,
        "caption_original": caption_original,
        "caption": caption_original if error is None else None,
        "read_error": error,
    }
