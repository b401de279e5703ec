"""CLIP's BPE tokenizer for counting tokens, without importing torch.

open_clip's ``SimpleTokenizer`` imports torch (seconds of start-up in every worker) and runs its BPE merges in
Python. This builds the same byte-level BPE from the vocabulary file that ships in open_clip's wheel, on the
``tokenizers`` library (Rust): same vocabulary and merges, same word split, lowercasing and whitespace cleaning.
Like open_clip, it unescapes HTML twice and straightens curly quotes first; the counts agree with open_clip's
on real alt-text except where ftfy (which open_clip also runs) repairs broken encodings.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import os

# open_clip's vocabulary: 256 byte symbols, their end-of-word forms, 48,894 merges and two special tokens.
_MERGES = 49152 - 256 - 2
# ftfy (which open_clip runs first) straightens curly quotes.
_STRAIGHT_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'",
                                  "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"'})
_WORD_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _bytes_to_unicode() -> list[str]:
    """The reversible byte -> printable character map of CLIP's (and GPT-2's) byte-level BPE, in vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def vocabulary_file() -> str:
    """open_clip's BPE file, found without importing open_clip (its package imports torch)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("open_clip_torch is not installed: it ships CLIP's BPE vocabulary")
    return os.path.join(spec.submodule_search_locations[0], "bpe_simple_vocab_16e6.txt.gz")


@functools.lru_cache(maxsize=1)
def clip_tokenizer():
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    with gzip.open(vocabulary_file(), "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:_MERGES + 1]]
    symbols = _bytes_to_unicode()
    vocab = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges),
             "<start_of_text>", "<end_of_text>"]
    tokenizer = Tokenizer(BPE(vocab={token: i for i, token in enumerate(vocab)}, merges=merges,
                              end_of_word_suffix="</w>", continuing_subword_prefix="", fuse_unk=False))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_WORD_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    return tokenizer


def count_clip_tokens(texts: list[str], max_chars: int = 4000) -> list[int]:
    """CLIP tokens of each text, start and end tokens included (what a CLIP text tower reads). Very long texts
    are certainly over any limit: only their first ``max_chars`` characters are tokenised."""
    if not texts:
        return []
    cleaned = [html.unescape(html.unescape(text[:max_chars])).translate(_STRAIGHT_QUOTES) for text in texts]
    return [len(encoding.ids) + 2 for encoding in clip_tokenizer().encode_batch(cleaned)]
