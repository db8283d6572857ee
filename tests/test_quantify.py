"""pzscale quantify on a real cluster: a catalog of synthetic Planktonzilla rows and an IFCB cruise (volumes known),
with the stored predictions of a classifier of known errors (each image called its own taxon 75% of the time and
the next taxon otherwise, posteriors exact for the validation priors), so that what each method should give per
group is known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from typer.testing import CliRunner

from pzscale import catalog, open_catalog
from pzscale.classify import names, predictions
from pzscale.cli import app
from pzscale.errors import CatalogError, InputError
from pzscale.ml.labels import TARGET_COLUMNS, targets
from pzscale.ml.models import ModelCard
from pzscale.quantify import COLUMNS, quantify
from pzscale.schema import TIME_FILL
from pzscale.split import assign_splits
from tests.conftest import parquet_and_ifcb_catalog

pytestmark = [pytest.mark.cluster]

RIGHT = 0.75  # P(called its own taxon); otherwise the next one


def store_predictions(url: str, seed: int = 0) -> ModelCard:
    group = catalog.open_group(url, mode="r+")
    rows = catalog.n_rows_of(group)
    cols = catalog.read_rows(group, 0, rows, list(TARGET_COLUMNS))
    truth = targets(cols)
    classes = sorted(set(truth.tolist()) - {""})
    card = ModelCard(name="errs", version="1", kind="builtin", architecture="none", embed_dim=8, image_size=32,
                     mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), classes=classes)
    c = len(classes)
    rates = RIGHT * np.eye(c) + (1 - RIGHT) * np.roll(np.eye(c), 1, axis=1)
    code = {t: i for i, t in enumerate(classes)}
    labelled = np.array([code.get(t, -1) for t in truth])
    priors = np.bincount(labelled[labelled >= 0], minlength=c) / (labelled >= 0).sum()
    rng = np.random.default_rng(seed)
    true = np.where(labelled >= 0, labelled, rng.choice(c, rows, p=priors))  # the cruise's images: unlabelled
    called = np.where(rng.random(rows) < RIGHT, true, (true + 1) % c)
    posteriors = priors[:, None] * rates  # P(true, called): column j / its sum = P(true | called j)
    probs = (posteriors / posteriors.sum(0))[:, called].T
    out = predictions(probs, classes, top_k=3)
    ok = cols["status"] == "ok"
    n = names(card)
    for key, values in out.items():
        text = values.dtype == object
        trailing, dims = ((3,), (n["k"],)) if key.startswith("topk") else ((), ())
        values = np.where(ok.reshape(-1, *([1] * len(trailing))), values, "" if text else np.nan)
        out[key] = values if text else values.astype(np.float32)
        catalog.ensure_array(group, n[key], dtype="str" if text else "float32", fill="" if text else np.nan,
                             trailing=trailing, dims=dims)
    shard_len = catalog.metadata(group)["shard_len"]
    for _, start, stop in catalog.shard_ranges(0, rows, shard_len):
        catalog.write_arrays(group, start, stop, {n[k]: v[start:stop] for k, v in out.items()})
    return card


@pytest.fixture(scope="module")
def predicted(client, tmp_path_factory):
    work = tmp_path_factory.mktemp("quantify")
    url = parquet_and_ifcb_catalog(work, client, images=1200, seed=11, ifcb_images=240, rois_per_bin=40)
    assign_splits(url, seed=1)
    card = store_predictions(url)
    model_dir = work / "model"
    card.save(model_dir)
    return url, card, model_dir


def test_each_taxon_alone_is_found_alone_by_the_corrected_methods(predicted, client, tmp_path):
    """Grouped by the source's own label, every group is one taxon: counting finds 75% of it and 25% of its
    neighbour; the corrected methods give the neighbour's share back."""
    url, card, _ = predicted
    table = quantify(url, card.id, card.classes, "original_label", rounds=50, client=client,
                     out_csv=str(tmp_path / "q.csv"), out_zarr=str(tmp_path / "q.zarr"))
    assert list(table.columns) == ["original_label", *COLUMNS]
    ds = open_catalog(url)
    truth = pd.Series(targets({c: ds[c].values for c in TARGET_COLUMNS}), index=ds["original_label"].values)
    checked = 0
    for label, rows in table[table["original_label"] != ""].groupby("original_label"):
        taxon = truth.loc[label].iloc[0] if isinstance(truth.loc[label], pd.Series) else truth.loc[label]
        if not taxon:
            continue
        share = rows.set_index(["method", "taxon"])["proportion"]
        assert 0.6 < share["cc", taxon] < 0.9, (label, share["cc"])
        for method in ("acc", "pacc", "em"):
            assert share[method, taxon] > 0.93, (label, method, share[method])
        checked += 1
    assert checked >= 6
    assert (table["ci_low"] <= table["ci_high"]).all()
    # a percentile interval need not hold its point estimate (at the edges of the simplex it often does not)
    inside = (table["ci_low"] - 1e-3 <= table["proportion"]) & (table["proportion"] <= table["ci_high"] + 1e-3)
    assert inside.mean() > 0.9
    np.testing.assert_allclose(table["count"], table["proportion"] * table["images"])
    assert (table.groupby(["original_label", "method"])["proportion"].sum() - 1).abs().max() < 1e-6
    # unknown (below 0.5) is a bin of cc only
    assert set(table.loc[table["taxon"] == "unknown", "method"]) <= {"cc"}
    written = pd.read_csv(tmp_path / "q.csv", keep_default_na=False)
    assert list(written.columns) == list(table.columns) and len(written) == len(table)
    zarr = xr.open_zarr(str(tmp_path / "q.zarr"), consolidated=False)
    assert set(zarr["proportion"].dims) == {"original_label", "taxon", "method"}
    assert zarr.sizes["method"] == 5 and zarr["images"].dims == ("original_label",)


