"""Peak machine memory of a model recipe: the same samples in two large shards versus twenty small ones.

    .venv/bin/python bench/memory.py [--samples 20000] [--decode-size 384] [--layouts 2x10000 20x1000]

Runs ``configs/demo.yaml`` (the Qwen-VL rules, decode, CLIP score, CapFilt) with tiny models built on the spot
and ``decode.size`` as given (``configs/qwen-vl.yaml`` ships 384), over real Flickr8k samples replicated into
each shard layout. Prints, per layout: machine memory in use above idle (psutil: total - available, so Ray's
shared-memory object store counts once), the largest Ray worker's peak RSS, samples/s, and the ratio of the
first layout's peak to the second's. Ray is started once (2 CPUs as on the test machine unless --cpus).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import GIB, MIB, MachineMonitor  # noqa: E402
from throughput import FLICKR, replicate  # noqa: E402

from models.tiny import TINY_CLIP, save_tiny_blip, save_tiny_clip  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.raystart import init_ray  # noqa: E402
from pipeline.run import run_curation  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--decode-size", type=int, default=384)
    parser.add_argument("--layouts", nargs="+", default=["2x10000", "20x1000"], help="SHARDSxSAMPLES")
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    if not FLICKR.is_dir():
        sys.exit(f"{FLICKR} not found: the benchmark replicates the real Flickr8k shards")
    work = Path(tempfile.mkdtemp(prefix="vlcurate-memory-"))
    try:
        clip, blip = save_tiny_clip(work / "clip"), save_tiny_blip(work / "blip")
        overrides = [f"decode.size={args.decode_size}", f"clip_score.model={TINY_CLIP}",
                     f"clip_score.pretrained={clip['checkpoint']}", f"clip_score.model_config={clip['model_config']}",
                     "clip_score.image_size=32", "capfilt.image_size=32", f"capfilt.captioner={blip['captioner']}",
                     f"capfilt.filter={blip['filter']}", "clip_score.resources.num_gpus=0", "capfilt.resources.num_gpus=0"]
        config = load_config(ROOT / "configs" / "demo.yaml", overrides)
        corpora = []
        for layout in args.layouts:
            shards, per_shard = (int(x) for x in layout.split("x"))
            corpora.append((layout, replicate(work / f"in-{layout}", shards * per_shard, per_shard)))
        init_ray(num_cpus=args.cpus)
        run_curation(config, [str(replicate(work / "in-warm", 200, 100))], str(work / "out-warm"), progress=False)
        print(f"demo.yaml with tiny models, decode.size={args.decode_size}, Ray on {args.cpus} CPUs")
        print(f"{'layout':<12}{'samples':>9}{'wall s':>9}{'samples/s':>11}{'mem above idle GiB':>20}"
              f"{'PSS above idle GiB':>20}{'largest worker MiB':>20}")
        peaks = []
        for layout, corpus in corpora:
            time.sleep(2)  # let the previous run's memory settle before measuring idle
            with MachineMonitor() as monitor:
                result = run_curation(config, [str(corpus)], str(work / f"out-{layout}"), progress=False)
            peaks.append(monitor.above_idle)
            rate = result.samples_processed / result.seconds
            print(f"{layout:<12}{result.samples_processed:>9}{result.seconds:>9.1f}{rate:>11.0f}"
                  f"{monitor.above_idle / GIB:>20.2f}{monitor.tree_above_idle / GIB:>20.2f}"
                  f"{monitor.largest_worker / MIB:>20.0f}"
                  + (f"   FAILED {len(result.failed)} shard(s)" if result.failed else ""))
            shutil.rmtree(work / f"out-{layout}", ignore_errors=True)
        if len(peaks) >= 2 and peaks[1]:
            print(f"peak ratio {args.layouts[0]} / {args.layouts[1]}: {peaks[0] / peaks[1]:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
