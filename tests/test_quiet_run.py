"""A successful run prints vlcurate's own lines only: no Ray internals, no errors, nothing twice."""

import os
import re
import subprocess
import sys

import pytest
from conftest import FLICKR, ROOT, flickr_members, require, train_settings, training_metrics, write_tar

from pipeline.quiet import RAY_LINE, _write_kept

ALARMING = re.compile(r"Error|Failed|Traceback")
PROGRESS = re.compile(r"^\s*\w+:\s+\d+%\|")  # a progress bar's refresh


def vlcurate(*args, env=None):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env=env)


def printed_lines(result) -> list[str]:
    """Every line either stream showed, progress-bar refreshes split at carriage returns."""
    lines = []
    for stream in (result.stdout, result.stderr):
        for line in stream.splitlines():
            lines += [piece for piece in line.split("\r") if piece.strip()]
    return lines


def assert_quiet(result):
    assert result.returncode == 0, result.stderr
    lines = printed_lines(result)
    assert not [line for line in lines if ALARMING.search(line)], result.stderr
    assert not [line for line in lines if RAY_LINE.match(line.encode())], result.stderr
    assert "thresholds changed" not in result.stdout
    repeated = [line for line in set(lines)
                if lines.count(line) > 1 and not PROGRESS.match(line) and set(line.strip()) - {"-", "=", " "}]
    assert not repeated, repeated


def tiny_model_settings(tiny_models) -> list[str]:
    clip, blip = tiny_models["clip"], tiny_models["blip"]
    return [f"clip_score.model={tiny_models['clip_name']}", f"clip_score.pretrained={clip['checkpoint']}",
            f"clip_score.model_config={clip['model_config']}", "clip_score.image_size=32",
            f"capfilt.captioner={blip['captioner']}", f"capfilt.filter={blip['filter']}", "capfilt.image_size=32",
            "decode.size=32", "image_size.min_side=32"]


@pytest.mark.slow
def test_model_recipe_run_prints_only_its_own_lines(tiny_models, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_tar(inputs / "a.tar", flickr_members(require(FLICKR / "flickr8k-00000.tar"), 24))
    args = ["run", ROOT / "configs" / "demo.yaml", "-i", inputs, "-o", tmp_path / "out",
            "--set", *tiny_model_settings(tiny_models)]
    first = vlcurate(*args)
    assert_quiet(first)
    assert "1 shard(s) processed, 0 already complete" in first.stdout
    again = vlcurate(*args)  # the same command again: nothing to do, and nothing re-applied
    assert_quiet(again)
    assert "0 shard(s) processed, 1 already complete" in again.stdout


def test_stderr_filter_drops_ray_lines_and_forwards_the_rest():
    read_end, write_end = os.pipe()
    tail = _write_kept(b"[2026-11-28 03:59:00,355 E 10 10] core_worker.cc:2465: Actor ...\n"
                       b"curating:  50%|#####     | 1/2\r"
                       b"2026-11-28 04:08:40,538\tWARNING authentication_token_setup.py:85 -- Token ...\n"
                       b"vlcurate: warning: no GPU in the Ray cluster\n[2026-11", write_end, final=False)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        forwarded = pipe.read()
    assert forwarded == b"curating:  50%|#####     | 1/2\rvlcurate: warning: no GPU in the Ray cluster\n"
    assert tail == b"[2026-11"  # might still become a Ray line: held until its end arrives


def test_filtered_stderr_reaches_the_terminal_in_order(tmp_path):
    script = ("import os, sys\nfrom pipeline.quiet import RayLinesFiltered\n"
              "with RayLinesFiltered():\n"
              "    print('one', file=sys.stderr, flush=True)\n"
              "    os.write(2, b'[2026-11-28 03:59:00,355 E 1 1] core_worker.cc:1: noise\\n')\n"
              "    print('two', file=sys.stderr, flush=True)\n"
              "print('three', file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.stderr == "one\ntwo\nthree\n"
    verbose = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                             env={**os.environ, "VLCURATE_VERBOSE": "1"})
    assert "core_worker.cc:1: noise" in verbose.stderr


@pytest.mark.slow
def test_training_prints_each_step_once_and_no_ray_internals(clip_training):
    """``vlcurate train`` resuming a killed run (conftest.py): from the checkpoint it resumed at, one line per
    step logged, none of the killed run's steps again, and nothing of Ray's."""
    result, train = clip_training.resumed, train_settings("clip")
    assert_quiet(result)
    resumed_at = next(m["step"] for m in training_metrics(clip_training.folder) if m.get("event") == "resumed")
    steps = [line.split()[2] for line in result.stdout.splitlines() if line.startswith("[clip] step ")]
    expected = range(resumed_at, train["max_steps"] + 1, train["log_every"])
    assert steps == [f"{step}/{train['max_steps']}" for step in expected], result.stdout
