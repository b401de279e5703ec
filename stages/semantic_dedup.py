"""The semantic_dedup stage: images that show the same thing, by their CLIP image embeddings.

The embeddings are the ones ``clip_score`` computes anyway: with ``save_embeddings: true`` it hands them to the
writer, which saves them beside the manifest (``embeddings/{stem}.npy``, float16, one row per input sample, NaN
rows for samples it did not score). This stage computes nothing per sample. Which samples are semantic
duplicates depends on every completed shard, so it is decided at selection time by ``pipeline.semantic_dedup``
(SemDeDup's method: k-means on the normalised embeddings, then within each cluster a sample is a duplicate of a
better-ranked kept sample whose cosine similarity reaches ``threshold``), and ``vlcurate select`` re-applies a new
threshold without running any model.
"""

from __future__ import annotations

import dataclasses

import polars as pl
import pyarrow as pa

from stages.base import ResolvedOverOutput, SampleBatch, Stage, StageParams

EMBEDDING_COLUMN = "clip_image_embedding"  # written by clip_score with save_embeddings; saved beside the manifest

VERDICT_COLUMNS = {"semantic_duplicate_of": pa.string(), "semantic_similarity": pa.float32(),
                   "semantic_cluster": pa.int32()}


@dataclasses.dataclass
class SemanticDedupParams(StageParams):
    threshold: float = 0.95  # cosine similarity of the image embeddings at or above which two samples are duplicates
    clusters: int = 0  # k-means clusters; 0: one per `cluster_size` samples taking part
    cluster_size: int = 1000  # the mean cluster size aimed at when `clusters` is 0
    iterations: int = 20  # k-means iterations at most (it stops earlier once no sample changes cluster)
    seed: int = 0  # picks the initial centroids among the samples, in a fixed order: same input, same clusters
    prefer: str = "clip_score"  # the member kept in a group: highest value of this column, then shard, then position


class SemanticDedupStage(Stage):
    """Drops samples whose image embedding nearly equals a kept sample's; decided over the whole output."""

    name = "semantic_dedup"
    Params = SemanticDedupParams
    columns = {"semantic_embedded": pa.bool_(), **VERDICT_COLUMNS}
    decided_at_selection = frozenset(VERDICT_COLUMNS)
    thresholds = frozenset({"threshold", "clusters", "cluster_size", "iterations", "seed", "prefer"})

    def __init__(self, params: SemanticDedupParams):
        if not 0.0 < params.threshold <= 1.0:
            raise ValueError(f"threshold must be a cosine similarity in (0, 1], got {params.threshold}")
        if params.clusters < 0 or params.cluster_size < 1 or params.iterations < 1:
            raise ValueError("clusters must be >= 0, cluster_size and iterations >= 1")
        super().__init__(params)

    def annotate(self, batch: SampleBatch) -> dict[str, list]:
        """Per sample only whether it has an embedding (it takes part in the search unless another stage drops
        it); the verdict columns are filled at selection time."""
        columns: dict[str, list] = {name: [None] * len(batch) for name in VERDICT_COLUMNS}
        columns["semantic_embedded"] = batch.has_annotation(EMBEDDING_COLUMN)
        return columns

    def reject_reason(self) -> pl.Expr | None:
        return None  # decided over the whole output at selection time (``ResolvedSemanticDedupStage``)


class ResolvedSemanticDedupStage(ResolvedOverOutput, SemanticDedupStage):
    """The stage once the whole output has been clustered: per input shard, the samples that duplicate a kept
    one, with the kept sample (``STEM/KEY``), their similarity and cluster (``duplicates``: shard source ->
    position + VERDICT_COLUMNS)."""

    selection_verdicts = VERDICT_COLUMNS

    def reject_reason(self) -> pl.Expr:
        return pl.when(pl.col("semantic_duplicate_of").is_not_null()).then(pl.lit("semantic_duplicate"))
