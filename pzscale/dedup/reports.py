"""Dedup report tables under ``_pzscale/reports/dedup/`` (Parquet, readable with pandas from a local or s3://
catalog): duplicate pairs, cross-source pairs, train/test leakage and the semantic similarity histogram."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pandas as pd

from pzscale import catalog, imagehash
from pzscale.dedup.common import HIST_EDGES, METHODS, PHASH, REPORTS, SPLITS, parse_methods
from pzscale.errors import CatalogError
from pzscale.schema import SPLIT
from pzscale.stage import Catalog, retry


def report_path(url: str, name: str, *, storage_options: dict | None = None) -> tuple[Any, str]:
    """(filesystem, path) of a dedup report table inside the catalog (``_pzscale/reports/dedup/<name>.parquet``)."""
    fs, root = catalog._fs(url, storage_options)
    return fs, f"{root}/{catalog.PRIVATE}/{REPORTS}/{name}.parquet"


def write_report(url: str, name: str, table: pd.DataFrame, *, storage_options: dict | None = None) -> str:
    fs, path = report_path(url, name, storage_options=storage_options)
    buf = io.BytesIO()
    table.to_parquet(buf, index=False)
    retry(fs.makedirs, path.rsplit("/", 1)[0], exist_ok=True)
    retry(fs.pipe_file, path, buf.getvalue())
    return path


def read_report(url: str, name: str, *, storage_options: dict | None = None) -> pd.DataFrame:
    """A dedup report table as a DataFrame; CatalogError when it was never written."""
    fs, path = report_path(url, name, storage_options=storage_options)
    try:
        data = retry(fs.cat_file, path)
    except FileNotFoundError:
        raise CatalogError(f"{url}: no dedup report '{name}' (run pzscale dedup with that method first)") from None
    return pd.read_parquet(io.BytesIO(data))


def _read_columns(cat: Catalog, rows: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """Values of a few arrays at ``rows`` (one orthogonal read per array)."""
    unique, inverse = np.unique(rows, return_inverse=True)
    out = {}
    for name in names:
        values = retry(lambda n=name: cat.group()[n].get_orthogonal_selection((unique,))) if len(unique) else \
            np.zeros(0, object)
        out[name] = np.asarray(values)[inverse] if len(rows) else np.zeros(0, object)
    return out


def pairs_table(cat: Catalog, method: str, group_of: np.ndarray, phash: np.ndarray | None,
                similarity: np.ndarray | None) -> pd.DataFrame:
    """Every duplicate row (row_b) paired with its group's kept row (row_a)."""
    rows = np.flatnonzero((group_of >= 0) & (group_of != np.arange(len(group_of))))
    kept = group_of[rows]
    cols = _read_columns(cat, np.r_[kept, rows], ["image_id", "source"])
    n = len(rows)
    distance = np.zeros(n, np.float64)
    sim = np.full(n, np.nan, np.float32)
    if method == "near":
        distance = imagehash.hamming(phash[kept], phash[rows]).astype(np.float64)
    elif method == "semantic":
        sim = similarity[rows]
        distance = 1.0 - sim.astype(np.float64)
    ids, sources = cols["image_id"].astype(object), cols["source"].astype(object)
    return pd.DataFrame({"row_a": kept, "row_b": rows, "image_id_a": ids[:n], "image_id_b": ids[n:],
                         "source_a": sources[:n], "source_b": sources[n:], "method": method, "distance": distance,
                         "similarity": sim})


def histogram_table(counts: np.ndarray) -> pd.DataFrame:
    """Bins of each row's highest cosine similarity within its cluster; ``rows_at_or_above`` is how many rows
    a threshold at ``bin_low`` (eps = 1 - bin_low) would mark as having a duplicate."""
    counts = np.asarray(counts, np.int64)
    return pd.DataFrame({"bin_low": HIST_EDGES[:-1], "bin_high": HIST_EDGES[1:], "rows": counts,
                         "rows_at_or_above": np.cumsum(counts[::-1])[::-1], "eps": 1.0 - HIST_EDGES[:-1]})


