"""Recipes, --set overrides and the command line's answers to mistakes (one line, exit code 2)."""

import subprocess
import sys

import pytest

from conftest import ROOT, write_tar
from pipeline.config import ConfigError, load_config, parse_config


def vlcurate(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_shipped_recipes_load():
    rules = ["html", "patterns", "charset", "language", "emoji", "length", "image_size", "aspect_ratio"]
    qwen = load_config(ROOT / "configs" / "qwen-vl.yaml")
    assert [s.name for s in qwen.stages] == rules + ["decode", "clip_score", "capfilt", "dedup"]
    by_name = {s.name: s.params for s in qwen.stages}
    assert (by_name["clip_score"].model, by_name["clip_score"].pretrained) == ("ViT-L-14", "openai")
    assert by_name["capfilt"].filter == "Salesforce/blip-itm-large-coco"
    offline = load_config(ROOT / "configs" / "qwen-vl-rules.yaml")
    assert offline.name == "qwen-vl-rules" and [s.name for s in offline.enabled_stages] == rules
    assert offline.fingerprint() != qwen.fingerprint()
    basic = load_config(ROOT / "configs" / "datacomp-basic.yaml")
    assert [s.name for s in basic.stages] == ["language", "length", "image_size", "aspect_ratio"]
    assert basic.stages[1].params.min_words == 3 and basic.stages[2].params.min_side == 200


def test_overrides_and_switches():
    config = load_config(ROOT / "configs" / "qwen-vl.yaml",
                         ["length.min_words=4", "emoji.enabled=false", "patterns.rules.url=false",
                          "language.allowed=[en]"])
    by_name = {s.name: s.params for s in config.stages}
    assert by_name["length"].min_words == 4
    assert "emoji" not in [s.name for s in config.enabled_stages]
    assert by_name["patterns"].rules["url"] is False and by_name["patterns"].rules["email"] is True
    assert by_name["language"].allowed == ["en"]


def test_fingerprint_ignores_thresholds_but_not_annotation_settings():
    base = load_config(ROOT / "configs" / "qwen-vl.yaml")
    assert load_config(ROOT / "configs" / "qwen-vl.yaml", ["length.min_words=5"]).fingerprint() == base.fingerprint()
    assert load_config(ROOT / "configs" / "qwen-vl.yaml", ["html.enabled=false"]).fingerprint() != base.fingerprint()
    assert load_config(ROOT / "configs" / "qwen-vl.yaml",
                       ["patterns.rules.url=false"]).fingerprint() != base.fingerprint()


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"stages": [{"stage": "lenght"}]}, "unknown stage 'lenght'; known stages"),
        ({"stages": [{"stage": "length", "min_word": 2}]}, "unknown setting(s) ['min_word']"),
        ({"stages": [{"stage": "length", "min_words": "two"}]}, "min_words must be an integer, got 'two'"),
        ({"stages": [{"stage": "patterns", "rules": {"urls": True}}]}, "unknown rule(s) ['urls']"),
        ({"stages": []}, "'stages' must be a non-empty list"),
        ({"stage": []}, "unknown top-level key(s) ['stage']"),
        ({"stages": [{"stage": "html"}, {"stage": "html"}]}, "used twice"),
    ],
)
def test_config_errors_name_the_problem(raw, message):
    with pytest.raises(ConfigError) as error:
        parse_config(raw, [])
    assert message in str(error.value)


def test_base_recipe_errors(tmp_path):
    (tmp_path / "child.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        load_config(tmp_path / "child.yaml")
    (tmp_path / "child.yaml").write_text(f"base: {ROOT / 'configs' / 'qwen-vl.yaml'}\nstages: []\n")
    with pytest.raises(ConfigError, match="takes only"):
        load_config(tmp_path / "child.yaml")


def test_bad_override_names_the_stages():
    with pytest.raises(ConfigError, match="no stage named 'lenght'"):
        load_config(ROOT / "configs" / "qwen-vl.yaml", ["lenght.min_words=3"])


def closed_port() -> int:
    """A local TCP port that nothing listens on."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_cli_mistakes_give_one_line_and_exit_code_2(tmp_path):
    shard = write_tar(tmp_path / "s.tar", [("a.txt", b"hello world")])
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cases = [
        (["run", "configs/qwen-vl.yaml", "--input", tmp_path / "nope.tar", "--output", tmp_path / "o"],
         "matches no .tar shard"),
        (["run", "configs/qwen-vl.yaml", "--input", shard, "--output", blocker / "out"], "is not writable"),
        (["run", "configs/qwen-vl.yaml", "--input", shard, "--output", tmp_path / "o", "--set", "length.x=1"],
         "unknown setting(s) ['x']"),
        (["run", tmp_path / "missing.yaml", "--input", shard, "--output", tmp_path / "o"], "does not exist"),
        (["stats", tmp_path], "is not a vlcurate output directory"),
        (["run", "configs/qwen-vl-rules.yaml", "--input", shard, "--output", tmp_path / "o2", "--address",
          f"127.0.0.1:{closed_port()}"], "no Ray cluster answers at 127.0.0.1:"),  # Ray alone would wait forever
        (["run", "configs/qwen-vl-rules.yaml", "--input", shard, "--output", tmp_path / "o3", "--address",
          "head-node"], "is not a Ray address (HOST:PORT, auto or local)"),
    ]
    for args, message in cases:
        result = vlcurate(*args)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("vlcurate: error:") and message in lines[0], result.stderr


STOP_RAY = """
import json
import ray
from pipeline.raystart import init_ray, shutdown_ray

init_ray(num_cpus=1)
started = ray._private.worker._global_node.all_processes  # what Ray started for this process, by kind
pids = {kind: [info.process.pid for info in infos] for kind, infos in started.items()}
shutdown_ray()
shutdown_ray()  # with Ray stopped, nothing to do
print(json.dumps({"pids": pids, "initialized": ray.is_initialized()}))
"""


def test_a_command_that_started_ray_stops_every_process_it_started():
    """What the CLI does on exit: the autoscaler's monitor is stopped first (Ray would spend a second on it),
    then Ray; nothing Ray started is left running, and a second call does nothing."""
    import json
    import os

    import psutil

    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}  # a Ray of its own
    result = subprocess.run([sys.executable, "-c", STOP_RAY], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert not report["initialized"]
    assert {"monitor", "gcs_server", "raylet"} <= set(report["pids"])  # the monitor is where Ray keeps it

    def running(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    left = [(kind, pid) for kind, pids in report["pids"].items() for pid in pids if running(pid)]
    assert left == []


def test_set_takes_several_pairs_after_one_flag_and_repeated_flags():
    from pipeline.cli import build_parser

    args = build_parser().parse_args(["run", "configs/qwen-vl-rules.yaml", "--input", "x.tar", "--output", "o",
                                      "--set", "length.min_words=3", "emoji.enabled=false",
                                      "--set", "read.batch_samples=7"])
    assert args.overrides == ["length.min_words=3", "emoji.enabled=false", "read.batch_samples=7"]
    config = load_config(ROOT / "configs" / "qwen-vl-rules.yaml", args.overrides)
    assert config.read.batch_samples == 7
    assert [s.params.min_words for s in config.stages if s.name == "length"] == [3]
