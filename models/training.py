"""One trainer framework for the built-in models (CLIP, BLIP captioner, BLIP ITM filter, diffusion) on Ray Train.

Data: the curated output shards are read with Ray Data (``read_webdataset``, raw bytes), decoded and augmented
by the task's ``preprocess`` on CPU workers, and fed to ``TorchTrainer`` workers through
``get_dataset_shard("train").iter_torch_batches``. The same code runs on one CPU worker and on N GPUs
(``num_workers``, ``use_gpu``).

Loop: AdamW, cosine schedule with linear warm-up, gradient clipping and accumulation, bf16/fp16 autocast on GPU,
a gradient-checkpointing switch, seeded runs. Every ``checkpoint_every`` optimizer steps rank 0 attaches a
checkpoint (model, optimizer, scheduler, step, task extras such as EMA) to ``ray.train.report``; rerunning the
same command resumes from the latest one with the same step count, and ``FailureConfig`` restarts workers that
die. Metrics go to ``OUTPUT/metrics.jsonl`` (and TensorBoard when installed); the final model is exported to
``OUTPUT/export`` in the format its scoring stage loads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from models.devices import autocast_context


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


# ---- data -------------------------------------------------------------------------------------------------------

IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp")


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
    from pipeline.shards import expand_inputs

    # Absolute paths: Ray workers do not run in the driver's working directory.
    shards = [s.url if "://" in s.url else os.path.abspath(s.url) for s in expand_inputs([data])]
    if eval_shards and eval_shards >= len(shards):
        raise ValueError(f"eval_shards={eval_shards} leaves no training shard out of {len(shards)}")
    cut = len(shards) - eval_shards
    return shards[:cut], shards[cut:]


# Members larger than this are skipped unread (the shard reader's default image limit).
MAX_MEMBER_BYTES = 32 * 2**20


def read_samples(shards: list[str]) -> dict[str, list]:
    """Every sample of some (small, held-out) shards, in the layout ``preprocess`` reads. Shards are untrusted:
    plain (uncompressed) tar only, and members that are not regular files or are too large are skipped."""
    import tarfile

    columns: dict[str, list] = {"jpg": [], "txt": []}
    for shard in shards:
        current: dict[str, bytes] = {}
        with tarfile.open(shard, mode="r:") as archive:
            for member in archive:
                if not member.isfile() or member.size > MAX_MEMBER_BYTES:
                    continue
                key, _, suffix = member.name.partition(".")
                if current and current.get("__key__") != key:
                    _flush(current, columns)
                    current = {}
                current["__key__"] = key
                current[suffix] = archive.extractfile(member).read()
        _flush(current, columns)
    return columns


def _flush(sample: dict, columns: dict[str, list]) -> None:
    image = next((sample[e] for e in IMAGE_COLUMNS if e in sample), None)
    if image is not None and "txt" in sample:
        columns["jpg"].append(image)
        columns["txt"].append(sample["txt"])


# ---- the loop ----------------------------------------------------------------------------------------------------


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


STATE_FILE = "state.pt"


def load_state(path: Path, device: torch.device | str = "cpu") -> dict:
    """A checkpoint's training state (model, optimizer, scheduler, task extras, step). Tensors, containers and
    plain values only (``weights_only``): loading a checkpoint never runs code, whoever wrote the file."""
    return torch.load(path, map_location=device, weights_only=True)


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from models import trainers  # noqa: F401 - registers the tasks in this worker process

    task_class = TASKS[config["task"]]
    train = TrainSettings(**config["train"])
    task = task_class(task_class.Settings(**config["model"]), train, Path(config["output"]))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    seed_everything(train.seed + rank)
    device = ray.train.torch.get_device()
    module = task.build()
    if train.grad_checkpointing:
        task.enable_grad_checkpointing(module)
    module = ray.train.torch.prepare_model(module)
    inner = module.module if hasattr(module, "module") else module
    optimizer = torch.optim.AdamW(task.parameters(inner), lr=train.lr, weight_decay=train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, train.warmup_steps, train.max_steps))
    use_scaler = device.type == "cuda" and train.precision == "fp16"
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = load_state(Path(directory) / STATE_FILE, device)
        inner.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        task.load_extra_state(state["extra"])
        step = state["step"]
        if rank == 0:
            print(f"[{task.name}] resumed from checkpoint at step {step}", flush=True)
            with (Path(config["output"]) / "metrics.jsonl").open("a") as handle:
                handle.write(json.dumps({"step": step, "event": "resumed"}) + "\n")

    metrics_path = Path(config["output"]) / "metrics.jsonl"
    writer = _tensorboard(Path(config["output"])) if rank == 0 else None
    dataset = ray.train.get_dataset_shard("train")
    micro, window_steps, window_samples, window_start = 0, 0, 0, time.perf_counter()
    running: dict[str, float] = {}
    while step < train.max_steps:
        batches_this_epoch = 0
        for batch in dataset.iter_torch_batches(batch_size=train.batch_size, device=device, drop_last=True,
                                                local_shuffle_buffer_size=train.shuffle_buffer or None,
                                                local_shuffle_seed=train.seed + step + rank):
            batches_this_epoch += 1
            module.train()
            with autocast_context(device.type, train.precision):
                loss, parts = module(batch)
            scaler.scale(loss / train.grad_accum).backward()
            micro += 1
            window_samples += len(next(iter(batch.values()))) * world
            for name, value in {"loss": float(loss), **parts}.items():
                running[name] = running.get(name, 0.0) + float(value) / train.grad_accum
            if micro % train.grad_accum:
                continue
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(task.parameters(inner), train.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            task.after_step(inner)
            step += 1
            window_steps += 1
            if step % train.log_every == 0 or step % train.checkpoint_every == 0 or step == train.max_steps:
                elapsed = time.perf_counter() - window_start
                metrics = {"step": step, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                           "samples_per_s": window_samples / elapsed if elapsed else 0.0,
                           **{name: total / window_steps for name, total in running.items()}}
                running, window_steps, window_samples, window_start = {}, 0, 0, time.perf_counter()
                _report(metrics, task, inner, optimizer, scheduler, step, rank, train, metrics_path, writer)
            if step >= train.max_steps:
                break
        if batches_this_epoch == 0:
            raise ValueError(
                f"no training batch: worker {rank} has fewer than batch_size={train.batch_size} samples per epoch; "
                "give more data, or lower train.batch_size (or train.eval_shards)")
    if rank == 0:
        final = {"step": step, "final": True, **task.evaluate(inner, _eval_batches(task, config, device))}
        with metrics_path.open("a") as handle:
            handle.write(json.dumps(final) + "\n")
        print(f"[{task.name}] " + json.dumps(final), flush=True)
        task.export(inner, Path(config["output"]) / "export")


def _report(metrics, task, inner, optimizer, scheduler, step, rank, train, metrics_path, writer) -> None:
    import ray.train

    checkpoint_due = step % train.checkpoint_every == 0 or step == train.max_steps
    if rank == 0:
        with metrics_path.open("a") as handle:
            handle.write(json.dumps(metrics) + "\n")
        print(f"[{task.name}] step {step}/{train.max_steps} " + " ".join(
            f"{k}={v:.4g}" for k, v in metrics.items() if k != "step"), flush=True)
        if writer is not None:
            for name, value in metrics.items():
                writer.add_scalar(name, value, step)
    if checkpoint_due and rank == 0:
        with tempfile.TemporaryDirectory() as directory:
            torch.save({"model": inner.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "extra": task.extra_state(), "step": step},
                       Path(directory) / STATE_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
    else:
        ray.train.report(metrics)  # a barrier: every worker reports equally often


def _eval_batches(task: TrainTask, config: dict, device) -> list[dict[str, torch.Tensor]]:
    shards = config.get("eval_shards") or []
    if not shards:
        return []
    # Per-sample: an undecodable or too large held-out image is skipped, not the evaluation.
    prepared = _preprocess({k: np.array(v, dtype=object) for k, v in read_samples(shards).items()}, task)
    size = task.train.batch_size
    total = len(next(iter(prepared.values())))
    return [{k: torch.as_tensor(v[i:i + size]).to(device) for k, v in prepared.items()} for i in range(0, total, size)]


def _tensorboard(output: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(output / "tensorboard"))


# ---- driver -----------------------------------------------------------------------------------------------------

TASKS: dict[str, type[TrainTask]] = {}


def register(task_class: type[TrainTask]) -> type[TrainTask]:
    TASKS[task_class.name] = task_class
    return task_class


def run_training(task_name: str, config_path: str, data: str, output: str, overrides: list[str] | None = None,
                 address: str | None = None) -> dict:
    """Train ``task_name`` on the curated shards in ``data``; rerunning the same command resumes."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from models import trainers  # noqa: F401 - registers the tasks
    from pipeline.run import init_ray

    task_class = TASKS[task_name]
    model_settings, train = load_train_config(task_class, config_path, overrides or [])
    output_path = Path(output).resolve()
    output_path.mkdir(parents=True, exist_ok=True)
    train_shards, eval_shards = split_shards(data, train.eval_shards)
    task = task_class(model_settings, train, output_path)
    task.prepare(train_shards)
    init_ray(address)
    dataset = ray.data.read_webdataset(train_shards, decoder=None)
    # Tasks, not an actor pool: a pool would hold its CPUs for the whole run, and with the train workers holding
    # theirs the reads could starve on a small machine.
    dataset = dataset.map_batches(_preprocess, fn_kwargs={"task": task}, batch_format="numpy", batch_size=256)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"task": task_name, "train": dataclasses.asdict(train),
                           "model": dataclasses.asdict(model_settings), "output": str(output_path),
                           "eval_shards": eval_shards},
        scaling_config=ray.train.ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu),
        run_config=ray.train.RunConfig(
            name=task_name, storage_path=str(output_path / "ray_train"),
            failure_config=ray.train.FailureConfig(max_failures=train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=train.keep_checkpoints)),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    lines = [json.loads(line) for line in (output_path / "metrics.jsonl").read_text().splitlines()]
    return {"metrics": result.metrics, "final": lines[-1], "export": str(output_path / "export")}


def _preprocess(batch: dict[str, np.ndarray], task: TrainTask) -> dict[str, np.ndarray]:
    """Ray Data UDF: the task's CPU preprocessing (decode, augment, tokenise). A sample that cannot be prepared
    (an undecodable image in uncurated data) is skipped, never the whole block."""
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


LOCAL_PATH_SETTINGS = ("text_encoder", "vae", "init", "pretrained")


def load_train_config(task_class: type[TrainTask], config_path: str, overrides: list[str]):
    """A training recipe: ``train:`` (TrainSettings) and ``model:`` (the task's settings); --set train.KEY=V."""
    import yaml

    from pipeline.config import ConfigError, build_params

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
    for name in LOCAL_PATH_SETTINGS:  # Ray workers do not run in the driver's working directory
        value = sections["model"].get(name)
        if isinstance(value, str) and value and Path(value).exists():
            sections["model"][name] = str(Path(value).resolve())
    train = build_params(TrainSettings, sections["train"], f"{path}: train")
    model = build_params(task_class.Settings, sections["model"], f"{path}: model")
    if train.precision not in ("bf16", "fp16", "fp32"):
        raise ConfigError(f"{path}: train.precision must be bf16, fp16 or fp32")
    return model, train

