"""The language stage on real captions: English title-cased text kept, other languages dropped.

The English sets are the myntra-large catalogue titles and hand-reviewed LAION alt-text; the other-language sets
are the project's own captions (tests/data, always present), hand-reviewed LAION rows and synth's noise. The
bounds are the measured behaviour (bench/language.py prints the full table)."""

import pytest

import language_sets
from conftest import LAION_CAPTIONS, MYNTRA, require
from helpers import curate
from pipeline.config import ConfigError, parse_config
from pipeline.synth import OTHER_LANGUAGE

LANGUAGE = [{"stage": "language"}]
PREVIOUS_RULE = [{"stage": "language", "as_written": False, "lingua": False, "min_ratio": 0.0}]


def dropped(captions, entries=LANGUAGE) -> list[str]:
    return [row["caption"] for row in curate(entries, captions) if row["drop_reason"] is not None]


def test_title_cased_product_titles_are_kept():
    require(MYNTRA)
    titles = language_sets.myntra_titles()
    assert len(titles) == 150
    once_dropped = ["Numero Uno Men's Casual Black Flip Flop", "Numero Uno Men Casual Graphic Black Shoe"]
    assert set(once_dropped) <= set(titles)
    assert set(once_dropped) <= set(dropped(titles, PREVIOUS_RULE))
    lost = dropped(titles)
    assert not set(once_dropped) & set(lost)
    # Two titles that every detector reads as another language remain: 1.3%.
    assert sorted(lost) == ["ADIDAS Mens Red T-shirt", "ADIDAS Women Beige Socks"]


def test_english_title_cased_alt_text_is_kept():
    require(LAION_CAPTIONS)
    captions = language_sets.laion_english_titles()
    assert len(captions) == 300
    assert len(dropped(captions)) <= 4  # 1.3%; fastText lowercase alone drops 12


def test_own_other_language_captions_are_dropped():
    pairs = language_sets.own_other_language()
    assert len(pairs) == 214 and len({language for language, _ in pairs}) == 19
    lost = set(dropped([caption for _, caption in pairs]))
    kept = [(language, caption) for language, caption in pairs if caption not in lost]
    assert len(kept) <= 2, kept  # 99.1% recall; fastText lowercase alone keeps 15


def test_real_other_language_alt_text_is_dropped():
    require(LAION_CAPTIONS)
    pairs = language_sets.laion_other_language()
    assert len(pairs) == 168
    lost = set(dropped([caption for _, caption in pairs]))
    kept = [caption for _, caption in pairs if caption not in lost]
    # 95.8%: the rest mix other-language words with English product names; fastText lowercase alone keeps 59.
    assert len(kept) <= 7, kept


def test_synth_other_language_noise_is_dropped():
    assert len(dropped(OTHER_LANGUAGE)) == len(OTHER_LANGUAGE)


def test_columns_say_which_detectors_decided():
    captions = ["Two dogs play in the snow .", "Numero Uno Men's Casual Black Flip Flop",
                "一个红色的大圆在蓝色背景上", "iPhone 手机壳 透明", "東京タワーの夜景", "Un chien court sur la plage"]
    rows = curate(LANGUAGE, captions)
    assert [r["language_detector"] for r in rows] == ["fasttext", "fasttext+lingua", "fasttext", "fasttext",
                                                      "fasttext", "fasttext"]
    assert [r["language_code"] for r in rows] == ["en", "en", "zh", "zh", "ja", "fr"]
    assert [r["drop_reason"] for r in rows] == [None, None, None, None, "language:not_allowed_language",
                                                "language:not_allowed_language"]
    for row in rows:
        assert row["language_prob"] >= row["language_other_prob"] - 1e-6
    # Ideographs with no kana count as Chinese even where lid.176 says Japanese.
    assert rows[3]["language_allowed_prob"] > 0.99


def test_lingua_reads_a_bounded_prefix_of_hostile_captions(monkeypatch):
    import stages.caption_filters as caption_filters

    class RecordingLingua:
        lengths: list[int] = []

        def confidences(self, text):
            self.lengths.append(len(text))
            return [("en", 0.5), ("it", 0.5)]

    monkeypatch.setattr(caption_filters, "load_lingua", lambda languages: RecordingLingua())
    hostile = ("Numero Uno Casual " * 1000)[:16_384]
    entry = {"stage": "language", "lingua_max_chars": 500, "sure_prob": 1.01}  # lingua on every caption
    rows = curate([entry], [hostile, "Numero Uno Men Casual"])
    assert RecordingLingua.lengths == [500, len("Numero Uno Men Casual")]
    assert all(row["language_detector"] == "fasttext+lingua" for row in rows)


def test_hostile_captions_run_with_the_real_detectors():
    captions = [("Numero Uno Casual " * 1000)[:16_384], "é" * 16_000, "😀" * 4_000, "a" * 16_384]
    rows = curate(LANGUAGE, captions)
    assert not any(row.get("error_stage") for row in rows)


@pytest.mark.parametrize("settings, message", [
    ({"allowed": ["en", "ja"]}, "['ja'] missing from language.lingua_languages"),
    ({"lingua_languages": ["en", "zh", "xx"]}, "lingua has no language with ISO 639-1 code(s) ['xx']"),
    ({"lowercase": False, "as_written": False}, "fastText must read the caption one way at least"),
    ({"lingua_languages": ["en"], "allowed": ["en"]}, "at least two languages"),
])
def test_settings_errors_name_the_problem_and_fix(settings, message):
    with pytest.raises(ConfigError) as error:
        parse_config({"stages": [{"stage": "language", **settings}]}, [])
    assert message in str(error.value)


def test_second_opinion_can_be_switched_off():
    rows = curate([{"stage": "language", "lingua": False, "allowed": ["en", "ja"]}], ["東京タワーの夜景"])
    assert rows[0]["language_detector"] == "fasttext" and rows[0]["drop_reason"] is None
