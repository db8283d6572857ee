"""Running a model over catalog shards: the model cached once per worker, images of a shard
decoded and preprocessed in batches, CUDA out-of-memory handled by halving the batch.

Shared by the ``embed`` and ``classify`` stages (which never import each other).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from distributed.diagnostics.plugin import WorkerPlugin

from pzscale import catalog, images
from pzscale.errors import StageError
from pzscale.ml.models import LoadedModel, load_model
from pzscale.ml.preprocess import prepare_batch
from pzscale.schema import RANKS, STATUS_OK
from pzscale.stage import Catalog, ShardResult, ShardTask, StageReport, pending, require_client, run_stage

_LOADED: dict[tuple[str, str, str, int], Any] = {}


def pick_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def model_on_worker(model_dir: str, device: str | None = None, loader: Callable[..., Any] = load_model) -> Any:
    """The model, loaded once per process: by ``ModelPlugin.setup`` on a worker, or on first use.

    The card's modification time is part of the key, so a model retrained into the same
    directory is loaded afresh by long-lived workers instead of served stale. ``loader``
    (``models.load_model``, ``clip.load_clip``) says what kind of model object to build.
    """
    path = os.path.abspath(model_dir)
    kind = f"{loader.__module__}.{loader.__qualname__}"
    key = (path, device or pick_device(), kind, os.stat(os.path.join(path, "model_card.json")).st_mtime_ns)
    if key not in _LOADED:
        for old in [k for k in _LOADED if k[:3] == key[:3]]:
            del _LOADED[old]  # the previous version of this model: free its memory
        _LOADED[key] = loader(path, device=key[1])
    return _LOADED[key]


class ModelPlugin(WorkerPlugin):
    """Loads a model on every worker when registered, so tasks never reload it.

    The name is fixed per model directory, loader and device, so registering again is a no-op.
    """

    def __init__(self, model_dir: str, device: str | None = None, loader: Callable[..., Any] = load_model):
        self.model_dir, self.device, self.loader = os.path.abspath(model_dir), device, loader
        self.name = f"pzscale-model-{loader.__qualname__}-{self.model_dir}-{device or 'auto'}"

    def setup(self, worker: Any) -> None:
        # One torch thread per Dask thread: worker processes already use every core.
        torch.set_num_threads(max(1, worker.state.nthreads))
        model_on_worker(self.model_dir, self.device, self.loader)

    def teardown(self, worker: Any) -> None:
        mine = (self.model_dir, self.device or pick_device(), f"{self.loader.__module__}.{self.loader.__qualname__}")
        for key in [k for k in _LOADED if k[:3] == mine]:
            del _LOADED[key]


def load_on_workers(client: Any, plugin: ModelPlugin) -> None:
    """Register the model plugin, so every worker (and every worker that joins later) loads it once.

    A model that fails to load is unregistered before its error is raised: the scheduler would
    otherwise replay it on every worker that starts later (a nanny's restart included).
    """
    try:
        client.register_plugin(plugin)
    except Exception:
        with contextlib.suppress(Exception):
            client.unregister_worker_plugin(plugin.name)
        raise


def in_batches(fn: Callable[[int, int], Any], n: int, batch_size: int) -> list[Any]:
    """``fn(start, stop)`` over ``range(n)`` in batches; on CUDA out-of-memory the batch is
    halved and retried (down to one image), never failed."""
    out, start = [], 0
    while start < n:
        stop = min(n, start + batch_size)
        try:
            out.append(fn(start, stop))
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise
            batch_size = max(1, batch_size // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        start = stop
    return out


def decode_rows(group: Any, start: int, stop: int, *, ahead: int = 0) -> tuple[np.ndarray, Sequence[np.ndarray]]:
    """Rows of [start, stop) whose image decoded at ingest (positions relative to start), and their pixels.

    With ``ahead`` (images per chunk, e.g. the batch size) the pixels are a ``DecodedAhead``: decoded on a
    background thread, chunk by chunk in row order, while the caller runs the model on the chunks
    already decoded; otherwise a list, decoded here.
    """
    status = group["status"][start:stop]
    ok = np.flatnonzero(status == STATUS_OK)
    encoded = group["image_bytes"].get_orthogonal_selection((ok + start,)) if len(ok) else []
    if ahead:
        return ok, DecodedAhead(encoded, ahead)
    return ok, [images.decode(bytes(b)) for b in encoded]


def _decode_chunk(encoded: Sequence[Any]) -> list[np.ndarray]:
    return [images.decode(bytes(b)) for b in encoded]


class DecodedAhead(Sequence):
    """Decoded images of encoded ones, in their order, decoded on one background thread in chunks.

    Indexing (an image or a slice) waits for the chunks it needs only. PIL releases the GIL while it
    decodes and torch while it computes, so decoding the next batches overlaps the model's forward pass
    over this one. A chunk that fails to decode raises its error where it is indexed, as the plain
    decode would have raised it; ``close`` drops the chunks not started (after an error).
    """

    def __init__(self, encoded: Sequence[Any], chunk: int) -> None:
        self._n, self._chunk = len(encoded), max(1, int(chunk))
        pool = ThreadPoolExecutor(1, thread_name_prefix="pzscale-decode")
        self._parts = [pool.submit(_decode_chunk, encoded[i:i + self._chunk]) for i in range(0, self._n, self._chunk)]
        pool.shutdown(wait=False)  # the thread ends after the last chunk

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._n))]
        if index < 0:
            index += self._n
        if not 0 <= index < self._n:
            raise IndexError(index)
        return self._parts[index // self._chunk].result()[index % self._chunk]

    def close(self) -> None:
        for part in self._parts:
            part.cancel()


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: str | torch.device, precision: str):
    """The autocast context for a precision name (fp32: none). Weights stay float32; matmuls and
    convolutions run in the lower precision, as the published GPU throughput figures do."""
    if precision not in PRECISIONS:
        raise StageError(f"precision must be one of {sorted(PRECISIONS)}, not {precision!r}")
    dtype = PRECISIONS[precision]
    kind = torch.device(device).type
    return contextlib.nullcontext() if dtype is None else torch.autocast(kind, dtype=dtype)


def forward(model: LoadedModel, pixels: Sequence[np.ndarray], *, batch_size: int, with_logits: bool,
            tta: bool = False, precision: str = "fp32") -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Embeddings (n, D) float32, class probabilities (n, C) or None, and letterbox scales (n,).

    With ``tta`` the probabilities (and embeddings) are averaged over the 8 rotations/flips.
    ``precision`` (fp32, bf16, fp16) runs the model under autocast.
    """
    from pzscale.ml.augment import tta_views

    card = model.card
    scales = np.zeros(len(pixels), np.float32)
    cast = autocast(model.device, precision)  # a bad name fails before any batch

    def run(a: int, b: int) -> tuple[np.ndarray, np.ndarray | None]:
        x, scales[a:b] = prepare_batch(pixels[a:b], size=card.image_size, mean=card.mean, std=card.std,
                                       device=model.device)
        views = tta_views(x) if tta else [x]
        with torch.no_grad(), cast:
            per_view = [model.embed(v) for v in views]
            emb = torch.stack(per_view).mean(0)
            probs = None
            if with_logits:
                probs = torch.stack([model.head(e).softmax(-1) for e in per_view]).mean(0)
        return emb.float().cpu().numpy(), None if probs is None else probs.float().cpu().numpy()

    parts = in_batches(run, len(pixels), batch_size)
    if not parts:
        return (np.zeros((0, card.embed_dim), np.float32), np.zeros((0, len(card.classes)), np.float32)
                if with_logits else None, scales)
    emb = np.concatenate([p[0] for p in parts])
    probs = np.concatenate([p[1] for p in parts]) if with_logits else None
    return emb, probs, scales


def rank_groups(classes: list[str]) -> dict[str, tuple[list[str], np.ndarray]]:
    """For each rank, the distinct lineage prefixes and the class -> prefix index.

    A class whose lineage is shorter than the rank keeps its full lineage there, as the
    Planktonzilla evaluation truncates lineages.
    """
    out = {}
    for depth, rank in enumerate(RANKS, start=1):
        prefixes = [" ".join(c.split()[:depth]) for c in classes]
        names = sorted(set(prefixes))
        index = {p: i for i, p in enumerate(names)}
        out[rank] = (names, np.array([index[p] for p in prefixes], dtype=np.int64))
    return out


def gpu_resources(client: Any) -> dict | None:
    """``{"GPU": 1}`` when the cluster has GPU workers (dask-cuda with --resources GPU=1), else None.

    Asking for a resource no worker has would leave tasks pending forever, so look first.
    """
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    return {"GPU": 1} if any(w.get("resources", {}).get("GPU") for w in workers) else None


def run_model_shard(task: ShardTask, compute: Callable[[LoadedModel, np.ndarray, Sequence[np.ndarray], ShardTask],
                                                        dict[str, np.ndarray]]) -> ShardResult:
    """The body every model stage's shard task shares.

    ``compute(model, ok, pixels, task)`` returns the stage's arrays for rows [row_from, stop)
    (``ok``: positions of the rows whose image decoded, ``pixels``: those images); the rows
    already done are kept and the whole shard is written; the runner writes the marker after.
    """
    model = model_on_worker(task.params["model_dir"], task.params["device"])
    group = task.catalog.group("r+")
    ok, pixels = decode_rows(group, task.row_from, task.stop, ahead=task.params.get("batch_size", 64))
    try:
        new = compute(model, ok, pixels, task)
    finally:
        pixels.close()
    task.catalog.write(task.start, task.stop, catalog.with_stored_rows(group, task.start, task.row_from, new))
    # a shard extended after an append replaces its earlier marker; otherwise an existing marker
    # means another attempt finished this shard first (same bytes), and the task is done too
    return ShardResult(task.new_rows, {task.stage: {"computed": task.new_rows, "model": model.card.id}},
                       replace=task.row_from > task.start)


def run_model_stage(cat: Catalog, model_dir: str, shard_fn: Callable[[ShardTask], ShardResult], *, stage: str,
                    params: dict, client: Any, device: str | None, progress: bool) -> StageReport:
    """Submit a model stage's shard tasks for the rows its markers do not cover yet, with the model
    loaded once per worker, on GPU workers when the cluster has them."""
    autocast("cpu", params.get("precision", "fp32"))  # a bad precision fails here, not in every task
    client = require_client(client)
    tasks, skipped = pending(cat, stage, params={"model_dir": model_dir, "device": device, **params})
    load_on_workers(client, ModelPlugin(model_dir, device))
    return run_stage(stage, shard_fn, tasks, catalog=cat, client=client, skipped=skipped, progress_bar=progress,
                     resources=gpu_resources(client))
