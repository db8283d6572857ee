"""Abundance per taxon, time bin and cell (counts checked against pandas, IFCB volumes and
concentrations, model predictions with a threshold), the map PNG, and the Darwin Core export."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from PIL import Image
from typer.testing import CliRunner

from pzscale import catalog, open_catalog
from pzscale.abundance import abundance, plot_map, taxon_names
from pzscale.classify import names as prediction_names
from pzscale.cli import app
from pzscale.dwc import COLUMNS, WORMS_LSID, export_dwc
from pzscale.errors import CatalogError, InputError
from pzscale.ml.models import ModelCard
from pzscale.schema import RANKS
from tests.conftest import parquet_and_ifcb_catalog

pytestmark = [pytest.mark.cluster]

MODEL = "fake-model-1"


def write_predictions(url: str, seed: int = 0) -> pd.DataFrame:
    """Store predictions of a model that picks one of the catalog's lineages per image, with
    probabilities that shrink at deeper ranks (as summed class probabilities do); returns them."""
    card = ModelCard(name="fake-model", version="1", kind="builtin", architecture="none", embed_dim=8,
                     image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert prediction_names(card)["label"] == f"pred__{MODEL}__label"  # the naming contract of classify
    n = prediction_names(card)
    group = catalog.open_group(url, mode="r+")
    rows = catalog.n_rows_of(group)
    cols = catalog.read_rows(group, 0, rows, ["lineage", "status"])
    classes = sorted(set(cols["lineage"].tolist()) - {""})
    rng = np.random.default_rng(seed)
    label = np.array(classes, dtype=object)[rng.integers(0, len(classes), rows)]
    prob = rng.uniform(0.2, 1.0, rows).astype(np.float32)
    ok = cols["status"] == "ok"
    out = {n["label"]: np.where(ok, label, ""), n["prob"]: np.where(ok, prob, np.nan).astype(np.float32)}
    for depth, rank in enumerate(RANKS, start=1):
        prefix = np.array([" ".join(text.split()[:depth]) for text in label], dtype=object)
        rank_prob = np.minimum(1.0, prob + 0.1 * (len(RANKS) - depth)).astype(np.float32)
        out[n[rank]] = np.where(ok, prefix, "")
        out[n[f"{rank}_prob"]] = np.where(ok, rank_prob, np.nan).astype(np.float32)
    for name, values in out.items():
        catalog.ensure_array(group, name, dtype="str" if values.dtype == object else "float32",
                             fill="" if values.dtype == object else np.nan)
    shard_len = catalog.metadata(group)["shard_len"]
    for _, start, stop in catalog.shard_ranges(0, rows, shard_len):
        catalog.write_arrays(group, start, stop, {k: v[start:stop] for k, v in out.items()})
    return pd.DataFrame({k.split("__")[-1]: v for k, v in out.items()})


@pytest.fixture(scope="module")
def predicted(client, tmp_path_factory):
    """400 synthetic images plus a 4-bin IFCB cruise (volumes known), with a model's predictions."""
    url = parquet_and_ifcb_catalog(tmp_path_factory.mktemp("abundance"), client, images=400, seed=5,
                                   ifcb_images=240, rois_per_bin=60)
    return url, write_predictions(url)


@pytest.fixture(scope="module")
def genus_counts(predicted, tmp_path_factory):
    """Genus counts from the annotations in 10-degree cells and months, also written to Zarr."""
    out = str(tmp_path_factory.mktemp("counts") / "abundance.zarr")
    return abundance(predicted[0], rank="genus", cell_deg=10.0, time_bin="1MS", out=out), out


def catalog_frame(url: str) -> pd.DataFrame:
    ds = open_catalog(url)
    keep = ["image_id", "lat", "lon", "time", "status", "volume_analysed", *RANKS, "aphia_id", "depth_min",
            "depth_max", "source", "annotation_status"]
    return ds[keep].to_dataframe().reset_index(drop=True)


def test_counts_match_a_pandas_groupby_and_round_trip_through_zarr(predicted, genus_counts):
    url, _ = predicted
    ds, out = genus_counts
    frame = catalog_frame(url)
    frame = frame[(frame["status"] == "ok") & (frame["genus"] != "") & frame["lat"].notna() & frame["time"].notna()]
    frame = frame.assign(lat_cell=np.floor(frame["lat"] / 10) * 10 + 5, lon_cell=np.floor(frame["lon"] / 10) * 10 + 5,
                         month=frame["time"].dt.to_period("M").dt.to_timestamp())
    expected = frame.groupby(["genus", "month", "lat_cell", "lon_cell"]).size()
    assert int(ds["count"].sum()) == len(frame) == ds.attrs["images_counted"] > 50
    got = ds["count"].sel({dim: xr.DataArray(expected.index.get_level_values(i).to_numpy(), dims="cell")
                           for i, dim in enumerate(("taxon", "time", "lat", "lon"))})
    np.testing.assert_array_equal(got.values, expected.values)
    assert sorted(ds["taxon"].values.tolist()) == sorted(frame["genus"].unique().tolist())
    assert ds["count"].dims == ("taxon", "time", "lat", "lon")
    stored = xr.open_zarr(out, consolidated=False).load()
    xr.testing.assert_equal(stored["count"], ds["count"])
    assert stored.attrs["rank"] == "genus" and stored.attrs["taxonomy"] == "annotations"
    assert np.isnan(ds["concentration"]).all()  # no annotated image of the cruise: no volume counted


