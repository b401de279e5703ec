"""Semantic duplicates: spherical k-means and the keep rule within clusters (pipeline.semantic_dedup)."""

import numpy as np
import polars as pl
import pytest

from pipeline.semantic_dedup import find_semantic_duplicates, normalised, spherical_kmeans, within_cluster_duplicates
from stages.semantic_dedup import SemanticDedupParams, SemanticDedupStage


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def planted(count=3000, copies=150, dim=64, noise=0.12, seed=1):
    """Random directions (pairwise cosine well under 0.6) and near copies of some of them (cosine about 0.99)."""
    rng = np.random.default_rng(seed)
    base = unit(rng.normal(size=(count, dim)))
    originals = rng.choice(count, size=copies, replace=False)
    near = unit(base[originals] + noise * rng.normal(size=(copies, dim)) / np.sqrt(dim))
    vectors = np.concatenate([base, near])
    samples = pl.DataFrame({"stem": ["a"] * count + ["b"] * copies,
                            "shard": ["/in/a.tar"] * count + ["/in/b.tar"] * copies,
                            "position": list(range(count)) + list(range(copies)),
                            "key": [f"k{i}" for i in range(count)] + [f"c{i}" for i in range(copies)],
                            "score": [None] * (count + copies)}, schema_overrides={"score": pl.Float64})
    return samples, vectors, originals


def brute_force(vectors: np.ndarray, rank: np.ndarray, threshold: float) -> np.ndarray:
    """The keep rule over all pairs: in rank order, a duplicate of the best-similar kept better-ranked sample."""
    duplicate_of = np.full(len(vectors), -1)
    kept = []
    for row in np.argsort(rank):
        if kept:
            similarities = vectors[kept] @ vectors[row]
            best = int(np.argmax(similarities))
            if similarities[best] >= threshold:
                duplicate_of[row] = kept[best]
                continue
        kept.append(row)
    return duplicate_of


def test_planted_near_copies_are_found_and_distinct_directions_never_merged():
    samples, vectors, originals = planted()
    found = find_semantic_duplicates(samples, vectors, SemanticDedupParams(threshold=0.95, cluster_size=200))
    copies = found.filter(pl.col("shard") == "/in/b.tar")
    # Random directions have no cluster structure, so a pair now and then straddles a cluster boundary and is not
    # compared (SemDeDup's trade-off for never comparing all pairs): nearly every copy is found ...
    assert copies.height >= 0.97 * len(originals)
    # ... and none of the 3,000 distinct directions is ever merged, each copy naming its own original.
    assert found.height == copies.height
    expected = {f"c{i}": f"a/k{original}" for i, original in enumerate(originals)}
    keys = samples.filter(pl.col("stem") == "b")["key"].to_list()
    assert all(expected[keys[p]] == d for p, d in zip(copies["position"], copies["semantic_duplicate_of"]))
    assert copies["semantic_similarity"].min() >= 0.95
    # With one cluster every pair is compared: all of them.
    assert find_semantic_duplicates(samples, vectors, SemanticDedupParams(threshold=0.95, clusters=1)).height == 150


def test_one_cluster_is_the_brute_force_keep_rule():
    rng = np.random.default_rng(5)
    vectors = unit(rng.normal(size=(400, 8)))  # low dimension: many pairs above the threshold
    rank = rng.permutation(400)
    labels = np.zeros(400, np.int64)
    duplicate_of, similarity = within_cluster_duplicates(vectors, rank, labels, 0.9)
    assert (duplicate_of >= 0).sum() > 20
    assert np.array_equal(duplicate_of, brute_force(vectors, rank, 0.9))
    dropped = duplicate_of >= 0
    assert np.allclose(similarity[dropped], np.sum(vectors[dropped] * vectors[duplicate_of[dropped]], axis=1),
                       atol=1e-5)


def test_the_best_scored_member_is_kept_and_results_are_deterministic():
    samples, vectors, originals = planted(count=500, copies=40)
    scores = np.zeros(samples.height)
    scores[500:] = 1.0  # every copy scores higher than its original: the originals become the duplicates
    samples = samples.with_columns(pl.Series("score", scores))
    params = SemanticDedupParams(threshold=0.95, cluster_size=100)
    found = find_semantic_duplicates(samples, vectors, params)
    assert sorted(found.filter(pl.col("shard") == "/in/a.tar")["position"].to_list()) == sorted(originals.tolist())
    assert found.equals(find_semantic_duplicates(samples, vectors, params))


def test_kmeans_clusters_are_seeded_and_cover_every_sample():
    rng = np.random.default_rng(2)
    centres = unit(rng.normal(size=(5, 16)))
    vectors = unit(np.repeat(centres, 60, axis=0) + 0.05 * rng.normal(size=(300, 16)))
    labels = spherical_kmeans(vectors, 5, 20, seed=0)[:, 0]
    assert np.array_equal(labels, spherical_kmeans(vectors, 5, 20, seed=0)[:, 0])
    # well-separated blobs: each blob is one cluster
    assert all(len(set(labels[i * 60:(i + 1) * 60])) == 1 for i in range(5))
    assert len(set(labels)) == 5


