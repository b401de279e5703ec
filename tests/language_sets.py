"""Caption sets that measure the language filter: English captions it must keep and other-language captions it
must drop.

``tests/data/other_language_captions.tsv`` was written for the project and always loads. The LAION sets are row
numbers into ``../shared/data/laion400m-10k-captions.parquet`` (the captions themselves are never copied into the
project); they load as None when that file is absent.

Settings of the filter are chosen on the tuning half of each set and checked on the held-out half: ``tuning_half``
splits by a hash of the caption, so the split is fixed and independent of the order of a set.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LAION_CAPTIONS = SHARED_DATA / "laion400m-10k-captions.parquet"
MYNTRA = SHARED_DATA / "myntra-large"
FLICKR = SHARED_DATA / "flickr8k"


class ChangedDataError(RuntimeError):
    """A row list does not match the shared data file it indexes."""


def _rows(name: str) -> list[list[str]]:
    lines = (DATA / name).read_text(encoding="utf-8").splitlines()
    return [line.split("\t") for line in lines if line and not line.startswith("#")]


def tuning_half(caption: str) -> bool:
    """Whether ``caption`` belongs to the tuning half of its set (the other half is held out)."""
    return hashlib.sha1(caption.encode("utf-8")).digest()[-1] % 2 == 0


def own_other_language() -> list[tuple[str, str]]:
    """(language, caption) pairs written for the project: languages other than English and Chinese."""
    return [(language, caption) for language, caption in _rows("other_language_captions.tsv")]


def laion_all_captions() -> list[str] | None:
    """All 10,000 LAION captions (a missing one as ""); None without the shared data."""
    if not LAION_CAPTIONS.is_file():
        return None
    import polars as pl

    return [text or "" for text in pl.read_parquet(LAION_CAPTIONS, columns=["TEXT"])["TEXT"].to_list()]


def _laion(rows: list[tuple[int, str]]) -> list[str] | None:
    texts = laion_all_captions()
    if texts is None:
        return None
    captions = []
    for row, digest in rows:
        text = texts[row]
        if hashlib.sha1(text.encode("utf-8")).hexdigest()[:10] != digest:
            raise ChangedDataError(f"{LAION_CAPTIONS} row {row} is not the caption the row lists were made from: "
                                   "restore the original file or review the row lists in tests/data again")
        captions.append(text)
    return captions


def laion_other_language() -> list[tuple[str, str]] | None:
    """(language, caption) for the hand-reviewed other-language LAION rows; None without the shared data."""
    rows = _rows("laion_other_language.tsv")
    captions = _laion([(int(row), digest) for row, _, digest in rows])
    return None if captions is None else [(language, c) for (_, language, _), c in zip(rows, captions)]


def laion_english_titles() -> list[str] | None:
    """Hand-reviewed English title-cased LAION alt-text; None without the shared data."""
    return _laion([(int(row), digest) for row, digest in _rows("laion_english_titles.tsv")])


def myntra_titles() -> list[str] | None:
    """The English catalogue titles of the myntra-large shards (title-cased product names); None without them."""
    shards = sorted(MYNTRA.glob("*.tar"))
    if not shards:
        return None
    titles = []
    for shard in shards:
        with tarfile.open(shard) as archive:
            for member in archive:
                if member.name.endswith(".txt"):
                    titles.append(archive.extractfile(member).read().decode("utf-8"))
    return titles


def flickr_captions() -> list[str] | None:
    """All five crowd captions of each Flickr8k image in the shared shards (plain English sentences); None without
    them."""
    shards = sorted(FLICKR.glob("*.tar"))
    if not shards:
        return None
    captions = []
    for shard in shards:
        with tarfile.open(shard) as archive:
            for member in archive:
                if member.name.endswith(".json"):
                    captions += json.loads(archive.extractfile(member).read())["captions"]
    return captions
