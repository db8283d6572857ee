"""The demo: the main job on a built-in default, end to end on a local cluster (what ``make demo`` runs).

Synthesises a Planktonzilla collection and a cruise of raw IFCB bins, ingests both into one
catalog, splits, trains and classifies, deduplicates, joins with an ocean grid and maps abundance.
Wiring only: every step is a stage's public function.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from pzscale import grids, info, open_catalog, read_images
from pzscale.abundance import abundance as run_abundance
from pzscale.abundance import plot_map
from pzscale.classify import classify as run_classify
from pzscale.cluster import connect
from pzscale.dedup import dedup as run_dedup
from pzscale.env import env as run_env
from pzscale.errors import InputError
from pzscale.evaluate import evaluate as run_evaluate
from pzscale.images import letterbox
from pzscale.ingest import ingest as run
from pzscale.split import assign_splits
from pzscale.synth import synth as make
from pzscale.synth import synth_ifcb
from pzscale.train import train as fit


def run_demo(out: str | Path = "demo-output", *, images: int = 6000, epochs: int = 6, workers: int | None = None,
             echo: Callable[[str], object] = print) -> None:
    """Run the demo into ``out`` (refused if it holds anything but an earlier demo), printing with ``echo``."""
    out = Path(out)
    marker = out / ".pzscale-demo"
    if out.exists() and any(out.iterdir()) and not marker.exists():
        raise InputError(f"{out} exists and is not a pzscale demo folder; choose another")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    marker.touch()
    parquet, url = out / "parquet", str(out / "catalog.zarr")
    truth = make(parquet, images=images, seed=0, rows_per_file=2000)
    bins = out / "ifcb"
    n_rois = max(100, images // 5)
    synth_ifcb(bins, images=n_rois, seed=0)
    echo(f"synthesised {images} images in {parquet} and {n_rois} IFCB ROIs in raw bins under {bins}")
    model_dir = out / "model"
    with connect(n_workers=workers) as client:
        report = run([str(parquet)], url, shard_len=1024, client=client)
        echo(str(report))
        echo("appending the IFCB cruise (native format) to the same catalog:")
        report = run([str(bins)], url, format="ifcb", source="demo_cruise_ifcb", append=True, client=client)
        echo(str(report))
        echo(info.format_summary(info.summarize(url)))
        counts = assign_splits(url, seed=42)
        echo("\nsplit: " + ", ".join(f"{k or 'unlabelled'} {v:,}" for k, v in sorted(counts.items())))
        echo(f"training the built-in CNN on the train split -> {model_dir}")
        card = fit(url, str(model_dir), epochs=epochs, log=lambda line: echo("  " + line))
        echo(str(run_classify(url, str(model_dir), client=client)))
        echo("\nduplicates (exact pixels, perceptual hash) within and across sources:")
        echo(str(run_dedup(url, methods=("exact", "near"), client=client)))
        env_grid = out / "ocean_grid.nc"
        grids.synthetic_grid(env_grid, resolution=2.0, climatology=True)
        echo(f"\njoining each image with the ocean grid {env_grid} (synthetic monthly climatology):")
        echo(str(run_env(url, str(env_grid), ["temperature=thetao", "salinity=so", "chl=chlor_a"],
                         options=grids.JoinOptions(land_fill_km=100), client=client)))
        counts = run_abundance(url, rank="genus", cell_deg=10, out=str(out / "abundance.zarr"))
        abundance_png = plot_map(counts, out / "abundance.png")
    table = run_evaluate(url, card.id, split="test")
    echo(f"\nmodel {card.id} on the held-out test split (macro-F1 per rank, Planktonzilla truncation):")
    echo(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    grid = out / "sample_grid.png"
    _contact_sheet(url, grid)
    echo(f"\nresults: catalog {url} (open with pzscale.open_catalog), model {model_dir}, sample images {grid}, "
         f"abundance {out / 'abundance.zarr'} and map {abundance_png}, "
         f"planted duplicates and corrupt rows {parquet / 'truth.json'} "
         f"({len(truth['duplicates'])} duplicates, {len(truth['corrupt'])} corrupt)")


def _contact_sheet(url: str, path: Path, n: int = 48) -> None:
    ds = open_catalog(url)
    ok = np.flatnonzero(ds["status"].values == "ok")[:n]
    tiles = [letterbox(p, 96)[0] for p in read_images(url, ok)]
    cols = 8
    sheet = np.full((96 * -(-len(tiles) // cols), 96 * cols, 3), 255, np.uint8)
    for i, t in enumerate(tiles):
        sheet[(i // cols) * 96 : (i // cols + 1) * 96, (i % cols) * 96 : (i % cols + 1) * 96] = t
    Image.fromarray(sheet).save(path)


