"""Semantic duplicates over a whole output, from the CLIP image embeddings saved beside the manifests.

At selection time (after a run's shards complete, and on ``vlcurate select``), the samples
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
and ``vlcurate select`` with a new threshold agree with one fresh run over all inputs. Similarities are float32
matrix products, whose last bits depend on the BLAS kernel (how many rows, how many threads); wherever such a
difference could change a decision (two centroids within ``EXACT_MARGIN`` of each other, a pair within it of the
threshold) the similarity is computed again exactly, in float64 summed in a fixed order.

A run searches on Ray (``find_semantic_duplicates_on_ray``): the embeddings stay in Ray's object store, and the
driver holds the candidates' metadata, the k-means training rows (at most 256 per cluster) and the near pairs.
``vlcurate select`` searches in its own process, with the embeddings of the samples taking part in memory
(float32: about 3 KiB per sample at ViT-B and ViT-L sizes). Both give the same verdicts.
"""

from __future__ import annotations

import io

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline.curate import verdict_frame
from pipeline.dedup import preference_order, preference_score, taking_part
from pipeline.outputs import OutputDir, embeddings_name
from pipeline.storage import read_ahead
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
    samples, rows = shard_candidates(out, embedded_stems(out), taking_part(stages, index), stages[index].params.prefer)
    return samples, normalised(rows)


def embedded_stems(out: OutputDir) -> list[str]:
    """The completed shards, in canonical order."""
    return sorted(out.done_records())


def shard_candidates(out: OutputDir, stems: list[str], passes: pl.Expr, prefer: str) -> tuple[pl.DataFrame, np.ndarray]:
    """The samples of ``stems`` that ``passes`` and have a finite embedding, in canonical order, and their
    embeddings as saved (not normalised)."""
    def read(stem: str) -> tuple[np.ndarray, pl.DataFrame] | None:
        if not out.is_file(out.manifest_name(stem)):
            return None
        embeddings = read_embeddings(out, stem)
        return None if embeddings is None else (embeddings, verdict_frame(out.read_manifest(stem)))

    frames, vectors = [], []
    for stem, found in zip(stems, read_ahead(stems, read)):
        if found is None or found[1].height == 0:
            continue
        embeddings, manifest = found
        chosen = manifest.filter(passes).select(pl.lit(stem).alias("stem"), "shard", pl.col("position").cast(pl.Int64),
                                                "key", preference_score(manifest.schema, prefer))
        rows = embeddings[chosen["position"].to_numpy()]
        finite = np.isfinite(rows).all(axis=1)
        frames.append(chosen.filter(pl.Series(finite)))
        vectors.append(rows[finite])
    if not frames:
        empty = pl.DataFrame(schema={"stem": pl.String, "shard": pl.String, "position": pl.Int64, "key": pl.String,
                                     "score": pl.Float64})
        return empty, np.zeros((0, 0), np.float16)
    return pl.concat(frames), np.concatenate(vectors)


def normalised(rows: np.ndarray) -> np.ndarray:
    """Rows as float32 of unit length (each row on its own, so the same whatever rows come with it)."""
    rows = rows.astype(np.float32)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.maximum(norms, 1e-12)


def spherical_kmeans(vectors: np.ndarray, clusters: int, iterations: int, seed: int, nearest: int = 1) -> np.ndarray:
    """The ``nearest`` clusters of each (normalised) row, nearest first: the centroids of highest cosine
    similarity. The centroids are fitted on at most ``TRAIN_PER_CLUSTER`` rows per cluster (drawn with ``seed``),
    then every row is assigned."""
    clusters = max(1, min(clusters, len(vectors)))
    rng = np.random.default_rng(seed)
    chosen = training_rows(len(vectors), clusters, rng)
    train = vectors if chosen is None else vectors[chosen]
    return assign(vectors, fit_centroids(train, clusters, iterations, rng), nearest)