def test_concentrations_per_litre_from_the_ifcb_bins(predicted, client):
    url, card, _ = predicted
    table = quantify(url, card.id, card.classes, "sample", methods=("cc", "acc"), rounds=0, client=client)
    ds = open_catalog(url)[["sample", "volume_analysed", "status"]].to_dataframe()
    bins = ds[ds["sample"] != ""].groupby("sample")["volume_analysed"].first() / 1000
    assert len(bins) == 6
    assert set(cruise_qc := table.loc[table["sample"].isin(bins.index), "volume_qc"]) == {"ok"}, cruise_qc
    cruise = table[table["sample"].isin(bins.index)]
    np.testing.assert_allclose(cruise["volume_l"], bins.loc[cruise["sample"]].to_numpy())
    np.testing.assert_allclose(cruise["concentration_per_l"], cruise["count"] / cruise["volume_l"])
    assert cruise["ci_low"].isna().all()  # no bootstrap asked
    # the parquet rows have no sample (''): one group, volume unknown
    assert table.loc[table["sample"] == "", "volume_l"].isna().all()


def test_time_bins_and_the_cli(predicted, client, tmp_path):
    url, card, model_dir = predicted
    out = tmp_path / "by_month.csv"
    result = CliRunner().invoke(app, ["quantify", "--catalog", url, "--model", str(model_dir), "--by", "time",
                                      "--bin", "MS", "--rank", "phylum", "--method", "cc,acc", "--rounds", "20",
                                      "--out", str(out), "--scheduler", client.scheduler.address])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out, keep_default_na=False)
    months = pd.to_datetime(table["time"])
    assert (months.dt.day == 1).all() and months.nunique() > 12
    phyla = {" ".join(c.split()[:2]) for c in card.classes}
    assert set(table["taxon"]) <= phyla | {"unknown"}


