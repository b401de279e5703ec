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


def blip_image_settings(processor) -> tuple[int, list[float], list[float]]:
    """(square side, mean, std) of a BLIP processor's image preprocessing, for ``normalized_pixels``."""
    image_processor = processor.image_processor
    size = image_processor.size
    side = size if isinstance(size, int) else size["height"]  # {"height": 384, "width": 384}: square
    return side, list(image_processor.image_mean), list(image_processor.image_std)


def on_device(model, device: str):
    """The model on ``device``; on CUDA in channels-last memory format (the vision tower's patch convolution)."""
    from models.devices import is_cuda

    return model.to(memory_format=torch.channels_last) if is_cuda(device) else model


class BlipCaptioner:
    def __init__(self, name_or_dir: str, device: str = "cpu", precision: str = "fp32", prompt: str = "a picture of ",
                 top_p: float = 0.9, repetition_penalty: float = 1.1, min_length: int = 5, max_length: int = 30):
        from transformers import BlipForConditionalGeneration

        self.model, self.processor = load_blip(BlipForConditionalGeneration, name_or_dir, device)
        self.model = on_device(self.model, device)
        self.device, self.precision, self.prompt = device, precision, prompt
        self.generation = dict(do_sample=True, top_p=top_p, repetition_penalty=repetition_penalty,
                               min_length=min_length, max_length=max_length)
        words = [re.escape(w) for w in prompt.split()]
        self._prompt_prefix = re.compile(r"^\s*" + r"\s+".join(words) + r"\s*", re.IGNORECASE) if words else None
        self.image_settings = blip_image_settings(self.processor)

    def strip_prompt(self, text: str) -> str:
        """Generated text starts with the prompt ("a picture of a dog ..."): keep only what follows."""
        text = " ".join(text.split())
        return self._prompt_prefix.sub("", text, count=1).strip() if self._prompt_prefix else text.strip()

    @torch.inference_mode()
    def caption(self, images: list[Image.Image], per_image: int, seeds: list[int]) -> list[list[str]]:
        """``per_image`` nucleus-sampled captions for each image; image ``i``'s captions depend only on the image
        and ``seeds[i]``, not on which other images share the batch."""
        if not images:
            return []
        pixel_values = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        return self.caption_pixels(pixel_values, per_image, seeds)

    @torch.inference_mode()
    def caption_pixels(self, pixel_values: torch.Tensor, per_image: int, seeds: list[int]) -> list[list[str]]:
        """``caption`` from preprocessed pixel values (B, 3, 384, 384) already on the device.

        The vision tower encodes each image once; its embeddings are repeated, one row per caption to write, for
        the text decoder (what ``BlipForConditionalGeneration.generate`` does with its own pixel rows, without
        encoding an image ``per_image`` times)."""
        from transformers import LogitsProcessorList

        count = pixel_values.shape[0]
        if not count or not per_image:
            return [[] for _ in range(count)]
        row_seeds = [seed * 1_000 + copy for seed in seeds for copy in range(per_image)]
        sampler = PerRowNucleusSampler(row_seeds, self.generation["top_p"])
        settings = {k: v for k, v in self.generation.items() if k not in ("do_sample", "top_p")}
        text_config = self.model.config.text_config
        prompt = self.processor(text=[self.prompt], return_tensors="pt")["input_ids"].to(self.device)
        prompt[:, 0] = text_config.bos_token_id  # the decoder starts from BOS; the closing [SEP] is dropped
        input_ids = prompt[:, :-1].expand(count * per_image, -1).contiguous()
        with autocast_context(self.device, self.precision):
            image_embeds = self.model.vision_model(pixel_values=pixel_values).last_hidden_state
            image_embeds = image_embeds.repeat_interleave(per_image, dim=0)  # one row per caption to write
            image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
            output = self.model.text_decoder.generate(
                input_ids=input_ids, eos_token_id=text_config.sep_token_id, pad_token_id=text_config.pad_token_id,
                encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask, do_sample=False,
                logits_processor=LogitsProcessorList([sampler]), **settings)
        texts = [self.strip_prompt(t) for t in self.processor.batch_decode(output, skip_special_tokens=True)]
        return [texts[i * per_image:(i + 1) * per_image] for i in range(count)]


