"""Outputs (and inputs) in an object store: a real S3 endpoint on 127.0.0.1 (moto's server), reached through the
client stack users have (s3fs for vlcurate, polars' reader for manifests, boto for the checks)."""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time

import polars as pl
import psutil
import pytest

from conftest import FLICKR, ROOT, require, write_tar
from test_cluster import tiny_model_overrides

pytest.importorskip("moto")
s3fs = pytest.importorskip("s3fs")

RULES = ROOT / "configs" / "qwen-vl-rules.yaml"
BUCKET = "vlcurate-test"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on a free loopback port for this module, with the environment every client reads."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    settings = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError(f"moto's server did not start on port {port}")
                time.sleep(0.1)
        fs = s3fs.S3FileSystem(use_listings_cache=False, skip_instance_cache=True)
        fs.mkdir(BUCKET)
        yield fs
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def vlcurate(*args, timeout=600):
    """The CLI in its own process, with its own local Ray (whose workers inherit the S3 settings)."""
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def upload_inputs(fs, prefix: str, copies: int) -> str:
    sources = sorted(require(FLICKR).glob("*.tar"))
    for index in range(copies):
        fs.put_file(str(sources[index % len(sources)]), f"{BUCKET}/{prefix}/part-{index:05d}.tar")
    return f"s3://{BUCKET}/{prefix}/part-{{00000..{copies - 1:05d}}}.tar"


def object_snapshot(fs, url: str) -> dict:
    """What a consumer reads from an output in the bucket: shard bytes, manifests, stats without timing."""
    prefix = url.removeprefix("s3://")
    shards = {path.rsplit("/", 1)[1]: fs.cat_file(path) for path in sorted(fs.ls(f"{prefix}/shards"))}
    manifests = {path.rsplit("/", 1)[1]: pl.read_parquet(io.BytesIO(fs.cat_file(path)))
                 for path in sorted(fs.ls(f"{prefix}/manifests"))}
    stats = json.loads(fs.cat_file(f"{prefix}/stats.json"))
    stats.pop("timing")
    return {"shards": shards, "manifests": manifests, "stats": stats}


def local_snapshot(folder) -> dict:
    shards = {p.name: p.read_bytes() for p in sorted((folder / "shards").iterdir())}
    manifests = {p.name: pl.read_parquet(p) for p in sorted((folder / "manifests").iterdir())}
    stats = json.loads((folder / "stats.json").read_text())
    stats.pop("timing")
    return {"shards": shards, "manifests": manifests, "stats": stats}


def assert_same(a: dict, b: dict) -> None:
    assert a["shards"].keys() == b["shards"].keys() and a["shards"] == b["shards"]
    assert a["manifests"].keys() == b["manifests"].keys()
    for name in a["manifests"]:
        assert a["manifests"][name].equals(b["manifests"][name]), name
    assert a["stats"] == b["stats"]


def open_uploads(fs) -> list:
    return fs.call_s3("list_multipart_uploads", Bucket=BUCKET).get("Uploads", []) or []


def kill_tree(pid: int) -> None:
    """kill -9 a driver and every process it started (its local Ray): the whole job dies at once."""
    try:
        processes = [psutil.Process(pid)]
    except psutil.NoSuchProcess:
        return
    processes += processes[0].children(recursive=True)
    for process in processes:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=30)


def completion_records(s3, prefix):
    """The completion records under the bucket's PREFIX/_state now, read past fsspec's listing cache; none while
    the run has written no state yet (a listing of a prefix being written can also find it empty)."""
    try:
        listing = s3.ls(f"{BUCKET}/{prefix}/_state", detail=False, refresh=True)
    except FileNotFoundError:
        return []
    return [path for path in listing if path.endswith(".done.json")]


