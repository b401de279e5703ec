"""Model stages: CLIP image-text score and BLIP CapFilt. They run as Ray actor pools (one model per actor),
on a GPU where the cluster has one and on the CPU otherwise, with the same code; they only see samples that
passed every earlier stage.

On CPU a stage reads PIL images (the decode stage's pixels, or decoded here) and the models preprocess them as
their libraries do. On CUDA the images reach the device as uint8: JPEGs decoded there by nvJPEG (by the decode stage
running in the actor, or here when no decode stage ran), with PIL's decode, copied over, for every image nvJPEG
does not take; they are resized and normalised there, in channels-last layout, under the stage's autocast
precision; forward passes can be sized from the free GPU memory (``resources.forward_batch: auto``), and a pass
that runs out of device memory is run again at half the size."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import zlib
from typing import Callable

import polars as pl
import pyarrow as pa

from models.devices import (ForwardBatchSizer, is_cuda, out_of_memory_errors, release_cached_memory,
                            resolve_device)
from pipeline.settings import ConfigError
from stages.base import SampleBatch, Stage, StageParams, StageResources, first_reason
from stages.image_decode import DEVICE_PIXELS, HELD_PIXELS, PIXELS, batch_images, decode_square
from stages.semantic_dedup import EMBEDDING_COLUMN

LOG = logging.getLogger(__name__)


@dataclasses.dataclass
class ModelStageParams(StageParams):
    precision: str = "bf16"  # autocast dtype on GPU (bf16, fp16, fp32); always float32 on CPU
    image_size: int = 224  # decode size used when no decode stage ran before this one


@dataclasses.dataclass
class ModelResources(StageResources):
    device: str = "auto"  # "auto": CUDA when the actor has a GPU, else CPU
    num_gpus: float = 1.0  # per actor, fractional allowed; 0 on clusters without GPUs (checked before asking)
    pool_size: int | list[int] = 1  # actors in the pool; [min, max]: Ray Data grows and shrinks it with the load
    batch_size: int = 32  # rows Ray hands an actor at a time; images per forward pass unless forward_batch is set
    forward_batch: int | str = 0  # images per forward pass: 0 = batch_size; "auto": on CUDA as many as fit
    #                               memory_fraction of the GPU memory left to the actor (at most batch_size)
    memory_fraction: float = 0.8  # share of the free GPU memory (of this actor's num_gpus share) "auto" may use

    def __post_init__(self):
        if self.forward_batch != "auto" and (isinstance(self.forward_batch, str) or self.forward_batch < 0):
            raise ConfigError(f"forward_batch must be a number of images (0: batch_size) or 'auto', "
                              f"got {self.forward_batch!r}")
        if not 0.0 < self.memory_fraction <= 1.0:
            raise ConfigError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")

    @property
    def pool_bounds(self) -> tuple[int, int]:
        """(smallest, largest) number of actors: equal for a fixed pool."""
        bounds = [self.pool_size] * 2 if isinstance(self.pool_size, int) else list(self.pool_size)
        if len(bounds) != 2 or not 1 <= bounds[0] <= bounds[1]:
            raise ValueError(f"pool_size must be a number of actors >= 1 or [min, max] with 1 <= min <= max, "
                             f"got {self.pool_size!r}")
        return bounds[0], bounds[1]


class ModelStage(Stage):
    only_survivors = True
    uses_actor_pool = True
    Params = ModelStageParams
    Resources = ModelResources

    def __init__(self, params: ModelStageParams):
        super().__init__(params)
        if params.precision not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"precision must be bf16, fp16 or fp32, got {params.precision!r}")
        self._model = None
        self._sizer: ForwardBatchSizer | None = None
        self._warned_out_of_memory = False

    @property
    def device(self) -> str:
        return resolve_device(self.resources.device)

    @property
    def on_cuda(self) -> bool:
        return is_cuda(self.device)

    def batch_sizer(self) -> ForwardBatchSizer:
        """One per actor, kept across batches: what it learns of the memory per image holds for the model."""
        if self._sizer is None:
            r = self.resources
            self._sizer = ForwardBatchSizer(r.forward_batch, r.batch_size, self.device, share=r.num_gpus,
                                            fraction=r.memory_fraction)
        return self._sizer

    def stage_images(self, batch: SampleBatch) -> list:
        """The batch's images: PIL images on CPU; uint8 (3, S, S) tensors on the device on CUDA, from the decode
        stage (decoded on the device, or its pixels copied there) or, when it did not run, decoded on the device
        (``models.imaging.decode_on_device``)."""
        if not self.on_cuda:
            return batch_images(batch, self.params.image_size)
        return device_images(batch, self.params.image_size, self.device)

    def preparing_inputs(self, input_stages: list[Stage]) -> contextlib.ExitStack:
        """Around the stages that make this stage's inputs in its actor, and this stage's own work on them: on
        CUDA, a decode stage among them decodes on this stage's device (``DecodeStage.decoding_on``)."""
        stack = contextlib.ExitStack()
        device = self.device if self.on_cuda else None
        for stage in input_stages:
            decoding_on = getattr(stage, "decoding_on", None)
            if decoding_on is not None:
                stack.enter_context(decoding_on(device))
        return stack

    def forward_passes(self, batch: SampleBatch, work: Callable[[list, list, list], list]) -> list:
        """``work(images, captions, keys)`` (one result per image) over the batch, in forward passes of the size
        ``batch_sizer`` picks; the results in the batch's order.

        A pass that runs out of device memory is run again on the same images at half its size, after the
        allocator's cache is emptied, and no later pass is larger (one warning per actor); a pass of one image
        that runs out of memory raises, and the sample is recorded as failed. Captions and ITM scores do not
        depend on the pass sizes (each caption has its own seed); CLIP scores only by float32 rounding."""
        images = self.stage_images(batch)
        captions, keys = batch.captions, batch.keys
        sizer = self.batch_sizer()
        results: list = []
        start = 0
        while start < len(images):
            step = sizer.next_size(len(images) - start)
            part = slice(start, start + step)
            done = self._forward(work, sizer, step, images[part], captions[part], keys[part])
            if done is None:
                self._after_out_of_memory(sizer, step)
                continue
            results += done
            start += step
        return results

    @staticmethod
    def _forward(work, sizer: ForwardBatchSizer, step: int, images: list, captions: list, keys: list) -> list | None:
        """One pass, or None when it ran out of memory (returning drops the failed pass's tensors, which the
        exception's traceback holds, before the cache is emptied)."""
        try:
            with sizer.measure(step):
                return work(images, captions, keys)
        except out_of_memory_errors():
            if step <= 1:
                raise
        return None

    def _after_out_of_memory(self, sizer: ForwardBatchSizer, step: int) -> None:
        release_cached_memory(self.device)
        ceiling = sizer.shrink(step)
        if not self._warned_out_of_memory:
            self._warned_out_of_memory = True
            LOG.warning("%s: out of device memory with %d images per forward pass; passes of at most %d from now "
                        "on", self.name, step, ceiling)


