"""Ingest Planktonzilla-format parquet shards into a catalog: plan, then write.

The plan reads parquet footers only and gives every input row a deterministic catalog
row. The write runs one Dask task per catalog shard; a task writes whole shards of every
array and then, last, a done marker, so a rerun resumes where a previous run stopped.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from distributed import Client, get_client

from pzscale import catalog, images
from pzscale.errors import CatalogError, InputError, StageError
from pzscale.progress import run_shards
from pzscale.schema import (
    NUMBER_FROM_PARQUET,
    PARQUET_COLUMNS,
    PARQUET_REQUIRED,
    RANKS,
    STATUS_DECODE_ERROR,
    STATUS_MISSING_IMAGE,
    STATUS_OK,
    TEXT_FROM_PARQUET,
    TIME_FILL,
    instrument_of,
    lineage,
)

STAGE = "ingest"


# ---------------------------------------------------------------- plan


@dataclass(frozen=True)
class SourceFile:
    path: str
    size: int
    rows: int
    row_groups: tuple[int, ...]  # rows per parquet row group
    columns: tuple[str, ...]  # Planktonzilla columns present


@dataclass(frozen=True)
class Plan:
    id: str
    files: tuple[SourceFile, ...]
    row_start: int
    shard_len: int

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    @property
    def row_stop(self) -> int:
        return self.row_start + self.rows

    @property
    def stage(self) -> str:
        return f"{STAGE}/{self.id}"

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "row_start": self.row_start,
            "row_stop": self.row_stop,
            "shard_len": self.shard_len,
            "files": [asdict(f) for f in self.files],
        }

    def shard_tasks(self) -> list[dict]:
        """One task per catalog shard: its rows and the parquet row ranges that fill them."""
        tasks = []
        for shard, start, stop in catalog.shard_ranges(self.row_start, self.row_stop, self.shard_len):
            segments, row = [], self.row_start
            for f in self.files:
                lo, hi = max(start, row), min(stop, row + f.rows)
                if lo < hi:
                    segments.append({"path": f.path, "first": lo - row, "stop": hi - row,
                                     "row_groups": list(f.row_groups), "columns": list(f.columns)})
                row += f.rows
            tasks.append({"shard": shard, "start": start, "stop": stop, "segments": segments})
        return tasks


def expand_sources(sources: list[str], *, storage_options: dict | None = None) -> list[str]:
    """Parquet files named by ``sources`` (files, folders, globs), sorted for a stable plan."""
    found: list[str] = []
    for source in sources:
        fs, path = fsspec.core.url_to_fs(str(source), **(storage_options or {}))
        protocol = fsspec.utils.get_protocol(str(source))
        prefix = "" if protocol == "file" else f"{protocol}://"
        if fs.isdir(path):
            matches = sorted(fs.find(path))
            matches = [m for m in matches if m.endswith(".parquet")]
        elif any(ch in path for ch in "*?["):
            matches = sorted(fs.glob(path))
        elif fs.exists(path):
            matches = [path]
        else:
            raise InputError(f"{source}: no such file or folder")
        if not matches:
            raise InputError(f"{source}: no .parquet files found")
        found.extend(prefix + m for m in matches)
    return sorted(dict.fromkeys(found))


def scan_file(path: str, *, storage_options: dict | None = None) -> SourceFile:
    """Read one parquet footer and check its schema. Raises InputError naming the file."""
    fs, fpath = fsspec.core.url_to_fs(path, **(storage_options or {}))
    size = fs.size(fpath)
    if size == 0:
        raise InputError(f"{path}: file is empty (0 bytes)")
    try:
        with fs.open(fpath, "rb") as fh:
            meta = pq.ParquetFile(fh).metadata
            schema = meta.schema.to_arrow_schema()
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path}: not a readable parquet file ({_one_line(e)})") from None
    names = schema.names
    missing = [c for c in PARQUET_REQUIRED if c not in names]
    if missing:
        hints = []
        for col in missing:
            close = difflib.get_close_matches(col, names, n=1, cutoff=0.6)
            hints.append(f"{col} (found {close[0]!r})" if close else col)
        raise InputError(f"{path}: missing Planktonzilla column(s): {', '.join(hints)}")
    image_type = schema.field("image").type
    if not (pa.types.is_struct(image_type) and image_type.get_field_index("bytes") >= 0):
        raise InputError(f"{path}: column 'image' is {image_type}, expected struct<bytes, path>")
    row_groups = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
    present = tuple(c for c in PARQUET_COLUMNS if c in names)
    return SourceFile(path=path, size=size, rows=meta.num_rows, row_groups=row_groups, columns=present)


def make_plan(
    sources: list[str], *, row_start: int = 0, shard_len: int, storage_options: dict | None = None
) -> Plan:
    """Deterministic plan for ``sources``; its id depends on the files, not on where they land."""
    files = tuple(scan_file(p, storage_options=storage_options)
                  for p in expand_sources(sources, storage_options=storage_options))
    if not sum(f.rows for f in files):
        raise InputError(f"{', '.join(sources)}: no rows to ingest")
    identity = json.dumps([(f.path, f.size, f.rows) for f in files]).encode()
    return Plan(hashlib.sha256(identity).hexdigest()[:16], files, row_start, shard_len)


# ---------------------------------------------------------------- one shard


def _one_line(e: BaseException) -> str:
    """One line, and the same text every run (object addresses removed), so reruns are byte-identical."""
    return re.sub(r" at 0x[0-9a-f]+", "", " ".join(str(e).split()))[:300]


def read_segments(segments: list[dict], *, storage_options: dict | None = None) -> pa.Table:
    """The parquet rows of a shard, reading only the row groups that hold them."""
    tables = []
    for seg in segments:
        starts = np.concatenate([[0], np.cumsum(seg["row_groups"])])
        first_rg = int(np.searchsorted(starts, seg["first"], side="right") - 1)
        last_rg = int(np.searchsorted(starts, seg["stop"], side="left"))
        try:
            table = _read_row_groups(seg["path"], list(range(first_rg, last_rg)), seg["columns"],
                                     storage_options)
        except (pa.ArrowException, OSError) as e:
            raise InputError(
                f"{seg['path']}: cannot read rows {seg['first']}-{seg['stop']} ({_one_line(e)})"
            ) from None
        offset = seg["first"] - int(starts[first_rg])
        tables.append(table.slice(offset, seg["stop"] - seg["first"]))
    return pa.concat_tables(tables, promote_options="permissive")


def _read_row_groups(path: str, row_groups: list[int], columns: list[str],
                     storage_options: dict | None) -> pa.Table:
    if fsspec.utils.get_protocol(path) == "file":
        # pyarrow's own file reader: no Python in the read path (measurably faster than fsspec's)
        return pq.ParquetFile(path.removeprefix("file://")).read_row_groups(row_groups, columns=columns)
    with fsspec.open(path, "rb", **(storage_options or {})) as fh:
        return pq.ParquetFile(fh, pre_buffer=True).read_row_groups(row_groups, columns=columns)


ID_COLUMNS = ("ObjID", "aphia_ID", "NCBI_ID", "BOLD_ID")


def _text(table: pa.Table, column: str) -> np.ndarray:
    if column not in table.column_names:
        return np.full(table.num_rows, "", dtype=object)
    col = table.column(column)
    if pa.types.is_floating(col.type):
        col = pc.cast(pc.round(col), pa.int64())
    values = pc.fill_null(pc.cast(col, pa.string()), "")
    if column in ID_COLUMNS:  # KI-12: numeric ids written as floats ("12345.0"); keep them integral
        values = pc.replace_substring_regex(values, r"^(\d+)\.0$", r"\1")
    return values.to_numpy(zero_copy_only=False).astype(object)


def _number(table: pa.Table, column: str, dtype: str) -> np.ndarray:
    if column not in table.column_names:
        return np.full(table.num_rows, np.nan, dtype=dtype)
    values = pd.to_numeric(table.column(column).to_pandas(), errors="coerce")
    return values.to_numpy(dtype="float64", na_value=np.nan).astype(dtype)


def _time(table: pa.Table) -> np.ndarray:
    if "timestamp" not in table.column_names:
        return np.full(table.num_rows, TIME_FILL, dtype=np.int64)
    col = table.column("timestamp").to_pandas()
    times = pd.to_datetime(col, utc=True, errors="coerce", format="mixed")
    ms = times.dt.tz_convert(None).to_numpy().astype("datetime64[ms]").astype(np.int64)
    ms[times.isna().to_numpy()] = TIME_FILL
    return ms


def _bool(table: pa.Table, column: str) -> np.ndarray:
    col = table.column(column)
    if pa.types.is_boolean(col.type):
        return pc.fill_null(col, False).to_numpy(zero_copy_only=False).astype(bool)
    text = pc.utf8_lower(pc.cast(col, pa.string()))
    return pc.fill_null(pc.is_in(text, pa.array(["true", "1", "yes"])), False).to_numpy(
        zero_copy_only=False
    ).astype(bool)


def columns_from_table(table: pa.Table, *, row_names: list[str]) -> dict[str, np.ndarray]:
    """Catalog variables for parquet rows, including the per-row decode status.

    ``row_names`` ("file.parquet#row") is the image id of last resort.
    """
    n = table.num_rows
    out: dict[str, np.ndarray] = {name: _text(table, col) for name, col in TEXT_FROM_PARQUET.items()}
    for name, col in NUMBER_FROM_PARQUET.items():
        out[name] = _number(table, col, "float64" if name in ("lat", "lon") else "float32")
    out["time"] = _time(table)
    out["plankton"] = _bool(table, "plankton")
    aphia = pd.to_numeric(pd.Series(_text(table, "aphia_ID")), errors="coerce")
    out["aphia_id"] = aphia.fillna(0).to_numpy().astype(np.int64)
    out["lineage"] = np.array(
        [lineage(ranks) for ranks in zip(*(out[r] for r in RANKS), strict=True)], dtype=object
    )
    out["instrument"] = np.array([instrument_of(s) for s in out["source"]], dtype=object)
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
    height, width = np.zeros(n, np.int32), np.zeros(n, np.int32)
    mode, status, error = (np.full(n, "", dtype=object) for _ in range(3))
    for i, data in enumerate(encoded):
        if not data:
            status[i], error[i], encoded[i] = STATUS_MISSING_IMAGE, "no image bytes", b""
            continue
        try:
            height[i], width[i], mode[i] = images.probe(data)
            status[i] = STATUS_OK
        except Exception as e:  # noqa: BLE001 - any decoder failure is this row's status
            status[i], error[i] = STATUS_DECODE_ERROR, f"{type(e).__name__}: {_one_line(e)}"
    image_bytes = np.empty(n, dtype=object)
    image_bytes[:] = encoded
    out.update(height=height, width=width, mode=mode, status=status, error=error, image_bytes=image_bytes)
    return out


def ingest_shard(task: dict) -> dict:
    """Write one catalog shard from parquet rows, then its done marker. Runs on a worker."""
    started = time.perf_counter()
    url, so = task["catalog"], task["storage_options"]
    table = read_segments(task["segments"], storage_options=so)
    row_names = [
        f"{os.path.basename(seg['path'])}#{r}"
        for seg in task["segments"] for r in range(seg["first"], seg["stop"])
    ]
    columns = columns_from_table(table, row_names=row_names)
    group = catalog.open_group(url, mode="r+", storage_options=so, check=False)  # write_rows checks
    shard_start = task["shard"] * task["shard_len"]
    if shard_start < task["start"]:
        # The shard begins with rows of an earlier collection (append): rewrite them unchanged
        # so the write still covers the whole shard.
        before = catalog.read_rows(group, shard_start, task["start"])
        columns = {k: np.concatenate([before[k].astype(columns[k].dtype), columns[k]]) for k in columns}
    catalog.write_rows(group, shard_start, task["stop"], columns)
    counts = Counter(columns["status"][task["start"] - shard_start :])
    info = {"rows": [task["start"], task["stop"]], "plan": task["plan"], "status": dict(counts)}
    catalog.mark_done(url, task["stage"], task["shard"], info, storage_options=so)
    return {"shard": task["shard"], "rows": task["stop"] - task["start"], "status": dict(counts),
            "seconds": time.perf_counter() - started}


# ---------------------------------------------------------------- the stage


@dataclass
class IngestReport:
    catalog: str
    plan_id: str
    rows: tuple[int, int]
    shards_total: int
    shards_skipped: int
    shards_written: int
    status: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    images_per_second: float = 0.0

    def __str__(self) -> str:
        lines = [
            f"ingest {self.plan_id} -> {self.catalog}: rows {self.rows[0]}..{self.rows[1]}, "
            f"{self.shards_written} shard(s) written, {self.shards_skipped} already done, "
            f"of {self.shards_total}",
            f"  status: {', '.join(f'{k}={v}' for k, v in sorted(self.status.items())) or 'none new'}",
            f"  {self.seconds:.1f} s, {self.images_per_second:,.0f} images/s",
        ]
        lines += [f"  FAILED {f}" for f in self.failures]
        return "\n".join(lines)


def _prepare(sources: list[str], url: str, shard_len: int | None, append: bool,
             storage_options: dict | None) -> Plan:
    """Create the catalog or check it, record the plan and size the arrays for it."""
    if not catalog.exists(url, storage_options=storage_options):
        plan = make_plan(sources, shard_len=shard_len or catalog.DEFAULT_SHARD_LEN,
                         storage_options=storage_options)
        catalog.create(url, n_rows=plan.rows, shard_len=plan.shard_len, plans=[_plan_record(plan)],
                       storage_options=storage_options)
        return plan
    group = catalog.open_group(url, mode="r+", storage_options=storage_options, check=False)
    meta = catalog.metadata(group)
    if shard_len and shard_len != meta["shard_len"]:
        raise CatalogError(
            f"{url}: catalog has shard length {meta['shard_len']}, not {shard_len}; "
            "use another catalog URL or drop --shard-len"
        )
    probe = make_plan(sources, shard_len=meta["shard_len"], storage_options=storage_options)
    known = {p["id"]: p for p in meta["plans"]}
    if probe.id in known:  # a rerun: resume the plan where it stopped
        plan = Plan(probe.id, probe.files, known[probe.id]["row_start"], meta["shard_len"])
    else:
        if known and not append:
            raise CatalogError(
                f"{url}: catalog already holds other sources (plan(s) {', '.join(known)}, "
                f"{max(p['row_stop'] for p in known.values())} rows); pass --append to add these "
                "as a new collection"
            )
        for p in meta["plans"]:
            todo = len(catalog.shard_ranges(p["row_start"], p["row_stop"], meta["shard_len"]))
            if len(catalog.done_shards(url, f"{STAGE}/{p['id']}", storage_options=storage_options)) < todo:
                raise CatalogError(
                    f"{url}: ingest of plan {p['id']} is unfinished; rerun it with its sources "
                    "before appending others"
                )
        row_start = max((p["row_stop"] for p in meta["plans"]), default=0)
        plan = Plan(probe.id, probe.files, row_start, meta["shard_len"])
        # Record first, then grow: a crash in between leaves a plan that a rerun completes.
        catalog.update_metadata(group, plans=[*meta["plans"], _plan_record(plan)])
    catalog.ensure_rows(group, plan.row_stop)
    return plan


def _plan_record(plan: Plan) -> dict:
    record = plan.to_dict()
    record["created"] = datetime.now(UTC).isoformat(timespec="seconds")
    record["pzscale"] = version("pzscale")
    return record


def ingest(
    sources: list[str],
    url: str,
    *,
    shard_len: int | None = None,
    append: bool = False,
    client: Client | None = None,
    storage_options: dict | None = None,
    progress: bool = True,
) -> IngestReport:
    """Ingest Planktonzilla-format parquet ``sources`` into the catalog at ``url``.

    Rerunning with the same sources resumes: shards with a done marker are skipped.
    ``append=True`` adds the sources after the existing rows, leaving those unchanged.
    Raises StageError if any shard failed; the shards that succeeded stay done.
    """
    catalog.check_url(url)
    try:
        client = client or get_client()
    except ValueError:
        raise StageError("no Dask client: start one with pzscale.cluster.connect()") from None
    plan = _prepare(list(sources), url, shard_len, append, storage_options)
    done = catalog.done_shards(url, plan.stage, storage_options=storage_options)
    all_tasks = plan.shard_tasks()
    common = {"catalog": url, "storage_options": storage_options, "plan": plan.id,
              "stage": plan.stage, "shard_len": plan.shard_len}
    tasks = [{**t, **common} for t in all_tasks if t["shard"] not in done]
    run = run_shards(client, ingest_shard, tasks, desc="ingest", skipped=len(all_tasks) - len(tasks),
                     show=progress)
    status: Counter = Counter()
    for r in run.results:
        status.update(r["status"])
    report = IngestReport(
        catalog=url, plan_id=plan.id, rows=(plan.row_start, plan.row_stop),
        shards_total=len(all_tasks), shards_skipped=len(all_tasks) - len(tasks),
        shards_written=len(run.results), status=dict(status),
        failures=[f"shard {t['shard']}: {msg}" for t, msg in run.failures],
        seconds=run.seconds, images_per_second=run.images_per_second,
    )
    if run.failures:
        raise StageError(f"{len(run.failures)} shard(s) failed; fix and rerun to resume:\n{report}")
    return report