@pytest.mark.slow
def test_killed_run_into_s3_then_rerun_equals_a_local_run(s3, tmp_path):
    """Inputs and outputs in S3: a run killed with -9 after some shards completed, then rerun, gives exactly the
    outputs of an uninterrupted run into a local folder; nothing of the crashed attempt is left in the bucket."""
    inputs = upload_inputs(s3, "inputs", 12)
    local = tmp_path / "local"
    reference = vlcurate("run", RULES, "--input", inputs, "--output", local, "--quiet")
    assert reference.returncode == 0, reference.stderr[-3000:]

    output = f"s3://{BUCKET}/crashed"
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(RULES), "--input", inputs,
                               "--output", output, "--quiet"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.time() + 400
    while time.time() < deadline and driver.poll() is None and not completion_records(s3, "crashed"):
        time.sleep(0.05)
    kill_tree(driver.pid)
    driver.wait()
    done_at_kill = completion_records(s3, "crashed")
    assert 1 <= len(done_at_kill) < 12, f"the run was not killed part-way ({len(done_at_kill)} shards done)"
    assert s3.exists(f"{BUCKET}/crashed/_state/lease.json")  # the crashed run never released its lease

    # Every shard object in the bucket is either complete (an atomic put) or absent; a shard without its
    # completion record is not done, whatever else exists.
    stems = {p.rsplit("/", 1)[1][: -len(".done.json")] for p in done_at_kill}
    status = vlcurate("status", output, "--input", inputs)
    assert status.returncode == 0, status.stderr
    assert f"completed: {len(stems)}\n" in status.stdout and f"pending: {12 - len(stems)}\n" in status.stdout

    rerun = vlcurate("run", RULES, "--input", inputs, "--output", output, "--quiet")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stderr.splitlines() == [line for line in rerun.stderr.splitlines() if "took over output" in line]
    assert len(rerun.stderr.splitlines()) == 1  # one warning line: the dead run's lease was taken over
    assert_same(object_snapshot(s3, output), local_snapshot(local))
    leftovers = [p for p in s3.find(f"{BUCKET}/crashed") if "/_state/parts/" in p or ".tmp-" in p]
    assert leftovers == [] and open_uploads(s3) == []
    assert not s3.exists(f"{BUCKET}/crashed/_state/lease.json")  # released at the end


