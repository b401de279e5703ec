"""Curation quality at toy scale, against `vlcurate synth`'s ground truth.

    .venv/bin/python bench/quality.py [--demo out/demo] [--steps 150]

Uses a finished `vlcurate demo` folder (runs the full demo first when it is missing) and prints:
- for the rules and for the whole recipe (rules + CLIP score + CapFilt): per injected noise type, the share
  dropped, and the precision and recall of the drop decision;
- the share of kept captions that truly describe their image, after the rules and after CLIP score + CapFilt;
- DataComp's question: retrieval recall@1 on clean held-out pairs of a CLIP trained on uncurated data versus one
  trained on the curated data, the same number of samples and steps each.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.training.loop import run_training  # noqa: E402
from pipeline.demo import run_demo  # noqa: E402
from pipeline.quality import caption_truth, drop_quality, format_quality, joined  # noqa: E402
from pipeline.synth import SynthOptions, write_synth  # noqa: E402


def members_of(shards) -> list[list[tuple[str, bytes]]]:
    """Samples (lists of (name, bytes) members) of some shards, in order."""
    samples, current, key = [], [], None
    for shard in shards:
        with tarfile.open(shard) as archive:
            for member in archive:
                name_key = member.name.split(".", 1)[0]
                if name_key != key and current:
                    samples.append(current)
                    current = []
                key = name_key
                current.append((member.name, archive.extractfile(member).read()))
    if current:
        samples.append(current)
    return samples


def opens(sample) -> bool:
    from PIL import Image

    image = next((data for name, data in sample if name.endswith(".jpg")), None)
    try:
        with Image.open(io.BytesIO(image)) as decoded:
            decoded.load()
        return True
    except Exception:  # noqa: BLE001 - truncated or empty files
        return False


def write_samples(path: Path, samples) -> None:
    with tarfile.open(path, "w") as archive:
        for sample in samples:
            for name, data in sample:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))


def train_and_recall(name: str, samples, eval_shard: Path, work: Path, steps: int) -> float:
    data = work / name / "data"
    data.mkdir(parents=True, exist_ok=True)
    for index in range(0, len(samples), 250):
        write_samples(data / f"train-{index // 250:05d}.tar", samples[index:index + 250])
    (data / "zz-eval.tar").symlink_to(eval_shard)  # last in name order: the held-out shard
    run_training("clip", str(ROOT / "configs" / "train-clip-tiny.yaml"), str(data), str(work / name / "train"),
                 [f"train.max_steps={steps}", "train.eval_shards=1", "train.checkpoint_every=1000"])
    final = json.loads((work / name / "train" / "metrics.jsonl").read_text().splitlines()[-1])
    return final["image_to_text_recall@1"], final["text_to_image_recall@1"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--demo", default=str(ROOT / "out" / "demo"))
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    demo = Path(args.demo)
    if not (demo / "quality.json").exists():
        run_demo(str(demo))
    data = demo / "data"
    rules, final = joined(str(demo / "curated-rules"), str(data)), joined(str(demo / "curated"), str(data))
    print("== the rules alone")
    print(format_quality(drop_quality(rules), caption_truth(rules)))
    print("\n== the whole recipe: rules + CLIP score + CapFilt")
    print(format_quality(drop_quality(final), caption_truth(rules), caption_truth(final)))

    curated = members_of(sorted((demo / "curated" / "shards").glob("*.tar")))
    # The uncurated pool is every raw sample whose image file opens (any loader skips the others).
    raw = [sample for sample in members_of(sorted(data.glob("*.tar"))) if opens(sample)]
    random.Random(0).shuffle(raw)
    uncurated = raw[: len(curated)]
    work = demo / "bench-quality"
    write_synth(work / "eval", SynthOptions(samples=400, seed=12345, size=64, shard_size=400, chinese=0.0))
    eval_shard = (work / "eval" / "synth-00000.tar").resolve()
    print(f"\n== CLIP trained on {len(curated)} uncurated vs {len(curated)} curated pairs, {args.steps} steps each; "
          "recall@1 on 400 clean held-out pairs (chance 0.0025)")
    for name, samples in (("uncurated", uncurated), ("curated", curated)):
        i2t, t2i = train_and_recall(name, samples, eval_shard, work, args.steps)
        print(f"{name:<10} image->text {i2t:.3f}   text->image {t2i:.3f}")


if __name__ == "__main__":
    main()
