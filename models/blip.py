"""BLIP CapFilt models (transformers): a captioner that writes synthetic captions and an ITM filter."""

from __future__ import annotations

import re

import torch
from PIL import Image

from models.devices import autocast_context


class BlipLoadError(RuntimeError):
    """A BLIP model or processor could not be loaded; the message names the setting to fix."""


def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_blip(model_class, name_or_dir: str, device: str):
    """``from_pretrained`` for a hub name (``Salesforce/blip-itm-large-coco``) or a local directory alike."""
    from transformers import BlipProcessor

    _quiet_transformers()
    try:
        processor = BlipProcessor.from_pretrained(name_or_dir)
        model = model_class.from_pretrained(name_or_dir).to(device).eval()
    except (OSError, ValueError) as exc:
        raise BlipLoadError(f"cannot load BLIP model {name_or_dir!r}: {exc}") from None
    return model, processor


class BlipCaptioner:
    def __init__(self, name_or_dir: str, device: str = "cpu", precision: str = "fp32", prompt: str = "a picture of ",
                 top_p: float = 0.9, repetition_penalty: float = 1.1, min_length: int = 5, max_length: int = 30):
        from transformers import BlipForConditionalGeneration

        self.model, self.processor = load_blip(BlipForConditionalGeneration, name_or_dir, device)
        self.device, self.precision, self.prompt = device, precision, prompt
        self.generation = dict(do_sample=True, top_p=top_p, repetition_penalty=repetition_penalty,
                               min_length=min_length, max_length=max_length)
        words = [re.escape(w) for w in prompt.split()]
        self._prompt_prefix = re.compile(r"^\s*" + r"\s+".join(words) + r"\s*", re.IGNORECASE) if words else None

    def strip_prompt(self, text: str) -> str:
        """Generated text starts with the prompt ("a picture of a dog ..."): keep only what follows."""
        text = " ".join(text.split())
        return self._prompt_prefix.sub("", text, count=1).strip() if self._prompt_prefix else text.strip()

    @torch.inference_mode()
    def caption(self, images: list[Image.Image], per_image: int, seed: int) -> list[list[str]]:
        """``per_image`` nucleus-sampled captions for each image, reproducible for a given ``seed``."""
        if not images:
            return []
        inputs = self.processor(images=images, text=[self.prompt] * len(images), return_tensors="pt").to(self.device)
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            with autocast_context(self.device, self.precision):
                output = self.model.generate(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"],
                                             num_return_sequences=per_image, **self.generation)
        finally:
            torch.random.set_rng_state(generator_state)
        texts = [self.strip_prompt(t) for t in self.processor.batch_decode(output, skip_special_tokens=True)]
        return [texts[i * per_image:(i + 1) * per_image] for i in range(len(images))]


class BlipItmFilter:
    def __init__(self, name_or_dir: str, device: str = "cpu", precision: str = "fp32"):
        from transformers import BlipForImageTextRetrieval

        self.model, self.processor = load_blip(BlipForImageTextRetrieval, name_or_dir, device)
        self.device, self.precision = device, precision

    @torch.inference_mode()
    def match_probability(self, images: list[Image.Image], captions: list[str]) -> list[float]:
        """p(match) = softmax of the ITM head's two logits, one per (image, caption) pair."""
        if not images:
            return []
        inputs = self.processor(images=images, text=captions, return_tensors="pt", padding=True,
                                truncation=True).to(self.device)
        with autocast_context(self.device, self.precision):
            image_embeds = self.model.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
            logits = itm_logits(self.model, image_embeds, inputs["input_ids"], inputs["attention_mask"])
        return logits.float().softmax(dim=-1)[:, 1].tolist()


def itm_logits(model, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """The ITM head on (image, text) pairs, as ``BlipForImageTextRetrieval(use_itm_head=True)`` computes it, with
    the image attention mask on the images' device (shared by the filter stage and the ITM trainer)."""
    image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    hidden = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                                encoder_attention_mask=image_mask).last_hidden_state
    return model.itm_head(hidden[:, 0, :])
