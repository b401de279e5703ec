"""The ``vlcurate`` command line: run, stats, explain, select, status."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import polars as pl

from models.langid import ModelFileError
from pipeline.config import ConfigError, load_config
from pipeline.lease import LeaseError
from pipeline.quiet import VERBOSE_ENV, RayLinesFiltered
from pipeline.raystart import RayUnreachable
from pipeline.run import UsageError
from pipeline.shards import InputError
from pipeline.synth import DUPLICATE_TYPES, NOISE_TYPES

EXIT_USAGE = 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"
    try:
        with RayLinesFiltered():
            return args.handler(args)
    except (ConfigError, InputError, LeaseError, ModelFileError, RayUnreachable, UsageError) as exc:
        print(f"vlcurate: error: {printable(str(exc))}", file=sys.stderr)  # paths may come from listings
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("vlcurate: interrupted; rerun the same command to finish the remaining shards", file=sys.stderr)
        return 130


def entry() -> None:
    """The ``vlcurate`` command: ``main``, then Ray shut down (its lines filtered like the command's) and a quick
    exit. By then the outputs are committed, the lease released and every stream flushed; the interpreter's own
    teardown after Ray's takes about a second and does nothing a finished command needs."""
    code = main()
    if "ray" in sys.modules:
        from pipeline.raystart import shutdown_ray

        with RayLinesFiltered():
            shutdown_ray()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlcurate", description="Curate image-text WebDataset shards on Ray.")
    parser.add_argument("--verbose", "-v", action="store_true",
                        help=f"also show Ray's own log lines and workers' output (or set {VERBOSE_ENV}=1)")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="curate shards with a recipe")
    run.add_argument("config", help="YAML recipe, e.g. configs/qwen-vl.yaml")
    run.add_argument("--input", "-i", nargs="+", required=True,
                     help="shards: paths, directories, globs, brace ranges ('data/{00000..00009}.tar'), fsspec URLs")
    run.add_argument("--output", "-o", required=True, help="output directory")
    run.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="STAGE.KEY=VALUE",
                     help="override recipe settings, e.g. --set length.min_words=3 emoji.enabled=false (repeatable)")
    run.add_argument("--address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, else local)")
    run.add_argument("--force", action="store_true", help="recompute every shard, even completed ones")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.set_defaults(handler=cmd_run)

    stats = commands.add_parser("stats", help="print the funnel of an output directory (from its manifests)")
    stats.add_argument("output")
    stats.add_argument("--json", action="store_true", help="print machine-readable JSON")
    stats.set_defaults(handler=cmd_stats)

    explain = commands.add_parser("explain", help="show one sample's captions and every stage's verdict")
    explain.add_argument("output")
    explain.add_argument("key")
    explain.set_defaults(handler=cmd_explain)

    select = commands.add_parser("select", help="re-apply new thresholds from the manifests, without recomputing")
    select.add_argument("output")
    select.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="STAGE.KEY=VALUE",
                        required=True)
    select.add_argument("--address", default=None,
                        help="judge and rewrite the shards in tasks on this Ray cluster ('auto': the running one; "
                             "default: in this process)")
    select.set_defaults(handler=cmd_select)

    status = commands.add_parser("status", help="list completed, failed and pending shards")
    status.add_argument("output")
    status.add_argument("--input", "-i", nargs="+",
                        help="judge pending shards against these inputs (default: every input given to 'run')")
    status.set_defaults(handler=cmd_status)
    synth = commands.add_parser("synth", help="write learnable synthetic shards with ground truth and noise")
    synth.add_argument("--output", "-o", required=True)
    synth.add_argument("--samples", type=int, default=1000)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--size", type=int, default=224, help="image side in pixels")
    synth.add_argument("--shard-size", type=int, default=1000)
    synth.add_argument("--chinese", type=float, default=0.15, help="share of clean captions in Chinese")
    synth.add_argument("--noise-rate", type=float, default=0.0,
                       help="share of noisy samples, spread evenly over every noise type")
    synth.add_argument("--noise", action="append", default=[], metavar="TYPE=P",
                       help="probability of one noise type (repeatable); types: " + ", ".join(NOISE_TYPES)
                       + "; duplicates (drawn apart, never by --noise-rate): " + ", ".join(DUPLICATE_TYPES))
    synth.set_defaults(handler=cmd_synth)

    demo = commands.add_parser("demo", help="the whole bootstrapping loop, offline, on synthetic data")
    demo.add_argument("--output", "-o", default="out/demo")
    demo.add_argument("--quick", action="store_true", help="a much shorter run (CI)")
    demo.add_argument("--address", default=None)
    demo.set_defaults(handler=cmd_demo)

    report = commands.add_parser("report", help="write a self-contained HTML report of an output directory")
    report.add_argument("output")
    report.add_argument("--training", nargs="*", default=[], help="training folders: loss curves and final metrics")
    report.add_argument("--samples", default=None, help="a folder of diffusion samples (vlcurate sample --output)")
    report.set_defaults(handler=cmd_report)

    train = commands.add_parser("train", help="train CLIP, the BLIP captioner or ITM filter, or diffusion on Ray Train")
    train.add_argument("task", choices=["clip", "blip-captioner", "blip-itm", "diffusion"])
    train.add_argument("config", help="training recipe, e.g. configs/train-clip-tiny.yaml")
    train.add_argument("--data", required=True, help="curated shards (an output's shards/ folder, globs, ...)")
    train.add_argument("--output", "-o", required=True, help="training folder; rerunning resumes from it")
    train.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="train.KEY=VALUE")
    train.add_argument("--address", default=None)
    train.set_defaults(handler=cmd_train)

    sample = commands.add_parser("sample", help="generate images with a trained diffusion model")
    sample.add_argument("model", help="a diffusion export folder (TRAINING_OUTPUT/export)")
    sample.add_argument("--prompt", action="append", required=True, help="repeatable")
    sample.add_argument("--output", "-o", required=True, help="folder for the PNG files")
    sample.add_argument("--steps", type=int, default=50)
    sample.add_argument("--guidance", type=float, default=3.0)
    sample.add_argument("--seed", type=int, default=0)
    sample.set_defaults(handler=cmd_sample)
    return parser


