"""The one way a stage runs over catalog shards: a catalog handle, a shard task, pending shards from the
done markers, submission with progress and retries, the marker written last, and one report.

A stage is a plain function on the client that checks its arguments, creates its output arrays
(``Catalog.ensure_array``) and records its parameters, then hands ``run_stage`` its shard tasks and a
shard function. The shard function runs on a worker: it reads and writes the whole shard and returns
a ``ShardResult``; the runner writes the done markers it names after it returns, and reruns the whole
task after a pause if any step raised a transient storage error (``faults.is_transient``). Shard
tasks are idempotent (whole-shard writes, marker last), so a repeat is harmless. Stages that only read
shards use ``map_shards``, on the same retry rule. Client-side metadata reads and writes go through
``Catalog.retry``.
"""

from __future__ import annotations

import functools
import json
import pickle
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import zarr
from distributed import Client, get_client

from pzscale import catalog as store
from pzscale import progress
from pzscale.errors import StageError

# The Zarr groups this process opened, per (url, storage options, mode, rows): a worker opens the
# catalog once, not once per task; a handle made after the catalog grew opens it afresh.
_GROUPS: dict[tuple, zarr.Group] = {}
_MAX_GROUPS = 16


@dataclass(frozen=True)
class Catalog:
    """A picklable handle on a catalog: where it is and its shape, with the Zarr group opened lazily.

    Made on the client with ``Catalog.open`` (one read, retried like every metadata request) and
    passed to every shard task instead of a URL and its storage options.
    """

    url: str
    storage_options: Mapping[str, Any] | None = None
    shard_len: int = 0
    n_rows: int = 0

    @classmethod
    def open(cls, url: str | Catalog, storage_options: dict | None = None, *, check: bool = True) -> Catalog:
        """The handle of the catalog at ``url`` (a URL or a handle, which is re-read); ``check``
        verifies that every array has the catalog's rows and shards."""
        if isinstance(url, Catalog):
            url, storage_options = url.url, url.storage_options
        so = dict(storage_options) if storage_options else None
        group = retry(store.open_group, str(url), mode="r+", storage_options=so, check=check)
        handle = cls(str(url), so, store.metadata(group)["shard_len"], store.n_rows_of(group))
        handle._remember(group, "r+")
        return handle

    @property
    def options(self) -> dict | None:
        """The storage options as the keyword argument fsspec and zarr take."""
        return dict(self.storage_options) if self.storage_options else None

    def __hash__(self) -> int:  # storage options are a dict: hash their JSON (workers cache per handle)
        return hash(self._key(""))

    def _key(self, mode: str) -> tuple:
        return (self.url, json.dumps(self.storage_options, sort_keys=True, default=str), mode, self.n_rows)

    def _remember(self, group: zarr.Group, mode: str) -> None:
        if len(_GROUPS) >= _MAX_GROUPS:
            _GROUPS.pop(next(iter(_GROUPS)))
        _GROUPS[self._key(mode)] = group

    def group(self, mode: str = "r") -> zarr.Group:
        """The Zarr group, opened once per process and handle (``mode`` "r" or "r+")."""
        key = self._key(mode)
        if key not in _GROUPS:
            self._remember(retry(store.open_group, self.url, mode=mode, storage_options=self.options, check=False),
                           mode)
        return _GROUPS[key]

    def metadata(self) -> dict[str, Any]:
        """pzscale's group attributes, read afresh (the client's view of stages and plans)."""
        group = retry(store.open_group, self.url, mode="r", storage_options=self.options, check=False)
        return store.metadata(group)

    def shards(self, row_start: int = 0, row_stop: int | None = None) -> list[tuple[int, int, int]]:
        """(shard, first row, stop row) of every shard touched by rows [row_start, row_stop)."""
        return store.shard_ranges(row_start, self.n_rows if row_stop is None else row_stop, self.shard_len)

    def markers(self, stage: str) -> dict[int, dict]:
        """Every done marker of ``stage`` with its content, in one listing and one batch of reads."""
        return retry(store.marker_infos, self.url, stage, storage_options=self.options)

    def mark_done(self, stage: str, shard: int, info: dict, *, replace: bool = False) -> bool:
        return store.mark_done(self.url, stage, shard, info, storage_options=self.options, replace=replace)

    def ensure_array(self, name: str, **kwargs: Any) -> zarr.Array:
        """Create a stage's output array sharded like the others, or check it (client only)."""
        return retry(store.ensure_array, self.group("r+"), name, **kwargs)

    def update_attrs(self, name: str, attrs: dict) -> None:
        """Add attributes to array ``name`` (client only; nested mappings are flattened for netCDF)."""
        retry(store.update_attrs, self.group("r+"), name, attrs)

    def record_stage(self, stage: str, record: dict) -> None:
        """Record a stage's parameters in the group attributes (client only)."""
        retry(store.record_stage, self.group("r+"), stage, record)

    def read(self, start: int, stop: int, names: list[str] | tuple[str, ...]) -> dict[str, np.ndarray]:
        """Rows [start, stop) of the named arrays."""
        return store.read_rows(self.group(), start, stop, names)

    def write(self, start: int, stop: int, columns: dict[str, np.ndarray]) -> None:
        """Whole shards [start, stop) of the named arrays, all at once."""
        store.write_arrays(self.group("r+"), start, stop, columns)

    def arrays(self) -> list[str]:
        """Names of the catalog's arrays (one listing)."""
        return [name for name, _ in retry(lambda: list(self.group().arrays()))]