def test_bad_requests_fail_before_any_work(predicted, client, tmp_path):
    url, card, model_dir = predicted
    with pytest.raises(InputError, match="choose from"):
        quantify(url, card.id, card.classes, "source", methods=("cc", "hdy"), client=client)
    with pytest.raises(InputError, match="no variable 'station'"):
        quantify(url, card.id, card.classes, "station", client=client)
    with pytest.raises(CatalogError, match="no labelled image of split 'holdout'"):
        quantify(url, card.id, card.classes, "source", validation_split="holdout", client=client)
    with pytest.raises(InputError, match="rank 'tribe'"):
        quantify(url, card.id, card.classes, "source", rank="tribe", client=client)
    bad = CliRunner().invoke(app, ["quantify", "--catalog", url, "--model", str(tmp_path / "none"), "--by", "source",
                                   "--out", str(tmp_path / "x.csv"), "--scheduler", client.scheduler.address])
    assert bad.exit_code == 1 and "model" in bad.output and "Traceback" not in bad.output


def test_evaluate_by_group_scores_each_method_against_the_true_composition(predicted, client):
    """Per source label (one taxon each) in the test split: counting misses a quarter of each group, the
    corrected methods far less; the CLI prints the same table."""
    from pzscale.evaluate import evaluate_by

    url, card, model_dir = predicted
    table = evaluate_by(url, card.id, card.classes, "original_label", client=client)
    assert list(table.columns) == ["original_label", "method", "images", "absolute_error", "bray_curtis", "macro_f1"]
    mean = table[table["original_label"] == "mean"].set_index("method")
    assert set(mean.index) == {"cc", "pcc", "acc", "pacc", "em"}
    assert mean.loc["cc", "bray_curtis"] > 0.2  # a quarter called the next taxon, some below 0.5 (unknown)
    for method in ("acc", "pacc", "em"):
        assert mean.loc[method, "bray_curtis"] < 0.5 * mean.loc["cc", "bray_curtis"], mean
    groups = table[table["original_label"] != "mean"]
    assert (groups.groupby("original_label")["macro_f1"].nunique() == 1).all()  # one F1 per group, beside each
    printed = CliRunner().invoke(app, ["evaluate", "--catalog", url, "--model", str(model_dir), "--by",
                                       "original_label", "--method", "cc,acc", "--scheduler",
                                       client.scheduler.address])
    assert printed.exit_code == 0, printed.output
    assert "bray_curtis" in printed.output and "mean" in printed.output


def test_suspect_volumes_keep_their_samples_out_of_concentrations(predicted, client, tmp_path):
    """One bin's volume 10x too large (as pyifcb#70 found) is an outlier of its cruise; another's flagged by its
    reader: neither gets a concentration unless asked, the other bins keep theirs."""
    import shutil

    source_url, card, _ = predicted
    url = str(tmp_path / "cat.zarr")
    shutil.copytree(source_url, url)
    group = catalog.open_group(url, mode="r+")
    cols = catalog.read_rows(group, 0, catalog.n_rows_of(group), ["sample", "volume_analysed", "qc"])
    bins = sorted(set(cols["sample"].tolist()) - {""})
    volume, qc = cols["volume_analysed"].copy(), cols["qc"].copy()
    volume[cols["sample"] == bins[0]] *= 10
    qc[cols["sample"] == bins[1]] = "volume_implausible"
    shard_len = catalog.metadata(group)["shard_len"]
    for _, start, stop in catalog.shard_ranges(0, len(qc), shard_len):
        catalog.write_arrays(group, start, stop, {"volume_analysed": volume[start:stop], "qc": qc[start:stop]})
    table = quantify(url, card.id, card.classes, "sample", methods=("cc",), rounds=0, client=client)
    per_bin = table[table["sample"].isin(bins)].drop_duplicates("sample").set_index("sample")
    assert per_bin.loc[bins[0], "volume_qc"] == per_bin.loc[bins[1], "volume_qc"] == "suspect"
    assert per_bin.loc[bins[:2], "volume_l"].isna().all()
    assert (per_bin.loc[bins[2:], "volume_qc"] == "ok").all() and per_bin.loc[bins[2:], "volume_l"].notna().all()
    kept = quantify(url, card.id, card.classes, "sample", methods=("cc",), rounds=0, keep_suspect_volumes=True,
                    client=client).drop_duplicates("sample").set_index("sample")
    assert kept.loc[bins[0], "volume_l"] == pytest.approx(10 * per_bin.loc[bins[2:], "volume_l"].median(), rel=0.2)
    assert kept.loc[bins[0], "volume_qc"] == "suspect"
    # abundance checks the same volumes: the suspect bins add no volume and no volumetric image
    from pzscale.abundance import abundance

    cells = {keep: abundance(url, rank="lineage", model=card.id, cell_deg=90.0, time_bin="1YS",
                             keep_suspect_volumes=keep, client=client) for keep in (False, True)}
    frame = pd.DataFrame({"sample": cols["sample"], "ml": volume}).drop_duplicates("sample").set_index("sample")
    assert cells[False].attrs["samples_with_suspect_volume"] == 2 and cells[False].attrs["samples_with_volume"] == 4
    assert float(cells[False]["volume_ml"].sum()) == pytest.approx(frame.loc[bins[2:], "ml"].sum(), rel=1e-6)
    assert float(cells[True]["volume_ml"].sum()) == pytest.approx(frame.loc[bins, "ml"].sum(), rel=1e-6)
    in_bins = cols["sample"] != ""
    assert int(cells[True]["count_volumetric"].sum()) > int(cells[False]["count_volumetric"].sum()) > 0
    assert int(cells[True]["count_volumetric"].sum()) <= int(in_bins.sum())


