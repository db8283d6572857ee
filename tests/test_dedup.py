"""Dedup: hash kernels against imagededup, banded candidate search against brute force, the stage on synthetic
and real IFCB data on a real LocalCluster, the keep rule, split leakage, SemDeDup, resume and the CLI."""

from __future__ import annotations

import glob
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from typer.testing import CliRunner

from pzscale import catalog, imagehash, images, open_catalog
from pzscale import dedup as dd
from pzscale.cli import app
from pzscale.errors import CatalogError, InputError
from pzscale.ingest import ingest
from pzscale.split import assign_splits
from pzscale.stage import Catalog

CLASSIPYR = "classipyr/test_data"
BIN = "D20220522T000439_IFCB134"


def brute_components(values: np.ndarray, threshold: int) -> np.ndarray:
    """Component label of every value under 'Hamming <= threshold', by comparing all pairs."""
    a, b = [], []
    for lo in range(0, len(values), 1024):  # row blocks: memory stays small for thousands of values
        ii, jj = np.nonzero(imagehash.hamming(values[lo : lo + 1024, None], values[None, :]) <= threshold)
        a.append(ii[ii + lo < jj] + lo)
        b.append(jj[ii + lo < jj])
    a, b = np.concatenate(a), np.concatenate(b)
    graph = coo_matrix((np.ones(len(a)), (a, b)), shape=(len(values),) * 2)
    return connected_components(graph, directed=False)[1]


def same_partition(x: np.ndarray, y: np.ndarray) -> bool:
    """Two labellings split the items the same way (labels themselves may differ)."""
    pairs = pd.DataFrame({"x": x, "y": y}).drop_duplicates()
    return pairs["x"].is_unique and pairs["y"].is_unique


# ---------------------------------------------------------------- hash kernels


def test_phash_bits_equal_imagededup_on_every_real_image(sample_data):
    from imagededup.methods import PHash

    files = sorted(glob.glob(f"{sample_data}/**/*.png", recursive=True) + glob.glob(f"{sample_data}/**/*.jp*g",
                                                                                        recursive=True))
    # 16-bit files: imagededup clips them to white, pzscale stretches them (test below)
    files = [f for f in files if Image.open(f).mode not in ("I;16", "I;16B", "I")]
    modes = {Image.open(f).mode for f in files}
    assert len(files) >= 40 and {"L", "RGB", "RGBA"} <= modes  # grey ROIs, colour photos, alpha
    phasher = PHash(verbose=False)
    pixels = [images.decode(Path(f).read_bytes()) for f in files]
    ours = imagehash.phashes(pixels)  # one batch: the DCT runs once for all
    for path, value in zip(files, ours, strict=True):
        assert imagehash.to_hex(value) == phasher.encode_image(image_file=path), path
    # an array imagededup is given directly (its other entry point) hashes the same too
    assert imagehash.to_hex(ours[0]) == phasher.encode_image(image_array=pixels[0])


def test_phash_of_deep_images_is_that_of_their_8_bit_stretch():
    rng = np.random.default_rng(1)
    deep = (rng.random((40, 70)) * 4000 + 100).astype(np.uint16)
    stretched = images._to_uint8(deep)
    assert imagehash.phashes([deep])[0] == imagehash.phashes([stretched])[0]
    # grey with alpha drops the alpha, as imagededup does
    grey = stretched
    assert imagehash.phashes([np.dstack([grey, grey * 0])])[0] == imagehash.phashes([grey])[0]


def test_pixel_hash_sees_pixels_not_encoding():
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 255, (31, 17), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG", compress_level=9)
    tiff = io.BytesIO()
    Image.fromarray(pixels).save(tiff, format="TIFF")
    same = {imagehash.pixel_hash(images.decode(b.getvalue())) for b in (png, tiff)}
    assert same == {imagehash.pixel_hash(pixels)}
    assert imagehash.pixel_hash(pixels.T.copy()) != imagehash.pixel_hash(pixels)  # shape is part of it
    assert imagehash.pixel_hash(pixels.astype(np.uint16)) != imagehash.pixel_hash(pixels)  # and the dtype
    assert imagehash.pixel_hashes([pixels, pixels.T]).shape == (2, 2)


