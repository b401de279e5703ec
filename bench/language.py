"""Precision and recall of the caption language filter, before and after lingua's second opinion.

    .venv/bin/python bench/language.py

Prints, for the previous rule (fastText on the lowercased caption, kept when English + Chinese reach 0.1) and the
language stage with its defaults (fastText on both casings, lingua where fastText is unsure, allowed languages
must outweigh every other language):
- false drops on English title-cased text: the myntra-large catalogue titles and hand-reviewed LAION alt-text;
- recall (share dropped) on other-language captions: the project's own test captions, hand-reviewed LAION rows
  and ``vlcurate synth``'s other_language noise;
- over all 10,000 LAION captions, the share dropped, the share that consulted lingua and the time per caption;
- lingua's load time and the memory its models take.

The real data sets come from ../shared/data; those that are absent are skipped.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import language_sets  # noqa: E402
from models.langid import load_fasttext  # noqa: E402
from pipeline.synth import OTHER_LANGUAGE  # noqa: E402
from stages.caption_filters import CHINESE_VARIETIES, LanguageParams, LanguageStage  # noqa: E402
from stages.base import SampleBatch  # noqa: E402


def previous_rule_drops(captions: list[str]) -> list[bool]:
    """The rule before lingua: fastText's top 5 on the lowercased caption, English + Chinese share >= 0.1."""
    model = load_fasttext()
    drops = []
    for caption in captions:
        predictions = model.predict(caption.lower(), k=5)
        share = sum(p for code, p in predictions if CHINESE_VARIETIES.get(code, code) in ("en", "zh"))
        drops.append(share < 0.1)
    return drops


class StageRunner:
    """The language stage with its defaults, applied to captions directly (no Ray)."""

    def __init__(self, params: LanguageParams | None = None):
        self.stage = LanguageStage(params or LanguageParams())

    def annotate(self, captions: list[str]) -> dict[str, list]:
        import pyarrow as pa

        table = pa.table({"caption": captions})
        return self.stage.annotate(SampleBatch(table, list(range(len(captions)))))

    def drops(self, captions: list[str]) -> list[bool]:
        p = self.stage.params
        values = self.annotate(captions)
        return [allowed is not None and (allowed < p.min_prob or allowed < p.min_ratio * other)
                for allowed, other in zip(values["language_allowed_prob"], values["language_other_prob"])]


LINGUA_LOAD = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from lingua import LanguageDetectorBuilder
from models.langid import lingua_codes
def resident_mib():
    import resource
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20
codes = lingua_codes(sys.argv[2].split(","))
before, start = resident_mib(), time.perf_counter()
LanguageDetectorBuilder.from_iso_codes_639_1(*codes).with_preloaded_language_models().build()
print(f"{time.perf_counter() - start:.1f} {resident_mib() - before:.0f}")
"""


def measure_lingua(languages: list[str]) -> tuple[str, str]:
    """Seconds and MiB for lingua with every model of ``languages`` loaded, in a fresh process."""
    import subprocess

    result = subprocess.run([sys.executable, "-c", LINGUA_LOAD, str(ROOT), ",".join(languages)],
                            capture_output=True, text=True, check=True)
    seconds, mib = result.stdout.split()
    return seconds, mib


def rate(flags: list[bool]) -> str:
    if not flags:
        return "n/a"
    return f"{sum(flags)}/{len(flags)} = {100 * sum(flags) / len(flags):.1f}%"


def main() -> None:
    runner = StageRunner()
    casings = StageRunner(LanguageParams(lingua=False))  # fastText on both casings, no second opinion
    english = {
        "myntra-large titles (English, title-cased)": language_sets.myntra_titles(),
        "LAION English title-cased alt-text": language_sets.laion_english_titles(),
    }
    laion_other = language_sets.laion_other_language()
    other = {
        "own other-language captions (tests/data)": [c for _, c in language_sets.own_other_language()],
        "LAION other-language rows": None if laion_other is None else [c for _, c in laion_other],
        "synth other_language noise": list(OTHER_LANGUAGE),
    }
    rows = []
    totals = {"false drops: all English above": ([], [], []), "recall: all other-language above": ([], [], [])}
    for kind, sets, total in (("false drops", english, "false drops: all English above"),
                              ("recall", other, "recall: all other-language above")):
        for name, captions in sets.items():
            if captions is None:
                print(f"skipped {name}: ../shared/data is absent")
                continue
            flags = (previous_rule_drops(captions), casings.drops(captions), runner.drops(captions))
            for kept, new in zip(totals[total], flags):
                kept += new
            rows.append((f"{kind}: {name}", *(rate(f) for f in flags)))
        rows.append((total, *(rate(f) for f in totals[total])))

    width = max(len(r[0]) for r in rows)
    print(f"| {'measure'.ljust(width)} | {'old: fastText lowercase':>24} | {'fastText, both casings':>24} "
          f"| {'both casings + lingua':>24} |")
    print(f"|{'-' * (width + 2)}|{'-' * 26}|{'-' * 26}|{'-' * 26}|")
    for measure, old, both, new in rows:
        print(f"| {measure.ljust(width)} | {old:>24} | {both:>24} | {new:>24} |")

    laion = language_sets.laion_all_captions()
    if laion is not None:
        captions = [c for c in laion if c.strip()]
        start = time.perf_counter()
        old = previous_rule_drops(captions)
        old_s = time.perf_counter() - start
        start = time.perf_counter()
        values = runner.annotate(captions)
        new_s = time.perf_counter() - start
        p = runner.stage.params
        new = [a < p.min_prob or a < p.min_ratio * o
               for a, o in zip(values["language_allowed_prob"], values["language_other_prob"])]
        consulted = [d == "fasttext+lingua" for d in values["language_detector"]]
        print(f"\nAll {len(captions)} non-empty LAION captions: dropped old {rate(old)}, new {rate(new)}; "
              f"lingua consulted on {rate(consulted)}; "
              f"{1e3 * old_s / len(captions):.3f} ms/caption old, {1e3 * new_s / len(captions):.3f} ms/caption new")
    languages = runner.stage.params.lingua_languages
    seconds, mib = measure_lingua(languages)
    print(f"lingua ({', '.join(languages)}), every model loaded up front in a fresh process: {seconds} s, "
          f"{mib} MiB resident (the stage loads them on first use, once per worker process)")


if __name__ == "__main__":
    main()
