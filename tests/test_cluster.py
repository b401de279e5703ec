"""Multi-node runs: on a head and two worker nodes (each with its own raylet, object store and CPUs, all on this
machine) the rule recipe and a model recipe write the same outputs as on one node; losing a worker node while
shards are in flight loses and duplicates nothing once the run is rerun; ``vlcurate run --address`` joins a
cluster started with ``ray start --head``.

The multi-node runs are driven from a subprocess (``tests/cluster_job.py``): this test session is already
connected to its own one-node Ray, and a process joins one Ray cluster only.
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cluster_job import SUMMARY_MARK, remove_folder_of_ray_files
from conftest import FLICKR, ROOT, flickr_members, require, write_tar
from pipeline.config import load_config
from pipeline.run import run_curation
from pipeline.synth import SynthOptions, default_noise, write_synth
from test_resume import assert_same_outputs, leftovers

pytestmark = pytest.mark.slow  # every test here starts a Ray cluster of its own

RULES = ROOT / "configs" / "qwen-vl-rules.yaml"
DEMO = ROOT / "configs" / "demo.yaml"
RULE_SHARDS = 8
RULE_SHARD_SAMPLES = 60
SYNTH_SAMPLES = 90
CLUSTER_JOB_SECONDS = 400


def tiny_model_overrides(tiny_models) -> list[str]:
    """configs/demo.yaml's model stages pointed at the session's tiny CLIP and BLIP, on CPU."""
    clip, blip = tiny_models["clip"], tiny_models["blip"]
    return [f"clip_score.model={tiny_models['clip_name']}", f"clip_score.pretrained={clip['checkpoint']}",
            f"clip_score.model_config={clip['model_config']}", "clip_score.image_size=32", "decode.size=32",
            f"capfilt.captioner={blip['captioner']}", f"capfilt.filter={blip['filter']}", "capfilt.image_size=32",
            "capfilt.itm_threshold=0.0", "clip_score.resources.num_gpus=0", "capfilt.resources.num_gpus=0"]


def without_ray_address() -> dict:
    """This environment without $RAY_ADDRESS: a subprocess joins only the cluster it is given."""
    return {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}


def run_cluster_job(job: dict, folder: Path) -> list[dict]:
    """Run ``tests/cluster_job.py`` on ``job``; one summary per run. On a timeout the job is asked to stop (its
    cluster shuts down) before the test fails."""
    job_path = folder / "job.json"
    job_path.write_text(json.dumps(job))
    with open(folder / "job.log", "w") as log:
        process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "cluster_job.py"), str(job_path)],
                                   cwd=ROOT, env=without_ray_address(), stdout=subprocess.PIPE, stderr=log,
                                   text=True)
        try:
            stdout, _ = process.communicate(timeout=CLUSTER_JOB_SECONDS)
        except subprocess.TimeoutExpired:
            stop_process(process)
            pytest.fail(f"the cluster job did not finish in {CLUSTER_JOB_SECONDS} s; log: {folder / 'job.log'}")
    assert process.returncode == 0, (folder / "job.log").read_text()[-3000:]
    return [json.loads(line.removeprefix(SUMMARY_MARK)) for line in stdout.splitlines()
            if line.startswith(SUMMARY_MARK)]


def stop_process(process: subprocess.Popen, grace: float = 60) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds."""
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Real Flickr8k shards for the rule recipe, synthetic 64-px scenes (with noise) for the model recipe."""
    folder = tmp_path_factory.mktemp("cluster-inputs")
    synth = folder / "synth"
    write_synth(synth, SynthOptions(samples=SYNTH_SAMPLES, shard_size=SYNTH_SAMPLES // 3, size=64,
                                    noise=default_noise(0.3)))
    rules = small_real_shards(folder / "rules", RULE_SHARDS, RULE_SHARD_SAMPLES) if FLICKR.is_dir() else None
    return {"rules": rules, "synth": synth}


def small_real_shards(folder: Path, count: int, samples: int) -> Path:
    """``count`` shards part-NNNNN.tar of the first ``samples`` samples of the real Flickr8k shards, in turn."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted(require(FLICKR).glob("*.tar"))
    for index in range(count):
        write_tar(folder / f"part-{index:05d}.tar", flickr_members(sources[index % len(sources)], samples))
    return folder


