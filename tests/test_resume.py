"""Exactly-once outputs across crashes, reruns, refreshes and bad shards (real Flickr8k shards)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import polars as pl
import pytest

from conftest import FLICKR, ROOT, flickr_members, require, write_tar
from pipeline.config import load_config
from pipeline.run import UsageError, run_curation, shard_status

QWEN = ROOT / "configs" / "qwen-vl-rules.yaml"


def make_inputs(folder, copies):
    """``copies`` shards named part-NNNNN.tar, cycling through the four real Flickr8k shards."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted(require(FLICKR).glob("*.tar"))
    for i in range(copies):
        shutil.copy(sources[i % len(sources)], folder / f"part-{i:05d}.tar")
    return folder


def snapshot(out):
    """Everything a consumer reads: shard bytes, manifests, stats (the run's timing-free outputs)."""
    shards = {p.name: p.read_bytes() for p in sorted((out / "shards").glob("*"))}
    manifests = {p.name: pl.read_parquet(p) for p in sorted((out / "manifests").glob("*"))}
    stats = json.loads((out / "stats.json").read_text())
    stats.pop("timing")  # CPU seconds per stage: measured, so never the same twice
    return shards, manifests, stats


def assert_same_outputs(a, b):
    shards_a, manifests_a, stats_a = snapshot(a)
    shards_b, manifests_b, stats_b = snapshot(b)
    assert shards_a.keys() == shards_b.keys() and shards_a == shards_b
    assert manifests_a.keys() == manifests_b.keys()
    for name in manifests_a:
        assert manifests_a[name].equals(manifests_b[name]), name
    assert stats_a == stats_b


def leftovers(out):
    return [str(p) for p in out.rglob("*") if ".tmp-" in p.name]


def vlcurate(*args):
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_run_then_rerun_equals_an_uninterrupted_run(ray_cluster, tmp_path):
    inputs = make_inputs(tmp_path / "in", 16)
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    config = load_config(QWEN)
    run_curation(config, [str(inputs)], str(clean), progress=False)

    driver = vlcurate("run", QWEN, "--input", inputs, "--output", crashed, "--quiet")
    state = crashed / "_state"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(state.glob("*.done.json"))) < 2 and driver.poll() is None:
        time.sleep(0.02)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    done_at_kill = len(list(state.glob("*.done.json")))
    assert 2 <= done_at_kill < 16, f"the driver was not killed part-way ({done_at_kill} shards done)"
    time.sleep(3)  # the cluster notices the dead driver and stops its tasks

    rerun = run_curation(config, [str(inputs)], str(crashed), progress=False)
    assert rerun.skipped >= done_at_kill and rerun.processed + rerun.skipped == 16
    assert_same_outputs(clean, crashed)
    assert leftovers(crashed) == []


def test_refresh_processes_only_new_shards(ray_cluster, tmp_path):
    inputs = make_inputs(tmp_path / "in", 2)
    out = tmp_path / "out"
    config = load_config(QWEN)
    first = run_curation(config, [str(inputs)], str(out), progress=False)
    assert first.processed == 2 and first.stats["total"] == 500
    make_inputs(inputs, 4)  # the refresh brings two new shards
    second = run_curation(config, [str(inputs)], str(out), progress=False)
    assert second.processed == 2 and second.skipped == 2 and second.samples_processed == 500
    assert second.stats["total"] == 1000 and second.stats["shards_completed"] == 4
    assert set(second.stats["per_shard"]) == {f"part-{i:05d}" for i in range(4)}


