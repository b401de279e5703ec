"""The built-in trainers: CLIP, the BLIP captioner, the BLIP ITM filter and text-to-image diffusion, on Ray Train.

``TASK_CLASSES`` maps each task name to the module and class that implement it; a task's module is imported
only when that task is asked for, so loading one recipe imports one model family, and no task module has to
register itself. The shared parts live beside them: ``task`` (the task interface and the loop's settings),
``data`` (reading the curated shards), ``recipe`` (training recipes) and ``loop`` (the Ray Train loop and
``run_training``). Nothing here imports the curation stages or the curation driver.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from models.training.task import TrainTask

TASK_CLASSES: dict[str, tuple[str, str]] = {
    "clip": ("models.training.clip", "ClipTask"),
    "blip-captioner": ("models.training.blip_captioner", "BlipCaptionerTask"),
    "blip-itm": ("models.training.blip_itm", "BlipItmTask"),
    "diffusion": ("models.training.diffusion", "DiffusionTask"),
}


def task_class(name: str) -> type[TrainTask]:
    """The class of the task called ``name``, importing its module on first use."""
    if name not in TASK_CLASSES:
        raise KeyError(f"unknown training task {name!r}; known tasks: {sorted(TASK_CLASSES)}")
    module_name, class_name = TASK_CLASSES[name]
    return getattr(importlib.import_module(module_name), class_name)
