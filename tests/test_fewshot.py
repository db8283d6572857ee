"""SimpleShot few-shot on stored embeddings: the kernels, and the shard-wise stage against an independent
implementation on a real catalog and cluster."""

import shutil

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from pzscale import catalog, open_catalog
from pzscale.errors import CatalogError
from pzscale.fewshot import draw_supports, fewshot, nearest_prototype, normalise
from pzscale.schema import RANKS
from pzscale.split import assign_splits
from tests.conftest import independent_macro_f1

pytestmark = [pytest.mark.cluster]


def test_supports_per_class_are_capped_seeded_and_nested():
    labels = np.random.default_rng(1).permutation(np.array(["a"] * 10 + ["b"] * 3 + ["c"], dtype=object))
    five, one = draw_supports(labels, 5, 0), draw_supports(labels, 1, 0)
    counts = {c: int(five[labels == c].sum()) for c in "abc"}
    assert counts == {"a": 5, "b": 2, "c": 1}  # b keeps one query; c (a single image) is a prototype only
    assert {c: int(one[labels == c].sum()) for c in "abc"} == {"a": 1, "b": 1, "c": 1}
    assert not (one & ~five).any(), "the 1-shot support must be inside the 5-shot support of the same seed"
    np.testing.assert_array_equal(five, draw_supports(labels, 5, 0))
    assert any(not np.array_equal(five, draw_supports(labels, 5, s)) for s in (7, 25, 42))


def test_nearest_prototype_and_normalise_match_scipy():
    rng = np.random.default_rng(0)
    features, mean = rng.normal(size=(50, 16)), rng.normal(size=16)
    unit = normalise(features, mean)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1, rtol=1e-5)
    np.testing.assert_allclose(unit * np.linalg.norm(features - mean, axis=1, keepdims=True), features - mean,
                               rtol=1e-4, atol=1e-5)
    prototypes = rng.normal(size=(7, 16)).astype(np.float32)
    np.testing.assert_array_equal(nearest_prototype(unit, prototypes), cdist(unit, prototypes).argmin(1))


@pytest.fixture(scope="module")
def planted(clean_catalog, client, tmp_path_factory):
    """The clean catalog with a split and a planted embedding: a class centre plus noise, NaN without image."""
    url = str(tmp_path_factory.mktemp("fewshot") / "cat.zarr")
    shutil.copytree(clean_catalog[0], url)
    assign_splits(url, seed=42)
    ds = open_catalog(url)[["lineage", "proposed_label", "status"]].compute()
    target = np.where(ds["lineage"].values != "", ds["lineage"].values, ds["proposed_label"].values)
    classes = sorted(set(target))
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(len(classes), 12))
    features = centres[[classes.index(t) for t in target]] + rng.normal(scale=1.2, size=(len(target), 12))
    features[ds["status"].values != "ok"] = np.nan
    group = catalog.open_group(url, mode="r+")
    catalog.ensure_array(group, "emb__planted", dtype="float16", fill=np.nan, trailing=(12,), dims=("planted_dim",))
    shard_len = catalog.metadata(group)["shard_len"]
    for _, start, stop in catalog.shard_ranges(0, len(target), shard_len):
        catalog.write_arrays(group, start, stop, {"emb__planted": features[start:stop].astype(np.float16)})
    return url


def test_fewshot_matches_an_independent_simpleshot(planted):
    seeds, shots = (0, 7), (1, 5)
    table = fewshot(planted, "emb__planted", split="test", shots=shots, seeds=seeds)
    assert list(table.columns) == ["shots", "rank", "macro_f1", "macro_f1_std", "accuracy", "queries", "classes"]
    ds = open_catalog(planted)[["split", "lineage", "proposed_label", "status", "emb__planted"]].compute()
    target = np.where(ds["lineage"].values != "", ds["lineage"].values, ds["proposed_label"].values)
    features = ds["emb__planted"].values.astype(np.float64)
    ok = ds["status"].values == "ok"
    train, test = ok & (ds["split"].values == "train"), np.flatnonzero(ok & (ds["split"].values == "test"))
    centred = features - features[train].mean(0)
    unit = centred / np.linalg.norm(centred, axis=1, keepdims=True)
    for k in shots:
        expected = {rank: [] for rank in RANKS}
        for seed in seeds:
            support = draw_supports(target[test], k, seed)
            labels = sorted(set(target[test]))
            prototypes = np.stack([unit[test[support & (target[test] == c)]].mean(0) for c in labels])
            queries = test[~support]
            predicted = np.array(labels, dtype=object)[cdist(unit[queries], prototypes).argmin(1)]
            for depth, rank in enumerate(RANKS, start=1):
                expected[rank].append(independent_macro_f1(target[queries], predicted, depth))
        got = table[table["shots"] == k].set_index("rank")["macro_f1"]
        for rank in RANKS:
            assert got[rank] == pytest.approx(np.mean(expected[rank]), abs=1e-6), (k, rank)
    # a planted signal well above chance, and more shots help
    by_shots = table.groupby("shots")["macro_f1"].mean()
    assert by_shots[1] > 0.5 and by_shots[5] >= by_shots[1]


def test_fewshot_needs_the_embedding_and_train_rows(planted):
    with pytest.raises(CatalogError, match="no emb__missing"):
        fewshot(planted, "emb__missing")
    with pytest.raises(CatalogError, match="no nosuchsplit rows"):
        fewshot(planted, "emb__planted", centre_split="nosuchsplit")
