"""What a run on an output in an object store pays outside curating: reading every completion record, clearing
what earlier attempts left of the shards it is about to curate, and reading every manifest when the selection is
made over the whole output (``select``, and at the end of a run with dedup or ``top_fraction``); and what it pays
per small shard committed.

    .venv/bin/python bench/object_store.py [--records 1000] [--pending 300] [--manifests 300] [--commits 40]
                                           [--per-shard 50] [--model-shards 0] [--latency-ms 0 15]

A run (and ``stats``, ``select``, the end-of-run statistics) reads the completion record of every shard in the
output to know which shards are done. Here the object store is moto's S3 server on 127.0.0.1, reached through a
small TCP relay in this process that holds the bytes for ``--latency-ms`` in each direction (so a
request's round trip takes twice that, as from a worker to a storage service in another zone). For each number
of records and each latency, measured back to back:

* listing the ``_state`` prefix alone;
* listing, then reading the records one after another (how records were read before, the baseline), and the
  time each of those reads took (moto's own time plus the relay's, which holds a request and its answer);
* ``OutputDir.done_records()``: listing, then ``READS_IN_FLIGHT`` reads at once;

and for ``--pending`` shards about to be curated into a fresh prefix (no record, no work in progress):

* a delete of the record and of the work in progress for each shard (how it was done before, the baseline);
* ``pipeline.run.forget_pending``: one listing of the shards with work in progress, then only what exists;

and for ``--commits`` small shards of real Flickr8k samples curated into a fresh prefix by the rule recipe, in this
process (``pipeline.steps.curate_shards``, as one Ray task runs it, after ``forget_pending`` as a run does): the
wall time per shard, where each commit's writes wait their round trips;

and for ``--model-shards`` such shards curated by ``configs/demo.yaml`` with its CLIP score on a tiny random model
on CPU and CapFilt off (so that the model costs little beside the round trips), on a local Ray started by this
script whose workers reach the relay: ``run_curation``'s wall time, where the driver joins each shard's parts into
its outputs;

and for ``--manifests`` manifests of 250 rows:

* reading them one after another (the baseline), and with ``pipeline.storage.read_ahead`` (the next
  ``SHARDS_READ_AHEAD`` read while one is worked on), as the selection does.

moto answers requests on this machine's own cores, so with no latency added both ways are bound by moto's CPU and
take about as long; the added latency is what a real object store has and moto lacks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUCKET = "vlcurate-bench"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(port: int, process: subprocess.Popen) -> None:
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if time.time() > deadline or process.poll() is not None:
                sys.exit(f"moto's server did not start on port {port} (pip install 'moto[server]')")
            time.sleep(0.1)


class LatencyRelay:
    """Forwards TCP connections from its own port to ``target_port``, holding the bytes ``delay`` seconds in each
    direction; the delay is read per chunk, so it can change between measurements."""

    def __init__(self, target_port: int):
        self.target_port, self.port, self.delay = target_port, free_port(), 0.0
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result()

    async def _start(self) -> None:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    async def _relay(self, client_reader, client_writer) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(self._pipe(client_reader, server_writer), self._pipe(server_reader, client_writer))

    async def _pipe(self, reader, writer) -> None:
        """Each chunk goes on ``delay`` after it arrived, in order: chunks in a row wait once, not once each."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        async def forward() -> None:
            try:
                while (item := await queue.get()) is not None:
                    due, data = item
                    if due > loop.time():
                        await asyncio.sleep(due - loop.time())
                    writer.write(data)
                    await writer.drain()
            except ConnectionError:
                pass
            finally:
                writer.close()

        sender = asyncio.create_task(forward())
        try:
            while data := await reader.read(65536):
                queue.put_nowait((loop.time() + self.delay, data))
        except ConnectionError:
            pass
        finally:
            queue.put_nowait(None)
            await sender


def print_table(header: tuple, rows: list[tuple]) -> None:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    print("| " + " | ".join(str(h).rjust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(c).rjust(w) for c, w in zip(row, widths)) + " |")


def manifest_like() -> bytes:
    """The Parquet bytes of a 250-row manifest with a caption, scores and a verdict (random, so it compresses like
    a real one)."""
    import random

    import pyarrow as pa

    from pipeline.outputs import manifest_bytes

    rng = random.Random(0)
    words = ["a", "dog", "runs", "on", "the", "beach", "red", "car", "street", "two", "people", "sitting", "bench"]
    rows = 250
    return manifest_bytes(pa.table({
        "key": [f"{rng.getrandbits(48):012x}" for _ in range(rows)],
        "position": pa.array(range(rows), pa.int32()),
        "caption": [" ".join(rng.choices(words, k=rng.randint(5, 15))) for _ in range(rows)],
        "clip_score": pa.array([rng.random() for _ in range(rows)], pa.float32()),
        "image_width": pa.array([rng.randint(200, 2000) for _ in range(rows)], pa.int32()),
        "kept": [rng.random() < 0.7 for _ in range(rows)],
        "drop_reason": [None if rng.random() < 0.7 else "clip_score:below_threshold" for _ in range(rows)],
    }))


