"""The classify stage: top-k labels and probabilities, and per-rank predictions derived from
the lineages of the model's classes, per catalog shard; several models side by side."""

from __future__ import annotations

import numpy as np
from distributed import Client

from pzscale.errors import ModelError
from pzscale.ml.inference import forward, rank_groups, run_model_shard, run_model_stage
from pzscale.ml.models import LoadedModel, ModelCard
from pzscale.schema import RANKS, prediction_name
from pzscale.stage import Catalog, ShardResult, ShardTask, StageReport


def names(card: ModelCard) -> dict[str, str]:
    """Catalog variables the classify stage writes for a model."""
    keys = ["label", "prob", "topk_label", "topk_prob", *RANKS, *(f"{rank}_prob" for rank in RANKS)]
    return {**{key: prediction_name(card.id, key) for key in keys}, "k": f"{card.id}__k",
            "stage": f"classify/{card.id}"}


def predictions(probs: np.ndarray, classes: list[str], top_k: int) -> dict[str, np.ndarray]:
    """Top-k and per-rank predictions from class probabilities (n, C), keyed like ``names``.

    A rank's prediction is the lineage prefix with the largest summed probability, so that
    the order-level answer can be confident even when the species is not.
    """
    n, k = len(probs), min(top_k, len(classes))
    labels = np.array(classes, dtype=object)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    out = {"topk_label": labels[order], "topk_prob": np.take_along_axis(probs, order, 1).astype(np.float32)}
    out["label"], out["prob"] = out["topk_label"][:, 0], out["topk_prob"][:, 0]
    for rank, (prefixes, index) in rank_groups(classes).items():
        summed = np.zeros((n, len(prefixes)), np.float64)
        np.add.at(summed.T, index, probs.T)
        best = summed.argmax(1)
        out[rank] = np.array(prefixes, dtype=object)[best]
        out[f"{rank}_prob"] = summed[np.arange(n), best].astype(np.float32)
    return out


def _compute(model: LoadedModel, ok: np.ndarray, pixels: list[np.ndarray], task: ShardTask) -> dict[str, np.ndarray]:
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
    storage_options: dict | None = None,
    progress: bool = True,
) -> StageReport:
    """Classify every image this model version has not classified yet.

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
    return run_model_stage(cat, model_dir, classify_shard, stage=n["stage"], params=params, client=client,
                           device=device, progress=progress)