def _methods_with_reports(url: str, method: str | None, so: dict | None) -> list[str]:
    if method is not None:
        return list(parse_methods(method))
    fs, path = report_path(url, "x", storage_options=so)
    try:
        names = {p.rsplit("/", 1)[-1] for p in retry(fs.ls, path.rsplit("/", 1)[0], detail=False)}
    except FileNotFoundError:
        names = set()
    found = [m for m in METHODS if f"{m}_pairs.parquet" in names]
    if not found:
        raise CatalogError(f"{url}: no dedup reports (run pzscale dedup first)")
    return found


def duplicate_pairs(url: str, *, method: str | None = None, storage_options: dict | None = None) -> pd.DataFrame:
    """Every duplicate row paired with the kept row of its group, for one method or all methods run.

    Columns: row_a (kept row), row_b, image_id_a, image_id_b, source_a, source_b, method, distance (Hamming
    bits for near, 0 for exact, 1 - cosine for semantic), similarity (cosine, semantic only).
    """
    tables = [read_report(url, f"{m}_pairs", storage_options=storage_options)
              for m in _methods_with_reports(url, method, storage_options)]
    return pd.concat(tables, ignore_index=True)


def cross_source_pairs(url: str, *, method: str | None = None, storage_options: dict | None = None) -> pd.DataFrame:
    """The duplicate pairs whose two rows come from different sources (same columns as ``duplicate_pairs``)."""
    tables = [read_report(url, f"{m}_cross_source", storage_options=storage_options)
              for m in _methods_with_reports(url, method, storage_options)]
    return pd.concat(tables, ignore_index=True)


def similarity_histogram(url: str, *, storage_options: dict | None = None) -> pd.DataFrame:
    """The semantic run's histogram of each row's highest similarity within its cluster (to choose eps)."""
    return read_report(url, "semantic_similarity_histogram", storage_options=storage_options)


def leakage_report(url: str, *, method: str | None = None, storage_options: dict | None = None) -> pd.DataFrame:
    """Duplicates that sit in different splits (train/val/test/unseen), from the catalog's current ``split``.

    For every group and every split it touches, the split's representative is its lowest row; each row is
    paired with the representative of every *earlier* split of its group (order train, val, test, unseen), so
    a test image with a copy in train is listed once with that copy. Columns: row_a, row_b, image_id_a/b,
    source_a/b, split_a, split_b, method, distance (Hamming for near, 0 for exact, NaN for semantic).
    Also written to ``_pzscale/reports/dedup/<method>_leakage.parquet``.
    """
    so = storage_options
    cat = Catalog.open(url, so, check=False)
    if SPLIT not in cat.arrays():
        raise CatalogError(f"{url}: no split array (run `pzscale split` first)")
    tables = []
    for m in _methods_with_reports(url, method, so):
        pairs = read_report(url, f"{m}_pairs", storage_options=so)
        members = pd.DataFrame({"group": np.r_[pairs["row_a"], pairs["row_a"]],
                                "row": np.r_[pairs["row_a"], pairs["row_b"]]}).drop_duplicates()
        cols = _read_columns(cat, members["row"].to_numpy(np.int64), [SPLIT, "image_id", "source"]
                             + ([PHASH] if m == "near" else []))
        members = members.assign(split=cols["split"].astype(object), image_id=cols["image_id"].astype(object),
                                 source=cols["source"].astype(object), rank=0)
        if m == "near":
            members["phash"] = cols["phash"].astype(np.uint64)
        members = members[members["split"].isin(SPLITS)]
        members["rank"] = members["split"].map({s: i for i, s in enumerate(SPLITS)})
        reps = members.sort_values("row").drop_duplicates(["group", "split"])
        joined = members.merge(reps, on="group", suffixes=("_b", "_a"))
        joined = joined[joined["rank_a"] < joined["rank_b"]]
        distance = (imagehash.hamming(joined["phash_a"].to_numpy(np.uint64), joined["phash_b"].to_numpy(np.uint64))
                    .astype(np.float64) if m == "near" else np.zeros(len(joined)) if m == "exact"
                    else np.full(len(joined), np.nan))
        table = pd.DataFrame({f"{col}_{end}": joined[f"{col}_{end}"].to_numpy()
                              for col in ("row", "image_id", "source", "split") for end in "ab"})
        table = table.assign(method=m, distance=distance)
        table = table.sort_values(["row_b", "row_a"]).reset_index(drop=True)
        write_report(url, f"{m}_leakage", table, storage_options=so)
        tables.append(table)
    return pd.concat(tables, ignore_index=True)