def small_shards(folder: Path, count: int, per_shard: int) -> list[tuple[str, str]]:
    """``count`` shards of ``per_shard`` real Flickr8k samples each (keys made unique), as (path, stem)."""
    from throughput import replicate

    replicate(folder, count * per_shard, per_shard)
    return [(str(path), path.stem) for path in sorted(folder.glob("*.tar"))]


def curate_into(url: str, shards: list[tuple[str, str]]) -> float:
    """Seconds to curate ``shards`` into ``url`` with the rule recipe in this process, as one task does."""
    from pipeline.config import load_config
    from pipeline.outputs import OutputDir
    from pipeline.run import forget_pending
    from pipeline.shards import Shard
    from pipeline.steps import RunContext, curate_shards

    config = load_config(ROOT / "configs" / "qwen-vl-rules.yaml", [])
    out = OutputDir(url)
    out.create()
    ctx = RunContext(specs=config.enabled_stages, read=config.read, out_root=url, fingerprint="bench",
                     config_name=config.name)
    started = time.perf_counter()
    forget_pending(out, [Shard(path, stem) for path, stem in shards], out.done_records())
    summaries = list(curate_shards(ctx, shards))
    assert len(summaries) == len(shards) and not [s for s in summaries if s["error"]], summaries[:1]
    return time.perf_counter() - started


def tiny_model_settings(folder: Path) -> list[str]:
    """configs/demo.yaml's CLIP score on a tiny random model saved in ``folder``, on CPU; CapFilt off."""
    from models.tiny import TINY_CLIP, save_tiny_clip

    clip = save_tiny_clip(folder / "clip")
    return [f"clip_score.model={TINY_CLIP}", f"clip_score.pretrained={clip['checkpoint']}",
            f"clip_score.model_config={clip['model_config']}", "clip_score.image_size=32", "decode.size=32",
            "clip_score.resources.num_gpus=0", "image_size.min_side=32", "capfilt.enabled=false"]


