"""Precision, recall and cost of the caption language filter, old and new.

    .venv/bin/python bench/language.py

Columns: the rule before lingua (fastText on the lowercased caption, kept when English + Chinese reach 0.1),
fastText on both casings without a second opinion, lingua consulted wherever fastText's most likely language is
under sure_prob (an earlier default: ``sure_margin: 2``, ``as_written_when_sure: true``, no word lists), lingua
only where fastText's verdict is open (it leans to drop, keeps by less than ``sure_margin``, or keeps a caption
whose Latin-script words are mostly not English words; the as-written casing is not read where the lowercased
reading is already sure of an allowed language) without the word lists, and the stage's defaults (the same, with
the word lists weighing in wherever lingua is asked).

Printed:
- false drops on English title-cased text (the myntra-large catalogue titles and hand-reviewed LAION alt-text)
  and recall (share dropped) on other-language captions (the project's own, hand-reviewed LAION rows, synth's
  other_language noise), each for the tuning half, the held-out half (``language_sets.tuning_half``) and the
  whole set;
- the sweep that chose ``sure_margin`` and ``sure_english_words``: errors on the tuning half (and, for reading
  only, the held-out half) and the share of the 10,000 LAION captions that would consult lingua;
- cost over all 10,000 LAION captions and the 5,000 Flickr8k sentence captions: CPU ms per caption (this
  process's CPU time, the best of alternating rounds, so other jobs on the machine weigh less), the same as a
  multiple of fastText on both casings, the share that consulted lingua and the share dropped (every stage
  column runs the current code, which asks lingua once fastText has read a whole batch);
- the load time and memory of lingua's models and of the word lists.

The real data sets come from ../shared/data; those that are absent are skipped.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import language_sets  # noqa: E402
from models.langid import load_fasttext  # noqa: E402
from pipeline.config import ReadParams  # noqa: E402
from pipeline.curate import verdicts  # noqa: E402
from pipeline.synth import OTHER_LANGUAGE  # noqa: E402
from stages.caption_filters import CHINESE_VARIETIES, LanguageParams, LanguageStage  # noqa: E402
from stages.base import SampleBatch  # noqa: E402

ROUNDS = 5
BATCH = ReadParams().batch_samples
SWEEP_MARGINS = (0.1, 0.2, 0.3)
SWEEP_WORDS = (0.0, 0.2, 0.3, 0.4, 0.5)


class PreviousRule:
    """The rule before lingua: fastText's top 5 on the lowercased caption, English + Chinese share >= 0.1."""

    consulted = None

    def drops(self, captions: list[str]) -> list[bool]:
        model = load_fasttext()
        drops = []
        for caption in captions:
            predictions = model.predict(caption.lower(), k=5)
            share = sum(p for code, p in predictions if CHINESE_VARIETIES.get(code, code) in ("en", "zh"))
            drops.append(share < 0.1)
        return drops


class StageRunner:
    """The language stage with the given settings, applied to captions directly (no Ray)."""

    def __init__(self, params: LanguageParams):
        self.stage = LanguageStage(params)
        self.consulted: list[bool] = []

    def annotate(self, captions: list[str]) -> dict[str, list]:
        """The stage's columns, annotated in batches of ``read.batch_samples`` captions as a worker would."""
        import pyarrow as pa

        values: dict[str, list] = {name: [] for name in self.stage.columns}
        for start in range(0, len(captions), BATCH):
            chunk = captions[start:start + BATCH]
            for name, column in self.stage.annotate(SampleBatch(pa.table({"caption": chunk}),
                                                                list(range(len(chunk))))).items():
                values[name] += column
        return values

    def drops(self, captions: list[str]) -> list[bool]:
        """The stage's own verdicts, as a run gives them (``pipeline.curate.verdicts`` on its columns)."""
        import pyarrow as pa

        values = self.annotate(captions)
        self.consulted = [(d or "").startswith("fasttext+lingua") for d in values["language_detector"]]
        table = pa.table({"read_error": pa.nulls(len(captions), pa.string()),
                          **{name: pa.array(values[name], type=kind) for name, kind in self.stage.columns.items()}})
        return [reason is not None for reason in verdicts(table, [self.stage])]


def keeps(p: LanguageParams, allowed: float, other: float) -> bool:
    return allowed >= p.min_prob and allowed >= p.min_ratio * other


