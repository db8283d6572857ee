"""Ingest any supported input into a catalog: plan, then write.

The plan asks a reader (by ``format`` or by guess) for items with exact row counts and
gives every input row a deterministic catalog row; it is stored in the catalog. The write
runs one Dask task per catalog shard: it reads its rows from the items, turns them into
catalog variables (taxonomy, metadata in standard units with QC flags, per-row decode
status), writes whole shards of every array and then, last, a done marker, so a rerun
resumes where a previous run stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import socket
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from functools import lru_cache
from importlib.metadata import version

import fsspec
import numpy as np
import pandas as pd
import psutil
import pyarrow as pa
import pyarrow.compute as pc
from distributed import Client

from pzscale import catalog, images, readers, taxonomy
from pzscale.errors import CatalogError, InputError, StageError, one_line
from pzscale.limits import Limits, using
from pzscale.readers.base import Item
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
from pzscale.stage import Catalog, ShardResult, ShardTask, StageReport, pending, require_client, retry, run_stage

log = logging.getLogger("pzscale")

STAGE = "ingest"


# ---------------------------------------------------------------- plan


@dataclass(frozen=True)
class Plan:
    id: str
    readers: tuple[str, ...]  # reader name of each item
    items: tuple[Item, ...]
    row_start: int
    shard_len: int
    sources: tuple[str, ...] = ()  # what the user named

    @property
    def rows(self) -> int:
        return sum(i.rows for i in self.items)

    @property
    def row_stop(self) -> int:
        return self.row_start + self.rows

    @property
    def stage(self) -> str:
        return f"{STAGE}/{self.id}"

    @property
    def errors(self) -> list[str]:
        return [i.error for i in self.items if i.error]

    @property
    def notes(self) -> list[str]:
        return [note for i in self.items for note in i.notes]

    def to_dict(self) -> dict:
        return {"id": self.id, "readers": list(self.readers), "items": [asdict(i) for i in self.items],
                "row_start": self.row_start, "shard_len": self.shard_len, "sources": list(self.sources)}

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        return cls(d["id"], tuple(d["readers"]), tuple(Item(**i) for i in d["items"]), d["row_start"],
                   d["shard_len"], tuple(d.get("sources", ())))

    def shard_tasks(self) -> list[dict]:
        """One task per catalog shard: its rows and the (item, first, stop) ranges that fill them."""
        tasks = []
        for shard, start, stop in catalog.shard_ranges(self.row_start, self.row_stop, self.shard_len):
            segments, row = [], self.row_start
            for index, item in enumerate(self.items):
                lo, hi = max(start, row), min(stop, row + item.rows)
                if lo < hi:
                    segments.append([index, lo - row, hi - row])
                row += item.rows
            tasks.append({"shard": shard, "start": start, "stop": stop, "segments": segments})
        return tasks


def make_plan(
    sources: list[str],
    *,
    shard_len: int,
    row_start: int = 0,
    format: str | None = None,
    source: str | None = None,
    storage_options: dict | None = None,
) -> Plan:
    """Deterministic plan for ``sources``; its id depends on the inputs, not on where they land."""
    names, items, seen = [], [], set()
    for path in sources:
        reader = readers.get(format) if format else readers.guess(str(path), storage_options=storage_options)
        for item in reader.plan(str(path), source=source, storage_options=storage_options):
            # inputs are a set: a file named twice, or in a folder also named, or behind a symlink, is read once
            key = (reader.name, _canonical(item.source), item.rows, item.size)
            if key in seen:
                log.warning("%s: reached twice among the inputs; read once", item.source)
                continue
            seen.add(key)
            names.append(reader.name)
            items.append(item)
    if not sum(i.rows for i in items):
        problems = "; ".join(i.error for i in items if i.error)
        raise InputError(f"{', '.join(map(str, sources))}: no rows to ingest" + (f" ({problems})" if problems else ""))
    identity = json.dumps([[n, i.source, i.size, i.rows, i.error, i.info] for n, i in zip(names, items, strict=True)],
                          sort_keys=True, default=str).encode()
    return Plan(hashlib.sha256(identity).hexdigest()[:16], tuple(names), tuple(items), row_start, shard_len,
                tuple(map(str, sources)))


def _canonical(location: str) -> str:
    """A local path with symlinks, ``.`` and ``..`` resolved; a URL as written."""
    protocol = fsspec.utils.get_protocol(location)
    if protocol in ("file", "local"):
        return os.path.realpath(fsspec.utils.stringify_path(location).removeprefix("file://"))
    return location


# ---------------------------------------------------------------- records -> catalog variables


ID_COLUMNS = ("ObjID", "aphia_ID", "NCBI_ID", "BOLD_ID")


def _text(table: pa.Table, column: str) -> np.ndarray:
    if column not in table.column_names:
        return np.full(table.num_rows, "", dtype=object)
    col = table.column(column)
    if pa.types.is_floating(col.type):
        # Text written as floats: whole numbers (ids, KI-12) as integers, NaN as missing, the rest (inf,
        # 1e300) as written; float64 first, as pyarrow has no round kernel for float16.
        x = pc.cast(col, pa.float64())
        whole = pc.and_(pc.is_finite(x), pc.less(pc.abs(x), 2.0**53))
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


def columns_from_table(table: pa.Table, *, row_names: list[str]) -> dict[str, np.ndarray]:
    """Catalog variables for a records table (any reader), including per-row decode status and QC.

    ``row_names`` ("<input>#<row>") is the image id of last resort.
    """
    n = table.num_rows
    out: dict[str, np.ndarray] = {name: _text(table, col) for name, col in TEXT_FROM_PARQUET.items()}
    flags, flag_names = [], []
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
    out["image_id"] = np.array(
        [
            f"{src}:{obj or os.path.basename(path) or fallback}"
            for src, obj, path, fallback in zip(
                out["source"], out["object_id"], out["original_path"], row_names, strict=True
            )
        ],
        dtype=object,
    )
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


# ---------------------------------------------------------------- one shard (runs on a worker)


@lru_cache(maxsize=8)
def _stored_plan(cat: Catalog, plan_id: str) -> Plan:
    """Each worker reads a plan once (one GET), not once per shard."""
    return Plan.from_dict(catalog.get_json(cat.url, f"plans/{plan_id}.json", storage_options=cat.options))


def ingest_shard(task: ShardTask) -> ShardResult:
    """Write one catalog shard from its input rows (the runner writes its done marker after)."""
    with using(task.params["limits"]):
        return _ingest_shard(task)


def _ingest_shard(task: ShardTask) -> ShardResult:
    cat, p = task.catalog, task.params
    plan = _stored_plan(cat, p["plan"])
    tables, row_names = [], []
    for index, first, stop in p["segments"]:
        item = plan.items[index]
        tables.append(readers.get(plan.readers[index]).read(item, first, stop, storage_options=cat.options))
        name = os.path.basename(item.source.rstrip("/"))
        row_names += [f"{name}#{r}" for r in range(first, stop)]
    table = pa.concat_tables(tables, promote_options="permissive")
    columns = columns_from_table(table, row_names=row_names)
    if p["taxonomy"]:
        so_key = json.dumps(cat.options, sort_keys=True) if cat.options else ""
        taxonomy.apply(taxonomy.cached_table(p["taxonomy"], so_key), columns, table_source=p["taxonomy_source"])
    # a shard that begins with rows of an earlier collection (append) rewrites them unchanged
    columns = catalog.with_stored_rows(cat.group("r+"), task.start, task.row_from, columns)
    catalog.write_rows(cat.group("r+"), task.start, task.stop, columns)
    counts = dict(Counter(columns["status"][task.row_from - task.start :]))
    return ShardResult(task.new_rows, {task.stage: {"rows": [task.row_from, task.stop], "plan": p["plan"],
                                                    "status": counts}}, status=counts)


# ---------------------------------------------------------------- the stage


def _prepare(probe: Plan, url: str, shard_len: int | None, append: bool, storage_options: dict | None) -> Plan:
    """Create the catalog or check it, store the plan and size the arrays for it."""
    so = storage_options
    if not catalog.exists(url, storage_options=so):
        catalog.create(url, n_rows=probe.rows, shard_len=probe.shard_len, plans=[_plan_record(probe)],
                       storage_options=so)
        catalog.put_json(url, f"plans/{probe.id}.json", probe.to_dict(), storage_options=so)
        return probe
    group = catalog.open_group(url, mode="r+", storage_options=so, check=False)
    meta = catalog.metadata(group)
    if shard_len and shard_len != meta["shard_len"]:
        raise CatalogError(
            f"{url}: catalog has shard length {meta['shard_len']}, not {shard_len}; "
            "use another catalog URL or drop --shard-len"
        )
    known = {p["id"]: p for p in meta["plans"]}
    if probe.id in known:  # a rerun: resume the plan where it stopped
        plan = Plan(probe.id, probe.readers, probe.items, known[probe.id]["row_start"], meta["shard_len"],
                    probe.sources)
    else:
        if known and not append:
            raise CatalogError(
                f"{url}: catalog already holds other sources (plan(s) {', '.join(known)}, "
                f"{max(p['row_stop'] for p in known.values())} rows); pass --append to add these "
                "as a new collection"
            )
        for p in meta["plans"]:
            todo = len(catalog.shard_ranges(p["row_start"], p["row_stop"], meta["shard_len"]))
            if len(catalog.done_shards(url, f"{STAGE}/{p['id']}", storage_options=so)) < todo:
                raise CatalogError(
                    f"{url}: ingest of plan {p['id']} is unfinished; rerun it with its sources "
                    "before appending others"
                )
        row_start = max((p["row_stop"] for p in meta["plans"]), default=0)
        plan = Plan(probe.id, probe.readers, probe.items, row_start, meta["shard_len"], probe.sources)
        # Record first, then grow: a crash in between leaves a plan that a rerun completes.
        catalog.update_metadata(group, plans=[*meta["plans"], _plan_record(plan)])
    catalog.put_json(url, f"plans/{plan.id}.json", plan.to_dict(), storage_options=so)
    catalog.ensure_rows(group, plan.row_stop)
    return plan


LOCK_SUFFIX = ".pzscale-lock"  # beside the catalog: zarr refuses to create a group in a non-empty folder


def _lock_path(url: str, storage_options: dict | None) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, root.rstrip("/") + LOCK_SUFFIX


def _process_started(pid: int) -> float | None:
    """When process ``pid`` of this host started (seconds since 1970), None if there is none."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def _holder_gone(holder: dict) -> bool:
    """Whether a lock's holder is a process of this host that no longer runs (its pid gone, or reused
    by a process started later). Holders on other hosts cannot be checked from here."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    started = _process_started(holder["pid"])
    recorded = holder.get("started")
    return started is None or (isinstance(recorded, int | float) and abs(started - recorded) > 1.0)


def read_lock(url: str, *, storage_options: dict | None = None) -> dict | None:
    """The holder recorded in the catalog's ingest lock ({} if unreadable), None when unlocked."""
    fs, path = _lock_path(url, storage_options)
    try:
        return json.loads(retry(fs.cat_file, path))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, StageError):
        return {}