def test_profile_dot_products_are_correlations_of_the_band_limited_thumbnails():
    import scipy.fft

    rng = np.random.default_rng(4)
    base = rng.integers(0, 255, (60, 45), dtype=np.uint8)
    batch = [base, np.clip(base * 0.8 + 20, 0, 255).astype(np.uint8), rng.integers(0, 255, (50, 50), np.uint8),
             np.full((20, 30), 7, np.uint8)]
    hashes, profiles = imagehash.phashes_and_profiles(batch)
    assert (hashes == imagehash.phashes(batch)).all() and profiles.shape == (4, imagehash.PROFILE_LEN)
    # independently: the thumbnail low-passed to the 8 x 8 block with scipy's orthonormal DCT, mean removed
    low = []
    for pixels in batch:
        coef = scipy.fft.dctn(imagehash.grey_thumbnail(pixels).astype(np.float64), norm="ortho")
        coef[8:, :], coef[:, 8:] = 0, 0
        band = scipy.fft.idctn(coef, norm="ortho").ravel()
        low.append(band - band.mean())
    for i in range(3):
        for j in range(3):
            corr = low[i] @ low[j] / np.linalg.norm(low[i]) / np.linalg.norm(low[j])
            assert profiles[i] @ profiles[j] == pytest.approx(corr, abs=1e-5)
    assert profiles[0] @ profiles[1] > 0.999  # a linear tone change keeps the correlation
    assert not profiles[3].any()  # a flat image has no profile


def test_similar_row_pairs_equal_brute_force_and_big_blocks_are_tiled(monkeypatch):
    rng = np.random.default_rng(6)
    n_values = 60
    value_of = np.r_[np.arange(n_values), rng.integers(0, n_values, 140), np.full(300, 7)]  # value 7: 301 rows
    centres = rng.normal(size=(n_values, 63))
    profiles = centres[value_of] + rng.normal(scale=0.15, size=(len(value_of), 63)) * rng.random((len(value_of), 1))
    profiles = (profiles / np.linalg.norm(profiles, axis=1, keepdims=True)).astype(np.float16)
    ia, ib = rng.integers(0, n_values, 40), rng.integers(0, n_values, 40)
    ia, ib = np.r_[ia[ia != ib], 7], np.r_[ib[ia != ib], 3]  # the big value against another one too
    sim = profiles.astype(np.float32) @ profiles.astype(np.float32).T
    same_or_linked = (value_of[:, None] == value_of[None, :])
    for x, y in zip(ia, ib, strict=True):
        same_or_linked |= np.outer(value_of == x, value_of == y) | np.outer(value_of == y, value_of == x)
    expected = np.triu(same_or_linked & (sim >= 0.97), 1)
    assert 100 < expected.sum() < same_or_linked.sum() / 2  # a real mix of similar and dissimilar candidates
    brute = connected_components(coo_matrix(expected), directed=False)[1]
    asked = []

    def profiles_of(items):
        asked.append(items)
        return profiles[items]

    a, b, checked = dd.similar_row_pairs(value_of, ia, ib, 0.97, profiles_of)
    pairs = {tuple(sorted(p)) for p in zip(a.tolist(), b.tolist(), strict=True)}
    assert pairs == set(zip(*np.nonzero(expected), strict=True))
    assert checked == np.triu(same_or_linked, 1).sum() and len(asked) == 1
    monkeypatch.setattr(dd.near, "PAIR_BLOCK", 1000)  # value 7's 45,150 pairs are now tiled, 64 x 64, to a forest
    monkeypatch.setattr(dd.near, "TILE", 64)
    a, b, _ = dd.similar_row_pairs(value_of, ia, ib, 0.97, profiles_of)
    n = len(value_of)
    ours = connected_components(coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n)), directed=False)[1]
    assert same_partition(ours, brute) and len(a) < expected.sum()


# ---------------------------------------------------------------- banded candidate search