def cmd_demo(args) -> int:
    from pipeline.demo import run_demo

    run_demo(args.output, quick=args.quick, address=args.address)
    return 0


def cmd_report(args) -> int:
    from pipeline.report import write_report

    path = write_report(args.output, args.training, args.samples)
    print(f"report: {path}")
    return 0


def cmd_train(args) -> int:
    from models.training.loop import run_training

    result = run_training(args.task, args.config, args.data, args.output, args.overrides, args.address)
    final = {k: v for k, v in result["final"].items() if k != "final"}
    print(f"{args.task}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in final.items()))
    print(f"exported to {result['export']}; metrics in {args.output}/metrics.jsonl")
    return 0


def cmd_sample(args) -> int:
    from pathlib import Path

    from models.diffusion import sample_images

    if not (Path(args.model) / "vlcurate_diffusion.json").is_file():
        raise ConfigError(f"{args.model} is not a diffusion export (no vlcurate_diffusion.json): pass "
                          "TRAINING_OUTPUT/export")
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(sample_images(args.model, args.prompt, args.steps, args.guidance, args.seed)):
        path = output / f"sample-{index:03d}.png"
        image.save(path)
        print(f"{path}: {args.prompt[index]}")
    return 0


def cmd_synth(args) -> int:
    from pipeline.synth import SynthOptions, default_noise, write_synth

    noise = default_noise(args.noise_rate) if args.noise_rate else {}
    for item in args.noise:
        name, sep, value = item.partition("=")
        try:
            noise[name] = float(value) if sep else float("nan")
        except ValueError:
            raise ConfigError(f"--noise {item!r}: expected TYPE=PROBABILITY, e.g. --noise mismatched=0.1") from None
        if noise[name] != noise[name] or not 0 <= noise[name] <= 1:
            raise ConfigError(f"--noise {item!r}: the probability must be between 0 and 1")
    try:
        options = SynthOptions(samples=args.samples, seed=args.seed, size=args.size, shard_size=args.shard_size,
                               chinese=args.chinese, noise=noise)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    paths = write_synth(args.output, options)
    print(f"wrote {args.samples} samples in {len(paths)} shard(s) to {args.output}")
    return 0


def cmd_run(args) -> int:
    from pipeline.run import run_curation

    config = load_config(args.config, args.overrides)
    result = run_curation(config, args.input, args.output, address=args.address, force=args.force,
                          progress=not args.quiet)
    if result.reselected:
        print(f"thresholds changed: re-applied to {result.reselected} completed shard(s) from their manifests")
    print(format_funnel(result.stats))
    rate = result.samples_processed / result.seconds if result.seconds else 0.0
    if result.processed and result.stats.get("timing"):
        print(format_timing(result.stats))
    print(f"\n{result.processed} shard(s) processed, {result.skipped} already complete; "
          f"{result.samples_processed} samples in {result.seconds:.1f} s ({rate:.0f} samples/s), "
          f"after {result.ray_start_seconds:.1f} s of Ray start-up")
    for failure in result.failed:
        print(f"FAILED {printable(failure['source'])}: {printable(failure['error'])}", file=sys.stderr)
    if result.failed:
        print(f"{len(result.failed)} shard(s) failed; rerun the same command to retry only those", file=sys.stderr)
    print(f"outputs: {args.output}/shards, manifests: {args.output}/manifests, stats: {args.output}/stats.json")
    return result.exit_code


def printable(text: str | None) -> str:
    """Text from inputs (keys, shard names, error messages) with control characters escaped, so that nothing a
    shard holds can drive the terminal."""
    if text is None:
        return ""
    return "".join(ch if ch.isprintable() or ch == " " else repr(ch)[1:-1] for ch in str(text))


def format_timing(stats: dict) -> str:
    """CPU seconds per stage over every completed shard (stages' own work; Ray's overhead is not in it)."""
    timing = stats["timing"]
    total = sum(t["cpu_seconds"] for t in timing.values()) or 1.0
    lines = [f"\n{'time per stage':<16}{'samples':>10}{'CPU s':>10}{'share':>8}{'us/sample':>11}"]
    for name, figures in timing.items():
        per_sample = 1e6 * figures["cpu_seconds"] / figures["samples"] if figures["samples"] else 0.0
        lines.append(f"{name:<16}{figures['samples']:>10}{figures['cpu_seconds']:>10.2f}"
                     f"{100 * figures['cpu_seconds'] / total:>7.1f}%{per_sample:>11.0f}")
    return "\n".join(lines)


def format_funnel(stats: dict) -> str:
    lines = [f"{'stage':<16}{'in':>10}{'dropped':>10}{'out':>10}"]
    for row in stats["funnel"]:
        lines.append(f"{row['stage']:<16}{row['in']:>10}{row['dropped']:>10}{row['out']:>10}")
    total = stats["total"]
    share = 100.0 * stats["kept"] / total if total else 0.0
    lines.append(f"kept {stats['kept']} of {total} samples ({share:.1f}%)")
    if stats["dropped_by_reason"]:
        lines.append("drop reasons:")
        for reason, count in sorted(stats["dropped_by_reason"].items(), key=lambda kv: -kv[1]):
            lines.append(f"  {reason:<40}{count:>8}")
    return "\n".join(lines)


def funnel_from_manifests(output: str) -> dict:
    """Recount the funnel from the manifests alone (polars), independently of stats.json."""
    from pipeline.outputs import aggregate_stats
    from pipeline.run import load_saved_config, manifests_frame, stage_names

    names = stage_names(load_saved_config(output))
    frame = manifests_frame(output)
    per_shard = (
        frame.group_by("shard", "drop_reason").agg(pl.len().alias("n")).collect().to_dicts()
    )
    records: dict[str, dict] = {}
    for row in per_shard:
        record = records.setdefault(row["shard"], {"stem": row["shard"], "source": row["shard"], "total": 0, "kept": 0,
                                                   "dropped_by_reason": {}, "dropped_by_stage": {}})
        record["total"] += row["n"]
        if row["drop_reason"] is None:
            record["kept"] += row["n"]
        else:
            record["dropped_by_reason"][row["drop_reason"]] = row["n"]
            stage = row["drop_reason"].split(":", 1)[0]
            record["dropped_by_stage"][stage] = record["dropped_by_stage"].get(stage, 0) + row["n"]
    return aggregate_stats(list(records.values()), names, [])


def cmd_stats(args) -> int:
    from pipeline.dedup import duplicate_groups, format_duplicate_groups
    from pipeline.run import manifests_frame

    stats = funnel_from_manifests(args.output)
    groups = duplicate_groups(manifests_frame(args.output))
    if args.json:
        summary = {k: v for k, v in stats.items() if k != "per_shard"}
        if groups is not None:
            summary["duplicate_groups"] = groups
        print(json.dumps(summary, indent=2))
    else:
        print(format_funnel(stats))
        if groups is not None:
            print(format_duplicate_groups(groups))
    return 0


def cmd_explain(args) -> int:
    from pipeline.curate import stage_reason_expr, verdict_frame
    from pipeline.run import load_saved_config, manifests_frame
    from stages.dedup import DedupStage, ResolvedDedupStage

    config = load_saved_config(args.output)
    rows = manifests_frame(args.output).filter(pl.col("key") == args.key).collect()
    if rows.height == 0:
        print(f"vlcurate: error: no sample with key {printable(repr(args.key))} in {args.output}/manifests",
              file=sys.stderr)
        return EXIT_USAGE
    stages = [s.build() for s in config.enabled_stages]
    # The dedup stage's verdict was decided over the whole output and stored in its verdict columns: judged from
    # them, as the selection step did.
    judged = [ResolvedDedupStage(s.params, {}) if isinstance(s, DedupStage) else s for s in stages]
    frame = verdict_frame(rows)
    for row, verdict_row in zip(frame.to_dicts(), frame.select([stage_reason_expr(s).alias(s.name) for s in judged])
                                .to_dicts()):
        print(f"key:       {printable(row['key'])}  (shard {printable(row['shard'])}, position {row['position']})")
        print(f"original:  {row['caption_original']!r}")
        print(f"cleaned:   {row['caption']!r}")
        print(f"verdict:   {'KEPT' if row['kept'] else 'DROPPED (' + row['drop_reason'] + ')'}")
        if row["read_error"]:
            print(f"read:      {row['read_error']}")
        for stage in stages:
            values = ", ".join(f"{c}={shown(row.get(c))}" for c in stage.columns if c in row)
            verdict = verdict_row[stage.name] or "pass"
            print(f"  {stage.name:<14}{verdict:<36}{values}")
    return 0


def shown(value) -> str:
    """A manifest value for ``explain``: long lists (the dedup stage's window hashes) and bytes (its thumbnail) as
    their length."""
    if isinstance(value, list) and len(value) > 4:
        return f"[{len(value)} values]"
    if isinstance(value, bytes) and len(value) > 16:
        return f"<{len(value)} bytes>"
    return repr(value)


def cmd_select(args) -> int:
    from pipeline.run import select_thresholds

    stats = select_thresholds(args.output, args.overrides, address=args.address)
    print(format_funnel(stats))
    print(f"\n{stats['shards_reselected']} shard(s) changed; outputs rewritten without recomputing scores")
    return 0


def cmd_status(args) -> int:
    from pipeline.run import shard_status

    status = shard_status(args.output, args.input)
    for name, entries in status.items():
        print(f"{name}: {len(entries)}")
        for entry in entries:
            print(f"  {entry}")
    return 1 if status["failed"] else 0


if __name__ == "__main__":
    entry()
