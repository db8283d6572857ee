"""The ``pzscale`` command line: wiring only, the work is in the stage modules."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated

import typer

from pzscale import catalog, info
from pzscale.errors import PzscaleError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Plankton image catalogs at Planktonzilla-17M scale, on Dask.")

CatalogOpt = Annotated[str, typer.Option("--catalog", "-c", help="catalog URL: a path or s3://bucket/x.zarr")]
StorageOpt = Annotated[str | None, typer.Option(
    "--storage-options", help="fsspec storage options as JSON (credentials: use the environment)")]
SchedulerOpt = Annotated[str | None, typer.Option(
    "--scheduler", help="address of a running Dask scheduler; default: a local cluster")]
WorkersOpt = Annotated[int | None, typer.Option("--workers", help="local worker processes (default: cores)")]


def _storage_options(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise typer.BadParameter(f"--storage-options is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise typer.BadParameter("--storage-options must be a JSON object")
    return value


def _fail(e: Exception) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(1)


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="folder for the parquet shards and truth.json")],
    images: Annotated[int, typer.Option("--images", "-n", help="number of rows")] = 2000,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    rows_per_file: Annotated[int, typer.Option(help="rows per parquet shard")] = 1000,
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
    truth = make.synth(out, images=images, seed=seed, rows_per_file=rows_per_file)
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
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
    storage_options: StorageOpt = None,
) -> None:
    """Ingest images and their metadata into a catalog (resumable: rerun to continue)."""
    from pzscale.cluster import connect
    from pzscale.ingest import ingest as run

    so = _storage_options(storage_options)
    try:
        catalog.check_url(catalog_url)
        with connect(scheduler, n_workers=workers) as client:
            report = run(sources, catalog_url, format=format, source=source, taxonomy_table=taxonomy,
                         taxonomy_source=taxonomy_source, shard_len=shard_len, append=append, client=client,
                         storage_options=so)
    except PzscaleError as e:
        _fail(e)
    typer.echo(str(report))


@app.command("readers")
def readers_cmd() -> None:
    """List the input formats pzscale can ingest (built-in and from installed plugins)."""
    from pzscale import readers

    for name in readers.available():
        try:
            typer.echo(f"{name:12s} {readers.get(name).description}")
        except Exception as e:  # noqa: BLE001 - a broken plugin must not hide the others
            typer.echo(f"{name:12s} (cannot load: {e})")


taxonomy_app = typer.Typer(help="Taxonomy harmonisation.", no_args_is_help=True)
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

    so = _storage_options(storage_options)
    try:
        pairs = tax.catalog_mappings(info.label_mappings(catalog_url, storage_options=so))
        table_df = tax.read_table(table, storage_options=so) if table else None
    except PzscaleError as e:
        _fail(e)
    unmapped = tax.unmapped(pairs, table_df)
    conflicts = tax.conflicts(pairs if table_df is None else tax.table_mappings(table_df))
    typer.echo(f"unmapped (source, raw label): {len(unmapped)} pair(s), {int(unmapped['images'].sum()):,} images")
    typer.echo(unmapped.head(30).to_string(index=False) if len(unmapped) else "  none")
    where = "taxonomy table" if table else "catalog"
    typer.echo(f"\nraw labels mapped to different lineages ({where}): {conflicts['raw_label'].nunique()}")
    typer.echo(conflicts[["raw_label", "source", "lineage"]].to_string(index=False) if len(conflicts) else "  none")
    if out:
        out.mkdir(parents=True, exist_ok=True)
        unmapped.to_csv(out / "unmapped.csv", index=False)
        conflicts.to_csv(out / "conflicts.csv", index=False)
        typer.echo(f"\nwrote {out / 'unmapped.csv'} and {out / 'conflicts.csv'}")


ModelOpt = Annotated[str, typer.Option("--model", "-m", help="model directory (model_card.json + weights)")]


def _client(scheduler: str | None, workers: int | None):
    from pzscale.cluster import connect

    return connect(scheduler, n_workers=workers)


@app.command()
def split(
    catalog_url: CatalogOpt,
    seed: Annotated[int, typer.Option(help="random seed of the split")] = 42,
    unseen: Annotated[list[str] | None, typer.Option(help="hold out this whole source as 'unseen' (repeat)")] = None,
    storage_options: StorageOpt = None,
) -> None:
    """Record a stratified 60/20/20 train/val/test split per source and label in the catalog."""
    from pzscale.split import assign_splits

    try:
        counts = assign_splits(catalog_url, seed=seed, unseen_sources=tuple(unseen or ()),
                               storage_options=_storage_options(storage_options))
    except PzscaleError as e:
        _fail(e)
    typer.echo("split: " + ", ".join(f"{k or 'unlabelled'} {v:,}" for k, v in sorted(counts.items())))


@app.command()
def train(
    catalog_url: CatalogOpt,
    out: Annotated[Path, typer.Option(help="model directory to write")],
    name: Annotated[str, typer.Option(help="model name")] = "pzscale-cnn",
    version: Annotated[str, typer.Option(help="model version")] = "1",
    backbone: Annotated[str | None, typer.Option(
        help="model directory whose stored embeddings to train a head on (default: train the built-in CNN)")] = None,
    head: Annotated[str, typer.Option(help="linear or mlp")] = "linear",
    epochs: Annotated[int, typer.Option()] = 10,
    image_size: Annotated[int, typer.Option(help="input size of the built-in CNN")] = 64,
    seed: Annotated[int, typer.Option()] = 0,
    storage_options: StorageOpt = None,
) -> None:
    """Train a classifier on the catalog's train split (run `pzscale split` first)."""
    from pzscale.train import train as fit

    try:
        card = fit(catalog_url, str(out), name=name, version=version, backbone_dir=backbone, head=head,
                   epochs=epochs, image_size=image_size, seed=seed, storage_options=_storage_options(storage_options),
                   log=typer.echo)
    except PzscaleError as e:
        _fail(e)
    typer.echo(f"model {card.id} ({len(card.classes)} classes) saved in {out}")