def test_drift_ranks_first_the_group_whose_images_lie_far_from_the_training_images(predicted, client, tmp_path):
    """Embeddings: each taxon a cluster, the IFCB cruise's images moved off every cluster: it comes first, with
    most of its images beyond the validation images' 95th percentile; the CLI writes the same ranking."""
    import shutil

    from pzscale.quantify import drift

    source_url, card, model_dir = predicted
    url = str(tmp_path / "cat.zarr")
    shutil.copytree(source_url, url)
    group = catalog.open_group(url, mode="r+")
    rows = catalog.n_rows_of(group)
    cols = catalog.read_rows(group, 0, rows, ["source", "lineage", "proposed_label", "original_label", "status"])
    truth = targets(cols)
    taxa = sorted(set(truth.tolist()) - {""})
    rng = np.random.default_rng(0)
    centre = rng.normal(size=(len(taxa) + 1, 16))
    code = np.array([taxa.index(t) if t else rng.integers(len(taxa)) for t in truth])
    vectors = centre[code] + 0.3 * rng.normal(size=(rows, 16))
    cruise = cols["source"] == "cruise_ifcb"
    vectors[cruise] = centre[-1] + 0.3 * rng.normal(size=(int(cruise.sum()), 16))  # a kind never trained on
    name = f"emb__{card.id}"
    catalog.ensure_array(group, name, dtype="float16", fill=np.nan, trailing=(16,), dims=(f"{card.id}__dim",))
    shard_len = catalog.metadata(group)["shard_len"]
    for _, start, stop in catalog.shard_ranges(0, rows, shard_len):
        catalog.write_arrays(group, start, stop, {name: vectors[start:stop].astype(np.float16)})

    table = drift(url, card.id, "source", client=client)
    assert list(table.columns) == ["source", "images", "low_confidence_share", "knn_distance_median",
                                   "out_of_distribution_share", "drift_score"]
    assert table["source"].iloc[0] == "cruise_ifcb" and table["out_of_distribution_share"].iloc[0] > 0.9
    others = table[table["source"] != "cruise_ifcb"]
    assert (others["out_of_distribution_share"] < 0.15).all()
    assert table["drift_score"].is_monotonic_decreasing
    out = tmp_path / "drift.csv"
    result = CliRunner().invoke(app, ["drift", "--catalog", url, "--model", str(model_dir), "--by", "source",
                                      "--out", str(out), "--scheduler", client.scheduler.address])
    assert result.exit_code == 0, result.output
    assert pd.read_csv(out)["source"].tolist() == table["source"].tolist()
    with pytest.raises(CatalogError, match="no emb__nothing"):
        drift(url, card.id, "source", embedding="nothing", client=client)


