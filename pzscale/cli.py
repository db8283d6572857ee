"""The ``pzscale`` command line: wiring only, the work is in the stage modules."""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path
from typing import Annotated

import typer

from pzscale import cli_composition as composition
from pzscale import info, tables
from pzscale.commandline import (
    App,
    CatalogOpt,
    MinProbOpt,
    ModelOpt,
    PrecisionOpt,
    SchedulerOpt,
    StorageOpt,
    TaxonModelOpt,
    WorkersOpt,
    check_inputs,
    configure_logging,
    start_client,
    storage_options_of,
)

app = App(add_completion=False, no_args_is_help=True)  # its help is main's docstring


def _version(value: bool) -> None:
    if value:
        typer.echo(f"pzscale {version('pzscale')}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True,
                                         help="more log lines (-v: debug, -vv: Dask's too)")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="warnings and errors only, no progress")] = False,
    show_version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="print the version and exit")] = False,
) -> None:
    """Plankton image catalogs at Planktonzilla-17M scale, on Dask.

    Defaults from the environment: PZSCALE_CATALOG (--catalog), PZSCALE_STORAGE_OPTIONS
    (--storage-options), DASK_SCHEDULER_ADDRESS (--scheduler). Progress is a bar on a terminal and a
    log line every PZSCALE_PROGRESS_SECONDS (30) elsewhere.
    """
    configure_logging(verbose, quiet)


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="folder for the parquet shards and truth.json")],
    images: Annotated[int, typer.Option("--images", "-n", help="number of rows")] = 2000,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    rows_per_file: Annotated[int, typer.Option(help="rows per parquet shard")] = 1000,
    workers: Annotated[int | None, typer.Option(
        help="processes painting parquet files (default: one per CPU from 5,000 images); same bytes for any")] = None,
    format: Annotated[str, typer.Option(
        "--format", "-f", help="parquet (Planktonzilla shards) or ifcb (raw v2 bins)")] = "parquet",
) -> None:
    """Write synthetic Planktonzilla parquet shards (planted duplicates, corrupt rows) or IFCB bins."""
    from pzscale import synth as make

    if format == "ifcb":
        truth = make.synth_ifcb(out, images=images, seed=seed)
        typer.echo(f"wrote {images} ROIs in {len(truth['bins'])} IFCB bins to {out} ({out / 'truth.json'})")
        return
    if format != "parquet":
        raise typer.BadParameter(f"--format must be parquet or ifcb, not {format!r}")
    truth = make.synth(out, images=images, seed=seed, rows_per_file=rows_per_file, workers=workers)
    typer.echo(f"wrote {images} rows to {out} ({len(truth['duplicates'])} planted duplicates, "
               f"{len(truth['corrupt'])} corrupt rows; ground truth in {out / 'truth.json'})")


@app.command()
def ingest(
    sources: Annotated[list[str], typer.Argument(help="files or folders: parquet, IFCB bins, EcoTaxa, archives")],
    catalog_url: CatalogOpt,
    format: Annotated[str | None, typer.Option(
        "--format", "-f", help="reader name (see `pzscale readers`); default: guessed per source")] = None,
    source: Annotated[str | None, typer.Option(
        help="collection name for inputs that do not carry one (IFCB bins, class folders)")] = None,
    taxonomy: Annotated[str | None, typer.Option(
        help="Planktonzilla-format taxonomy CSV (path or URL) mapping (source, raw label) to ranks")] = None,
    taxonomy_source: Annotated[str | None, typer.Option(
        help="use this Dataset's rows of the taxonomy table for every image (e.g. global_uvp5)")] = None,
    shard_len: Annotated[int | None, typer.Option(help="rows per shard (new catalogs; default 16384)")] = None,
    append: Annotated[bool, typer.Option(help="add these sources to an existing catalog")] = False,
    duplicate_ids: Annotated[str, typer.Option(
        help="rows whose image id another input or catalog row has: flag (keep, QC flag duplicate_image_id), "
             "suffix (~2, ~3 ... on later rows) or refuse (write nothing)")] = "flag",
    sample: Annotated[str | None, typer.Option(
        help="sample name for every image of these inputs (a station, a net tow); default: what each reader "
             "finds (IFCB bin, EcoTaxa sample_id or acq_id, the folder above a class folder)")] = None,
    sample_column: Annotated[str | None, typer.Option(
        help="take each image's sample from this record column (e.g. original_path or ObjID of Planktonzilla "
             "shards, which carry none of their own)")] = None,
    sample_pattern: Annotated[str | None, typer.Option(
        help="with --sample-column: the sample is this regular expression's first group (or its whole match) "
             "in that column, e.g. '^(D\\d{8}T\\d{6}_IFCB\\d+)'; unmatched rows get '' and QC flag "
             "sample_unmatched")] = None,
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
    storage_options: StorageOpt = None,
) -> None:
    """Ingest images and their metadata into a catalog (resumable: rerun to continue)."""
    from pzscale.ids import POLICIES
    from pzscale.ingest import ingest as run

    if duplicate_ids not in POLICIES:
        raise typer.BadParameter(f"--duplicate-ids must be one of {', '.join(POLICIES)}, not {duplicate_ids!r}")
    so = storage_options_of(storage_options)
    check_inputs(catalog_url, so, sources=sources, new_catalog=not append)
    with start_client(scheduler, workers) as client:
        report = run(sources, catalog_url, format=format, source=source, taxonomy_table=taxonomy,
                     taxonomy_source=taxonomy_source, shard_len=shard_len, append=append, client=client,
                     storage_options=so, duplicate_ids=duplicate_ids, sample=sample, sample_column=sample_column,
                     sample_pattern=sample_pattern)
    typer.echo(str(report))