def test_the_search_on_ray_equals_the_search_in_one_process(ray_cluster):
    """Candidates split into uneven parts held in Ray's object store, clusters dealt to several partitions:
    the same verdicts, similarities and clusters as the search over all of them at once."""
    import ray

    from pipeline.semantic_dedup import duplicates_of_parts, find_semantic_duplicates

    _, vectors, _ = planted(count=2000, copies=200)
    rng = np.random.default_rng(3)
    samples = pl.DataFrame({"stem": [f"s{i // 300:02d}" for i in range(len(vectors))],
                            "shard": [f"/in/s{i // 300:02d}.tar" for i in range(len(vectors))],
                            "position": np.arange(len(vectors)) % 300, "key": [f"k{i}" for i in range(len(vectors))],
                            "score": rng.random(len(vectors))})
    saved = vectors.astype(np.float16) * 3.0  # as saved: float16, not normalised
    params = SemanticDedupParams(threshold=0.9, cluster_size=100, seed=5)
    alone = find_semantic_duplicates(samples, normalised(saved), params)
    cuts = [0, 1, 1, 450, 1300, len(vectors)]  # a part of one sample, and one of none
    frames = [samples[a:b] for a, b in zip(cuts, cuts[1:])]
    refs = [ray.put(saved[a:b]) for a, b in zip(cuts, cuts[1:])]
    for partitions in (1, 3, 7):
        spread = duplicates_of_parts(frames, refs, params, partitions=partitions)
        assert spread.height > 150
        assert spread.equals(alone)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="threshold"):
        SemanticDedupStage(SemanticDedupParams(threshold=1.5))
    with pytest.raises(ValueError, match="cluster"):
        SemanticDedupStage(SemanticDedupParams(cluster_size=0))


# ------------------------------------------------------------------------------ end to end, with tiny CLIP


def semantic_config(tiny_models, *overrides):
    from pipeline.config import parse_config

    clip = tiny_models["clip"]
    entries = [
        {"stage": "decode", "size": 32},
        {"stage": "clip_score", "model": tiny_models["clip_name"], "pretrained": clip["checkpoint"],
         "model_config": clip["model_config"], "image_size": 32, "save_embeddings": True,
         "resources": {"num_gpus": 0}},
        {"stage": "semantic_dedup", "threshold": 0.9999},
    ]
    return parse_config({"name": "semantic", "stages": entries}, list(overrides))


@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory):
    """a: eight real photos; b: byte copies of two of them and three other photos."""
    from conftest import FLICKR, photos_and_captions, require, write_tar

    photos, captions = photos_and_captions(require(FLICKR / "flickr8k-00001.tar"), 11)
    folder = tmp_path_factory.mktemp("semantic-in")

    def members(keys, indices):
        out = []
        for key, index in zip(keys, indices):
            out += [(f"{key}.jpg", photos[index]), (f"{key}.txt", captions[index].encode())]
        return out

    a = write_tar(folder / "a.tar", members([f"k{i}" for i in range(8)], range(8)))
    b = write_tar(folder / "b.tar", members(["c0", "c1", "n0", "n1", "n2"], [2, 5, 8, 9, 10]))
    return a, b


def manifest_rows(output):
    frame = pl.read_parquet(f"{output}/manifests/*.parquet")
    return {(row["shard"].rsplit("/", 1)[1], row["key"]): row for row in frame.iter_rows(named=True)}


@pytest.mark.slow  # two model-recipe runs end to end
def test_copies_across_shards_are_dropped_as_semantic_duplicates(ray_cluster, tiny_models, photo_shards, tmp_path):
    from pipeline.run import run_curation, select_thresholds

    out = tmp_path / "out"
    result = run_curation(semantic_config(tiny_models), [str(p) for p in photo_shards], str(out), progress=False)
    assert result.failed == []
    embeddings = np.load(out / "embeddings" / "a.npy")
    assert embeddings.dtype == np.float16 and embeddings.shape[0] == 8 and np.isfinite(embeddings).all()
    rows = manifest_rows(out)
    assert "clip_image_embedding" not in next(iter(rows.values()))  # beside the manifest, not in it
    dropped = {key: row["semantic_duplicate_of"] for key, row in rows.items()
               if row["drop_reason"] == "semantic_dedup:semantic_duplicate"}
    # Byte copies have equal embeddings; the kept one is the better CLIP score, then the first shard.
    assert set(dropped) >= {("b.tar", "c0"), ("b.tar", "c1")} or set(dropped) >= {("a.tar", "k2"), ("a.tar", "k5")}
    for key, kept in dropped.items():
        assert rows[key]["semantic_similarity"] >= 0.9999
        stem, kept_key = kept.split("/")
        assert rows[(f"{stem}.tar", kept_key)]["kept"]
    assert result.stats["dropped_by_reason"]["semantic_dedup:semantic_duplicate"] == len(dropped)

    # A lower threshold through select equals a fresh run with it; no model runs again.
    stats = select_thresholds(str(out), ["semantic_dedup.threshold=0.5"])
    fresh = run_curation(semantic_config(tiny_models, "semantic_dedup.threshold=0.5"),
                         [str(p) for p in photo_shards], str(tmp_path / "fresh"), progress=False)
    assert stats["kept"] == fresh.stats["kept"] <= result.stats["kept"]
    again = manifest_rows(out)
    assert {k: r["drop_reason"] for k, r in again.items()} == {
        k: r["drop_reason"] for k, r in manifest_rows(tmp_path / "fresh").items()}
    assert (out / "shards" / "a.tar").read_bytes() == (tmp_path / "fresh" / "shards" / "a.tar").read_bytes()


def test_semantic_dedup_without_saved_embeddings_is_a_config_error(tiny_models):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="save_embeddings: true"):
        semantic_config(tiny_models, "clip_score.save_embeddings=false")
