"""Built-in trainers on Ray Train (CPU, tiny models, `vlcurate synth` data): losses fall, the models learn what
their evaluations measure, a killed run resumes, every export loads in its scoring stage, and what a run hands to
Ray Train's own processes keeps their start-up light."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, photos_and_captions, train_recipe, train_settings, training_metrics as metrics
from helpers import curate
from models.training.loop import run_training

pytestmark = pytest.mark.slow  # every test here trains a model on Ray Train


def losses(folder: Path) -> list[float]:
    return [m["loss"] for m in metrics(folder) if "loss" in m]


@pytest.fixture(scope="module")
def synth(training_pairs):
    return training_pairs


@pytest.fixture(scope="module")
def clip_run(clip_training):
    """The CLIP recipe's run, killed part-way and resumed (conftest.py): the one every CLIP test reads."""
    assert clip_training.resumed.returncode == 0, clip_training.resumed.stderr[-3000:]
    return clip_training


def test_clip_learns_and_retrieves_far_above_chance(clip_run):
    trace = losses(clip_run.folder)
    assert trace[-1] < 0.6 * trace[0]
    final = metrics(clip_run.folder)[-1]
    chance = 1 / final["eval_pairs"]
    assert final["image_to_text_recall@1"] > 10 * chance and final["text_to_image_recall@1"] > 10 * chance
    assert final["image_to_text_recall@10"] > final["image_to_text_recall@1"]


def test_clip_export_loads_in_open_clip_and_in_the_score_stage(clip_run, synth):
    import open_clip

    export = clip_run.folder / "export"
    open_clip.add_model_config(export / "vlcurate-tiny-clip.json")
    model = open_clip.create_model("vlcurate-tiny-clip", pretrained=str(export / "checkpoint.pt"))
    assert model.visual.image_size == (32, 32)
    images, captions = photos_and_captions(sorted(synth.glob("*.tar"))[-1], 64)
    entry = {"stage": "clip_score", "model": f"local-dir:{export}", "pretrained": "",
             "resources": {"num_gpus": 0}, "image_size": 64}
    matched = [r["clip_score"] for r in curate([entry], captions, images)]
    shuffled = [r["clip_score"] for r in curate([entry], captions[1:] + captions[:1], images)]
    assert np.mean(matched) > np.mean(shuffled) + 0.05  # the trained CLIP scores true pairs higher


# The captioner's loss is down to about 0.6 of its first value by half its recipe's steps; the filter's matching
# head starts to learn at a step that varies from run to run, so it keeps all of its recipe's.
BLIP_OVERRIDES = {"blip-captioner": ["train.max_steps=60"], "blip-itm": []}


@pytest.fixture(scope="module")
def blip_runs(ray_cluster, synth, tmp_path_factory):
    runs = {}
    for task, overrides in BLIP_OVERRIDES.items():
        out = tmp_path_factory.mktemp(task)
        run_training(task, str(train_recipe(task)), str(synth), str(out), overrides)
        runs[task] = out
    return runs


def test_blip_captioner_and_filter_learn(blip_runs):
    for task, folder in blip_runs.items():
        trace = losses(folder)
        assert trace[-1] < 0.8 * trace[0], task
    assert metrics(blip_runs["blip-itm"])[-1]["itm_auc"] > 0.75


def test_blip_exports_plug_into_capfilt(blip_runs, synth):
    images, captions = photos_and_captions(sorted(synth.glob("*.tar"))[-1], 48)
    entry = {"stage": "capfilt", "captioner": str(blip_runs["blip-captioner"] / "export"),
             "filter": str(blip_runs["blip-itm"] / "export"), "resources": {"num_gpus": 0}, "image_size": 32,
             "num_captions": 2, "itm_threshold": 0.5}
    matched = curate([entry], captions, images)
    shuffled = curate([entry], captions[7:] + captions[:7], images)
    texts = [text for r in matched for text in r["capfilt_synthetic"]]
    assert len(texts) == 2 * len(matched) and sum(bool(t) for t in texts) >= 0.9 * len(texts)
    vocabulary = {"circle", "square", "triangle", "diamond", "cross", "red", "blue", "green", "large", "small"}
    words = {w for r in matched for text in r["capfilt_synthetic"] for w in text.split()}
    assert words & vocabulary  # the captioner writes about shapes and colours
    assert np.mean([r["capfilt_web_itm"] for r in matched]) > np.mean([r["capfilt_web_itm"] for r in shuffled])
    dropped = sum(r["drop_reason"] is not None for r in shuffled)
    assert dropped > sum(r["drop_reason"] is not None for r in matched)


