"""Tiny CLIP and BLIP models, built and saved on the spot, for offline tests, demos and benchmarks. They load
through the same code as the real ones (open_clip names with checkpoint files or local-dir:, transformers
from_pretrained on a directory)."""

import json
from pathlib import Path

TINY_CLIP = "vlcurate-tiny-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def save_tiny_clip(folder: Path) -> dict:
    """A random tiny open_clip model saved three ways: config JSON, checkpoint file, and a local-dir folder."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / f"{TINY_CLIP}.json"
    config_path.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(config_path)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP, pretrained=None)
    checkpoint = folder / "tiny-clip.pt"
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    local_dir = folder / "tiny-clip-dir"
    local_dir.mkdir(exist_ok=True)
    (local_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CONFIG}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, local_dir / "open_clip_model.safetensors")
    return {"model_config": str(config_path), "checkpoint": str(checkpoint), "local_dir": str(local_dir)}


WORDS = ("a the dog dogs cat man woman child boy girl runs running sits on in at grass water ball red blue black "
         "white brown picture of street beach snow two people playing").split()


def save_tiny_blip(folder: Path) -> dict:
    """Random tiny BLIP captioner and ITM filter, each saved with its processor (save_pretrained)."""
    import torch
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval,
                              BlipImageProcessor, BlipProcessor)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    vocab = {token: i for i, token in enumerate(specials + WORDS)}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, additional_special_tokens=["[DEC]"])
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    config = BlipConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64, bos_token_id=vocab["[DEC]"],
                         pad_token_id=0, sep_token_id=vocab["[SEP]"], eos_token_id=vocab["[SEP]"]),
        vision_config=dict(hidden_size=32, image_size=32, patch_size=8, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64),
        projection_dim=32, image_text_hidden_size=16,
    )
    paths = {}
    torch.manual_seed(0)
    for name, model_class in (("captioner", BlipForConditionalGeneration), ("filter", BlipForImageTextRetrieval)):
        directory = folder / f"tiny-blip-{name}"
        model_class(config).save_pretrained(directory)
        processor.save_pretrained(directory)
        paths[name] = str(directory)
    return paths
