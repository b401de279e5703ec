"""Stages that rewrite the caption: HTML removal and irregular-pattern removal (Qwen-VL's cleaning rules).

Captions are untrusted (up to 16 KB each): every pattern here runs in time linear in the caption. A pattern that
could scan a long run of characters from each of its positions (Python's ``re`` backtracks) only starts where
such a run starts (a negative lookbehind), and runs are consumed possessively; the HTML parser, whose work is
quadratic in the nesting depth and in the attributes of a tag, only sees captions with few and short tags.
"""

from __future__ import annotations

import bisect
import dataclasses
import html
import itertools
import re
from typing import Callable, Iterable

import numpy as np
import polars as pl
import pyarrow as pa
from selectolax.lexbor import LexborHTMLParser

from stages.base import SampleBatch, Stage, StageParams, first_reason

_LOOKS_LIKE_TAG = re.compile(r"<\s*/?\s*[a-zA-Z!][^<>]*>")
# What an HTML parser reads as the start of a tag, closed or not ("<img src=x onerror=..." at the end of a caption).
_TAG_OPEN = re.compile(r"<[a-zA-Z!/?]")
_ENTITY = re.compile(r"&(#\d+|#[xX][0-9a-fA-F]+|[a-zA-Z][a-zA-Z0-9]{1,31});")
# html.unescape converts numeric references with int(), which refuses more than 4,300 digits (ValueError) and is
# slow long before; a reference with this many digits is not a character anyway (U+10FFFF is &#1114111;).
_LONG_NUMERIC_REFERENCE = re.compile(r"&#(?:[xX][0-9a-fA-F]{16,}|[0-9]{16,});?")
# Alt-text has a few short tags. The parser's work grows with the square of the nesting depth and of the number
# of attributes of one tag, so a caption with more tags, or a longer tag, than this is not parsed (it is dropped).
MAX_TAGS = 256
MAX_TAG_CHARS = 2048
_LONG_TAG = re.compile(r"<[a-zA-Z!/?][^<>]{%d}" % MAX_TAG_CHARS)


def normalise_whitespace(text: str) -> str:
    """Runs of whitespace as one space, none at either end (``str.split`` splits where ``\\s`` matches)."""
    return " ".join(text.split())


def unescape(text: str) -> str:
    """``html.unescape`` that cannot raise or stall on absurdly long numeric references."""
    return html.unescape(_LONG_NUMERIC_REFERENCE.sub("\ufffd", text))


def has_markup(text: str) -> bool:
    """Whether the text holds what an HTML parser reads as a tag, or a character reference that decodes to
    something: escaped markup becomes markup again for whoever unescapes the caption once more."""
    if _TAG_OPEN.search(text):
        return True
    decoded = unescape(text)
    return bool(_TAG_OPEN.search(decoded)) or (decoded != text and _ENTITY.search(text) is not None)


@dataclasses.dataclass
class HtmlParams(StageParams):
    drop_tags: list[str] = dataclasses.field(default_factory=lambda: ["script", "style", "noscript"])
    max_unescape_rounds: int = 3  # web alt-text is often escaped twice: "&amp;#39;"


