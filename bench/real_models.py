"""Cost of the qwen-vl recipe's model stages at real size, and what 100M samples cost.

    .venv/bin/python bench/real_models.py [--batches 1 8 32] [--threads 1] [--max-batch-seconds 300]
                                          [--mfu 0.4] [--models FOLDER] [--set capfilt.max_length=20 ...]
    .venv/bin/python bench/real_models.py --gpu-only [--gpu-batches 32 128 256]   # on a GPU machine
    .venv/bin/python bench/real_models.py --clip-load                               # CLIP loading memory only
    .venv/bin/python bench/real_models.py --sampler [--sampler-rows 96]             # captioner's sampler only

The models are ``models.real_size``'s (built on first use, then cached): open_clip ViT-L-14 and BLIP-large
captioner and ITM filter with random weights. Random weights cost what trained ones cost, with one exception said
below (caption length). Settings (image sizes, ``num_captions``, ``max_length``, prompt, ...) are the recipe's,
read from configs/qwen-vl.yaml (``--set`` changes them, as for ``vlcurate run``). Inputs are real Flickr8k photos,
decoded as the decode stage does (384-px squares), with their crowd captions.

Each stage is measured in a fresh process, the way a Ray actor holds one model stage, through the same classes
the stages call (``ClipScorer``, ``BlipCaptioner``, ``BlipItmFilter``):

* FLOPs per image: ``torch.utils.flop_counter.FlopCounterMode`` around one image's work, with formulas added for
  the two attention kernels it does not count on CPU (``nn.MultiheadAttention``'s fused path, which open_clip's
  ViT takes, and the CPU flash-attention kernel of ``scaled_dot_product_attention``); a multiply-add is 2 FLOPs.
  clip_score: image tower at 224 px and text tower (77 tokens) for one caption. capfilt captioner: the vision tower
  once per image (its embeddings are repeated, one row per caption to write) plus the
  generation of ``num_captions`` captions up to ``max_length`` tokens with the KV cache; random weights almost
  never draw the end token, so every caption runs to ``max_length`` (an upper bound: trained models stop at the
  end of the caption). capfilt ITM: the vision tower once per image at 384 px and the text encoder with
  cross-attention for the web caption and each synthetic caption (stand-ins: the photo's other crowd captions).
* Memory: the process's RSS after loading, and its peak (``ru_maxrss``) over loading and every batch that ran.
* CPU throughput: images/s per batch size with ``--threads`` torch threads (one CPU actor: one thread), after a
  warm-up. A batch size whose predicted time exceeds ``--max-batch-seconds`` is skipped, and said so.
* GPU (when ``torch.cuda.is_available()``): each stage the way its actor runs on CUDA (decoded pixels copied to
  the device as uint8, resized and normalised there, channels-last, bf16 autocast: the recipe's precision) at
  ``--gpu-batches``, after a warm-up batch: images/s, the achieved TFLOP/s (measured FLOPs x images/s), the peak
  CUDA memory allocated, and the forward batch ``resources.forward_batch: auto`` would pick from the measured
  memory per image; capfilt (captioner then ITM filter) as a whole; and JPEG decoding on the device (nvJPEG, as
  the decode stage does in a model actor on CUDA) against PIL's draft decode on one core. ``--gpu-only`` leaves the
  CPU throughput out (FLOPs are still counted on the CPU, one image per stage); ``--gpu-device cpu`` runs that
  section's code on the CPU, to check it where there is no GPU (its figures mean nothing).
* ``--sampler``: the captioner's per-row nucleus sampler alone (``models.blip.PerRowNucleusSampler``), per token
  step for ``--sampler-rows`` rows (images x captions) over BLIP's 30,524-token vocabulary, on flat scores
  (random weights: the nucleus is most of the vocabulary, the full sort decides) and peaked ones (a trained
  model's: the nucleus is among the most likely tokens), on the GPU section's device: milliseconds per step, and
  the share of it spent drawing each row's noise from its own generator on the host.
* ``--clip-load``: the peak and final RSS of loading the ViT-L-14 checkpoint, open_clip's way (a randomly
  initialised model, then the checkpoint copied in) against ``models.clip.load_open_clip``'s, each in a fresh
  process.

Then a sizing table for 100M samples reaching the model stages: GPU-hours on one H100 from the measured FLOPs at
an assumed model FLOP utilisation (``--mfu``) of its 989 TFLOP/s dense bf16 peak, and CPU core-hours from the
best measured CPU throughput.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import platform
import resource
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "configs" / "qwen-vl.yaml"
FLICKR = ROOT.parent / "shared" / "data" / "flickr8k"
H100_BF16_DENSE_TFLOPS = 989.0
SAMPLES_SIZED = 100_000_000
STAGES = ("clip_score", "captioner", "itm")
RECIPE_DECODE_SIZE = 384  # configs/qwen-vl.yaml's decode size
RECIPE_STAGE = {"clip_score": "clip_score", "captioner": "capfilt", "itm": "capfilt"}  # whose settings each uses


@dataclass
class Sample:
    key: str
    image: object  # PIL image, decoded as the decode stage does
    caption: str
    other_captions: list[str]
    data: bytes = b""  # the JPEG as stored in the shard


@dataclass
class StageReport:
    stage: str
    description: str
    gflop_per_image: float
    flop_parts: list[tuple[str, float]]  # (what, GFLOP per image), summing to gflop_per_image
    repeated_gflop: float  # of which spent encoding an image the stage already encoded
    load_seconds: float
    rss_loaded_gib: float
    rss_peak_gib: float
    cpu_images_per_s: dict[int, float] = field(default_factory=dict)
    cpu_skipped: dict[int, float] = field(default_factory=dict)  # batch size -> predicted seconds
    gpu_images_per_s: dict[int, float] = field(default_factory=dict)
    gpu_peak_gib: dict[int, float] = field(default_factory=dict)  # batch size -> peak CUDA memory allocated
    gpu_weights_gib: float | None = None
    gpu_auto_batch: int | None = None  # what forward_batch "auto" picks from the measured memory per image
    gpu_device: str = ""


# --- inputs ------------------------------------------------------------------------------------------------------


def flickr_samples(count: int, size: int) -> list[Sample]:
    """The first ``count`` Flickr8k samples (photo, caption, the photo's other crowd captions), cycling when a
    shard holds fewer."""
    from stages.image_decode import decode_square

    samples: list[Sample] = []
    for shard in sorted(FLICKR.glob("*.tar")):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as archive:
            for member in archive:
                key, _, suffix = member.name.partition(".")
                members.setdefault(key, {})[suffix] = archive.extractfile(member).read()
        for key, parts in members.items():
            captions = json.loads(parts["json"]).get("captions") or []
            caption = parts["txt"].decode()
            others = [c for c in captions if c != caption] or [caption]
            samples.append(Sample(key, decode_square(parts["jpg"], size), caption, others, parts["jpg"]))
            if len(samples) == count:
                return samples
    if not samples:
        raise SystemExit(f"no Flickr8k shards in {FLICKR}")
    return [samples[i % len(samples)] for i in range(count)]


# --- the three workloads, through the classes the stages use -----------------------------------------------------


def device_pixels(samples: list[Sample], settings, device: str):
    """What a model actor on CUDA feeds its model: the decode stage's pixels copied to the device as uint8, then
    resized and normalised there (channels-last on CUDA)."""
    from models.devices import is_cuda
    from models.imaging import pil_to_tensor
    from stages.model_scores import model_input

    images = [pil_to_tensor(s.image, "cpu") for s in samples]
    if is_cuda(device):
        images = [image.pin_memory().to(device, non_blocking=True) for image in images]
    return model_input(images, settings, device)


class ClipWorkload:
    repeated_gflop = 0.0

    def __init__(self, models: dict, settings: dict, device: str, precision: str, tensor_path: bool = False):
        from models.clip import ClipScorer

        self.scorer = ClipScorer(models["clip_model"], models["clip_pretrained"], "", device, precision)
        self.description = f"{models['clip_model']} at {settings['clip_score'].image_size} px, 1 caption"
        self.tensor_path, self.device = tensor_path, device

    def __call__(self, samples: list[Sample]) -> None:
        captions = [s.caption for s in samples]
        if self.tensor_path:
            self.scorer.score_pixels(device_pixels(samples, self.scorer.image_settings, self.device), captions)
        else:
            self.scorer.score([s.image for s in samples], captions)

    def flop_parts(self, sample: Sample, total: float) -> list[tuple[str, float]]:
        import torch

        pixels = self.scorer.preprocess(sample.image).unsqueeze(0).to(self.scorer.device)
        with torch.inference_mode():
            image = count_flops(lambda: self.scorer.model.encode_image(pixels)) / 1e9
        return [("image tower", image), ("text tower, 77 tokens", total - image)]


def blip_vision_gflop(model, processor, sample: Sample, device: str) -> float:
    """One pass of a BLIP model's vision tower on one image."""
    import torch

    pixels = processor(images=[sample.image], return_tensors="pt")["pixel_values"].to(device)
    with torch.inference_mode():
        return count_flops(lambda: model.vision_model(pixel_values=pixels)) / 1e9


class CaptionerWorkload:
    repeated_gflop = 0.0  # the vision tower encodes each image once

    def __init__(self, models: dict, settings: dict, device: str, precision: str, tensor_path: bool = False):
        from models.blip import BlipCaptioner

        p = settings["capfilt"]
        self.captioner = BlipCaptioner(models["captioner"], device, precision, p.prompt, p.top_p,
                                       p.repetition_penalty, p.min_length, p.max_length)
        self.num_captions, self.max_length, self.device = p.num_captions, p.max_length, device
        self.description = f"BLIP-large, {p.num_captions} captions, max_length {p.max_length}"
        self.tensor_path = tensor_path

    def __call__(self, samples: list[Sample]) -> None:
        seeds = list(range(len(samples)))
        if self.tensor_path:
            pixels = device_pixels(samples, self.captioner.image_settings, self.device)
            self.captioner.caption_pixels(pixels, self.num_captions, seeds)
        else:
            self.captioner.caption([s.image for s in samples], self.num_captions, seeds)

    def flop_parts(self, sample: Sample, total: float) -> list[tuple[str, float]]:
        """The vision tower runs once per image; the decoder writes ``num_captions`` captions from its output."""
        vision = blip_vision_gflop(self.captioner.model, self.captioner.processor, sample, self.device)
        return [("vision tower, 1 pass", vision),
                (f"generation, {self.num_captions} x {self.max_length} tokens", total - vision)]


class ItmWorkload:
    repeated_gflop = 0.0

    def __init__(self, models: dict, settings: dict, device: str, precision: str, tensor_path: bool = False):
        from models.blip import BlipItmFilter

        self.itm = BlipItmFilter(models["filter"], device, precision)
        self.device, self.tensor_path = device, tensor_path
        self.captions_per_image = 1 + settings["capfilt"].num_captions
        self.description = f"BLIP-large ITM at 384 px, {self.captions_per_image} captions"

    def __call__(self, samples: list[Sample]) -> None:
        images, texts, rows = [], [], []
        for row, sample in enumerate(samples):
            stand_ins = [sample.other_captions[i % len(sample.other_captions)]
                         for i in range(self.captions_per_image - 1)]
            images += [sample.image] * self.captions_per_image
            rows += [row] * self.captions_per_image
            texts += [sample.caption, *stand_ins]
        if self.tensor_path:
            pixels = device_pixels(samples, self.itm.image_settings, self.device)
            self.itm.match_probability_pixels(pixels, rows, texts)
        else:
            self.itm.match_probability(images, texts)

    def flop_parts(self, sample: Sample, total: float) -> list[tuple[str, float]]:
        vision = blip_vision_gflop(self.itm.model, self.itm.processor, sample, self.device)
        return [("vision tower, 1 pass", vision),
                (f"text encoder with cross-attention, {self.captions_per_image} pairs", total - vision)]


WORKLOADS = {"clip_score": ClipWorkload, "captioner": CaptionerWorkload, "itm": ItmWorkload}


# --- measuring ---------------------------------------------------------------------------------------------------


def attention_flop_formulas() -> dict:
    """FLOP formulas for the attention kernels FlopCounterMode leaves uncounted on CPU."""
    import torch
    from torch.utils.flop_counter import sdpa_flop_count

    def fused_multi_head_attention(query, key, value, embed_dim, *_, out_shape=None, **__):
        batch, query_length, width = query
        key_length = key[1]
        projections = 2 * batch * (2 * query_length + 2 * key_length) * width * width  # q, k, v in; out
        return projections + 4 * batch * query_length * key_length * width  # scores and weighted values

    def cpu_flash_attention(query, key, value, *_, out_shape=None, **__):
        return sdpa_flop_count(query, key, value)

    aten = torch.ops.aten
    return {aten._native_multi_head_attention: fused_multi_head_attention,
            aten._scaled_dot_product_flash_attention_for_cpu: cpu_flash_attention}


def count_flops(work) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=attention_flop_formulas())
    with counter:
        work()
    return counter.get_total_flops()


