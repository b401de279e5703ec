"""The built-in training tasks: CLIP, BLIP captioner, BLIP ITM filter, text-to-image diffusion.

Each task's export loads straight into its scoring stage: CLIP as ``clip_score`` (``local-dir:EXPORT`` or
``pretrained: EXPORT/checkpoint.pt`` with ``model_config: EXPORT/MODEL.json``), the BLIP captioner and filter
as ``capfilt``'s ``captioner``/``filter`` directories, closing BLIP's bootstrapping loop.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models.imaging import open_bounded
from models.training import TrainTask, raw_columns, read_samples, register

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def open_image(data: bytes) -> Image.Image:
    """Training images come from shards, which are untrusted: refused before decoding when too large."""
    with open_bounded(data) as image:
        return image.convert("RGB")


# ---- CLIP -------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ClipModelSettings:
    model: str = "vlcurate-tiny-clip"  # an open_clip name (ViT-B-32, ...) or the name of `architecture`
    architecture: dict[str, Any] = dataclasses.field(default_factory=dict)  # open_clip model config, for custom models
    pretrained: str = ""  # start from a tag or checkpoint; empty: from scratch
    augment: bool = True


def register_clip_architecture(settings: ClipModelSettings, folder: Path) -> None:
    """Make a custom architecture known to open_clip in this process (written as MODEL.json in ``folder``)."""
    import open_clip

    if settings.architecture:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{settings.model}.json"
        if not path.exists():
            path.write_text(json.dumps(settings.architecture))
        open_clip.add_model_config(path)


def clip_architecture(model: str) -> dict:
    import open_clip

    config = open_clip.get_model_config(model)
    if config is None:
        raise ValueError(f"unknown open_clip model {model!r}: give its architecture in model.architecture")
    return config


@register
class ClipTask(TrainTask):
    """open_clip with the symmetric contrastive loss (ClipLoss), learnable temperature clamped at 100."""

    name = "clip"
    Settings = ClipModelSettings

    def _ready(self):
        register_clip_architecture(self.settings, self.output / "model_config")
        import open_clip

        if not hasattr(self, "_transform"):
            size = clip_architecture(self.settings.model)["vision_cfg"]["image_size"]
            self._transform = open_clip.image_transform(size, is_train=self.settings.augment, mean=OPENAI_MEAN,
                                                        std=OPENAI_STD)
            self._tokenizer = open_clip.get_tokenizer(self.settings.model)

    def preprocess(self, batch):
        self._ready()
        images, captions = raw_columns(batch)
        return {"image": torch.stack([self._transform(open_image(b)) for b in images]).numpy(),
                "tokens": self._tokenizer(captions).numpy()}

    def build(self):
        import open_clip
        import ray.train

        self._ready()
        model = open_clip.create_model(self.settings.model, pretrained=self.settings.pretrained or None)
        context = ray.train.get_context()
        loss = open_clip.ClipLoss(gather_with_grad=True, rank=context.get_world_rank(),
                                  world_size=context.get_world_size())
        return _ClipModule(model, loss)

    def enable_grad_checkpointing(self, module):
        module.model.set_grad_checkpointing(True)

    def after_step(self, module):
        with torch.no_grad():
            module.model.logit_scale.clamp_(0, math.log(100))

    def evaluate(self, module, batches):
        if not batches:
            return {}
        module.eval()
        with torch.no_grad():
            images = torch.cat([module.model.encode_image(b["image"], normalize=True) for b in batches])
            texts = torch.cat([module.model.encode_text(b["tokens"], normalize=True) for b in batches])
        return {**retrieval_recall(images @ texts.T, "image_to_text"),
                **retrieval_recall(texts @ images.T, "text_to_image"), "eval_pairs": len(images)}

    def export(self, module, directory):
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in module.model.state_dict().items()}
        architecture = clip_architecture(self.settings.model)
        (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": architecture}))
        save_file(state, directory / "open_clip_model.safetensors")  # loads as local-dir:DIRECTORY
        torch.save({"state_dict": state}, directory / "checkpoint.pt")  # loads as pretrained=checkpoint.pt
        (directory / f"{self.settings.model}.json").write_text(json.dumps(architecture))  # model_config


class _ClipModule(torch.nn.Module):
    def __init__(self, model, loss):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, batch):
        image_features, text_features, logit_scale = self.model(batch["image"], batch["tokens"])[:3]
        loss = self.loss(image_features, text_features, logit_scale)
        return loss, {"logit_scale": float(logit_scale)}


def retrieval_recall(similarity: torch.Tensor, prefix: str, ks=(1, 5, 10)) -> dict[str, float]:
    """Recall@k when query i's true match is item i."""
    ranking = similarity.argsort(dim=1, descending=True)
    hits = ranking == torch.arange(len(similarity), device=similarity.device)[:, None]
    position = hits.float().argmax(dim=1)
    return {f"{prefix}_recall@{k}": float((position < k).float().mean()) for k in ks}