def retry(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` under the stage retry rule (``progress.DEFAULT_BACKOFF``): for the
    client's metadata requests, which would otherwise fail a whole stage on one throttled GET."""
    return progress.call_with_backoff(lambda: fn(*args, **kwargs), backoff=progress.DEFAULT_BACKOFF)


@dataclass(frozen=True)
class ShardTask:
    """One shard of one stage: rows [start, stop), of which [start, row_from) are done already and
    are kept byte for byte; ``params`` are the stage's own (model, batch size, grid ...)."""

    catalog: Catalog
    stage: str
    shard: int
    start: int
    stop: int
    row_from: int
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def new_rows(self) -> int:
        return self.stop - self.row_from

    def with_params(self, **params: Any) -> ShardTask:
        return replace(self, params={**self.params, **params})


@dataclass
class ShardResult:
    """What a shard function did: rows computed, the done markers to write after it (stage -> info;
    ``rows`` is filled in), whether they replace earlier ones, and counts to add up in the report."""

    rows: int
    markers: dict[str, dict] = field(default_factory=dict)
    replace: bool = False
    status: dict[str, int] = field(default_factory=dict)


@dataclass
class StageReport:
    """What a stage over catalog shards did, for the CLI and notebooks."""

    stage: str
    catalog: str
    shards_total: int
    shards_skipped: int
    shards_written: int
    rows_computed: int
    seconds: float
    failures: list[str] = field(default_factory=list)
    rows: tuple[int, int] = (0, 0)
    status: dict[str, int] = field(default_factory=dict)
    input_errors: list[str] = field(default_factory=list)
    input_notes: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.rows_computed / self.seconds if self.seconds else 0.0

    def __str__(self) -> str:
        lines = [f"{self.stage} -> {self.catalog}: {self.shards_written} shard(s) written, {self.shards_skipped} "
                 f"already done, of {self.shards_total}; {self.rows_computed:,} images computed in "
                 f"{self.seconds:.1f} s ({self.images_per_second:,.0f} images/s)"]
        if self.status:
            lines.append(f"  status: {', '.join(f'{k}={v}' for k, v in sorted(self.status.items()))}")
        lines += [f"  SKIPPED INPUT {e}" for e in self.input_errors]
        lines += [f"  NOTE {n}" for n in self.input_notes]
        return "\n".join(lines + [f"  FAILED {f}" for f in self.failures])


def require_client(client: Client | None) -> Client:
    """The given client or the current one; a one-line StageError when there is none."""
    try:
        return client or get_client()
    except ValueError:
        raise StageError("no Dask client: start one with pzscale.cluster.connect()") from None


def _current(client: Client | None) -> Client | None:
    try:
        return client or get_client()
    except ValueError:
        return None


def pending(cat: Catalog, stage: str, *, params: Mapping[str, Any] | None = None,
            valid: Callable[[dict], bool] | None = None, ranges: list[tuple[int, int, int]] | None = None,
            markers: dict[int, dict] | None = None) -> tuple[list[ShardTask], int]:
    """One task per shard (of ``ranges``, default all) with rows the markers of ``stage`` do not cover,
    and the count of shards with nothing to do.

    A marker records the rows it covers, so after an append only the new rows are computed: whole
    new shards, and the new tail of the shard that was last before. A marker that ``valid`` rejects
    (other parameters) counts as absent. ``markers``: the stage's markers when the caller read them already.
    """
    markers = cat.markers(stage) if markers is None else markers
    covered = {shard: info["rows"][1] for shard, info in markers.items()
               if valid is None or valid(info)}
    tasks, skipped = [], 0
    for shard, start, stop in ranges if ranges is not None else cat.shards():
        row_from = max(start, covered.get(shard, start))
        if row_from >= stop:
            skipped += 1
        else:
            tasks.append(ShardTask(cat, stage, shard, start, stop, row_from, dict(params or {})))
    return tasks, skipped


def run_task(fn: Callable[[ShardTask], ShardResult], task: ShardTask) -> dict:
    """A task on a worker: the shard's writes, then its markers (last), as one retried unit."""
    started = time.perf_counter()
    result = fn(task)
    for stage, info in result.markers.items():
        # False from mark_done: another attempt of the same shard and rows marked it first (same bytes)
        task.catalog.mark_done(stage, task.shard, {"rows": [task.start, task.stop], **info}, replace=result.replace)
    return {"shard": task.shard, "rows": result.rows, "status": result.status,
            "seconds": time.perf_counter() - started}


def run_stage(
    stage: str,
    fn: Callable[[ShardTask], ShardResult],
    tasks: list[ShardTask],
    *,
    catalog: Catalog,
    client: Client | None,
    skipped: int = 0,
    progress_bar: bool = True,
    resources: dict | None = None,
    rows: tuple[int, int] | None = None,
    input_errors: list[str] | None = None,
    input_notes: list[str] | None = None,
) -> StageReport:
    """Run ``fn`` on every task (one Dask task per shard; in this process when there is no client,
    for light stages) and report; raises StageError naming the failed shards (finished shards stay
    done: a rerun resumes). Heavy stages call ``require_client`` first."""
    client = _current(client)
    run = progress.run_shards(client, functools.partial(run_task, fn), tasks, desc=stage.split("/")[0],
                              skipped=skipped, show=progress_bar, resources=resources)
    status: Counter = Counter()
    for result in run.results:
        status.update(result["status"])
    report = StageReport(stage, catalog.url, len(tasks) + skipped, skipped, len(run.results), run.images,
                         run.seconds, [f"shard {t.shard}: {m}" for t, m in run.failures],
                         rows=rows or (0, catalog.n_rows), status=dict(status), input_errors=input_errors or [],
                         input_notes=input_notes or [])
    if run.failures:
        raise StageError(f"{len(run.failures)} shard(s) failed; rerun to resume (a shard that fails on every rerun "
                         f"may be damaged: `pzscale verify --catalog {catalog.url}`):\n{report}")
    return report


def map_shards(fn: Callable[..., Any], cat: Catalog, *args: Any, client: Client | None = None,
               ranges: list[tuple[int, int, int]] | None = None) -> list:
    """``fn(cat, start, stop, *args)`` for every shard (of ``ranges``), results in shard order.

    On the given or current Dask client when there is one (large arguments sent to the workers
    once), else in this process; transient storage errors are retried per shard either way, and a
    shard that still fails raises a StageError naming it.
    """
    ranges = cat.shards() if ranges is None else ranges
    client = _current(client)
    shared = [client.scatter(a, broadcast=True, hash=False) if client and _large(a) else a for a in args]
    tasks = [ShardTask(cat, "read", shard, a, b, a) for shard, a, b in ranges]
    run = progress.run_shards(client, functools.partial(_read_task, fn), tasks,
                              desc="read", show=False, args=shared, ordered=True)
    if run.failures:
        task, message = run.failures[0]
        raise StageError(f"{cat.url}: reading shard {task.shard} failed ({len(run.failures)} shard(s) in all): "
                         f"{message} (`pzscale verify --catalog {cat.url}` lists damaged shards)")
    return run.results


def _read_task(fn: Callable[..., Any], task: ShardTask, *args: Any) -> Any:
    return fn(task.catalog, task.start, task.stop, *args)


def _large(value: Any) -> bool:
    if isinstance(value, np.ndarray):
        return value.nbytes > 100_000
    try:
        return len(pickle.dumps(value, protocol=5)) > 100_000
    except Exception:  # noqa: BLE001 - not picklable here: let Dask say so
        return False