def planted_hashes(n: int, threshold: int, seed: int) -> np.ndarray:
    """Random 64-bit hashes, half of them near copies of others at distances 0..threshold+2."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) * np.uint64(2) + np.uint64(1)
    copies = base[rng.integers(0, n, n)].copy()
    for i, flips in enumerate(rng.integers(0, threshold + 3, n)):
        for bit in rng.choice(64, flips, replace=False):
            copies[i] ^= np.uint64(1) << np.uint64(bit)
    return np.unique(np.r_[base, copies])


@pytest.mark.parametrize(("threshold", "bands"), [(3, 4), (3, 6), (8, 9), (8, 11), (20, 21)])
def test_bucket_pairs_are_exactly_the_pairs_within_the_threshold(threshold, bands):
    values = planted_hashes(400, threshold, seed=threshold * 100 + bands)
    spec = dd.BandSpec(threshold, bands)
    a, b, stats = dd.search(values, spec)
    found = {tuple(sorted(p)) for p in zip(a.tolist(), b.tolist(), strict=True)}
    assert len(found) == len(a)  # each pair once, from the first key its two hashes agree on
    # the keys split into groups (as tasks do) find the same pairs
    parts = [dd.search(values, spec, keys=g.tolist()) for g in np.array_split(np.arange(spec.n_keys), 3)]
    assert sorted(zip(np.concatenate([p[0] for p in parts]).tolist(), np.concatenate([p[1] for p in parts]).tolist(),
                      strict=True)) == sorted(zip(a.tolist(), b.tolist(), strict=True))
    dist = imagehash.hamming(values[:, None], values[None, :])
    ii, jj = np.nonzero(np.triu(dist <= threshold, 1))
    assert found == {tuple(sorted((int(values[i]), int(values[j])))) for i, j in zip(ii, jj, strict=True)}
    assert len(found) > len(values) // 4 and stats["pairs_compared"] >= len(found)


def test_a_bucket_too_big_to_compare_at_once_is_tiled_and_keeps_every_link():
    rng = np.random.default_rng(5)
    # 5,000 hashes sharing their lowest 40 bits fill one bucket of every key made only of those bands
    high = rng.integers(0, 2**24, 5000, dtype=np.int64).astype(np.uint64) << np.uint64(40)
    values = np.unique(high | np.uint64(0x5A5A5A5A5A))
    spec = dd.BandSpec(3, 8)
    pa, pb, stats = dd.search(values, spec)
    assert stats["largest_bucket"] == len(values) > dd.BIG_BUCKET
    index = {v: i for i, v in enumerate(values.tolist())}
    a = [index[v] for v in pa.tolist()]
    b = [index[v] for v in pb.tolist()]
    ours = connected_components(coo_matrix((np.ones(len(a)), (a, b)), shape=(len(values),) * 2), directed=False)[1]
    assert same_partition(ours, brute_components(values, 3))


def test_bands_are_chosen_within_bounds_and_bad_settings_refused():
    assert dd.choose_bands(8, 10) == 9  # few hashes: the classic d + 1 single-band keys
    assert 9 < dd.choose_bands(8, 10_000_000) <= 16  # many: keys of several bands, so buckets stay small
    # skew: hashes crowded in a corner of the space (their 40 high bits equal) need longer keys than uniform ones
    rng = np.random.default_rng(1)
    uniform = np.unique(rng.integers(0, 2**63, 50_000, dtype=np.int64).astype(np.uint64))
    crowded = np.unique(uniform & np.uint64(0xFFFFFF) | np.uint64(0xABCDEF) << np.uint64(40))
    assert dd.choose_bands(8, 1_000_000, crowded) != dd.choose_bands(8, 1_000_000, uniform)
    with pytest.raises(InputError, match="threshold 64"):
        dd.choose_bands(64, 10)


# ---------------------------------------------------------------- the stage on synthetic data


@pytest.fixture(scope="module")
def deduped(clean_catalog, synth_dir, client, tmp_path_factory):
    url = str(tmp_path_factory.mktemp("dedup") / "cat.zarr")
    shutil.copytree(clean_catalog[0], url)
    report = dd.dedup(url, methods="exact,near", client=client, progress=False)
    truth = json.loads((synth_dir / "truth.json").read_text())
    return url, report, truth


def test_exact_groups_are_the_planted_exact_copies(deduped):
    url, report, truth = deduped
    ds = open_catalog(url)[["image_id", "status", "dup_exact", "dup_near", "dup_keep"]].compute()
    row = {k: i for i, k in enumerate(ds["image_id"].values)}
    exact = ds["dup_exact"].values
    planted = {(row[d["copy_of"]], row[d["image_id"]]) for d in truth["duplicates"] if d["kind"] == "exact"}
    # every group of two or more rows, as a set of rows
    groups = pd.Series(np.arange(len(exact))[exact >= 0]).groupby(exact[exact >= 0]).apply(frozenset)
    found = {g for g in groups if len(g) > 1}
    assert found == {frozenset(p) for p in planted}  # recall = precision = 1.0
    assert report.per_method["exact"]["groups"] == len(planted) == report.per_method["exact"]["duplicates"]
    bad = ds["status"].values != "ok"
    assert bad.sum() == len(truth["corrupt"]) and (exact[bad] == -1).all() and not ds["dup_keep"].values[bad].any()
    pairs = dd.duplicate_pairs(url, method="exact")
    assert {frozenset(p) for p in zip(pairs["row_a"], pairs["row_b"], strict=True)} == found
    assert (pairs["distance"] == 0).all() and set(pairs["method"]) == {"exact"}
    cross = dd.cross_source_pairs(url, method="exact")
    assert len(cross) == (pairs["source_a"] != pairs["source_b"]).sum() > 0


def test_near_groups_equal_brute_force_union_find_of_the_stored_phash(deduped, client):
    url, report, truth = deduped
    ds = open_catalog(url)[["image_id", "status", "phash", "dup_near"]].compute()
    ok = ds["status"].values == "ok"
    phash, near = ds["phash"].values, ds["dup_near"].values
    assert (near[~ok] == -1).all() and (phash[~ok] == 0).all()
    # stored bits are the pHash of the stored pixels
    rows = np.flatnonzero(ok)[:50]
    assert (imagehash.phashes(catalog.read_images(url, rows)) == phash[rows]).all()
    # brute force over all pairs of rows: within the threshold and profiles correlated at the default or more
    profile = catalog.open_group(url)[dd.PHASH_PROFILE][:][ok].astype(np.float32)
    assert np.allclose(np.linalg.norm(profile, axis=1), 1, atol=2e-3)
    close = imagehash.hamming(phash[ok][:, None], phash[ok][None, :]) <= dd.DEFAULT_NEAR_THRESHOLD
    similar = profile @ profile.T >= dd.DEFAULT_NEAR_SIMILARITY
    expected = connected_components(coo_matrix(np.triu(close & similar, 1)), directed=False)[1]
    assert same_partition(near[ok], expected)
    facts = report.per_method["near"]
    assert facts["threshold"] == dd.DEFAULT_NEAR_THRESHOLD and facts["bands"] > facts["threshold"]
    unique, inverse = np.unique(phash[ok], return_inverse=True)
    assert facts["unique_hashes"] == len(unique) < ok.sum()  # identical hashes were collapsed first
    assert facts["row_pairs_checked"] >= facts["row_pairs_similar"] == np.triu(close & similar, 1).sum()
    # without the profile check: the components of the pHash bits alone, found on the unique hashes
    bits_only, _ = dd.near_groups(client, Catalog.open(url), ok, phash, dd.DEFAULT_NEAR_THRESHOLD, None, None)
    assert same_partition(bits_only[ok], brute_components(unique, dd.DEFAULT_NEAR_THRESHOLD)[inverse])
    assert len(np.unique(bits_only[ok])) < len(np.unique(near[ok]))  # the check split some groups
    # every planted copy within the threshold of its original is found (what a pHash can find)
    row = {k: i for i, k in enumerate(ds["image_id"].values)}
    for d in truth["duplicates"]:
        a, b = row[d["image_id"]], row[d["copy_of"]]
        if imagehash.hamming(phash[a], phash[b]) <= dd.DEFAULT_NEAR_THRESHOLD:
            assert near[a] == near[b], d


def near_scores(url: str, truth: dict) -> tuple[float, float]:
    """Recall of the planted near copies (copy and original in one ``dup_near`` group) and the pair precision
    of the groups (pairs of rows grouped together that are a planted original and its copy, or two copies of it)."""
    ds = open_catalog(url)[["image_id", "dup_near"]].compute()
    row = {k: i for i, k in enumerate(ds["image_id"].values)}
    groups = ds["dup_near"].values
    near = [(row[d["copy_of"]], row[d["image_id"]]) for d in truth["duplicates"] if d["kind"] == "near"]
    recall = float(np.mean([groups[a] == groups[b] for a, b in near]))
    family = np.arange(len(groups))
    for d in truth["duplicates"]:
        family[row[d["image_id"]]] = row[d["copy_of"]]
    frame = pd.DataFrame({"group": groups, "family": family})[groups >= 0]
    pairs = lambda sizes: int((sizes * (sizes - 1) // 2).sum())  # noqa: E731
    grouped, true = pairs(frame.groupby("group").size()), pairs(frame.groupby(["group", "family"]).size())
    return recall, true / max(1, grouped)


def test_near_groups_recover_the_planted_near_copies(deduped):
    url, _, truth = deduped
    recall, _ = near_scores(url, truth)
    assert recall >= 0.95


def test_near_groups_are_precise_enough_for_the_acceptance(deduped):
    url, _, truth = deduped
    recall, precision = near_scores(url, truth)
    assert recall >= 0.95 and precision >= 0.99


def test_keep_is_one_best_row_per_group_of_the_union_of_methods(deduped):
    url, report, _ = deduped
    ds = open_catalog(url)[["status", "lineage", "width", "height", "dup_exact", "dup_near", "dup_keep"]].compute()
    n = ds.sizes["image"]
    ok = ds["status"].values == "ok"
    a = np.r_[np.flatnonzero(ok), np.flatnonzero(ok)]
    b = np.r_[ds["dup_exact"].values[ok], ds["dup_near"].values[ok]]
    labels = connected_components(coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n)), directed=False)[1]
    frame = pd.DataFrame({"group": labels, "keep": ds["dup_keep"].values, "labelled": ds["lineage"].values != "",
                          "area": ds["width"].values.astype(int) * ds["height"].values, "row": np.arange(n)})[ok]
    assert (frame.groupby("group")["keep"].sum() == 1).all()
    best = frame.sort_values(["labelled", "area", "row"], ascending=[False, False, True]).groupby("group").head(1)
    assert set(best["row"]) == set(frame["row"][frame["keep"]])
    assert report.kept == frame["keep"].sum() and report.removed == ok.sum() - report.kept
    # a group id is the row its method keeps, which keeps itself
    for name in ("dup_exact", "dup_near"):
        ids = ds[name].values[ok]
        assert (ds[name].values[ids] == ids).all()
    attrs = catalog.open_group(url)["dup_keep"].attrs
    assert attrs["methods"] == ["exact", "near"] and "lineage" in attrs["keep_rule"]
    assert catalog.metadata(catalog.open_group(url))["stages"]["dedup"]["methods"] == ["exact", "near"]


def test_leakage_report_lists_planted_copies_in_different_splits(deduped, tmp_path):
    url = str(tmp_path / "cat.zarr")
    shutil.copytree(deduped[0], url)
    truth = deduped[2]
    with pytest.raises(CatalogError, match="no split array"):
        dd.leakage_report(url)
    assign_splits(url, seed=42)
    ds = open_catalog(url)[["image_id", "split"]].compute()
    row = {k: i for i, k in enumerate(ds["image_id"].values)}
    split = ds["split"].values
    order = {s: i for i, s in enumerate(dd.SPLITS)}
    expected = set()
    for d in truth["duplicates"]:
        if d["kind"] != "exact":
            continue
        pair = sorted((row[d["image_id"]], row[d["copy_of"]]), key=lambda r: (order.get(split[r], 9), r))
        if split[pair[0]] in order and split[pair[1]] in order and split[pair[0]] != split[pair[1]]:
            expected.add((pair[0], pair[1], split[pair[0]], split[pair[1]]))
    assert any(t[2:] == ("train", "test") for t in expected)  # the case that matters is there
    leaks = dd.leakage_report(url, method="exact")
    assert set(zip(leaks["row_a"], leaks["row_b"], leaks["split_a"], leaks["split_b"], strict=True)) == expected
    stored = dd.read_report(url, "exact_leakage")
    pd.testing.assert_frame_equal(stored, leaks)


def test_hash_pass_resumes_from_its_markers(deduped, client, tmp_path):
    url = str(tmp_path / "cat.zarr")
    shutil.copytree(deduped[0], url)
    before = open_catalog(url)["phash"].values.copy()
    group = catalog.open_group(url, mode="r+")
    shard_len = catalog.metadata(group)["shard_len"]
    fs, root = catalog._fs(url, None)
    fs.rm(f"{root}/_pzscale/done/{dd.HASH_STAGE}/000003.json")
    catalog.write_arrays(group, 3 * shard_len, 4 * shard_len, {"phash": np.zeros(shard_len, np.uint64)})
    report = dd.hash_images(url, client=client, progress=False)
    assert (report.shards_written, report.shards_skipped, report.rows_computed) == (1, report.shards_total - 1,
                                                                                    shard_len)
    assert (open_catalog(url)["phash"].values == before).all()


def test_hash_markers_of_an_older_pass_without_profiles_are_redone(deduped, client, tmp_path):
    url = str(tmp_path / "cat.zarr")
    shutil.copytree(deduped[0], url)
    group = catalog.open_group(url, mode="r+")
    before = group[dd.PHASH_PROFILE][:]
    shard_len, n = catalog.metadata(group)["shard_len"], catalog.n_rows_of(group)
    fs, root = catalog._fs(url, None)
    marker = f"{root}/_pzscale/done/{dd.HASH_STAGE}/000001.json"
    info = json.loads(fs.cat_file(marker))
    fs.pipe_file(marker, json.dumps({k: v for k, v in info.items() if k != "arrays"}).encode())  # as before
    catalog.write_arrays(group, shard_len, 2 * shard_len, {dd.PHASH_PROFILE: np.zeros_like(before[:shard_len])})
    report = dd.hash_images(url, client=client, progress=False)
    assert (report.shards_written, report.rows_computed) == (1, min(shard_len, n - shard_len))
    np.testing.assert_array_equal(catalog.open_group(url)[dd.PHASH_PROFILE][:], before)
    assert json.loads(fs.cat_file(marker))["arrays"] == list(dd.HASH_ARRAYS)
    assert dd.hash_images(url, client=client, progress=False).shards_written == 0


def test_bad_arguments_fail_before_any_work(deduped, client):
    url = deduped[0]
    with pytest.raises(InputError, match="choose among exact, near, semantic"):
        dd.dedup(url, methods="exact,fuzzy", client=client)
    with pytest.raises(InputError, match="pigeonhole"):
        dd.dedup(url, near_threshold=8, bands=8, client=client)
    with pytest.raises(InputError, match="near similarity 1.5"):
        dd.dedup(url, near_similarity=1.5, client=client)
    with pytest.raises(CatalogError, match="run `pzscale embed` first"):
        dd.dedup(url, methods="semantic", client=client)


# ---------------------------------------------------------------- real IFCB data from two sources


def test_ifcb_rois_from_the_raw_bin_and_the_shipped_pngs_are_cross_source_duplicates(sample_data, client,
                                                                                        tmp_path):
    url = str(tmp_path / "cat.zarr")
    raw = sample_data / CLASSIPYR / "raw/2022/D20220522" / f"{BIN}.roi"
    ingest([str(raw)], url, format="ifcb", source="ifcb_raw", shard_len=64, client=client, progress=False)
    ingest([str(sample_data / CLASSIPYR / "png")], url, format="folder", source="ifcb_png", append=True,
           client=client, progress=False)
    report = dd.dedup(url, methods="exact,near", client=client, progress=False)
    ds = open_catalog(url)[["image_id", "source", "dup_near", "dup_keep"]].compute()
    roi = [i.rsplit("_", 1)[1].split(".")[0] for i in ds["image_id"].values]  # 00002 ... from either name
    sources = ds["source"].values
    assert sorted(sources) == ["ifcb_png"] * 7 + ["ifcb_raw"] * 7
    for number in set(roi):  # each ROI: its raw row and its PNG row, one group, nothing else in it
        rows = [i for i, r in enumerate(roi) if r == number]
        assert len(rows) == 2 and len(set(ds["dup_near"].values[rows])) == 1
        assert (ds["dup_near"].values == ds["dup_near"].values[rows[0]]).sum() == 2
    cross = dd.cross_source_pairs(url, method="near")
    assert len(cross) == 7 and set(cross["source_a"]) | set(cross["source_b"]) == {"ifcb_raw", "ifcb_png"}
    assert (cross["distance"] <= 2).all()
    # the PNG exports are min-max stretched, so their pixels differ from the raw ROI: near, not exact
    assert report.per_method["exact"]["groups"] == 0 and report.kept == 7


# ---------------------------------------------------------------- semantic


def test_semdedup_finds_planted_embeddings_and_tiles_change_nothing(clean_catalog, synth_dir, client, tmp_path):
    url = str(tmp_path / "cat.zarr")
    shutil.copytree(clean_catalog[0], url)
    truth = json.loads((synth_dir / "truth.json").read_text())
    group = catalog.open_group(url, mode="r+")
    n, shard_len = catalog.n_rows_of(group), catalog.metadata(group)["shard_len"]
    row = {k: i for i, k in enumerate(group["image_id"][:])}
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(n, 32)).astype(np.float32)
    for d in truth["duplicates"]:  # every planted copy: its original's vector plus a little noise
        emb[row[d["image_id"]]] = emb[row[d["copy_of"]]] + rng.normal(scale=0.01, size=32)
    emb[group["status"][:] != "ok"] = np.nan
    catalog.ensure_array(group, "emb__toy", dtype="float16", fill=np.nan, trailing=(32,), dims=("toy__dim",))
    for _, a, b in catalog.shard_ranges(0, n, shard_len):
        catalog.write_arrays(group, a, b, {"emb__toy": emb[a:b].astype(np.float16)})
    report = dd.dedup(url, methods=["semantic"], embedding="toy", client=client, progress=False)
    sem = open_catalog(url)["dup_semantic"].values
    expected = {frozenset((row[d["image_id"]], row[d["copy_of"]])) for d in truth["duplicates"]}
    merged = pd.DataFrame({"o": [min(p) for p in expected], "r": [max(p) for p in expected]})
    # originals copied twice make groups of three: compare as components
    labels = connected_components(coo_matrix((np.ones(len(merged)), (merged["o"], merged["r"])), shape=(n, n)),
                                  directed=False)[1]
    ok = np.isfinite(emb).all(1)
    assert same_partition(sem[ok], labels[ok]) and (sem[~ok] == -1).all()
    facts = report.per_method["semantic"]
    assert facts["embedding"] == "emb__toy" and facts["n_clusters"] == round(np.sqrt(ok.sum()))
    attrs = catalog.open_group(url)["dup_semantic"].attrs
    assert attrs["embedding"] == "emb__toy" and attrs["eps"] == dd.DEFAULT_EPS
    hist = dd.similarity_histogram(url)
    grouped = (sem >= 0) & (np.bincount(sem[sem >= 0], minlength=n)[np.maximum(sem, 0)] > 1)
    assert hist.loc[hist["bin_low"] >= 0.99, "rows"].sum() == grouped.sum()  # every planted row, nothing else
    pairs = dd.duplicate_pairs(url, method="semantic")
    assert (pairs["similarity"] > 1 - dd.DEFAULT_EPS).all() and len(pairs) == report.per_method["semantic"][
        "duplicates"]
    # one cluster compared in tiles of 7 rows or all at once, in numpy or torch, gives the same groups
    rows = np.flatnonzero(ok)
    keep = np.isin(rows, merged.to_numpy().ravel()) | (rows < 150)  # every planted row and some others
    rows = rows[keep]
    x = emb[rows] / np.linalg.norm(emb[rows], axis=1, keepdims=True)
    one = np.zeros(len(rows), int)
    whole = dd.semantic_block(x, rows, one, rows, 0.01)
    assert len(whole["member"]) == len(np.unique(merged.to_numpy()))  # every planted row is in a group
    for variant in (dd.semantic_block(x, rows, one, rows, 0.01, tile=7),
                    dd.semantic_block(x, rows, one, rows, 0.01, device="cpu", tile=16)):  # torch: a GPU's path
        for key in ("member", "root", "histogram"):
            np.testing.assert_array_equal(whole[key], variant[key])
        np.testing.assert_allclose(whole["similarity"], variant["similarity"], atol=1e-6)


def test_spherical_kmeans_separates_clusters_and_is_seeded():
    rng = np.random.default_rng(0)
    centres = np.eye(8, dtype=np.float32)[:4]
    x = np.repeat(centres, 50, axis=0) + rng.normal(scale=0.05, size=(200, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    found = dd.spherical_kmeans(x, 4, seed=1, device="cpu")
    assert np.allclose(np.sort((found @ centres.T).max(0)), 1, atol=0.01)
    np.testing.assert_array_equal(found, dd.spherical_kmeans(x, 4, seed=1, device="cpu"))


def _planted_embeddings(url: str, n_clusters: int, dim: int = 32, seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Write ``emb__toy`` (float16) with planted clusters into a catalog copy; the stored vectors L2-normalised
    (float32, rows with status ok) and each row's planted cluster."""
    group = catalog.open_group(url, mode="r+")
    n, shard_len = catalog.n_rows_of(group), catalog.metadata(group)["shard_len"]
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, n_clusters, n)
    emb = (rng.normal(size=(n_clusters, dim)) * 3)[truth] + rng.normal(size=(n, dim))
    emb[group["status"][:] != "ok"] = np.nan
    catalog.ensure_array(group, "emb__toy", dtype="float16", fill=np.nan, trailing=(dim,), dims=("toy__dim",))
    for _, a, b in catalog.shard_ranges(0, n, shard_len):
        catalog.write_arrays(group, a, b, {"emb__toy": emb[a:b].astype(np.float16)})
    stored = group["emb__toy"][:].astype(np.float32)
    return stored / np.linalg.norm(stored, axis=1, keepdims=True), truth


