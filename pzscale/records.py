"""Reader records -> catalog variables: text, numbers, times and flags in the catalog's types, with a QC
flag for every value that does not parse and a per-row decode status, never an exception for one row.

``columns_from_table`` is applied per input file (a shard may hold files whose columns differ in type:
``Latitude`` as float in one parquet file and as text in another), so its output types are the catalog's
whatever the input's.
"""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pzscale import images
from pzscale.errors import InputError, one_line
from pzscale.readers.base import RECORD_COLUMNS
from pzscale.schema import (
    NUMBER_FROM_PARQUET,
    RANKS,
    STATUS_DECODE_ERROR,
    STATUS_MISSING_IMAGE,
    STATUS_OK,
    TEXT_FROM_PARQUET,
    TIME_FILL,
    instrument_of,
    lineage,
)

ID_COLUMNS = ("ObjID", "aphia_ID", "NCBI_ID", "BOLD_ID")


def _text(table: pa.Table, column: str) -> np.ndarray:
    if column not in table.column_names:
        return np.full(table.num_rows, "", dtype=object)
    col = table.column(column)
    if pa.types.is_floating(col.type):
        # Text written as floats: whole numbers (ids, KI-12) as integers, NaN as missing, the rest (1.5, inf,
        # 1e300) as written, never rounded (1.5 and 2.0 are two ids); float64 first (float16 has no round kernel).
        x = pc.cast(col, pa.float64())
        finite = pc.and_(pc.is_finite(x), pc.less(pc.abs(x), 2.0**53))
        whole = pc.and_(finite, pc.equal(pc.round(pc.if_else(finite, x, 0.0)), pc.if_else(finite, x, 0.0)))
        as_int = pc.cast(pc.cast(pc.round(pc.if_else(whole, x, 0.0)), pa.int64()), pa.string())
        missing = pa.scalar(None, pa.string())
        col = pc.if_else(whole, as_int, pc.if_else(pc.is_nan(x), missing, pc.cast(x, pa.string())))
    # NFC: "é" typed as one code point or as e + combining accent is one label (and one path), not two
    values = pc.utf8_normalize(pc.fill_null(pc.cast(col, pa.string()), ""), form="NFC")
    if column in ID_COLUMNS:  # KI-12: numeric ids written as floats ("12345.0"); keep them integral
        values = pc.replace_substring_regex(values, r"^(\d+)\.0$", r"\1")
    return values.to_numpy(zero_copy_only=False).astype(object)


def _number(table: pa.Table, column: str) -> tuple[np.ndarray, np.ndarray]:
    """Values as float64 and a mask of non-empty entries that did not parse as numbers."""
    if column not in table.column_names:
        return np.full(table.num_rows, np.nan), np.zeros(table.num_rows, bool)
    col = table.column(column)
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):  # nothing to parse: no text to check
        # unsafe: an integer beyond 2**53 becomes the nearest float (as pandas would), not an error
        values = pc.cast(col, pa.float64(), safe=False).to_numpy(zero_copy_only=False).astype(np.float64)
        return values, np.zeros(len(col), bool)
    raw = col.to_pandas()
    values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype="float64", na_value=np.nan, copy=True)
    given = raw.notna().to_numpy() & (raw.astype(str).str.strip() != "").to_numpy()
    return values, given & np.isnan(values)


