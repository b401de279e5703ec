"""Hostile input shards through the whole pipeline (SECURITY.md): each case is a shard curated by ``run_curation``
with the Qwen-VL rules on the session's Ray cluster. Every case checks that the run completes, that only the
hostile sample is lost, with its own ``read`` reason in the manifest, that the books balance (kept + dropped =
total, stats = manifests), and that nothing outside the output directory is created or changed.

Cases 1-6 build their shards from synthetic photos and captions (no data needed); the fuzz test mutates a real
Flickr8k shard and is skipped when ../shared/data is absent.
"""

import hashlib
import io
import json
import os
import posixpath
import random
import stat
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import polars as pl
import pytest

from conftest import FLICKR, ROOT, flickr_members, require
from pipeline.config import load_config
from pipeline.outputs import OutputDir
from pipeline.run import UsageError, run_curation, select_thresholds
from pipeline.shards import InputError

QWEN = ROOT / "configs" / "qwen-vl-rules.yaml"
MB = 2**20

CAPTIONS = [
    "A brown dog runs across a grassy field .",
    "Two children are playing on a sandy beach near the water .",
    "A man in a red jacket rides a bicycle down the street .",
    "A woman holds an umbrella while walking in the rain .",
    "A group of people stand outside a small cafe .",
    "A black cat sleeps on a wooden chair by the window .",
]


# ------------------------------------------------------------------------------------------------ building shards

def photo(seed: int = 0) -> bytes:
    """A small, valid 320x240 JPEG (passes image_size and aspect_ratio)."""
    from PIL import Image

    rng = random.Random(seed)
    image = Image.frombytes("RGB", (8, 6), rng.randbytes(8 * 6 * 3)).resize((320, 240))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=70)
    return buffer.getvalue()


def sample(key: str, caption: str | bytes | None = None, metadata: bytes | None = None, image: bytes | None = None,
           index: int = 0) -> list[tuple[str, bytes]]:
    """A sample's members (jpg, txt, json): a good one unless told otherwise."""
    caption = CAPTIONS[index % len(CAPTIONS)] if caption is None else caption
    metadata = json.dumps({"url": f"http://example.com/{index}.jpg", "width": 320}).encode() if metadata is None \
        else metadata
    return [(f"{key}.jpg", photo(index) if image is None else image),
            (f"{key}.txt", caption.encode() if isinstance(caption, str) else caption),
            (f"{key}.json", metadata)]


def good(index: int) -> list[tuple[str, bytes]]:
    return sample(f"good{index}", index=index)


def pack(path: Path, members: list, fmt: int = tarfile.PAX_FORMAT) -> Path:
    """A tar of (name, bytes) members, or (name, size) for ``size`` zero bytes streamed without holding them;
    names may carry raw bytes as surrogate escapes."""
    with tarfile.open(path, "w", format=fmt, encoding="utf-8", errors="surrogateescape") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if isinstance(data, int):
                info.size = data
                archive.addfile(info, Zeros(data))
            else:
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return path


class Zeros(io.RawIOBase):
    """A file of ``size`` zero bytes that never exists in memory as a whole."""

    def __init__(self, size: int):
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


# ------------------------------------------------------------------------------------------ checking the outcome

def tree_state(root: Path, skip: Path | None = None) -> dict[str, tuple]:
    """Type, size, mtime (and content hash of files up to 1 MB, link targets) of everything under ``root``,
    without following links; ``skip`` (the output directory) is left out."""
    state = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if skip is None or Path(folder, d) != skip]
        for name in dirs + files:
            path = Path(folder, name)
            info = path.lstat()
            entry: tuple = (stat.S_IFMT(info.st_mode), info.st_size, info.st_mtime_ns)
            if stat.S_ISLNK(info.st_mode):
                entry += (os.readlink(path),)
            elif stat.S_ISREG(info.st_mode) and info.st_size <= MB:
                entry += (hashlib.sha256(path.read_bytes()).hexdigest(),)
            state[str(path.relative_to(root))] = entry
    return state


