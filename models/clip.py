"""Loading open_clip models and scoring image-text pairs (DataComp's CLIP score: cosine similarity)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.devices import autocast_context, is_cuda


class ClipLoadError(RuntimeError):
    """The CLIP model could not be loaded; the message says which setting to fix."""


def load_open_clip(model: str, pretrained: str = "", model_config: str = "", device: str = "cpu"):
    """Create an open_clip model and its own preprocessing and tokenizer.

    ``model`` is an open_clip name (``ViT-L-14``) or an ``hf-hub:``/``local-dir:`` reference (which carries its
    weights). ``pretrained`` is a tag (``openai``), a checkpoint file (a bare state dict or a training checkpoint
    with ``state_dict``), or empty for hub/local-dir models. ``model_config`` registers a custom architecture
    (a JSON file or a folder of them, named after the file) before creating it.

    The weights are held once: the model is built with its parameters on the meta device (no memory, no random
    initialisation), and the checkpoint's tensors become its parameters (``load_state_dict(assign=True)``)
    through open_clip's own checkpoint loading (format conversions, position-embedding resizing). open_clip's
    default, a randomly initialised model into which the checkpoint is copied, holds them twice while loading.
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
    pretrained = None if carries_weights else pretrained
    try:
        checkpoint = checkpoint_path(model, pretrained)
        if checkpoint is None:  # a source whose file open_clip alone knows how to find: its own loading
            net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained, device=device)
        else:
            net, preprocess = load_without_random_init(model, pretrained, checkpoint, device)
    except (RuntimeError, ValueError, FileNotFoundError, KeyError) as exc:
        raise ClipLoadError(f"cannot load CLIP model {model!r} (pretrained {pretrained!r}): {exc}") from None
    net = net.eval()
    if is_cuda(device):
        net = net.to(memory_format=torch.channels_last)  # the patch convolution reads channels-last input
    return net, preprocess, open_clip.get_tokenizer(model)


def checkpoint_path(model: str, pretrained: str | None) -> str | None:
    """The file holding the weights: ``pretrained`` itself, the tag's (downloaded) file, or a ``local-dir:``
    folder's checkpoint; None when open_clip's own loading must find or read it (``hf-hub:``, big_vision)."""
    import open_clip

    if model.startswith("local-dir:"):
        from open_clip import factory

        finder = getattr(factory, "_find_checkpoint_in_dir", None)  # open_clip's choice among the folder's files
        return finder(Path(model.removeprefix("local-dir:"))) if finder else None
    if model.startswith("hf-hub:") or not pretrained:
        return None
    if Path(pretrained).is_file():
        path = pretrained
    else:
        tag = open_clip.get_pretrained_cfg(model.replace("/", "-"), pretrained)
        path = open_clip.download_pretrained(tag) if tag else None
    # big_vision (.npz) weights are copied into existing parameters by open_clip: its own loading for them.
    return None if path is None or Path(path).suffix in (".npz", ".npy") else path


def load_without_random_init(model: str, pretrained: str | None, checkpoint: str, device: str):
    """(model, preprocess) with the checkpoint's tensors as parameters: see ``load_open_clip``."""
    import open_clip
    from accelerate import init_empty_weights

    quiet = NotLoadedYet()
    logging.getLogger().addFilter(quiet)
    try:
        with init_empty_weights(include_buffers=False):  # parameters on the meta device; buffers (masks) are real
            net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained,
                                                                       load_weights=False, device=None)
    finally:
        logging.getLogger().removeFilter(quiet)
    expected = {name: tensor.dtype for name, tensor in net.state_dict().items()}

    def assign_state_dict(state_dict, strict=True):
        for name, tensor in list(state_dict.items()):  # a half-precision checkpoint becomes the model's dtype
            if name in expected and tensor.is_floating_point() and tensor.dtype != expected[name]:
                state_dict[name] = tensor.to(expected[name])
        return type(net).load_state_dict(net, state_dict, strict=strict, assign=True)

    net.load_state_dict = assign_state_dict  # what open_clip's load_checkpoint calls, once
    try:
        # On CUDA the tensors are read straight onto the device: the host never holds the weights either.
        open_clip.load_checkpoint(net, checkpoint, strict=True, device=device if is_cuda(device) else "cpu")
    finally:
        del net.load_state_dict
    missing = [name for name, tensor in [*net.named_parameters(), *net.named_buffers()] if tensor.is_meta]
    if missing:
        raise KeyError(f"checkpoint {checkpoint} has no weights for {missing[:5]}")
    return net.to(device), preprocess


class NotLoadedYet(logging.Filter):
    """Drops open_clip's "no pretrained weights loaded, initialized randomly" warning while the model is built
    empty: the weights are loaded right after."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


class ClipScorer:
    def __init__(self, model: str, pretrained: str = "", model_config: str = "", device: str = "cpu",
                 precision: str = "fp32"):
        self.device = device
        self.precision = precision
        self.model, self.preprocess, self.tokenizer = load_open_clip(model, pretrained, model_config, device)
        config = self.model.visual.preprocess_cfg
        size = config["size"]
        self.image_settings = (size if isinstance(size, int) else size[0], list(config["mean"]), list(config["std"]))

    @torch.inference_mode()
    def score(self, images: list[Image.Image], captions: list[str]) -> list[float]:
        """Cosine similarity of the normalised image and text embeddings, one per pair."""
        return self.score_and_embed(images, captions)[0]

    @torch.inference_mode()
    def score_and_embed(self, images: list[Image.Image], captions: list[str]) -> tuple[list[float], np.ndarray]:
        """``score``, and the normalised image embeddings (float16, one row per image)."""
        if not images:
            return [], np.zeros((0, 0), np.float16)
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device)
        return self.score_and_embed_pixels(pixels, captions)

    @torch.inference_mode()
    def score_pixels(self, pixels: torch.Tensor, captions: list[str]) -> list[float]:
        """``score`` from preprocessed pixels (B, 3, size, size) already on the device."""
        return self.score_and_embed_pixels(pixels, captions)[0]

    @torch.inference_mode()
    def score_and_embed_pixels(self, pixels: torch.Tensor, captions: list[str]) -> tuple[list[float], np.ndarray]:
        if not captions:
            return [], np.zeros((0, 0), np.float16)
        tokens = self.tokenizer(captions).to(self.device)
        with autocast_context(self.device, self.precision) if self.device != "cpu" else contextlib.nullcontext():
            image_features = self.model.encode_image(pixels, normalize=True)
            text_features = self.model.encode_text(tokens, normalize=True)
        scores = (image_features.float() * text_features.float()).sum(dim=-1).tolist()
        return scores, image_features.to(torch.float16).cpu().numpy()
