"""Reading shards and expanding inputs: real Flickr8k shards, broken samples and broken archives."""

import tarfile

import pytest

from conftest import FLICKR, flickr_members, require, write_tar
from pipeline.shards import InputError, ShardError, expand_inputs, read_shard


def test_reads_a_real_shard_byte_for_byte():
    shard = require(FLICKR / "flickr8k-00000.tar")
    table = read_shard(str(shard))
    assert table.num_rows == 250
    with tarfile.open(shard) as archive:
        first_jpg = archive.extractfile("flickr00000.jpg").read()
        first_txt = archive.extractfile("flickr00000.txt").read().decode()
    row = table.slice(0, 1).to_pylist()[0]
    assert row["key"] == "flickr00000" and row["image"] == first_jpg and row["caption"] == first_txt
    assert table.column("read_error").null_count == 250


def test_broken_samples_get_their_own_read_error(tmp_path):
    members = flickr_members(require(FLICKR / "flickr8k-00001.tar"), 2)
    members += [
        ("nocap.jpg", members[0][1]), ("nocap.json", b"{}"),
        ("onlyjson.json", b'{"url": "x"}'),
        ("latin1.jpg", members[0][1]), ("latin1.txt", "café crème".encode("latin-1")),
        ("empty.jpg", members[0][1]), ("empty.txt", b"  \n"),
        ("huge.jpg", members[0][1]), ("huge.txt", b"word " * 200_000),
    ]
    table = read_shard(str(write_tar(tmp_path / "mixed.tar", members)))
    errors = dict(zip(table.column("key").to_pylist(), table.column("read_error").to_pylist()))
    assert errors == {
        members[0][0].split(".")[0]: None, members[3][0].split(".")[0]: None,
        "nocap": "missing_caption", "onlyjson": "missing_image", "latin1": "caption_not_utf8",
        "empty": "empty_caption", "huge": "caption_too_large",
    }
    latin1 = next(r for r in table.to_pylist() if r["key"] == "latin1")
    assert latin1["caption_original"] == "caf\ufffd cr\ufffdme"  # shown with replacement characters


def test_truncated_archive_fails_the_shard(tmp_path):
    data = require(FLICKR / "flickr8k-00000.tar").read_bytes()
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(ShardError, match="unreadable tar archive"):
        read_shard(str(truncated))


def test_non_contiguous_samples_fail_the_shard(tmp_path):
    shard = write_tar(tmp_path / "shuffled.tar", [("a.jpg", b"1"), ("b.jpg", b"2"), ("a.txt", b"x")])
    with pytest.raises(ShardError, match="not contiguous: key 'a'"):
        read_shard(str(shard))


def test_link_member_fails_the_shard(tmp_path):
    path = tmp_path / "link.tar"
    with tarfile.open(path, "w") as archive:
        info = tarfile.TarInfo("a.jpg")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(info)
    with pytest.raises(ShardError, match="not a regular file"):
        read_shard(str(path))


def test_not_a_tar_at_all_fails_the_shard(tmp_path):
    path = tmp_path / "garbage.tar"
    path.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ShardError):
        read_shard(str(path))


def test_expand_inputs_paths_globs_braces_directories_and_urls(tmp_path):
    for i in range(3):
        write_tar(tmp_path / f"part-{i:05d}.tar", [("a.txt", b"x")])
    (tmp_path / "notes.txt").write_text("not a shard")
    expected = [f"part-{i:05d}" for i in range(3)]
    assert [s.stem for s in expand_inputs([str(tmp_path)])] == expected
    assert [s.stem for s in expand_inputs([str(tmp_path / "*.tar")])] == expected
    assert [s.stem for s in expand_inputs([str(tmp_path / "part-{00000..00002}.tar")])] == expected
    assert [s.stem for s in expand_inputs([f"file://{tmp_path}/part-00001.tar"])] == ["part-00001"]
    # The same shard named twice is read once.
    assert len(expand_inputs([str(tmp_path), str(tmp_path / "part-00000.tar")])) == 3


def test_expand_inputs_errors_name_the_problem(tmp_path):
    with pytest.raises(InputError, match="matches no .tar shard"):
        expand_inputs([str(tmp_path / "missing-{0..1}.tar")])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_tar(tmp_path / "a" / "x.tar", [("k.txt", b"1")])
    write_tar(tmp_path / "b" / "x.tar", [("k.txt", b"1")])
    with pytest.raises(InputError, match="share the file name 'x.tar'"):
        expand_inputs([str(tmp_path / "a"), str(tmp_path / "b")])
