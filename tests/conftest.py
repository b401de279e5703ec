import io
import os
import sys
import tarfile
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
    import ray

    from pipeline.raystart import init_ray

    init_ray(num_cpus=2)  # vlcurate's own start-up, as the CLI does it, on two CPUs
    yield
    ray.shutdown()


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