class Outside:
    """What a run may not touch: the tmp_path tree outside the output (inputs and a sibling folder with a file),
    and the names that hostile keys or records point at above the output (../outside, /abs, ../evil)."""

    NAMES = ("outside", "abs", "evil", "x.jpg")

    def __init__(self, tmp_path: Path, out: Path):
        self.root, self.out = tmp_path, out
        sibling = tmp_path / "sibling"
        sibling.mkdir(exist_ok=True)
        if not (sibling / "victim.txt").exists():
            (sibling / "victim.txt").write_text("must stay as it is\n")
        self.before = self.state()

    def state(self) -> dict:
        entries = tree_state(self.root, skip=self.out)
        for ancestor in self.out.parents:
            for name in self.NAMES:
                entries[str(ancestor / name)] = os.path.lexists(ancestor / name)
        return entries

    def assert_unchanged(self) -> None:
        after = self.state()
        changed = sorted(k for k in set(after) | set(self.before) if after.get(k) != self.before.get(k))
        assert not changed, f"created or changed outside the output directory: {changed}"


def curate(inputs: Path | str, out: Path, *overrides: str, force: bool = False):
    return run_curation(load_config(QWEN, list(overrides)), [str(inputs)], str(out), force=force, progress=False)


def reasons(out: Path, stem: str) -> dict[str, str | None]:
    rows = pl.read_parquet(out / "manifests" / f"{stem}.parquet")
    return dict(zip(rows["key"].to_list(), rows["drop_reason"].to_list()))


def split_name(name: str) -> tuple[str, str]:
    folder, base = posixpath.split(name)
    stem, _, suffix = base.partition(".")
    return (posixpath.join(folder, stem) if folder else stem), suffix


def output_members(path: Path) -> dict[str, set[str]]:
    """The output shard read back with tarfile: suffixes per key; every member a regular file with a relative,
    '..'-free name whose .txt is UTF-8 and .json is JSON."""
    keys: dict[str, set[str]] = {}
    with tarfile.open(path) as archive:
        for member in archive:
            assert member.isreg(), member.name
            assert not member.name.startswith("/") and ".." not in member.name.split("/"), member.name
            data = archive.extractfile(member).read()
            key, suffix = split_name(member.name)
            if suffix == "txt":
                data.decode("utf-8")
            elif suffix == "json":
                json.loads(data.decode("utf-8"))
            keys.setdefault(key, set()).add(suffix)
    return keys


def check_books(out: Path, result) -> None:
    """Every completed shard: manifest = record, kept + dropped = total, the output tar holds exactly the kept
    samples (image, txt, json each); stats.json sums the manifests; failed shards have a reason and no outputs."""
    folder = OutputDir(out)
    done, failed = folder.done_records(), folder.failed_records()
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["total"], stats["kept"]) == (result.stats["total"], result.stats["kept"])
    rows = 0
    for stem, record in done.items():
        manifest = pl.read_parquet(folder.manifest_path(stem))
        rows += manifest.height
        kept = manifest.filter(pl.col("kept"))
        assert manifest.height == record["total"]
        assert kept.height == record["kept"] == manifest["drop_reason"].null_count()
        assert record["kept"] + sum(record["dropped_by_reason"].values()) == record["total"]
        assert manifest.filter(~pl.col("kept"))["drop_reason"].null_count() == 0
        members = output_members(folder.shard_path(stem))
        assert set(members) == set(kept["key"].to_list()), stem
        for key, ext in zip(kept["key"].to_list(), kept["image_ext"].to_list()):
            assert members[key] == {ext, "txt", "json"}, key
    assert stats["total"] == rows == sum(r["total"] for r in done.values())
    assert stats["kept"] + sum(stats["dropped_by_reason"].values()) == stats["total"]
    assert stats["shards_completed"] == len(done)
    for stem, record in failed.items():
        if stem not in done:
            assert isinstance(record["error"], str) and record["error"].strip(), stem
            assert not folder.shard_path(stem).exists() and not folder.manifest_path(stem).exists()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name], "temporary files left behind"


# ------------------------------------------------------------------------------------------------ 1. JSON bombs

