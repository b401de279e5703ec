"""Stages that rewrite the caption: HTML removal and irregular-pattern removal (Qwen-VL's cleaning rules)."""

from __future__ import annotations

import dataclasses
import html
import re
from typing import Callable

import pyarrow as pa
from selectolax.lexbor import LexborHTMLParser

from stages.base import SampleBatch, Stage, StageParams

_WHITESPACE = re.compile(r"\s+")
_LOOKS_LIKE_TAG = re.compile(r"<\s*/?\s*[a-zA-Z!][^<>]*>")
_ENTITY = re.compile(r"&(#\d+|#[xX][0-9a-fA-F]+|[a-zA-Z][a-zA-Z0-9]{1,31});")


def normalise_whitespace(text: str) -> str:
    return _WHITESPACE.sub(" ", text).strip()


@dataclasses.dataclass
class HtmlParams(StageParams):
    drop_tags: list[str] = dataclasses.field(default_factory=lambda: ["script", "style", "noscript"])
    max_unescape_rounds: int = 3  # web alt-text is often escaped twice: "&amp;#39;"


class HtmlStage(Stage):
    """Remove HTML from captions: tags stripped, script/style content dropped, entities unescaped."""

    name = "html"
    Params = HtmlParams
    columns = {"html_changed": pa.bool_()}
    rewrites_caption = True

    def clean(self, text: str) -> str:
        # Escaped HTML ("&lt;i&gt;") turns into tags once unescaped: alternate until nothing changes.
        for _ in range(self.params.max_unescape_rounds):
            before = text
            if _LOOKS_LIKE_TAG.search(text):
                text = self.strip_tags(text)
            if _ENTITY.search(text):
                text = html.unescape(text)
            if text == before:
                break
        return normalise_whitespace(text)

    def strip_tags(self, text: str) -> str:
        tree = LexborHTMLParser(text)
        if self.params.drop_tags:
            tree.strip_tags(self.params.drop_tags)
        root = tree.body or tree.root
        return root.text(separator=" ") if root is not None else ""

    def annotate(self, batch: SampleBatch) -> dict[str, list]:
        cleaned = [self.clean(c) for c in batch.captions]
        return {"caption": cleaned, "html_changed": [a != b for a, b in zip(cleaned, batch.captions)]}


def _strip_filename(match: re.Match) -> str:
    """Slug-like names ("IMG_1234.JPG", "dark-knight-v2.jpg") go entirely; a plain word keeps its text
    ("look east.JPG" -> "look east")."""
    stem = match.group(1)
    if stem is None or re.search(r"[\d_-]", stem):
        return " "
    return stem


# Named rules: pattern and replacement. Order matters (URLs before file names, e-mails before handles).
PATTERN_RULES: dict[str, tuple[str, str | Callable[[re.Match], str]]] = {
    "control_chars": (r"[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f-\u009f]", " "),
    "zero_width": (r"[\u200b-\u200d\u2060\ufeff\u00ad]", ""),
    "url": (r"(?i)\b(?:https?://|ftp://|www\.)\S+", " "),
    "email": (r"(?i)\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b", " "),
    "filename": (
        r"(?i)\b(?:([\w-]+)\.(?:jpe?g|png|gif|webp|bmp|tiff?|heic|raw|cr2|nef|mp4|mov|avi|pdf)"
        r"|(?:img|dsc|dscn|dscf|pxl|mvimg|vid|gopr)[_-]?\d{3,}(?:[_-]\d+)*)\b",
        _strip_filename,
    ),
    "handle": (r"(?<![\w@])@[A-Za-z0-9_](?:[A-Za-z0-9_.]*[A-Za-z0-9_])?", " "),
    "hashtag": (r"(?<![\w#])#[^\s#]+", " "),
    "repeated_punctuation": (r"([!?,;:~*=_#+|\\-])\1+", r"\1"),
    "long_ellipsis": (r"\.{4,}|…{2,}", "..."),
    "repeated_letters": (r"([^\W\d_])\1{3,}", r"\1\1"),
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


_EDGE_SEPARATORS = re.compile(r"^[\s|:;,\-–—/•·]+|[\s|:;,\-–—/•·]+$")


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
        self.compiled: list[tuple[str, re.Pattern, str | Callable[[re.Match], str]]] = [
            (name, re.compile(PATTERN_RULES[name][0]), PATTERN_RULES[name][1])
            for name in PATTERN_RULES
            if params.rules.get(name, False)
        ]
        if params.boilerplate:
            phrases = sorted((re.escape(p) for p in params.boilerplate), key=len, reverse=True)
            # Remove the phrase together with a separator that attaches it ("Red car - Stock Photo").
            pattern = r"(?i)(?:\s*[|:\-–—]\s*)?\b(?:" + "|".join(phrases) + r")(?!\w)"
            self.compiled.append(("boilerplate", re.compile(pattern), " "))
        for name, regex in params.extra.items():
            self.compiled.append((name, re.compile(regex), " "))

    def clean(self, text: str) -> tuple[str, list[str]]:
        hits = []
        for name, pattern, replacement in self.compiled:
            text, n = pattern.subn(replacement, text)
            if n:
                hits.append(name)
        text = normalise_whitespace(text)
        if hits:
            text = _EDGE_SEPARATORS.sub("", text)
        return text, hits

    def annotate(self, batch: SampleBatch) -> dict[str, list]:
        results = [self.clean(c) for c in batch.captions]
        return {"caption": [r[0] for r in results], "patterns_hits": [r[1] for r in results]}