def test_abundance_corrects_each_cell_as_quantify_would_and_tells_zero_from_no_data(predicted, client, tmp_path):
    """``abundance --correct`` gathers each cell's sums per shard; the corrected counts must equal the estimators
    run on the cell's images at once. Cells without identified images are no data (NaN), the others hold zeros."""
    from pzscale.abundance import abundance, plot_map
    from pzscale.ml import quantification as q

    url, card, model_dir = predicted
    found = {m: abundance(url, rank="lineage", model=card.id, classes=card.classes, min_prob=0.5, cell_deg=60.0,
                          time_bin="1YS", correct=m, client=client) for m in ("acc", "pacc")}
    cat = q.Catalog.open(url)
    data = q.read_predictions(cat, card.id, card.classes, extra=("lat", "lon", "time", "volume_analysed"),
                              client=client)
    val = q.validation_predictions(cat, card.id, card.classes, None, "val", ("acc", "pacc"), 0.5, client=client)
    ds = found["acc"]
    lon = (data["lon"] + 180.0) % 360.0 - 180.0
    cells = pd.DataFrame({"year": pd.to_datetime(data["time"], unit="ms").year, "lat": np.floor(data["lat"] / 60) * 60
                          + 30, "lon": np.floor(lon / 60) * 60 + 30, "volumetric": data["volume_analysed"] > 0})
    cells = cells[(data["time"] != TIME_FILL) & np.isfinite(data["lat"]) & np.isfinite(lon)]
    n = len(card.classes)
    checked = 0
    for (year, lat, lon_centre), rows in cells.groupby(["year", "lat", "lon"]).indices.items():
        rows = cells.index.to_numpy()[rows]
        group = q.predictions_of(data, n, 0.5, rows)
        expected = q.composition(("acc", "pacc"), group, n, val)
        for method, result in found.items():
            cell = result.sel(time=f"{int(year)}-01-01", lat=lat, lon=lon_centre)
            assert int(cell["images"]) == len(rows)
            np.testing.assert_allclose(cell["count_corrected"].sel(taxon=card.classes).values,
                                       expected[method][:n] * len(rows), rtol=1e-4, atol=1e-3)
            if float(cell["volume_ml"]) > 0:  # per litre: the cell's images with a volume, in the same mix
                np.testing.assert_allclose(cell["concentration_corrected"].sel(taxon=card.classes).values,
                                           expected[method][:n] * cells["volumetric"].loc[rows].sum()
                                           / float(cell["volume_ml"]) * 1000, rtol=1e-4, atol=1e-3)
                checked += 1
        checked += 1
    assert checked > 10 and (cells["volumetric"].any())
    # the corrected counts give the unknown bin back: each sampled cell's taxa sum to its classified images
    totals = ds["count_corrected"].sum("taxon", min_count=1)
    sampled = ds["images"] > 0
    np.testing.assert_allclose(totals.where(sampled).fillna(0).values, ds["images"].values, rtol=1e-4)
    assert ds["count_corrected"].where(~sampled).isnull().all()  # no data: NaN, not 0
    assert int((ds["count"].where(sampled) == 0).sum()) > 0  # sampled, none found: 0
    with_volume = ds["volume_ml"] > 0
    assert with_volume.any() and ds["concentration_corrected"].where(~with_volume).isnull().all()
    # the map: cells sampled without the taxon grey, no data blank
    # the taxon and time bin with the most sampled cells without that taxon
    absent = ((ds["count"] == 0) & sampled).sum(("lat", "lon")).transpose("taxon", "time")
    t, b = np.unravel_index(int(np.argmax(absent.values)), absent.shape)
    taxon, when = str(ds["taxon"].values[t]), str(ds["time"].values[b])[:10]
    assert absent.values.max() >= 2
    path = plot_map(ds, tmp_path / "one.png", taxon=taxon, variable="count", time=when)
    from PIL import Image
    with Image.open(path) as img:
        rgb = np.asarray(img.convert("RGB")).reshape(-1, 3)
    # matplotlib's "0.8" grey: the cells (thousands of pixels each), not the legend patch
    assert ((rgb == [204, 204, 204]).all(axis=1)).sum() > 500 * absent.values.max()
    result = CliRunner().invoke(app, ["abundance", "--catalog", url, "--model", str(model_dir), "--rank", "lineage",
                                      "--correct", "pacc", "--min-prob", "0.5", "--cell", "60", "--time-bin", "1YS",
                                      "--png", str(tmp_path / "map.png"), "--out", str(tmp_path / "ab.zarr"),
                                      "--scheduler", client.scheduler.address])
    assert result.exit_code == 0, result.output
    assert "corrected (pacc)" in result.output and (tmp_path / "map.png").exists()
    stored = xr.open_zarr(str(tmp_path / "ab.zarr"), consolidated=False)
    xr.testing.assert_allclose(stored["count_corrected"].load(), found["pacc"]["count_corrected"])
    bad = CliRunner().invoke(app, ["abundance", "--catalog", url, "--model", card.id, "--correct", "acc",
                                   "--scheduler", client.scheduler.address])
    assert bad.exit_code == 1 and "model directory" in bad.output