def test_json_bombs_are_bad_json_and_the_rest_of_the_shard_is_kept(ray_cluster, tmp_path):
    from pipeline.shards import MAX_JSON_DEPTH as LIMIT

    nested = {  # key -> (metadata, kept?): the depth bound decides, not the reader's stack (near 1,000 it varies)
        "list_at_limit": (b"[" * LIMIT + b"]" * LIMIT, True),
        "dict_at_limit": (b'{"a":' * (LIMIT - 1) + b"{}" + b"}" * (LIMIT - 1), True),
        "list_over": (b"[" * (LIMIT + 1) + b"]" * (LIMIT + 1), False),
        "dict_over": (b'{"a":' * LIMIT + b"{}" + b"}" * LIMIT, False),
        **{f"list{d}": (b"[" * d + b"]" * d, False) for d in range(960, 1000, 8)},
    }
    members = [
        *good(0),
        *sample("bigint", metadata=b'{"n": ' + b"7" * 5_000 + b"}"),  # beyond int's 4,300-digit limit
        *good(1),
        *sample("deep", metadata=b"[" * 200_000 + b"]" * 200_000),
        *good(2),
        *sample("surrogate", metadata=b'{"title": "half a pair \\ud800"}', index=3),  # valid JSON, no UTF-8 form
        *[m for key, (metadata, _) in nested.items() for m in sample(key, metadata=metadata, index=4)],
        *good(5),
    ]
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    pack(inputs / "json.tar", members)
    outside = Outside(tmp_path, out)
    result = curate(inputs, out)
    assert not result.failed
    assert reasons(out, "json") == {
        "good0": None, "bigint": "read:bad_json", "good1": None, "deep": "read:bad_json", "good2": None,
        "surrogate": None, **{key: None if kept else "read:bad_json" for key, (_, kept) in nested.items()},
        "good5": None,
    }
    with tarfile.open(out / "shards" / "json.tar") as archive:
        written = json.loads(archive.extractfile("surrogate.json").read())
        at_limit = json.loads(archive.extractfile("list_at_limit.json").read())
    assert written["title"] == "half a pair \ud800" and written["vlcurate"]["source_shard"].endswith("json.tar")
    assert at_limit["metadata"] == json.loads(nested["list_at_limit"][0])
    assert result.stats["total"] == 7 + len(nested)
    check_books(out, result)
    outside.assert_unchanged()


# ------------------------------------------------------------------------------------- 2. oversized members

class PeakMemory:
    """Peak resident memory of this process and its descendants (the session's Ray cluster: raylet, workers),
    sampled every 10 ms in a thread; ``growth`` is the peak above the level at the start."""

    def __init__(self):
        import psutil

        self.psutil, self.me = psutil, psutil.Process()

    def total(self) -> int:
        size = 0
        for process in [self.me, *self.me.children(recursive=True)]:
            try:
                size += process.memory_info().rss
            except self.psutil.Error:
                pass
        return size

    def __enter__(self):
        self.start = self.peak = self.total()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.total())
            time.sleep(0.01)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.growth = self.peak - self.start


