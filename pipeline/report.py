"""`vlcurate report DIR`: one self-contained HTML page (figures and thumbnails embedded) plus the PNG figures.

Sections: the funnel per stage; a histogram of each score with its threshold marked; kept samples; dropped
samples per reason, with their captions; duplicate groups (the largest few, each kept sample beside its
duplicates); CapFilt's caption changes; and, when training folders are given, loss curves and diffusion samples.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import polars as pl

from pipeline.outputs import OutputDir
from pipeline.run import load_saved_config, manifests_frame, resolve_top_fractions
from pipeline.shards import read_shard

# Score column -> (stage, threshold setting, which side fails)
SCORES = {
    "clip_score": ("clip_score", "threshold", "below"),
    "capfilt_web_itm": ("capfilt", "itm_threshold", "below"),
    "language_allowed_prob": ("language", "min_prob", "below"),
    "length_clip_tokens": ("length", "max_clip_tokens", "above"),
    "length_words": ("length", "min_words", "below"),
    "aspect_ratio": ("aspect_ratio", "max_ratio", "above"),
    "image_min_side": ("image_size", "min_side", "below"),
}
THUMBNAIL = 96
PER_REASON = 6
KEPT_SHOWN = 12
REPORT = "report"  # the report's folder inside the output
GROUPS_SHOWN = 6  # duplicate groups shown, largest first
MEMBERS_SHOWN = 6  # members shown per group, the kept one first


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _thumbnail(data: bytes | None) -> str | None:
    """A PNG data URI of a small thumbnail, or None for a missing, undecodable or too large image (the header's
    width x height is checked before any pixel is decoded: shard bytes are untrusted)."""
    from models.imaging import open_bounded

    if not data:
        return None
    try:
        with open_bounded(data) as image:
            image.draft("RGB", (THUMBNAIL, THUMBNAIL))
            image = image.convert("RGB")
            image.thumbnail((THUMBNAIL, THUMBNAIL))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            return _data_uri(buffer.getvalue())
    except Exception:  # noqa: BLE001 - an undecodable image is shown as such
        return None


def funnel_figure(stats: dict):
    import matplotlib.pyplot as plt

    names = [row["stage"] for row in stats["funnel"]]
    remaining = [row["out"] for row in stats["funnel"]]
    dropped = [row["dropped"] for row in stats["funnel"]]
    figure, axis = plt.subplots(figsize=(8, 3.2))
    axis.bar(names, remaining, color="#4c8c4a", label="remaining")
    axis.bar(names, dropped, bottom=remaining, color="#d9534f", label="dropped here")
    axis.set_ylabel("samples")
    axis.set_title(f"funnel: {stats['kept']} of {stats['total']} kept")
    axis.legend()
    plt.setp(axis.get_xticklabels(), rotation=30, ha="right")
    png = _png(figure)
    plt.close(figure)
    return png


def cutoff_label(params, setting: str, applied: float, side: str) -> str:
    """What the marked line is and which rule set it: a fixed threshold, or the cutoff of a top fraction."""
    fraction = getattr(params, "top_fraction", 0.0)
    if fraction and applied > getattr(params, setting):
        return f"cutoff {applied:.4g}: top_fraction {fraction:g} kept ({side} fails)"
    return f"{setting} {applied:g} ({side} fails)"


def score_figure(values: list[float], column: str, cutoff: float | None, label: str):
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4.2, 2.8))
    axis.hist(values, bins=40, color="#5b7db1")
    if cutoff is not None:
        axis.axvline(cutoff, color="#d9534f", linestyle="--", label=label)
        axis.legend(fontsize=7)
    axis.set_title(column)
    axis.set_ylabel("samples")
    png = _png(figure)
    plt.close(figure)
    return png


def loss_figure(name: str, lines: list[dict]):
    import matplotlib.pyplot as plt

    points = [(m["step"], m["loss"]) for m in lines if "loss" in m]
    figure, axis = plt.subplots(figsize=(4.2, 2.8))
    axis.plot([p[0] for p in points], [p[1] for p in points], color="#5b7db1")
    axis.set_title(f"{name}: training loss")
    axis.set_xlabel("step")
    png = _png(figure)
    plt.close(figure)
    return png


def write_report(output: str, training: list[str] | None = None, samples: str | None = None) -> Path | str:
    """Write OUTPUT/report/index.html (self-contained) and the figures as PNG files beside it (in the output's
    object store when it is one); returns where the page is."""
    out = OutputDir(output)
    config = load_saved_config(output)
    stats = out.read_json("stats.json")
    frame = manifests_frame(output).collect()
    if {"image_width", "image_height"} <= set(frame.columns):
        frame = frame.with_columns(pl.min_horizontal("image_width", "image_height").alias("image_min_side"))
    figures: list[tuple[str, str, bytes]] = [("funnel", "Funnel per stage", funnel_figure(stats))]
    declared = {s.name: s.params for s in config.enabled_stages}
    applied = {s.name: s.params for s in resolve_top_fractions(out, [s.build() for s in config.enabled_stages])}
    for column, (stage, setting, side) in SCORES.items():
        if column not in frame.columns or stage not in declared:
            continue
        values = frame[column].drop_nulls().cast(pl.Float64).to_list()
        if values:
            cutoff = getattr(applied[stage], setting, None)
            label = cutoff_label(declared[stage], setting, cutoff, side) if cutoff is not None else ""
            figures.append((column, f"{column} ({len(values)} scored)", score_figure(values, column, cutoff, label)))
    for training_dir in training or []:
        metrics_path = Path(training_dir) / "metrics.jsonl"
        if metrics_path.is_file():
            lines = [json.loads(line) for line in metrics_path.read_text().splitlines()]
            name = Path(training_dir).name
            figures.append((f"loss-{name}", f"training loss: {name}", loss_figure(name, lines)))
    for name, _, png in figures:
        out.write_bytes(f"{REPORT}/{name}.png", png)

    sections = [_figures_html(figures), _kept_html(out, frame), _dropped_html(frame), _duplicates_html(out, frame),
                _capfilt_html(frame),
                _training_html(training or []), _samples_html(samples)]
    page = PAGE.format(title=html.escape(f"vlcurate report: {config.name}"), total=stats["total"], kept=stats["kept"],
                       body="\n".join(s for s in sections if s))
    out.write_bytes(f"{REPORT}/index.html", page.encode("utf-8"))
    return out.store.location(f"{REPORT}/index.html")


def _figures_html(figures) -> str:
    cells = "".join(f'<figure><img class="figure" alt="{html.escape(title)}" src="{_data_uri(png)}">'
                    f"<figcaption>{html.escape(title)}</figcaption></figure>" for _, title, png in figures)
    return f"<h2>Figures</h2><div class='grid'>{cells}</div>"


def _card(image_uri: str | None, caption: str, note: str = "") -> str:
    image = (f'<img class="thumb" alt="sample" src="{image_uri}">' if image_uri
             else "<div class='thumb broken'>no image</div>")
    return (f"<div class='card'>{image}<div class='caption'>{html.escape(caption or '')}</div>"
            f"<div class='note'>{html.escape(note)}</div></div>")


def _images_for(rows: list[dict]) -> dict[tuple[str, str], bytes]:
    """Image bytes of the given manifest rows, read from their input shards."""
    wanted: dict[str, set[str]] = {}
    for row in rows:
        wanted.setdefault(row["shard"], set()).add(row["key"])
    found = {}
    for shard, keys in wanted.items():
        try:
            table = read_shard(shard).select(["key", "image"])
        except Exception:  # noqa: BLE001 - the input may have moved since the run
            continue
        for key, image in zip(table.column("key").to_pylist(), table.column("image").to_pylist()):
            if key in keys:
                found[(shard, key)] = image
    return found


def _kept_html(out: OutputDir, frame: pl.DataFrame) -> str:
    rows = frame.filter(pl.col("kept")).head(KEPT_SHOWN).to_dicts()
    images = _images_for(rows)
    cards = "".join(_card(_thumbnail(images.get((r["shard"], r["key"]))), (r.get("output_captions") or
                                                                            [r["caption"]])[0], r["key"]) for r in rows)
    return f"<h2>Kept samples</h2><div class='grid'>{cards}</div>"


def _dropped_html(frame: pl.DataFrame) -> str:
    dropped = frame.filter(pl.col("drop_reason").is_not_null())
    reasons = dropped["drop_reason"].value_counts(sort=True).to_dicts()
    rows = [r for reason in reasons for r in dropped.filter(pl.col("drop_reason") == reason["drop_reason"])
            .head(PER_REASON).to_dicts()]
    images = _images_for(rows)
    parts = []
    for reason in reasons:
        name = reason["drop_reason"]
        cards = "".join(_card(_thumbnail(images.get((r["shard"], r["key"]))), r["caption_original"] or "", r["key"])
                        for r in rows if r["drop_reason"] == name)
        parts.append(f"<h3>{html.escape(name)} ({reason['count']})</h3><div class='grid'>{cards}</div>")
    return "<h2>Dropped samples, per reason</h2>" + "".join(parts)


def _duplicates_html(out: OutputDir, frame: pl.DataFrame) -> str:
    """The largest duplicate groups: per group, the kept sample, then its duplicates with their match kind and
    pHash distance; and a few samples dropped as duplicates of evaluation images."""
    from pipeline.dedup import duplicate_groups

    groups = duplicate_groups(frame)
    if not groups or not (groups["groups"] or groups["evaluation_duplicates"]):
        return ""
    copies = frame.filter(pl.col("dedup_duplicate_of").is_not_null())
    within = copies.filter(pl.col("dedup_match") != "evaluation")
    leaders = (within.group_by("dedup_duplicate_of").len().sort(["len", "dedup_duplicate_of"],
                                                                 descending=[True, False])
               .head(GROUPS_SHOWN)["dedup_duplicate_of"].to_list())
    kept_rows = _kept_members(out, leaders)
    members = {leader: within.filter(pl.col("dedup_duplicate_of") == leader).sort("shard", "position")
               .head(MEMBERS_SHOWN - 1).to_dicts() for leader in leaders}
    evaluation = copies.filter(pl.col("dedup_match") == "evaluation").head(PER_REASON).to_dicts()
    rows = [r for r in kept_rows.values()] + [r for group in members.values() for r in group] + evaluation
    images = _images_for(rows)

    def card(row: dict, note: str) -> str:
        return _card(_thumbnail(images.get((row["shard"], row["key"]))), row.get("caption_original") or "", note)

    def match(row: dict) -> str:
        distance = row.get("dedup_distance")
        return f"{row['key']}: {row['dedup_match']}" + (f", {distance} bits" if distance is not None else "")

    sizes = ", ".join(f"{size}: {count}" for size, count in groups["group_sizes"].items())
    parts = [f"<h2>Duplicate groups ({groups['groups']}; {groups['duplicates']} duplicates dropped)</h2>"
             f"<p>Groups by size (members, the kept one included): {html.escape(sizes or 'none')}</p>"]
    for leader in leaders:
        kept = kept_rows.get(leader)
        cards = (card(kept, f"{kept['key']}: kept") if kept else _card(None, "", f"{leader}: kept"))
        cards += "".join(card(row, match(row)) for row in members[leader])
        total = within.filter(pl.col("dedup_duplicate_of") == leader).height + 1
        parts.append(f"<h3>{html.escape(leader)} ({total} samples)</h3><div class='grid group'>{cards}</div>")
    if evaluation:
        cards = "".join(card(row, f"{row['key']}: {row['dedup_duplicate_of']}") for row in evaluation)
        parts.append(f"<h3>Duplicates of evaluation images ({groups['evaluation_duplicates']})</h3>"
                     f"<div class='grid'>{cards}</div>")
    return "".join(parts)


def _kept_members(out: OutputDir, leaders: list[str]) -> dict[str, dict]:
    """The manifest rows (shard, key, caption) of the kept samples named ``STEM/KEY``."""
    wanted: dict[str, set[str]] = {}
    for leader in leaders:
        stem, _, key = leader.partition("/")
        wanted.setdefault(stem, set()).add(key)
    found = {}
    for stem, keys in wanted.items():
        try:
            table = out.read_manifest(stem, ["shard", "key", "caption_original"])
        except Exception:  # noqa: BLE001 - a manifest written before the column existed, or gone
            continue
        for row in table.to_pylist():
            if row["key"] in keys:
                found[f"{stem}/{row['key']}"] = row
    return found


def _capfilt_html(frame: pl.DataFrame) -> str:
    if "capfilt_web_itm" not in frame.columns:
        return ""
    changed = frame.filter(pl.col("kept") & pl.col("output_captions").is_not_null()
                           & (pl.col("output_captions").list.first() != pl.col("caption")))
    rows = changed.head(20).to_dicts()
    lines = "".join(f"<tr><td>{html.escape(r['key'])}</td><td>{html.escape(r['caption'])}</td>"
                    f"<td>{r['capfilt_web_itm']:.2f}</td><td>{html.escape(r['output_captions'][0])}</td></tr>"
                    for r in rows)
    return (f"<h2>CapFilt: captions replaced ({changed.height})</h2><table><tr><th>key</th><th>web caption</th>"
            f"<th>p(match)</th><th>written caption</th></tr>{lines}</table>")


def _training_html(training: list[str]) -> str:
    parts = []
    for training_dir in training:
        path = Path(training_dir) / "metrics.jsonl"
        if not path.is_file():
            continue
        final = [json.loads(line) for line in path.read_text().splitlines()][-1]
        values = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in final.items()
                           if k not in ("final",))
        parts.append(f"<li><b>{html.escape(Path(training_dir).name)}</b>: {html.escape(values)}</li>")
    return f"<h2>Training</h2><ul>{''.join(parts)}</ul>" if parts else ""


def _samples_html(samples: str | None) -> str:
    if not samples or not Path(samples).is_dir():
        return ""
    cards = []
    for png in sorted(Path(samples).glob("*.png")):
        prompt_file = png.with_suffix(".txt")
        prompt = prompt_file.read_text() if prompt_file.exists() else png.stem
        cards.append(_card(_thumbnail(png.read_bytes()), prompt))
    return f"<h2>Diffusion samples</h2><div class='grid'>{''.join(cards)}</div>"


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 12px; }}
.card {{ width: 160px; font-size: 12px; }}
.thumb {{ width: 96px; height: 96px; object-fit: contain; background: #eee; image-rendering: pixelated; }}
.group {{ border-left: 3px solid #ccc; padding-left: 8px; }}
.broken {{ display: flex; align-items: center; justify-content: center; color: #a00; }}
.note {{ color: #777; }}
figure {{ margin: 0; }}
table {{ border-collapse: collapse; font-size: 13px; }} td, th {{ border: 1px solid #ccc; padding: 4px; }}
</style></head>
<body>
<h1>{title}</h1>
<p>{kept} of {total} samples kept.</p>
{body}
<script>
window.addEventListener("load", () => {{
  const images = Array.from(document.images);
  document.body.dataset.images = images.length;
  document.body.dataset.loaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.figures = document.querySelectorAll("img.figure").length;
}});
</script>
</body></html>
"""