def rss_gib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux


def timed(work, samples: list[Sample], device: str) -> float:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    work(samples)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def cpu_throughput(work, samples: list[Sample], batches: list[int], max_seconds: float, report: StageReport,
                   seconds_per_image: float) -> None:
    """images/s per batch size; ``seconds_per_image`` (from the warm-up) predicts each batch's time first."""
    for batch in batches:
        predicted = seconds_per_image * batch
        if predicted > max_seconds:
            report.cpu_skipped[batch] = predicted
            continue
        seconds = timed(work, samples[:batch], "cpu")
        report.cpu_images_per_s[batch] = batch / seconds
        seconds_per_image = seconds / batch
        print(f"  {report.stage}: cpu batch {batch}: {batch / seconds:.3f} images/s", flush=True)


def gpu_throughput(kind: str, models: dict, settings: dict, samples: list[Sample], batches: list[int],
                   report: StageReport, device: str) -> None:
    """images/s per batch size the way the stage's actor runs on ``device`` (CUDA: uint8 pixels to the device,
    preprocessing there, channels-last, the recipe's precision: bf16 autocast), after a warm-up batch; the peak
    CUDA memory allocated per batch size, and the forward batch "auto" would pick."""
    import torch

    from models.devices import activation_budget, batch_size_for_memory, is_cuda

    cuda = is_cuda(device)
    work = WORKLOADS[kind](models, settings, device, settings[RECIPE_STAGE[kind]].precision, tensor_path=True)
    report.gpu_device = torch.cuda.get_device_name() if cuda else device
    weights = torch.cuda.memory_allocated() if cuda else 0
    report.gpu_weights_gib = weights / 2**30
    work(samples[:min(batches)])
    per_image = 0.0
    for batch in batches:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        report.gpu_images_per_s[batch] = batch / timed(work, samples[:batch], device)
        if cuda:
            peak = torch.cuda.max_memory_allocated()
            report.gpu_peak_gib[batch] = peak / 2**30
            per_image = max(per_image, (peak - weights) / batch)
        print(f"  {kind}: {device} batch {batch}: {report.gpu_images_per_s[batch]:.2f} images/s", flush=True)
    if cuda and per_image:
        free, total = torch.cuda.mem_get_info()
        allocated = torch.cuda.memory_allocated()
        budget = activation_budget(free, total, torch.cuda.memory_reserved() - allocated, allocated, share=1.0,
                                   fraction=0.8)  # the whole device for this stage, resources' default fraction
        report.gpu_auto_batch = batch_size_for_memory(budget, per_image, 1 << 20)