def test_oversized_members_are_skipped_unread_in_bounded_memory(ray_cluster, tmp_path):
    big = 400 * MB
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    image = photo(1)
    pack(inputs / "huge.tar", [
        *good(0),
        ("withbin.jpg", image), ("withbin.bin", big), ("withbin.txt", CAPTIONS[1].encode()),  # .bin: no stage's
        ("withbin.json", b"{}"),
        *good(2),
        ("bigjson.jpg", image), ("bigjson.txt", CAPTIONS[3].encode()), ("bigjson.json", big),
        ("bigimage.jpg", image + os.urandom(int(1.5 * MB))), ("bigimage.txt", CAPTIONS[4].encode()),
        *good(5),
    ])
    # A pax header may say the size is negative: read(-1) would take the rest of the shard into memory.
    negative = tarfile.TarInfo("neg.txt")
    negative.size, negative.pax_headers = 3, {"size": "-1"}
    with tarfile.open(inputs / "negsize.tar", "w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in good(0):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        archive.addfile(negative, io.BytesIO(b"abc"))
        filler = tarfile.TarInfo("after.bin")
        filler.size = big
        archive.addfile(filler, Zeros(big))
    overrides = ("read.max_image_bytes=1000000",)
    curate(_warm_up(tmp_path), tmp_path / "warm-out", *overrides)
    outside = Outside(tmp_path, out)
    try:
        with PeakMemory() as memory:
            result = curate(inputs, out, *overrides)
        assert [f["source"] for f in result.failed] == [str(inputs / "negsize.tar")]
        assert "negative pax size" in result.failed[0]["error"]
        assert reasons(out, "huge") == {"good0": None, "withbin": None, "good2": None,
                                        "bigjson": "read:json_too_large", "bigimage": "read:image_too_large",
                                        "good5": None}
        assert output_members(out / "shards" / "huge.tar")["withbin"] == {"jpg", "txt", "json"}  # .bin not copied
        assert result.stats["total"] == 6 and result.stats["kept"] == 4
        check_books(out, result)
        outside.assert_unchanged()
        # 1.2 GB of members went by; holding any one of them would show as 400 MB (about 10 MB is usual).
        assert memory.growth < 350 * MB, f"peak memory grew by {memory.growth / MB:.0f} MB"
    finally:
        for shard in inputs.glob("*.tar"):
            shard.unlink()  # 1.2 GB: not left in pytest's kept temporary folders


def _warm_up(tmp_path: Path) -> Path:
    """Small shards, several tasks: every worker imports the stages and loads fastText before memory is measured
    (a cold worker's imports alone weigh a few hundred MB)."""
    folder = tmp_path / "warm"
    folder.mkdir()
    for index in range(8):
        pack(folder / f"w{index}.tar", good(index))
    return folder


# ------------------------------------------------------------------------------------------------ 3. unsafe keys

UNSAFE = {  # member name prefix (before .jpg/.txt) -> the key the manifest shows
    "../../../../outside/x": "../../../../outside/x",
    "/abs/x": "/abs/x",
    "": "",
    "./good": "./good",
    "\x1b[31mred": "\x1b[31mred",
    "k_pair1": "k_pair1",
    "C:\\evil\\x": "C:\\evil\\x",  # Windows separators
    "bad\udcffname": "bad\\xffname",  # not UTF-8: the raw byte is shown escaped
    "long" + "x" * 600: "long" + "x" * 600,
}


def test_unsafe_keys_are_dropped_and_never_become_output_names(ray_cluster, tmp_path):
    members = [*good(0)]
    for index, name in enumerate(UNSAFE):
        members += [(f"{name}.jpg", photo(index)), (f"{name}.txt", CAPTIONS[index % 6].encode())]
    members += [*sample("sub/dir/fine", index=2), *good(3)]  # a key with folders is a plain relative name
    members += [("sub//x.jpg", photo(5)), ("sub//x.txt", CAPTIONS[5].encode())]  # read as sub/x: still relative
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    pack(inputs / "keys.tar", members, fmt=tarfile.GNU_FORMAT)  # raw name bytes, GNU long names
    outside = Outside(tmp_path, out)
    result = curate(inputs, out)
    assert not result.failed
    assert reasons(out, "keys") == {"good0": None, **{key: "read:unsafe_key" for key in UNSAFE.values()},
                                    "sub/dir/fine": None, "good3": None, "sub/x": None}
    assert set(output_members(out / "shards" / "keys.tar")) == {"good0", "sub/dir/fine", "good3", "sub/x"}
    check_books(out, result)
    outside.assert_unchanged()
    # Training unpacks shards: with tarfile's "data" filter nothing lands outside the folder (it raises on
    # absolute or escaping names, so a clean extraction also says there were none).
    extracted = tmp_path / "extracted"
    extracted.mkdir()
    around = Outside(tmp_path, extracted)
    with tarfile.open(out / "shards" / "keys.tar") as archive:
        archive.extractall(extracted, filter="data")
    assert sorted(str(p.relative_to(extracted)) for p in extracted.rglob("*") if p.is_file()) == sorted(
        f"{key}.{ext}" for key in ("good0", "sub/dir/fine", "good3", "sub/x") for ext in ("jpg", "txt", "json"))
    around.assert_unchanged()


# ------------------------------------------------------------------------------------ 4. the output directory

TEMP = ".tmp-0123456789ab"  # vlcurate's temporary mark and random suffix


def curated_output(tmp_path: Path) -> tuple[Path, Path]:
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    pack(inputs / "s.tar", [m for i in range(6) for m in good(i)])
    curate(inputs, out)
    return inputs, out


def test_links_in_the_output_are_neither_followed_nor_removed(ray_cluster, tmp_path):
    inputs, out = curated_output(tmp_path)
    victim = tmp_path / "sibling" / "precious.txt"
    victim.parent.mkdir()
    victim.write_text("precious\n")
    links = [out / ".write-test", out / f".vlcurate-write-test{TEMP}", out / f"stats.json{TEMP}",
             out / "shards" / f"s.tar{TEMP}", out / "manifests" / f"s.parquet{TEMP}",
             out / "_state" / f"s.done.json{TEMP}"]
    for link in links:
        link.symlink_to(victim)
    stale = out / "shards" / f"stale.tar{TEMP}"  # a regular file with our mark: what a crash leaves
    stale.write_bytes(b"half-written")
    outside = Outside(tmp_path, out)
    result = curate(inputs, out, force=True)
    assert result.processed == 1 and not result.failed
    select_thresholds(str(out), ["length.min_words=11"])
    curate(inputs, out, "length.min_words=11")
    assert victim.read_text() == "precious\n"
    assert [link for link in links if not link.is_symlink()] == []  # not ours: left where they are
    assert not stale.exists()
    outside.assert_unchanged()


def test_names_that_merely_contain_tmp_survive_run_and_select(ray_cluster, tmp_path):
    inputs, out = curated_output(tmp_path)
    planted = []
    for folder in (out, out / "shards", out / "manifests", out / "_state"):
        (folder / "x.tmp-2024").mkdir()
        (folder / "x.tmp-2024" / "inside.txt").write_text("mine\n")
        (folder / "notes.tmp-abc").write_text("mine\n")
        (folder / f"folder{TEMP}").mkdir()  # our mark, but a folder: never removed
        planted += [folder / "x.tmp-2024" / "inside.txt", folder / "notes.tmp-abc", folder / f"folder{TEMP}"]
    before = {p: p.is_dir() or p.read_text() for p in planted}
    result = curate(inputs, out, force=True)
    assert result.processed == 1 and not result.failed
    stats = select_thresholds(str(out), ["length.min_words=11"])
    assert stats["shards_reselected"] == 1
    assert {p: p.exists() and (p.is_dir() or p.read_text()) for p in planted} == before


@pytest.mark.parametrize("foreign_config", [None, "model: resnet50\nepochs: 3\n"])
def test_run_refuses_a_foreign_non_empty_directory_and_changes_nothing(ray_cluster, tmp_path, capsys,
                                                                       foreign_config):
    from pipeline import cli

    inputs = tmp_path / "in"
    inputs.mkdir()
    pack(inputs / "s.tar", good(0))
    foreign = tmp_path / "project"
    (foreign / "sub").mkdir(parents=True)
    (foreign / "notes.txt").write_text("my notes\n")
    (foreign / f"draft{TEMP}").write_text("a name like ours, but not ours\n")
    if foreign_config is not None:
        (foreign / "config.yaml").write_text(foreign_config)
    before = tree_state(tmp_path)
    with pytest.raises(UsageError, match="not empty and holds no vlcurate output"):
        curate(inputs, foreign)
    assert cli.main(["run", str(QWEN), "--input", str(inputs), "--output", str(foreign), "--quiet"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert captured.err.startswith("vlcurate: error: output directory") and "--output" in captured.err
    assert tree_state(tmp_path) == before


def test_an_edited_done_record_cannot_point_select_outside(ray_cluster, tmp_path):
    inputs, out = curated_output(tmp_path)
    record_path = out / "_state" / "s.done.json"
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({**record, "stem": "../../evil"}))
    kept_before = set(output_members(out / "shards" / "s.tar"))
    outside = Outside(tmp_path, out)
    stats = select_thresholds(str(out), ["length.min_words=11"])
    assert stats["shards_reselected"] == 1 and set(stats["per_shard"]) == {"s"}
    kept_after = set(output_members(out / "shards" / "s.tar"))
    assert kept_after < kept_before and kept_after  # the shard inside the output was rewritten
    assert json.loads(record_path.read_text())["stem"] == "s"
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["s.tar"]
    outside.assert_unchanged()


def test_a_record_that_is_a_link_or_not_json_counts_as_not_done(tmp_path):
    """Completion records are read without following links; one that is a link, torn or not an object makes
    its shard count as not done (the next run redoes it), and the others still count."""
    state = tmp_path / "out" / "_state"
    state.mkdir(parents=True)
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"total": 1}))
    (state / "good.done.json").write_text(json.dumps({"total": 2}))
    (state / "torn.done.json").write_text('{"total": ')
    (state / "list.done.json").write_text("[1, 2]")
    (state / "linked.done.json").symlink_to(secret)
    assert OutputDir(tmp_path / "out").done_records() == {"good": {"total": 2, "stem": "good"}}
    store = OutputDir(tmp_path / "out").store
    assert store.read_many(["_state/good.done.json", "_state/linked.done.json", "_state/gone.done.json"]) == [
        json.dumps({"total": 2}).encode(), None, None]


