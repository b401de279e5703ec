"""The BLIP captioner task: BlipForConditionalGeneration trained with the LM loss; its export is ``capfilt``'s
``captioner``."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from models.training.blip_base import BlipModelSettings, BlipTask
from models.training.data import raw_columns


class BlipCaptionerTask(BlipTask):
    """BLIP captioner (BlipForConditionalGeneration): LM loss on "prompt + caption", prompt tokens masked."""

    name = "blip-captioner"
    Settings = BlipModelSettings
    model_class_name = "BlipForConditionalGeneration"

    def preprocess(self, batch):
        images, captions = raw_columns(batch)
        tokenizer = self.processor().tokenizer
        text = tokenizer([self.settings.prompt + c for c in captions], padding="max_length", truncation=True,
                         max_length=self.settings.max_length, return_tensors="np")
        prompt_tokens = len(tokenizer(self.settings.prompt).input_ids) - 1  # [CLS] + prompt words, no [SEP]
        labels = np.where(text["attention_mask"] == 1, text["input_ids"], -100)
        labels[:, :prompt_tokens] = -100
        return {"pixel_values": self.images(images), "input_ids": text["input_ids"].astype(np.int64),
                "attention_mask": text["attention_mask"].astype(np.int64), "labels": labels.astype(np.int64)}

    def build(self):
        return _CaptionerModule(self.build_model(), self.settings.label_smoothing)

    def evaluate(self, module, batches):
        if not batches:
            return {}
        module.eval()
        with torch.no_grad():
            losses = [float(module(b)[0]) for b in batches]
        return {"eval_loss": float(np.mean(losses))}


class _CaptionerModule(torch.nn.Module):
    def __init__(self, model, label_smoothing):
        super().__init__()
        self.model, self.label_smoothing = model, label_smoothing

    def forward(self, batch):
        input_ids = batch["input_ids"].clone()
        input_ids[:, 0] = self.model.config.text_config.bos_token_id  # as generate() does
        logits = self.model(pixel_values=batch["pixel_values"], input_ids=input_ids,
                            attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                               batch["labels"][:, 1:].reshape(-1), ignore_index=-100,
                               label_smoothing=self.label_smoothing)
        return loss, {}
