"""CPU throughput of the decode and model stages with tiny models (built on the spot, random weights).

    .venv/bin/python bench/model_stages.py [--samples 500] [--threads 1]

Runs each stage's annotate on real Flickr8k photos in one process (what one CPU actor of the pool does), after a
warm-up batch, and prints samples/s. Tiny models measure the stage machinery (decode, preprocessing,
tokenisation, generation loop, ITM pairs), not the cost of the real ViT-L/14 or BLIP-large weights.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.tiny import TINY_CLIP, save_tiny_blip, save_tiny_clip  # noqa: E402
from pipeline.config import parse_config  # noqa: E402
from pipeline.curate import annotate_batch  # noqa: E402
from pipeline.shards import read_shard  # noqa: E402

FLICKR = ROOT.parent / "shared" / "data" / "flickr8k"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one CPU actor = 1 CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tables = [read_shard(str(p)) for p in sorted(FLICKR.glob("*.tar"))]
    table = pa.concat_tables(tables).slice(0, args.samples)
    work = Path(tempfile.mkdtemp(prefix="vlcurate-bench-models-"))
    clip, blip = save_tiny_clip(work / "clip"), save_tiny_blip(work / "blip")
    stages = [
        {"stage": "decode", "size": 224},
        {"stage": "clip_score", "model": TINY_CLIP, "pretrained": clip["checkpoint"], "model_config": clip["model_config"],
         "resources": {"num_gpus": 0, "batch_size": 64}},
        {"stage": "capfilt", "captioner": blip["captioner"], "filter": blip["filter"], "resources": {"num_gpus": 0, "batch_size": 32},
         "num_captions": 3, "max_length": 20, "itm_threshold": 0.0},
    ]
    built = [spec.build() for spec in parse_config({"stages": stages}, []).stages]
    for stage in built:
        stage.load()
    print(f"{table.num_rows} Flickr8k samples, {args.threads} torch thread(s), tiny models")
    print(f"{'stage':<12}{'samples/s':>12}")
    warm = table.slice(0, 16)
    for position, stage in enumerate(built):
        warm, _ = annotate_batch(warm, stage, built[:position])  # warm-up (lazy imports, first allocations)
        started = time.perf_counter()
        table, _ = annotate_batch(table, stage, built[:position])
        print(f"{stage.name:<12}{table.num_rows / (time.perf_counter() - started):>12.1f}")


if __name__ == "__main__":
    main()