def test_semantic_kmeans_on_workers_matches_in_memory_and_sklearn(cat_url, client):
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    from pzscale.dedup.semantic import kmeans_on_workers

    x, truth = _planted_embeddings(cat_url, 8)
    ok = np.isfinite(x).all(1)
    cat = Catalog.open(cat_url)
    km = kmeans_on_workers(client, cat, "emb__toy", 8, seed=2)
    assert km.k == 8 and km.n_valid == ok.sum() and km.converged and km.changed[-1] == 0
    assert (km.labels[~ok] == -1).all() and (km.labels[ok] >= 0).all()
    assert km.tasks_per_pass == 7 and km.cached  # 19 shards of 64 rows, 3 a task (about 4 tasks per worker)
    # the labels are each row's nearest returned centroid
    np.testing.assert_array_equal(km.labels[ok], np.argmax(x[ok] @ km.centroids.T, axis=1))
    memory = np.argmax(x[ok] @ dd.spherical_kmeans(x[ok], 8, seed=2, device="cpu").T, axis=1)
    peer = KMeans(8, n_init=3, random_state=0).fit(x[ok]).labels_
    for other in (truth[ok], memory, peer):
        assert adjusted_rand_score(km.labels[ok], other) == 1.0
    # seeded: the same run again gives the same result; re-reading the catalog every pass, in groups of one
    # shard, the same partition
    again = kmeans_on_workers(client, cat, "emb__toy", 8, seed=2)
    np.testing.assert_array_equal(km.labels, again.labels)
    np.testing.assert_array_equal(km.centroids, again.centroids)
    reread = kmeans_on_workers(client, cat, "emb__toy", 8, seed=2, cache=False, shards_per_task=1)
    assert not reread.cached and reread.tasks_per_pass == len(cat.shards())
    assert adjusted_rand_score(km.labels[ok], reread.labels[ok]) == 1.0
    np.testing.assert_allclose(km.centroids, reread.centroids, atol=1e-5)
    # more clusters than distinct vectors: clusters go empty, are re-seeded, and the run still ends sanely
    group = catalog.open_group(cat_url, mode="r+")
    catalog.ensure_array(group, "emb__two", dtype="float16", fill=np.nan, trailing=(4,), dims=("two__dim",))
    two = np.eye(4, dtype=np.float16)[truth % 2]
    for _, a, b in cat.shards():
        catalog.write_arrays(group, a, b, {"emb__two": two[a:b]})
    few = kmeans_on_workers(client, Catalog.open(cat_url), "emb__two", 5, seed=2, iters=4)
    assert few.k == 5 and few.converged and few.iterations == 1  # the empty ones were re-seeded in between
    assert np.allclose(np.linalg.norm(few.centroids, axis=1), 1)
    assert adjusted_rand_score(few.labels[ok], truth[ok] % 2) == 1.0


