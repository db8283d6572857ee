"""The zero-shot stage: CLIP image features against text prompts of class lineages, per catalog shard.

Any open_clip CLIP model directory with its text tower works (BioCLIP, BioCLIP2, the released
Planktonzilla models imported with ``models.import_checkpoint``, or one from ``clip_train``). A class's
prompt is ``"a photo of a {lineage}"``; an image's prediction is the class of highest cosine similarity
among a class set. The class set is one list for every row, or one list per split (``{"test": [...],
"unseen": [...]}``) so that each split is predicted among the classes present in it, as the
Planktonzilla protocol scores seen and unseen classes; rows of other splits are left empty.

Writes, for a model of id ``<id>``:

- ``pred__<id>__zs__label`` (str) and ``pred__<id>__zs__prob`` (float32, the softmax of the model's
  logit scale times the cosines over the class set): ``evaluate(url, "<id>__zs", split=...)`` scores them;
- ``emb__<id>__zs`` (float16, n x D): the image features (``encode_image``, not normalised), which
  ``fewshot`` reads, so a CLIP model needs no separate ``embed`` pass (nor can a custom-architecture one
  have it).

The model and the text features of each class set are computed once per worker process. The stage is
resumable and incremental like ``classify``; its markers live under ``zeroshot/<id>/<digest>``, the digest
covering the prompt template, the class sets and the split record, so changing any of them recomputes. The
stage record in the group attributes gives the class counts; the class lists are in
``_pzscale/zeroshot/<id>/<digest>.json``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from distributed import Client

from pzscale import catalog, images
from pzscale.errors import CatalogError, InputError
from pzscale.ml.clip import PROMPT, LoadedClip, load_clip, open_clip_config
from pzscale.ml.inference import (
    ModelPlugin,
    gpu_resources,
    in_batches,
    load_on_workers,
    model_on_worker,
)
from pzscale.ml.labels import TARGET_COLUMNS, targets
from pzscale.ml.models import ModelCard
from pzscale.ml.preprocess import prepare_batch
from pzscale.schema import SPLIT, STATUS_OK, embedding_name, prediction_name
from pzscale.stage import (
    Catalog,
    ShardResult,
    ShardTask,
    StageReport,
    map_shards,
    pending,
    require_client,
    retry,
    run_stage,
)

ALL_ROWS = "*"  # class-set key of a single list applied to every row


def names(card: ModelCard) -> dict[str, str]:
    """Catalog variables the zero-shot stage writes for a model."""
    model_id = f"{card.id}__zs"
    return {"label": prediction_name(model_id, "label"), "prob": prediction_name(model_id, "prob"),
            "embedding": embedding_name(model_id), "dim": f"{card.id}__dim", "model_id": model_id,
            "stage": f"zeroshot/{card.id}"}


def prompts(classes: Sequence[str], template: str = PROMPT) -> list[str]:
    """The text prompt of each class lineage."""
    return [template.format(c) for c in classes]


def clip_on_worker(model_dir: str, device: str | None = None) -> LoadedClip:
    """The CLIP model (with its cache of class text features), loaded once per process."""
    return model_on_worker(model_dir, device, load_clip)


def _text_features(model: LoadedClip, classes: tuple[str, ...], template: str) -> torch.Tensor:
    key = (template, classes)
    if key not in model.text_cache:
        model.text_cache[key] = model.encode_texts(prompts(classes, template))
    return model.text_cache[key]


def zeroshot_shard(task: ShardTask) -> ShardResult:
    """Predict rows [row_from, stop) of one shard among their class set; write the whole shard (the runner
    writes its marker after)."""
    model = clip_on_worker(task.params["model_dir"], task.params["device"])
    group = task.catalog.group("r+")
    start, row_from, stop = task.start, task.row_from, task.stop
    n, rows = task.params["names"], task.new_rows
    class_sets: dict[str, list[str]] = task.params["classes"]
    if ALL_ROWS in class_sets:
        set_of_row = np.full(rows, ALL_ROWS, dtype=object)
    else:
        set_of_row = group[SPLIT][row_from:stop].astype(object)
    # only the rows of a split with a class set are decoded (train/val rows may be most of a shard)
    ok = np.flatnonzero(np.isin(set_of_row, list(class_sets)) & (group["status"][row_from:stop] == STATUS_OK))
    encoded = group["image_bytes"].get_orthogonal_selection((ok + row_from,)) if len(ok) else []
    pixels = [images.decode(bytes(b)) for b in encoded]
    card = model.card

    def run(a: int, b: int) -> np.ndarray:
        x, _ = prepare_batch(pixels[a:b], size=card.image_size, mean=card.mean, std=card.std, device=model.device)
        return model.encode_images(x).cpu().numpy()

    parts = in_batches(run, len(pixels), task.params["batch_size"])
    features = np.concatenate(parts) if parts else np.zeros((0, card.embed_dim), np.float32)
    label = np.full(rows, "", dtype=object)
    prob = np.full(rows, np.nan, np.float32)
    embedding = np.full((rows, card.embed_dim), np.nan, np.float16)
    embedding[ok] = features.astype(np.float16)
    normalised = torch.nn.functional.normalize(torch.from_numpy(features).to(model.device), dim=-1)
    for name, classes in class_sets.items():
        here = np.flatnonzero(set_of_row[ok] == name)
        if not len(here) or not classes:
            continue
        text = _text_features(model, tuple(classes), task.params["template"])
        logits = model.logit_scale * normalised[here] @ text.T
        best_prob, best = logits.softmax(-1).max(-1)
        label[ok[here]] = np.array(classes, dtype=object)[best.cpu().numpy()]
        prob[ok[here]] = best_prob.float().cpu().numpy()
    new = {n["label"]: label, n["prob"]: prob, n["embedding"]: embedding}
    task.catalog.write(start, stop, catalog.with_stored_rows(group, start, row_from, new))
    return ShardResult(rows, {task.stage: {"computed": rows, "model": card.id}})


def _present(cat: Catalog, start: int, stop: int, splits: list[str]) -> dict[str, set[str]]:
    cols = cat.read(start, stop, [SPLIT, *TARGET_COLUMNS])
    target = targets(cols)
    return {s: set(target[(cols[SPLIT] == s) & (target != "")]) for s in splits}


def classes_present(url: str | Catalog, splits: Sequence[str] = ("test", "unseen"), *,
                    storage_options: dict | None = None) -> dict[str, list[str]]:
    """The labels present in each split (sorted), read one shard per task."""
    cat = Catalog.open(url, storage_options)
    if SPLIT not in cat.arrays():
        raise CatalogError(f"{cat.url}: no split recorded; run pzscale split first")
    parts = map_shards(_present, cat, list(splits))
    return {s: sorted(set().union(*(p[s] for p in parts))) for s in splits}


def zeroshot(
    url: str,
    model_dir: str,
    *,
    classes: Mapping[str, Sequence[str]] | Sequence[str] | None = None,
    template: str = PROMPT,
    client: Client | None = None,
    batch_size: int = 64,
    device: str | None = None,
    storage_options: dict | None = None,
    progress: bool = True,
) -> StageReport:
    """Zero-shot classify the catalog's images with a CLIP model directory (resumable).

    ``classes``: a list of lineages for every row; or split name -> lineages, each row predicted among its
    split's classes (other splits left empty); default: the classes present in ``test`` and ``unseen``.
    """
    card = ModelCard.load(model_dir)
    open_clip_config(card, model_dir)  # fails early, on the client, for a model that cannot do zero-shot
    if "{}" not in template:
        raise InputError(f"prompt template {template!r} has no {{}} for the lineage")
    if isinstance(classes, str):
        raise InputError(f"classes must be a list of lineages or a mapping split -> lineages, not {classes!r}")
    cat = Catalog.open(url, storage_options)
    if classes is None:
        classes = classes_present(cat)
    class_sets = ({str(k): sorted(map(str, v)) for k, v in classes.items()} if isinstance(classes, Mapping)
                  else {ALL_ROWS: sorted(map(str, classes))})
    n = names(card)
    if ALL_ROWS not in class_sets and SPLIT not in cat.arrays():
        raise CatalogError(f"{cat.url}: class sets per split need a split; run pzscale split first")
    attrs = {"model": card.id, "model_name": card.name, "model_version": card.version, "template": template}
    cat.ensure_array(n["label"], dtype="str", fill="", attrs={
        **attrs, "description": f"zero-shot prediction of {card.id} among its split's classes"})
    cat.ensure_array(n["prob"], dtype="float32", fill=np.nan, attrs={
        **attrs, "description": "softmax probability of the zero-shot prediction"})
    cat.ensure_array(n["embedding"], dtype="float16", fill=np.nan, trailing=(card.embed_dim,),
                         dims=(n["dim"],), attrs={**attrs, "description": f"image features of {card.id}"})
    split_record = cat.metadata().get("stages", {}).get(SPLIT)
    record = {"model": card.id, "name": card.name, "version": card.version, "architecture": card.architecture,
              "template": template, "classes": class_sets, "split": split_record,
              "training_data_sha256": card.training_data_sha256}
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:12]
    stage = f"{n['stage']}/{digest}"
    # the class lists (hundreds of lineages per split) go to a private JSON, not the group attributes
    retry(catalog.put_json, cat.url, f"{stage}.json", record, storage_options=cat.options)
    cat.record_stage(n["stage"], {**{k: v for k, v in record.items() if k != "classes"},
                                             "classes": {k: len(v) for k, v in class_sets.items()},
                                             "class_lists": f"{catalog.PRIVATE}/{stage}.json", "markers": stage})
    client = require_client(client)
    params = {"model_dir": model_dir, "device": device, "names": n, "classes": class_sets, "template": template,
              "batch_size": batch_size}
    tasks, skipped = pending(cat, stage, params=params)
    load_on_workers(client, ModelPlugin(model_dir, device, load_clip))
    return run_stage(stage, zeroshot_shard, tasks, catalog=cat, client=client, skipped=skipped, progress_bar=progress,
                     resources=gpu_resources(client))