# ---- BLIP -------------------------------------------------------------------------------------------------------


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


class _BlipTask(TrainTask):
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


@register
class BlipCaptionerTask(_BlipTask):
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


@dataclasses.dataclass
class BlipItmSettings(BlipModelSettings):
    itc_temperature: float = 0.07  # initial; learnable, clamped to [0.001, 0.5]
    # Negatives are drawn from a mix of the contrastive-similarity distribution (hard) and a uniform one: a model
    # trained from scratch learns nothing from hard negatives alone (its similarities are still noise).
    hard_negative_mix: float = 0.5


@register
class BlipItmTask(_BlipTask):
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


# ---- diffusion --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DiffusionSettings:
    text_encoder: str = ""  # a CLIP export folder (local-dir layout) whose text tower conditions the UNet (frozen)
    sample_size: int = 32  # pixels (pixel space) or latent size (with a VAE)
    block_out_channels: list[int] = dataclasses.field(default_factory=lambda: [32, 64])
    layers_per_block: int = 1
    attention_head_dim: int = 8
    norm_num_groups: int = 8
    vae: str = ""  # an AutoencoderKL folder: train in its latent space; empty: pixel space
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    snr_gamma: float = 5.0  # Min-SNR weighting
    noise_offset: float = 0.05
    ema_decay: float = 0.999
    caption_dropout: float = 0.1  # empty captions, for classifier-free guidance at sampling time


def load_text_tower(text_encoder: str, device):
    """The frozen open_clip model whose per-token text features condition the UNet."""
    import open_clip

    if not text_encoder:
        raise ValueError("diffusion needs model.text_encoder: a CLIP export folder (vlcurate train clip ...)")
    model = open_clip.create_model("local-dir:" + str(text_encoder))
    model = model.to(device).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model, open_clip.get_tokenizer("local-dir:" + str(text_encoder))


def text_hidden_states(clip_model, tokens: torch.Tensor) -> torch.Tensor:
    """Per-token features of the CLIP text transformer (before pooling): (batch, context, width)."""
    cast_dtype = clip_model.transformer.get_cast_dtype()
    x = clip_model.token_embedding(tokens).to(cast_dtype) + clip_model.positional_embedding.to(cast_dtype)
    x = clip_model.transformer(x, attn_mask=clip_model.attn_mask)
    return clip_model.ln_final(x)


def build_unet(settings: DiffusionSettings, cross_attention_dim: int, channels: int):
    from diffusers import UNet2DConditionModel

    levels = len(settings.block_out_channels)
    return UNet2DConditionModel(
        sample_size=settings.sample_size, in_channels=channels, out_channels=channels,
        block_out_channels=tuple(settings.block_out_channels), layers_per_block=settings.layers_per_block,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        cross_attention_dim=cross_attention_dim, norm_num_groups=settings.norm_num_groups,
        attention_head_dim=settings.attention_head_dim,
    )