def test_before_a_run_only_stale_records_and_existing_parts_are_removed(tmp_path):
    """Locally too: one listing finds the shards with work in progress; links are neither followed nor removed."""
    from pipeline.run import forget_pending
    from pipeline.shards import Shard

    out_path = tmp_path / "out"
    for stem in ("stale", "new", "other"):
        (out_path / "_state" / "parts" / stem).mkdir(parents=True)
        (out_path / "_state" / "parts" / stem / "0000000000.tar").write_bytes(b"part")
    for stem in ("kept", "stale"):
        (out_path / "_state" / f"{stem}.done.json").write_text("{}")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("not ours")
    (out_path / "_state" / "parts" / "linked").symlink_to(elsewhere)
    out = OutputDir(out_path)
    assert out.stems_with_parts() == {"stale", "new", "other"}
    forget_pending(out, [Shard(f"/in/{stem}.tar", stem) for stem in ("stale", "new", "linked", "fresh")],
                   out.done_records())
    left = sorted(str(p.relative_to(out_path)) for p in out_path.rglob("*") if p.is_file() or p.is_symlink())
    assert left == ["_state/kept.done.json", "_state/parts/linked", "_state/parts/other/0000000000.tar"]
    assert (elsewhere / "keep.txt").read_text() == "not ours"