def load_script(setup: str, load: str) -> str:
    """A script for a fresh process (argv: the project root, comma-separated languages) that runs ``setup``, then
    times ``load`` and prints its seconds and the resident memory it added (MiB)."""
    return f"""
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
languages = sys.argv[2].split(",")
def resident_mib():
    import resource
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20
{setup}
before, start = resident_mib(), time.perf_counter()
{load}
print(f"{{time.perf_counter() - start:.1f}} {{resident_mib() - before:.0f}}")
"""


LINGUA_LOAD = load_script(
    "from lingua import LanguageDetectorBuilder\n"
    "from models.langid import lingua_codes\n"
    "codes = lingua_codes(languages)",
    "LanguageDetectorBuilder.from_iso_codes_639_1(*codes).with_preloaded_language_models().build()")
WORD_LISTS_LOAD = load_script("from models.langid import load_word_lists", "load_word_lists(tuple(languages))")


def measure_load(script: str, languages: list[str]) -> tuple[str, str]:
    """Seconds and MiB that ``script`` prints for loading ``languages``' models, in a fresh process."""
    import subprocess

    result = subprocess.run([sys.executable, "-c", script, str(ROOT), ",".join(languages)],
                            capture_output=True, text=True, check=True)
    seconds, mib = result.stdout.split()
    return seconds, mib


def rate(flags: list[bool]) -> str:
    if not flags:
        return "n/a"
    return f"{sum(flags)}/{len(flags)} = {100 * sum(flags) / len(flags):.1f}%"


def print_table(header: list[str], rows: list[tuple]) -> None:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    print("| " + " | ".join(str(h).ljust(w) if i == 0 else str(h).rjust(w)
                            for i, (h, w) in enumerate(zip(header, widths))) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                                for i, (c, w) in enumerate(zip(row, widths))) + " |")


def labelled_sets() -> list[tuple[str, str, list[str] | None]]:
    """(kind, name, captions): kind "false drops" for English sets, "recall" for other-language sets."""
    laion_other = language_sets.laion_other_language()
    return [
        ("false drops", "myntra-large titles", language_sets.myntra_titles()),
        ("false drops", "LAION English title-cased alt-text", language_sets.laion_english_titles()),
        ("recall", "own other-language captions (tests/data)", [c for _, c in language_sets.own_other_language()]),
        ("recall", "LAION other-language rows", None if laion_other is None else [c for _, c in laion_other]),
        ("recall", "synth other_language noise", list(OTHER_LANGUAGE)),
    ]


SPLITS = (("tuning", True), ("held-out", False), ("all", None))


def accuracy_table(variants: dict[str, object]) -> None:
    rows = []
    totals = {(kind, split): [[] for _ in variants] for kind in ("false drops", "recall") for split, _ in SPLITS}
    for kind, name, captions in labelled_sets():
        if captions is None:
            print(f"skipped {name}: ../shared/data is absent")
            continue
        flags = [runner.drops(captions) for runner in variants.values()]
        for split, tuning in SPLITS:
            chosen = [i for i, c in enumerate(captions) if tuning is None or language_sets.tuning_half(c) == tuning]
            cells = []
            for total, f in zip(totals[(kind, split)], flags):
                picked = [f[i] for i in chosen]
                total += picked
                cells.append(rate(picked))
            rows.append((f"{kind}: {name}, {split}", *cells))
    for (kind, split), columns in totals.items():
        label = "all English above" if kind == "false drops" else "all other-language above"
        rows.append((f"{kind}: {label}, {split}", *(rate(f) for f in columns)))
    print_table(["measure", *variants], rows)


