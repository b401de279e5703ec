"""Training recipes (``configs/train-*.yaml``): a ``train:`` section (the loop's settings) and a ``model:``
section (the task's settings), with ``--set train.KEY=VALUE`` and ``--set model.KEY=VALUE`` overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from models.training.task import TrainSettings, TrainTask
from pipeline.settings import ConfigError, build_params

# Model settings that name files or folders: made absolute, since Ray workers do not run in the driver's working
# directory.
LOCAL_PATH_SETTINGS = ("text_encoder", "vae", "init", "pretrained")


def load_train_config(task_class: type[TrainTask], config_path: str,
                      overrides: list[str]) -> tuple[Any, TrainSettings]:
    """The task's model settings and the loop's settings from a training recipe and its overrides."""
    path = Path(config_path)
    if not path.is_file():
        raise ConfigError(f"training config {path} does not exist: see configs/train-*.yaml")
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = set(raw) - {"task", "train", "model"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {sorted(unknown)}; known: task, train, model")
    if raw.get("task", task_class.name) != task_class.name:
        raise ConfigError(f"{path} is a '{raw['task']}' recipe, not '{task_class.name}'")
    sections = {"train": dict(raw.get("train") or {}), "model": dict(raw.get("model") or {})}
    for override in overrides:
        key, sep, value = override.partition("=")
        section, _, name = key.partition(".")
        if not sep or section not in sections or not name:
            raise ConfigError(f"--set {override!r}: expected train.KEY=VALUE or model.KEY=VALUE")
        sections["model" if section == "model" else "train"][name] = yaml.safe_load(value)
    for name in LOCAL_PATH_SETTINGS:
        value = sections["model"].get(name)
        if isinstance(value, str) and value and Path(value).exists():
            sections["model"][name] = str(Path(value).resolve())
    train = build_params(TrainSettings, sections["train"], f"{path}: train")
    model = build_params(task_class.Settings, sections["model"], f"{path}: model")
    if train.precision not in ("bf16", "fp16", "fp32"):
        raise ConfigError(f"{path}: train.precision must be bf16, fp16 or fp32")
    return model, train
