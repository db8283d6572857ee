"""Tasks on a Dask cluster with a progress bar (terminal or notebook), and the retry rule.

Used by ``stage`` for every stage: shards done/total, images/s and ETA; failures are collected per
shard instead of stopping the other shards. A shard task that hits a transient storage
error (timeout, dropped connection, throttling: ``faults.is_transient``) is run again
inside the worker after an exponential, jittered pause; shard tasks are idempotent
(whole-shard writes, marker last), so a repeat is harmless.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
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


def call_with_backoff(fn: Callable[..., Any], *args: Any, backoff: Backoff) -> Any:
    """``fn(*args)``, run again after a pause while it raises a transient error, up to ``backoff.attempts`` runs.

    Any other error goes through at once. When the attempts run out, a StageError says how many
    there were and what the last error was (the original error is its cause).
    """
    rng = random.Random()
    started = time.monotonic()
    for attempt in range(1, backoff.attempts + 1):
        try:
            return fn(*args)
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
    results: list[Any] = field(default_factory=list)
    failures: list[tuple[Any, str]] = field(default_factory=list)
    images: int = 0
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


def run_shards(
    client: Client | None,
    fn: Callable[..., Any],
    tasks: list[Any],
    *,
    desc: str,
    skipped: int = 0,
    show: bool = True,
    retries: int = 2,
    resources: dict | None = None,
    backoff: Backoff | None = None,
    args: list[Any] | tuple[Any, ...] = (),
    ordered: bool = False,
) -> ShardRun:
    """Submit ``fn(task, *args)`` for every task (each with a ``shard``) and wait, updating a progress bar.

    A result that is a dict with ``rows`` counts that many images. Exceptions raised by a task
    (after ``retries``) are recorded with the task; the others still run. Transient storage errors
    are retried inside the task with ``backoff`` (default ``DEFAULT_BACKOFF``); ``retries`` then
    reruns a task whatever it raised, at once; a dead worker is handled by Dask itself.
    ``resources`` (``{"GPU": 1}``) pins tasks to workers that advertise them. Results come in
    completion order, or in task order with ``ordered``. Without a client the tasks run one after
    the other in this process, on the same retry rule.
    """
    run = ShardRun()
    start = time.perf_counter()
    bar = tqdm(total=len(tasks) + skipped, initial=skipped, desc=desc, unit="shard", disable=not show)
    task_fn = functools.partial(call_with_backoff, fn, backoff=backoff or DEFAULT_BACKOFF)
    done: dict[int, Any] = {}
    for i, future in _submitted(client, task_fn, tasks, args, desc=desc, retries=retries, resources=resources):
        try:
            result = future.result()
        except Exception as e:  # noqa: BLE001 - a shard failure is data; the run goes on
            run.failures.append((tasks[i], f"{type(e).__name__}: {e}"))
        else:
            done[i] = result
            if isinstance(result, dict) and "rows" in result:
                run.images += result["rows"]
        run.seconds = time.perf_counter() - start
        bar.set_postfix(images_per_s=f"{run.images_per_second:,.0f}", failed=len(run.failures))
        bar.update(1)
    bar.close()
    run.results = [done[i] for i in sorted(done)] if ordered else list(done.values())
    run.seconds = time.perf_counter() - start
    return run


def _submitted(client: Client | None, fn: Callable[..., Any], tasks: list[Any], args: list[Any] | tuple[Any, ...], *,
               desc: str, retries: int, resources: dict | None) -> Iterator[tuple[int, Any]]:
    """(task index, finished future) as tasks finish: Dask futures, or futures run here when there is no client."""
    if client is None:
        for i, task in enumerate(tasks):
            future: Future = Future()
            try:
                future.set_result(fn(task, *args))
            except Exception as e:  # noqa: BLE001 - handed to the caller like a Dask task's error
                future.set_exception(e)
            yield i, future
        return
    keys = [f"{desc}-shard-{t.shard}-{time.time_ns()}" for t in tasks]
    repeated = [[a] * len(tasks) for a in args]
    futures = client.map(fn, tasks, *repeated, key=keys, pure=False, retries=retries, resources=resources)
    position = {f.key: i for i, f in enumerate(futures)}
    for future in as_completed(futures):
        yield position[future.key], future
        future.release()