def sweep_table(laion: list[str] | None) -> None:
    """Errors of each (sure_margin, sure_english_words) on the labelled sets' halves, and LAION's consult share."""
    base = LanguageStage(LanguageParams())
    p = base.params
    labelled = []  # (is English, tuning half, caption, fastText shares, verdict with lingua, verdict without)
    for kind, _, captions in labelled_sets():
        for caption in captions or []:
            shares = base.fasttext_shares(caption)
            combined = base.second_opinion(caption, shares) or shares
            verdicts = [keeps(p, base.allowed_share(s), base.other_share(s)) for s in (combined, shares)]
            labelled.append((kind == "false drops", language_sets.tuning_half(caption), caption, shares, *verdicts))
    laion_shares = [(c, base.fasttext_shares(c)) for c in laion or [] if c.strip()]
    rows = []
    settings = [(2.0, 0.0)] + [(m, w) for m in SWEEP_MARGINS for w in SWEEP_WORDS]
    for margin, words in settings:
        stage = LanguageStage(dataclasses.replace(p, sure_margin=margin, sure_english_words=words))
        errors = {True: [0, 0], False: [0, 0]}
        for english, tuning, caption, shares, with_lingua, without in labelled:
            kept = without if stage.fasttext_sure(caption, shares) else with_lingua
            errors[tuning][0 if english else 1] += english != kept
        consulted = sum(not stage.fasttext_sure(c, s) for c, s in laion_shares)
        rows.append((f"{margin:g}", f"{words:g}", *errors[True], *errors[False],
                     f"{100 * consulted / len(laion_shares):.1f}%" if laion_shares else "n/a"))
    print("\nChoosing where lingua is consulted (verdicts of the detectors alone). sure_margin 2 asks lingua "
          "wherever fastText's most likely language is under sure_prob\n(here the as-written reading is skipped "
          "where the lowercased one is sure, so fewer LAION captions ask than with the\nprevious default below); "
          "the defaults are the cheapest setting whose tuning-half errors match it.")
    print_table(["sure_margin", "sure_english_words", "tuning: false drops", "tuning: missed",
                 "held-out: false drops", "held-out: missed", "LAION consulting lingua"], rows)


def cost_table(variants: dict[str, object], sets: dict[str, list[str]]) -> None:
    """CPU ms/caption, best of ROUNDS alternating rounds, for each variant on each caption set."""
    for runner in variants.values():  # lingua loads its models on first use: not part of the timing
        runner.drops(["Numero Uno Men Casual Graphic Black Shoe"])
    rows = []
    for name, captions in sets.items():
        best = {label: float("inf") for label in variants}
        results = {}
        for _ in range(ROUNDS):
            for label, runner in variants.items():
                start = time.process_time()
                drops = runner.drops(captions)
                best[label] = min(best[label], time.process_time() - start)
                results[label] = (drops, runner.consulted)
        baseline = best["fastText, both casings"]
        for label in variants:
            drops, consulted = results[label]
            rows.append((f"{name}: {label}", f"{1e3 * best[label] / len(captions):.3f}",
                         f"{best[label] / baseline:.2f}x", "-" if consulted is None else rate(consulted),
                         rate(drops)))
    print(f"\nCost (CPU time of this process, best of {ROUNDS} alternating rounds):")
    print_table(["captions: rule", "ms/caption", "x fastText both casings", "consulted lingua", "dropped"], rows)


def main() -> None:
    variants = {
        "old: fastText lowercase": PreviousRule(),
        "fastText, both casings": StageRunner(LanguageParams(lingua=False, as_written_when_sure=True)),
        "lingua where top < 0.8": StageRunner(LanguageParams(sure_margin=2.0, as_written_when_sure=True,
                                                             word_lists=False)),
        "lingua where open": StageRunner(LanguageParams(word_lists=False)),
        "new: + word lists": StageRunner(LanguageParams()),
    }
    accuracy_table(variants)
    laion = language_sets.laion_all_captions()
    sweep_table(laion)
    sets = {}
    if laion is not None:
        sets["LAION 10k"] = [c for c in laion if c.strip()]
    flickr = language_sets.flickr_captions()
    if flickr is not None:
        sets["Flickr8k sentences"] = flickr
    cost_table(variants, sets)
    languages = LanguageParams().lingua_languages
    seconds, mib = measure_load(LINGUA_LOAD, languages)
    print(f"\nlingua ({', '.join(languages)}), every model loaded up front in a fresh process: {seconds} s, "
          f"{mib} MiB resident (the stage loads them on first use, once per worker process)")
    languages = LanguageParams().word_list_languages
    seconds, mib = measure_load(WORD_LISTS_LOAD, languages)
    print(f"word lists (English and {', '.join(languages)}) in a fresh process: {seconds} s, {mib} MiB resident "
          "(loaded on first use too)")


if __name__ == "__main__":
    main()
