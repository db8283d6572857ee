"""Taxonomy harmonisation with a Planktonzilla-format mapping table, and its report.

The table (Planktonzilla's ``planktonzilla_taxonomy.csv`` or any file in that format) maps
(``Dataset``, ``Raw_Labels``) to seven ranks, ``proposed_label``, ``plankton``,
``root_class``, ``qualifier`` and external ids. It is a user-supplied file or URL, never
bundled with pzscale.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from functools import lru_cache

import fsspec
import numpy as np
import pandas as pd

from pzscale.errors import InputError
from pzscale.schema import RANKS, lineage

TABLE_COLUMNS = ("Dataset", "Raw_Labels", "Kingdom", "Phylum", "Class", "Order", "Family", "Genus", "Species",
                 "proposed_label", "plankton", "root_class", "qualifier")
ID_COLUMNS = {"aphia_ID": "aphia_id", "wikidata_ID": "wikidata_id", "NCBI_ID": "ncbi_id", "BOLD_ID": "bold_id",
              "ecotaxa_ID": "ecotaxa_id"}


def normalise_id(value: object) -> str:
    """'12345.0' -> '12345' (KI-12: numeric ids written as floats); '' for missing."""
    text = "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value).strip()
    if text.endswith(".0") and text[:-2].isdigit():
        return text[:-2]
    return "" if text.lower() == "nan" else text


def read_table(url: str, *, storage_options: dict | None = None) -> pd.DataFrame:
    """Load a mapping table; one row per (Dataset, Raw_Labels), ids normalised to integers' text."""
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as fh:
            raw = fh.read()
        table = pd.read_csv(pd.io.common.BytesIO(raw), dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise InputError(f"{url}: cannot read taxonomy table ({' '.join(str(e).split())[:200]})") from None
    missing = [c for c in TABLE_COLUMNS if c not in table.columns]
    if missing:
        raise InputError(f"{url}: not a Planktonzilla taxonomy table, missing column(s) {', '.join(missing)}")
    for col in ID_COLUMNS:
        table[col] = table[col].map(normalise_id) if col in table.columns else ""
    for col in TABLE_COLUMNS[2:]:
        table[col] = table[col].str.strip()
    table["lineage"] = [lineage(list(r)) for r in table[[r.capitalize() for r in RANKS]].itertuples(index=False)]
    table.attrs["sha256"] = hashlib.sha256(raw).hexdigest()
    duplicated = table.duplicated(["Dataset", "Raw_Labels"], keep="first")
    return table[~duplicated].set_index(["Dataset", "Raw_Labels"])


@lru_cache(maxsize=4)
def cached_table(url: str, storage_options_key: str = "") -> pd.DataFrame:
    """Per-process cache, so each worker loads the table once, not once per shard."""
    import json

    return read_table(url, storage_options=json.loads(storage_options_key) if storage_options_key else None)


def apply(table: pd.DataFrame, columns: dict[str, np.ndarray], *, table_source: str | None = None) -> None:
    """Fill taxonomy variables in ``columns`` (catalog variables of a shard) from ``table``.

    Only rows with no taxonomy yet (empty lineage and root_class) are filled, so labels a
    source already harmonised (Planktonzilla parquet) are never overwritten. Rows are
    looked up by (source, original_label), or by (``table_source``, original_label) to use
    another collection's mapping (e.g. a new UVP5 cruise mapped like ``global_uvp5``). A
    label the table lacks is tried again as the deepest node of ``original_hierarchy``
    (EcoTaxa's ``living>Eukaryota>...>Acantharea``).
    """
    deepest = np.array([h.rsplit(">", 1)[-1].strip() for h in columns["original_hierarchy"]], dtype=object)
    for labels in (columns["original_label"], deepest):
        unlabelled = (columns["lineage"] == "") & (columns["root_class"] == "")
        todo = np.flatnonzero(unlabelled & (labels != ""))
        if len(todo):
            _fill(table, columns, todo, labels[todo], table_source)


def _fill(table: pd.DataFrame, columns: dict[str, np.ndarray], todo: np.ndarray, labels: np.ndarray,
          table_source: str | None) -> None:
    sources = np.full(len(todo), table_source, dtype=object) if table_source else columns["source"][todo]
    found = table.reindex(pd.MultiIndex.from_arrays([sources, labels]))
    hit = found["root_class"].notna().to_numpy()
    rows, found = todo[hit], found[hit]
    for rank in RANKS:
        columns[rank][rows] = found[rank.capitalize()].to_numpy(dtype=object)
    for name in ("proposed_label", "root_class", "qualifier", "lineage"):
        columns[name][rows] = found[name].to_numpy(dtype=object)
    columns["plankton"][rows] = found["plankton"].str.lower().eq("true").to_numpy()
    for col, var in ID_COLUMNS.items():
        if var == "aphia_id":
            columns["aphia_id"][rows] = pd.to_numeric(found[col], errors="coerce").fillna(0).astype(np.int64)
        else:
            columns[var][rows] = found[col].to_numpy(dtype=object)


def table_mappings(table: pd.DataFrame) -> pd.DataFrame:
    """The table as (source, label, lineage, images) rows, for ``conflicts``."""
    flat = table.reset_index()
    return pd.DataFrame({"source": flat["Dataset"], "label": flat["Raw_Labels"], "lineage": flat["lineage"],
                         "images": np.nan})


def catalog_mappings(pairs: Counter) -> pd.DataFrame:
    """(source, label, lineage) -> image count from a catalog, as rows for ``conflicts``/``unmapped``."""
    return pd.DataFrame([(s, lab, lin, n) for (s, lab, lin), n in pairs.items()],
                        columns=["source", "label", "lineage", "images"])


def conflicts(mappings: pd.DataFrame) -> pd.DataFrame:
    """Raw labels (compared case-insensitively) mapped to different lineages in different sources.

    One row per (raw label, source, lineage) of every conflicting label, shallowest first,
    e.g. ``Harpacticoida`` mapped to the order in one source and to a genus in another.
    """
    m = mappings[(mappings["lineage"] != "") & (mappings["label"] != "")]
    m = m.assign(raw_label=m["label"].str.strip().str.lower())
    n_lineages = m.groupby("raw_label")["lineage"].nunique()
    bad = m[m["raw_label"].isin(n_lineages[n_lineages > 1].index)]
    bad = bad.assign(depth=bad["lineage"].str.split().str.len())
    cols = ["raw_label", "source", "label", "lineage", "depth", "images"]
    return bad[cols].sort_values(["raw_label", "depth", "source"]).reset_index(drop=True)


def unmapped(mappings: pd.DataFrame, table: pd.DataFrame | None = None) -> pd.DataFrame:
    """(source, raw label) pairs of a catalog that got no taxonomy, with their image counts,
    most images first; with ``table``, only pairs the table does not map either."""
    m = mappings[(mappings["label"] != "") & (mappings["lineage"] == "")]
    if table is not None:
        known = set(table.index)
        m = m.loc[np.array([(s, lab) not in known for s, lab in zip(m["source"], m["label"], strict=True)], bool)]
    out = m.groupby(["source", "label"], as_index=False)["images"].sum()
    return out.sort_values(["images", "source", "label"], ascending=[False, True, True]).reset_index(drop=True)
