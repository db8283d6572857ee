"""The composition commands (``pzscale abundance``, ``pzscale quantify``, ``pzscale drift``), registered on the app by
``pzscale.cli``: wiring only, the work is in ``pzscale.abundance`` and ``pzscale.quantify``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pzscale.commandline import (
    CatalogOpt,
    MinProbOpt,
    ModelOpt,
    SchedulerOpt,
    StorageOpt,
    WorkersOpt,
    check_inputs,
    start_client,
    storage_options_of,
)
from pzscale.errors import InputError


def abundance(
    catalog_url: CatalogOpt,
    out: Annotated[str | None, typer.Option(help="Zarr store for the (taxon, time, lat, lon) counts")] = None,
    rank: Annotated[str, typer.Option(help="kingdom ... species, or lineage")] = "genus",
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="use this model's predictions (pred__<id>__*) instead of the catalog's annotations: "
                              "its id, or its directory (needed by --correct)")] = None,
    min_prob: MinProbOpt = 0.0,
    cell: Annotated[float, typer.Option(help="cell size in degrees")] = 1.0,
    time_bin: Annotated[str, typer.Option(help="pandas frequency of the time bins (1MS, 7D, 1YS)")] = "1MS",
    correct: Annotated[str | None, typer.Option(
        help="also counts corrected for the model's errors: pcc, acc or pacc (em: pzscale quantify)")] = None,
    validation: Annotated[str | None, typer.Option(
        help="with --correct: catalog holding the model's labelled validation split (default: this one)")] = None,
    validation_split: Annotated[str, typer.Option(help="split of the validation images")] = "val",
    keep_suspect_volumes: Annotated[bool, typer.Option(
        help="count suspect sample volumes (flagged by their reader, or robust outliers) too")] = False,
    png: Annotated[Path | None, typer.Option(help="write a map here")] = None,
    variable: Annotated[str | None, typer.Option(
        help="variable to map (default: concentration_corrected where volumes are known, else count_corrected, "
             "with --correct; count without)")] = None,
    taxon: Annotated[str | None, typer.Option(help="taxon to map (default: all summed)")] = None,
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
    storage_options: StorageOpt = None,
) -> None:
    """Count images per taxon, time bin and lat/lon cell (per litre where volumes are known; corrected for the
    classifier's errors with --correct); map them, zero (sampled, none found) apart from no data."""
    from pzscale.abundance import abundance as run
    from pzscale.abundance import plot_map
    from pzscale.ml.models import ModelCard

    so = storage_options_of(storage_options)
    check_inputs(catalog_url, so)
    card = ModelCard.load(model) if model and Path(model, "model_card.json").is_file() else None
    if correct and card is None:
        raise InputError(f"--correct needs --model to be a model directory (its card lists the classes), not {model!r}")
    with start_client(scheduler, workers) as client:  # --out on object storage uses the catalog's storage options
        ds = run(catalog_url, rank=rank, model=card.id if card else model, min_prob=min_prob, cell_deg=cell,
                 time_bin=time_bin, correct=correct, classes=card.classes if card else None, validation=validation,
                 validation_split=validation_split, keep_suspect_volumes=keep_suspect_volumes, out=out,
                 storage_options=so, out_storage_options=so,
                 client=client)
    if png:
        if variable is None and correct:
            variable = "concentration_corrected" if float(ds["volume_ml"].sum()) > 0 else "count_corrected"
        plot_map(ds, png, taxon=taxon, variable=variable or "count")
    typer.echo(f"abundance: {ds.attrs['images_counted']:,} images of {ds.sizes['taxon']} taxa at rank {rank} in "
               f"{ds.sizes['time']} time bins x {ds.sizes['lat']} x {ds.sizes['lon']} cells of {cell:g} deg"
               + (f", corrected ({correct})" if correct else "") + (f" -> {out}" if out else "")
               + (f"; map {png}" if png else ""))


def quantify(
    catalog_url: CatalogOpt,
    model: ModelOpt,
    by: Annotated[str, typer.Option(help="catalog variable whose values (or bins) are the groups: sample, source, "
                                         "instrument, time...")],
    out: Annotated[str, typer.Option(help="CSV to write (path or URL)")],
    rank: Annotated[str | None, typer.Option(help="kingdom ... species (default: the model's own classes)")] = None,
    rollup: Annotated[bool, typer.Option(
        help="estimate over the model's classes and sum up to every rank (a rank column; ranks add up)")] = False,
    method: Annotated[str, typer.Option(help="comma-separated: cc, pcc, acc, pacc, em")] = "cc,pcc,acc,pacc,em",
    min_prob: Annotated[float, typer.Option(help="predictions below this probability count as 'unknown'")] = 0.5,
    bin_by: Annotated[str | None, typer.Option(
        "--bin", help="bin --by: a pandas frequency for time (1D, 1MS), a width for numbers")] = None,
    validation: Annotated[str | None, typer.Option(
        help="catalog holding the model's labelled validation split (default: this one)")] = None,
    validation_split: Annotated[str, typer.Option(help="split of the validation images")] = "val",
    rounds: Annotated[int, typer.Option(help="bootstrap rounds of the intervals (0: none)")] = 100,
    level: Annotated[float, typer.Option(help="interval level")] = 0.9,
    zarr_out: Annotated[str | None, typer.Option(
        "--zarr", help="also write the table as an xarray Dataset (group x taxon x method) to this Zarr store")] = None,
    keep_suspect_volumes: Annotated[bool, typer.Option(
        help="give concentrations for groups with a suspect sample volume (flagged by its reader, or a robust "
             "outlier of its source and instrument) too")] = False,
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
    storage_options: StorageOpt = None,
) -> None:
    """Per group and taxon: counts and proportions corrected for classifier error, with bootstrap intervals and
    concentrations per litre where volumes are known."""
    from pzscale.ml.models import ModelCard
    from pzscale.quantify import quantify as run

    so = storage_options_of(storage_options)
    check_inputs(catalog_url, so)
    card = ModelCard.load(model)
    number = _number_or_none(bin_by)
    with start_client(scheduler, workers) as client:
        table = run(catalog_url, card.id, card.classes, by, rank=rank, rollup=rollup,
                    methods=tuple(m.strip() for m in method.split(",") if m.strip()), min_prob=min_prob,
                    bin_by=bin_by if number is None else number, validation=validation,
                    validation_split=validation_split, rounds=rounds, level=level,
                    keep_suspect_volumes=keep_suspect_volumes, out_csv=out, out_zarr=zarr_out,
                    storage_options=so, client=client)
    typer.echo(f"quantify: {table[by].nunique():,} groups of {by} x {table['taxon'].nunique():,} taxa x "
               f"{table['method'].nunique()} methods -> {out}" + (f" and {zarr_out}" if zarr_out else ""))


def drift(
    catalog_url: CatalogOpt,
    model: ModelOpt,
    by: Annotated[str, typer.Option(help="catalog variable whose values (or bins) are the groups")],
    out: Annotated[str | None, typer.Option(help="CSV to write (path or URL)")] = None,
    embedding: Annotated[str | None, typer.Option(help="emb__<model> array (default: the model's own)")] = None,
    min_prob: Annotated[float, typer.Option(help="predictions below this count as low confidence")] = 0.5,
    bin_by: Annotated[str | None, typer.Option(
        "--bin", help="bin --by: a pandas frequency for time (1D, 1MS), a width for numbers")] = None,
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
    storage_options: StorageOpt = None,
) -> None:
    """Groups ranked by how far they drift from the training data: low-confidence share and embedding distance
    to the training images, each beyond what the validation split shows."""
    from pzscale.ml.models import ModelCard
    from pzscale.quantify import drift as run

    so = storage_options_of(storage_options)
    check_inputs(catalog_url, so)
    card = ModelCard.load(model)
    width = _number_or_none(bin_by)
    with start_client(scheduler, workers) as client:
        table = run(catalog_url, card.id, by, embedding=embedding, min_prob=min_prob,
                      bin_by=bin_by if width is None else width, out_csv=out, storage_options=so, client=client)
    typer.echo(table.head(20).to_string(index=False, float_format=lambda v: f"{v:.3f}"))


def _number_or_none(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None
