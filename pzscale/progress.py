"""Run one task per shard on a Dask cluster, with a progress bar (terminal or notebook).

Shared by every stage: shards done/total, images/s and ETA; failures are collected per
shard instead of stopping the other shards.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from distributed import Client, as_completed
from tqdm.auto import tqdm


@dataclass
class ShardRun:
    results: list[dict] = field(default_factory=list)
    failures: list[tuple[dict, str]] = field(default_factory=list)
    images: int = 0
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


def run_shards(
    client: Client,
    fn: Callable[[dict], dict],
    tasks: list[dict],
    *,
    desc: str,
    skipped: int = 0,
    show: bool = True,
    retries: int = 2,
    resources: dict | None = None,
) -> ShardRun:
    """Submit ``fn(task)`` for every task and wait, updating a progress bar.

    ``fn`` returns a dict with at least ``rows`` (images processed). Exceptions raised
    by a task (after ``retries``) are recorded with the task; the others still run.
    ``retries`` covers errors a task raises; a dead worker is handled by Dask itself.
    ``resources`` (``{"GPU": 1}``) pins tasks to workers that advertise them.
    """
    run = ShardRun()
    start = time.perf_counter()
    bar = tqdm(total=len(tasks) + skipped, initial=skipped, desc=desc, unit="shard", disable=not show)
    keys = [f"{desc}-shard-{t['shard']}-{time.time_ns()}" for t in tasks]
    futures = client.map(fn, tasks, key=keys, pure=False, retries=retries, resources=resources)
    by_key = {f.key: t for f, t in zip(futures, tasks, strict=True)}
    for future in as_completed(futures):
        task = by_key[future.key]
        try:
            result = future.result()
        except Exception as e:  # noqa: BLE001 - a shard failure is data; the run goes on
            run.failures.append((task, f"{type(e).__name__}: {e}"))
        else:
            run.results.append(result)
            run.images += result["rows"]
        run.seconds = time.perf_counter() - start
        bar.set_postfix(images_per_s=f"{run.images_per_second:,.0f}", failed=len(run.failures))
        bar.update(1)
        future.release()
    bar.close()
    run.seconds = time.perf_counter() - start
    return run


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

    @property
    def images_per_second(self) -> float:
        return self.rows_computed / self.seconds if self.seconds else 0.0

    def __str__(self) -> str:
        lines = [f"{self.stage} -> {self.catalog}: {self.shards_written} shard(s) written, {self.shards_skipped} "
                 f"already done, of {self.shards_total}; {self.rows_computed:,} images computed in "
                 f"{self.seconds:.1f} s ({self.images_per_second:,.0f} images/s)"]
        return "\n".join(lines + [f"  FAILED {f}" for f in self.failures])
