"""Loading open_clip models and scoring image-text pairs (DataComp's CLIP score: cosine similarity)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from PIL import Image

from models.devices import autocast_context


class ClipLoadError(RuntimeError):
    """The CLIP model could not be loaded; the message says which setting to fix."""


def load_open_clip(model: str, pretrained: str = "", model_config: str = "", device: str = "cpu"):
    """Create an open_clip model and its own preprocessing and tokenizer.

    ``model`` is an open_clip name (``ViT-L-14``) or an ``hf-hub:``/``local-dir:`` reference (which carries its
    weights). ``pretrained`` is a tag (``openai``), a checkpoint file (a bare state dict or a training checkpoint
    with ``state_dict``), or empty for hub/local-dir models. ``model_config`` registers a custom architecture
    (a JSON file or a folder of them, named after the file) before creating it.
    """
    import open_clip

    if model_config:
        if not Path(model_config).exists():
            raise ClipLoadError(f"clip model_config {model_config} does not exist")
        open_clip.add_model_config(model_config)
    carries_weights = model.startswith(("hf-hub:", "local-dir:"))
    if not carries_weights and not pretrained:
        raise ClipLoadError(
            f"CLIP model {model!r} needs 'pretrained': a tag such as 'openai', a checkpoint file, or use an "
            "'hf-hub:'/'local-dir:' model; random weights would make every score meaningless"
        )
    try:
        net, _, preprocess = open_clip.create_model_and_transforms(
            model, pretrained=None if carries_weights else pretrained, device=device
        )
    except (RuntimeError, ValueError, FileNotFoundError, KeyError) as exc:
        raise ClipLoadError(f"cannot load CLIP model {model!r} (pretrained {pretrained!r}): {exc}") from None
    return net.eval(), preprocess, open_clip.get_tokenizer(model)


class ClipScorer:
    def __init__(self, model: str, pretrained: str = "", model_config: str = "", device: str = "cpu",
                 precision: str = "fp32"):
        self.device = device
        self.precision = precision
        self.model, self.preprocess, self.tokenizer = load_open_clip(model, pretrained, model_config, device)

    @torch.inference_mode()
    def score(self, images: list[Image.Image], captions: list[str]) -> list[float]:
        """Cosine similarity of the normalised image and text embeddings, one per pair."""
        if not images:
            return []
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device)
        tokens = self.tokenizer(captions).to(self.device)
        with autocast_context(self.device, self.precision) if self.device != "cpu" else contextlib.nullcontext():
            image_features = self.model.encode_image(pixels, normalize=True)
            text_features = self.model.encode_text(tokens, normalize=True)
        return (image_features.float() * text_features.float()).sum(dim=-1).tolist()