def decode_throughput(samples: list[Sample], size: int, device: str, seconds: float = 5.0) -> dict[str, float]:
    """JPEGs decoded to ``size``-px squares per second: on ``device`` (nvJPEG on CUDA, in the batched calls the
    decode stage makes in a model actor on CUDA) and with PIL's draft decode on one CPU core (the decode stage
    on CPU)."""
    import torch

    from models.devices import is_cuda
    from models.imaging import decode_on_device
    from stages.image_decode import decode_square

    datas = [s.data for s in samples]
    rates = {}
    for name, work in (("device", lambda: decode_on_device(datas, size, device, decode_square)),
                       ("cpu_pil_draft", lambda: [decode_square(d, size) for d in datas])):
        work()  # warm-up
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            work()
            count += len(datas)
        if is_cuda(device):
            torch.cuda.synchronize()
        rates[name] = count / (time.perf_counter() - started)
    return rates


def sampler_timing(rows: int, device: str, repeats: int = 5) -> dict[str, tuple[float, float, dict]]:
    """Per kind of scores (flat, peaked): the best milliseconds of one token step of the captioner's sampler for
    ``rows`` rows over BLIP's vocabulary, the milliseconds of drawing the rows' noise alone, and how the steps
    were drawn (from the most likely tokens, or the full sort)."""
    import torch

    from models.blip import PerRowNucleusSampler
    from models.devices import is_cuda

    vocabulary = 30524
    generator = torch.Generator().manual_seed(0)
    results = {}
    for kind, sharpness in (("flat", 1.0), ("peaked", 10.0)):
        scores = (torch.randn(rows, vocabulary, generator=generator) * sharpness).to(device)
        sampler = PerRowNucleusSampler(list(range(rows)), 0.9)
        step, noise = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            sampler(None, scores)
            if is_cuda(device):
                torch.cuda.synchronize()
            step.append(time.perf_counter() - started)
            started = time.perf_counter()
            sampler.exponential_noise(rows, vocabulary)
            noise.append(time.perf_counter() - started)
        results[kind] = (min(step) * 1e3, min(noise) * 1e3, dict(sampler.steps))
    return results


