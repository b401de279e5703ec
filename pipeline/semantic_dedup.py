"""Semantic duplicates over a whole output, from the CLIP image embeddings saved beside the manifests.

Nothing here uses Ray. At selection time (after a run's shards complete, and on ``vlcurate select``), the samples
that pass every other stage and have an embedding take part, in a canonical order (shard stem, position):

1. their float16 embeddings are read from ``embeddings/{stem}.npy`` and normalised;
2. spherical k-means: ``clusters`` centroids (or one per ``cluster_size`` samples), fitted on at most 256 samples
   per cluster drawn with ``seed`` (all of them when there are fewer): first chosen among those samples, then
   moved to the normalised mean of their members until none changes cluster or ``iterations`` is reached; then
   every sample is assigned to its nearest centroid, in blocks, so the working memory beyond the embeddings is one
   block of similarities;
3. each sample belongs to its two nearest clusters (so that near copies on either side of a boundary still meet),
   and within each cluster the pairs at or above ``threshold`` are found; samples are ranked like exact
   duplicates (``prefer`` highest first, then shard stem, then position), and in rank order a sample is kept
   unless a kept, better-ranked sample it was compared with reaches the threshold: then it is dropped as that
   sample's duplicate (the most similar one).

The same candidates give the same clusters and verdicts, so a rerun, a refresh (clustered again over all shards)
and ``vlcurate select`` with a new threshold agree with one fresh run over all inputs. The embeddings of the
samples taking part are held in memory (float32): about 3 KiB per sample at ViT-B and ViT-L sizes.
"""

from __future__ import annotations

import io

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline.curate import verdict_frame
from pipeline.dedup import preference_order, preference_score, taking_part
from pipeline.outputs import OutputDir, embeddings_name
from stages.base import Stage
from stages.semantic_dedup import VERDICT_COLUMNS, ResolvedSemanticDedupStage, SemanticDedupStage

ASSIGN_BLOCK = 8192  # samples assigned to centroids at once
TRAIN_PER_CLUSTER = 256  # k-means fits its centroids on at most this many samples per cluster
SEARCHED_CLUSTERS = 2  # a sample is compared within its two nearest clusters: pairs across a boundary are found
NEAR_BLOCK = 2048  # members of a cluster compared with the earlier ones at once


def read_embeddings(out: OutputDir, stem: str) -> np.ndarray | None:
    """A shard's saved embeddings (rows in position order), or None when it has none."""
    name = embeddings_name(stem)
    if not out.is_file(name):
        return None
    return np.load(io.BytesIO(out.read_bytes(name)), allow_pickle=False)


def candidates(out: OutputDir, stages: list[Stage], index: int) -> tuple[pl.DataFrame, np.ndarray]:
    """The samples taking part (stem, shard, position, key, score) in canonical order, and their normalised
    embeddings (float32, one row each)."""
    passes = taking_part(stages, index)
    frames, vectors = [], []
    for stem in sorted(out.done_records()):
        if not out.is_file(out.manifest_name(stem)):
            continue
        embeddings = read_embeddings(out, stem)
        if embeddings is None:
            continue
        manifest = verdict_frame(out.read_manifest(stem))
        if manifest.height == 0:
            continue
        chosen = manifest.filter(passes).select(pl.lit(stem).alias("stem"), "shard", pl.col("position").cast(pl.Int64),
                                                "key", preference_score(manifest.schema, stages[index].params.prefer))
        rows = embeddings[chosen["position"].to_numpy()].astype(np.float32)
        finite = np.isfinite(rows).all(axis=1)
        frames.append(chosen.filter(pl.Series(finite)))
        vectors.append(rows[finite])
    if not frames:
        empty = pl.DataFrame(schema={"stem": pl.String, "shard": pl.String, "position": pl.Int64, "key": pl.String,
                                     "score": pl.Float64})
        return empty, np.zeros((0, 0), np.float32)
    vectors = np.concatenate(vectors)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return pl.concat(frames), vectors / np.maximum(norms, 1e-12)


def spherical_kmeans(vectors: np.ndarray, clusters: int, iterations: int, seed: int, nearest: int = 1) -> np.ndarray:
    """The ``nearest`` clusters of each (normalised) row, nearest first: the centroids of highest cosine
    similarity. The centroids are fitted on at most ``TRAIN_PER_CLUSTER`` rows per cluster (drawn with ``seed``),
    then every row is assigned."""
    count = len(vectors)
    clusters = max(1, min(clusters, count))
    rng = np.random.default_rng(seed)
    train = vectors
    if count > TRAIN_PER_CLUSTER * clusters:
        train = vectors[np.sort(rng.choice(count, size=TRAIN_PER_CLUSTER * clusters, replace=False))]
    centroids = train[np.sort(rng.choice(len(train), size=clusters, replace=False))].copy()
    labels = np.full(len(train), -1, np.int64)
    for _ in range(iterations):
        new_labels = assign(train, centroids)[:, 0]
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
        sums = cluster_sums(train, labels, clusters)
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        moved = norms[:, 0] > 0  # an emptied cluster keeps its centroid
        centroids[moved] = (sums[moved] / norms[moved]).astype(np.float32)
    return assign(vectors, centroids, nearest)


def cluster_sums(vectors: np.ndarray, labels: np.ndarray, clusters: int) -> np.ndarray:
    """Sum of the rows of each cluster (zero for an empty one)."""
    import torch

    sums = torch.zeros((clusters, vectors.shape[1]), dtype=torch.float32)
    sums.index_add_(0, torch.from_numpy(labels), torch.from_numpy(vectors))
    return sums.numpy()


