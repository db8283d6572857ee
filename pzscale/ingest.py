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
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from functools import lru_cache
from importlib.metadata import version

import fsspec
import numpy as np
import psutil
from distributed import Client

from pzscale import catalog, ids, readers, records, taxonomy
from pzscale.errors import CatalogError, InputError, PzscaleError, StageError, one_line
from pzscale.faults import is_transient
from pzscale.limits import Limits, using
from pzscale.readers.base import Item
from pzscale.records import columns_from_table
from pzscale.stage import (
    Catalog,
    ShardResult,
    ShardTask,
    StageReport,
    map_shards,
    pending,
    require_client,
    retry,
    run_stage,
)

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
    # each input file's rows become catalog types on their own: a shard may hold files whose columns differ
    parts = [_read_segment(plan.readers[index], plan.items[index], first, stop, cat.options, p.get("sample"))
             for index, first, stop in p["segments"]]
    columns = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    if p["taxonomy"]:
        so_key = json.dumps(cat.options, sort_keys=True) if cat.options else ""
        taxonomy.apply(taxonomy.cached_table(p["taxonomy"], so_key), columns, table_source=p["taxonomy_source"])
    duplicate_rows, renamed = p.get("duplicates", ([], []))
    ids.apply_policy(columns["image_id"], columns["qc"], np.asarray(duplicate_rows, np.int64) - task.row_from,
                     renamed, p["duplicate_ids"])
    # a shard that begins with rows of an earlier collection (append) rewrites them unchanged
    columns = catalog.with_stored_rows(cat.group("r+"), task.start, task.row_from, columns)
    catalog.write_rows(cat.group("r+"), task.start, task.stop, columns)
    counts = dict(Counter(columns["status"][task.row_from - task.start :]))
    return ShardResult(task.new_rows, {task.stage: {"rows": [task.row_from, task.stop], "plan": p["plan"],
                                                    "status": counts}}, status=counts)


def _read_segment(reader_name: str, item: Item, first: int, stop: int, so: dict | None,
                  sample: dict | None = None) -> dict[str, np.ndarray]:
    """Rows [first, stop) of one input as catalog variables (``sample``: the ingest's ``records.sample_rule``).
    Bad values are row data (QC flags, status); anything else that fails is a bug or a storage fault, raised
    naming the input and its first failing row."""
    reader = readers.get(reader_name)
    try:
        return columns_from_table(reader.read(item, first, stop, storage_options=so),
                                  row_names=records.row_names(item.source, first, stop), sample=sample)
    except Exception as e:
        if is_transient(e) or isinstance(e, PzscaleError):
            raise
        row = _first_failing_row(reader, item, first, stop, so)
        raise StageError(f"{item.source} row {row}: {type(e).__name__}: {one_line(e)}") from e


def _first_failing_row(reader: readers.Reader, item: Item, first: int, stop: int, so: dict | None) -> str:
    for row in range(first, stop):  # only after a failure: one row at a time
        try:
            columns_from_table(reader.read(item, row, row + 1, storage_options=so),
                               row_names=records.row_names(item.source, row, row + 1))
        except Exception:  # noqa: BLE001 - looking for the row, the first error is raised by the caller
            return str(row)
    return f"{first}-{stop - 1}"


# ---------------------------------------------------------------- image ids, checked before any write