def device_images(batch: SampleBatch, size: int, device: str) -> list:
    """uint8 (3, S, S) tensors on ``device``: the images the decode stage decoded on the device, its pixels
    copied over (pinned, asynchronous), or, for samples it did not decode, the image bytes decoded on the device
    (CPU PIL draft decode as the fallback per image)."""
    import torch

    from models.imaging import decode_on_device

    pixels = batch.annotation(PIXELS)
    sizes = batch.annotation("decode_size")
    handles = batch.annotation(DEVICE_PIXELS)
    images: list = [None] * len(batch.index)
    by_size: dict[int, list[int]] = {}
    missing = []
    for i in range(len(images)):
        if handles is not None and handles[i] is not None:
            images[i] = HELD_PIXELS.get(handles[i])
        elif pixels is not None and pixels[i] is not None:
            by_size.setdefault(sizes[i], []).append(i)
        else:
            missing.append(i)
    for side, rows in by_size.items():  # one host buffer and one copy per size (one size in practice)
        host = torch.frombuffer(bytearray(b"".join(pixels[i] for i in rows)), dtype=torch.uint8)
        host = host.view(len(rows), side, side, 3).permute(0, 3, 1, 2)  # NCHW view of HWC rows: channels-last
        if is_cuda(device):
            host = host.pin_memory()
        for i, image in zip(rows, host.to(device, non_blocking=True).unbind(0)):
            images[i] = image
    if missing:
        datas = batch.images
        for i, tensor in zip(missing, decode_on_device([datas[i] for i in missing], size, device, decode_square)):
            images[i] = tensor
    return images


