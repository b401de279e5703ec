"""One writer per output directory: the lease (pipeline/lease.py) and two runs started on one output."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT
from pipeline.config import load_config
from pipeline.lease import LEASE_PATH, LeaseError, OutputLease, now_iso, pid_scope
from pipeline.run import run_curation, select_thresholds
from pipeline.synth import SynthOptions, write_synth

QWEN = ROOT / "configs" / "qwen-vl-rules.yaml"


@pytest.fixture
def output(tmp_path):
    (tmp_path / "out" / "_state").mkdir(parents=True)
    return tmp_path / "out"


def record_of(out):
    return json.loads((out / LEASE_PATH).read_text())


def plant(out, **fields):
    """A lease record written by hand, as another process would have left it."""
    record = {"vlcurate_lease": 1, "purpose": "run", "host": socket.gethostname(), "pid": os.getpid(),
              "pid_scope": pid_scope(), "started": now_iso(), "heartbeat": now_iso(), "token": "f" * 32, **fields}
    tmp = out / "_state" / "planted"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, out / LEASE_PATH)  # whole, as a lease record is always written
    return record


def exited_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def files(out):
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def test_acquire_writes_a_whole_record_and_release_removes_it(output):
    with OutputLease(output, "run") as lease:
        record = record_of(output)
        assert record["host"] == socket.gethostname() and record["pid"] == os.getpid()
        assert record["purpose"] == "run" and record["token"] == lease.token and len(lease.token) == 32
        assert record["started"] == record["heartbeat"]
        assert files(output) == ["_state/lease.json"]  # no temporary file left beside it
    assert files(output) == []


def test_a_second_writer_is_refused_with_the_holder_named(output):
    with OutputLease(output, "run") as holder:
        with pytest.raises(LeaseError) as refused:
            OutputLease(output, "select").acquire()
        message = str(refused.value)
        assert "\n" not in message
        assert f"output directory {output} is in use by another vlcurate run" in message
        assert f"host {socket.gethostname()}, pid {os.getpid()}, since " in message
        assert "wait for it to finish or use another output directory" in message
        assert record_of(output)["token"] == holder.token


@pytest.mark.parametrize("case", ["exited_pid", "old_heartbeat_elsewhere"])
def test_a_stale_lease_is_taken_over_with_a_one_line_warning(output, case):
    if case == "exited_pid":
        stale = plant(output, pid=exited_pid())  # same host, fresh heartbeat, but the process is gone
        reason = f"process {stale['pid']} has exited"
    else:
        old = time.time() - 600
        stale = plant(output, host="elsewhere", pid=1, started="2020-01-01T00:00:00+00:00",
                      heartbeat=time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(old)))
        reason = "no heartbeat for 10 min"
    warnings = []
    with OutputLease(output, "run", warn=warnings.append) as lease:
        assert record_of(output)["token"] == lease.token != stale["token"]
        assert record_of(output)["pid"] == os.getpid()
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert f"took over output directory {output} from a vlcurate run that is gone" in warnings[0]
    assert f"pid {stale['pid']}" in warnings[0] and reason in warnings[0]


def test_a_live_lease_from_another_host_is_not_taken_over(output):
    recently = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() - 180))
    plant(output, host="elsewhere", pid=exited_pid(), heartbeat=recently)  # a pid there means nothing here
    with pytest.raises(LeaseError, match=r"host elsewhere, pid \d+, .*last heartbeat 3 min ago"):
        OutputLease(output, "run").acquire()
    assert record_of(output)["host"] == "elsewhere"


def test_an_unreadable_record_blocks_until_it_is_old(output):
    (output / LEASE_PATH).write_text('{"host": "cut sh')
    with pytest.raises(LeaseError, match="unreadable lease record"):
        OutputLease(output, "run").acquire()
    old = time.time() - 600
    os.utime(output / LEASE_PATH, (old, old))
    warnings = []
    with OutputLease(output, "run", warn=warnings.append):
        pass
    assert len(warnings) == 1 and "unreadable lease record, unchanged for 10 min" in warnings[0]


def test_the_heartbeat_renews_the_record(output):
    with OutputLease(output, "run", heartbeat=0.05) as lease:
        first = record_of(output)
        time.sleep(0.3)
        later = record_of(output)
        assert later["heartbeat"] > first["heartbeat"]
        assert {k: v for k, v in later.items() if k != "heartbeat"} == {k: v for k, v in first.items()
                                                                          if k != "heartbeat"}
        assert lease.held


def test_release_and_heartbeat_leave_a_lease_that_is_not_theirs(output):
    warnings = []
    lease = OutputLease(output, "run", heartbeat=0.05, warn=warnings.append).acquire()
    other = plant(output, host="elsewhere", pid=4242)  # taken over meanwhile (this holder was judged gone)
    time.sleep(0.3)
    assert record_of(output) == other  # the heartbeat did not write over it
    assert not lease.held and "taken over by another process (now held by host elsewhere, pid 4242" in lease.lost
    assert lease.release() is False
    assert record_of(output) == other  # nor did the release delete it
    assert len(warnings) == 1


def test_release_without_heartbeat_checks_the_token_too(output):
    warnings = []
    lease = OutputLease(output, "run", warn=warnings.append).acquire()
    other = plant(output, token="0" * 32)
    assert lease.release() is False
    assert record_of(output) == other
    assert len(warnings) == 1 and "was taken over by another process" in warnings[0]


@pytest.mark.parametrize("start", ["free", "stale"])
def test_racing_writers_exactly_one_wins(output, start):
    if start == "stale":
        plant(output, pid=exited_pid())
    barrier = threading.Barrier(8)
    won, refused = [], []

    def contender():
        lease = OutputLease(output, "run", warn=lambda message: None)
        barrier.wait()
        try:
            won.append(lease.acquire())
        except LeaseError:
            refused.append(lease)

    threads = [threading.Thread(target=contender) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1 and len(refused) == 7
    assert record_of(output)["token"] == won[0].token
    assert won[0].release() is True
    assert files(output) == []


# ------------------------------------------------------------------------------------------ runs on one output

@pytest.fixture(scope="module")
def synthetic(ray_cluster, tmp_path_factory):
    """Three small synthetic shards and their output from an undisturbed run."""
    root = tmp_path_factory.mktemp("lease-runs")
    write_synth(root / "in", SynthOptions(samples=60, shard_size=20, noise={"too_short": 0.2, "tiny_image": 0.2}))
    run_curation(load_config(QWEN), [str(root / "in")], str(root / "reference"), progress=False)
    return root / "in", root / "reference"


def contents(out):
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_two_runs_on_one_output_one_proceeds_the_other_is_refused(synthetic, tmp_path):
    from test_resume import assert_same_outputs, vlcurate

    inputs, reference = synthetic
    out = tmp_path / "out"
    first = vlcurate("run", QWEN, "--input", inputs, "--output", out, "--quiet")
    try:
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None:
            try:
                if record_of(out)["pid"] == first.pid:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.01)
        os.kill(first.pid, signal.SIGSTOP)  # the first run holds the lease and is mid-run: keep it there
        assert first.poll() is None and record_of(out)["pid"] == first.pid
        before = contents(out)
        second = vlcurate("run", QWEN, "--input", inputs, "--output", out, "--quiet")
        stdout, stderr = second.communicate(timeout=120)
        assert contents(out) == before  # the refused run changed nothing
    finally:
        os.kill(first.pid, signal.SIGCONT)
    first_stdout, first_stderr = first.communicate(timeout=300)
    assert first.returncode == 0, first_stderr
    assert second.returncode == 2 and stdout == ""
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith(f"vlcurate: error: output directory {out} is in use by another vlcurate run "
                             f"(host {socket.gethostname()}, pid {first.pid}, since ")
    assert "wait for it to finish or use another output directory" in stderr
    assert_same_outputs(reference, out)
    assert 0 < json.loads((out / "stats.json").read_text())["kept"] < 60
    assert not (out / LEASE_PATH).exists() and [p for p in out.rglob("*") if ".tmp-" in p.name] == []


def test_select_and_forced_run_take_the_same_lease(synthetic, tmp_path, capsys):
    from pipeline import cli

    inputs, reference = synthetic
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    before = contents(out)
    with OutputLease(out, "run"):
        with pytest.raises(LeaseError, match="is in use by another vlcurate run"):
            select_thresholds(str(out), ["image_size.min_side=300"])
        with pytest.raises(LeaseError, match="is in use by another vlcurate run"):
            run_curation(load_config(QWEN), [str(inputs)], str(out), force=True, progress=False)
        capsys.readouterr()
        assert cli.main(["select", str(out), "--set", "image_size.min_side=300"]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
        assert captured.err.startswith(f"vlcurate: error: output directory {out} is in use by another vlcurate run")
        assert {k: v for k, v in contents(out).items() if k != str(LEASE_PATH)} == before
    stats = select_thresholds(str(out), ["image_size.min_side=300"])  # released: select proceeds
    assert stats["shards_reselected"] == 3 and stats["kept"] == 0 and not (out / LEASE_PATH).exists()
