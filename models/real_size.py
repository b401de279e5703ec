"""Real-size CLIP and BLIP models with random weights, built offline, for tests and benchmarks of the model stages
at the size the qwen-vl recipe runs them.

* CLIP: open_clip ``ViT-L-14``, saved as a checkpoint file, the way a user's own checkpoint is given
  (``model: ViT-L-14``, ``pretrained: /path/file.pt``).
* BLIP: the CapFilt captioner (``BlipForConditionalGeneration``) and ITM filter (``BlipForImageTextRetrieval``)
  with the configurations of Salesforce/blip-image-captioning-large and Salesforce/blip-itm-large-coco (ViT-L/16
  vision tower at 384 px, BERT-base text side), each saved with ``save_pretrained`` next to a ``BlipProcessor``:
  the hub's image preprocessing and a WordPiece tokenizer whose 30,524 entries keep the hub tokenizer's special
  tokens at their ids, filled with English word pieces derived from open_clip's BPE vocabulary.

Everything loads through the same functions as the hub models (``models.clip.load_open_clip``,
``models.blip.load_blip``). Building takes one to two minutes on two cores and 5.3 GB of disk (float32, as the hub
ships them), so each model is built once into a folder and reused: a model's folder is complete when its marker
file is there, written last; concurrent builders wait for each other on a lock file.

    .venv/bin/python -m models.real_size [FOLDER]   # build (or find) them and print where they are
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import gc
import gzip
import json
import os
import re
import shutil
import string
import sys
import time
from pathlib import Path
from typing import Callable

CLIP_MODEL = "ViT-L-14"
CLIP_CHECKPOINT = "vit-l-14-random.pt"

# The hub tokenizer (BERT-base uncased, plus BLIP's two added tokens): 30,524 entries.
BLIP_VOCAB_SIZE = 30524
BERT_SPECIAL_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
BERT_WORD_PIECES_START = 999  # ids 1-99 and 104-998 are "[unusedN]" placeholders in BERT's layout
BLIP_DECODER_TOKEN = "[DEC]"  # bos of the captioner, id 30522
BLIP_ENCODER_TOKEN = "[ENC]"  # the ITM encoder's first token, id 30523
TEXT_MAX_POSITIONS = 512
SUFFIX_SHARE = 0.2  # share of "##" continuation pieces among the word pieces (BERT-base: about a fifth)
MAX_SUFFIX_CHARS = 5

# Salesforce/blip-image-captioning-large and Salesforce/blip-itm-large-coco share these settings.
BLIP_IMAGE_SIZE = 384
BLIP_IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
BLIP_IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]
BLIP_LARGE_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                         image_size=BLIP_IMAGE_SIZE, patch_size=16, layer_norm_eps=1e-5, hidden_act="gelu",
                         projection_dim=512, initializer_range=0.02)
BLIP_BASE_TEXT = dict(vocab_size=BLIP_VOCAB_SIZE, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                      num_attention_heads=12, max_position_embeddings=TEXT_MAX_POSITIONS, hidden_act="gelu",
                      layer_norm_eps=1e-12, projection_dim=768, is_decoder=True, use_cache=True,
                      bos_token_id=30522, eos_token_id=2, pad_token_id=0, sep_token_id=102)
BLIP_LARGE_TOP = dict(projection_dim=512, image_text_hidden_size=256, logit_scale_init_value=2.6592)
# What generation starts from when a caller passes nothing (the hub models' text settings).
BLIP_GENERATION = dict(bos_token_id=30522, eos_token_id=2, pad_token_id=0, max_length=20, min_length=0)

MARKER = "complete.json"
BUILD_VERSION = 1  # recorded in each marker; a folder built by another version is rebuilt (bump on any change)
FOLDER_VARIABLE = "VLCURATE_REAL_SIZE_MODELS"


def default_folder() -> Path:
    """Where the models are cached: ``$VLCURATE_REAL_SIZE_MODELS``, else ``~/.cache/vlcurate/real-size-models``."""
    if os.environ.get(FOLDER_VARIABLE):
        return Path(os.environ[FOLDER_VARIABLE])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "vlcurate" / "real-size-models"


# --- WordPiece vocabulary -------------------------------------------------------------------------------------


def _bpe_pieces() -> list[tuple[str, bool]]:
    """Lowercase alphabetic pieces of open_clip's BPE vocabulary, most frequent merge first, each with whether it
    ends a word."""
    from models.clip_bpe import vocabulary_file

    with gzip.open(vocabulary_file(), "rt", encoding="utf-8") as handle:
        merges = handle.read().split("\n")[1:]
    pieces = []
    for line in merges:
        joined = line.replace(" ", "")
        word_end = joined.endswith("</w>")
        text = joined[:-4] if word_end else joined
        if re.fullmatch(r"[a-z]+", text):
            pieces.append((text, word_end))
    return pieces


def _first_of_each(ranked: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Each token once, at its first (most frequent) rank."""
    first: dict[str, int] = {}
    for rank, token in ranked:
        first.setdefault(token, rank)
    return [(rank, token) for token, rank in first.items()]