class PerRowNucleusSampler:
    """Nucleus sampling with one random generator per generated sequence, as a logits processor for greedy
    decoding: each row's token is drawn with its own generator and made the only finite logit. Rows sample the
    same whatever batch they are in (``generate``'s own sampling shares one generator across the batch).

    A row's draw is ``torch.multinomial``'s on the nucleus (the probabilities sorted in descending order, those
    after the smallest prefix reaching ``top_p`` set to 0): the first position of the largest probability /
    Exp(1) noise, the noise being ``vocabulary`` draws from the row's generator, in sorted order. The rows are
    drawn together: only the noise is generated row by row (each from its own generator), and the full sort is
    avoided where the nucleus lies, unambiguously, among the ``CANDIDATES`` most likely tokens (``topk``, on the
    scores' device): within it the probabilities strictly decrease, so its order does not depend on how ties are
    sorted, and the running sum passes ``top_p`` by ``MARGIN`` before the candidates end, so no later token can
    be in it whatever rounding the running sum has (a row whose candidates hold under a quarter of ``top_p`` goes
    to the full sort at once). Either way a row gets the token ``torch.multinomial`` would
    draw with its generator from the sorted nucleus, and the generator advances as much."""

    CANDIDATES = (64, 1024)
    MARGIN = 1e-5  # far above float32 rounding of a running sum of probabilities (about 1e-7)

    def __init__(self, seeds: list[int], top_p: float):
        if not top_p > 0.0:
            raise ValueError(f"top_p must be above 0 (an empty nucleus), got {top_p}")
        self.generators = []
        for seed in seeds:
            generator = torch.Generator(device="cpu")
            generator.manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
            self.generators.append(generator)
        self.top_p = top_p
        self.steps = {"candidates": 0, "full_sort": 0}  # how each token step was drawn
        self._noise: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probabilities = scores.float().softmax(dim=-1)
        if not bool(torch.isfinite(probabilities).all()):
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        noise = self.exponential_noise(*probabilities.shape)
        tokens = None if bool((noise == 0).any()) else self.from_candidates(probabilities, noise)
        if tokens is None:
            tokens = self.from_full_sort(probabilities.cpu(), noise)
            self.steps["full_sort"] += 1
        else:
            self.steps["candidates"] += 1
        forced = torch.full_like(scores, float("-inf"))
        forced.scatter_(1, tokens.to(scores.device).unsqueeze(1), 0.0)
        return forced

    def exponential_noise(self, rows: int, vocabulary: int) -> torch.Tensor:
        """(rows, vocabulary) Exp(1) draws, row ``r`` from generator ``r`` (what ``torch.multinomial`` draws)."""
        if self._noise is None or self._noise.shape != (rows, vocabulary):
            self._noise = torch.empty((rows, vocabulary), dtype=torch.float32)
        for row, generator in enumerate(self.generators[:rows]):
            self._noise[row].exponential_(generator=generator)
        return self._noise

    def from_candidates(self, probabilities: torch.Tensor, noise: torch.Tensor) -> torch.Tensor | None:
        """Every row's token from its most likely tokens alone, or None when some row's nucleus is not
        unambiguously among them (then the full sort decides)."""
        vocabulary = probabilities.shape[-1]
        for count in self.CANDIDATES:
            if count >= vocabulary:
                return None
            values, indices = (t.cpu() for t in probabilities.topk(count, dim=-1))
            cumulative = values.cumsum(dim=-1)
            reached = cumulative >= self.top_p + self.MARGIN
            last = reached.int().argmax(dim=-1)  # the nucleus ends at or before this position
            ties = values[:, :-1] <= values[:, 1:]
            first_tie = torch.where(ties.any(dim=-1), ties.int().argmax(dim=-1), count - 1)
            if bool((reached.any(dim=-1) & (last < count - 1) & (first_tie > last)).all()):
                weights = values * ((cumulative - values) < self.top_p)
                picks = (weights / noise[:, :count]).argmax(dim=-1, keepdim=True)
                return indices.gather(1, picks).squeeze(1)
            if float(cumulative[:, -1].min()) < self.top_p / 4:  # a flat row: its nucleus is far larger
                return None
        return None

    def from_full_sort(self, probabilities: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        sorted_probs, order = probabilities.sort(dim=-1, descending=True)
        cumulative = sorted_probs.cumsum(dim=-1)
        keep = (cumulative - sorted_probs) < self.top_p  # the smallest prefix reaching top_p (at least one)
        picks = ((sorted_probs * keep) / noise).argmax(dim=-1, keepdim=True)
        return order.gather(1, picks).squeeze(1)


class BlipItmFilter:
    def __init__(self, name_or_dir: str, device: str = "cpu", precision: str = "fp32"):
        from transformers import BlipForImageTextRetrieval

        self.model, self.processor = load_blip(BlipForImageTextRetrieval, name_or_dir, device)
        self.model = on_device(self.model, device)
        self.device, self.precision = device, precision
        self.image_settings = blip_image_settings(self.processor)

    @torch.inference_mode()
    def match_probability(self, images: list[Image.Image], captions: list[str]) -> list[float]:
        """p(match) = softmax of the ITM head's two logits, one per (image, caption) pair."""
        if not images:
            return []
        # The same image is often paired with several captions (web + synthetic): preprocess and encode it once.
        unique: dict[int, int] = {}
        for image in images:
            unique.setdefault(id(image), len(unique))
        distinct = list({id(image): image for image in images}.values())
        pixel_values = self.processor(images=distinct, return_tensors="pt")["pixel_values"].to(self.device)
        return self.match_probability_pixels(pixel_values, [unique[id(image)] for image in images], captions)

    @torch.inference_mode()
    def match_probability_pixels(self, pixel_values: torch.Tensor, rows: list[int], captions: list[str]) -> list[float]:
        """``match_probability`` from preprocessed pixel values of distinct images already on the device: pair
        ``k`` is image ``rows[k]`` with ``captions[k]``; each image is encoded once."""
        if not captions:
            return []
        text = self.processor(text=captions, return_tensors="pt", padding=True, truncation=True).to(self.device)
        rows = torch.tensor(rows, device=self.device)
        with autocast_context(self.device, self.precision):
            image_embeds = self.model.vision_model(pixel_values=pixel_values).last_hidden_state[rows]
            logits = itm_logits(self.model, image_embeds, text["input_ids"], text["attention_mask"])
        return logits.float().softmax(dim=-1)[:, 1].tolist()


def itm_logits(model, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """The ITM head on (image, text) pairs, as ``BlipForImageTextRetrieval(use_itm_head=True)`` computes it, with
    the image attention mask on the images' device (shared by the filter stage and the ITM trainer)."""
    image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    hidden = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                                encoder_attention_mask=image_mask).last_hidden_state
    return model.itm_head(hidden[:, 0, :])
