"""Darwin Core export: an occurrence CSV for OBIS and GBIF, one row per identified image.

A row is written for every image whose status is ok and that has a taxon: the catalog's own
annotation (its deepest filled rank), or with ``model`` that model's prediction at the deepest
rank whose probability reaches ``min_prob`` (so an uncertain species falls back to a confident
genus or family). Columns (Darwin Core terms unless said):

- ``occurrenceID`` (the image_id), ``basisOfRecord`` = MachineObservation, ``occurrenceStatus`` = present;
- ``scientificName`` (``Genus epithet`` at species), ``taxonRank``, ``kingdom`` .. ``genus``,
  ``specificEpithet``, ``scientificNameID`` = urn:lsid:marinespecies.org:taxname:<AphiaID> when
  the catalog knows the AphiaID (for predictions: when the predicted lineage is one the catalog
  annotates with an AphiaID);
- ``decimalLatitude``, ``decimalLongitude``, ``geodeticDatum`` (WGS84 where known), ``eventDate``
  (ISO 8601 UTC), ``minimumDepthInMeters``, ``maximumDepthInMeters``;
- ``identificationVerificationStatus`` (PredictedByMachine for predictions; from the catalog's
  annotation status otherwise), ``identifiedBy``, ``identificationRemarks``;
- ``identificationConfidence``: the model's probability. Not a Darwin Core term: map it to an
  extended MeasurementOrFact record, or drop it, before publishing;
- ``datasetName`` (source), ``catalogNumber`` (object id), ``samplingProtocol`` (instrument), ``license``.

Each shard is written by its own task as a headerless part under ``<out>.parts/``; the client
then streams the parts (bytes, untouched), in shard order, after the header into ``out``, so memory stays flat.

The CSV is written by ``pzscale.tables.write_csv``: the header and every text cell quoted, numbers not, so
any character in a name (commas, quotes, tabs, line breaks, Unicode) reads back as written; a text cell
starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return is written with a leading ``'`` so a
spreadsheet never runs it as a formula (numbers such as a negative latitude are left as they are).
"""

from __future__ import annotations

import fsspec
import numpy as np
import pandas as pd
from distributed import Client

from pzscale import grids, tables
from pzscale.errors import CatalogError, InputError
from pzscale.schema import RANKS, STATUS_OK, TIME_FILL, predicting_models, prediction_name
from pzscale.stage import Catalog, map_shards, retry

COLUMNS = (
    "occurrenceID", "basisOfRecord", "occurrenceStatus", "scientificName", "scientificNameID", "taxonRank",
    "kingdom", "phylum", "class", "order", "family", "genus", "specificEpithet",
    "decimalLatitude", "decimalLongitude", "geodeticDatum", "eventDate", "minimumDepthInMeters",
    "maximumDepthInMeters", "identificationVerificationStatus", "identifiedBy", "identificationRemarks",
    "identificationConfidence", "datasetName", "catalogNumber", "samplingProtocol", "license",
)
WORMS_LSID = "urn:lsid:marinespecies.org:taxname:"
VERIFICATION = {"validated": "ValidatedByHuman", "predicted": "PredictedByMachine", "dubious": "Dubious"}
_READ = ("image_id", "source", "instrument", "object_id", *RANKS, "lineage", "aphia_id", "lat", "lon", "depth_min",
         "depth_max", "time", "annotation_status", "license", "status")


def _lineages_shard(cat: Catalog, start: int, stop: int) -> pd.DataFrame:
    frame = pd.DataFrame(cat.read(start, stop, [*RANKS, "lineage", "aphia_id"]))
    return frame[frame["lineage"] != ""].drop_duplicates()


def lineage_table(url: str | Catalog, *, storage_options: dict | None = None, client: Client | None = None
                  ) -> dict[str, tuple[tuple[str, ...], int]]:
    """Every annotated lineage and each of its word prefixes -> (ranks kingdom..species, AphiaID).

    A prefix gets the ranks up to its last word and AphiaID 0, unless some image is annotated
    with exactly that lineage (then its own ranks and AphiaID win).
    """
    parts = map_shards(_lineages_shard, Catalog.open(url, storage_options), client=client)
    frame = pd.concat(parts, ignore_index=True).drop_duplicates("lineage") if parts else pd.DataFrame()
    table: dict[str, tuple[tuple[str, ...], int]] = {}
    exact: dict[str, tuple[tuple[str, ...], int]] = {}
    if frame.empty:
        return table
    # one row per distinct lineage (hundreds), not per image
    for lineage, aphia, *ranks in zip(frame["lineage"], frame["aphia_id"], *(frame[r] for r in RANKS), strict=True):
        ranks = tuple(ranks)
        exact[lineage] = (ranks, int(aphia))
        filled = [r for r in ranks if r]
        for k in range(1, len(filled) + 1):
            kept = tuple(r if r and r in filled[:k] else "" for r in ranks)
            table.setdefault(" ".join(filled[:k]), (kept, 0))
    table.update(exact)
    return table


