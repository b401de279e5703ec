"""What every training task provides, and the settings of the training loop itself (the ``train:`` section)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch


@dataclasses.dataclass
class TrainSettings:
    num_workers: int = 1  # Ray Train workers (one per GPU when use_gpu)
    use_gpu: bool = False
    batch_size: int = 32  # per worker and micro-step
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup_steps: int = 10
    max_steps: int = 200  # optimizer steps
    grad_clip: float = 1.0
    grad_accum: int = 1
    precision: str = "bf16"  # autocast dtype on GPU; float32 on CPU
    grad_checkpointing: bool = False
    seed: int = 0
    checkpoint_every: int = 50
    log_every: int = 10
    keep_checkpoints: int = 2
    max_failures: int = 2  # worker losses tolerated (FailureConfig)
    eval_shards: int = 0  # input shards held out for evaluation (the last ones, in name order)
    shuffle_buffer: int = 512


class TrainTask:
    """What differs between models: settings, preprocessing, the loss module, evaluation and export."""

    name: ClassVar[str]
    Settings: ClassVar[type]

    def __init__(self, settings: Any, train: TrainSettings, output: Path):
        self.settings, self.train, self.output = settings, train, output

    def prepare(self, train_shards: list[str]) -> None:
        """Driver-side, once, before training (e.g. building a tokenizer from the training captions)."""

    def preprocess(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """CPU: raw shard columns (``image`` bytes, ``caption`` str) to the arrays the model reads."""
        raise NotImplementedError

    def build(self) -> torch.nn.Module:
        """A module whose ``forward(batch)`` returns ``(loss, {metric: value})``."""
        raise NotImplementedError

    def parameters(self, module: torch.nn.Module):
        return [p for p in module.parameters() if p.requires_grad]

    def enable_grad_checkpointing(self, module: torch.nn.Module) -> None:
        raise NotImplementedError(f"{self.name} has no gradient checkpointing switch")

    def after_step(self, module: torch.nn.Module) -> None:
        """Called after every optimizer step (EMA updates)."""

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def evaluate(self, module: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        return {}

    def export(self, module: torch.nn.Module, directory: Path) -> None:
        raise NotImplementedError
