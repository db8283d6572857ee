"""Verify a catalog against its done markers, and forget the markers of shards whose data is damaged.

A done marker says a stage wrote a shard; storage can still lose or damage the objects afterwards (a
truncated upload, a deleted object, a bit flip). ``verify`` reads every shard of every array on the
cluster, one task per shard, and reports a shard as damaged when

- an array's shard does not decode (a truncated or corrupt object, a checksum that does not match), or
- rows an ingest marker covers have no image id or no status (the shard object is gone: Zarr then
  returns fill values), or an image whose status is ``ok`` has no bytes.

A missing object of other arrays cannot be told from data that is all fill value (Zarr does not store
such shards), so for them only decoding is checked. Unless ``read_only``, the markers of the stages that
own a damaged shard are removed, so a rerun of those stages (ingest included, with its sources) rewrites
it: base variables belong to the ingest plans whose rows the shard holds, any other array to every other
stage that marked the shard done; shard objects that do not decode are deleted (their data is lost
already, and Zarr reads a shard before it rewrites it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from distributed import Client

from pzscale import catalog
from pzscale.errors import one_line
from pzscale.faults import is_transient
from pzscale.schema import STATUS_OK, VARIABLE_NAMES
from pzscale.stage import Catalog, map_shards, retry

INGEST = "ingest/"
UNDECODABLE = "does not decode"


@dataclass(frozen=True)
class Damage:
    shard: int
    rows: tuple[int, int]
    array: str
    problem: str
    stages: tuple[str, ...] = ()  # whose markers were (or would be) removed

    def __str__(self) -> str:
        owners = f"; rerun {', '.join(self.stages)}" if self.stages else ""
        where = f"shard {self.shard} (rows {self.rows[0]}-{self.rows[1] - 1})"
        return f"DAMAGED {where} {self.array}: {self.problem}{owners}"


@dataclass
class VerifyReport:
    catalog: str
    shards: int
    arrays: int
    damaged: list[Damage] = field(default_factory=list)
    markers_removed: int = 0

    @property
    def ok(self) -> bool:
        return not self.damaged

    def __str__(self) -> str:
        head = (f"verify {self.catalog}: {self.shards} shard(s) x {self.arrays} array(s) read; "
                f"{len({d.shard for d in self.damaged})} shard(s) damaged")
        if self.markers_removed:
            head += f", {self.markers_removed} done marker(s) removed: rerun the stages named to rewrite them"
        return "\n".join([head, *map(str, self.damaged)])


def check_shard(cat: Catalog, start: int, stop: int, names: list[str],
                ingested: list[tuple[int, int]]) -> list[tuple[str, str]]:
    """(array, problem) for every damage in rows [start, stop); ``ingested`` are the row ranges an
    ingest marker covers. Transient storage errors are raised (the task is retried), nothing else."""
    group, problems, kept = cat.group(), [], {}
    for name in names:
        try:
            values = group[name][start:stop]
        except Exception as e:  # noqa: BLE001 - any decoder or codec failure is this shard's damage
            if is_transient(e):
                raise
            problems.append((name, f"{UNDECODABLE} ({type(e).__name__}: {one_line(e)})"))
            continue
        if name == "image_bytes":  # keep the lengths only: a shard of images is the big one
            kept[name] = np.fromiter((len(b) for b in values), np.int64, len(values))
        elif name in ("image_id", "status"):
            kept[name] = values
    covered = np.zeros(stop - start, bool)
    for a, b in ingested:
        covered[max(a, start) - start : max(min(b, stop) - start, 0)] = True
    for name in ("image_id", "status"):
        if name in kept and (lost := np.count_nonzero(covered & (kept[name] == ""))):
            problems.append((name, f"{lost} row(s) the ingest marked done are empty (shard object lost?)"))
    if "status" in kept and "image_bytes" in kept:
        empty = np.count_nonzero(covered & (kept["status"] == STATUS_OK) & (kept["image_bytes"] == 0))
        if empty:
            problems.append(("image_bytes", f"{empty} image(s) with status ok have no bytes (shard object lost?)"))
    return problems


def verify(url: str | Catalog, *, storage_options: dict | None = None, client: Client | None = None,
           read_only: bool = False) -> VerifyReport:
    """Check every shard of every array of the catalog (one task per shard); see the module's doc."""
    cat = Catalog.open(url, storage_options, check=False)
    names = sorted(cat.arrays())
    stages = retry(catalog.stages_done, cat.url, storage_options=cat.options)
    ingested: dict[int, list[tuple[int, int]]] = {}
    owners: dict[int, list[str]] = {}
    for stage in sorted(stages):
        if stage.startswith(INGEST):
            for shard, info in cat.markers(stage).items():
                ingested.setdefault(shard, []).append(tuple(info["rows"]))
        for shard in stages[stage]:
            owners.setdefault(shard, []).append(stage)
    ranges = cat.shards()
    found = map_shards(_check, cat, names, ingested, client=client, ranges=ranges)
    report = VerifyReport(cat.url, len(ranges), len(names))
    for (shard, start, stop), problems in zip(ranges, found, strict=True):
        for array, problem in problems:
            ingest = array in VARIABLE_NAMES
            mine = tuple(s for s in owners.get(shard, []) if s.startswith(INGEST) == ingest)
            report.damaged.append(Damage(shard, (start, stop), array, problem, mine))
    if not read_only:
        for d in report.damaged:
            if d.problem.startswith(UNDECODABLE):  # Zarr reads a shard before rewriting it: make way
                retry(catalog.drop_shard, cat.group("r+"), d.array, d.shard)
        forget = sorted({(stage, d.shard) for d in report.damaged for stage in d.stages})
        for stage, shard in forget:
            retry(catalog.forget_done, cat.url, stage, shard, storage_options=cat.options)
        report.markers_removed = len(forget)
    return report


def _check(cat: Catalog, start: int, stop: int, names: list[str],
           ingested: dict[int, list[tuple[int, int]]]) -> list[tuple[str, str]]:
    return check_shard(cat, start, stop, names, ingested.get(start // cat.shard_len, []))