def _deepest(ranks: np.ndarray) -> np.ndarray:
    """Index of the deepest non-empty rank per row (-1 when none)."""
    filled = ranks != ""
    last = ranks.shape[1] - 1 - np.argmax(filled[:, ::-1], axis=1)
    return np.where(filled.any(axis=1), last, -1)


def occurrences(cols: dict[str, np.ndarray], *, model: str | None = None, min_prob: float = 0.0,
                predictions: dict[str, np.ndarray] | None = None,
                table: dict[str, tuple[tuple[str, ...], int]] | None = None) -> pd.DataFrame:
    """The occurrence rows (``COLUMNS``) of a block of catalog rows."""
    n = len(cols["image_id"])
    confidence = np.full(n, np.nan)
    if model is None:
        ranks = np.stack([np.asarray(cols[r], dtype=object) for r in RANKS], axis=1)
        aphia = np.asarray(cols["aphia_id"], dtype=np.int64)
        status = pd.Series(cols["annotation_status"], dtype=object)
        verification = status.map(VERIFICATION).fillna(status).to_numpy(object)
        identified_by = np.full(n, "", dtype=object)
        remarks = np.full(n, "", dtype=object)
    else:
        probs = np.stack([predictions[f"{r}_prob"] for r in RANKS], axis=1).astype(np.float64)
        confident = np.nan_to_num(probs, nan=-1.0) >= min_prob
        confident &= np.stack([predictions[r] != "" for r in RANKS], axis=1)
        level = np.where(confident.any(1), len(RANKS) - 1 - np.argmax(confident[:, ::-1], axis=1), -1)
        rows = np.arange(n)
        prefixes = np.stack([np.asarray(predictions[r], dtype=object) for r in RANKS], axis=1)
        prefix = np.where(level >= 0, prefixes[rows, np.maximum(level, 0)], "")
        # resolved once per distinct (prefix, rank): a few hundred per shard, not one per image
        keys = pd.Series(prefix, dtype=object) + "\x1f" + pd.Series(level).astype(str)
        codes, distinct = pd.factorize(keys)
        resolved = [(table or {}).get(p) or (_ranks_of_prefix(p, int(lv)), 0)
                    for p, lv in (k.split("\x1f") for k in distinct)]
        ranks = np.array([r for r, _ in resolved] or np.zeros((0, len(RANKS))), dtype=object)
        ranks = ranks.reshape(-1, len(RANKS))[codes] if n else np.zeros((0, len(RANKS)), dtype=object)
        aphia = np.array([a for _, a in resolved], dtype=np.int64)[codes] if n else np.zeros(0, np.int64)
        confidence = np.where(level >= 0, probs[rows, np.maximum(level, 0)], np.nan)
        verification = np.full(n, "PredictedByMachine", dtype=object)
        identified_by = np.full(n, f"pzscale model {model}", dtype=object)
    deepest = _deepest(ranks)
    if model is not None:
        rank_names = np.array(RANKS, dtype=object)[np.maximum(deepest, 0)]
        remarks = pd.Series(rank_names).str.cat(pd.Series(confidence).map("{:.3f}".format),
                                                sep=" predicted with probability ")
        remarks = (remarks + f" by model {model}").to_numpy(object)
    keep = (np.asarray(cols["status"]) == STATUS_OK) & (deepest >= 0)
    frame = pd.DataFrame({r: ranks[:, i] for i, r in enumerate(RANKS)})
    name = pd.Series(ranks[np.arange(n), np.maximum(deepest, 0)], dtype=object).str.capitalize()
    species = deepest == RANKS.index("species")
    binomial = frame["genus"].str.capitalize() + " " + frame["species"].str.lower()
    name = name.where(~species, binomial)
    lat, lon = np.asarray(cols["lat"], np.float64), np.asarray(cols["lon"], np.float64)
    time_ms = np.asarray(cols["time"], np.int64)
    event = pd.Series(pd.to_datetime(np.where(time_ms == TIME_FILL, np.iinfo(np.int64).min, time_ms), unit="ms"))
    out = pd.DataFrame({
        "occurrenceID": cols["image_id"],
        "basisOfRecord": "MachineObservation",
        "occurrenceStatus": "present",
        "scientificName": name,
        "scientificNameID": np.where(aphia > 0, np.char.add(WORMS_LSID, aphia.astype(str)), ""),
        "taxonRank": np.array(RANKS, dtype=object)[np.maximum(deepest, 0)],
        **{r: frame[r].str.capitalize() for r in RANKS[:-1]},
        "specificEpithet": frame["species"].str.lower(),
        "decimalLatitude": lat,
        "decimalLongitude": ((lon + 180.0) % 360.0) - 180.0,
        "geodeticDatum": np.where(np.isfinite(lat) & np.isfinite(lon), "WGS84", ""),
        "eventDate": event.dt.strftime("%Y-%m-%dT%H:%M:%SZ").fillna(""),
        "minimumDepthInMeters": np.asarray(cols["depth_min"], np.float64),
        "maximumDepthInMeters": np.asarray(cols["depth_max"], np.float64),
        "identificationVerificationStatus": verification,
        "identifiedBy": identified_by,
        "identificationRemarks": remarks,
        "identificationConfidence": confidence,
        "datasetName": cols["source"],
        "catalogNumber": cols["object_id"],
        "samplingProtocol": cols["instrument"],
        "license": cols["license"],
    })
    return out.loc[keep, list(COLUMNS)]