def test_diffusion_learns_the_caption_and_samples(ray_cluster, synth, clip_run, tmp_path):
    out = tmp_path / "diffusion"
    run_training("diffusion", str(train_recipe("diffusion")), str(synth), str(out),
                 [f"model.text_encoder={clip_run.folder / 'export'}"])
    trace = losses(out)
    assert trace[-1] < 0.5 * trace[0]
    final = metrics(out)[-1]
    assert final["eval_loss_right_caption"] < final["eval_loss_shuffled_caption"]
    export = out / "export"
    assert (export / "unet" / "config.json").is_file() and (export / "scheduler").is_dir()
    from PIL import Image

    from pipeline.cli import main as vlcurate

    assert vlcurate(["sample", str(export), "--prompt", "a large red circle on the left of a blue background",
                     "--output", str(tmp_path / "img"), "--steps", "10"]) == 0
    with Image.open(tmp_path / "img" / "sample-000.png") as image:
        assert image.size == (16, 16)


def test_killed_training_resumes_from_its_checkpoint(clip_run):
    out, steps_before, train = clip_run.folder, clip_run.steps_before_kill, train_settings("clip")
    max_steps = train["max_steps"]
    assert steps_before and max(steps_before) < max_steps, "the run was not killed part-way"
    lines = metrics(out)
    resumed = [m for m in lines if m.get("event") == "resumed"]
    assert resumed and resumed[-1]["step"] >= train["checkpoint_every"]
    after = [m["step"] for m in lines[lines.index(resumed[-1]) + 1:] if "loss" in m]
    assert after[0] > resumed[-1]["step"] and after[-1] == max_steps  # the step count continues
    assert lines[-1]["final"] and (out / "export" / "checkpoint.pt").is_file()


def test_the_training_datasets_plan_unpickles_without_torch(ray_cluster, synth, tmp_path):
    """Ray Train's dataset manager (and with several workers Ray Data's split coordinator) unpickles the training
    dataset's plan in a process of its own for every run: the preprocessing it carries is plain settings, which
    import neither torch nor the model library there, and which prepare the same samples as the task itself."""
    import ray
    import ray.cloudpickle
    from models.training import task_class
    from models.training.data import TaskSpec, preprocess_block, read_samples
    from models.training.loop import training_dataset
    from models.training.recipe import load_train_config

    model, train = load_train_config(task_class("clip"), str(train_recipe("clip")), [])
    spec = TaskSpec("clip", dataclasses.asdict(model), dataclasses.asdict(train), str(tmp_path), run="one")
    shards = [str(path) for path in sorted(synth.glob("*.tar"))]
    plan = tmp_path / "plan.pkl"
    plan.write_bytes(ray.cloudpickle.dumps(training_dataset(shards, spec)))
    script = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
              "import ray, ray.cloudpickle; ray.init(logging_level='ERROR')\n"
              f"ray.cloudpickle.loads(open({str(plan)!r}, 'rb').read())\n"
              "print(sorted(name for name in ('torch', 'open_clip') if name in sys.modules))")
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    loaded = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=env)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert loaded.stdout.split("\n")[-2] == "[]", loaded.stdout
    samples = {k: np.array(v[:8], dtype=object) for k, v in read_samples(shards[-1:]).items()}
    from_spec = preprocess_block(samples, spec)
    assert from_spec["tokens"].tolist() == preprocess_block(samples, spec.build())["tokens"].tolist()
    assert from_spec["image"].shape == (8, 3, 32, 32)


def test_ray_train_settings_hold_for_a_run_and_yield_to_the_environment(ray_cluster, monkeypatch):
    from models.training.loop import POLL_INTERVAL_ENV, PREEMPTION_WATCHER_ENV, ray_train_environment

    monkeypatch.delenv(POLL_INTERVAL_ENV, raising=False)
    monkeypatch.delenv(PREEMPTION_WATCHER_ENV, raising=False)
    with ray_train_environment():  # this session's cluster has one node
        assert os.environ[POLL_INTERVAL_ENV] == "0.5" and os.environ[PREEMPTION_WATCHER_ENV] == "0"
    assert POLL_INTERVAL_ENV not in os.environ and PREEMPTION_WATCHER_ENV not in os.environ
    monkeypatch.setenv(POLL_INTERVAL_ENV, "3")
    monkeypatch.setenv(PREEMPTION_WATCHER_ENV, "1")
    with ray_train_environment():
        assert os.environ[POLL_INTERVAL_ENV] == "3" and os.environ[PREEMPTION_WATCHER_ENV] == "1"
    assert os.environ[POLL_INTERVAL_ENV] == "3" and os.environ[PREEMPTION_WATCHER_ENV] == "1"