def test_concentrations_of_real_ifcb_bins_match_volumes_from_their_own_files(client, tmp_path):
    """Four real IFCB bins (three instruments, schemas 1 and 2) ingested and 'classified': each bin's volume_l is
    0.25 mL/min x (run time - inhibit time) read here straight from its files (the last ADC line, the header
    where the instrument's run went on after it; schema 1: pyifcb's reference value), and its
    concentrations are its counts over that volume."""
    from pathlib import Path

    data = Path(__file__).parent / "data"
    bins = {"pyifcb/data/2012/IFCB5_2012_028/IFCB5_2012_028_081515": None,
            "pyifcb/white/D2013/D201305/D20130526/D20130526T095207_IFCB013": None,
            "irfcb/test_data/data/D20220522T003051_IFCB134": None,
            "classipyr/test_data/raw/2022/D20220522/D20220522T000439_IFCB134": None}
    raw = tmp_path / "bins"
    raw.mkdir()
    for path in bins:
        for ext in (".adc", ".hdr", ".roi"):
            (raw / (Path(path).name + ext)).write_bytes((data / (path + ext)).read_bytes())
        if "IFCB5_2012" in path:
            bins[path] = 0.003391470833333334  # pyifcb's ml_analyzed of this schema-1 bin
            continue
        last = (data / f"{path}.adc").read_text().splitlines()[-1].split(",")
        from_adc = 0.25 * (float(last[22]) - float(last[23])) / 60
        header = dict(line.split(":", 1) for line in (data / f"{path}.hdr").read_text(encoding="latin-1")
                      .splitlines() if ":" in line)
        from_hdr = 0.25 * (float(header["runTime"]) - float(header["inhibitTime"])) / 60
        assert from_hdr == pytest.approx(from_adc, rel=0.05)  # the run goes on a little after the last trigger
        bins[path] = from_hdr
    url = str(tmp_path / "catalog.zarr")
    from pzscale.ingest import ingest

    ingest([str(raw)], url, format="ifcb", shard_len=64, client=client, progress=False)
    group = catalog.open_group(url, mode="r+")
    rows = catalog.n_rows_of(group)
    classes = ["Chromista Bacillariophyta", "Protozoa Ciliophora"]
    card = ModelCard(name="two", version="1", kind="builtin", architecture="none", embed_dim=8, image_size=32,
                     mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), classes=classes)
    probs = np.random.default_rng(0).dirichlet([1, 1], rows)
    n = names(card)
    out = predictions(probs, classes, top_k=2)
    for key, values in out.items():
        text = values.dtype == object
        trailing, dims = ((2,), (n["k"],)) if key.startswith("topk") else ((), ())
        catalog.ensure_array(group, n[key], dtype="str" if text else "float32", fill="" if text else np.nan,
                             trailing=trailing, dims=dims)
        catalog.write_arrays(group, 0, rows, {n[key]: values if text else values.astype(np.float32)})
    table = quantify(url, card.id, classes, "sample", methods=("cc",), min_prob=0.0, rounds=0, client=client)
    assert len(table) == 3 * len(bins)  # two taxa and the unknown bin per bin
    for path, ml in bins.items():
        mine = table[table["sample"] == Path(path).name]
        assert set(mine["volume_qc"]) == {"ok"}
        np.testing.assert_allclose(mine["volume_l"], ml / 1000, rtol=1e-6)
        np.testing.assert_allclose(mine["concentration_per_l"], mine["count"] / (ml / 1000), rtol=1e-6)


