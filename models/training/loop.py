"""The training loop on Ray Train, shared by every task, and ``run_training``, which starts it.

Data: the curated output shards are read with Ray Data (``read_webdataset``, raw bytes), decoded and augmented
by the task's ``preprocess`` on CPU workers, and fed to ``TorchTrainer`` workers through
``get_dataset_shard("train").iter_torch_batches``. The same code runs on one CPU worker and on N GPUs
(``num_workers``, ``use_gpu``).

Loop: AdamW, cosine schedule with linear warm-up, gradient clipping and accumulation, bf16/fp16 autocast on GPU,
a gradient-checkpointing switch, seeded runs. Every ``checkpoint_every`` optimizer steps rank 0 attaches a
checkpoint (model, optimizer, scheduler, step, task extras such as EMA) to ``ray.train.report``; rerunning the
same command resumes from the latest one with the same step count, and ``FailureConfig`` restarts workers that
die. Metrics go to ``OUTPUT/metrics.jsonl`` every ``log_every`` steps (and TensorBoard when installed), written
by rank 0 itself: Ray Train only hears of checkpoints. The final model is exported to ``OUTPUT/export`` in the
format its scoring stage loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from models.devices import autocast_context
from models.training import task_class
from models.training.data import TaskSpec, preprocess_block, read_samples, split_shards
from models.training.recipe import load_train_config
from models.training.task import TrainTask

STATE_FILE = "state.pt"


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_state(path: Path, device: torch.device | str = "cpu") -> dict:
    """A checkpoint's training state (model, optimizer, scheduler, task extras, step). Tensors, containers and
    plain values only (``weights_only``): loading a checkpoint never runs code, whoever wrote the file."""
    return torch.load(path, map_location=device, weights_only=True)


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    task = TaskSpec(**config["task"]).build()
    train = task.train
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
            with (task.output / "metrics.jsonl").open("a") as handle:
                handle.write(json.dumps({"step": step, "event": "resumed"}) + "\n")

    metrics_path = task.output / "metrics.jsonl"
    writer = _tensorboard(task.output) if rank == 0 else None
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
        task.export(inner, task.output / "export")


def _report(metrics, task, inner, optimizer, scheduler, step, rank, train, metrics_path, writer) -> None:
    import ray.train

    checkpoint_due = step % train.checkpoint_every == 0 or step == train.max_steps
    if rank == 0:
        with metrics_path.open("a") as handle:
            handle.write(json.dumps(metrics) + "\n")
        if writer is not None:
            for name, value in metrics.items():
                writer.add_scalar(name, value, step)
    # Ray Train hears of checkpoints only: its controller takes one report per poll of the workers (every
    # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S) and a worker's next report waits until then, so reporting every logged
    # step would hold fast training back. The metrics lines above need no report.
    if not checkpoint_due:
        return
    if rank == 0:
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
    prepared = preprocess_block({k: np.array(v, dtype=object) for k, v in read_samples(shards).items()}, task)
    size = task.train.batch_size
    total = len(next(iter(prepared.values())))
    return [{k: torch.as_tensor(v[i:i + size]).to(device) for k, v in prepared.items()} for i in range(0, total, size)]


class MetricsFollower:
    """Prints the training progress on the driver, one line per step logged, from the metrics file rank 0
    appends to: the train workers' own output stays in Ray's log files (``pipeline.quiet``)."""

    def __init__(self, path: Path, task_name: str, max_steps: int, interval: float = 0.5):
        import threading

        self.path, self.task_name, self.max_steps, self.interval = path, task_name, max_steps, interval
        self._offset = path.stat().st_size if path.is_file() else 0  # a resumed run: only new lines
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="vlcurate-metrics", daemon=True)

    def __enter__(self) -> "MetricsFollower":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._print_new_lines()

    def _follow(self) -> None:
        while not self._stop.wait(self.interval):
            self._print_new_lines()

    def _print_new_lines(self) -> None:
        if not self.path.is_file():
            return
        with self.path.open("rb") as handle:
            handle.seek(self._offset)
            data = handle.read()
        complete = data[:data.rfind(b"\n") + 1]
        self._offset += len(complete)
        for line in complete.decode("utf-8", "replace").splitlines():
            try:
                metrics = json.loads(line)
            except ValueError:
                continue
            if metrics.get("final"):  # the command prints the final evaluation itself
                continue
            figures = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in metrics.items() if k != "step")
            print(f"[{self.task_name}] step {metrics.get('step', '?')}/{self.max_steps} {figures}", flush=True)


def _tensorboard(output: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(output / "tensorboard"))


# Ray Train settings read from the environment (the driver's reaches its controller and workers), set for the
# duration of a run unless the user set them: how often the controller polls the workers (Ray's default, 2 s, is
# also how late it notices that training has finished), and, on a one-node cluster, no preemption watcher (an
# actor started for every run, which watches for the nodes of the workers being drained: with one node, the
# whole cluster would go with it).
POLL_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
POLL_INTERVAL_S = 0.5
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


@contextlib.contextmanager
def ray_train_environment():
    """``POLL_INTERVAL_ENV`` and, on a one-node cluster, ``PREEMPTION_WATCHER_ENV`` for one run, where the
    environment does not set them already; the driver's environment is restored afterwards."""
    import ray

    settings = {POLL_INTERVAL_ENV: str(POLL_INTERVAL_S)}
    if len([node for node in ray.nodes() if node.get("Alive")]) == 1:
        settings[PREEMPTION_WATCHER_ENV] = "0"
    added = [name for name in settings if name not in os.environ]
    os.environ.update({name: settings[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def training_dataset(train_shards: list[str], spec: TaskSpec):
    """The training shards read with Ray Data and prepared by the task's ``preprocess``, lazily."""
    from pipeline.raystart import ray_data

    dataset = ray_data().read_webdataset(train_shards, decoder=None)
    # Tasks, not an actor pool: a pool would hold its CPUs for the whole run, and with the train workers holding
    # theirs the reads could starve on a small machine.
    return dataset.map_batches(preprocess_block, fn_kwargs={"task": spec}, batch_format="numpy", batch_size=256)


def run_training(task_name: str, config_path: str, data: str, output: str, overrides: list[str] | None = None,
                 address: str | None = None) -> dict:
    """Train ``task_name`` on the curated shards in ``data``; rerunning the same command resumes."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.raystart import init_ray

    task_cls = task_class(task_name)
    model_settings, train = load_train_config(task_cls, config_path, overrides or [])
    output_path = Path(output).resolve()
    output_path.mkdir(parents=True, exist_ok=True)
    train_shards, eval_shards = split_shards(data, train.eval_shards)
    spec = TaskSpec(task_name, dataclasses.asdict(model_settings), dataclasses.asdict(train), str(output_path),
                    run=uuid.uuid4().hex)
    spec.build().prepare(train_shards)
    init_ray(address)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"task": dataclasses.asdict(spec), "eval_shards": eval_shards},
        scaling_config=ray.train.ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu),
        # One worker reads the whole dataset itself: a split among workers would add a coordinating actor (a
        # process of its own, started for every run) that has nothing to split.
        dataset_config=ray.train.DataConfig(datasets_to_split="all" if train.num_workers > 1 else []),
        run_config=ray.train.RunConfig(
            name=task_name, storage_path=str(output_path / "ray_train"),
            failure_config=ray.train.FailureConfig(max_failures=train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=train.keep_checkpoints)),
        datasets={"train": training_dataset(train_shards, spec)},
    )
    with ray_train_environment(), MetricsFollower(output_path / "metrics.jsonl", task_name, train.max_steps):
        result = trainer.fit()
    lines = [json.loads(line) for line in (output_path / "metrics.jsonl").read_text().splitlines()]
    return {"metrics": result.metrics, "final": lines[-1], "export": str(output_path / "export")}