@dataclass
class IdCheck:
    """New rows whose image id another row has too, found before the ingest writes."""

    rows: int = 0  # new rows whose id is shared (with a new or a catalog row)
    ids: int = 0  # distinct ids among them
    example: str = ""
    shared: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # plan rows (0-based) of those rows
    renamed: np.ndarray = field(default_factory=lambda: np.zeros(0, object))  # their new ids (suffix policy)

    def __str__(self) -> str:
        return (f"{self.rows:,} new row(s) share an image id with another row ({self.ids:,} id(s)), "
                f"e.g. {self.example}")

    def by_shard(self, row_start: int, shard_len: int) -> dict[int, tuple[list[int], list[str]]]:
        if not len(self.shared):
            return {}
        rows = self.shared + row_start  # sorted: split once at the shard boundaries
        shards, first = np.unique(rows // shard_len, return_index=True)
        return {int(shard): (r.tolist(), n.tolist()) for shard, r, n in
                zip(shards, np.split(rows, first[1:]), np.split(self.renamed, first[1:]), strict=True)}


def _item_ids(reader_name: str, item: Item, so: dict | None) -> np.ndarray:
    """The image ids of an item's rows, from its keys alone (on a worker)."""
    names = records.row_names(item.source, 0, item.rows)
    if not item.rows:
        return np.zeros(0, object)
    try:
        table = retry(readers.get(reader_name).read_keys, item, storage_options=so)
    except Exception as e:
        if is_transient(e):
            raise
        # unreadable here is unreadable in its shards too, which fail naming it: no id to compare meanwhile
        log.warning("%s: image ids not checked (%s)", item.source, one_line(e))
        return np.array([f"\0unread:{item.source}#{n}" for n in names], dtype=object)
    return records.ids_of_table(table, names)


def _item_keys(reader_name: str, item: Item, so: dict | None) -> np.ndarray:
    """The id hashes of an item's rows (on a worker): 8 bytes a row go back to the client, not the ids."""
    return ids.hashes(_item_ids(reader_name, item, so))


def _catalog_keys(cat: Catalog, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    image_id = cat.read(start, stop, ["image_id"])["image_id"]
    written = np.flatnonzero(image_id != "")  # rows of an unfinished ingest are not ids yet
    return written + start, ids.hashes(image_id[written])


def check_ids(probe: Plan, url: str, client: Client, storage_options: dict | None, policy: str = "flag") -> IdCheck:
    """Hash every new row's image id on the cluster (one task per input), compare with each other and
    with the catalog's other collections, and say which new rows share one (their ids read again, from the
    inputs that hold them, for the report and the ``suffix`` policy's new ids)."""
    futures = client.map(_item_keys, list(probe.readers), list(probe.items), so=storage_options, pure=False)
    new_keys = np.concatenate([np.zeros(0, np.uint64), *client.gather(futures)])
    old_rows, old_keys = np.zeros(0, np.int64), np.zeros(0, np.uint64)
    if retry(catalog.exists, url, storage_options=storage_options):
        cat = Catalog.open(url, storage_options, check=False)
        ranges = [r for p in cat.metadata()["plans"] if p["id"] != probe.id
                  for r in catalog.shard_ranges(p["row_start"], p["row_stop"], cat.shard_len)]
        parts = map_shards(_catalog_keys, cat, client=client, ranges=ranges)
        old_rows = np.concatenate([old_rows, *(rows for rows, _ in parts)])
        old_keys = np.concatenate([old_keys, *(keys for _, keys in parts)])
    every = np.concatenate([old_keys, new_keys])
    before, size = ids.occurrences(every)
    before, size = before[len(old_keys):], size[len(old_keys):]
    shared = np.flatnonzero(size > 1)
    if not len(shared):
        return IdCheck()
    items, within = _locate(probe, shared)
    texts = np.empty(len(shared), dtype=object)
    for item in np.unique(items).tolist():
        mine = np.flatnonzero(items == item)
        texts[mine] = client.submit(_ids_at, probe.readers[item], probe.items[item], within[mine],
                                    so=storage_options, pure=False).result()
    renamed = ids.suffixed(texts.tolist(), before[shared], np.sort(every)) if policy == "suffix" else \
        [""] * len(shared)
    key = new_keys[shared[0]]
    places = [f"catalog row {r}" for r in old_rows[old_keys == key][:2].tolist()]
    places += [_place(probe, row) for row in np.flatnonzero(new_keys == key)[:3 - len(places)].tolist()]
    return IdCheck(len(shared), len(np.unique(new_keys[shared])), f"{texts[0]!r} at {', '.join(places)}",
                   shared.astype(np.int64), np.asarray(renamed, dtype=object))


def _ids_at(reader_name: str, item: Item, rows: np.ndarray, so: dict | None) -> list[str]:
    """The image ids of rows ``rows`` of an item (on a worker)."""
    return _item_ids(reader_name, item, so)[rows].tolist()


def _locate(plan: Plan, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(item index, row within the item) of plan rows ``rows``."""
    sizes = np.array([i.rows for i in plan.items], np.int64)
    stops = np.cumsum(sizes)
    index = np.searchsorted(stops, rows, side="right")
    return index, rows - (stops[index] - sizes[index])


def _place(plan: Plan, row: int) -> str:
    index, within = _locate(plan, np.array([row]))
    return f"{plan.items[int(index[0])].source} row {int(within[0])}"


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
        "input_errors": len(plan.errors), "input_notes": len(plan.notes),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
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
    duplicate_ids: str = "flag",
    sample: str | None = None,
    sample_column: str | None = None,
    sample_pattern: str | None = None,
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
    Image ids are checked across the inputs and the catalog before any write; ``duplicate_ids`` says what
    happens to rows whose id is shared: ``flag`` (kept, QC flag), ``suffix`` (``~2``...), ``refuse``
    (InputError); see ``pzscale.ids``. Each row's ``sample`` is what its reader finds (IFCB bin, EcoTaxa sample_id
    or acq_id, the folder above a class folder, a ``sample`` column or json field) unless ``sample`` names one for
    every row, or ``sample_column`` (a record column, e.g. ``original_path``) gives it, cut to ``sample_pattern``'s
    first group when given (rows it does not match: '' and QC flag ``sample_unmatched``).
    """
    catalog.check_url(url)
    rule = records.sample_rule(sample, sample_column, sample_pattern)
    if duplicate_ids not in ids.POLICIES:
        raise InputError(f"duplicate ids policy {duplicate_ids!r}: choose one of {', '.join(ids.POLICIES)}")
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
        shared = check_ids(probe, url, client, storage_options, duplicate_ids)
    if shared.rows and duplicate_ids == "refuse":
        raise InputError(f"{shared}; nothing written (ingest with duplicate ids 'flag' to keep and flag them, "
                         "or 'suffix' to make them unique)")
    notes = [*probe.notes, *([f"{shared} ({duplicate_ids})"] if shared.rows else [])]
    with metadata_lock(url, storage_options=storage_options):
        plan = retry(_prepare, probe, url, shard_len, append, storage_options)
        cat = Catalog.open(url, storage_options, check=False)
        cat.record_stage(plan.stage, {"format": format, "source": source, "taxonomy_table": taxonomy_table,
                                      "taxonomy_source": taxonomy_source, "taxonomy_sha256": table_sha,
                                      "limits": limits.to_dict(), "duplicate_ids": duplicate_ids,
                                      "shared_id_rows": shared.rows, "sample": rule})
    params = {"plan": plan.id, "taxonomy": taxonomy_table, "taxonomy_source": taxonomy_source,
              "limits": limits.to_dict(), "duplicate_ids": duplicate_ids, **({"sample": rule} if rule else {})}
    by_shard = shared.by_shard(plan.row_start, plan.shard_len)
    ranges = [(t["shard"], t["shard"] * plan.shard_len, t["stop"]) for t in plan.shard_tasks()]
    tasks, skipped = pending(cat, plan.stage, params=params, ranges=ranges)
    segments = {t["shard"]: t for t in plan.shard_tasks()}
    # a shard is ingested whole or not at all: its marker is written last, so a marked shard is done
    tasks = [replace(t, row_from=segments[t.shard]["start"],
                     params={**t.params, "segments": segments[t.shard]["segments"],
                             "duplicates": by_shard.get(t.shard, ([], []))})
             for t in tasks]
    return run_stage(plan.stage, ingest_shard, tasks, catalog=cat, client=client, skipped=skipped,
                     progress_bar=progress, rows=(plan.row_start, plan.row_stop), input_errors=plan.errors,
                     input_notes=notes)