def _time(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    if "timestamp" not in table.column_names:
        return np.full(table.num_rows, TIME_FILL, dtype=np.int64), np.zeros(table.num_rows, bool)
    # as text whatever the column's type: pandas parses text to UTC, but leaves e.g. booleans tz-naive
    col = pc.cast(table.column("timestamp"), pa.string()).to_pandas()
    times = pd.to_datetime(col, utc=True, errors="coerce", format="mixed")
    ms = times.dt.tz_convert(None).to_numpy().astype("datetime64[ms]").astype(np.int64)
    missing = times.isna().to_numpy()
    ms[missing] = TIME_FILL
    unparsed = missing & col.notna().to_numpy() & (col.astype(str).str.strip() != "").to_numpy()
    return ms, unparsed


def _bool(table: pa.Table, column: str) -> tuple[np.ndarray, np.ndarray]:
    """Values (False when missing) and a mask of non-empty entries that are no yes/no ("maybe")."""
    if column not in table.column_names:
        return np.zeros(table.num_rows, bool), np.zeros(table.num_rows, bool)
    col = table.column(column)
    if pa.types.is_boolean(col.type):
        return pc.fill_null(col, False).to_numpy(zero_copy_only=False).astype(bool), np.zeros(len(col), bool)
    text = pc.fill_null(pc.utf8_trim_whitespace(pc.utf8_lower(pc.cast(col, pa.string()))), "")
    values = pc.is_in(text, pa.array(["true", "1", "yes", "1.0"])).to_numpy(zero_copy_only=False).astype(bool)
    known = pc.is_in(text, pa.array(["true", "1", "yes", "1.0", "false", "0", "no", "0.0", ""]))
    return values, ~known.to_numpy(zero_copy_only=False).astype(bool)


EARLIEST = np.datetime64("1900-01-01", "ms").astype(np.int64)


def normalise_metadata(out: dict[str, np.ndarray], flags: list[np.ndarray], names: list[str]) -> None:
    """Positions in decimal degrees, depths in metres, times in UTC; impossible values become
    NaN/NaT and get a QC flag in ``qc``, never silently kept."""
    lat, lon = out["lat"], out["lon"]
    lon[(lon > 180) & (lon <= 360)] -= 360  # 0..360 convention -> -180..180 (a convention, not an error)
    bad_position = ~np.isfinite(lat) & ~np.isnan(lat) | ~np.isfinite(lon) & ~np.isnan(lon)
    bad_position |= (np.abs(lat) > 90) | (np.abs(lon) > 180)
    lat[bad_position] = lon[bad_position] = np.nan
    flags.append(bad_position)
    names.append("position_out_of_range")
    dmin, dmax = out["depth_min"], out["depth_max"]
    # Above 10 m over the sea surface or below the deepest trench is not a sampling depth.
    bad_depth = (dmin < -10) | (dmax < -10) | (dmin > 11000) | (dmax > 11000) | (dmin > dmax)
    bad_depth |= np.isinf(dmin) | np.isinf(dmax)
    dmin[bad_depth] = dmax[bad_depth] = np.nan
    flags.append(bad_depth)
    names.append("depth_out_of_range")
    t = out["time"]
    now = np.datetime64(datetime.now(UTC).replace(tzinfo=None), "ms").astype(np.int64) + 86_400_000
    bad_time = (t != TIME_FILL) & ((t < EARLIEST) | (t > now))
    t[bad_time] = TIME_FILL
    flags.append(bad_time)
    names.append("time_out_of_range")
    qc = np.full(len(lat), "", dtype=object)
    for flag, name in zip(flags, names, strict=True):
        for i in np.flatnonzero(flag):
            qc[i] = f"{qc[i]};{name}" if qc[i] else name
    out["qc"] = qc


def sample_rule(name: str | None = None, column: str | None = None, pattern: str | None = None) -> dict | None:
    """What an ingest is told of samples, checked: ``name`` for every row, or the value of record ``column``
    (a Planktonzilla column such as ``original_path`` or ``ObjID``, or a reader's own), cut to ``pattern``'s
    first group (its whole match without one) when given. None: each reader's own sample."""
    if name is not None and (column is not None or pattern is not None):
        raise InputError("give a sample name or a sample column (with an optional pattern), not both")
    if pattern is not None and column is None:
        raise InputError(f"sample pattern {pattern!r} needs a sample column to search")
    if column is not None and column not in RECORD_COLUMNS:
        raise InputError(f"sample column {column!r}: not a record column; choose one of {', '.join(RECORD_COLUMNS)}")
    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as e:
            raise InputError(f"sample pattern {pattern!r}: not a regular expression ({e})") from None
    if name is None and column is None:
        return None
    return {"name": name} if name is not None else {"column": column, "pattern": pattern}


def samples_by_rule(table: pa.Table, rule: dict) -> tuple[np.ndarray, np.ndarray]:
    """Each row's sample under an ingest's ``sample_rule``, and the rows whose column did not match the pattern
    (their sample is '', flagged ``sample_unmatched``)."""
    if "name" in rule:
        return np.full(table.num_rows, rule["name"], dtype=object), np.zeros(table.num_rows, bool)
    values = _text(table, rule["column"])
    if rule["pattern"] is None:
        return values, np.zeros(len(values), bool)
    pattern = rule["pattern"] if re.compile(rule["pattern"]).groups else f"({rule['pattern']})"
    found = pd.Series(values, dtype=object).str.extract(pattern, expand=False)
    if isinstance(found, pd.DataFrame):  # several groups: the first
        found = found.iloc[:, 0]
    unmatched = found.isna().to_numpy()
    return found.fillna("").to_numpy(dtype=object), unmatched


def columns_from_table(table: pa.Table, *, row_names: list[str], sample: dict | None = None) -> dict[str, np.ndarray]:
    """Catalog variables for a records table (any reader), including per-row decode status and QC.

    ``row_names`` ("<input>#<row>") is the image id of last resort; ``sample`` an ingest's ``sample_rule``.
    """
    n = table.num_rows
    out: dict[str, np.ndarray] = {name: _text(table, col) for name, col in TEXT_FROM_PARQUET.items()}
    flags, flag_names = [], []
    if sample is not None:
        out["sample"], unmatched = samples_by_rule(table, sample)
        flags.append(unmatched)
        flag_names.append("sample_unmatched")
    for name, col in NUMBER_FROM_PARQUET.items():
        out[name], unparsed = _number(table, col)
        flags.append(unparsed)  # text that is no number: NaN, and said so
        flag_names.append(f"{name}_unparsed")
        if name not in ("lat", "lon", "depth_min", "depth_max"):  # stored as float32: 1e300, inf would be inf
            beyond = np.abs(out[name]) > np.finfo(np.float32).max
            out[name][beyond] = np.nan
            flags.append(beyond)
            flag_names.append(f"{name}_out_of_range")
    out["time"], unparsed_time = _time(table)
    flags.append(unparsed_time)
    flag_names.append("time_unparsed")
    out["plankton"], unparsed_plankton = _bool(table, "plankton")
    flags.append(unparsed_plankton)
    flag_names.append("plankton_unparsed")
    normalise_metadata(out, flags, flag_names)
    from_reader = _text(table, "reader_qc")  # values a reader could not parse into numbers (EcoTaxa's "abc")
    out["qc"] = np.array([";".join(q for q in (r, own) if q) for r, own in zip(from_reader, out["qc"], strict=True)],
                         dtype=object)
    for name in NUMBER_FROM_PARQUET:
        if name not in ("lat", "lon"):
            out[name] = out[name].astype("float32")
    aphia = pd.to_numeric(pd.Series(_text(table, "aphia_ID")), errors="coerce").to_numpy("float64", na_value=np.nan)
    whole = np.isfinite(aphia) & (aphia > 0) & (aphia < 2**53) & (aphia == np.round(aphia))  # else no id (0)
    out["aphia_id"] = np.where(whole, aphia, 0).astype(np.int64)
    # a shard holds few distinct rank tuples and sources: each is worked out once
    rank_rows = list(zip(*(out[r] for r in RANKS), strict=True))
    lineages = {ranks: lineage(ranks) for ranks in set(rank_rows)}
    out["lineage"] = np.array([lineages[ranks] for ranks in rank_rows], dtype=object)
    given = _text(table, "lineage")  # sources with a lineage text but no ranks (WebDataset)
    use_given = (out["lineage"] == "") & (given != "")
    out["lineage"][use_given] = [" ".join(g.lower().split()) for g in given[use_given]]
    known = _text(table, "instrument")  # the reader's word first, else the source name's
    families = {s: instrument_of(s) for s in set(out["source"])}
    out["instrument"] = np.array([k or families[s] for k, s in zip(known, out["source"], strict=True)], dtype=object)
    out["image_id"] = image_ids(out["source"], out["object_id"], out["original_path"], row_names)
    encoded = table.column("image").combine_chunks().field("bytes").to_pylist()
    why_missing = _text(table, "image_error")  # a reader's reason for not reading an image (unsafe path...)
    height, width = np.zeros(n, np.int32), np.zeros(n, np.int32)
    mode, status, error = (np.full(n, "", dtype=object) for _ in range(3))
    for i, data in enumerate(encoded):
        if not data:
            status[i], error[i], encoded[i] = STATUS_MISSING_IMAGE, why_missing[i] or "no image bytes", b""
            continue
        try:
            height[i], width[i], mode[i] = images.probe(data)
            status[i] = STATUS_OK
        except Exception as e:  # noqa: BLE001 - any decoder failure is this row's status
            status[i], error[i] = STATUS_DECODE_ERROR, f"{type(e).__name__}: {one_line(e)}"
    image_bytes = np.empty(n, dtype=object)
    image_bytes[:] = encoded
    out.update(height=height, width=width, mode=mode, status=status, error=error, image_bytes=image_bytes)
    return out


def row_names(source: str, first: int, stop: int) -> list[str]:
    """"<input file>#<row>" of rows [first, stop) of an input: the image id of last resort."""
    name = os.path.basename(source.rstrip("/"))
    return [f"{name}#{r}" for r in range(first, stop)]


def image_ids(source: np.ndarray, object_id: np.ndarray, original_path: np.ndarray,
              fallback: list[str]) -> np.ndarray:
    """``<source>:<object id>``, else the file name of the original path, else the row name."""
    return np.array([f"{src}:{obj or os.path.basename(path) or last}"
                     for src, obj, path, last in zip(source, object_id, original_path, fallback, strict=True)],
                    dtype=object)


def ids_of_table(table: pa.Table, names: list[str]) -> np.ndarray:
    """The image ids ``columns_from_table`` gives the rows of ``table``, without touching the images."""
    return image_ids(*(_text(table, TEXT_FROM_PARQUET[n]) for n in ("source", "object_id", "original_path")), names)
