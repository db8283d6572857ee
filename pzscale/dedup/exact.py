"""Exact duplicates: rows whose decoded pixels hash alike, grouped by a Dask shuffle on the hash."""

from __future__ import annotations

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
from distributed import Client

from pzscale.dedup.common import PIXEL_HASH
from pzscale.dedup.graph import components
from pzscale.schema import STATUS_OK
from pzscale.stage import Catalog, retry


def _exact_frame(start: int, stop: int, cat: Catalog) -> pd.DataFrame:
    return retry(_read_exact, cat, start, stop)


def _read_exact(cat: Catalog, start: int, stop: int) -> pd.DataFrame:
    cols = cat.read(start, stop, ["status", PIXEL_HASH])
    ok, words = cols["status"] == STATUS_OK, cols[PIXEL_HASH]
    return pd.DataFrame({"row": (np.flatnonzero(ok) + start).astype(np.int64),
                         "h0": words[ok, 0], "h1": words[ok, 1]})


def _exact_edges(part: pd.DataFrame) -> pd.DataFrame:
    """Each row of a run of equal pixel hashes linked to the run's first row."""
    if len(part) < 2:
        return pd.DataFrame({"a": np.zeros(0, np.int64), "b": np.zeros(0, np.int64)})
    part = part.sort_values(["h0", "h1", "row"])
    h0, h1, rows = part["h0"].to_numpy(), part["h1"].to_numpy(), part["row"].to_numpy()
    new = np.r_[True, (h0[1:] != h0[:-1]) | (h1[1:] != h1[:-1])]
    first = rows[np.flatnonzero(new)][np.cumsum(new) - 1]
    linked = first != rows
    return pd.DataFrame({"a": first[linked], "b": rows[linked]})


def exact_groups(client: Client, cat: Catalog, ok: np.ndarray) -> tuple[np.ndarray, dict]:
    """Component label per row: rows with the same pixel hash (shuffle on the hash)."""
    meta = pd.DataFrame({"row": np.zeros(0, np.int64), "h0": np.zeros(0, np.uint64), "h1": np.zeros(0, np.uint64)})
    ranges = cat.shards()
    frame = dd.from_map(_exact_frame, [a for _, a, _ in ranges], [b for _, _, b in ranges], cat=cat,
                        meta=meta, enforce_metadata=False)
    shuffled = frame.shuffle(on=["h0", "h1"], npartitions=max(1, len(ranges)))
    parts = client.gather(client.compute([dask.delayed(_exact_edges)(p) for p in shuffled.to_delayed()]))
    edges = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({"a": [], "b": []})
    labels = components(cat.n_rows, edges["a"].to_numpy(), edges["b"].to_numpy(), ok)
    return labels, {"edges": len(edges)}
