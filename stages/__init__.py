"""Curation stages, one small class each. ``STAGES`` maps the name used in configs to the class."""

from stages.base import SampleBatch, Stage, StageParams, StageResources
from stages.caption_cleaning import HtmlStage, PatternsStage
from stages.caption_filters import CharsetStage, EmojiStage, LanguageStage, LengthStage
from stages.dedup import DedupStage
from stages.image_decode import DecodeStage
from stages.image_header import AspectRatioStage, ImageSizeStage
from stages.model_scores import CapFiltStage, ClipScoreStage
from stages.semantic_dedup import SemanticDedupStage

STAGES: dict[str, type[Stage]] = {
    cls.name: cls
    for cls in (
        HtmlStage,
        PatternsStage,
        CharsetStage,
        LanguageStage,
        EmojiStage,
        LengthStage,
        ImageSizeStage,
        AspectRatioStage,
        DecodeStage,
        ClipScoreStage,
        CapFiltStage,
        DedupStage,
        SemanticDedupStage,
    )
}

__all__ = ["STAGES", "SampleBatch", "Stage", "StageParams", "StageResources"]
