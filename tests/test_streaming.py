"""Bounded batches: outputs do not depend on how samples are batched, parts are joined in position order, and
the tar writer and reader agree with the standard library's."""

import io
import json
import tarfile
import time

import polars as pl
import pytest

from conftest import FLICKR, ROOT, flickr_members, require, write_tar
from pipeline.config import load_config, parse_config
from pipeline.outputs import tar_fragment, tar_member, tar_trailer
from pipeline.run import run_curation
from pipeline.shards import ReadParams, iter_sample_batches, read_shard
from pipeline.steps import StepPlan

QWEN = ROOT / "configs" / "qwen-vl-rules.yaml"


def outputs_of(out):
    shards = {p.name: p.read_bytes() for p in sorted((out / "shards").glob("*.tar"))}
    manifests = {p.name: p.read_bytes() for p in sorted((out / "manifests").glob("*.parquet"))}
    return shards, manifests


def test_outputs_are_byte_identical_whatever_the_batch_size(ray_cluster, tmp_path):
    shard = require(FLICKR / "flickr8k-00001.tar")
    results = {}
    for batch in (7, 100, 10_000):
        out = tmp_path / f"out-{batch}"
        result = run_curation(load_config(QWEN, [f"read.batch_samples={batch}"]), [str(shard)], str(out),
                              progress=False)
        assert not result.failed and result.stats["total"] == 250
        results[batch] = outputs_of(out)
        assert not (out / "_state" / "parts").exists()  # work in progress is gone once committed
    assert results[7] == results[100] == results[10_000]
    assert results[7][0]["flickr8k-00001.tar"]  # something was kept and compared


SMALL_SHARD_SIZES = (1, 13, 40, 7, 60, 29)  # consecutive small shards share batches; one truncated among them


def curate_small_shards(paths, out, batch_samples):
    """The rule recipe's source step run directly (no Ray) over the shards at ``paths``: (summaries, outputs)."""
    from pipeline.steps import RunContext, curate_shards

    config = load_config(QWEN, [f"read.batch_samples={batch_samples}"])
    ctx = RunContext(specs=config.enabled_stages, read=config.read, out_root=str(out),
                     fingerprint=config.fingerprint(), config_name=config.name)
    return list(curate_shards(ctx, [(str(path), path.stem) for path in paths])), outputs_of(out)