@app.command()
def unlock(
    catalog_url: CatalogOpt,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False,
    storage_options: StorageOpt = None,
) -> None:
    """Remove the ingest lock left by a process that is gone (an ingest on this host takes over such a lock
    itself; one held from another host needs this)."""
    from pzscale.ingest import read_lock, remove_lock

    so = storage_options_of(storage_options)
    holder = read_lock(catalog_url, storage_options=so)
    if holder is None:
        typer.echo(f"{catalog_url}: not locked")
        return
    who = f"{holder.get('host')} pid {holder.get('pid')} since {holder.get('since')}" if holder else "unknown holder"
    if not yes and not typer.confirm(f"{catalog_url} is locked by {who}. Remove the lock only if that process is "
                                     "gone. Remove it?"):
        raise typer.Exit(1)
    remove_lock(catalog_url, storage_options=so)
    typer.echo(f"{catalog_url}: lock of {who} removed")


@app.command("readers")
def readers_cmd() -> None:
    """List the input formats pzscale can ingest (built-in and from installed plugins)."""
    from pzscale import readers

    for name in readers.available():
        try:
            typer.echo(f"{name:12s} {readers.get(name).description}")
        except Exception as e:  # noqa: BLE001 - a broken plugin must not hide the others
            typer.echo(f"{name:12s} (cannot load: {e})")


taxonomy_app = App(help="Taxonomy harmonisation.", no_args_is_help=True)
app.add_typer(taxonomy_app, name="taxonomy")


@taxonomy_app.command("report")
def taxonomy_report(
    catalog_url: CatalogOpt,
    table: Annotated[str | None, typer.Option(help="Planktonzilla-format taxonomy CSV to check as well")] = None,
    out: Annotated[Path | None, typer.Option(help="folder for unmapped.csv and conflicts.csv")] = None,
    storage_options: StorageOpt = None,
) -> None:
    """Unmapped (source, raw label) pairs with counts, and raw labels mapped to different lineages."""
    from pzscale import taxonomy as tax

    so = storage_options_of(storage_options)
    pairs = tax.catalog_mappings(info.label_mappings(catalog_url, storage_options=so))
    table_df = tax.read_table(table, storage_options=so) if table else None
    unmapped = tax.unmapped(pairs, table_df)
    conflicts = tax.conflicts(pairs if table_df is None else tax.table_mappings(table_df))
    typer.echo(f"unmapped (source, raw label): {len(unmapped)} pair(s), {int(unmapped['images'].sum()):,} images")
    typer.echo(unmapped.head(30).to_string(index=False) if len(unmapped) else "  none")
    where = "taxonomy table" if table else "catalog"
    typer.echo(f"\nraw labels mapped to different lineages ({where}): {conflicts['raw_label'].nunique()}")
    typer.echo(conflicts[["raw_label", "source", "lineage"]].to_string(index=False) if len(conflicts) else "  none")
    if out:
        out.mkdir(parents=True, exist_ok=True)
        tables.write_csv(unmapped, out / "unmapped.csv")
        tables.write_csv(conflicts, out / "conflicts.csv")
        typer.echo(f"\nwrote {out / 'unmapped.csv'} and {out / 'conflicts.csv'}")