@pytest.mark.slow
def test_model_recipe_into_s3_equals_a_local_run(s3, tmp_path, tiny_models):
    """A recipe with model stages: the rows carried past the model actors live in the bucket too."""
    from pipeline.synth import SynthOptions, write_synth

    inputs = tmp_path / "in"
    write_synth(str(inputs), SynthOptions(samples=40, shard_size=20, seed=3))
    overrides = ["--set", *tiny_model_overrides(tiny_models)]
    demo = ROOT / "configs" / "demo.yaml"
    local = tmp_path / "local"
    reference = vlcurate("run", demo, "--input", inputs, "--output", local, "--quiet", *overrides)
    assert reference.returncode == 0, reference.stderr[-3000:]
    output = f"s3://{BUCKET}/model"
    result = vlcurate("run", demo, "--input", inputs, "--output", output, "--quiet", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same(object_snapshot(s3, output), local_snapshot(local))
    assert [p for p in s3.find(f"{BUCKET}/model") if "/_state/parts/" in p] == []


def rules_output(s3, tmp_path, name: str) -> str:
    """A small rule-recipe output in the bucket, written by the CLI."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_tar(inputs / "a.tar", _members(0, 30))
    write_tar(inputs / "b.tar", _members(30, 30))
    output = f"s3://{BUCKET}/{name}"
    result = vlcurate("run", RULES, "--input", inputs, "--output", output, "--quiet",
                      "--set", "image_size.min_side=100")  # Flickr8k's photos here are about 200x150
    assert result.returncode == 0, result.stderr[-3000:]
    return output


def _members(start: int, count: int) -> list[tuple[str, bytes]]:
    from conftest import flickr_members

    members = flickr_members(sorted(require(FLICKR).glob("*.tar"))[0], start + count)
    keys = list(dict.fromkeys(name.split(".", 1)[0] for name, _ in members))[start:]
    return [(name, data) for name, data in members if name.split(".", 1)[0] in keys]


@pytest.mark.slow
def test_readers_and_select_work_on_an_s3_output(s3, tmp_path):
    """status, stats, explain, select and report read (and select rewrites) an output in the bucket."""
    from pipeline.cli import funnel_from_manifests
    from pipeline.report import write_report
    from pipeline.run import select_thresholds, shard_status

    output = rules_output(s3, tmp_path, "readers")
    status = shard_status(output)
    assert status["completed"] == ["a", "b"] and status["pending"] == [] and status["failed"] == []
    funnel = funnel_from_manifests(output)
    stored = json.loads(s3.cat_file(f"{BUCKET}/readers/stats.json"))
    assert funnel["total"] == stored["total"] == 60 and funnel["kept"] == stored["kept"]

    explain = vlcurate("explain", output, _first_key(s3, "readers"))
    assert explain.returncode == 0, explain.stderr
    assert "verdict:" in explain.stdout

    before = s3.cat_file(f"{BUCKET}/readers/shards/a.tar")
    stats = select_thresholds(output, ["length.min_words=12"])
    after = s3.cat_file(f"{BUCKET}/readers/shards/a.tar")
    assert stored["kept"] >= 30 and 0 < stats["kept"] < stored["kept"]
    assert stats["shards_reselected"] >= 1 and after != before
    kept_keys = {m.name.rsplit(".", 1)[0] for m in tarfile.open(fileobj=io.BytesIO(after))}
    manifest = pl.read_parquet(io.BytesIO(s3.cat_file(f"{BUCKET}/readers/manifests/a.parquet")))
    assert kept_keys == set(manifest.filter(pl.col("kept"))["key"].to_list())

    report = write_report(output)
    assert str(report).startswith(output) and s3.exists(f"{BUCKET}/readers/report/index.html")
    assert b"vlcurate report" in s3.cat_file(f"{BUCKET}/readers/report/index.html")


def _first_key(s3, name: str) -> str:
    manifest = pl.read_parquet(io.BytesIO(s3.cat_file(f"{BUCKET}/{name}/manifests/a.parquet")))
    return manifest["key"][0]


def test_s3_lease_one_writer_wins_and_a_second_is_refused(s3):
    """The lease record with conditional requests: of several writers racing for one output exactly one wins;
    the others are refused with a line naming the holder; a dead holder's lease is taken over."""
    from pipeline.lease import LeaseError, OutputLease

    output = f"s3://{BUCKET}/leased"
    outcomes, lock = [], threading.Lock()

    def contend(index):
        lease = OutputLease(output, f"run {index}", heartbeat=3600)
        try:
            lease.acquire()
            with lock:
                outcomes.append(("won", lease))
        except LeaseError as exc:
            with lock:
                outcomes.append(("refused", str(exc)))

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [lease for outcome, lease in outcomes if outcome == "won"]
    refusals = [text for outcome, text in outcomes if outcome == "refused"]
    assert len(winners) == 1 and len(refusals) == 5
    assert all("in use by another vlcurate run" in text and f"pid {os.getpid()}" in text for text in refusals)

    record = json.loads(s3.cat_file(f"{BUCKET}/leased/_state/lease.json"))
    assert record["token"] == winners[0].token
    assert winners[0].release() and not s3.exists(f"{BUCKET}/leased/_state/lease.json")

    # A holder that died on this host (its pid has exited) is taken over with a warning.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = dict(record, pid=dead.pid, token="0" * 32)
    s3.pipe_file(f"{BUCKET}/leased/_state/lease.json", json.dumps(stale).encode())
    warnings = []
    lease = OutputLease(output, "run", heartbeat=3600, warn=warnings.append)
    lease.acquire()
    assert len(warnings) == 1 and str(dead.pid) in warnings[0]
    assert json.loads(s3.cat_file(f"{BUCKET}/leased/_state/lease.json"))["token"] == lease.token
    lease.release()


def test_s3_lease_replace_and_delete_are_conditional(s3):
    """Renewing or releasing a record that someone else replaced meanwhile changes nothing."""
    from pipeline.storage import ObjectStorage

    store = ObjectStorage(f"s3://{BUCKET}/conditional").lease_store("_state/lease.json")
    assert store.create(b"first") and not store.create(b"second")
    other = ObjectStorage(f"s3://{BUCKET}/conditional").lease_store("_state/lease.json")
    assert other.read()[0] == b"first" and other.replace(b"first", b"other's")
    assert not store.replace(b"first", b"mine") and not store.delete(b"first")
    assert s3.cat_file(f"{BUCKET}/conditional/_state/lease.json") == b"other's"
    assert other.delete(b"other's") and store.read() is None


def test_s3_output_errors_are_one_line(s3, tmp_path):
    """A missing bucket and a prefix holding someone else's objects are refused before anything is written."""
    from pipeline.run import UsageError, prepare_output

    with pytest.raises(UsageError, match="bucket no-such-bucket does not exist"):
        prepare_output("s3://no-such-bucket/out")
    s3.pipe_file(f"{BUCKET}/foreign/notes.txt", b"not ours")
    with pytest.raises(UsageError, match="not empty and holds no vlcurate output"):
        prepare_output(f"s3://{BUCKET}/foreign")
    assert s3.find(f"{BUCKET}/foreign") == [f"{BUCKET}/foreign/notes.txt"]


def test_aborted_shard_upload_leaves_nothing(s3):
    """A shard whose writing fails part-way (after parts of a multipart upload were sent) leaves no object and
    no open upload."""
    from pipeline.outputs import OutputDir, ShardWriter

    out = OutputDir(f"s3://{BUCKET}/aborted")
    writer = ShardWriter(out, "x", "/in/x.tar")
    writer.file.write(os.urandom(20 * 2**20))  # more than one upload part
    writer.abort()
    assert not s3.exists(f"{BUCKET}/aborted/shards/x.tar") and open_uploads(s3) == []


def test_completion_records_are_read_whole_and_literally_from_s3(s3):
    """Every record is read (several at once), each under its own name, even one holding glob characters; a
    record that is not JSON counts as not done."""
    from pipeline.outputs import OutputDir
    from pipeline.storage import READS_IN_FLIGHT

    prefix = f"{BUCKET}/records"
    stems = [f"shard-{i:04d}" for i in range(READS_IN_FLIGHT + 8)] + ["glob[1]", "star*", "what?"]
    s3.pipe({f"{prefix}/_state/{stem}.done.json": json.dumps({"total": index}).encode()
             for index, stem in enumerate(stems)})
    s3.pipe_file(f"{prefix}/_state/torn.done.json", b'{"total": ')
    out = OutputDir(f"s3://{prefix}")
    records = out.done_records()
    assert sorted(records) == sorted(stems)
    assert all(records[stem] == {"total": index, "stem": stem} for index, stem in enumerate(stems))
    names = ["_state/glob[1].done.json", "_state/missing.done.json", "_state/star*.done.json"]
    assert out.store.read_many(names) == [b'{"total": %d}' % stems.index("glob[1]"), None,
                                          b'{"total": %d}' % stems.index("star*")]


def test_before_a_run_only_stale_records_and_existing_parts_are_removed_in_s3(s3):
    """The work in progress of a shard about to be curated is found with one listing of the store's folders; a
    record of another configuration goes, and nothing of the shards left alone is touched."""
    from pipeline.outputs import OutputDir
    from pipeline.run import forget_pending
    from pipeline.shards import Shard

    prefix = f"{BUCKET}/forget"
    s3.pipe({f"{prefix}/_state/{stem}.done.json": b"{}" for stem in ("kept", "stale")})
    s3.pipe({f"{prefix}/_state/parts/{stem}/0000000000.tar": b"part" for stem in ("stale", "new", "other")})
    out = OutputDir(f"s3://{prefix}")
    assert out.stems_with_parts() == {"stale", "new", "other"}
    forget_pending(out, [Shard(f"/in/{stem}.tar", stem) for stem in ("stale", "new", "fresh")], out.done_records())
    assert sorted(s3.find(prefix)) == [f"{prefix}/_state/kept.done.json",
                                       f"{prefix}/_state/parts/other/0000000000.tar"]
