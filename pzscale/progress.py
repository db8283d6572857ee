"""Tasks on a Dask cluster with a progress report, and the retry rule.

Used by ``stage`` for every stage: shards done/total, images/s and ETA, as a bar on a terminal or a
widget in a notebook, else (a batch job, a pod's log, CI) as a log line every
``PZSCALE_PROGRESS_SECONDS`` (default 30) through the ``pzscale`` logger. Failures are collected per
shard instead of stopping the other shards. A shard task that hits a transient storage
error (timeout, dropped connection, throttling: ``faults.is_transient``) is run again
inside the worker after an exponential, jittered pause; shard tasks are idempotent
(whole-shard writes, marker last), so a repeat is harmless.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from distributed import Client, as_completed
from tqdm.auto import tqdm

from pzscale.errors import StageError, one_line
from pzscale.faults import is_transient

log = logging.getLogger("pzscale")


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
    bar = progress_bar(len(tasks) + skipped, skipped, desc, show=show)
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


def interactive() -> bool:
    """A person watches this process: stderr is a terminal, or it is a Jupyter kernel (a widget)."""
    return sys.stderr.isatty() or "ipykernel" in sys.modules


def progress_bar(total: int, initial: int, desc: str, *, show: bool = True) -> tqdm | ProgressLog:
    """A tqdm bar where a person watches, log lines elsewhere; nothing when not ``show`` or when the
    ``pzscale`` logger is set above INFO (``pzscale -q``)."""
    show = show and not (log.level and log.level > logging.INFO)
    if show and not interactive():
        return ProgressLog(total, initial, desc, float(os.environ.get("PZSCALE_PROGRESS_SECONDS", 30)))
    return tqdm(total=total, initial=initial, desc=desc, unit="shard", disable=not show)


class ProgressLog:
    """The part of tqdm's interface ``run_shards`` uses, as one log line per ``every`` seconds (and
    the first and last): "ingest: 12/40 shards (30%), 2,110 images/s, 0 failed, ETA 0:01:23"."""

    def __init__(self, total: int, initial: int, desc: str, every: float):
        self.total, self.initial, self.done, self.desc, self.every = total, initial, initial, desc, every
        self.postfix: dict[str, Any] = {}
        self.start = self.last = time.monotonic()
        log.info("%s: %d shard(s) to run, %d already done, of %d", desc, total - initial, initial, total)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every and self.done < self.total:
            self.last = now
            self._line(now)

    def close(self) -> None:
        self._line(time.monotonic())

    def _line(self, now: float) -> None:
        ran, left, elapsed = self.done - self.initial, self.total - self.done, now - self.start
        when = (f"ETA {_clock(elapsed / ran * left)}" if ran and left else "ETA unknown" if left
                else f"took {_clock(elapsed)}")
        extra = "".join(f", {v} {k.replace('_per_s', '/s').replace('_', ' ')}" for k, v in self.postfix.items())
        pct = 100 * self.done / self.total if self.total else 100
        log.info("%s: %d/%d shards (%.0f%%)%s, %s", self.desc, self.done, self.total, pct, extra, when)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"  # hours past 24 too


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