def training_rows(count: int, clusters: int, rng: np.random.Generator) -> np.ndarray | None:
    """The rows k-means fits its centroids on (sorted), or None for all of them."""
    if count <= TRAIN_PER_CLUSTER * clusters:
        return None
    return np.sort(rng.choice(count, size=TRAIN_PER_CLUSTER * clusters, replace=False))


def fit_centroids(train: np.ndarray, clusters: int, iterations: int, rng: np.random.Generator) -> np.ndarray:
    """Spherical k-means on ``train``: centroids first chosen among its rows, then moved to the normalised mean of
    their members until none changes cluster or ``iterations`` is reached."""
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
    return centroids


def cluster_sums(vectors: np.ndarray, labels: np.ndarray, clusters: int) -> np.ndarray:
    """Sum of the rows of each cluster (zero for an empty one)."""
    import torch

    sums = torch.zeros((clusters, vectors.shape[1]), dtype=torch.float32)
    sums.index_add_(0, torch.from_numpy(labels), torch.from_numpy(vectors))
    return sums.numpy()


def assign(vectors: np.ndarray, centroids: np.ndarray, nearest: int = 1) -> np.ndarray:
    """The indices of the ``nearest`` centroids of each row, nearest first (ties: the lower index).

    The float32 matrix product's last bits depend on the BLAS kernel, which depends on how many rows are
    multiplied at once and on the threads (a Ray worker has one): a row whose order among its nearest centroids
    is closer than ``EXACT_MARGIN`` is scored again exactly (``exact_dots``), so that its clusters are the same
    wherever and with whatever rows it is assigned."""
    nearest = min(nearest, len(centroids))
    labels = np.empty((len(vectors), nearest), np.int64)
    for start in range(0, len(vectors), ASSIGN_BLOCK):
        block = vectors[start:start + ASSIGN_BLOCK]
        # the decisive scores: the nearest centroids' and the next one's
        order, top = highest(block @ centroids.T, min(nearest + 1, len(centroids)))
        labels[start:start + len(block)] = order[:, :nearest]
        for row in np.flatnonzero((-np.diff(top, axis=1) < EXACT_MARGIN).any(axis=1)):
            exact = exact_dots(block[row], centroids)
            labels[start + row] = np.argsort(-exact, kind="stable")[:nearest]
    return labels


