"""The Planktonzilla comparison on any catalog: one table of macro-F1 at every rank, per model and setting,
on the seen and unseen splits.

Orchestrates the stages (layer 3, like the CLI): split (optional: the paper's held-out sources, 60/20/20,
dedup-aware on request), training (optional: a supervised classifier and/or a CLIP-style model on the
train split), then for every model directory:

- a model with a class head: ``classify`` -> setting ``supervised``; its ``embed`` embeddings for few-shot;
- an open_clip model with its text tower: ``zeroshot`` with each split's classes present -> setting
  ``clip-style`` when it was CLIP-trained on this catalog's train split (card ``extra.objective == "clip"``
  and the same ``training_data_sha256``), else ``zero-shot`` (BioCLIP, a released Planktonzilla model, a
  random ViT-B-16); its zero-shot image features for few-shot;
- every model: SimpleShot ``1-shot`` and ``5-shot`` (averaged over seeds 0, 7, 25, 42, 100).

Split ``seen`` is the ``test`` split; ``unseen`` is the held-out-source benchmark (classes absent from
training). Writes ``compare.csv``, ``compare.json`` (the table with the protocol and models) and
``compare_f1_by_rank.png`` into the output folder, and returns the table.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from distributed import Client

from pzscale import tables
from pzscale.classify import classify
from pzscale.clip_train import train_clip
from pzscale.embed import embed
from pzscale.embed import names as embed_names
from pzscale.errors import CatalogError, InputError
from pzscale.evaluate import evaluate
from pzscale.fewshot import SEEDS, SHOTS, fewshot
from pzscale.ml.clip import PROMPT, has_text_tower
from pzscale.ml.models import ModelCard
from pzscale.ml.trainset import split_rows, training_hash
from pzscale.schema import RANKS
from pzscale.split import SPLIT, assign_splits
from pzscale.stage import Catalog
from pzscale.train import train
from pzscale.zeroshot import classes_present, zeroshot
from pzscale.zeroshot import names as zeroshot_names

SPLITS = {"seen": "test", "unseen": "unseen"}
COLUMNS = ("model", "setting", "split", *RANKS)
TRAIN_OBJECTIVES = ("supervised", "clip")


def _rows(model: str, setting: str, split: str, table: pd.DataFrame) -> dict:
    return {"model": model, "setting": setting, "split": split, **dict(zip(table["rank"], table["macro_f1"],
                                                                           strict=True))}


def plot(table: pd.DataFrame, path: str | Path) -> None:
    """Macro-F1 by rank, one line per (model, setting), one panel per split; a PNG at ``path``."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    splits = list(dict.fromkeys(table["split"])) or ["seen"]
    curves = list(dict.fromkeys(zip(table["model"], table["setting"], strict=True)))
    figure = Figure(figsize=(5 * len(splits) + 3, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(splits), squeeze=False, sharey=True)[0]
    colours = colormaps["tab20"]
    for ax, split in zip(axes, splits, strict=True):
        for _, row in table[table["split"] == split].iterrows():
            index = curves.index((row["model"], row["setting"]))
            ax.plot(range(len(RANKS)), [row[r] for r in RANKS], marker="o", color=colours(index % 20),
                    label=f"{row['model']} {row['setting']}")
        ax.set(title=f"{split} split", xticks=range(len(RANKS)), ylim=(0, 1.02), ylabel="macro-F1")
        ax.set_xticklabels(RANKS, rotation=30)
        ax.grid(alpha=0.3)
    legend = {label: handle for ax in axes for handle, label in zip(*ax.get_legend_handles_labels(), strict=True)}
    figure.legend(list(legend.values()), list(legend), loc="outside right upper", fontsize=8)
    figure.savefig(path, dpi=120)


def compare(
    url: str | Catalog,
    out_dir: str | Path,
    *,
    models: Sequence[str] = (),
    train_objectives: Sequence[str] = (),
    unseen_sources: Sequence[str] | None = None,
    dedup: bool | str | Sequence[str] = False,
    split_seed: int = 42,
    epochs: int = 10,
    train_options: dict | None = None,
    shots: Sequence[int] = SHOTS,
    seeds: Sequence[int] = SEEDS,
    template: str = PROMPT,
    client: Client | None = None,
    batch_size: int = 64,
    device: str | None = None,
    storage_options: dict | None = None,
    progress: bool = True,
    log: Any = print,
) -> pd.DataFrame:
    """Compare ``models`` (model directories) and the models trained here on the catalog's splits.

    ``unseen_sources`` (or ``dedup``) given: the split is (re)assigned first, with ``split_seed``; otherwise
    the catalog's recorded split is used. ``train_objectives``: any of ``supervised`` (the built-in CNN with a
    linear head) and ``clip`` (the tiny CLIP architecture), trained for ``epochs`` into ``out_dir/models/``;
    ``train_options`` go to ``pzscale.train.train`` as well (``batch_size``, ``lr``, ``seed``, ...).
    Returns the table (columns ``model, setting, split, kingdom .. species``).
    """
    so = storage_options
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unknown = sorted(set(train_objectives) - set(TRAIN_OBJECTIVES))
    if unknown:
        raise InputError(f"unknown training objective(s) {unknown}; use {', '.join(TRAIN_OBJECTIVES)}")
    if not models and not train_objectives:
        raise InputError("nothing to compare: give model directories and/or training objectives")
    cat = Catalog.open(url, so)  # one handle through every stage: url and storage options travel together
    url = cat.url
    if unseen_sources is not None or dedup:
        counts = assign_splits(cat, seed=split_seed, unseen_sources=tuple(unseen_sources or ()), dedup=dedup,
                               client=client)
        log("split: " + ", ".join(f"{k or 'unlabelled'} {v:,}" for k, v in sorted(counts.items())))
    elif SPLIT not in cat.arrays():
        raise CatalogError(f"{url}: no split recorded; run pzscale split or pass the unseen sources")
    model_dirs = [str(m) for m in models]
    for objective in train_objectives:
        target = out / "models" / objective
        log(f"training {objective} -> {target}")
        options = {"epochs": epochs, **(train_options or {})}
        fit = functools.partial(train_clip, name="pzscale-clip") if objective == "clip" else \
            functools.partial(train, objective=objective)
        fit(cat, str(target), log=lambda line: log("  " + line), **options)
        model_dirs.append(str(target))
    ids = [ModelCard.load(m).id for m in model_dirs]
    if len(set(ids)) < len(ids):
        raise InputError(f"model ids must differ (their outputs share catalog variables): {ids}")
    present = classes_present(cat, ("train", *SPLITS.values()))
    scored = {name: split for name, split in SPLITS.items() if present[split]}

    @functools.cache
    def train_hash() -> str:  # read (every shard) only when a CLIP-trained model asks
        return training_hash(split_rows(cat, "train"))

    def trained_on_this_split(card: ModelCard) -> bool:
        return card.extra.get("objective") == "clip" and card.training_data_sha256 == train_hash()

    stage_kw = {"client": client, "batch_size": batch_size, "device": device, "progress": progress}
    rows, described = [], []
    for model_dir in model_dirs:
        card = ModelCard.load(model_dir)
        settings = []
        if card.head:
            log(f"{card.id}: classify")
            classify(cat, model_dir, **stage_kw)
            settings.append(("supervised", card.id))
        if has_text_tower(model_dir):
            trained_here = trained_on_this_split(card)
            log(f"{card.id}: zero-shot")
            zeroshot(cat, model_dir, classes={s: c for s, c in present.items() if c}, template=template,
                     **stage_kw)
            settings.append(("clip-style" if trained_here else "zero-shot", zeroshot_names(card)["model_id"]))
            embedding = zeroshot_names(card)["embedding"]
        else:
            log(f"{card.id}: embed")
            embed(cat, model_dir, **stage_kw)
            embedding = embed_names(card)["embedding"]
        for setting, prediction_id in settings:
            for name, split in scored.items():
                rows.append(_rows(card.id, setting, name, evaluate(cat, prediction_id, split=split,
                                                                     client=client)))
        for name, split in scored.items():
            log(f"{card.id}: SimpleShot on {name}")
            table = fewshot(cat, embedding, split=split, shots=shots, seeds=seeds, client=client)
            for k, part in table.groupby("shots", sort=True):
                rows.append(_rows(card.id, f"{k}-shot", name, part))
        described.append({"model": card.id, "dir": str(model_dir), "kind": card.kind,
                          "architecture": card.architecture, "settings": [s for s, _ in settings],
                          "embedding": embedding, "training_data_sha256": card.training_data_sha256})
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    tables.write_csv(table, out / "compare.csv")  # quoted, formula-safe CSV
    protocol = {"seen": "test split", "unseen": "held-out sources, classes absent from train",
                "metric": "macro-F1 per rank, lineages truncated to the first k ranks (shorter ones whole)",
                "zero_shot_prompt": template, "simpleshot": {"shots": list(shots), "seeds": list(seeds)},
                "split": cat.metadata()["stages"].get(SPLIT)}
    (out / "compare.json").write_text(json.dumps(
        {"catalog": url if "://" not in url or url.startswith("file://") else "(remote)", "protocol": protocol,
         "classes": {s: len(present[s]) for s in SPLITS.values()}, "models": described,
         "table": table.to_dict(orient="records")}, indent=1) + "\n")
    plot(table, out / "compare_f1_by_rank.png")
    log(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return table