def test_small_shards_share_batches_and_each_is_committed_alone(tmp_path):
    members = flickr_members(require(FLICKR / "flickr8k-00001.tar"), sum(SMALL_SHARD_SIZES))
    samples = [members[i:i + 3] for i in range(0, len(members), 3)]  # .jpg, .json, .txt of each key
    assert all(len({name.split(".")[0] for name, _ in sample}) == 1 for sample in samples)
    folder = tmp_path / "in"
    folder.mkdir()
    start = 0
    for number, size in enumerate(SMALL_SHARD_SIZES):
        orphan = [("zz-orphan.txt", b"a caption without its image")] if number == 4 else []  # unreadable
        write_tar(folder / f"small-{number}.tar",
                  [m for sample in samples[start:start + size] for m in sample] + orphan)
        start += size
    whole = (folder / "small-3.tar").read_bytes()
    (folder / "small-3.tar").write_bytes(whole[: len(whole) // 2 + 100])  # cut inside a member

    paths = sorted(folder.glob("*.tar"))
    runs = {batch: curate_small_shards(paths, tmp_path / f"out-{batch}", batch) for batch in (7, 100, 10_000)}
    for summaries, _ in runs.values():
        assert [s["stem"] for s in summaries] == [f"small-{n}" for n in range(len(SMALL_SHARD_SIZES))]
        assert [s["total"] for s in summaries if s["committed"]] == [1, 13, 40, 61, 29]
        (failed,) = [s for s in summaries if not s["committed"]]
        assert failed["stem"] == "small-3" and "unreadable tar archive" in failed["error"]
    assert runs[7][1] == runs[100][1] == runs[10_000][1]
    assert "small-3.tar" not in runs[7][1][0]  # nothing of the failed shard was written, whatever it shared

    # the same as each shard curated on its own
    for number in (0, 2, 5):
        _, (shards, manifests) = curate_small_shards([paths[number]], tmp_path / f"out-alone-{number}", 10_000)
        assert shards[f"small-{number}.tar"] == runs[7][1][0][f"small-{number}.tar"]
        assert manifests[f"small-{number}.parquet"] == runs[7][1][1][f"small-{number}.parquet"]

    # each shard's completion record counts its own samples per stage, exactly, whatever the batches were
    def samples_per_stage(batch):
        records = sorted((tmp_path / f"out-{batch}" / "_state").glob("*.done.json"))
        return {r.name: {name: figures["samples"] for name, figures in json.loads(r.read_text())["timing"].items()}
                for r in records}

    counted = samples_per_stage(7)
    assert counted == samples_per_stage(100) == samples_per_stage(10_000)
    assert counted["small-4.done.json"]["read"] == 61 and counted["small-0.done.json"]["read"] == 1
    assert counted["small-4.done.json"]["html"] == 60  # the stages see only the readable samples


def test_a_batch_whose_stages_raise_fails_only_the_shards_with_rows_in_it(tmp_path, monkeypatch):
    import pipeline.steps

    members = flickr_members(require(FLICKR / "flickr8k-00001.tar"), 40)
    samples = [members[i:i + 3] for i in range(0, len(members), 3)]
    folder = tmp_path / "in"
    folder.mkdir()
    for number in range(4):  # 10 samples each: batches of 20 hold shards 0+1 and 2+3
        write_tar(folder / f"small-{number}.tar", [m for sample in samples[number * 10:(number + 1) * 10]
                                                    for m in sample])
    poisoned = samples[25][0][0].split(".")[0]  # a key of shard 2
    original = pipeline.steps.finish_batch

    def finish_batch(table, stages):
        if poisoned in table.column("key").to_pylist():
            raise MemoryError("no room for this batch")
        return original(table, stages)

    monkeypatch.setattr(pipeline.steps, "finish_batch", finish_batch)
    summaries, (shards, _) = curate_small_shards(sorted(folder.glob("*.tar")), tmp_path / "out", 20)
    assert [(s["stem"], s["committed"]) for s in summaries] == [
        ("small-0", True), ("small-1", True), ("small-2", False), ("small-3", False)]
    assert "no room for this batch" in summaries[2]["error"] and "no room" in summaries[3]["error"]
    assert sorted(shards) == ["small-0.tar", "small-1.tar"]


MODEL_RECIPE_SAMPLES = 60  # the model stages cost most per sample: a shard of the first samples of a real one


@pytest.mark.slow  # two model-recipe runs end to end
def test_model_recipe_outputs_are_byte_identical_whatever_the_batch_size(ray_cluster, tiny_models, tmp_path):
    (tmp_path / "in").mkdir()
    shard = write_tar(tmp_path / "in" / "flickr8k-00002.tar",
                      flickr_members(require(FLICKR / "flickr8k-00002.tar"), MODEL_RECIPE_SAMPLES))
    raw = {"stages": [
        {"stage": "html"}, {"stage": "image_size", "min_side": 100}, {"stage": "decode", "size": 32},
        {"stage": "clip_score", "model": tiny_models["clip_name"], "pretrained": tiny_models["clip"]["checkpoint"],
         "model_config": tiny_models["clip"]["model_config"], "resources": {"num_gpus": 0, "batch_size": 5, "pool_size": [1, 2]},
         "image_size": 32},
        {"stage": "capfilt", "captioner": tiny_models["blip"]["captioner"], "filter": tiny_models["blip"]["filter"],
         "resources": {"num_gpus": 0, "batch_size": 3}, "num_captions": 2, "max_length": 12, "image_size": 32,
         "itm_threshold": 0.0},
    ]}
    results = {}
    for batch in (7, 10_000):
        out = tmp_path / f"out-{batch}"
        result = run_curation(parse_config(raw, [f"read.batch_samples={batch}"]), [str(shard)], str(out),
                              progress=False)
        assert not result.failed
        results[batch] = outputs_of(out)
        timing = json.loads((out / "_state" / "flickr8k-00002.done.json").read_text())["timing"]
        assert timing["capfilt"]["samples"] > 0 and timing["decode"]["samples"] == timing["capfilt"]["samples"]
    assert results[7] == results[10_000]
    manifest = pl.read_parquet(tmp_path / "out-7" / "manifests" / "flickr8k-00002.parquet")
    assert manifest["position"].to_list() == list(range(MODEL_RECIPE_SAMPLES))
    assert manifest["capfilt_synthetic"].drop_nulls().len() > 0


def test_reader_batches_are_bounded_by_count_and_bytes():
    shard = str(require(FLICKR / "flickr8k-00000.tar"))
    whole = read_shard(shard)
    by_count = list(iter_sample_batches(shard, ReadParams(batch_samples=64)))
    assert [b.num_rows for b in by_count] == [64, 64, 64, 58]
    by_bytes = list(iter_sample_batches(shard, ReadParams(batch_bytes=200_000)))
    assert len(by_bytes) > 3
    for batch in by_bytes[:-1]:  # a batch closes with the sample that reaches the bound
        sizes = [len(i) for i in batch.column("image").to_pylist()]
        assert sum(sizes[:-1]) < 200_000 <= sum(sizes) + 250_000
    for batches in (by_count, by_bytes):
        joined = [row for b in batches for row in b.to_pylist()]
        assert joined == whole.to_pylist()  # same samples, same positions, in order


def test_reader_agrees_with_tarfile_on_long_names_and_pax_headers(tmp_path):
    long_key = "d" * 120 + "/" + "k" * 90  # needs a GNU or pax long name
    path = tmp_path / "long.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in ((f"{long_key}.jpg", b"\xff\xd8xx"), (f"{long_key}.txt", "a café".encode()),
                           ("\u00e9t\u00e9.jpg", b"x"), ("\u00e9t\u00e9.txt", b"summer")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    rows = read_shard(str(path)).to_pylist()
    assert [r["key"] for r in rows] == [long_key, "\u00e9t\u00e9"]
    assert rows[0]["caption"] == "a café" and rows[1]["image"] == b"x"


def test_tar_writer_output_reads_back_with_tarfile():
    members = [("plain.jpg", b"\xff" * 1000), ("plain.txt", b"a caption"),
               ("x" * 150 + ".json", b"{}"), ("caf\u00e9.txt", b"")]
    data = b"".join(tar_member(name, payload) for name, payload in members)
    with tarfile.open(fileobj=io.BytesIO(data + b"\0" * 1024)) as archive:
        assert [(m.name, archive.extractfile(m).read()) for m in archive] == members
    empty = tar_fragment(_empty_table(), "x")
    assert len(empty + tar_trailer(len(empty))) % 10240 == 0


def _empty_table():
    import pyarrow as pa

    return pa.table({"kept": pa.array([], pa.bool_()), "key": pa.array([], pa.string())})


def test_cpu_stage_between_model_stages_is_a_config_error():
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="between model stages"):
        parse_config({"stages": [{"stage": "clip_score", "pretrained": "x.pt"}, {"stage": "length"},
                                 {"stage": "capfilt"}]}, [])
    plan = StepPlan.of(parse_config({"stages": [{"stage": "html"}, {"stage": "decode"},
                                                {"stage": "clip_score", "pretrained": "x.pt"}]}, []).stages)
    assert plan.source == (0,) and plan.model_inputs == (1,) and plan.models == (2,) and plan.sink == ()
    with pytest.raises(ConfigError, match="move them before decode"):
        parse_config({"stages": [{"stage": "decode"}, {"stage": "html"},
                                 {"stage": "clip_score", "pretrained": "x.pt"}]}, [])


def test_empty_shard_completes_with_no_samples(ray_cluster, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_tar(inputs / "empty.tar", [])
    result = run_curation(load_config(QWEN), [str(inputs)], str(tmp_path / "out"), progress=False)
    assert not result.failed and result.stats["total"] == 0 and result.stats["shards_completed"] == 1
    assert pl.read_parquet(tmp_path / "out" / "manifests" / "empty.parquet").height == 0
    with tarfile.open(tmp_path / "out" / "shards" / "empty.tar") as archive:
        assert archive.getnames() == []


WORKER_ALLOCATOR_CHECK = """
import ctypes, sys
import pyarrow as pa
from pipeline.plan import return_freed_memory

libc = ctypes.CDLL(None)
if not hasattr(libc, "mallinfo2"):
    print("no glibc"); sys.exit()
class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Mallinfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
large = libc.malloc(8 << 20)
libc.free(large)  # glibc now serves blocks up to 8 MiB from its heap, where freed memory stays with the process
return_freed_memory()
before = libc.mallinfo2().hblkhd
block = libc.malloc(1 << 20)
print(libc.mallinfo2().hblkhd - before >= 1 << 20, pa.default_memory_pool().backend_name)
libc.free(block)
"""


def test_model_recipe_workers_hand_freed_buffers_back_to_the_system():
    """What a model recipe's worker sets as it starts its first step (in a process of its own: it stays set)."""
    import subprocess
    import sys

    printed = subprocess.run([sys.executable, "-c", WORKER_ALLOCATOR_CHECK], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
    if printed == "no glibc":
        pytest.skip("the mmap threshold is glibc's")
    assert printed == "True system"  # a 1 MiB block is mapped (returned when freed); Arrow uses the system allocator


def test_read_ahead_keeps_the_order_bounds_the_reads_in_flight_and_raises_in_turn():
    """Per-shard files are read a few shards ahead, on threads: results come in the items' order, a slow consumer
    never has more than ``ahead`` reads started beyond what it took, and a failed read raises when its turn
    comes, after the ones before it."""
    import threading

    from pipeline.storage import read_ahead

    lock, started = threading.Lock(), [0]

    def read(item: int) -> int:
        with lock:
            started[0] += 1
        time.sleep(0.01 * (item % 3))  # later items often finish first
        if item == 17:
            raise OSError("item 17 is unreadable")
        return item * item

    results = read_ahead(range(25), read, ahead=4)
    for taken in range(17):
        assert next(results) == taken * taken
        time.sleep(0.02)  # a slow consumer: the reads must wait for it
        assert started[0] <= taken + 1 + 4
    with pytest.raises(OSError, match="item 17"):
        next(results)
    assert list(read_ahead([], read)) == []