def measure_stage(kind: str, models: dict, overrides: list[str], args: argparse.Namespace) -> StageReport:
    """One stage in this (fresh) process: load, count FLOPs on one image (also the warm-up), time the batches."""
    import torch

    from pipeline.config import load_config

    torch.set_num_threads(args.threads)
    settings = {spec.name: spec.params for spec in load_config(RECIPE, overrides).stages}
    samples = flickr_samples(max([*args.batches, *(args.gpu_batches if args.gpu else [])]),
                             settings["decode"].size)
    started = time.perf_counter()
    work = WORKLOADS[kind](models, settings, "cpu", "fp32")
    load_seconds = time.perf_counter() - started
    rss_loaded = rss_gib()
    started = time.perf_counter()
    flops = count_flops(lambda: work(samples[:1]))
    warm_seconds = time.perf_counter() - started
    parts = work.flop_parts(samples[0], flops / 1e9)
    report = StageReport(kind, work.description, flops / 1e9, parts, work.repeated_gflop, load_seconds,
                         rss_loaded, 0.0)
    print(f"  {kind}: loaded in {load_seconds:.1f} s, {flops / 1e9:.1f} GFLOP/image, one image in "
          f"{warm_seconds:.1f} s (FLOP count and warm-up)", flush=True)
    if not args.gpu_only:
        cpu_throughput(work, samples, args.batches, args.max_batch_seconds, report, warm_seconds)
    report.rss_peak_gib = peak_rss_gib()
    if args.gpu:
        torch.set_num_threads(os.cpu_count() or 1)
        del work
        gpu_throughput(kind, models, settings, samples, args.gpu_batches, report, args.gpu_device)
    return report


