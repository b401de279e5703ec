"""Training data: the curated shards, split into training and held-out shards, and their samples prepared by a
task's ``preprocess``. Shards are untrusted input: images are refused before decoding when too large, and a
sample that cannot be prepared is skipped rather than the block it is in."""

from __future__ import annotations

import dataclasses
import json
import os
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from models.imaging import open_bounded

if TYPE_CHECKING:
    from models.training.task import TrainTask

IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp")

# Members larger than this are skipped unread (the shard reader's default image limit).
MAX_MEMBER_BYTES = 32 * 2**20


def open_image(data: bytes) -> Image.Image:
    """A training image as RGB; refused before decoding when its header announces too many pixels."""
    with open_bounded(data) as image:
        return image.convert("RGB")


def raw_columns(batch: dict[str, np.ndarray]) -> tuple[list[bytes], list[str]]:
    """Image bytes and captions of a ``read_webdataset(decoder=None)`` batch (or a shard table's columns)."""
    images = None
    for name in IMAGE_COLUMNS:
        if name in batch:
            column = list(batch[name])
            images = column if images is None else [a if a is not None else b for a, b in zip(images, column)]
    captions = [c.decode("utf-8") if isinstance(c, (bytes, bytearray)) else str(c) for c in batch["txt"]]
    return images, captions


def split_shards(data: str, eval_shards: int) -> tuple[list[str], list[str]]:
    """The shards of ``data`` (paths, directories, globs, URLs) as training shards and the last ``eval_shards``
    held out for evaluation."""
    from pipeline.shards import expand_inputs

    # Absolute paths: Ray workers do not run in the driver's working directory.
    shards = [s.url if "://" in s.url else os.path.abspath(s.url) for s in expand_inputs([data])]
    if eval_shards and eval_shards >= len(shards):
        raise ValueError(f"eval_shards={eval_shards} leaves no training shard out of {len(shards)}")
    cut = len(shards) - eval_shards
    return shards[:cut], shards[cut:]


def read_samples(shards: list[str]) -> dict[str, list]:
    """Every sample of some (small, held-out) shards, in the layout ``preprocess`` reads. Shards are untrusted:
    plain (uncompressed) tar only, and members that are not regular files or are too large are skipped."""
    columns: dict[str, list] = {"jpg": [], "txt": []}
    for shard in shards:
        current: dict[str, bytes] = {}
        with tarfile.open(shard, mode="r:") as archive:
            for member in archive:
                if not member.isfile() or member.size > MAX_MEMBER_BYTES:
                    continue
                key, _, suffix = member.name.partition(".")
                if current and current.get("__key__") != key:
                    _add_sample(current, columns)
                    current = {}
                current["__key__"] = key
                current[suffix] = archive.extractfile(member).read()
        _add_sample(current, columns)
    return columns


def _add_sample(sample: dict, columns: dict[str, list]) -> None:
    image = next((sample[e] for e in IMAGE_COLUMNS if e in sample), None)
    if image is not None and "txt" in sample:
        columns["jpg"].append(image)
        columns["txt"].append(sample["txt"])


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A training task as plain values (its name, model and loop settings, output folder), rebuilt where it runs.

    The training dataset's plan carries this rather than the task object: Ray Train's dataset manager and Ray
    Data's split coordinator unpickle the plan in processes of their own, and a task object would make each of
    them import torch and the model library for nothing (seconds of CPU per training run). ``run`` tells one
    training run from another, so that a worker never reuses the task (and the tokenizer it loaded) of an
    earlier run."""

    name: str
    model: dict
    train: dict
    output: str
    run: str = ""

    def build(self) -> TrainTask:
        from models.training import task_class
        from models.training.task import TrainSettings

        cls = task_class(self.name)
        return cls(cls.Settings(**self.model), TrainSettings(**self.train), Path(self.output))


_built: dict[str, TrainTask] = {}  # per process: the task of the latest spec, with its loaded processor/tokenizer


def task_of(spec: TaskSpec) -> TrainTask:
    """The task ``spec`` describes, built once per process and run, and reused for every block it prepares."""
    key = json.dumps(dataclasses.asdict(spec), sort_keys=True, default=str)
    if key not in _built:
        _built.clear()
        _built[key] = spec.build()
    return _built[key]


def preprocess_block(batch: dict[str, np.ndarray], task: TrainTask | TaskSpec) -> dict[str, np.ndarray]:
    """Ray Data UDF: the task's CPU preprocessing (decode, augment, tokenise). A sample that cannot be prepared
    (an undecodable image in uncurated data) is skipped, never the whole block."""
    if isinstance(task, TaskSpec):
        task = task_of(task)
    try:
        return task.preprocess(batch)
    except Exception:  # noqa: BLE001 - find the bad samples below
        pass
    rows = len(batch["txt"])
    prepared = []
    for i in range(rows):
        try:
            prepared.append(task.preprocess({k: v[i:i + 1] for k, v in batch.items()}))
        except Exception:  # noqa: BLE001 - skipped sample
            continue
    if not prepared:
        raise ValueError(f"none of {rows} samples in a block could be prepared for training")
    return {k: np.concatenate([p[k] for p in prepared]) for k in prepared[0]}
