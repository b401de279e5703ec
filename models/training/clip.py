"""The CLIP task: open_clip trained with the symmetric contrastive loss. Its export loads in the ``clip_score``
stage (``model: local-dir:EXPORT``, or ``pretrained: EXPORT/checkpoint.pt`` with ``model_config:
EXPORT/MODEL.json``)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch

from models.training.data import open_image, raw_columns
from models.training.task import TrainTask

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


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