def clip_load_memory(models: dict, loader: str) -> dict[str, float]:
    """RSS (GiB) before and after loading the CLIP checkpoint in this (fresh) process, and the peak over it."""
    import open_clip  # noqa: F401 - imported before the baseline is read, as it is by both loaders

    from models.clip import load_open_clip

    before = rss_gib()
    started = time.perf_counter()
    if loader == "open_clip":
        loaded = open_clip.create_model_and_transforms(models["clip_model"], pretrained=models["clip_pretrained"])
    else:
        loaded = load_open_clip(models["clip_model"], models["clip_pretrained"])
    seconds = time.perf_counter() - started
    after = rss_gib()  # with the model still held
    del loaded
    return {"seconds": seconds, "before": before, "after": after, "peak": peak_rss_gib()}


def print_clip_load(models: dict) -> None:
    context = multiprocessing.get_context("spawn")
    print(f"\nLoading {models['clip_model']} from {models['clip_pretrained']} (each in a fresh process, back to back):")
    print(f"{'loader':<44}{'seconds':>9}{'RSS before':>12}{'RSS after':>11}{'RSS peak':>10}")
    for loader, what in (("open_clip", "open_clip (random init, then copy)"),
                         ("vlcurate", "models.clip.load_open_clip (meta + assign)")):
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            m = pool.submit(clip_load_memory, models, loader).result()
        print(f"{what:<44}{m['seconds']:>9.1f}{m['before']:>12.2f}{m['after']:>11.2f}{m['peak']:>10.2f}")
    print("  RSS in GiB; the peak is ru_maxrss of the process")


