"""The BLIP ITM filter task: BlipForImageTextRetrieval trained with the contrastive and matching losses; its
export is ``capfilt``'s ``filter``."""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np
import torch
import torch.nn.functional as F

from models.training.blip_base import BlipModelSettings, BlipTask
from models.training.data import raw_columns


@dataclasses.dataclass
class BlipItmSettings(BlipModelSettings):
    itc_temperature: float = 0.07  # initial; learnable, clamped to [0.001, 0.5]
    # Negatives are drawn from a mix of the contrastive-similarity distribution (hard) and a uniform one: a model
    # trained from scratch learns nothing from hard negatives alone (its similarities are still noise).
    hard_negative_mix: float = 0.5


class BlipItmTask(BlipTask):
    """BLIP ITM filter (BlipForImageTextRetrieval): image-text contrastive loss plus image-text matching with
    hard negatives mined from the batch by contrastive similarity (transformers computes no loss for it)."""

    name = "blip-itm"
    Settings = BlipItmSettings
    model_class_name = "BlipForImageTextRetrieval"

    def preprocess(self, batch):
        images, captions = raw_columns(batch)
        text = self.processor().tokenizer(captions, padding="max_length", truncation=True,
                                          max_length=self.settings.max_length, return_tensors="np")
        caption_ids = np.array([zlib.crc32(c.strip().lower().encode()) for c in captions], dtype=np.int64)
        return {"pixel_values": self.images(images), "input_ids": text["input_ids"].astype(np.int64),
                "attention_mask": text["attention_mask"].astype(np.int64), "caption_id": caption_ids}

    def build(self):
        return _ItmModule(self.build_model(), self.settings.itc_temperature, self.settings.hard_negative_mix)

    def after_step(self, module):
        with torch.no_grad():
            module.temperature.clamp_(0.001, 0.5)

    def evaluate(self, module, batches):
        """AUC of p(match) separating true pairs from shuffled ones (captions rolled by one)."""
        from models.blip import itm_logits

        if not batches:
            return {}
        module.eval()
        matched, shuffled = [], []
        with torch.no_grad():
            for batch in batches:
                if len(batch["input_ids"]) < 2:
                    continue
                embeds = module.model.vision_model(pixel_values=batch["pixel_values"]).last_hidden_state
                for ids, mask, store in ((batch["input_ids"], batch["attention_mask"], matched),
                                         (batch["input_ids"].roll(1, 0), batch["attention_mask"].roll(1, 0), shuffled)):
                    store += itm_logits(module.model, embeds, ids, mask).float().softmax(-1)[:, 1].tolist()
        return {"itm_auc": auc(matched, shuffled), "itm_best_threshold": best_threshold(matched, shuffled),
                "eval_pairs": len(matched)}


def best_threshold(positives: list[float], negatives: list[float]) -> float:
    """The p(match) threshold with the best balanced accuracy on held-out true vs shuffled pairs: a
    per-dataset value for capfilt.itm_threshold."""
    if not positives or not negatives:
        return 0.5
    pos, neg = np.asarray(positives), np.asarray(negatives)
    candidates = np.unique(np.concatenate([pos, neg]))
    accuracy = [((pos >= t).mean() + (neg < t).mean()) / 2 for t in candidates]
    return float(candidates[int(np.argmax(accuracy))])


def auc(positives: list[float], negatives: list[float]) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    if not positives or not negatives:
        return float("nan")
    pos, neg = np.asarray(positives)[:, None], np.asarray(negatives)[None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


class _ItmModule(torch.nn.Module):
    def __init__(self, model, temperature, hard_negative_mix):
        super().__init__()
        self.model, self.hard_negative_mix = model, hard_negative_mix
        self.temperature = torch.nn.Parameter(torch.tensor(float(temperature)))

    def forward(self, batch):
        from models.blip import itm_logits

        model = self.model
        image_embeds = model.vision_model(pixel_values=batch["pixel_values"]).last_hidden_state
        text_hidden = model.text_encoder(input_ids=batch["input_ids"],
                                         attention_mask=batch["attention_mask"]).last_hidden_state
        image_feat = F.normalize(model.vision_proj(image_embeds[:, 0, :]), dim=-1)
        text_feat = F.normalize(model.text_proj(text_hidden[:, 0, :]), dim=-1)
        sim_i2t = image_feat @ text_feat.T / self.temperature
        targets = torch.arange(len(sim_i2t), device=sim_i2t.device)
        loss_itc = (F.cross_entropy(sim_i2t.float(), targets) + F.cross_entropy(sim_i2t.T.float(), targets)) / 2

        # Hard negatives: sample by contrastive similarity, never the pair itself or an identical caption.
        same = batch["caption_id"][:, None] == batch["caption_id"][None, :]
        with torch.no_grad():
            uniform = torch.full_like(sim_i2t, 1.0 / len(sim_i2t), dtype=torch.float32)
            mix = self.hard_negative_mix
            weights_i2t = mix * F.softmax(sim_i2t.float(), dim=1) + (1 - mix) * uniform
            weights_t2i = mix * F.softmax(sim_i2t.T.float(), dim=1) + (1 - mix) * uniform
            weights_i2t = weights_i2t.masked_fill(same, 0) + 1e-8 * (~same)
            weights_t2i = weights_t2i.masked_fill(same, 0) + 1e-8 * (~same)
            negative_text = torch.multinomial(weights_i2t, 1).squeeze(1)
            negative_image = torch.multinomial(weights_t2i, 1).squeeze(1)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        all_images = torch.cat([image_embeds, image_embeds, image_embeds[negative_image]])
        all_ids = torch.cat([ids, ids[negative_text], ids])
        all_masks = torch.cat([mask, mask[negative_text], mask])
        logits = itm_logits(model, all_images, all_ids, all_masks)
        labels = torch.cat([torch.ones(len(ids)), torch.zeros(2 * len(ids))]).long().to(logits.device)
        # One positive per two negatives: weight the classes equally, so that p(match) = 0.5 is the natural
        # decision threshold (CapFilt's default) rather than the 1/3 prior.
        class_weights = torch.tensor([1.0, 2.0], device=logits.device)
        loss_itm = F.cross_entropy(logits.float(), labels, weight=class_weights)
        return loss_itc + loss_itm, {"loss_itc": float(loss_itc), "loss_itm": float(loss_itm)}
