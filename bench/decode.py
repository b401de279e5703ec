"""Decode + resize throughput on large product photos (about 1800x2400 JPEGs), with and without draft mode.

    .venv/bin/python bench/decode.py [--size 224] [--repeat 3]

Both paths produce the same square RGB image of --size pixels (stages.image_decode.decode_square); the baseline
decodes every pixel of the full-size JPEG before resizing, draft mode lets the JPEG decoder scale down by 1/2,
1/4 or 1/8 in the DCT domain first. One process, one core, measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.image_decode import decode_square  # noqa: E402

MYNTRA = ROOT.parent / "shared" / "data" / "myntra-large"


def load_photos() -> list[bytes]:
    photos = []
    for shard in sorted(MYNTRA.glob("*.tar")):
        with tarfile.open(shard) as archive:
            photos += [archive.extractfile(m).read() for m in archive if m.name.endswith(".jpg")]
    return photos


def measure(photos: list[bytes], size: int, draft: bool, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        for data in photos:
            decode_square(data, size, draft=draft)
        best = min(best, time.perf_counter() - started)
    return len(photos) / best


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, nargs="+", default=[224, 384])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if not MYNTRA.is_dir():
        sys.exit(f"{MYNTRA} not found: the benchmark uses the real product photos of ../shared/data")
    photos = load_photos()
    megabytes = sum(len(p) for p in photos) / 2**20
    print(f"{len(photos)} product photos, {megabytes:.0f} MiB of JPEG; best of {args.repeat} passes, one core")
    print(f"{'size':>6}{'full decode img/s':>20}{'draft mode img/s':>19}{'speed-up':>10}")
    for size in args.size:
        full = measure(photos, size, draft=False, repeat=args.repeat)
        draft = measure(photos, size, draft=True, repeat=args.repeat)
        print(f"{size:>6}{full:>20.1f}{draft:>19.1f}{draft / full:>9.1f}x")


if __name__ == "__main__":
    main()