def _ranks_of_prefix(prefix: str, level: int) -> tuple[str, ...]:
    """Ranks of a predicted lineage prefix the catalog does not annotate: its last word at the
    predicted rank (both last words at species), nothing else known."""
    words = str(prefix).split()
    ranks = [""] * len(RANKS)
    if level >= 0 and words:
        if level == RANKS.index("species") and len(words) >= 2:
            ranks[RANKS.index("genus")], ranks[level] = words[-2], words[-1]
        else:
            ranks[level] = words[-1]
    return tuple(ranks)


def _part_path(out: str, shard: int) -> str:
    return f"{out}.parts/part-{shard:06d}.csv"


def _prediction_keys() -> list[str]:
    return [*RANKS, *(f"{r}_prob" for r in RANKS)]


def _write_part(cat: Catalog, start: int, stop: int, out: str, model: str | None, min_prob: float,
                table: dict | None, out_storage_options: dict | None) -> int:
    cols = cat.read(start, stop, _READ)
    predictions = None
    if model:
        names = {prediction_name(model, key): key for key in _prediction_keys()}
        predictions = {names[k]: v for k, v in cat.read(start, stop, list(names)).items()}
    frame = occurrences(cols, model=model, min_prob=min_prob, predictions=predictions, table=table)
    with fsspec.open(_part_path(out, start), "w", newline="", **(out_storage_options or {})) as fh:
        tables.write_csv(frame, fh, header=False)
    return len(frame)


def _join_parts(fs: fsspec.AbstractFileSystem, path: str, starts: list[int]) -> None:
    """The header, then every shard's part in row order, into ``path``; bytes are copied as they are (a text
    read would turn a quoted ``\\r`` into ``\\n``)."""
    with fs.open(path, "wb") as dest:
        dest.write(tables.write_csv(pd.DataFrame(columns=list(COLUMNS)), None).encode())
        for start in starts:
            with fs.open(_part_path(path, start), "rb") as part:
                while block := part.read(1 << 20):
                    dest.write(block)


def export_dwc(
    url: str,
    out: str,
    *,
    model: str | None = None,
    min_prob: float = 0.0,
    storage_options: dict | None = None,
    out_storage_options: dict | None = None,
    client: Client | None = None,
) -> dict:
    """Write the occurrence CSV ``out`` (local path or fsspec URL); one task per shard writes its part
    (on ``client`` or the current one, else in this process), then the parts are joined in row order.
    Text cells are quoted and numbers not (any character round-trips); a text cell starting with ``=``,
    ``+``, ``-``, ``@``, a tab or a carriage return gets a leading ``'`` (no spreadsheet formulas).
    Returns the rows written and the path."""
    if not 0.0 <= min_prob <= 1.0:
        raise InputError(f"min_prob must be within [0, 1], not {min_prob}")
    cat = Catalog.open(url, storage_options)
    table = None
    if model:
        present = cat.arrays()
        missing = [n for n in (prediction_name(model, k) for k in _prediction_keys()) if n not in present]
        if missing:
            raise CatalogError(f"{url}: no predictions of model {model!r} ({missing[0]} missing); models with "
                               f"predictions here: {predicting_models(present)}")
        table = lineage_table(cat, client=client)
    fs, path = fsspec.core.url_to_fs(out, **(out_storage_options or {}))
    retry(fs.makedirs, f"{path}.parts", exist_ok=True)
    counts = map_shards(_write_part, cat, out, model, min_prob, table, out_storage_options, client=client)
    retry(_join_parts, fs, path, [start for _, start, _ in cat.shards()])
    retry(fs.rm, f"{path}.parts", recursive=True)
    return {"rows": int(sum(counts)), "path": grids.redact(out), "model": model, "min_prob": min_prob}
