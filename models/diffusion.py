"""Text-to-image sampling with an exported diffusion model, and the frozen CLIP text tower that conditions it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image


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