def model_run_into(url: str, inputs: str, settings: list[str]) -> float:
    """Seconds of ``run_curation`` with configs/demo.yaml and ``settings`` into ``url`` (Ray running)."""
    from pipeline.config import load_config
    from pipeline.run import run_curation

    config = load_config(ROOT / "configs" / "demo.yaml", settings)
    started = time.perf_counter()
    result = run_curation(config, [inputs], url, progress=False)
    assert not result.failed and result.processed, result
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, nargs="+", default=[1000])
    parser.add_argument("--pending", type=int, default=300)
    parser.add_argument("--manifests", type=int, default=300)
    parser.add_argument("--commits", type=int, default=40, help="small shards curated into the object store")
    parser.add_argument("--per-shard", type=int, default=50, help="samples in each of those shards")
    parser.add_argument("--model-shards", type=int, default=0,
                        help="shards (of --per-shard samples) curated with tiny models into the object store")
    parser.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 15.0])
    args = parser.parse_args()
    moto_port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(moto_port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(moto_port, server)
        relay = LatencyRelay(moto_port)
        os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{relay.port}", "AWS_ACCESS_KEY_ID": "bench",
                           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
        import s3fs

        from pipeline.outputs import OutputDir
        from pipeline.run import forget_pending
        from pipeline.shards import Shard
        from pipeline.storage import READS_IN_FLIGHT, SHARDS_READ_AHEAD, read_ahead

        fs = s3fs.S3FileSystem(use_listings_cache=False, skip_instance_cache=True)
        fs.mkdir(BUCKET)
        rows = []
        for count in args.records:
            prefix = f"{BUCKET}/out-{count}"
            record = {"stem": "", "total": 250, "kept": 200, "fingerprint": "0" * 16}
            fs.pipe({f"{prefix}/_state/shard-{i:07d}.done.json": json.dumps({**record, "stem": f"shard-{i:07d}"})
                     .encode() for i in range(count)})
            out = OutputDir(f"s3://{prefix}")
            for latency in args.latency_ms:
                relay.delay = latency / 1000
                started = time.perf_counter()
                names = out.store.list_names("_state", ".done.json")
                listed = time.perf_counter()
                one_by_one = [json.loads(out.store.read_bytes(f"_state/{name}")) for name in names]
                read_one_by_one = time.perf_counter()
                records = out.done_records()
                read_at_once = time.perf_counter()
                assert len(one_by_one) == len(records) == count, "records went missing"
                baseline, new = read_one_by_one - started, read_at_once - read_one_by_one
                per_read = 1000 * (read_one_by_one - listed) / count
                rows.append((count, f"{latency:g}", f"{listed - started:.2f}", f"{baseline:.2f}", f"{per_read:.0f}",
                             f"{new:.2f}", f"{baseline / new:.1f}x"))
        print(f"Completion records read from moto's S3 server through a latency relay ({READS_IN_FLIGHT} reads in "
              "flight for done_records()):")
        print_table(("records", "latency ms (each way)", "listing s", "listing + one read after another s",
                     "ms per read", "done_records() s", "speed-up"), rows)
        out = OutputDir(f"s3://{BUCKET}/fresh")
        pending = [Shard(f"/in/shard-{i:07d}.tar", f"shard-{i:07d}") for i in range(args.pending)]
        print(f"\nBefore curating {args.pending} shards into a fresh prefix:")
        print("| latency ms (each way) | two deletes per shard s | forget_pending s |")
        print("|-----------------------|-------------------------|------------------|")
        for latency in args.latency_ms:
            relay.delay = latency / 1000
            started = time.perf_counter()
            for shard in pending:
                out.delete(out.done_name(shard.stem))
                out.clear_parts(shard.stem)
            one_by_one = time.perf_counter()
            forget_pending(out, pending, out.done_records())
            print(f"| {latency:>21g} | {one_by_one - started:>23.2f} | {time.perf_counter() - one_by_one:>16.2f} |")
        if args.commits:
            import tempfile

            with tempfile.TemporaryDirectory() as work:
                shards = small_shards(Path(work) / "in", args.commits, args.per_shard)
                curate_into(str(Path(work) / "warm-up"), shards[:2])  # the stages' models load once
                print(f"\nCurating {args.commits} shards of {args.per_shard} Flickr8k samples into a fresh prefix "
                      "(rule recipe, one task's work in this process):")
                rows = []
                for number, latency in enumerate(args.latency_ms):
                    relay.delay = latency / 1000
                    seconds = curate_into(f"s3://{BUCKET}/curated-{number}", shards)
                    rows.append((f"{latency:g}", f"{seconds:.2f}", f"{1000 * seconds / len(shards):.1f}",
                                 f"{len(shards) * args.per_shard / seconds:.0f}"))
                print_table(("latency ms (each way)", "seconds", "ms per shard", "samples/s"), rows)
        if args.model_shards:
            import tempfile

            from pipeline.raystart import init_ray

            init_ray(num_cpus=os.cpu_count())  # its workers inherit the S3 settings above
            with tempfile.TemporaryDirectory() as work:
                folder = Path(work) / "in"
                small_shards(folder, args.model_shards, args.per_shard)
                relay.delay = 0
                settings = tiny_model_settings(Path(work) / "models")
                model_run_into(str(Path(work) / "warm-up"), str(folder), settings)
                print(f"\nCurating {args.model_shards} shards of {args.per_shard} Flickr8k samples into a fresh prefix "
                      "with configs/demo.yaml's tiny CLIP score on CPU (run_curation on a local Ray):")
                rows = []
                for number, latency in enumerate(args.latency_ms):
                    relay.delay = latency / 1000
                    seconds = model_run_into(f"s3://{BUCKET}/model-{number}", str(folder), settings)
                    rows.append((f"{latency:g}", f"{seconds:.2f}", f"{1000 * seconds / args.model_shards:.1f}"))
                print_table(("latency ms (each way)", "seconds", "ms per shard"), rows)
        out = OutputDir(f"s3://{BUCKET}/manifests")
        stems = [f"shard-{i:07d}" for i in range(args.manifests)]
        manifest = manifest_like()
        fs.pipe({f"{BUCKET}/manifests/{out.manifest_name(stem)}": manifest for stem in stems})
        print(f"\nReading {args.manifests} manifests of {len(manifest) / 1024:.0f} KiB "
              f"({SHARDS_READ_AHEAD} read ahead):")
        print("| latency ms (each way) | one after another s | read_ahead s | speed-up |")
        print("|-----------------------|---------------------|--------------|----------|")
        for latency in args.latency_ms:
            relay.delay = latency / 1000
            started = time.perf_counter()
            rows = sum(out.read_manifest(stem).num_rows for stem in stems)
            one_by_one = time.perf_counter()
            assert rows == sum(table.num_rows for table in read_ahead(stems, out.read_manifest))
            ahead = time.perf_counter() - one_by_one
            print(f"| {latency:>21g} | {one_by_one - started:>19.2f} | {ahead:>12.2f} | "
                  f"{(one_by_one - started) / ahead:>7.1f}x |")
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