# --------------------------------------------------------------------------------------------- 5. FIFO as a shard

def test_a_fifo_named_like_a_shard_is_not_a_shard(ray_cluster, tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    pack(inputs / "good.tar", good(0))
    fifo = inputs / "x.tar"
    os.mkfifo(fifo)
    outside = Outside(tmp_path, out)
    for pattern in (inputs / "x.tar", inputs / "x*.tar"):
        with pytest.raises(InputError, match="matches no .tar shard"):
            curate(pattern, out)
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(result=curate(inputs, out)), daemon=True)
    worker.start()
    worker.join(timeout=120)
    if worker.is_alive():  # blocked on the FIFO: open its other end so that the reader sees the end
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(timeout=30)
        pytest.fail("the run blocked on a FIFO named x.tar")
    result = outcome["result"]
    assert not result.failed and set(result.stats["per_shard"]) == {"good"}
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    check_books(out, result)
    outside.assert_unchanged()


# -------------------------------------------------------------------------------- 6. control characters in output

def vlcurate(*args: str | Path, timeout: int = 300) -> subprocess.CompletedProcess:
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, errors="surrogateescape", timeout=timeout)


@pytest.mark.slow  # CLI commands in subprocesses, one of them starting Ray
def test_cli_escapes_control_characters_from_shards(ray_cluster, tmp_path):
    # A folder of shards whose name holds a terminal sequence (no '[': that would make the path a glob).
    inputs, out = tmp_path / "in-\x1b]0;pwned\x07-red", tmp_path / "out"
    inputs.mkdir()
    pack(inputs / "ok.tar", [*good(0), *sample("\x1b[2Jwipe", index=1),
                             *sample("bell", caption="A dog\x07 runs\x1b[8m across a grassy field .", index=2)])
    with tarfile.open(inputs / "bad.tar", "w") as archive:
        link = tarfile.TarInfo("\x1b]0;owned\x07.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
    outside = Outside(tmp_path, out)
    run = vlcurate("run", QWEN, "--input", inputs, "--output", out, "--quiet")
    assert run.returncode == 1, run.stderr
    failed = [line for line in run.stderr.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1, run.stderr
    assert "in-\\x1b]0;pwned\\x07-red/bad.tar" in failed[0] and "not a regular file" in failed[0], failed
    explained = vlcurate("explain", out, "\x1b[2Jwipe")
    assert explained.returncode == 0, explained.stderr
    assert "\\x1b[2Jwipe" in explained.stdout and "read:unsafe_key" in explained.stdout
    assert "in-\\x1b]0;pwned\\x07-red/ok.tar" in explained.stdout
    bell = vlcurate("explain", out, "bell")
    assert bell.returncode == 0 and "KEPT" in bell.stdout and "\\x07" in bell.stdout
    status = vlcurate("status", out)
    assert status.returncode == 1 and "bad: member" in status.stdout
    missing = vlcurate("explain", out, "no\x1b[5msuch")
    assert missing.returncode == 2
    outside.assert_unchanged()
    # Usage errors name input paths: a shard name with a control character, a listed path that matches nothing.
    (tmp_path / "evil\x1b]0;x\x07.tar").write_bytes((inputs / "ok.tar").read_bytes())
    named = vlcurate("run", QWEN, "--input", tmp_path / "evil\x1b]0;x\x07.tar", "--output", tmp_path / "out2")
    globbed = vlcurate("run", QWEN, "--input", tmp_path / "none\x1b[31m*.tar", "--output", tmp_path / "out2")
    for usage in (named, globbed):
        assert usage.returncode == 2 and len(usage.stderr.strip().splitlines()) == 1, usage.stderr
    for outcome in (run, explained, bell, status, missing, named, globbed):
        text = outcome.stdout + outcome.stderr
        assert "\x1b" not in text and "\x07" not in text, text


# ---------------------------------------------------------------------------------------------------- 7. fuzzing

STRUCTURAL = {"truncate", "header_flip", "header_field", "shuffle"}
ODD = ["a", "Z", "7", " ", "-", "_", "~", "é", "中", "\u202e", "\ufeff", "\x1b[31m", "\t", "\n", "\\", "/", "//",
       "/../", "\udcff", "\udc80", "%2e", "$HOME", ":"]


def odd_key(rng: random.Random, index: int) -> str:
    key = f"k{index:03d}" + "".join(rng.choice(ODD) for _ in range(rng.randint(0, 5)))
    if rng.random() < 0.15:
        key += "_pair2"
    if rng.random() < 0.1:
        key = "/" + key
    if rng.random() < 0.05:
        key += "y" * 600
    return key


def mutate(rng: random.Random, samples: list[list[tuple[str, str, bytes]]]) -> tuple[bytes, set[str], set[int]]:
    """A mutated copy of a shard: returns its bytes, the mutations applied and the samples they touched."""
    samples = [list(s) for s in samples]
    kinds = set(rng.sample(["rename", "caption_bytes", "body_flip", "drop_member", "duplicate_member",
                            "extra_member"], rng.randint(1, 2)))
    if rng.random() < 0.4:
        kinds.add(rng.choice(sorted(STRUCTURAL)))
    touched: set[int] = set()
    picks = lambda: rng.sample(range(len(samples)), rng.randint(1, 4))  # noqa: E731
    if "rename" in kinds:
        for i in picks():
            new = odd_key(rng, i)
            samples[i] = [(new, ext, data) for _, ext, data in samples[i]]
            touched.add(i)
    if "caption_bytes" in kinds:
        for i in picks():
            samples[i] = [(k, e, rng.randbytes(rng.randint(0, 300)) if e == "txt" else d) for k, e, d in samples[i]]
            touched.add(i)
    if "body_flip" in kinds:
        for i in picks():
            j = rng.randrange(len(samples[i]))
            key, ext, data = samples[i][j]
            data = bytearray(data)
            for _ in range(rng.randint(1, 8)):
                if data:
                    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            samples[i][j] = (key, ext, bytes(data))
            touched.add(i)
    if "drop_member" in kinds:
        for i in picks():
            del samples[i][rng.randrange(len(samples[i]))]
            touched.add(i)
    if "duplicate_member" in kinds:  # a repeated suffix is skipped: the verdict must not change
        for i in picks():
            j = rng.randrange(len(samples[i]))
            samples[i].insert(j + 1, samples[i][j])
    if "extra_member" in kinds:  # a suffix no stage uses is skipped unread
        for i in picks():
            key = samples[i][0][0]
            samples[i].append((key, rng.choice(["cls", "bin", "jpg.bak", "TXT2"]), rng.randbytes(100)))
    members = [(f"{key}.{ext}", data) for s in samples for key, ext, data in s]
    if "shuffle" in kinds:
        rng.shuffle(members)
    buffer, headers = io.BytesIO(), []
    fmt = rng.choice([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
    with tarfile.open(fileobj=buffer, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as archive:
        for name, data in members:
            headers.append(archive.offset)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    raw = bytearray(buffer.getvalue())
    if "header_flip" in kinds:
        at = rng.choice(headers) + rng.randrange(512)
        raw[at] ^= 1 << rng.randrange(8)
    if "header_field" in kinds:  # a plausible header (checksum recomputed) with one field changed
        start = rng.choice(headers)
        field = rng.choice([(0, 100), (124, 136), (156, 157), (257, 263), (345, 500)])
        value = rng.choice([b"0", b"7", b"\x80", b"\xff", b"-", b"5", b"2", b"x", b"L", b"77777777777", b"\0"])
        end = min(field[0] + len(value), field[1])
        raw[start + field[0]:start + end] = value[:end - field[0]]
        raw[start + 148:start + 156] = b" " * 8  # the checksum counts its own field as spaces
        raw[start + 148:start + 156] = b"%06o\0 " % sum(raw[start:start + 512])
    if "truncate" in kinds:
        raw = raw[:rng.randrange(len(raw))]
    return bytes(raw), kinds, touched


def test_fuzzed_real_shards_complete_or_fail_alone_and_books_balance(ray_cluster, tmp_path):
    members = flickr_members(require(FLICKR / "flickr8k-00003.tar"), 12)
    samples: list[list[tuple[str, str, bytes]]] = []
    for name, data in members:
        key, ext = name.split(".", 1)
        if not samples or samples[-1][0][0] != key:
            samples.append([])
        samples[-1].append((key, ext, data))
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    pack(inputs / "fuzz-000.tar", members)  # the unmutated shard: the verdicts the others are compared with
    rng = random.Random(20240611)
    plans = {}
    for number in range(1, 31):
        data, kinds, touched = mutate(rng, samples)
        (inputs / f"fuzz-{number:03d}.tar").write_bytes(data)
        plans[f"fuzz-{number:03d}"] = (kinds, touched)
    # Cut inside the end-of-archive blocks: every sample is whole, so the shard reads like an intact one.
    intact = (inputs / "fuzz-000.tar").read_bytes()
    with tarfile.open(inputs / "fuzz-000.tar") as archive:
        last = archive.getmembers()[-1]
    end_of_members = last.offset_data + last.size + (-last.size % 512)
    assert intact[end_of_members:] == bytes(len(intact) - end_of_members) and len(intact) - end_of_members > 1024
    (inputs / "fuzz-031.tar").write_bytes(intact[:end_of_members + 300])
    plans["fuzz-031"] = ({"padding_cut"}, set())
    outside = Outside(tmp_path, out)
    result = curate(inputs, out)
    assert result.processed == 32
    check_books(out, result)
    outside.assert_unchanged()

    folder = OutputDir(out)
    done, failed = folder.done_records(), folder.failed_records()
    assert set(done) | set(failed) == {f"fuzz-{n:03d}" for n in range(32)} and not set(done) & set(failed)
    baseline = pl.read_parquet(folder.manifest_path("fuzz-000"))["drop_reason"].to_list()
    assert len(baseline) == 12 and baseline.count(None) >= 6
    for stem, (kinds, touched) in plans.items():
        if kinds & STRUCTURAL:
            continue  # may fail as a whole, with its reason (checked by check_books)
        assert stem in done, f"{stem} ({sorted(kinds)}) failed: {failed[stem]['error']}"
        got = pl.read_parquet(folder.manifest_path(stem))["drop_reason"].to_list()
        assert len(got) == 12, (stem, kinds)
        for position, reason in enumerate(got):
            if position not in touched:
                assert reason == baseline[position], (stem, sorted(kinds), position, reason)
    flipped = [stem for stem, (kinds, _) in plans.items() if kinds & STRUCTURAL == {"header_flip"}]
    assert flipped and all("bad checksum" in failed[stem]["error"] for stem in flipped)  # every header bit counts
    outcomes = sorted((stem, sorted(kinds), failed[stem]["error"][:60] if stem in failed else "completed")
                      for stem, (kinds, _) in plans.items())
    assert 3 <= len(failed) and len(done) >= 20, outcomes  # both outcomes happen: the cases are not vacuous
    extracted = tmp_path / "extracted"
    extracted.mkdir()
    for shard in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(shard) as archive:
            archive.extractall(extracted / shard.stem, filter="data")