@register
class DiffusionTask(TrainTask):
    """Text-to-image diffusion: a diffusers UNet2DConditionModel with DDPMScheduler, conditioned on a frozen CLIP
    text tower; pixel space, or latent space with an AutoencoderKL; EMA, Min-SNR weighting, noise offset."""

    name = "diffusion"
    Settings = DiffusionSettings

    def pixel_size(self) -> int:
        if not self.settings.vae:
            return self.settings.sample_size
        from diffusers import AutoencoderKL

        vae_config = AutoencoderKL.load_config(self.settings.vae)
        return self.settings.sample_size * 2 ** (len(vae_config["block_out_channels"]) - 1)

    def preprocess(self, batch):
        import open_clip

        images, captions = raw_columns(batch)
        if not hasattr(self, "_tokenizer"):
            self._tokenizer = open_clip.get_tokenizer("local-dir:" + self.settings.text_encoder)
            self._size = self.pixel_size()
        rng = np.random.default_rng(zlib.crc32("\n".join(captions).encode()) ^ self.train.seed)  # reproducible
        captions = ["" if rng.random() < self.settings.caption_dropout else c for c in captions]
        pixels = [np.asarray(open_image(b).resize((self._size, self._size), Image.Resampling.BICUBIC),
                             dtype=np.float32) for b in images]
        image = np.stack(pixels).transpose(0, 3, 1, 2) / 127.5 - 1.0
        return {"image": image.astype(np.float32), "tokens": self._tokenizer(captions).numpy()}

    def build(self):
        from diffusers import AutoencoderKL, DDPMScheduler
        from diffusers.training_utils import EMAModel

        import ray.train.torch

        device = ray.train.torch.get_device()
        text_model, _ = load_text_tower(self.settings.text_encoder, device)
        vae = None
        if self.settings.vae:
            vae = AutoencoderKL.from_pretrained(self.settings.vae).to(device).eval()
            vae.requires_grad_(False)
        channels = vae.config.latent_channels if vae is not None else 3
        unet = build_unet(self.settings, text_model.transformer.width, channels)
        self.scheduler = DDPMScheduler(num_train_timesteps=self.settings.num_train_timesteps,
                                       beta_schedule=self.settings.beta_schedule)
        self.ema = EMAModel(unet.parameters(), decay=self.settings.ema_decay)
        return _DiffusionModule(unet, text_model, vae, self.scheduler, self.settings)

    def parameters(self, module):
        return list(module.unet.parameters())

    def enable_grad_checkpointing(self, module):
        module.unet.enable_gradient_checkpointing()

    def after_step(self, module):
        if self.ema.shadow_params[0].device != next(module.unet.parameters()).device:
            self.ema.to(next(module.unet.parameters()).device)
        self.ema.step(module.unet.parameters())

    def extra_state(self):
        return {"ema": self.ema.state_dict()}

    def load_extra_state(self, state):
        if "ema" in state:
            self.ema.load_state_dict(state["ema"])

    def evaluate(self, module, batches):
        """Denoising loss on held-out pairs with their own captions versus shuffled captions (same noise)."""
        if not batches:
            return {}
        module.eval()
        right, shuffled = [], []
        generator = torch.Generator(device="cpu").manual_seed(0)
        with torch.no_grad():
            for batch in batches:
                if len(batch["tokens"]) < 2:
                    continue
                for _ in range(3):  # three noise draws per batch, the same for both captions
                    noise_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
                    right.append(float(module.denoising_loss(batch["image"], batch["tokens"], noise_seed)))
                    shuffled.append(float(module.denoising_loss(batch["image"], batch["tokens"].roll(1, 0),
                                                                 noise_seed)))
        return {"eval_loss_right_caption": float(np.mean(right)),
                "eval_loss_shuffled_caption": float(np.mean(shuffled))}

    def export(self, module, directory):
        """diffusers folder layout: unet/ (EMA weights), scheduler/, text_encoder/ (the CLIP it was trained with)."""
        directory.mkdir(parents=True, exist_ok=True)
        unet = module.unet
        self.ema.store(unet.parameters())
        self.ema.copy_to(unet.parameters())
        unet.save_pretrained(directory / "unet")
        self.ema.restore(unet.parameters())
        self.scheduler.save_pretrained(directory / "scheduler")
        text_dir = directory / "text_encoder"
        shutil.copytree(self.settings.text_encoder, text_dir, dirs_exist_ok=True)
        (directory / "vlcurate_diffusion.json").write_text(json.dumps(
            {"sample_size": self.settings.sample_size, "vae": self.settings.vae,
             "pixel_size": self.pixel_size()}, indent=2))


