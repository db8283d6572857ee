"""The embed stage: float16 image embeddings of a model, one array per model, per catalog shard."""

from __future__ import annotations

import time

import numpy as np
from distributed import Client, get_client

from pzscale import catalog
from pzscale.errors import StageError
from pzscale.inference import (
    ModelPlugin,
    decode_rows,
    forward,
    gpu_resources,
    incremental_tasks,
    keep_done_rows,
    model_on_worker,
)
from pzscale.models import ModelCard
from pzscale.progress import StageReport, run_shards


def names(card: ModelCard) -> dict[str, str]:
    """Catalog variables the embed stage writes for a model."""
    return {"embedding": f"emb__{card.id}", "scale": f"scale__{card.id}", "dim": f"{card.id}__dim",
            "stage": f"embed/{card.id}"}


def embed_shard(task: dict) -> dict:
    """Embed the rows [row_from, stop) of one shard and write the whole shard, then its marker."""
    started = time.perf_counter()
    url, so = task["catalog"], task["storage_options"]
    model = model_on_worker(task["model_dir"], task["device"])
    n = names(model.card)
    group = catalog.open_group(url, mode="r+", storage_options=so, check=False)
    start, row_from, stop = task["start"], task["row_from"], task["stop"]
    ok, pixels = decode_rows(group, row_from, stop)
    emb, _, scales = forward(model, pixels, batch_size=task["batch_size"], with_logits=False, tta=task["tta"])
    embedding = np.full((stop - row_from, model.card.embed_dim), np.nan, np.float16)
    embedding[ok] = emb.astype(np.float16)
    scale = np.full(stop - row_from, np.nan, np.float32)
    scale[ok] = scales
    out = keep_done_rows(group, start, row_from, {n["embedding"]: embedding, n["scale"]: scale})
    catalog.write_arrays(group, start, stop, out)
    catalog.mark_done(url, n["stage"], task["shard"], {"rows": [start, stop], "computed": stop - row_from,
                                                         "model": model.card.id}, storage_options=so)
    return {"shard": task["shard"], "rows": stop - row_from, "seconds": time.perf_counter() - started}


def embed(
    url: str,
    model_dir: str,
    *,
    client: Client | None = None,
    batch_size: int = 64,
    tta: bool = False,
    device: str | None = None,
    storage_options: dict | None = None,
    progress: bool = True,
) -> StageReport:
    """Embed every image of the catalog that this model has not embedded yet (resumable).

    Writes ``emb__<model id>`` (float16, NaN where the image did not decode) and
    ``scale__<model id>`` (letterbox scale: output px per source px).
    """
    try:
        client = client or get_client()
    except ValueError:
        raise StageError("no Dask client: start one with pzscale.cluster.connect()") from None
    card = ModelCard.load(model_dir)
    n = names(card)
    group = catalog.open_group(url, mode="r+", storage_options=storage_options)
    attrs = {"model": card.id, "model_name": card.name, "model_version": card.version}
    catalog.ensure_array(group, n["embedding"], dtype="float16", fill=np.nan, trailing=(card.embed_dim,),
                         dims=(n["dim"],), attrs={**attrs, "description": f"image embedding by {card.id}"})
    catalog.ensure_array(group, n["scale"], dtype="float32", fill=np.nan,
                         attrs={**attrs, "description": "letterbox scale, output px per source px",
                                "image_size": card.image_size})
    _record(group, n["stage"], card, batch_size=batch_size, tta=tta)
    tasks, skipped = incremental_tasks(url, n["stage"], storage_options=storage_options)
    client.register_plugin(ModelPlugin(model_dir, device))
    common = {"catalog": url, "storage_options": storage_options, "model_dir": model_dir, "device": device,
              "batch_size": batch_size, "tta": tta}
    run = run_shards(client, embed_shard, [{**t, **common} for t in tasks], desc="embed", skipped=skipped,
                     show=progress, resources=gpu_resources(client))
    report = StageReport(n["stage"], url, len(tasks) + skipped, skipped, len(run.results), run.images, run.seconds,
                         [f"shard {t['shard']}: {m}" for t, m in run.failures])
    if run.failures:
        raise StageError(f"{len(run.failures)} shard(s) failed; rerun to resume:\n{report}")
    return report


def _record(group, stage: str, card: ModelCard, **params) -> None:
    stages = catalog.metadata(group).get("stages", {})
    record = {"model": card.id, "name": card.name, "version": card.version, "kind": card.kind,
              "architecture": card.architecture, **params}
    if stages.get(stage) != record:
        catalog.update_metadata(group, stages={**stages, stage: record})