def test_rollup_adds_up_from_the_classes_to_the_kingdom(predicted, client, tmp_path):
    """--rollup: one estimate over the model's classes summed into every rank (estimates and bootstrap draws), so
    each rank's proportions are sums of the classes beneath; abundance --correct sums the same way."""
    from pzscale.abundance import abundance
    from pzscale.schema import RANKS

    url, card, model_dir = predicted
    out = tmp_path / "rollup.csv"
    result = CliRunner().invoke(app, ["quantify", "--catalog", url, "--model", str(model_dir), "--by", "source",
                                      "--rollup", "--method", "cc,acc,em", "--rounds", "20", "--out", str(out),
                                      "--zarr", str(tmp_path / "rollup.zarr"),
                                      "--scheduler", client.scheduler.address])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out, keep_default_na=False)
    assert list(table.columns[:2]) == ["source", "rank"] and set(table["rank"]) == {"label", *RANKS}
    classes = table[table["rank"] == "label"]
    for rank in RANKS:
        depth = RANKS.index(rank) + 1
        mine = table[(table["rank"] == rank) & (table["taxon"] != "unknown")].set_index(["source", "method", "taxon"])
        known = classes[classes["taxon"] != "unknown"]
        summed = known.assign(taxon=known["taxon"].str.split().str[:depth].str.join(" ")).groupby(
            ["source", "method", "taxon"])["proportion"].sum()
        pd.testing.assert_series_equal(mine["proportion"].sort_index(), summed.sort_index(), check_names=False,
                                       atol=1e-9)
        # a taxon's interval comes from its summed draws: it lies within the sums of its classes' bounds
        bounds = known.assign(taxon=known["taxon"].str.split().str[:depth].str.join(" ")).groupby(
            ["source", "method", "taxon"])[["ci_low", "ci_high"]].sum()
        assert (mine["ci_low"].sort_index() >= bounds["ci_low"].sort_index() - 1e-9).all()
        assert (mine["ci_high"].sort_index() <= bounds["ci_high"].sort_index() + 1e-9).all()
    kingdoms = table[(table["rank"] == "kingdom")].groupby(["source", "method"])["proportion"].sum()
    np.testing.assert_allclose(kingdoms, 1.0, atol=1e-9)
    assert xr.open_zarr(str(tmp_path / "rollup.zarr"), consolidated=False)["proportion"].dims == \
        ("source", "rank", "taxon", "method")
    with pytest.raises(InputError, match="give no rank"):
        quantify(url, card.id, card.classes, "source", rank="genus", rollup=True, client=client)
    phylum, lineage = (abundance(url, rank=r, model=card.id, classes=card.classes, min_prob=0.5, cell_deg=90.0,
                                 time_bin="1YS", correct="acc", client=client) for r in ("phylum", "lineage"))
    by_phylum = lineage["count_corrected"].groupby(
        xr.DataArray([" ".join(t.split()[1:2]) or t for t in lineage["taxon"].values], dims="taxon",
                     name="phylum")).sum(min_count=1)
    np.testing.assert_allclose(phylum["count_corrected"].sel(taxon=by_phylum["phylum"].values).values,
                               by_phylum.values, rtol=1e-4, atol=1e-3)