def assign(vectors: np.ndarray, centroids: np.ndarray, nearest: int = 1) -> np.ndarray:
    """The indices of the ``nearest`` centroids of each row, nearest first (ties: the lower index)."""
    nearest = min(nearest, len(centroids))
    labels = np.empty((len(vectors), nearest), np.int64)
    for start in range(0, len(vectors), ASSIGN_BLOCK):
        scores = vectors[start:start + ASSIGN_BLOCK] @ centroids.T
        if nearest == 1:
            labels[start:start + ASSIGN_BLOCK, 0] = np.argmax(scores, axis=1)
        else:
            labels[start:start + ASSIGN_BLOCK] = np.argsort(-scores, axis=1, kind="stable")[:, :nearest]
    return labels


def within_cluster_duplicates(vectors: np.ndarray, rank: np.ndarray, labels: np.ndarray,
                              threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """For each row: the row it duplicates (-1: kept) and that similarity. ``rank``: 0 is the most preferred.
    ``labels``: each row's clusters (one column, or several: two rows are compared when they share one)."""
    labels = labels.reshape(len(vectors), -1)
    rows = np.tile(np.arange(len(vectors)), labels.shape[1])
    clusters = labels.T.ravel()
    order = np.lexsort((rank[rows], clusters))  # by cluster, then by rank
    bounds = np.flatnonzero(np.diff(clusters[order])) + 1
    near: dict[int, dict[int, float]] = {}  # row -> better-ranked rows at or above the threshold
    for members in np.split(rows[order], bounds):
        for position, earlier, similarities in near_earlier_members(vectors[members], threshold):
            near.setdefault(int(members[position]), {}).update(
                zip(members[earlier].tolist(), similarities.tolist()))
    duplicate_of = np.full(len(vectors), -1, np.int64)
    similarity = np.full(len(vectors), np.nan, np.float32)
    for row in sorted(near, key=lambda r: rank[r]):  # better-ranked rows' fate is settled first
        kept = [(value, other) for other, value in near[row].items() if duplicate_of[other] < 0]
        if kept:
            value, other = max(kept, key=lambda pair: (pair[0], -rank[pair[1]]))
            duplicate_of[row], similarity[row] = other, value
    return duplicate_of, similarity


def near_earlier_members(block: np.ndarray, threshold: float):
    """For each member (in rank order) with earlier members at or above ``threshold``: its position, theirs and
    the similarities. Most members have none, so only those few go through the keep rule one by one."""
    count = len(block)
    for start in range(0, count, NEAR_BLOCK):
        end = min(count, start + NEAR_BLOCK)
        similarities = block[start:end] @ block[:end].T
        rows = np.arange(start, end)[:, None]
        near = (similarities >= threshold) & (np.arange(end)[None, :] < rows)
        for row in np.flatnonzero(near.any(axis=1)):
            earlier = np.flatnonzero(near[row])
            yield start + row, earlier, similarities[row, earlier]


def find_semantic_duplicates(samples: pl.DataFrame, vectors: np.ndarray, params) -> pl.DataFrame:
    """The duplicates among ``samples`` (canonical order, one row of ``vectors`` each): shard, position and the
    verdict columns."""
    schema = {"shard": pl.String, "position": pl.Int64, "semantic_duplicate_of": pl.String,
              "semantic_similarity": pl.Float32, "semantic_cluster": pl.Int32}
    if samples.height < 2:
        return pl.DataFrame(schema=schema)
    clusters = params.clusters or -(-samples.height // params.cluster_size)
    labels = spherical_kmeans(vectors, clusters, params.iterations, params.seed, nearest=SEARCHED_CLUSTERS)
    order = preference_order(samples.with_row_index("row"))["row"]
    rank = np.empty(samples.height, np.int64)
    rank[order.to_numpy()] = np.arange(samples.height)
    duplicate_of, similarity = within_cluster_duplicates(vectors, rank, labels, params.threshold)
    rows = np.flatnonzero(duplicate_of >= 0)
    names = (samples["stem"] + "/" + samples["key"]).to_numpy()
    return pl.DataFrame({
        "shard": samples["shard"].to_numpy()[rows], "position": samples["position"].to_numpy()[rows],
        "semantic_duplicate_of": names[duplicate_of[rows]], "semantic_similarity": similarity[rows],
        "semantic_cluster": labels[rows, 0].astype(np.int32)}, schema=schema)


def resolve_semantic_duplicates(out: OutputDir, stages: list[Stage]) -> list[Stage]:
    """Each semantic_dedup stage replaced by one that drops the duplicates found over the whole output."""
    resolved = list(stages)
    for index, stage in enumerate(stages):
        if not isinstance(stage, SemanticDedupStage) or isinstance(stage, ResolvedSemanticDedupStage):
            continue
        samples, vectors = candidates(out, resolved, index)
        duplicates = find_semantic_duplicates(samples, vectors, stage.params)
        schema = pa.schema({"position": pa.int64(), **VERDICT_COLUMNS})
        by_shard = {source: frame.drop("shard").to_arrow().cast(schema)
                    for (source,), frame in duplicates.partition_by("shard", as_dict=True).items()}
        resolved[index] = ResolvedSemanticDedupStage(stage.params, by_shard)
    return resolved