def _word_pieces(count: int) -> list[str]:
    """``count`` word pieces: single characters and their "##" continuations, then whole words and "##" suffixes
    (a fifth, as in BERT-base; from short word-final BPE pieces such as "ing") in BPE frequency order."""
    characters = string.punctuation + string.digits + string.ascii_lowercase
    singles = [*characters, *("##" + c for c in string.digits + string.ascii_lowercase)]
    words, suffixes = [], []
    for rank, (text, word_end) in enumerate(_bpe_pieces()):
        words.append((rank, text))
        if word_end and len(text) <= MAX_SUFFIX_CHARS:
            suffixes.append((rank, "##" + text))
    room = count - len(singles)
    suffixes = _first_of_each(suffixes)[:int(room * SUFFIX_SHARE)]
    words = _first_of_each(words)[:room - len(suffixes)]
    if len(words) + len(suffixes) < room:
        raise RuntimeError(f"open_clip's BPE vocabulary gives only {len(words) + len(suffixes)} word pieces, "
                           f"{room} needed")
    return singles + [token for _, token in sorted(words + suffixes)]


@functools.lru_cache(maxsize=1)
def wordpiece_vocabulary() -> tuple[str, ...]:
    """BLIP's 30,524 token strings in id order: BERT-base's layout ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102,
    [MASK] 103, "[unusedN]" placeholders up to 998), word pieces up to 30,521, then [DEC] and [ENC]."""
    by_id = {token_id: token for token, token_id in BERT_SPECIAL_IDS.items()}
    layout, unused = [], 0
    for token_id in range(BERT_WORD_PIECES_START):
        if token_id in by_id:
            layout.append(by_id[token_id])
        else:
            layout.append(f"[unused{unused}]")
            unused += 1
    pieces = _word_pieces(BLIP_VOCAB_SIZE - 2 - len(layout))
    return (*layout, *pieces, BLIP_DECODER_TOKEN, BLIP_ENCODER_TOKEN)


def blip_tokenizer():
    """A BERT WordPiece tokenizer (uncased) with the hub BLIP tokenizer's special tokens and ids."""
    from transformers import BertTokenizer

    vocabulary = {token: token_id for token_id, token in enumerate(wordpiece_vocabulary())}
    return BertTokenizer(vocab=vocabulary, do_lower_case=True, bos_token=BLIP_DECODER_TOKEN,
                         additional_special_tokens=[BLIP_ENCODER_TOKEN], model_max_length=TEXT_MAX_POSITIONS)


def blip_processor():
    """BlipProcessor as the hub models ship it: 384-px bicubic resize, OpenAI CLIP mean/std, the tokenizer."""
    from PIL import Image
    from transformers import BlipImageProcessor, BlipProcessor

    images = BlipImageProcessor(size={"height": BLIP_IMAGE_SIZE, "width": BLIP_IMAGE_SIZE},
                                resample=Image.Resampling.BICUBIC, image_mean=BLIP_IMAGE_MEAN,
                                image_std=BLIP_IMAGE_STD, do_convert_rgb=True)
    return BlipProcessor(image_processor=images, tokenizer=blip_tokenizer())


def blip_large_config():
    from transformers import BlipConfig

    return BlipConfig(text_config=dict(BLIP_BASE_TEXT), vision_config=dict(BLIP_LARGE_VISION), **BLIP_LARGE_TOP)