def test_semantic_kmeans_reseeds_empty_clusters():
    from pzscale.dedup.semantic import _kmeans_pp, _new_centroids

    far = np.eye(4, dtype=np.float32)[[2, 3]]
    total = {"sums": np.array([[2.0, 0, 0, 0], [0, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]),
             "counts": np.array([2, 0, 3, 0, 0]), "far_x": far}
    fallback = -np.eye(4, dtype=np.float32)
    new = _new_centroids(total, 5, fallback, np.random.default_rng(0))
    np.testing.assert_array_equal(new[[0, 2]], np.eye(4)[[0, 1]])
    np.testing.assert_array_equal(new[[1, 3]], far)  # the farthest rows first, in order
    assert np.isin(new[4], fallback).all() and np.isclose(np.linalg.norm(new[4]), 1)  # then the init sample
    np.testing.assert_array_equal(new, _new_centroids(total, 5, fallback, np.random.default_rng(0)))
    # k-means++ with fewer distinct rows than k still returns k seeds, seeded
    x = np.repeat(np.eye(4, dtype=np.float32)[:2], 5, axis=0)
    seeds = _kmeans_pp(x, 3, 0)
    assert seeds.shape == (3, 4) and len(np.unique(seeds, axis=0)) == 2
    np.testing.assert_array_equal(seeds, _kmeans_pp(x, 3, 0))


# ---------------------------------------------------------------- CLI


def test_cli_dedup_and_reports(deduped, client, tmp_path):
    url = str(tmp_path / "cat.zarr")
    shutil.copytree(deduped[0], url)
    runner = CliRunner()
    result = runner.invoke(app, ["dedup", "--catalog", url, "--method", "exact", "--scheduler",
                                 client.scheduler.address])
    assert result.exit_code == 0, result.output
    assert "exact   : 24 groups with 24 duplicate rows" in result.output
    out = tmp_path / "cross.csv"
    result = runner.invoke(app, ["dedup-report", "cross-source", "--catalog", url, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert len(pd.read_csv(out)) == len(dd.cross_source_pairs(url)) > 0
    result = runner.invoke(app, ["dedup-report", "leakage", "--catalog", url])
    assert result.exit_code == 1 and result.output.strip().endswith("no split array (run `pzscale split` first)")