def model_input(images: list, settings: tuple[int, list[float], list[float]], device: str):
    """A forward pass's pixel values from device images (uint8 tensors): stacked (resized to the model's size
    when the images are another size), normalised, channels-last on CUDA."""
    import torch

    from models.imaging import normalized_pixels

    side, mean, std = settings
    shapes = {tuple(image.shape) for image in images}
    if len(shapes) == 1:
        return normalized_pixels(torch.stack(images), side, mean, std, channels_last=is_cuda(device))
    return torch.cat([normalized_pixels(image.unsqueeze(0), side, mean, std, channels_last=is_cuda(device))
                      for image in images])


@dataclasses.dataclass
class ClipScoreParams(ModelStageParams):
    model: str = "ViT-L-14"
    pretrained: str = "openai"  # tag, checkpoint file, or empty with hf-hub:/local-dir: models
    model_config: str = ""  # JSON file or folder registering a custom open_clip architecture
    threshold: float = -1.0  # absolute minimum score; -1 keeps all (LAION used 0.28 with ViT-B/32)
    top_fraction: float = 0.0  # keep this fraction of the best-scored samples over the whole run (DataComp: 0.3)
    save_embeddings: bool = False  # save the image embeddings beside the manifest (float16), for semantic_dedup


class ClipScoreStage(ModelStage):
    """CLIP score: cosine similarity of the normalised image and caption embeddings (DataComp's definition)."""

    name = "clip_score"
    Params = ClipScoreParams
    # The embeddings column goes to embeddings/{stem}.npy, never into the manifest; null unless save_embeddings.
    columns = {"clip_score": pa.float32(), EMBEDDING_COLUMN: pa.list_(pa.float16())}
    thresholds = frozenset({"threshold", "top_fraction"})

    def __init__(self, params: ClipScoreParams):
        super().__init__(params)
        if not 0.0 <= params.top_fraction <= 1.0:
            raise ValueError(f"top_fraction must be between 0 and 1, got {params.top_fraction}")
        if not params.pretrained and not params.model.startswith(("hf-hub:", "local-dir:")):
            raise ValueError(
                f"CLIP model {params.model!r} needs 'pretrained': a tag such as 'openai', a checkpoint file, or "
                "use an 'hf-hub:'/'local-dir:' model; random weights would make every score meaningless"
            )

    def load(self):
        from models.clip import ClipScorer

        if self._model is None:
            p: ClipScoreParams = self.params
            self._model = ClipScorer(p.model, p.pretrained, p.model_config, self.device, p.precision)
        return self._model

    def annotate(self, batch: SampleBatch) -> dict[str, list]:
        scorer = self.load()

        def work(images: list, captions: list[str], _keys: list[str]) -> list[tuple]:
            if self.on_cuda:
                pair = scorer.score_and_embed_pixels(model_input(images, scorer.image_settings, self.device), captions)
            else:
                pair = scorer.score_and_embed(images, captions)
            embeddings = list(pair[1]) if self.params.save_embeddings else [None] * len(pair[0])
            return list(zip(pair[0], embeddings))

        results = self.forward_passes(batch, work)
        return {"clip_score": [score for score, _ in results], EMBEDDING_COLUMN: [e for _, e in results]}

    def reject_reason(self) -> pl.Expr:
        return first_reason((pl.col("clip_score") < self.params.threshold, "low_score"))


@dataclasses.dataclass
class CapFiltParams(ModelStageParams):
    captioner: str = "Salesforce/blip-image-captioning-large"  # hub name or local directory
    filter: str = "Salesforce/blip-itm-large-coco"
    num_captions: int = 3  # synthetic captions per image
    prompt: str = "a picture of "
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    min_length: int = 5
    max_length: int = 30
    seed: int = 0  # synthetic captions are reproducible per sample: reruns write the same outputs
    itm_threshold: float = 0.5  # a caption whose p(match) is below this is noise (BLIP: 0.5)
    policy: str = "replace"  # "replace": noisy web captions are replaced; "extra_pairs": passing synthetic
    #                          captions become additional (image, caption) pairs as well
    image_size: int = 384