class _DiffusionModule(torch.nn.Module):
    def __init__(self, unet, text_model, vae, scheduler, settings: DiffusionSettings):
        super().__init__()
        self.unet, self.settings, self.scheduler = unet, settings, scheduler
        self.frozen = [text_model, vae]  # not submodules: no gradients, not in the checkpoint

    def latents(self, image):
        vae = self.frozen[1]
        if vae is None:
            return image
        with torch.no_grad():
            return vae.encode(image).latent_dist.sample() * vae.config.scaling_factor

    def denoising_loss(self, image, tokens, noise_seed: int | None = None):
        from diffusers.training_utils import compute_snr

        with torch.no_grad():
            context = text_hidden_states(self.frozen[0], tokens)
        latents = self.latents(image)
        generator = torch.Generator(device=latents.device).manual_seed(noise_seed) if noise_seed is not None else None
        noise = torch.randn(latents.shape, generator=generator, device=latents.device)
        if self.settings.noise_offset:
            noise = noise + self.settings.noise_offset * torch.randn(
                (len(latents), latents.shape[1], 1, 1), generator=generator, device=latents.device)
        steps = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(latents),), generator=generator,
                              device=latents.device)
        noisy = self.scheduler.add_noise(latents, noise, steps)
        prediction = self.unet(noisy, steps, encoder_hidden_states=context).sample
        per_sample = F.mse_loss(prediction.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.settings.snr_gamma:
            snr = compute_snr(self.scheduler, steps)
            per_sample = per_sample * torch.clamp(snr, max=self.settings.snr_gamma) / snr
        return per_sample.mean()

    def forward(self, batch):
        return self.denoising_loss(batch["image"], batch["tokens"]), {}


def sample_images(model_dir: str, prompts: list[str], steps: int = 50, guidance: float = 3.0, seed: int = 0,
                  device: str = "cpu") -> list[Image.Image]:
    """Generate one image per prompt with an exported diffusion model (DDIM sampling, classifier-free guidance)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    directory = Path(model_dir)
    info = json.loads((directory / "vlcurate_diffusion.json").read_text())
    unet = UNet2DConditionModel.from_pretrained(directory / "unet").to(device).eval()
    scheduler = DDIMScheduler.from_pretrained(directory / "scheduler")
    scheduler.set_timesteps(steps)
    text_model, tokenizer = load_text_tower(str(directory / "text_encoder"), device)
    vae = AutoencoderKL.from_pretrained(info["vae"]).to(device).eval() if info["vae"] else None
    generator = torch.Generator(device="cpu").manual_seed(seed)
    size = info["sample_size"]
    latents = torch.randn((len(prompts), unet.config.in_channels, size, size), generator=generator).to(device)
    with torch.no_grad():
        context = text_hidden_states(text_model, tokenizer(prompts).to(device))
        empty = text_hidden_states(text_model, tokenizer([""] * len(prompts)).to(device))
        for t in scheduler.timesteps:
            both = unet(torch.cat([latents, latents]), t, encoder_hidden_states=torch.cat([empty, context])).sample
            unconditional, conditional = both.chunk(2)
            latents = scheduler.step(unconditional + guidance * (conditional - unconditional), t, latents).prev_sample
        if vae is not None:
            latents = vae.decode(latents / vae.config.scaling_factor).sample
    pixels = ((latents.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(p) for p in pixels]