def test_truncated_shard_fails_alone_and_rerun_retries_only_it(ray_cluster, tmp_path):
    inputs = make_inputs(tmp_path / "in", 3)
    good_copy = (inputs / "part-00001.tar").read_bytes()
    (inputs / "part-00001.tar").write_bytes(good_copy[: len(good_copy) // 2])
    out = tmp_path / "out"
    driver = vlcurate("run", QWEN, "--input", inputs, "--output", out, "--quiet")
    stdout, stderr = driver.communicate(timeout=300)
    assert driver.returncode == 1, stderr
    assert "FAILED" in stderr and "part-00001.tar" in stderr and "unreadable tar archive" in stderr
    stats = json.loads((out / "stats.json").read_text())
    assert stats["shards_completed"] == 2 and stats["total"] == 500
    assert [f["source"] for f in stats["shards_failed"]] == [str(inputs / "part-00001.tar")]
    status = shard_status(str(out))
    assert status["completed"] == ["part-00000", "part-00002"] and status["failed"][0].startswith("part-00001:")
    assert not (out / "shards" / "part-00001.tar").exists()

    (inputs / "part-00001.tar").write_bytes(good_copy)  # the shard is repaired
    rerun = run_curation(load_config(QWEN), [str(inputs)], str(out), progress=False)
    assert rerun.processed == 1 and rerun.skipped == 2 and not rerun.failed
    assert rerun.stats["total"] == 750 and rerun.stats["shards_failed"] == []
    assert shard_status(str(out)) == {"completed": ["part-00000", "part-00001", "part-00002"], "failed": [],
                                      "pending": []}
    assert not (out / "_state" / "part-00001.failed.json").exists()  # the old failure does not outlive the fix


def test_before_curating_only_the_pending_shards_lose_what_earlier_runs_left(tmp_path):
    """Completion and failure records, embeddings and work in progress of the shards about to be curated go
    before the run (their commits then write and never probe); those of other shards stay."""
    from pipeline.outputs import OutputDir, embeddings_name
    from pipeline.run import forget_pending
    from pipeline.shards import Shard

    out = OutputDir(tmp_path / "out")
    out.create()
    names = {}
    for stem in ("pending", "kept"):
        names[stem] = [out.done_name(stem), out.failed_name(stem), embeddings_name(stem),
                       f"{out.parts_name(stem)}/0000000000.tar"]
        for name in names[stem]:
            out.write_bytes(name, b"{}")
    forget_pending(out, [Shard(str(tmp_path / "pending.tar"), "pending")], out.done_records())
    assert [name for name in names["pending"] if (tmp_path / "out" / name).exists()] == []
    assert all((tmp_path / "out" / name).exists() for name in names["kept"])


def test_rerun_with_changed_settings_refuses_unless_forced(ray_cluster, tmp_path):
    inputs = make_inputs(tmp_path / "in", 1)
    out = tmp_path / "out"
    run_curation(load_config(QWEN), [str(inputs)], str(out), progress=False)
    changed = load_config(QWEN, ["patterns.rules.url=false"])
    with pytest.raises(UsageError, match=r"other stage settings \(patterns.rules\): pass --force"):
        run_curation(changed, [str(inputs)], str(out), progress=False)
    forced = run_curation(changed, [str(inputs)], str(out), force=True, progress=False)
    assert forced.processed == 1


def test_rerun_with_changed_thresholds_reselects_without_recomputing(ray_cluster, tmp_path):
    inputs = make_inputs(tmp_path / "in", 2)
    out = tmp_path / "out"
    first = run_curation(load_config(QWEN), [str(inputs)], str(out), progress=False)
    looser = run_curation(load_config(QWEN, ["image_size.min_side=100"]), [str(inputs)], str(out), progress=False)
    assert looser.processed == 0 and looser.reselected == 2
    assert looser.stats["kept"] > first.stats["kept"] and looser.stats["total"] == first.stats["total"]


def test_selection_in_ray_tasks_equals_selection_in_this_process(ray_cluster, tmp_path, monkeypatch):
    """The selection over the whole output (here: duplicates across shards, a looser threshold) writes the same
    bytes whether Ray tasks judge and rewrite the shards (as at the end of a run) or this process does, one after
    another (as select does); an input shard that changed since it was curated stops either with its reason."""
    import pipeline.run as run
    from pipeline.outputs import OutputDir
    from pipeline.run import load_saved_config, reselect, write_stats

    inputs = make_inputs(tmp_path / "in", 6)  # the last two are copies of the first two: duplicates
    on_ray, here = tmp_path / "on-ray", tmp_path / "here"
    first = run_curation(load_config(QWEN, ["dedup.enabled=true"]), [str(inputs)], str(on_ray), progress=False)
    assert 0 < first.stats["kept"] < first.stats["total"]
    shutil.copytree(on_ray, here)
    looser = load_saved_config(str(on_ray), ["image_size.min_side=100", "dedup.max_hamming=5"])
    judged_here, judge = [], run.reselect_shards
    monkeypatch.setattr(run, "reselect_shards", lambda *args: judged_here.append(len(args[1])) or judge(*args))
    changed = {}
    for flag, out in ((True, on_ray), (False, here)):
        changed[flag] = reselect(OutputDir(out), looser, on_ray=flag)
        write_stats(OutputDir(out), looser)
    assert judged_here == [6]  # with on_ray, the shards were judged in other processes
    assert changed[True] == changed[False] > 1
    assert_same_outputs(on_ray, here)
    shutil.copy(sorted(require(FLICKR).glob("*.tar"))[3], inputs / "part-00001.tar")  # other samples
    stricter = load_saved_config(str(on_ray), ["image_size.min_side=50", "dedup.max_hamming=5"])
    for flag, out in ((True, on_ray), (False, here)):
        with pytest.raises(UsageError, match=r"^input shard .*part-00001.tar changed since it was curated: "
                                             r"rerun with --force$"):
            reselect(OutputDir(out), stricter, on_ray=flag)


def test_select_with_address_rewrites_on_the_cluster_the_same_bytes(ray_cluster, tmp_path):
    """`vlcurate select --address` joins the cluster and has its tasks rewrite the shards: the same outputs as
    select in its own process."""
    import ray

    from pipeline.run import select_thresholds

    inputs = make_inputs(tmp_path / "in", 3)
    on_cluster, here = tmp_path / "on-cluster", tmp_path / "here"
    run_curation(load_config(QWEN), [str(inputs)], str(on_cluster), progress=False)
    shutil.copytree(on_cluster, here)
    address = ray.get_runtime_context().gcs_address
    command = vlcurate("select", on_cluster, "--set", "image_size.min_side=100", "--address", address)
    stdout, stderr = command.communicate(timeout=300)
    assert command.returncode == 0, stderr[-3000:]
    drivers = {job["DriverPid"] for job in ray._private.state.jobs()}
    assert command.pid in drivers  # select joined the cluster as a driver of its own
    assert "3 shard(s) changed" in stdout
    assert select_thresholds(str(here), ["image_size.min_side=100"])["shards_reselected"] == 3
    assert_same_outputs(on_cluster, here)


def test_bad_input_catalogue_each_case_has_its_own_reason(ray_cluster, tmp_path):
    good = flickr_members(require(FLICKR / "flickr8k-00003.tar"), 1)  # one real photo with caption and json
    photo = good[0][1]
    caption = good[1][1]
    from test_image_stages import png_header

    members = good + [
        ("zero.jpg", b""), ("zero.txt", caption),
        ("truncated.jpg", photo[: len(photo) // 2]), ("truncated.txt", caption),
        ("png.jpg", png_header(640, 480)), ("png.txt", caption),
        ("bomb.png", png_header(100_000, 100_000)), ("bomb.txt", caption),
        ("latin1.jpg", photo), ("latin1.txt", "A café with crème brûlée".encode("latin-1")),
        ("empty.jpg", photo), ("empty.txt", b""),
        ("huge.jpg", photo), ("huge.txt", b"a dog " * 175_000),
        ("jsononly.json", b'{"url": "http://example.com/1.jpg"}'),
    ]
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_tar(inputs / "catalogue.tar", members)
    result = run_curation(load_config(QWEN), [str(inputs)], str(tmp_path / "out"), progress=False)
    assert not result.failed
    rows = pl.read_parquet(tmp_path / "out" / "manifests" / "catalogue.parquet")
    reasons = dict(zip(rows["key"], rows["drop_reason"]))
    assert reasons == {
        good[0][0].split(".")[0]: None,
        "zero": "image_size:empty_file",
        "truncated": "image_size:truncated",
        "png": "image_size:extension_mismatch",
        "bomb": "image_size:too_many_pixels",
        "latin1": "read:caption_not_utf8",
        "empty": "read:empty_caption",
        "huge": "read:caption_too_large",
        "jsononly": "read:missing_image",
    }
    stats = result.stats
    assert stats["total"] == 9 and stats["kept"] == 1
    assert stats["kept"] + sum(stats["dropped_by_reason"].values()) == stats["total"]


def test_killed_ray_worker_is_retried_and_outputs_are_exact(ray_cluster, tmp_path):
    import threading

    import psutil

    inputs = make_inputs(tmp_path / "in", 24)
    clean, hit = tmp_path / "clean", tmp_path / "hit"
    config = load_config(QWEN)
    run_curation(config, [str(inputs)], str(clean), progress=False)
    killed = []

    def kill_a_worker_mid_run():
        deadline = time.time() + 120
        while time.time() < deadline and len(list((hit / "_state").glob("*.done.json"))) < 1:
            time.sleep(0.01)
        while time.time() < deadline and len(list((hit / "_state").glob("*.done.json"))) < 24:
            for process in psutil.process_iter(["pid", "cmdline"]):
                if "ray::curate_shards" in " ".join(process.info["cmdline"] or []):
                    os.kill(process.info["pid"], signal.SIGKILL)
                    killed.append(process.info["pid"])
                    return

    killer = threading.Thread(target=kill_a_worker_mid_run, daemon=True)
    killer.start()
    result = run_curation(config, [str(inputs)], str(hit), progress=False)
    killer.join()
    assert killed, "no worker was running when the run was part-way"
    assert result.processed == 24 and not result.failed
    assert_same_outputs(clean, hit)
    assert leftovers(hit) == []


def test_driver_commits_run_beside_the_summaries_and_a_failed_commit_fails_its_shard_alone(tmp_path):
    """The driver's book of shards in flight (model recipes): a shard whose parts cover its samples is committed
    on the committer's threads; a commit that fails (here its part files are gone) fails that shard alone, with
    the reason; a retried task's late summary for a shard being committed is ignored; a shard whose parts never
    cover it is reported incomplete."""
    import concurrent.futures

    from pipeline.outputs import OutputDir, PartInfo
    from pipeline.run import ShardBook
    from pipeline.shards import Shard
    from pipeline.steps import RunContext, shard_summary

    out = OutputDir(tmp_path / "out")
    out.create()
    ctx = RunContext(specs=load_config(QWEN).enabled_stages, read=load_config(QWEN).read, out_root=str(out.root),
                     fingerprint="f", config_name="c")
    shards = [Shard(str(tmp_path / f"{stem}.tar"), stem) for stem in ("gone", "bad", "short")]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as committer:
        book = ShardBook(shards, out, ctx, committer)
        part = PartInfo(first=0, rows=3, tar_bytes=512, timing={})
        assert book.add(shard_summary("gone", shards[0].url, part=part)) is None
        assert book.add(shard_summary("gone", shards[0].url, total=3, end=True)) is None  # covered: committing
        assert book.add(shard_summary("gone", shards[0].url, part=part)) is None  # a retried task's, ignored
        failed = book.add(shard_summary("bad", shards[1].url, error="unreadable tar archive", end=True))
        assert failed["error"] == "unreadable tar archive"
        assert book.add(shard_summary("short", shards[2].url, part=part)) is None
        assert book.add(shard_summary("short", shards[2].url, total=5, end=True)) is None  # 3 of 5 samples
        committed = book.committed(wait=True)
    assert [r["stem"] for r in committed] == ["gone"] and committed[0]["error"].startswith("committing outputs: ")
    assert [(r["stem"], r["error"].split(":")[0]) for r in book.unfinished()] == [("short", "incomplete")]
    assert not (tmp_path / "out" / "_state" / "gone.done.json").exists()
