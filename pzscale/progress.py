"""Run one task per shard on a Dask cluster, with a progress bar (terminal or notebook).

Shared by every stage: shards done/total, images/s and ETA; failures are collected per
shard instead of stopping the other shards. A shard task that hits a transient storage
error (timeout, dropped connection, throttling: ``faults.is_transient``) is run again
inside the worker after an exponential, jittered pause; shard tasks are idempotent
(whole-shard writes, marker last), so a repeat is harmless.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from distributed import Client, as_completed
from tqdm.auto import tqdm

from pzscale.errors import StageError, one_line
from pzscale.faults import is_transient


@dataclass(frozen=True)
class Backoff:
    """Retry policy for transient errors: at most ``attempts`` runs, pauses drawn uniformly from
    ``[0, min(max_s, base_s * 2**k))`` ("full jitter", so that throttled workers do not retry in step)."""

    attempts: int = 6
    base_s: float = 0.5
    max_s: float = 30.0

    def pause(self, retry: int, rng: random.Random) -> float:
        return rng.uniform(0, min(self.max_s, self.base_s * 2**retry))


# What run_shards uses when not given a policy; read at submission, so a session may change it.
DEFAULT_BACKOFF = Backoff()


def call_with_backoff(fn: Callable[[Any], Any], arg: Any, *, backoff: Backoff) -> Any:
    """``fn(arg)``, run again after a pause while it raises a transient error, up to ``backoff.attempts`` runs.

    Any other error goes through at once. When the attempts run out, a StageError says how many
    there were and what the last error was (the original error is its cause).
    """
    rng = random.Random()
    started = time.monotonic()
    for attempt in range(1, backoff.attempts + 1):
        try:
            return fn(arg)
        except Exception as e:
            if not is_transient(e):
                raise
            if attempt == backoff.attempts:
                raise StageError(f"gave up after {attempt} attempts in {time.monotonic() - started:.1f} s; "
                                 f"last error {type(e).__name__}: {one_line(e)}") from e
            time.sleep(backoff.pause(attempt - 1, rng))
    raise AssertionError("unreachable")


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
    backoff: Backoff | None = None,
) -> ShardRun:
    """Submit ``fn(task)`` for every task and wait, updating a progress bar.

    ``fn`` returns a dict with at least ``rows`` (images processed). Exceptions raised
    by a task (after ``retries``) are recorded with the task; the others still run.
    Transient storage errors are retried inside the task with ``backoff`` (default
    ``DEFAULT_BACKOFF``); ``retries`` then reruns a task whatever it raised, at once; a dead
    worker is handled by Dask itself. ``resources`` (``{"GPU": 1}``) pins tasks to workers
    that advertise them.
    """
    run = ShardRun()
    start = time.perf_counter()
    bar = tqdm(total=len(tasks) + skipped, initial=skipped, desc=desc, unit="shard", disable=not show)
    keys = [f"{desc}-shard-{t['shard']}-{time.time_ns()}" for t in tasks]
    task_fn = functools.partial(call_with_backoff, fn, backoff=backoff or DEFAULT_BACKOFF)
    futures = client.map(task_fn, tasks, key=keys, pure=False, retries=retries, resources=resources)
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