@app.command()
def split(
    catalog_url: CatalogOpt,
    seed: Annotated[int, typer.Option(help="random seed of the split")] = 42,
    unseen: Annotated[list[str] | None, typer.Option(help="hold out this whole source as 'unseen' (repeat)")] = None,
    storage_options: StorageOpt = None,
) -> None:
    """Record a stratified 60/20/20 train/val/test split per source and label in the catalog."""
    from pzscale.split import assign_splits

    counts = assign_splits(catalog_url, seed=seed, unseen_sources=tuple(unseen or ()),
                           storage_options=storage_options_of(storage_options))
    typer.echo("split: " + ", ".join(f"{k or 'unlabelled'} {v:,}" for k, v in sorted(counts.items())))


@app.command()
def train(
    catalog_url: CatalogOpt,
    out: Annotated[Path, typer.Option(help="model directory to write")],
    name: Annotated[str | None, typer.Option(help="model name (default pzscale-cnn, pzscale-clip)")] = None,
    version: Annotated[str, typer.Option(help="model version")] = "1",
    backbone: Annotated[str | None, typer.Option(
        help="model directory whose stored embeddings to train a head on (default: train the built-in CNN)")] = None,
    head: Annotated[str, typer.Option(help="linear or mlp")] = "linear",
    epochs: Annotated[int, typer.Option()] = 10,
    image_size: Annotated[int, typer.Option(help="input size of the built-in CNN")] = 64,
    seed: Annotated[int, typer.Option()] = 0,
    objective: Annotated[str, typer.Option(
        help="supervised (a classifier) or clip (CLIP-style image-text training with lineage text; --backbone: "
             "the CLIP model directory to start from, default the tiny CPU architecture)")] = "supervised",
    storage_options: StorageOpt = None,
) -> None:
    """Train a classifier, or a CLIP-style model, on the catalog's train split (run `pzscale split` first)."""
    from pzscale.clip_train import train_clip
    from pzscale.train import train as fit

    so = storage_options_of(storage_options)
    if objective == "clip":
        card = train_clip(catalog_url, str(out), name=name or "pzscale-clip", version=version, init_dir=backbone,
                          epochs=epochs, image_size=None if backbone else image_size, seed=seed,
                          storage_options=so, log=typer.echo)
    else:
        card = fit(catalog_url, str(out), objective=objective, name=name, version=version, backbone_dir=backbone,
                   head=head, epochs=epochs, image_size=image_size, seed=seed, storage_options=so, log=typer.echo)
    typer.echo(f"model {card.id} ({len(card.classes)} classes) saved in {out}")


@app.command()
def embed(
    catalog_url: CatalogOpt,
    model: ModelOpt,
    batch_size: Annotated[int, typer.Option()] = 64,
    tta: Annotated[bool, typer.Option(help="average over the 8 rotations/flips")] = False,
    precision: PrecisionOpt = "fp32",
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
    storage_options: StorageOpt = None,
) -> None:
    """Store float16 image embeddings of a model in the catalog (resumable, incremental)."""
    from pzscale.embed import embed as run

    so = storage_options_of(storage_options)
    check_inputs(catalog_url, so, model=model)
    with start_client(scheduler, workers) as client:
        report = run(catalog_url, model, client=client, batch_size=batch_size, tta=tta, precision=precision,
                     storage_options=so)
    typer.echo(str(report))


@app.command()
def classify(
    catalog_url: CatalogOpt,
    model: ModelOpt,
    batch_size: Annotated[int, typer.Option()] = 64,
    top_k: Annotated[int, typer.Option()] = 5,
    tta: Annotated[bool, typer.Option(help="average over the 8 rotations/flips")] = False,
    precision: PrecisionOpt = "fp32",
    backoff_min_prob: Annotated[float, typer.Option(
        help="back-off label: the deepest rank whose summed probability reaches this")] = 0.5,
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
    storage_options: StorageOpt = None,
) -> None:
    """Store top-k and per-rank predictions of a model in the catalog, and the back-off label (resumable)."""
    from pzscale.classify import classify as run

    so = storage_options_of(storage_options)
    check_inputs(catalog_url, so, model=model)
    with start_client(scheduler, workers) as client:
        report = run(catalog_url, model, client=client, batch_size=batch_size, top_k=top_k, tta=tta,
                     precision=precision, backoff_min_prob=backoff_min_prob, storage_options=so)
    typer.echo(str(report))


