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
) -> None:
    """Write synthetic Planktonzilla-format parquet shards with planted duplicates and corrupt rows."""
    from pzscale.synth import synth as make

    truth = make(out, images=images, seed=seed, rows_per_file=rows_per_file)
    typer.echo(f"wrote {images} rows to {out} ({len(truth['duplicates'])} planted duplicates, "
               f"{len(truth['corrupt'])} corrupt rows; ground truth in {out / 'truth.json'})")


@app.command()
def ingest(
    sources: Annotated[list[str], typer.Argument(help="parquet files, folders or globs")],
    catalog_url: CatalogOpt,
    shard_len: Annotated[int | None, typer.Option(help="rows per shard (new catalogs; default 16384)")] = None,
    append: Annotated[bool, typer.Option(help="add these sources to an existing catalog")] = False,
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
    storage_options: StorageOpt = None,
) -> None:
    """Ingest Planktonzilla parquet shards into a catalog (resumable: rerun to continue)."""
    from pzscale.cluster import connect
    from pzscale.ingest import ingest as run

    so = _storage_options(storage_options)
    try:
        catalog.check_url(catalog_url)
        with connect(scheduler, n_workers=workers) as client:
            report = run(sources, catalog_url, shard_len=shard_len, append=append, client=client,
                         storage_options=so)
    except PzscaleError as e:
        _fail(e)
    typer.echo(str(report))


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
    workers: WorkersOpt = None,
) -> None:
    """Synthesise a small Planktonzilla collection, ingest it on a local cluster and summarise it."""
    from pzscale.cluster import connect
    from pzscale.ingest import ingest as run
    from pzscale.synth import synth as make

    marker = out / ".pzscale-demo"
    if out.exists() and any(out.iterdir()) and not marker.exists():
        _fail(PzscaleError(f"{out} exists and is not a pzscale demo folder; choose another"))
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    marker.touch()
    parquet, url = out / "parquet", str(out / "catalog.zarr")
    truth = make(parquet, images=images, seed=0, rows_per_file=2000)
    typer.echo(f"synthesised {images} images in {parquet}")
    with connect(n_workers=workers) as client:
        report = run([str(parquet)], url, shard_len=1024, client=client)
    typer.echo(str(report))
    typer.echo(info.format_summary(info.summarize(url)))
    grid = out / "sample_grid.png"
    _contact_sheet(url, grid)
    typer.echo(f"\nresults: catalog {url} (open with pzscale.open_catalog), sample images {grid}, "
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