@app.command()
def embed(
    catalog_url: CatalogOpt,
    model: ModelOpt,
    batch_size: Annotated[int, typer.Option()] = 64,
    tta: Annotated[bool, typer.Option(help="average over the 8 rotations/flips")] = False,
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
    storage_options: StorageOpt = None,
) -> None:
    """Store float16 image embeddings of a model in the catalog (resumable, incremental)."""
    from pzscale.embed import embed as run

    try:
        with _client(scheduler, workers) as client:
            report = run(catalog_url, model, client=client, batch_size=batch_size, tta=tta,
                         storage_options=_storage_options(storage_options))
    except PzscaleError as e:
        _fail(e)
    typer.echo(str(report))


@app.command()
def classify(
    catalog_url: CatalogOpt,
    model: ModelOpt,
    batch_size: Annotated[int, typer.Option()] = 64,
    top_k: Annotated[int, typer.Option()] = 5,
    tta: Annotated[bool, typer.Option(help="average over the 8 rotations/flips")] = False,
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
    storage_options: StorageOpt = None,
) -> None:
    """Store top-k and per-rank predictions of a model in the catalog (resumable)."""
    from pzscale.classify import classify as run

    try:
        with _client(scheduler, workers) as client:
            report = run(catalog_url, model, client=client, batch_size=batch_size, top_k=top_k, tta=tta,
                         storage_options=_storage_options(storage_options))
    except PzscaleError as e:
        _fail(e)
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
    storage_options: StorageOpt = None,
) -> None:
    """Accuracy and macro-F1 at every rank, kingdom to species, of a model's stored predictions."""
    from pzscale.evaluate import evaluate as run
    from pzscale.models import ModelCard

    try:
        table = run(catalog_url, ModelCard.load(model).id, split=split_name,
                    storage_options=_storage_options(storage_options))
    except PzscaleError as e:
        _fail(e)
    typer.echo(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


# ---- dedup commands (issue 5): insert below this line ----

# ---- env / abundance / export commands (issue 6): insert below this line ----

# ---- compare commands (issue 10): insert below this line ----

# ---- end of stage commands ----


@app.command("info")
def info_cmd(url: Annotated[str, typer.Argument(help="catalog URL")], storage_options: StorageOpt = None,
             as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """Rows, sources, label coverage, status counts and stages done per shard."""
    try:
        summary = info.summarize(url, storage_options=_storage_options(storage_options))
    except PzscaleError as e:
        _fail(e)
    typer.echo(json.dumps(summary, indent=1) if as_json else info.format_summary(summary))


@app.command()
def demo(
    out: Annotated[Path, typer.Argument(help="folder for the demo's inputs and catalog")] = Path("demo-output"),
    images: Annotated[int, typer.Option("--images", "-n")] = 6000,
    epochs: Annotated[int, typer.Option(help="training epochs of the demo model")] = 6,
    workers: WorkersOpt = None,
) -> None:
    """Synthesise a Planktonzilla collection and a cruise of raw IFCB bins, ingest both into one
    catalog on a local cluster and summarise it."""
    from pzscale.cluster import connect
    from pzscale.ingest import ingest as run
    from pzscale.synth import synth as make
    from pzscale.synth import synth_ifcb

    marker = out / ".pzscale-demo"
    if out.exists() and any(out.iterdir()) and not marker.exists():
        _fail(PzscaleError(f"{out} exists and is not a pzscale demo folder; choose another"))
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    marker.touch()
    parquet, url = out / "parquet", str(out / "catalog.zarr")
    truth = make(parquet, images=images, seed=0, rows_per_file=2000)
    bins = out / "ifcb"
    n_rois = max(100, images // 5)
    synth_ifcb(bins, images=n_rois, seed=0)
    typer.echo(f"synthesised {images} images in {parquet} and {n_rois} IFCB ROIs in raw bins under {bins}")
    from pzscale.classify import classify as run_classify
    from pzscale.evaluate import evaluate as run_evaluate
    from pzscale.split import assign_splits
    from pzscale.train import train as fit

    model_dir = out / "model"
    with connect(n_workers=workers) as client:
        report = run([str(parquet)], url, shard_len=1024, client=client)
        typer.echo(str(report))
        typer.echo("appending the IFCB cruise (native format) to the same catalog:")
        report = run([str(bins)], url, format="ifcb", source="demo_cruise_ifcb", append=True, client=client)
        typer.echo(str(report))
        typer.echo(info.format_summary(info.summarize(url)))
        counts = assign_splits(url, seed=42)
        typer.echo("\nsplit: " + ", ".join(f"{k or 'unlabelled'} {v:,}" for k, v in sorted(counts.items())))
        typer.echo(f"training the built-in CNN on the train split -> {model_dir}")
        card = fit(url, str(model_dir), epochs=epochs, log=lambda line: typer.echo("  " + line))
        typer.echo(str(run_classify(url, str(model_dir), client=client)))
    table = run_evaluate(url, card.id, split="test")
    typer.echo(f"\nmodel {card.id} on the held-out test split (macro-F1 per rank, Planktonzilla truncation):")
    typer.echo(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    grid = out / "sample_grid.png"
    _contact_sheet(url, grid)
    typer.echo(f"\nresults: catalog {url} (open with pzscale.open_catalog), model {model_dir}, sample images {grid}, "
               f"planted duplicates and corrupt rows {parquet / 'truth.json'} "
               f"({len(truth['duplicates'])} duplicates, {len(truth['corrupt'])} corrupt)")


def _contact_sheet(url: str, path: Path, n: int = 48) -> None:
    import numpy as np
    from PIL import Image

    from pzscale import images, open_catalog, read_images

    ds = open_catalog(url)
    ok = np.flatnonzero(ds["status"].values == "ok")[:n]
    tiles = [images.letterbox(p, 96)[0] for p in read_images(url, ok)]
    cols = 8
    sheet = np.full((96 * -(-len(tiles) // cols), 96 * cols, 3), 255, np.uint8)
    for i, t in enumerate(tiles):
        sheet[(i // cols) * 96 : (i // cols + 1) * 96, (i % cols) * 96 : (i % cols + 1) * 96] = t
    Image.fromarray(sheet).save(path)


if __name__ == "__main__":
    app()
