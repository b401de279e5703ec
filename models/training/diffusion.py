"""The text-to-image diffusion task: a diffusers UNet conditioned on a frozen CLIP text tower (a ``clip``
export). Its export is a diffusers folder that ``vlcurate sample`` (``models.diffusion``) loads."""

from __future__ import annotations

import dataclasses
import json
import shutil
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models.diffusion import load_text_tower, text_hidden_states
from models.training.data import open_image, raw_columns
from models.training.task import TrainTask


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