@pytest.fixture(scope="module")
def one_node(ray_cluster, inputs, tiny_models, tmp_path_factory):
    """The reference outputs: the same recipes on this session's one-node Ray (two CPUs)."""
    folder = tmp_path_factory.mktemp("one-node")
    if inputs["rules"]:
        run_curation(load_config(RULES), [str(inputs["rules"])], str(folder / "rules"), progress=False)
    run_curation(load_config(DEMO, tiny_model_overrides(tiny_models)), [str(inputs["synth"])],
                 str(folder / "model"), progress=False)
    return folder


@pytest.fixture(scope="module")
def three_nodes(inputs, tiny_models, tmp_path_factory):
    """One cluster job on a head without CPUs and two worker nodes of one CPU each: the model recipe, the rule
    recipe, then the rule recipe again with a busy worker node removed once a shard is complete (the rule
    runs only where the real shards are present)."""
    folder = tmp_path_factory.mktemp("three-nodes")
    runs = {"model": {"config": str(DEMO), "overrides": tiny_model_overrides(tiny_models),
                      "inputs": [str(inputs["synth"])], "output": str(folder / "model")}}
    if inputs["rules"]:
        runs["rules"] = {"config": str(RULES), "inputs": [str(inputs["rules"])], "output": str(folder / "rules")}
        runs["node-lost"] = {**runs["rules"], "output": str(folder / "node-lost"), "remove_worker_after_done": 1,
                             "remove_worker_running": "curate_shards"}
    summaries = run_cluster_job({"head_cpus": 0, "worker_cpus": [1, 1], "runs": list(runs.values())}, folder)
    assert len(summaries) == len(runs), (folder / "job.log").read_text()[-3000:]
    return {"folder": folder, **dict(zip(runs, summaries))}


def ran(summary: dict, node: str, step: str) -> bool:
    """Whether a worker process of ``node`` was seen running ``step`` (a function name of pipeline.plan)."""
    return any(step in title for title in summary["steps_by_node"].get(node, []))


def test_rule_recipe_on_three_nodes_equals_one_node(three_nodes, one_node):
    require(FLICKR)
    summary = three_nodes["rules"]
    assert summary["processed"] == RULE_SHARDS and not summary["failed"]
    assert ran(summary, "worker-0", "curate_shards") and ran(summary, "worker-1", "curate_shards"), summary
    assert not ran(summary, "head", "curate_shards"), summary  # the head has no CPU
    assert_same_outputs(one_node / "rules", three_nodes["folder"] / "rules")
    assert leftovers(three_nodes["folder"] / "rules") == []


def test_model_recipe_on_three_nodes_equals_one_node(three_nodes, one_node):
    summary = three_nodes["model"]
    assert summary["processed"] == 3 and not summary["failed"] and summary["samples"] == SYNTH_SAMPLES
    # The reading tasks and the model actors live long enough to be seen; the sink step takes milliseconds per part
    # on these 90 samples and may finish between two looks (every 50 ms), so only where it ran is checked.
    for step in ("read_and_slim", "ModelActor"):
        assert any(ran(summary, node, step) for node in summary["steps_by_node"]), (step, summary)
    # Three small shards may all be read and written on one worker node (the rule recipe's eight use both).
    assert summary["steps_by_node"]["worker-0"] or summary["steps_by_node"]["worker-1"], summary
    assert not ran(summary, "head", "read_and_slim") and not ran(summary, "head", "write_results"), summary
    out = three_nodes["folder"] / "model"
    assert_same_outputs(one_node / "model", out)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["kept"] > 0 and stats["timing"]["capfilt"]["samples"] > 0  # the model stages saw samples
    assert not (out / "_state" / "parts").exists() and leftovers(out) == []


