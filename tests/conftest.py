import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
FLICKR = SHARED_DATA / "flickr8k"
MYNTRA = SHARED_DATA / "myntra-large"
LAION_CAPTIONS = SHARED_DATA / "laion400m-10k-captions.parquet"

sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (real data lives in ../shared/data)")
    return path


@pytest.fixture(scope="session")
def ray_cluster():
    from pipeline.raystart import init_ray, shutdown_ray

    init_ray(num_cpus=2)  # vlcurate's own start-up, as the CLI does it, on two CPUs
    yield
    shutdown_ray()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny random CLIP and BLIP models, built once per test session and saved the ways real ones load."""
    from models.tiny import TINY_CLIP, save_tiny_blip, save_tiny_clip

    folder = tmp_path_factory.mktemp("tiny-models")
    return {"clip": save_tiny_clip(folder / "clip"), "blip": save_tiny_blip(folder / "blip"), "clip_name": TINY_CLIP}


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A shard with the given (name, bytes) members, in that order."""
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def flickr_members(shard: Path, limit: int) -> list[tuple[str, bytes]]:
    """The first ``limit`` samples of a real shard, as (name, bytes) members."""
    members, keys = [], []
    with tarfile.open(shard) as archive:
        for member in archive:
            key = member.name.split(".", 1)[0]
            if key not in keys:
                if len(keys) == limit:
                    break
                keys.append(key)
            members.append((member.name, archive.extractfile(member).read()))
    return members


def photos_and_captions(shard: Path, limit: int | None = None) -> tuple[list[bytes], list[str]]:
    """The first ``limit`` (image bytes, caption) pairs of a shard whose samples are KEY.jpg + KEY.txt."""
    photos, captions = [], []
    with tarfile.open(shard) as archive:
        for member in archive:
            data = archive.extractfile(member).read()
            if member.name.endswith(".jpg"):
                photos.append(data)
            elif member.name.endswith(".txt"):
                captions.append(data.decode())
            if limit is not None and len(captions) == limit and len(photos) == limit:
                break
    return photos, captions


# ----------------------------------------------------------------------------------------------------------------
# Training: one CLIP run shared by the trainer tests (tests/test_trainers.py) and the quiet-output test
# (tests/test_quiet_run.py).

TRAIN_RECIPES = ROOT / "configs"


def train_recipe(task: str) -> Path:
    return TRAIN_RECIPES / f"train-{task}-tiny.yaml"


def train_settings(task: str) -> dict:
    """The ``train:`` section of a tiny training recipe."""
    import yaml

    return yaml.safe_load(train_recipe(task).read_text())["train"]


def training_metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def training_pairs(tmp_path_factory):
    """2000 clean synthetic pairs in 5 shards; the last shard is held out for evaluation by the recipes."""
    from pipeline.synth import SynthOptions, write_synth

    folder = tmp_path_factory.mktemp("synth")
    write_synth(folder, SynthOptions(samples=2000, seed=1, size=64, shard_size=400, chinese=0.0))
    return folder


@dataclasses.dataclass
class KilledAndResumed:
    folder: Path
    steps_before_kill: list[int]  # the steps the killed run logged
    resumed: subprocess.CompletedProcess  # the command that resumed it, with its output


@pytest.fixture(scope="session")
def clip_training(ray_cluster, training_pairs, tmp_path_factory):
    """The CLIP recipe run by ``vlcurate train`` (on this session's Ray), its process killed (SIGKILL) once Ray
    Train has registered the first checkpoint, then the same command again, which resumes from it."""
    import ray

    out = tmp_path_factory.mktemp("train-clip")
    command = [sys.executable, "-m", "pipeline.cli", "train", "clip", str(train_recipe("clip")),
               "--data", str(training_pairs), "--output", str(out)]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    driver = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    snapshot = out / "ray_train" / "clip" / "checkpoint_manager_snapshot.json"  # Ray Train's durable registry
    deadline = time.time() + 300
    while time.time() < deadline and driver.poll() is None:
        if snapshot.exists() and "checkpoint_" in snapshot.read_text():
            break
        time.sleep(0.1)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    before = [m["step"] for m in training_metrics(out) if "loss" in m] if (out / "metrics.jsonl").exists() else []
    # The cluster notices the dead driver and stops its training: the killed run's worker frees its CPU.
    total, deadline = ray.cluster_resources()["CPU"], time.time() + 120
    while ray.available_resources().get("CPU", 0) < total and time.time() < deadline:
        time.sleep(0.1)
    resumed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    return KilledAndResumed(out, before, resumed)
