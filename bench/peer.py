"""vlcurate against Data-Juicer on the same corpus, back to back: wall time, start-up included.

    bash ../shared/bench/data-juicer.sh            # once: builds Data-Juicer's venv and the corpus under $B
    .venv/bin/python bench/peer.py [--bench /tmp/dj-bench] [--rounds 2] [--set language.lingua=false]

Each round runs Data-Juicer's equivalent op chain (recipe B of the peer script: HTML and link cleaning, length,
special characters, fastText language, image shape, aspect ratio) on ``$B/corpus/dj/flickr-rep`` and then
``vlcurate run configs/qwen-vl-rules.yaml`` on the same samples as WebDataset shards (``$B/corpus/flickr-rep``),
each as a fresh command (vlcurate starts its own Ray), and prints both wall times and their ratio. With
``--attached``, each round also runs vlcurate joining a Ray instance started beforehand with ``ray start --head``
(as on a cluster that outlives its jobs; that start-up is not counted): the command still starts its own
workers, which import the stages and load their models.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(command: list[str], cwd: Path, env: dict | None = None) -> float:
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        sys.exit(f"{command[0]} failed ({completed.returncode}):\n{completed.stderr[-2000:]}")
    return seconds


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bench", default=os.environ.get("B", "/tmp/dj-bench"), help="the peer script's folder")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="STAGE.KEY=VALUE",
                        help="settings for vlcurate's run, e.g. language.lingua=false (fastText alone, as the peer)")
    parser.add_argument("--attached", action="store_true",
                        help="also time vlcurate joining a Ray instance started beforehand (ray start --head)")
    args = parser.parse_args()
    bench = Path(args.bench)
    corpus = bench / "corpus" / "flickr-rep"
    if not (bench / "venv" / "bin" / "dj-process").exists() or not corpus.is_dir():
        sys.exit(f"{bench} has no Data-Juicer build: run `B={bench} REPS=100 bash ../shared/bench/data-juicer.sh`")
    samples = sum(1 for _ in corpus.glob("*.tar")) * 250
    # The peer script's own environment (offline caches under $B), then its measuring wrapper on recipe B.
    dj = ["bash", "-c", "source dj/env.sh && venv/bin/python dj_bench.py dj/recipe_B_bench.yaml --runs 1 "
          "--json results/peer_B.json --logdir results/peer_logs"]
    vlcurate = [str(ROOT / ".venv" / "bin" / "vlcurate"), "run", str(ROOT / "configs" / "qwen-vl-rules.yaml"),
                "--input", str(corpus), "--quiet", *(["--set", *args.overrides] if args.overrides else [])]
    print(f"{samples} samples ({corpus}), {os.cpu_count()} CPU cores")
    header = f"{'round':<8}{'Data-Juicer s':>15}{'vlcurate s':>12}{'ratio':>8}"
    print(header + (f"{'joining Ray s':>15}{'ratio':>8}" if args.attached else ""))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    ray_cli = str(ROOT / ".venv" / "bin" / "ray")
    if args.attached:
        env.setdefault("RAY_AUTH_MODE", "disabled")
        subprocess.run([ray_cli, "start", "--head", "--include-dashboard=false", f"--num-cpus={os.cpu_count()}"],
                       env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for round_number in range(1, args.rounds + 1):
            dj_seconds = timed(dj, bench)
            line = f"{round_number:<8}{dj_seconds:>15.1f}"
            # "local": start a new Ray instance even beside a running one; "auto": join the running one
            addresses = ["local", "auto"] if args.attached else ["local"]
            for address in addresses:
                out = Path(tempfile.mkdtemp(prefix="vlcurate-peer-"))
                try:
                    ours = timed(vlcurate + ["--output", str(out / "out")], ROOT, {**env, "RAY_ADDRESS": address})
                finally:
                    shutil.rmtree(out, ignore_errors=True)
                line += f"{ours:>{12 if address == 'local' else 15}.1f}{ours / dj_seconds:>8.2f}"
            print(line)
    finally:
        if args.attached:
            subprocess.run([ray_cli, "stop", "--force"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