class HtmlStage(Stage):
    """Remove HTML from captions: tags stripped, script/style content dropped, entities unescaped.

    A caption that still holds markup after ``max_unescape_rounds`` rounds (escaped more deeply than that), or
    more than ``MAX_TAGS`` tags or a tag longer than ``MAX_TAG_CHARS``, is dropped (``html:markup_left``): no kept
    caption contains markup.
    """

    name = "html"
    Params = HtmlParams
    columns = {"html_changed": pa.bool_(), "html_markup_left": pa.bool_()}
    rewrites_caption = True

    def clean(self, text: str) -> tuple[str, bool]:
        """The cleaned caption, and whether markup is left in it that the bounded cleaning could not remove."""
        if "<" not in text and "&" not in text:  # no tag, no character reference: nothing to do but spaces
            return normalise_whitespace(text), False
        rounds = self.params.max_unescape_rounds
        # Escaped HTML ("&lt;i&gt;") turns into tags once unescaped, and the text of raw-text elements
        # (<textarea>, <xmp>, ...) is markup again: strip and unescape in turn until nothing changes, stripping
        # once more after the last unescaping round.
        for done in range(rounds + 1):
            before = text
            if _TAG_OPEN.search(text) or _LOOKS_LIKE_TAG.search(text):
                if text.count("<") > MAX_TAGS or _LONG_TAG.search(text):
                    return normalise_whitespace(text), True
                text = self.strip_tags(text)
            if done < rounds and _ENTITY.search(text):
                text = unescape(text)
            if text == before:
                break
        text = normalise_whitespace(text)
        return text, has_markup(text)

    def strip_tags(self, text: str) -> str:
        tree = LexborHTMLParser(text)
        if self.params.drop_tags:
            tree.strip_tags(self.params.drop_tags)
        root = tree.body or tree.root
        return root.text(separator=" ") if root is not None else ""

    def annotate(self, batch: SampleBatch) -> dict[str, list]:
        results = [self.clean(c) for c in batch.captions]
        cleaned = [r[0] for r in results]
        return {"caption": cleaned, "html_changed": [a != b for a, b in zip(cleaned, batch.captions)],
                "html_markup_left": [r[1] for r in results]}

    def reject_reason(self) -> pl.Expr:
        return first_reason((pl.col("html_markup_left"), "markup_left"))


def _strip_filename(match: re.Match) -> str:
    """Slug-like names ("IMG_1234.JPG", "dark-knight-v2.jpg") go entirely; a plain word keeps its text
    ("look east.JPG" -> "look east"). Hyphens before the name are not part of it and stay."""
    lead, stem = match.group("lead") or "", match.group("stem")
    if stem is None or re.search(r"[\d_-]", stem):
        return lead + " "
    return lead + stem


# Named rules: pattern and replacement. Order matters (URLs before file names, e-mails before handles).
# Linear time on any caption: a pattern whose first part is an unbounded run (the local part of an e-mail, the
# stem of a file name) only starts where such a run starts ("(?<![...])"), so that a 16 KB run without a match
# is scanned once, not once from every character of it; where the run starts with punctuation, the match
# starts at its first word character as before (the punctuation is captured and put back).
PATTERN_RULES: dict[str, tuple[str, str | Callable[[re.Match], str]]] = {
    "control_chars": (r"[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f-\u009f]", " "),
    "zero_width": (r"[\u200b-\u200d\u2060\ufeff\u00ad]", ""),
    "url": (r"(?i)\b(?:https?://|ftp://|www\.)\S+", " "),
    "email": (r"(?i)(?<![\w.+-])([.+-]*+)\w[\w.+-]*+@[\w-]+(?:\.[\w-]+)+\b", r"\1 "),
    "filename": (
        r"(?i)(?<![\w-])(?P<lead>-*+)(?P<stem>\w[\w-]*+)\."
        r"(?:jpe?g|png|gif|webp|bmp|tiff?|heic|raw|cr2|nef|mp4|mov|avi|pdf)\b"
        r"|\b(?:img|dsc|dscn|dscf|pxl|mvimg|vid|gopr)[_-]?\d{3,}(?:[_-]\d+)*\b",
        _strip_filename,
    ),
    "handle": (r"(?<![\w@])@[A-Za-z0-9_](?:[A-Za-z0-9_.]*[A-Za-z0-9_])?", " "),
    "hashtag": (r"(?<![\w#])#[^\s#]+", " "),
    "repeated_punctuation": (r"([!?,;:~*=_#+|\\-])\1+", r"\1"),
    "long_ellipsis": (r"\.{4,}|…{2,}", "..."),
    "repeated_letters": (r"([^\W\d_])\1{3,}", r"\1\1"),
}

# What a caption must contain for a rule to possibly match: most captions skip most rules without a regex scan.
_CAN_MATCH: dict[str, Callable[[str], bool]] = {
    "control_chars": lambda text: not (text.isascii() and text.isprintable()),
    "zero_width": lambda text: not text.isascii(),
    "email": lambda text: "@" in text,
    "handle": lambda text: "@" in text,
    "hashtag": lambda text: "#" in text,
    "long_ellipsis": lambda text: "...." in text or "\u2026" in text,
}


def _always(text: str) -> bool:
    return True