def test_volumes_once_per_sample_and_concentrations_with_predictions(predicted):
    url, predictions = predicted
    ds = abundance(url, rank="genus", model=MODEL, min_prob=0.5, cell_deg=1.0, time_bin="1MS")
    frame = catalog_frame(url).assign(pred_genus=taxon_names(predictions["genus"].to_numpy(), 1),
                                      pred_genus_full=taxon_names(predictions["genus"].to_numpy(), 6),
                                      prob=predictions["genus_prob"].to_numpy())
    counted = frame[(frame["status"] == "ok") & (frame["pred_genus_full"] != "") & (frame["prob"] >= 0.5)
                    & frame["lat"].notna() & frame["time"].notna()]
    assert int(ds["count"].sum()) == len(counted) and ds.attrs["taxonomy"] == f"model {MODEL}"
    cruise = frame[frame["volume_analysed"] > 0].copy()
    cruise["bin"] = cruise["image_id"].str.rsplit("_", n=1).str[0]
    bins = cruise.groupby("bin").agg(volume=("volume_analysed", "first"), time=("time", "first"),
                                     lat=("lat", "first"), lon=("lon", "first"))
    assert len(bins) == 4 and ds.attrs["samples_with_volume"] == 4
    bins["month"] = bins["time"].dt.to_period("M").dt.to_timestamp()
    per_cell = bins.groupby(["month", np.floor(bins["lat"]) + 0.5, np.floor(bins["lon"]) + 0.5])["volume"].sum()
    for (month, lat, lon), volume in per_cell.items():
        cell = ds.sel(time=month, lat=lat, lon=lon)
        assert float(cell["volume_ml"]) == pytest.approx(volume, rel=1e-6)  # each bin once, not once per image
        in_cell = counted[counted["volume_analysed"].notna() & (counted["time"].dt.to_period("M").dt.to_timestamp()
                                                                == month)]
        in_cell = in_cell[(np.floor(in_cell["lat"]) + 0.5 == lat) & (np.floor(in_cell["lon"]) + 0.5 == lon)]
        by_taxon = in_cell.groupby("pred_genus").size()
        np.testing.assert_array_equal(cell["count_volumetric"].sel(taxon=by_taxon.index).values, by_taxon.values)
        np.testing.assert_allclose(cell["concentration"].sel(taxon=by_taxon.index).values,
                                   by_taxon.values / volume * 1000, rtol=1e-5)
    assert float(ds["volume_ml"].sum()) == pytest.approx(bins["volume"].sum(), rel=1e-6)
    assert np.isnan(ds["concentration"].where(ds["volume_ml"] == 0)).all()


def test_map_png_for_all_taxa_and_one(genus_counts, tmp_path):
    ds, _ = genus_counts
    total = plot_map(ds, tmp_path / "all.png")
    one = plot_map(ds, tmp_path / "one.png", taxon=str(ds["taxon"].values[0]), time=str(ds["time"].values[0])[:10])
    for path in (total, one):
        with Image.open(path) as img:
            assert img.format == "PNG" and img.width > 400 and img.height > 200
            assert len(np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0)) > 20  # a map, not blank
    with pytest.raises(InputError, match="taxon 'nope'"):
        plot_map(ds, tmp_path / "x.png", taxon="nope")


def test_errors_name_the_problem(predicted):
    url, _ = predicted
    with pytest.raises(CatalogError, match=rf"no predictions .*{MODEL}"):
        abundance(url, model="other-model-3")
    with pytest.raises(InputError, match="rank must be one of"):
        abundance(url, rank="tribe")
    with pytest.raises(InputError, match="no image with a taxon at rank 'species'"):
        abundance(url, rank="species")  # the synthetic taxa stop at genus
    with pytest.raises(InputError, match="pandas frequency"):
        abundance(url, time_bin="fortnightly")
    with pytest.raises(CatalogError, match=f"models with predictions here: \\['{MODEL}'\\]"):
        export_dwc(url, "/dev/null", model="other-model-3")