def remove_lock(url: str, *, storage_options: dict | None = None) -> None:
    fs, path = _lock_path(url, storage_options)
    retry(fs.rm_file, path)


@contextlib.contextmanager
def metadata_lock(url: str, *, storage_options: dict | None = None) -> Iterator[None]:
    """Hold a create-only lock object while this client changes the catalog's metadata.

    Without it two ingests into one catalog (two appends at once) would both read the same
    plans, take the same rows and interleave their collections. The lock records its holder's
    host, pid and process start time. A second ingest is refused with a CatalogError naming the
    holder, unless the holder is a process of this host that is gone (killed): then the lock is
    taken over with a warning. A holder on another host is never guessed dead: `pzscale unlock`.
    """
    fs, path = _lock_path(url, storage_options)
    retry(fs.makedirs, posixpath.dirname(path), exist_ok=True)
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": _process_started(os.getpid()),
              "since": datetime.now(UTC).isoformat(timespec="seconds"), "token": uuid.uuid4().hex}
    # a create whose reply was lost is retried and finds the lock there: ours if it holds our token
    while not retry(catalog.create_only, fs, path, json.dumps(holder).encode()):
        other = read_lock(url, storage_options=storage_options)
        if other is None:
            continue  # released between our create and our read: try again
        if other.get("token") == holder["token"]:
            break
        who = f"{other.get('host')} pid {other.get('pid')} since {other.get('since')}" if other else "unknown holder"
        if other and _holder_gone(other):
            log.warning("%s: taking over the ingest lock of %s, a process of this host that is gone", url, who)
            # only the lock we read: a taker that got there first has written another token
            if read_lock(url, storage_options=storage_options) == other:
                retry(fs.rm_file, path)
            continue
        raise CatalogError(f"{url}: another ingest is changing this catalog ({who}); wait for it, or, if that "
                           f"process is gone, run `pzscale unlock --catalog {url}`")
    try:
        yield
    finally:
        retry(fs.rm_file, path)


