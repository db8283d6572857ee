"""The classify stage: top-k labels and probabilities, and per-rank predictions derived from
the lineages of the model's classes, per catalog shard; several models side by side.

Then the back-off (a pass of its own over the per-rank predictions, with its own markers, so a catalog classified
before it existed, or with another threshold, gets it without running the model again): each image's label at the
deepest rank whose summed probability reaches ``backoff_min_prob`` (an uncertain species falls back to a
confident genus or family), and the rank its lineage ends at, as ``pred__<model>__backoff_label`` and
``__backoff_rank``; '' where not even the kingdom reaches it. A one-word label that is no taxon (detritus) reads
as kingdom depth.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from distributed import Client

from pzscale.errors import ModelError
from pzscale.ml.inference import forward, rank_groups, run_model_shard, run_model_stage
from pzscale.ml.models import LoadedModel, ModelCard
from pzscale.schema import RANKS, prediction_name
from pzscale.stage import Catalog, ShardResult, ShardTask, StageReport, pending, run_stage

BACKOFF_MIN_PROB = 0.5


def names(card: ModelCard) -> dict[str, str]:
    """Catalog variables the classify stage writes for a model."""
    keys = ["label", "prob", "topk_label", "topk_prob", *RANKS, *(f"{rank}_prob" for rank in RANKS)]
    return {**{key: prediction_name(card.id, key) for key in (*keys, "backoff_label", "backoff_rank")},
            "k": f"{card.id}__k", "stage": f"classify/{card.id}", "backoff_stage": f"classify-backoff/{card.id}"}


def predictions(probs: np.ndarray, classes: list[str], top_k: int) -> dict[str, np.ndarray]:
    """Top-k and per-rank predictions from class probabilities (n, C), keyed like ``names``.

    A rank's prediction is the lineage prefix with the largest summed probability, so that
    the order-level answer can be confident even when the species is not.
    """
    n, k = len(probs), min(top_k, len(classes))
    labels = np.array(classes, dtype=object)
    order = top_k_order(probs, k)
    out = {"topk_label": labels[order], "topk_prob": np.take_along_axis(probs, order, 1).astype(np.float32)}
    out["label"], out["prob"] = out["topk_label"][:, 0], out["topk_prob"][:, 0]
    columns = np.ascontiguousarray(probs.T, dtype=np.float64)  # (C, n): one contiguous row per class
    for rank, (prefixes, index) in rank_groups(classes).items():
        summed = rank_sums(columns, index, len(prefixes))
        best = summed.argmax(0)
        out[rank] = np.array(prefixes, dtype=object)[best]
        out[f"{rank}_prob"] = summed[best, np.arange(n)].astype(np.float32)
    return out


def top_k_order(probs: np.ndarray, k: int) -> np.ndarray:
    """(n, k) column indices of each row's k largest values, largest first, ties in column order:
    ``np.argsort(-probs, axis=1, kind="stable")[:, :k]``, without sorting whole rows.

    A partition finds each row's k-th largest value; a row with exactly k values at or above it
    (the usual case) sorts only those; any other row (ties across the k-th place, NaN) is sorted whole.
    """
    n, c = probs.shape
    if k == 0 or n == 0:
        return np.zeros((n, k), np.int64)
    if k >= c:
        return np.argsort(-probs, axis=1, kind="stable")[:, :k]
    kth = np.partition(probs, c - k, axis=1)[:, c - k]
    above = probs >= kth[:, None]
    exact = above.sum(1) == k
    order = np.empty((n, k), np.int64)
    rows = np.flatnonzero(exact)
    columns = np.nonzero(above[rows])[1].reshape(len(rows), k)  # column order within a row
    values = np.take_along_axis(probs[rows], columns, 1)
    order[rows] = np.take_along_axis(columns, np.argsort(-values, axis=1, kind="stable"), 1)
    rest = np.flatnonzero(~exact)
    if len(rest):
        order[rest] = np.argsort(-probs[rest], axis=1, kind="stable")[:, :k]
    return order


def rank_sums(columns: np.ndarray, index: np.ndarray, groups: int) -> np.ndarray:
    """(groups, n) float64 sums of the class rows of ``columns`` (C, n) per group ``index`` (C,).

    The classes of a group are added one after the other in class order, from zero, so every sum
    is bit for bit what ``np.add.at`` gives (and so is every argmax), at a fraction of its cost:
    one vectorised add per step, each step adding the next member of every group that has one.
    """
    members = np.argsort(index, kind="stable")  # classes grouped, class order kept within a group
    counts = np.bincount(index, minlength=groups)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    summed = np.zeros((groups, columns.shape[1]), np.float64)
    for step in range(int(counts.max(initial=0))):
        have = np.flatnonzero(counts > step)  # distinct groups: no repeated target within a step
        summed[have] += columns[members[starts[have] + step]]
    return summed


def _compute(model: LoadedModel, ok: np.ndarray, pixels: Sequence[np.ndarray],
             task: ShardTask) -> dict[str, np.ndarray]:
    n, rows = names(model.card), task.new_rows
    _, probs, _ = forward(model, pixels, batch_size=task.params["batch_size"], with_logits=True, tta=task.params["tta"],
                          precision=task.params["precision"])
    new = {}
    for key, values in predictions(probs, model.card.classes, task.params["top_k"]).items():
        is_text = values.dtype == object
        full = np.full((rows, *values.shape[1:]), "" if is_text else np.nan, dtype=object if is_text else np.float32)
        full[ok] = values
        new[n[key]] = full
    return new


def backoff(labels: dict[str, np.ndarray], probs: dict[str, np.ndarray], min_prob: float
            ) -> tuple[np.ndarray, np.ndarray]:
    """Per image, the label of the deepest rank whose probability reaches ``min_prob`` and the rank its lineage
    ends at (its word count: an order-level class predicted at species rank is an order); '' and '' where none.
    Probabilities summed over descendants never grow with depth, so the deepest rank reaching it is the last."""
    n = len(labels[RANKS[0]])
    label = np.full(n, "", dtype=object)
    for rank in RANKS:
        reached = (probs[rank] >= min_prob) & (labels[rank] != "")
        label[reached] = labels[rank][reached]
    depth = np.fromiter((len(text.split()) for text in label), np.int64, n)
    rank = np.array(("", *RANKS), dtype=object)[np.minimum(depth, len(RANKS))]
    return label, rank


def _backoff_shard(task: ShardTask) -> ShardResult:
    n, min_prob = task.params["names"], task.params["min_prob"]
    cols = task.catalog.read(task.start, task.stop, [n[r] for r in RANKS] + [n[f"{r}_prob"] for r in RANKS])
    label, rank = backoff({r: cols[n[r]] for r in RANKS}, {r: cols[n[f"{r}_prob"]] for r in RANKS}, min_prob)
    task.catalog.write(task.start, task.stop, {n["backoff_label"]: label, n["backoff_rank"]: rank})
    return ShardResult(task.stop - task.start, {task.stage: {"min_prob": min_prob}}, replace=True)


def store_backoff(cat: Catalog, card: ModelCard, min_prob: float, *, client: Client | None = None,
                  progress: bool = True) -> StageReport:
    """The back-off labels of every classified row not yet derived at ``min_prob`` (see the module doc)."""
    if not 0 < min_prob <= 1:
        raise ModelError(f"back-off probability {min_prob}: must be in (0, 1]")
    n = names(card)
    for key in ("backoff_label", "backoff_rank"):
        cat.ensure_array(n[key], dtype="str", fill="", attrs={"model": card.id})
    classified = cat.markers(n["stage"])
    ranges = [(shard, start, min(stop, classified[shard]["rows"][1])) for shard, start, stop in cat.shards()
              if shard in classified]
    tasks, skipped = pending(cat, n["backoff_stage"], params={"names": n, "min_prob": min_prob}, ranges=ranges,
                             valid=lambda info: info.get("min_prob") == min_prob)
    return run_stage(n["backoff_stage"], _backoff_shard, tasks, catalog=cat, client=client, skipped=skipped,
                     progress_bar=progress)


def classify_shard(task: ShardTask) -> ShardResult:
    """Classify rows [row_from, stop) of one shard and write the whole shard, then its marker."""
    return run_model_shard(task, _compute)


def classify(
    url: str,
    model_dir: str,
    *,
    client: Client | None = None,
    batch_size: int = 64,
    top_k: int = 5,
    tta: bool = False,
    precision: str = "fp32",
    device: str | None = None,
    backoff_min_prob: float = BACKOFF_MIN_PROB,
    storage_options: dict | None = None,
    progress: bool = True,
) -> StageReport:
    """Classify every image this model version has not classified yet, then store the back-off labels.

    Resumable, and incremental after an append: only rows without a prediction from this
    model version are computed (``reclassify`` in the CLI). Writes ``pred__<model id>__*``.
    """
    card = ModelCard.load(model_dir)
    if not card.classes or not card.head:
        raise ModelError(f"{model_dir}: model {card.id} has no classification head; train one with pzscale train")
    n = names(card)
    k = min(top_k, len(card.classes))
    cat = Catalog.open(url, storage_options)
    attrs = {"model": card.id, "model_name": card.name, "model_version": card.version}
    for key in ("label", "topk_label", *RANKS):
        trailing, dims = ((k,), (n["k"],)) if key.startswith("topk") else ((), ())
        cat.ensure_array(n[key], dtype="str", fill="", trailing=trailing, dims=dims, attrs=attrs)
    for key in ("prob", "topk_prob", *(f"{r}_prob" for r in RANKS)):
        trailing, dims = ((k,), (n["k"],)) if key.startswith("topk") else ((), ())
        cat.ensure_array(n[key], dtype="float32", fill=np.nan, trailing=trailing, dims=dims, attrs=attrs)
    cat.record_stage(n["stage"], {"model": card.id, "name": card.name, "version": card.version,
                                     "kind": card.kind, "architecture": card.architecture, "classes": len(card.classes),
                                     "top_k": k, "tta": tta, "precision": precision,
                                     "training_data_sha256": card.training_data_sha256})
    params = {"batch_size": batch_size, "tta": tta, "top_k": k, "precision": precision}
    report = run_model_stage(cat, model_dir, classify_shard, stage=n["stage"], params=params, client=client,
                             device=device, progress=progress)
    store_backoff(cat, card, backoff_min_prob, client=client, progress=False)
    return report