# --- building and caching ----------------------------------------------------------------------------------------


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _built_version(marker: Path) -> int | None:
    try:
        return json.loads(marker.read_text()).get("version")
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _build_lock(folder: Path):
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _build(folder: Path, build: Callable[[Path], dict]) -> None:
    """Run ``build`` into a sibling folder, record what it saved, then move it into place."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    started = time.perf_counter()
    entries = build(partial)
    record = {"version": BUILD_VERSION, "entries": entries, "bytes": _folder_bytes(partial),
              "build_seconds": round(time.perf_counter() - started, 1)}
    (partial / MARKER).write_text(json.dumps(record, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)


def _cached(folder: Path, build: Callable[[Path], dict]) -> dict:
    """The marker's record of ``folder``, with its entries (file names ``build`` returned) made paths; built first
    unless the marker says this version built it."""
    marker = folder / MARKER
    if _built_version(marker) != BUILD_VERSION:
        with _build_lock(folder):
            if _built_version(marker) != BUILD_VERSION:  # another process may have built it meanwhile
                _build(folder, build)
    record = json.loads(marker.read_text())
    return {**record, "entries": {key: str(folder / name) for key, name in record["entries"].items()}}


def save_clip(folder: Path) -> dict:
    """open_clip ViT-L-14 with random weights, saved as a training checkpoint file (``state_dict`` inside)."""
    import open_clip
    import torch

    torch.manual_seed(0)
    model = open_clip.create_model(CLIP_MODEL, pretrained=None)
    torch.save({"epoch": 0, "name": "random-weights", "state_dict": model.state_dict()}, folder / CLIP_CHECKPOINT)
    del model
    gc.collect()
    return {"pretrained": CLIP_CHECKPOINT}


def _save_blip(folder: Path, model_class) -> dict:
    import torch
    from transformers import GenerationConfig

    from models.blip import _quiet_transformers

    _quiet_transformers()
    torch.manual_seed(0)
    model = model_class(blip_large_config())
    model.generation_config = GenerationConfig(**BLIP_GENERATION)
    model.save_pretrained(folder)
    del model
    gc.collect()
    blip_processor().save_pretrained(folder)
    # The vocabulary as a WordPiece file too (one token a line, line number = id), as the hub models ship it.
    (folder / "vocab.txt").write_text("".join(token + "\n" for token in wordpiece_vocabulary()), encoding="utf-8")
    return {"path": ""}  # the folder itself


def save_blip_captioner(folder: Path) -> dict:
    from transformers import BlipForConditionalGeneration

    return _save_blip(folder, BlipForConditionalGeneration)


def save_blip_filter(folder: Path) -> dict:
    from transformers import BlipForImageTextRetrieval

    return _save_blip(folder, BlipForImageTextRetrieval)


PARTS = {
    "clip": ("clip-vit-l-14", save_clip),
    "captioner": ("blip-captioning-large", save_blip_captioner),
    "filter": ("blip-itm-large", save_blip_filter),
}


def real_size_models(folder: Path | str | None = None) -> dict:
    """Build what is missing in ``folder`` (default: ``default_folder()``), one model at a time, and return where
    everything is: ``clip_model`` and ``clip_pretrained`` (the clip_score settings), ``captioner`` and ``filter``
    (capfilt's), and per model its build time and size under ``built``."""
    folder = Path(folder) if folder else default_folder()
    built = {name: _cached(folder / subfolder, build) for name, (subfolder, build) in PARTS.items()}
    return {
        "clip_model": CLIP_MODEL,
        "clip_pretrained": built["clip"]["entries"]["pretrained"],
        "captioner": built["captioner"]["entries"]["path"],
        "filter": built["filter"]["entries"]["path"],
        "built": {name: {"build_seconds": b["build_seconds"], "bytes": b["bytes"]} for name, b in built.items()},
    }


def main(argv: list[str]) -> None:
    started = time.perf_counter()
    models = real_size_models(argv[0] if argv else None)
    for name, record in models.pop("built").items():
        print(f"{name:<10} built in {record['build_seconds']:>6.1f} s, {record['bytes'] / 1e9:.2f} GB")
    for key, value in models.items():
        print(f"{key:<16} {value}")
    print(f"ready in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