def _plan_record(plan: Plan) -> dict:
    """What the group attributes keep of a plan; the full plan is in _pzscale/plans/<id>.json."""
    return {
        "id": plan.id, "row_start": plan.row_start, "row_stop": plan.row_stop, "shard_len": plan.shard_len,
        "sources": list(plan.sources), "readers": sorted(set(plan.readers)), "items": len(plan.items),
        "input_errors": len(plan.errors), "input_notes": len(plan.notes), "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "pzscale": version("pzscale"),
    }


def ingest(
    sources: list[str],
    url: str,
    *,
    format: str | None = None,
    source: str | None = None,
    taxonomy_table: str | None = None,
    taxonomy_source: str | None = None,
    shard_len: int | None = None,
    append: bool = False,
    client: Client | None = None,
    storage_options: dict | None = None,
    progress: bool = True,
    limits: Limits | None = None,
) -> StageReport:
    """Ingest ``sources`` (files or folders of any supported format) into the catalog at ``url``.

    ``format`` names the reader (default: guessed per source); ``source`` names the collection
    for formats that do not (IFCB bins, class folders). ``taxonomy_table`` is a
    Planktonzilla-format mapping table applied to rows that carry a raw label but no
    taxonomy, keyed by their source or by ``taxonomy_source``. Rerunning with the same
    inputs resumes; ``append=True`` adds them after the existing rows, leaving those
    unchanged. Raises StageError if any shard failed; finished shards stay done.
    ``limits`` bound what hostile inputs may expand to (default: ``Limits.from_env()``);
    an image over them is a ``decode_error`` row, an archive member over them an InputError.
    Two ingests into one catalog at once: the one that comes second is refused (CatalogError).
    """
    catalog.check_url(url)
    if shard_len is not None and not (shard_len > 0 and (shard_len <= catalog.SHARD_UNIT
                                                         or shard_len % catalog.SHARD_UNIT == 0)):
        raise InputError(f"shard length {shard_len}: must be 1..{catalog.SHARD_UNIT} or a multiple of "
                         f"{catalog.SHARD_UNIT} (default {catalog.DEFAULT_SHARD_LEN})")
    client = require_client(client)
    # a bad table fails before any write; its hash is recorded with the stage's parameters
    table_sha = retry(taxonomy.read_table, taxonomy_table, storage_options=storage_options).attrs["sha256"] \
        if taxonomy_table else None
    meta_len = None
    if retry(catalog.exists, url, storage_options=storage_options):
        meta_len = Catalog.open(url, storage_options, check=False).shard_len
    limits = limits or Limits.from_env()
    with using(limits):
        probe = retry(make_plan, list(sources), shard_len=meta_len or shard_len or catalog.DEFAULT_SHARD_LEN,
                      format=format, source=source, storage_options=storage_options)
    with metadata_lock(url, storage_options=storage_options):
        plan = retry(_prepare, probe, url, shard_len, append, storage_options)
        cat = Catalog.open(url, storage_options, check=False)
        cat.record_stage(plan.stage, {"format": format, "source": source, "taxonomy_table": taxonomy_table,
                                      "taxonomy_source": taxonomy_source, "taxonomy_sha256": table_sha,
                                      "limits": limits.to_dict()})
    params = {"plan": plan.id, "taxonomy": taxonomy_table, "taxonomy_source": taxonomy_source,
              "limits": limits.to_dict()}
    ranges = [(t["shard"], t["shard"] * plan.shard_len, t["stop"]) for t in plan.shard_tasks()]
    tasks, skipped = pending(cat, plan.stage, params=params, ranges=ranges)
    segments = {t["shard"]: t for t in plan.shard_tasks()}
    # a shard is ingested whole or not at all: its marker is written last, so a marked shard is done
    tasks = [replace(t, row_from=segments[t.shard]["start"], params={**t.params, "segments":
                                                                       segments[t.shard]["segments"]})
             for t in tasks]
    return run_stage(plan.stage, ingest_shard, tasks, catalog=cat, client=client, skipped=skipped,
                     progress_bar=progress, rows=(plan.row_start, plan.row_stop), input_errors=plan.errors,
                     input_notes=plan.notes)
