"""What the two BLIP tasks share: their settings, the processor (the init model's, or a WordPiece tokenizer built
from the training captions), building the model, and the export that ``capfilt`` loads as a directory."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from models.training.data import open_image, read_samples
from models.training.task import TrainTask


@dataclasses.dataclass
class BlipModelSettings:
    init: str = ""  # hub name or directory to fine-tune; empty: from scratch with `architecture` + own tokenizer
    architecture: dict[str, Any] = dataclasses.field(default_factory=dict)  # BlipConfig text/vision sizes
    image_size: int = 384
    vocab_size: int = 2000  # WordPiece vocabulary built from the training captions (from scratch only)
    max_length: int = 40
    prompt: str = "a picture of "
    label_smoothing: float = 0.1
    augment: bool = True


class BlipTask(TrainTask):
    """A BLIP model from ``transformers`` (``model_class_name``), from scratch or fine-tuned from ``init``."""

    model_class_name: str

    @property
    def processor_dir(self) -> Path:
        return self.output / "processor"

    def prepare(self, train_shards):
        """Processor: the init model's, or a WordPiece tokenizer trained on the captions (offline, from scratch)."""
        from transformers import BertTokenizer, BlipImageProcessor, BlipProcessor

        if (self.processor_dir / "processor_config.json").exists() or (self.processor_dir / "vocab.txt").exists():
            return  # a resumed run keeps its tokenizer
        if self.settings.init:
            BlipProcessor.from_pretrained(self.settings.init).save_pretrained(self.processor_dir)
            return
        from tokenizers import BertWordPieceTokenizer

        captions = [c.decode("utf-8", "replace") for c in read_samples(train_shards)["txt"]]
        wordpiece = BertWordPieceTokenizer(lowercase=True)
        wordpiece.train_from_iterator([self.settings.prompt, *captions], vocab_size=self.settings.vocab_size,
                                      special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"])
        # transformers 5: BertTokenizer ignores vocab_file; pass the vocabulary itself.
        tokenizer = BertTokenizer(vocab=wordpiece.get_vocab(), do_lower_case=True, additional_special_tokens=["[DEC]"])
        size = {"height": self.settings.image_size, "width": self.settings.image_size}
        BlipProcessor(image_processor=BlipImageProcessor(size=size), tokenizer=tokenizer).save_pretrained(
            self.processor_dir)

    def processor(self):
        from transformers import BlipProcessor

        from models.blip import _quiet_transformers

        if not hasattr(self, "_processor"):
            _quiet_transformers()
            self._processor = BlipProcessor.from_pretrained(self.processor_dir)
        return self._processor

    def build_model(self):
        import transformers

        from models.blip import _quiet_transformers

        _quiet_transformers()
        model_class = getattr(transformers, self.model_class_name)
        if self.settings.init:
            return model_class.from_pretrained(self.settings.init)
        tokenizer = self.processor().tokenizer
        vocab = tokenizer.get_vocab()
        arch = self.settings.architecture
        config = transformers.BlipConfig(
            text_config={**arch.get("text", {}), "vocab_size": len(vocab), "bos_token_id": vocab["[DEC]"],
                         "pad_token_id": vocab["[PAD]"], "sep_token_id": vocab["[SEP]"],
                         "eos_token_id": vocab["[SEP]"]},
            vision_config={**arch.get("vision", {}), "image_size": self.settings.image_size},
            **{k: v for k, v in arch.items() if k not in ("text", "vision")},
        )
        return model_class(config)

    def images(self, images):
        pixels = self.processor().image_processor(images=[open_image(b) for b in images], return_tensors="np")
        values = pixels["pixel_values"].astype(np.float32)
        return values

    def enable_grad_checkpointing(self, module):
        module.model.gradient_checkpointing_enable()

    def export(self, module, directory):
        directory.mkdir(parents=True, exist_ok=True)
        module.model.save_pretrained(directory)
        self.processor().save_pretrained(directory)