# What Python's ``re`` matches case-insensitively to an ASCII letter, beyond what ``str.lower`` maps to it: dotted and
# dotless I, long s, the Kelvin sign. With these mapped first, ``lower`` maps every character to one character, so
# positions in the folded text are positions in the text.
_ASCII_FOLD = {0x130: "i", 0x131: "i", 0x17F: "s", 0x212A: "k"}
_FOLDED_SPECIALLY = "".join(map(chr, _ASCII_FOLD))


def fold_ascii_case(text: str) -> str:
    """``text`` with every character that ``re.IGNORECASE`` matches to an ASCII letter turned into that letter in
    lower case; as long as ``text``, character for character."""
    if not text.isascii() and any(ch in text for ch in _FOLDED_SPECIALLY):
        text = text.translate(_ASCII_FOLD)
    return text.lower()


class _Joined:
    """A batch of captions as one string, ``\n`` between them: one scan finds the captions a rule might change."""

    def __init__(self, texts: list[str]):
        self.text = "\n".join(texts)
        self.starts = list(itertools.accumulate((len(text) + 1 for text in texts[:-1]), initial=0)) if texts else []

    def owners(self, positions: Iterable[int]) -> set[int]:
        """The captions that hold these positions of the joined text."""
        return {bisect.bisect_right(self.starts, p) - 1 for p in positions}

    def containing(self, needles: Iterable[str], folded: bool = False) -> set[int]:
        """The captions that contain one of ``needles`` (after ``fold_ascii_case`` when ``folded``)."""
        text = fold_ascii_case(self.text) if folded else self.text
        found = []
        for needle in needles:
            at = text.find(needle)
            while at >= 0:
                found.append(at)
                at = text.find(needle, at + 1)
        return self.owners(found)

    def code_points(self) -> np.ndarray:
        return np.frombuffer(self.text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


# Extensions of the "filename" rule, and runs of digits of its camera-name alternative: a caption without either
# cannot match it.
_FILE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".heic", ".raw", ".cr2", ".nef",
                    ".mp4", ".mov", ".avi", ".pdf")
_THREE_DIGITS = re.compile(r"\d{3}")
_REPEATABLE_PUNCTUATION = np.array([ord(ch) for ch in "!?,;:~*=_#+|\\-"], dtype="<u4")


def _filename_candidates(joined: _Joined) -> set[int]:
    return (joined.containing(_FILE_EXTENSIONS, folded=True)
            | joined.owners(m.start() for m in _THREE_DIGITS.finditer(joined.text)))


def _repeated_punctuation_candidates(joined: _Joined) -> set[int]:
    """Captions with a character of the rule's set twice in a row."""
    points = joined.code_points()
    pairs = (points[1:] == points[:-1]) & np.isin(points[:-1], _REPEATABLE_PUNCTUATION)
    return joined.owners(np.flatnonzero(pairs).tolist())


def _repeated_letters_candidates(joined: _Joined) -> set[int]:
    """Captions with a character four times in a row."""
    points = joined.code_points()
    same = points[1:] == points[:-1]
    runs = same[:-2] & same[1:-1] & same[2:]
    return joined.owners(np.flatnonzero(runs).tolist())


# Per rule, a superset of the captions of a batch that the rule can change, found in one pass over the batch:
# most captions match none of these rules, and a regex scan per caption and rule costs more than the rest of the
# stage. Rules not listed here use their ``_CAN_MATCH`` test.
_BATCH_CANDIDATES: dict[str, Callable[[_Joined], set[int]]] = {
    "url": lambda joined: joined.containing(("://", "www."), folded=True),
    "filename": _filename_candidates,
    "repeated_punctuation": _repeated_punctuation_candidates,
    "repeated_letters": _repeated_letters_candidates,
}


DEFAULT_BOILERPLATE = [
    "stock photo", "stock photos", "stock photography", "stock image", "stock images", "stock picture",
    "stock video", "stock footage", "stock illustration", "stock vector", "royalty free", "royalty-free",
    "click to enlarge", "click here", "free download", "high resolution", "high-res", "image may contain:",
    "no description available", "shutterstock", "getty images", "istockphoto", "istock", "alamy",
    "dreamstime", "123rf", "depositphotos", "photo credit:",
]


