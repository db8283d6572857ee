"""The classify stage: top-k labels and probabilities, and per-rank predictions derived from
the lineages of the model's classes, per catalog shard; several models side by side."""

from __future__ import annotations

import time

import numpy as np
from distributed import Client, get_client

from pzscale import catalog
from pzscale.errors import ModelError, StageError
from pzscale.inference import (
    ModelPlugin,
    decode_rows,
    forward,
    gpu_resources,
    incremental_tasks,
    keep_done_rows,
    model_on_worker,
    rank_groups,
)
from pzscale.models import ModelCard
from pzscale.progress import StageReport, run_shards
from pzscale.schema import RANKS


def names(card: ModelCard) -> dict[str, str]:
    """Catalog variables the classify stage writes for a model."""
    p = f"pred__{card.id}__"
    out = {"label": p + "label", "prob": p + "prob", "topk_label": p + "topk_label", "topk_prob": p + "topk_prob",
           "k": f"{card.id}__k", "stage": f"classify/{card.id}"}
    for rank in RANKS:
        out[rank], out[f"{rank}_prob"] = p + rank, p + rank + "_prob"
    return out


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


def classify_shard(task: dict) -> dict:
    """Classify rows [row_from, stop) of one shard and write the whole shard, then its marker."""
    started = time.perf_counter()
    url, so = task["catalog"], task["storage_options"]
    model = model_on_worker(task["model_dir"], task["device"])
    n = names(model.card)
    group = catalog.open_group(url, mode="r+", storage_options=so, check=False)
    start, row_from, stop = task["start"], task["row_from"], task["stop"]
    ok, pixels = decode_rows(group, row_from, stop)
    _, probs, _ = forward(model, pixels, batch_size=task["batch_size"], with_logits=True, tta=task["tta"])
    found = predictions(probs, model.card.classes, task["top_k"])
    rows = stop - row_from
    new = {}
    for key, values in found.items():
        is_text = values.dtype == object
        full = np.full((rows, *values.shape[1:]), "" if is_text else np.nan, dtype=object if is_text else np.float32)
        full[ok] = values
        new[n[key]] = full
    catalog.write_arrays(group, start, stop, keep_done_rows(group, start, row_from, new))
    catalog.mark_done(url, n["stage"], task["shard"], {"rows": [start, stop], "computed": rows,
                                                         "model": model.card.id}, storage_options=so)
    return {"shard": task["shard"], "rows": rows, "seconds": time.perf_counter() - started}


def classify(
    url: str,
    model_dir: str,
    *,
    client: Client | None = None,
    batch_size: int = 64,
    top_k: int = 5,
    tta: bool = False,
    device: str | None = None,
    storage_options: dict | None = None,
    progress: bool = True,
) -> StageReport:
    """Classify every image this model version has not classified yet.

    Resumable, and incremental after an append: only rows without a prediction from this
    model version are computed (``reclassify`` in the CLI). Writes ``pred__<model id>__*``.
    """
    try:
        client = client or get_client()
    except ValueError:
        raise StageError("no Dask client: start one with pzscale.cluster.connect()") from None
    card = ModelCard.load(model_dir)
    if not card.classes or not card.head:
        raise ModelError(f"{model_dir}: model {card.id} has no classification head; train one with pzscale train")
    n = names(card)
    k = min(top_k, len(card.classes))
    group = catalog.open_group(url, mode="r+", storage_options=storage_options)
    attrs = {"model": card.id, "model_name": card.name, "model_version": card.version}
    for key in ("label", "topk_label", *RANKS):
        trailing, dims = ((k,), (n["k"],)) if key.startswith("topk") else ((), ())
        catalog.ensure_array(group, n[key], dtype="str", fill="", trailing=trailing, dims=dims, attrs=attrs)
    for key in ("prob", "topk_prob", *(f"{r}_prob" for r in RANKS)):
        trailing, dims = ((k,), (n["k"],)) if key.startswith("topk") else ((), ())
        catalog.ensure_array(group, n[key], dtype="float32", fill=np.nan, trailing=trailing, dims=dims, attrs=attrs)
    stages = catalog.metadata(group).get("stages", {})
    record = {"model": card.id, "name": card.name, "version": card.version, "kind": card.kind,
              "architecture": card.architecture, "classes": len(card.classes), "top_k": k, "tta": tta,
              "training_data_sha256": card.training_data_sha256}
    if stages.get(n["stage"]) != record:
        catalog.update_metadata(group, stages={**stages, n["stage"]: record})
    tasks, skipped = incremental_tasks(url, n["stage"], storage_options=storage_options)
    client.register_plugin(ModelPlugin(model_dir, device))
    common = {"catalog": url, "storage_options": storage_options, "model_dir": model_dir, "device": device,
              "batch_size": batch_size, "tta": tta, "top_k": k}
    run = run_shards(client, classify_shard, [{**t, **common} for t in tasks], desc="classify", skipped=skipped,
                     show=progress, resources=gpu_resources(client))
    report = StageReport(n["stage"], url, len(tasks) + skipped, skipped, len(run.results), run.images, run.seconds,
                         [f"shard {t['shard']}: {m}" for t, m in run.failures])
    if run.failures:
        raise StageError(f"{len(run.failures)} shard(s) failed; rerun to resume:\n{report}")
    return report
