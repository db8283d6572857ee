"""The embed stage: float16 image embeddings of a model, one array per model, per catalog shard."""

from __future__ import annotations

import numpy as np
from distributed import Client

from pzscale.ml.inference import forward, run_model_shard, run_model_stage
from pzscale.ml.models import LoadedModel, ModelCard
from pzscale.schema import embedding_name
from pzscale.stage import Catalog, ShardResult, ShardTask, StageReport


def names(card: ModelCard) -> dict[str, str]:
    """Catalog variables the embed stage writes for a model."""
    return {"embedding": embedding_name(card.id), "scale": f"scale__{card.id}", "dim": f"{card.id}__dim",
            "stage": f"embed/{card.id}"}


def _compute(model: LoadedModel, ok: np.ndarray, pixels: list[np.ndarray], task: ShardTask) -> dict[str, np.ndarray]:
    n, rows = names(model.card), task.new_rows
    emb, _, scales = forward(model, pixels, batch_size=task.params["batch_size"], with_logits=False,
                             tta=task.params["tta"], precision=task.params["precision"])
    embedding = np.full((rows, model.card.embed_dim), np.nan, np.float16)
    embedding[ok] = emb.astype(np.float16)
    scale = np.full(rows, np.nan, np.float32)
    scale[ok] = scales
    return {n["embedding"]: embedding, n["scale"]: scale}


def embed_shard(task: ShardTask) -> ShardResult:
    """Embed the rows [row_from, stop) of one shard and write the whole shard, then its marker."""
    return run_model_shard(task, _compute)


def embed(
    url: str,
    model_dir: str,
    *,
    client: Client | None = None,
    batch_size: int = 64,
    tta: bool = False,
    precision: str = "fp32",
    device: str | None = None,
    storage_options: dict | None = None,
    progress: bool = True,
) -> StageReport:
    """Embed every image of the catalog that this model has not embedded yet (resumable).

    Writes ``emb__<model id>`` (float16, NaN where the image did not decode) and
    ``scale__<model id>`` (letterbox scale: output px per source px). ``precision`` (fp32,
    bf16, fp16) runs the model under autocast; the stored embeddings are float16 either way.
    """
    card = ModelCard.load(model_dir)
    n = names(card)
    cat = Catalog.open(url, storage_options)
    attrs = {"model": card.id, "model_name": card.name, "model_version": card.version}
    cat.ensure_array(n["embedding"], dtype="float16", fill=np.nan, trailing=(card.embed_dim,),
                         dims=(n["dim"],), attrs={**attrs, "description": f"image embedding by {card.id}"})
    cat.ensure_array(n["scale"], dtype="float32", fill=np.nan,
                         attrs={**attrs, "description": "letterbox scale, output px per source px",
                                "image_size": card.image_size})
    cat.record_stage(n["stage"], {"model": card.id, "name": card.name, "version": card.version,
                                     "kind": card.kind, "architecture": card.architecture,
                                     "batch_size": batch_size, "tta": tta, "precision": precision})
    params = {"batch_size": batch_size, "tta": tta, "precision": precision}
    return run_model_stage(cat, model_dir, embed_shard, stage=n["stage"], params=params,
                           client=client, device=device, progress=progress)