@dataclasses.dataclass
class PatternsParams(StageParams):
    # Every named rule of PATTERN_RULES can be switched off; hashtags are kept by default (often content).
    rules: dict[str, bool] = dataclasses.field(
        default_factory=lambda: {name: name != "hashtag" for name in PATTERN_RULES}
    )
    boilerplate: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_BOILERPLATE))
    # Extra user rules: name -> regex; matches are removed.
    extra: dict[str, str] = dataclasses.field(default_factory=dict)


# The trailing run is only tried where a run of separators starts (linear on "a - - - ... - a").
_EDGE_SEPARATORS = re.compile(r"^[\s|:;,\-–—/•·]+|(?<![\s|:;,\-–—/•·])[\s|:;,\-–—/•·]+$")


class PatternsStage(Stage):
    """Remove irregular patterns: URLs, e-mails, file names, handles, repeated characters, boilerplate."""

    name = "patterns"
    Params = PatternsParams
    columns = {"patterns_hits": pa.list_(pa.string())}
    rewrites_caption = True

    def __init__(self, params: PatternsParams):
        super().__init__(params)
        unknown = set(params.rules) - set(PATTERN_RULES)
        if unknown:
            raise ValueError(
                f"patterns.rules has unknown rule(s) {sorted(unknown)}; known rules: {sorted(PATTERN_RULES)}"
            )
        self.compiled: list[tuple[str, re.Pattern, str | Callable[[re.Match], str], Callable[[str], bool]]] = [
            (name, re.compile(PATTERN_RULES[name][0]), PATTERN_RULES[name][1], _CAN_MATCH.get(name, _always))
            for name in PATTERN_RULES
            if params.rules.get(name, False)
        ]
        # By position in ``compiled``: a user's extra rule may share a built-in rule's name.
        self.batch_candidates: dict[int, Callable[[_Joined], set[int]]] = {
            i: _BATCH_CANDIDATES[rule[0]] for i, rule in enumerate(self.compiled) if rule[0] in _BATCH_CANDIDATES
        }
        if params.boilerplate:
            phrases = sorted((re.escape(p) for p in params.boilerplate), key=len, reverse=True)
            # Remove the phrase together with a separator that attaches it ("Red car - Stock Photo"); the
            # separator's leading spaces are only tried from the start of a run of spaces (linear time).
            pattern = r"(?i)(?:(?<!\s)\s*[|:\-–—]\s*)?\b(?:" + "|".join(phrases) + r")(?!\w)"
            self.compiled.append(("boilerplate", re.compile(pattern), " ", _always))
            if all(phrase.isascii() for phrase in params.boilerplate):
                # Every match holds one of the phrases, in any case.
                needles = sorted({phrase.lower() for phrase in params.boilerplate})
                self.batch_candidates[len(self.compiled) - 1] = lambda joined: joined.containing(needles, folded=True)
        for name, regex in params.extra.items():
            self.compiled.append((name, re.compile(regex), " ", _always))

    def clean(self, text: str) -> tuple[str, list[str]]:
        texts, hits = self.clean_all([text])
        return texts[0], hits[0]

    def clean_all(self, texts: list[str]) -> tuple[list[str], list[list[str]]]:
        """Each caption cleaned, and the rules that changed it. The rules run in order on every caption; each runs
        only on the captions it can change, found for the whole batch at once."""
        texts = list(texts)
        hits: list[list[str]] = [[] for _ in texts]
        for rule, (name, pattern, replacement, can_match) in enumerate(self.compiled):
            find = self.batch_candidates.get(rule)
            if find is not None:
                candidates: Iterable[int] = sorted(find(_Joined(texts)))
            else:
                candidates = [i for i, text in enumerate(texts) if can_match(text)]
            for i in candidates:
                text, n = pattern.subn(replacement, texts[i])
                if n:
                    texts[i] = text
                    hits[i].append(name)
        for i, text in enumerate(texts):
            text = normalise_whitespace(text)
            texts[i] = _EDGE_SEPARATORS.sub("", text) if hits[i] else text
        return texts, hits

    def annotate(self, batch: SampleBatch) -> dict[str, list]:
        texts, hits = self.clean_all(batch.captions)
        return {"caption": texts, "patterns_hits": hits}