def measure_in_fresh_process(kind: str, models: dict, overrides: list[str], args) -> StageReport:
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(measure_stage, kind, models, overrides, args).result()


# --- tables ------------------------------------------------------------------------------------------------------


def print_stage_table(reports: list[StageReport], args) -> None:
    batch_columns = "".join(f"{f'img/s b{b}':>12}" for b in args.batches)
    print(f"\nPer model stage, CPU fp32, {args.threads} torch thread(s) (one actor):")
    print(f"{'stage':<11}{'what':<44}{'GFLOP/img':>10}{'load s':>8}{'RSS load':>9}{'RSS peak':>9}{batch_columns}")
    for r in reports:
        rates = "".join(f"{r.cpu_images_per_s[b]:>12.3f}" if b in r.cpu_images_per_s else f"{'skipped':>12}"
                        for b in args.batches)
        print(f"{r.stage:<11}{r.description:<44}{r.gflop_per_image:>10.1f}{r.load_seconds:>8.1f}"
              f"{r.rss_loaded_gib:>9.2f}{r.rss_peak_gib:>9.2f}{rates}")
    for r in reports:
        for batch, predicted in r.cpu_skipped.items():
            print(f"  {r.stage}: batch {batch} not run (predicted {predicted:.0f} s > --max-batch-seconds "
                  f"{args.max_batch_seconds:.0f})")
        parts = "; ".join(f"{what} {gflop:.1f}" for what, gflop in r.flop_parts)
        print(f"  {r.stage} GFLOP/image: {parts}")
    print("  RSS in GiB: after loading, and the peak over loading and the batches run; BLIP's safetensors weights "
          "are memory-mapped and count once touched")


def print_gpu_table(reports: list[StageReport], args, decode_rates: dict[str, float] | None) -> None:
    device = next((r.gpu_device for r in reports if r.gpu_device), args.gpu_device)
    print(f"\nPer model stage on {device}, the stage's CUDA path (uint8 pixels to the device, preprocessing there, "
          f"channels-last, bf16 autocast):")
    print(f"{'stage':<11}{'batch':>6}{'img/s':>10}{'TFLOP/s':>9}{'peak GiB':>10}")
    by_stage = {r.stage: r for r in reports}
    for r in reports:
        for batch, rate in r.gpu_images_per_s.items():
            peak = r.gpu_peak_gib.get(batch)
            print(f"{r.stage:<11}{batch:>6}{rate:>10.1f}{rate * r.gflop_per_image / 1e3:>9.1f}"
                  f"{peak if peak is not None else float('nan'):>10.1f}")
        if r.gpu_auto_batch:
            print(f"  {r.stage}: weights {r.gpu_weights_gib:.2f} GiB; forward_batch auto would pick "
                  f"{r.gpu_auto_batch} images (80% of the free memory)")
    if "captioner" in by_stage and "itm" in by_stage:  # one capfilt actor runs both models on each batch
        captioner, itm = by_stage["captioner"], by_stage["itm"]
        gflop = captioner.gflop_per_image + itm.gflop_per_image
        for batch in captioner.gpu_images_per_s:
            if batch in itm.gpu_images_per_s:
                rate = 1 / (1 / captioner.gpu_images_per_s[batch] + 1 / itm.gpu_images_per_s[batch])
                peaks = [r.gpu_peak_gib[batch] for r in (captioner, itm) if batch in r.gpu_peak_gib]
                print(f"{'capfilt':<11}{batch:>6}{rate:>10.1f}{rate * gflop / 1e3:>9.1f}"
                      f"{max(peaks, default=float('nan')):>10.1f}  (captioner then ITM filter; peak: the larger)")
    if decode_rates:
        print(f"JPEG decode to {RECIPE_DECODE_SIZE}-px squares: {decode_rates['device']:.0f} images/s on the device, "
              f"{decode_rates['cpu_pil_draft']:.0f} images/s with PIL draft on one CPU core")