# Classification is incremental by design (markers record the rows they cover); the second
# name says so for the everyday case of a cruise appended to a classified catalog.
app.command("reclassify", help="Classify only the rows without a prediction from this model version "
                               "(e.g. an appended cruise).")(classify)


@app.command()
def evaluate(
    catalog_url: CatalogOpt,
    model: ModelOpt,
    split_name: Annotated[str, typer.Option("--split", help="train, val, test or unseen")] = "test",
    by: Annotated[str | None, typer.Option(
        help="score compositions per group of this variable (sample, source...) instead of images")] = None,
    rank: Annotated[str | None, typer.Option(
        help="with --by: kingdom ... species (default: the model's classes)")] = None,
    method: Annotated[str, typer.Option(
        help="with --by: comma-separated cc, pcc, acc, pacc, em")] = "cc,pcc,acc,pacc,em",
    min_prob: Annotated[float, typer.Option(help="with --by: predictions below this are 'unknown'")] = 0.5,
    storage_options: StorageOpt = None,
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
) -> None:
    """Accuracy and macro-F1 at every rank, kingdom to species, of a model's stored predictions; with --by, each
    quantification method's composition error per group (absolute error, Bray-Curtis) beside its macro-F1."""
    from pzscale.evaluate import evaluate as run
    from pzscale.evaluate import evaluate_by
    from pzscale.ml.models import ModelCard

    card = ModelCard.load(model)
    so = storage_options_of(storage_options)
    if by is None:
        table = run(catalog_url, card.id, split=split_name, storage_options=so)
    else:
        with start_client(scheduler, workers) as client:
            table = evaluate_by(catalog_url, card.id, card.classes, by, split=split_name, rank=rank,
                                methods=tuple(m.strip() for m in method.split(",") if m.strip()), min_prob=min_prob,
                                storage_options=so, client=client)
    typer.echo(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


# ---- dedup commands (issue 5): insert below this line ----


@app.command("dedup")
def dedup_cmd(
    catalog_url: CatalogOpt,
    method: Annotated[str, typer.Option("--method", help="comma-separated: exact, near, semantic")] = "exact,near",
    threshold: Annotated[int | None, typer.Option(
        help="near: largest pHash Hamming distance of 64 bits (default 8)")] = None,
    similarity: Annotated[float | None, typer.Option(
        help="near: least correlation of the pairs' DCT profiles (default 0.97; 0 = pHash bits alone)")] = None,
    bands: Annotated[int | None, typer.Option(help="near: bands the pHash is cut into (default: from N)")] = None,
    embedding: Annotated[str | None, typer.Option(
        help="semantic: emb__<model> array or model id (default: the only one)")] = None,
    eps: Annotated[float | None, typer.Option(help="semantic: duplicates have cosine > 1 - eps (default 0.01)")] = None,
    clusters: Annotated[int | None, typer.Option(help="semantic: k-means clusters (default: sqrt of rows)")] = None,
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
    storage_options: StorageOpt = None,
) -> None:
    """Group duplicate images (exact pixels, perceptual hash, embeddings); write dup_* arrays, dup_keep and reports."""
    from pzscale import dedup as stage

    options = {k: v for k, v in (("near_threshold", threshold), ("near_similarity", similarity), ("eps", eps))
               if v is not None}
    so = storage_options_of(storage_options)
    check_inputs(catalog_url, so)
    with start_client(scheduler, workers) as client:
        report = stage.dedup(catalog_url, methods=method, bands=bands, embedding=embedding, n_clusters=clusters,
                             client=client, storage_options=so, **options)
    typer.echo(str(report))


@app.command("dedup-report")
def dedup_report_cmd(
    catalog_url: CatalogOpt,
    kind: Annotated[str, typer.Argument(help="pairs, cross-source, leakage or histogram")] = "cross-source",
    method: Annotated[str | None, typer.Option(help="exact, near or semantic (default: every method run)")] = None,
    out: Annotated[Path | None, typer.Option(help="write the whole table to this CSV file")] = None,
    storage_options: StorageOpt = None,
) -> None:
    """Print a dedup report table (duplicate pairs, pairs across sources, split leakage, similarity histogram)."""
    from pzscale import dedup as stage

    readers = {"pairs": stage.duplicate_pairs, "cross-source": stage.cross_source_pairs,
               "leakage": stage.leakage_report}
    so = storage_options_of(storage_options)
    if kind == "histogram":
        table = stage.similarity_histogram(catalog_url, storage_options=so)
    elif kind in readers:
        table = readers[kind](catalog_url, method=method, storage_options=so)
    else:
        raise typer.BadParameter(f"report kind must be pairs, cross-source, leakage or histogram, not {kind!r}")
    typer.echo(f"{kind}: {len(table):,} row(s)")
    typer.echo(table.head(30).to_string(index=False) if len(table) else "  none")
    if out:
        tables.write_csv(table, out)
        typer.echo(f"wrote {out}")


# ---- env / abundance / export commands (issue 6): insert below this line ----

@app.command("env")
def env_cmd(
    catalog_url: CatalogOpt,
    grid: Annotated[str, typer.Option(help="grid file or URL: NetCDF or Zarr, local or s3://...")],
    var: Annotated[list[str], typer.Option(
        "--var", help="NAME=VARIABLE (or NAME, an alias such as sst, thetao, so, chlor_a); writes env_NAME; repeat")],
    time_mode: Annotated[str, typer.Option(
        "--time", help="auto (month of year for climatologies, else nearest), nearest or month")] = "auto",
    depth_mode: Annotated[str, typer.Option(
        "--depth", help="nearest level to the image's depth, or mean over its depth range")] = "nearest",
    land_fill_km: Annotated[float | None, typer.Option(
        help="give points on a NaN (land) cell the nearest valid cell within this radius")] = None,
    lat_tolerance: Annotated[float | None, typer.Option(help="degrees (default: one grid step)")] = None,
    lon_tolerance: Annotated[float | None, typer.Option(help="degrees (default: one grid step)")] = None,
    depth_tolerance: Annotated[float | None, typer.Option(help="m (default: largest level spacing)")] = None,
    time_tolerance_days: Annotated[float | None, typer.Option(help="days (default: one time step)")] = None,
    kelvin: Annotated[bool, typer.Option(help="keep kelvin instead of converting to degC")] = False,
    grid_storage_options: Annotated[str | None, typer.Option(help="fsspec options of the grid store, JSON")] = None,
    overwrite: Annotated[bool, typer.Option(help="recompute a name joined before with other parameters")] = False,
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
    storage_options: StorageOpt = None,
) -> None:
    """Join gridded ocean variables at each image's position, depth and time (env_NAME, env_NAME_qc)."""
    from pzscale.env import env as run
    from pzscale.grids import JoinOptions

    options = JoinOptions(lat_tolerance=lat_tolerance, lon_tolerance=lon_tolerance, depth=depth_mode,
                          depth_tolerance=depth_tolerance, time=time_mode,
                          time_tolerance_days=time_tolerance_days, land_fill_km=land_fill_km, celsius=not kelvin)
    so, grid_so = storage_options_of(storage_options), storage_options_of(grid_storage_options)
    check_inputs(catalog_url, so, grid=(grid, var, grid_so))
    with start_client(scheduler, workers) as client:
        report = run(catalog_url, grid, var, options=options, client=client, storage_options=so,
                     grid_storage_options=grid_so, overwrite=overwrite)
    typer.echo(str(report))


app.command("abundance")(composition.abundance)
app.command("quantify")(composition.quantify)
app.command("drift")(composition.drift)


export_app = App(help="Export the catalog for other systems.", no_args_is_help=True)
app.add_typer(export_app, name="export")


@export_app.command("dwc")
def export_dwc_cmd(
    catalog_url: CatalogOpt,
    out: Annotated[str, typer.Option(help="occurrence CSV to write (path or URL)")],
    model: TaxonModelOpt = None,
    min_prob: MinProbOpt = 0.0,
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
    storage_options: StorageOpt = None,
) -> None:
    """Darwin Core occurrence CSV for OBIS/GBIF: one row per identified image."""
    from pzscale.dwc import export_dwc

    so = storage_options_of(storage_options)
    check_inputs(catalog_url, so)
    with start_client(scheduler, workers):
        result = export_dwc(catalog_url, out, model=model, min_prob=min_prob, storage_options=so,
                            out_storage_options=so)
    typer.echo(f"wrote {result['rows']:,} occurrences to {result['path']}")


# ---- compare commands (issue 10): insert below this line ----


@app.command("compare")
def compare_cmd(
    catalog_url: CatalogOpt,
    out: Annotated[Path, typer.Option(help="folder for compare.csv, compare.json and compare_f1_by_rank.png")],
    model: Annotated[list[str] | None, typer.Option(
        "--model", "-m", help="model directory to compare (repeat): classifier or open_clip CLIP")] = None,
    train_objective: Annotated[list[str] | None, typer.Option(
        "--train", help="also train and compare: supervised and/or clip (repeat)")] = None,
    unseen: Annotated[list[str] | None, typer.Option(
        help="re-split first, holding out this whole source as unseen (repeat)")] = None,
    paper_split: Annotated[bool, typer.Option(
        help="re-split first with the paper's held-out sources (global_uvp5, planktoscope, planktonset1.0, "
             "syke_ifcb_2022)")] = False,
    dedup: Annotated[bool, typer.Option(
        help="re-split so that duplicate groups (pzscale dedup) never straddle splits")] = False,
    seed: Annotated[int, typer.Option(help="random seed of the split")] = 42,
    epochs: Annotated[int, typer.Option(help="epochs of the models trained with --train")] = 10,
    batch_size: Annotated[int, typer.Option()] = 64,
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
    storage_options: StorageOpt = None,
) -> None:
    """Planktonzilla comparison: macro-F1 per rank for each model and setting (supervised, CLIP-style,
    zero-shot, 1-shot, 5-shot) on the seen (test) and unseen (held-out source) splits."""
    from pzscale.compare import compare as run
    from pzscale.split import PAPER_UNSEEN_SOURCES

    sources = [*(unseen or ()), *(PAPER_UNSEEN_SOURCES if paper_split else ())]
    so = storage_options_of(storage_options)
    check_inputs(catalog_url, so)
    with start_client(scheduler, workers) as client:
        run(catalog_url, out, models=model or (), train_objectives=train_objective or (),
            unseen_sources=sources if sources else None, dedup=dedup, split_seed=seed, epochs=epochs,
            batch_size=batch_size, client=client, storage_options=so,
            log=typer.echo)
    typer.echo(f"wrote {out / 'compare.csv'}, {out / 'compare.json'} and {out / 'compare_f1_by_rank.png'}")


# ---- end of stage commands ----


@app.command("info")
def info_cmd(url: Annotated[str, typer.Argument(help="catalog URL", envvar="PZSCALE_CATALOG")],
             storage_options: StorageOpt = None,
             as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """Rows, sources, label coverage, status counts and stages done per shard."""
    summary = info.summarize(url, storage_options=storage_options_of(storage_options))
    typer.echo(json.dumps(summary, indent=1) if as_json else info.format_summary(summary))


@app.command()
def verify(
    catalog_url: CatalogOpt,
    read_only: Annotated[bool, typer.Option(
        "--read-only", help="only report: keep the done markers of damaged shards")] = False,
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
    storage_options: StorageOpt = None,
) -> None:
    """Read every shard of every array; report damaged shards one line each and exit 1 if any. Their done
    markers are removed (unless --read-only) so a rerun of the stage named rewrites them."""
    from pzscale.verify import verify as run

    so = storage_options_of(storage_options)
    check_inputs(catalog_url, so)
    with start_client(scheduler, workers) as client:
        report = run(catalog_url, storage_options=so, client=client, read_only=read_only)
    typer.echo(str(report))
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def migrate(
    catalog_url: CatalogOpt,
    storage_options: StorageOpt = None,
) -> None:
    """Bring a catalog written by an older pzscale to the current layout, in place (resumable: rerun it
    if it stops); a catalog of the current layout is left as it is."""
    from pzscale.migrate import migrate as run

    so = storage_options_of(storage_options)
    check_inputs(catalog_url, so)
    done = run(catalog_url, storage_options=so, log=typer.echo)
    typer.echo(f"{catalog_url}: layout {done['from']} -> {done['to']}" if done["arrays"] or done["from"] != done["to"]
               else f"{catalog_url}: already layout {done['to']}; nothing to do")


@app.command()
def demo(
    out: Annotated[Path, typer.Argument(help="folder for the demo's inputs and catalog")] = Path("demo-output"),
    images: Annotated[int, typer.Option("--images", "-n")] = 6000,
    epochs: Annotated[int, typer.Option(help="training epochs of the demo model")] = 6,
    workers: WorkersOpt = None,
) -> None:
    """The main job on a built-in default: synthesise a Planktonzilla collection and a cruise of raw
    IFCB bins, ingest both into one catalog on a local cluster, split, train and classify,
    deduplicate, join with an ocean grid and map abundance."""
    from pzscale.demo import run_demo

    run_demo(out, images=images, epochs=epochs, workers=workers, echo=typer.echo)


if __name__ == "__main__":
    app()