def test_darwin_core_from_the_annotations(predicted, tmp_path):
    url, _ = predicted
    out = tmp_path / "occurrence.csv"
    result = export_dwc(url, str(out))
    csv = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert tuple(csv.columns) == COLUMNS
    frame = catalog_frame(url)
    annotated = frame[(frame["status"] == "ok") & (frame[list(RANKS)] != "").any(axis=1)]
    assert result["rows"] == len(csv) == len(annotated) > 100
    assert not (out.parent / "occurrence.csv.parts").exists()
    merged = csv.merge(annotated, left_on="occurrenceID", right_on="image_id", validate="one_to_one",
                       suffixes=("", "_catalog"))
    assert (merged["basisOfRecord"] == "MachineObservation").all()
    with_aphia = merged["aphia_id"] > 0
    assert (merged.loc[with_aphia, "scientificNameID"] == WORMS_LSID + merged.loc[with_aphia, "aphia_id"]
            .astype(str)).all()
    assert (merged.loc[~with_aphia, "scientificNameID"] == "").all()
    genus_rows = merged["genus_catalog"] != ""
    assert (merged.loc[genus_rows, "scientificName"] == merged.loc[genus_rows, "genus_catalog"].str.capitalize()).all()
    assert (merged["kingdom"] == merged["kingdom_catalog"].str.capitalize()).all()
    assert (merged.loc[genus_rows, "taxonRank"] == "genus").all()
    located = merged["lat"].notna()
    np.testing.assert_allclose(merged.loc[located, "decimalLatitude"].astype(float), merged.loc[located, "lat"])
    assert (merged.loc[~located, "decimalLatitude"] == "").all()
    timed = merged["time"].notna()
    assert (merged.loc[timed, "eventDate"] == merged.loc[timed, "time"].dt.strftime("%Y-%m-%dT%H:%M:%SZ")).all()
    np.testing.assert_allclose(merged.loc[timed, "maximumDepthInMeters"].replace("", "nan").astype(float),
                               merged.loc[timed, "depth_max"], rtol=1e-6)
    assert (merged["identifiedBy"] == "").all() and (merged["identificationConfidence"] == "").all()


def test_darwin_core_from_predictions_falls_back_to_a_confident_rank(predicted, tmp_path):
    url, predictions = predicted
    out = tmp_path / "predicted.csv"
    result = export_dwc(url, str(out), model=MODEL, min_prob=0.75)
    csv = pd.read_csv(out, dtype=str, keep_default_na=False)
    frame = catalog_frame(url).assign(label=predictions["label"], prob=predictions["prob"])
    # every ok image has a confident rank: kingdom gets prob + 0.6 >= 0.8
    assert result["rows"] == len(csv) == int((frame["status"] == "ok").sum())
    merged = csv.merge(frame, left_on="occurrenceID", right_on="image_id", validate="one_to_one",
                       suffixes=("", "_catalog"))
    confidence = merged["identificationConfidence"].astype(float)
    assert (confidence >= 0.75).all() and (merged["identificationVerificationStatus"] == "PredictedByMachine").all()
    assert (merged["identifiedBy"] == f"pzscale model {MODEL}").all()
    # confident at genus (prob + 0.1 >= 0.75): the predicted class's genus and its AphiaID
    sure = (merged["prob"] + 0.1 >= 0.75) & merged["label"].str.contains("chaetoceros")
    assert sure.any()
    assert (merged.loc[sure, "scientificName"] == "Chaetoceros").all()
    assert (merged.loc[sure, "scientificNameID"] == WORMS_LSID + "148985").all()
    # not confident below the phylum: named at a coarser rank, without the class's AphiaID
    unsure = (merged["prob"] + 0.4 < 0.75) & merged["label"].str.startswith("chromista heterokontophyta")
    assert unsure.any()
    assert set(merged.loc[unsure, "taxonRank"]) <= {"kingdom", "phylum", "class"}
    assert (merged.loc[unsure, "scientificNameID"] == "").all()
    remark = merged["identificationRemarks"].iloc[0]
    assert remark.endswith(f"by model {MODEL}") and "predicted with probability" in remark


def test_cli_abundance_and_export(predicted, client, tmp_path):
    url, _ = predicted
    runner = CliRunner()
    png, store = tmp_path / "map.png", str(tmp_path / "ab.zarr")
    result = runner.invoke(app, ["abundance", "--catalog", url, "--out", store, "--rank", "genus", "--cell", "5",
                                 "--png", str(png), "--model", MODEL, "--min-prob", "0.3",
                                 "--scheduler", client.scheduler.address])
    assert result.exit_code == 0, result.output
    assert png.exists() and "taxa at rank genus" in result.output
    assert xr.open_zarr(store, consolidated=False).attrs["taxonomy"] == f"model {MODEL}"
    csv = tmp_path / "occ.csv"
    result = runner.invoke(app, ["export", "dwc", "--catalog", url, "--out", str(csv),
                                 "--scheduler", client.scheduler.address])
    assert result.exit_code == 0, result.output
    assert f"occurrences to {csv}" in result.output
    assert pd.read_csv(csv).shape[1] == len(COLUMNS)
    bad = runner.invoke(app, ["abundance", "--catalog", url, "--rank", "tribe", "--scheduler",
                              client.scheduler.address])
    assert bad.exit_code == 1 and "rank must be one of" in bad.output
