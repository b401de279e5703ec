"""Built-in trainers on Ray Train (CPU, tiny models, `vlcurate synth` data): losses fall, the models learn what
their evaluations measure, a killed run resumes, and every export loads in its scoring stage."""

from pathlib import Path

import numpy as np
import pytest

from conftest import photos_and_captions, train_recipe, train_settings, training_metrics as metrics
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