def test_losing_a_worker_node_mid_run_then_rerun_is_exactly_once(three_nodes, one_node, inputs):
    require(FLICKR)
    summary = three_nodes["node-lost"]
    removal = summary["node_removal"]
    assert removal, "no worker node was removed"
    assert any("curate_shards" in step for step in removal["steps_running"]), removal  # a shard was in flight
    assert 1 <= removal["done_before"] and removal["done_after"] < RULE_SHARDS, removal  # part-way
    out = three_nodes["folder"] / "node-lost"
    failed = sorted(f["stem"] for f in summary["failed"])
    # Ray retries the lost node's tasks on the other worker (the run finishes), or the shards fail with a reason.
    assert summary["processed"] == RULE_SHARDS and all(f["error"] for f in summary["failed"])
    print(f"worker node lost with {removal['done_after']} of {RULE_SHARDS} shards complete: "
          + (f"{len(failed)} shard(s) failed: {failed}" if failed else "the run finished, no shard failed"))

    rerun = run_curation(load_config(RULES), [str(inputs["rules"])], str(out), progress=False)
    assert rerun.processed == len(failed) and rerun.skipped == RULE_SHARDS - len(failed) and not rerun.failed
    assert_same_outputs(one_node / "rules", out)  # every shard once, every sample once, same bytes
    assert leftovers(out) == [] and not (out / "_state" / "parts").exists()


# ----------------------------------------------------------------------------------------------------------------
# vlcurate run --address against `ray start --head`


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def ray_start_head(cpus: int):
    """``ray start --head`` in a subprocess, as a job script starts a cluster; yields the cluster's address and
    the folder of its files (its own, so that no other ``ray.init()`` on the machine finds the cluster). Stopped
    by signalling that command (it stops its node), never with ``ray stop``, which stops every Ray cluster of
    the user on this machine, this test session's own included."""
    folder = tempfile.mkdtemp(prefix="vlc-ray-")  # short: Unix socket paths are limited to about 100 bytes
    command = [str(Path(sys.executable).with_name("ray")), "start", "--head", f"--port={free_port()}",
               f"--num-cpus={cpus}", "--include-dashboard=false", f"--temp-dir={folder}", "--block"]
    log = open(Path(folder) / "ray-start.log", "w")
    env = {**without_ray_address(), "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # stop at once when signalled
    head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield wait_for_address(Path(folder) / "ray_current_cluster", head), Path(folder)
    finally:
        stop_process(head, grace=30)
        log.close()
        remove_folder_of_ray_files(folder)


def wait_for_address(address_file: Path, head: subprocess.Popen, seconds: float = 120) -> str:
    """The address `ray start` writes once its head node is up."""
    deadline = time.time() + seconds
    while time.time() < deadline and head.poll() is None:
        if address_file.is_file() and address_file.read_text().strip():
            return address_file.read_text().strip()
        time.sleep(0.2)
    raise AssertionError(f"ray start --head did not come up (exit code {head.poll()})")


def test_cli_run_with_address_joins_a_cluster_started_with_ray_start(ray_cluster, tmp_path):
    shards = small_real_shards(tmp_path / "in", 2, RULE_SHARD_SAMPLES)
    reference = tmp_path / "one-node"
    run_curation(load_config(RULES), [str(shards)], str(reference), progress=False)
    out = tmp_path / "out"
    with ray_start_head(cpus=2) as (address, ray_files):
        command = [str(Path(sys.executable).with_name("vlcurate")), "run", str(RULES), "--input", str(shards),
                   "--output", str(out), "--address", address, "--quiet"]
        completed = subprocess.run(command, cwd=ROOT, env=without_ray_address(), capture_output=True, text=True,
                                   timeout=300)
        drivers = list(ray_files.glob("session_*/logs/python-core-driver-*"))
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert drivers, "vlcurate did not join the cluster of ray start"  # a driver logs into its cluster's folder
    assert json.loads((out / "stats.json").read_text())["total"] == 2 * RULE_SHARD_SAMPLES
    assert_same_outputs(reference, out)