class CapFiltStage(ModelStage):
    """BLIP CapFilt: a captioner writes synthetic captions; the ITM filter scores the web caption and every
    synthetic one; the image is dropped when no caption passes."""

    name = "capfilt"
    Params = CapFiltParams
    columns = {
        "capfilt_web_itm": pa.float32(),
        "capfilt_synthetic": pa.list_(pa.string()),
        "capfilt_synthetic_itm": pa.list_(pa.float32()),
    }
    thresholds = frozenset({"itm_threshold", "policy"})

    def __init__(self, params: CapFiltParams):
        super().__init__(params)
        if params.policy not in ("replace", "extra_pairs"):
            raise ValueError(f"policy must be 'replace' or 'extra_pairs', got {params.policy!r}")
        if not params.top_p > 0.0:
            raise ValueError(f"top_p must be above 0 (1: sample from every token), got {params.top_p}")

    def load(self):
        from models.blip import BlipCaptioner, BlipItmFilter

        if self._model is None:
            p: CapFiltParams = self.params
            captioner = BlipCaptioner(p.captioner, self.device, p.precision, p.prompt, p.top_p, p.repetition_penalty,
                                      p.min_length, p.max_length)
            self._model = captioner, BlipItmFilter(p.filter, self.device, p.precision)
        return self._model

    def annotate(self, batch: SampleBatch) -> dict[str, list]:
        captioner, itm = self.load()
        n = self.params.num_captions

        def work(images: list, captions: list[str], keys: list[str]) -> list[tuple]:
            seeds = [zlib.crc32(key.encode("utf-8", "surrogatepass")) ^ self.params.seed for key in keys]
            pair_texts: list[str] = []
            if self.on_cuda:
                pixel_values = model_input(images, captioner.image_settings, self.device)
                generated = captioner.caption_pixels(pixel_values, n, seeds)
                pair_texts = [text for caption, texts in zip(captions, generated) for text in [caption, *texts]]
                if itm.image_settings != captioner.image_settings:
                    pixel_values = model_input(images, itm.image_settings, self.device)
                rows = [row for row, texts in enumerate(generated) for _ in range(1 + len(texts))]
                probabilities = itm.match_probability_pixels(pixel_values, rows, pair_texts)
            else:
                generated = captioner.caption(images, n, seeds) if n else [[] for _ in images]
                pair_images = [image for image, texts in zip(images, generated)
                               for image in [image] * (1 + len(texts))]
                pair_texts = [text for caption, texts in zip(captions, generated) for text in [caption, *texts]]
                probabilities = itm.match_probability(pair_images, pair_texts)
            results, offset = [], 0
            for texts in generated:  # (web caption's p(match), synthetic captions, their p(match))
                results.append((probabilities[offset], texts, probabilities[offset + 1:offset + 1 + len(texts)]))
                offset += 1 + len(texts)
            return results

        results = self.forward_passes(batch, work)
        return {"capfilt_web_itm": [web for web, _, _ in results], "capfilt_synthetic": [t for _, t, _ in results],
                "capfilt_synthetic_itm": [scores for _, _, scores in results]}

    def reject_reason(self) -> pl.Expr:
        threshold = self.params.itm_threshold
        best_synthetic = pl.col("capfilt_synthetic_itm").list.max().fill_null(-math.inf)
        return first_reason(
            ((pl.col("capfilt_web_itm") < threshold) & (best_synthetic < threshold), "no_matching_caption"),
        )

    def output_captions(self, row: dict) -> list[str] | None:
        """Captions written for a kept sample: the first is its .txt, the others extra pairs (policy)."""
        if row.get("capfilt_web_itm") is None:
            return None
        threshold = self.params.itm_threshold
        passing = sorted(
            ((score, text) for text, score in zip(row["capfilt_synthetic"] or [], row["capfilt_synthetic_itm"] or [])
             if score >= threshold),
            reverse=True,
        )
        captions = [row["caption"]] if row["capfilt_web_itm"] >= threshold else []
        captions += [text for _, text in passing if text not in captions]
        if self.params.policy == "replace":
            captions = captions[:1]
        return captions or None