def highest(scores: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The columns of the ``count`` highest scores of each row, highest first (ties: the lower column), and those
    scores; ``scores`` is overwritten. One maximum at a time: for a few, far cheaper than sorting the rows."""
    rows = np.arange(len(scores))
    order = np.empty((len(scores), count), np.int64)
    values = np.empty((len(scores), count), scores.dtype)
    for k in range(count):
        order[:, k] = np.argmax(scores, axis=1)
        values[:, k] = scores[rows, order[:, k]]
        scores[rows, order[:, k]] = -np.inf
    return order, values


EXACT_MARGIN = 1e-5  # far above the float32 product's error (about 2e-7 for unit vectors), far below real gaps


def exact_dots(row: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The dot products of ``row`` with each of ``rows`` in float64, summed in a fixed order: the same values
    whatever BLAS, threads or batch computed the float32 estimate."""
    return (rows.astype(np.float64) * row.astype(np.float64)).sum(axis=1)


def within_cluster_duplicates(vectors: np.ndarray, rank: np.ndarray, labels: np.ndarray,
                              threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """For each row: the row it duplicates (-1: kept) and that similarity. ``rank``: 0 is the most preferred.
    ``labels``: each row's clusters (one column, or several: two rows are compared when they share one)."""
    labels = labels.reshape(len(vectors), -1)
    rows = np.tile(np.arange(len(vectors)), labels.shape[1])
    near: dict[int, dict[int, float]] = {}
    for _, pairs in cluster_near_pairs(vectors, rows, rows, rank[rows], labels.T.ravel(), threshold):
        merge_near(near, pairs)
    return keep_rule(near, rank, len(vectors))


def cluster_near_pairs(vectors: np.ndarray, vector_rows: np.ndarray, rows: np.ndarray, ranks: np.ndarray,
                       clusters: np.ndarray, threshold: float):
    """For each cluster in ascending order: (cluster, pairs), the pairs being (row, better-ranked rows,
    similarities) at or above ``threshold`` among its members. Entry ``i`` of ``vector_rows``, ``rows``, ``ranks``
    and ``clusters`` says that row ``rows[i]`` (of rank ``ranks[i]``, vector ``vectors[vector_rows[i]]``) is a
    member of cluster ``clusters[i]``."""
    order = np.lexsort((ranks, clusters))  # by cluster, then by rank
    bounds = np.flatnonzero(np.diff(clusters[order])) + 1
    for entries in np.split(order, bounds):
        if len(entries) < 2:
            continue
        members = rows[entries]
        pairs = [(int(members[position]), members[earlier].tolist(), similarities.tolist())
                 for position, earlier, similarities in near_earlier_members(vectors[vector_rows[entries]], threshold)]
        if pairs:
            yield int(clusters[entries[0]]), pairs


def merge_near(near: dict[int, dict[int, float]], pairs) -> None:
    """Add one cluster's pairs to ``near`` (row -> better-ranked rows at or above the threshold -> similarity);
    clusters are merged in ascending order, so a pair seen in two clusters keeps the later one's figure."""
    for row, others, similarities in pairs:
        near.setdefault(row, {}).update(zip(others, similarities))


def keep_rule(near: dict[int, dict[int, float]], rank: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """In rank order a row is kept unless a kept, better-ranked row it was compared with reaches the threshold:
    then it duplicates that row (the most similar one)."""
    duplicate_of = np.full(count, -1, np.int64)
    similarity = np.full(count, np.nan, np.float32)
    for row in sorted(near, key=lambda r: rank[r]):  # better-ranked rows' fate is settled first
        kept = [(value, other) for other, value in near[row].items() if duplicate_of[other] < 0]
        if kept:
            value, other = max(kept, key=lambda pair: (pair[0], -rank[pair[1]]))
            duplicate_of[row], similarity[row] = other, value
    return duplicate_of, similarity


def near_earlier_members(block: np.ndarray, threshold: float):
    """For each member (in rank order) with earlier members at or above ``threshold``: its position, theirs and
    the similarities. Most members have none, so only those few go through the keep rule one by one. The float32
    product finds the pairs within ``EXACT_MARGIN`` of the threshold; their similarity is computed again exactly
    and decides (``exact_dots``), so that verdicts and figures do not depend on where the search ran."""
    count = len(block)
    for start in range(0, count, NEAR_BLOCK):
        end = min(count, start + NEAR_BLOCK)
        similarities = block[start:end] @ block[:end].T
        rows = np.arange(start, end)[:, None]
        near = (similarities >= threshold - EXACT_MARGIN) & (np.arange(end)[None, :] < rows)
        for row in np.flatnonzero(near.any(axis=1)):
            earlier = np.flatnonzero(near[row])
            exact = exact_dots(block[start + row], block[earlier])
            reached = exact >= threshold
            if reached.any():
                yield start + row, earlier[reached], exact[reached].astype(np.float32)


VERDICT_SCHEMA = {"shard": pl.String, "position": pl.Int64, "semantic_duplicate_of": pl.String,
                  "semantic_similarity": pl.Float32, "semantic_cluster": pl.Int32}


def find_semantic_duplicates(samples: pl.DataFrame, vectors: np.ndarray, params) -> pl.DataFrame:
    """The duplicates among ``samples`` (canonical order, one row of ``vectors`` each): shard, position and the
    verdict columns."""
    if samples.height < 2:
        return pl.DataFrame(schema=VERDICT_SCHEMA)
    labels = spherical_kmeans(vectors, cluster_count(samples.height, params), params.iterations, params.seed,
                              nearest=SEARCHED_CLUSTERS)
    rank = preference_rank(samples)
    duplicate_of, similarity = within_cluster_duplicates(vectors, rank, labels, params.threshold)
    return verdict_rows(samples, labels, duplicate_of, similarity)


def cluster_count(samples: int, params) -> int:
    return max(1, min(params.clusters or -(-samples // params.cluster_size), samples))


def preference_rank(samples: pl.DataFrame) -> np.ndarray:
    """Each sample's rank, 0 the most preferred (``preference_order``)."""
    order = preference_order(samples.with_row_index("row"))["row"]
    rank = np.empty(samples.height, np.int64)
    rank[order.to_numpy()] = np.arange(samples.height)
    return rank


def verdict_rows(samples: pl.DataFrame, labels: np.ndarray, duplicate_of: np.ndarray,
                 similarity: np.ndarray) -> pl.DataFrame:
    rows = np.flatnonzero(duplicate_of >= 0)
    names = (samples["stem"] + "/" + samples["key"]).to_numpy()
    return pl.DataFrame({
        "shard": samples["shard"].to_numpy()[rows], "position": samples["position"].to_numpy()[rows],
        "semantic_duplicate_of": names[duplicate_of[rows]], "semantic_similarity": similarity[rows],
        "semantic_cluster": labels[rows, 0].astype(np.int32)}, schema=VERDICT_SCHEMA)


# ------------------------------------------------------------------------------------------------------ on Ray
# The same search with the embeddings never in the driver: read tasks (a few shards each) return the candidates'
# metadata to the driver and leave their embeddings in Ray's object store; the driver fits the centroids on the
# training rows alone; assignment tasks send every member of a cluster to the partition that searches it
# (clusters are dealt out to partitions round-robin); search tasks return the near pairs, few; the keep rule runs
# in the driver over those pairs. Every function involved works row by row or cluster by cluster, so the verdicts
# are those of ``find_semantic_duplicates`` over the same samples.

TASKS_PER_CPU = 2  # read and assignment tasks, and search partitions, per CPU of the cluster


def find_semantic_duplicates_on_ray(out: OutputDir, stems: list[str], passes: pl.Expr, params) -> pl.DataFrame:
    """``find_semantic_duplicates`` over the candidates of ``stems`` (``shard_candidates``), on Ray."""
    import ray

    tasks = max(1, round(TASKS_PER_CPU * ray.cluster_resources().get("CPU", 1)))
    read = ray.remote(shard_candidates_task).options(num_returns=2)
    size = -(-len(stems) // tasks) if stems else 1
    parts = [read.remote(str(out.root), stems[i:i + size], passes, params.prefer) for i in range(0, len(stems), size)]
    frames = ray.get([frame for frame, _ in parts])
    return duplicates_of_parts(frames, [rows for _, rows in parts], params, partitions=tasks)


def duplicates_of_parts(frames: list[pl.DataFrame], row_refs: list, params, partitions: int) -> pl.DataFrame:
    """The search over candidates held in parts: ``frames[i]`` (in the driver) and its embeddings as saved,
    ``row_refs[i]`` (in Ray's object store)."""
    import ray

    parts = [(frame, ref) for frame, ref in zip(frames, row_refs) if frame.height]
    frames, row_refs = [frame for frame, _ in parts], [ref for _, ref in parts]
    samples = pl.concat(frames) if frames else pl.DataFrame()
    if samples.height < 2:
        return pl.DataFrame(schema=VERDICT_SCHEMA)
    clusters = cluster_count(samples.height, params)
    offsets = np.cumsum([0] + [frame.height for frame in frames])
    rng = np.random.default_rng(params.seed)
    chosen = training_rows(samples.height, clusters, rng)
    take = ray.remote(normalised_rows)
    train = np.concatenate(ray.get([
        take.remote(ref, None if chosen is None else chosen[(chosen >= start) & (chosen < end)] - start)
        for ref, start, end in zip(row_refs, offsets[:-1], offsets[1:])]))
    centroids = ray.put(fit_centroids(train, clusters, params.iterations, rng))
    del train
    rank = preference_rank(samples)
    partitions = max(1, min(partitions, clusters))
    dealt = ray.remote(assign_and_deal).options(num_returns=partitions + 1)
    assigned = [dealt.remote(ref, centroids, start, rank[start:end], partitions)
                for ref, start, end in zip(row_refs, offsets[:-1], offsets[1:])]
    search = ray.remote(search_partition)
    found = ray.get([search.remote(params.threshold, *[refs[1 + p] for refs in assigned]) for p in range(partitions)])
    labels = np.concatenate(ray.get([refs[0] for refs in assigned]))
    near: dict[int, dict[int, float]] = {}
    for _, pairs in sorted((entry for entries in found for entry in entries), key=lambda entry: entry[0]):
        merge_near(near, pairs)
    duplicate_of, similarity = keep_rule(near, rank, samples.height)
    return verdict_rows(samples, labels, duplicate_of, similarity)


def shard_candidates_task(root: str, stems: list[str], passes: pl.Expr, prefer: str):
    return shard_candidates(OutputDir(root), stems, passes, prefer)


def normalised_rows(rows: np.ndarray, chosen: np.ndarray | None) -> np.ndarray:
    return normalised(rows if chosen is None else rows[chosen])


def assign_and_deal(rows: np.ndarray, centroids: np.ndarray, offset: int, ranks: np.ndarray, partitions: int):
    """The nearest clusters of each row (the first return), then one return per partition: the entries
    (vector as saved, row, rank, cluster) of the clusters dealt to it."""
    labels = assign(normalised(rows), centroids, SEARCHED_CLUSTERS)
    local = np.tile(np.arange(len(rows)), labels.shape[1])
    clusters = labels.T.ravel()
    dealt = []
    for partition in range(partitions):
        entries = np.flatnonzero(clusters % partitions == partition)
        picked = local[entries]
        dealt.append((rows[picked], offset + picked, ranks[picked], clusters[entries]))
    return (labels, *dealt)


def search_partition(threshold: float, *dealt) -> list:
    """The near pairs of every cluster of one partition, from the entries every assignment task dealt to it."""
    raw = np.concatenate([vectors for vectors, _, _, _ in dealt])
    rows, ranks, clusters = (np.concatenate([entry[i] for entry in dealt]) for i in (1, 2, 3))
    return list(cluster_near_pairs(normalised(raw), np.arange(len(rows)), rows, ranks, clusters, threshold))


def resolve_semantic_duplicates(out: OutputDir, stages: list[Stage]) -> list[Stage]:
    """Each semantic_dedup stage replaced by one that drops the duplicates found over the whole output: on Ray
    when the process is connected to a Ray cluster (a run), in this process otherwise (``vlcurate select``)."""
    import ray

    resolved = list(stages)
    for index, stage in enumerate(stages):
        if not isinstance(stage, SemanticDedupStage) or isinstance(stage, ResolvedSemanticDedupStage):
            continue
        if ray.is_initialized():
            duplicates = find_semantic_duplicates_on_ray(out, embedded_stems(out), taking_part(resolved, index),
                                                         stage.params)
        else:
            duplicates = find_semantic_duplicates(*candidates(out, resolved, index), stage.params)
        schema = pa.schema({"position": pa.int64(), **VERDICT_COLUMNS})
        by_shard = {source: frame.drop("shard").to_arrow().cast(schema)
                    for (source,), frame in duplicates.partition_by("shard", as_dict=True).items()}
        resolved[index] = ResolvedSemanticDedupStage(stage.params, by_shard)
    return resolved