def print_sizing_table(reports: list[StageReport], args) -> None:
    effective = H100_BF16_DENSE_TFLOPS * args.mfu * 1e12
    print(f"\nSizing for {SAMPLES_SIZED / 1e6:.0f}M samples reaching the model stages (the rules drop a share "
          f"first: scale by the share they keep)")
    print(f"ASSUMPTION: H100 at {args.mfu:.0%} model FLOP utilisation of {H100_BF16_DENSE_TFLOPS:.0f} TFLOP/s "
          f"dense bf16 = {effective / 1e12:.0f} TFLOP/s effective")
    print(f"{'stage':<11}{'GFLOP/img':>10}{'H100 GPU-h':>12}{'CPU img/s/core':>16}{'CPU core-h':>14}")
    totals = {"flop": 0.0, "gpu": 0.0, "cpu": 0.0}
    for r in reports:
        gpu_hours = SAMPLES_SIZED * r.gflop_per_image * 1e9 / effective / 3600
        per_core = max(r.cpu_images_per_s.values(), default=0.0) / args.threads
        core_hours = SAMPLES_SIZED / per_core / 3600 if per_core else float("nan")
        totals["flop"] += r.gflop_per_image
        totals["gpu"] += gpu_hours
        totals["cpu"] += core_hours
        print(f"{r.stage:<11}{r.gflop_per_image:>10.1f}{gpu_hours:>12,.0f}{per_core:>16.4f}{core_hours:>14,.0f}")
    print(f"{'total':<11}{totals['flop']:>10.1f}{totals['gpu']:>12,.0f}{'':>16}{totals['cpu']:>14,.0f}")
    repeated = sum(r.repeated_gflop for r in reports)
    if repeated:
        print(f"of which {repeated:.1f} GFLOP/image ({repeated / totals['flop']:.0%}) encode an image a stage "
              f"already encoded")


def print_machine(args) -> None:
    import torch

    load = os.getloadavg()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}; torch {torch.__version__}; "
          f"CUDA {'yes: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="CPU batch sizes")
    parser.add_argument("--gpu-batches", type=int, nargs="+", default=[32, 128], help="GPU batch sizes")
    parser.add_argument("--gpu-only", action="store_true", help="on a GPU machine: leave the CPU throughput out")
    parser.add_argument("--gpu-device", default="cuda",
                        help="device of the GPU section; 'cpu' runs its code without a GPU (a check, not a figure)")
    parser.add_argument("--clip-load", action="store_true", help="only compare the memory of CLIP loading")
    parser.add_argument("--sampler", action="store_true", help="only time the captioner's sampler")
    parser.add_argument("--sampler-rows", type=int, default=96, help="rows of a sampler step (images x captions)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (one CPU actor: 1)")
    parser.add_argument("--max-batch-seconds", type=float, default=300.0,
                        help="skip a CPU batch size predicted to take longer")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOP utilisation on the H100")
    parser.add_argument("--models", default=None, help="models.real_size folder (default: its cache folder)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.KEY=VALUE",
                        help="change a recipe setting, as for vlcurate run")
    args = parser.parse_args()
    import torch

    from models.devices import is_cuda
    from models.real_size import real_size_models

    args.gpu = torch.cuda.is_available() if is_cuda(args.gpu_device) else True
    print_machine(args)
    if args.sampler:
        device = args.gpu_device if args.gpu else "cpu"
        print(f"Captioner sampler, {args.sampler_rows} rows x 30,524 tokens, scores on {device}, "
              f"{torch.get_num_threads()} torch threads:")
        for kind, (step, noise, ways) in sampler_timing(args.sampler_rows, device).items():
            print(f"  {kind:<7} {step:8.1f} ms per token step, of which {noise:.1f} ms drawing the rows' noise; {ways}")
        return
    started = time.perf_counter()
    models = real_size_models(args.models)
    models.pop("built")
    print(f"models ready in {time.perf_counter() - started:.1f} s")
    if args.clip_load:
        print_clip_load(models)
        return
    reports = []
    for kind in args.stages:
        reports.append(measure_in_fresh_process(kind, models, args.overrides, args))
    if not args.gpu_only:
        print_stage_table(reports, args)
    if args.gpu:
        rates = decode_throughput(flickr_samples(64, RECIPE_DECODE_SIZE), RECIPE_DECODE_SIZE, args.gpu_device)
        print_gpu_table(reports, args, rates)
    print_sizing_table(reports, args)
    print_machine(args)


if __name__ == "__main__":
    main()
