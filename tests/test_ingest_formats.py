"""Native formats through the one ingest path: IFCB bins, EcoTaxa exports, class-folder
archives, mixed catalogs, taxonomy harmonisation and third-party reader plugins."""

import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile

import numpy as np
import pytest

from pzscale import catalog, info, open_catalog, read_images, taxonomy
from pzscale.errors import InputError
from pzscale.ingest import ingest
from pzscale.readers.ifcb import parse_adc

pytestmark = pytest.mark.cluster


def _adc_images(adc_path, schema):
    adc = parse_adc(adc_path.read_text(), schema)
    keep = (adc["width"] > 0) & (adc["height"] > 0)
    return [(int(line) + 1, int(w), int(h), int(s)) for line, (w, h, s, k) in
            enumerate(zip(adc["width"], adc["height"], adc["start_byte"], keep, strict=True)) if k]


def test_ifcb_bins_ingest_with_exact_rois_and_raw_pixels(sample_data, client, tmp_path):
    url = str(tmp_path / "cat.zarr")
    sources = [sample_data / "pyifcb", sample_data / "irfcb" / "test_data" / "data",
               sample_data / "classipyr" / "test_data" / "raw"]
    report = ingest([str(s) for s in sources], url, format="ifcb", source="ifcb_samples", shard_len=64,
                    client=client, progress=False)
    ds = open_catalog(url).drop_vars("image_bytes").compute()
    good = {
        "IFCB5_2012_028_081515": (sample_data / "pyifcb/data/2012/IFCB5_2012_028/IFCB5_2012_028_081515", 1),
        "D20130526T095207_IFCB013": (sample_data / "pyifcb/white/D2013/D201305/D20130526/D20130526T095207_IFCB013",
                                     2),
        "D20220522T003051_IFCB134": (sample_data / "irfcb/test_data/data/D20220522T003051_IFCB134", 2),
        "D20220522T000439_IFCB134": (sample_data / "classipyr/test_data/raw/2022/D20220522/D20220522T000439_IFCB134",
                                     2),
    }
    assert ds.sizes["image"] == 6 + 19 + 2 + 7
    for lid, (stem, schema) in good.items():
        rois = _adc_images(stem.with_suffix(".adc"), schema)
        ids = [f"ifcb_samples:{lid}_{line:05d}" for line, *_ in rois]
        rows = [int(np.flatnonzero(ds["image_id"].values == i)[0]) for i in ids]
        raw = stem.with_suffix(".roi").read_bytes()
        for pixels, (_, w, h, start) in zip(read_images(url, rows), rois, strict=True):
            expected = np.frombuffer(raw, np.uint8, count=w * h, offset=start).reshape(h, w)
            np.testing.assert_array_equal(pixels, expected)
        assert (ds["instrument"].values[rows] == "IFCB").all()
        assert np.isfinite(ds["volume_analysed"].values[rows]).all()
    assert (ds["status"].values == "ok").all()
    # edge-case bins are reported per bin and did not stop the run
    joined = "\n".join(report.input_errors)
    for name in ("empty/IFCB5_2017_001_033645", "empty/D20150411T205456_IFCB012", "invalid/D20130101T101010_IFCB099",
                 "partial/IFCB5_2012_028_081515", "skip/IFCB5_2006_001_121212"):
        assert name in joined, name
    assert "decoy" not in joined
    assert all("\n" not in e for e in report.input_errors)
    assert info.summarize(url)["plans"][0]["input_errors"] == len(report.input_errors)


def test_ecotaxa_exports_ingest_with_labels_and_coordinates(sample_data, client, tmp_path):
    url = str(tmp_path / "cat.zarr")
    ingest([str(sample_data / "ecotaxa_back"), str(sample_data / "irfcb" / "exdata")], url, format="ecotaxa",
           shard_len=64, client=client, progress=False)
    ds = open_catalog(url).drop_vars("image_bytes").compute()
    labels = set(ds["original_label"].values)
    assert {"detritus", "egg<other"} <= labels
    uvp6 = ds["instrument"].values == "UVP6"
    assert uvp6.any() and np.isfinite(ds["lat"].values[uvp6]).all()
    assert (np.abs(ds["lat"].values[uvp6] - 43) < 1).all()  # the degree-sign coordinates, parsed
    vpr = ds["source"].values == "ecotaxa_vpr"
    assert vpr.any() and np.allclose(ds["lat"].values[vpr], 77.0709) and np.allclose(ds["lon"].values[vpr], 161.8121)
    m106 = ds["source"].values == "ecotaxa_epson"  # the ZooScan M106 sets name their scanner, not ZooScan
    assert m106.sum() >= 8 and (ds["status"].values[m106] == "ok").all()
    # tables shipped without their images ingest with status missing_image, nothing dropped
    zooscan = ds["instrument"].values == "ZooScan"
    assert zooscan.any() and (ds["status"].values[zooscan] == "missing_image").all()


def _class_tree(sample_data, root):
    for src in [*(sample_data / "irfcb/test_data").glob("png*/*/*.png"),
                *(sample_data / "classipyr/test_data/example_png").glob("*/*.png")]:
        dest = root / "imgs" / src.parent.name / src.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dest)
    return root


def test_class_folder_from_folder_tar_gz_and_zip_gives_identical_catalogs(sample_data, client, tmp_path):
    tree = _class_tree(sample_data, tmp_path / "tree")
    with tarfile.open(tmp_path / "tree.tar.gz", "w:gz") as tar:
        tar.add(tree / "imgs", arcname="imgs")
    with zipfile.ZipFile(tmp_path / "tree.zip", "w") as zf:
        for path in sorted((tree / "imgs").rglob("*.png")):
            zf.write(path, path.relative_to(tree).as_posix())
    sums = []
    for i, src in enumerate([tree, tmp_path / "tree.tar.gz", tmp_path / "tree.zip"]):
        url = str(tmp_path / f"cat{i}.zarr")
        ingest([str(src)], url, source="whoi_sample", shard_len=64, client=client, progress=False)
        sums.append(catalog.checksums(url))
    assert sums[0] == sums[1] == sums[2]
    ds = open_catalog(str(tmp_path / "cat0.zarr"))
    assert "Mesodinium_rubrum" in set(ds["original_label"].values)


def test_archive_with_parent_member_is_refused_and_nothing_written(sample_data, client, tmp_path):
    evil = tmp_path / "evil.tar"
    png = next((sample_data / "irfcb/test_data/png").rglob("*.png"))
    with tarfile.open(evil, "w") as tar:
        tar.add(png, arcname="imgs/good/a.png")
        tar.add(png, arcname="../x.png")
    url = tmp_path / "out" / "cat.zarr"
    with pytest.raises(InputError, match="evil.tar.*'../x.png'"):
        ingest([str(evil)], str(url), format="folder", client=client, progress=False)
    assert not (tmp_path / "x.png").exists() and not url.exists()


def test_two_formats_in_one_catalog_and_taxonomy_report(sample_data, synth_dir, client, tmp_path):
    table = str(sample_data / "planktonzilla" / "planktonzilla_taxonomy.csv")
    url = str(tmp_path / "cat.zarr")
    ingest([str(synth_dir)], url, shard_len=64, client=client, progress=False)
    # a new cruise as class folders named with raw labels, mapped like the zooscan collection
    cruise = tmp_path / "cruise"
    png = next((sample_data / "irfcb/test_data/png").rglob("*.png"))
    for label in ("Harpacticoida", "Chaetognatha", "Not_a_taxon"):
        (cruise / "imgs" / label).mkdir(parents=True)
        for k in range(3):
            shutil.copy(png, cruise / "imgs" / label / f"{k}.png")
    report = ingest([str(cruise)], url, format="folder", source="cruise_zooscan", taxonomy_table=table,
                    taxonomy_source="zooscan", append=True, client=client, progress=False)
    assert report.rows[1] - report.rows[0] == 9
    ds = open_catalog(url).drop_vars("image_bytes").compute()
    new = ds.isel(image=slice(report.rows[0], None))
    harp = new["original_label"].values == "Harpacticoida"
    assert set(new["lineage"].values[harp]) == {
        "animalia arthropoda copepoda harpacticoida tachidiidae euterpina"}  # zooscan's (inflated) mapping
    assert set(new["aphia_id"].values[harp]) == {115348}
    assert set(new["root_class"].values[new["original_label"].values == "Chaetognatha"]) == {"living"}
    assert set(ds["source"].values) >= {"cruise_zooscan", "synth_ifcb"}
    pairs = taxonomy.catalog_mappings(info.label_mappings(url))
    unmapped = taxonomy.unmapped(pairs)
    assert list(unmapped[unmapped["source"] == "cruise_zooscan"]["label"]) == ["Not_a_taxon"]
    conflicts = taxonomy.conflicts(taxonomy.table_mappings(taxonomy.read_table(table)))
    harp_rows = conflicts[conflicts["raw_label"] == "harpacticoida"]
    assert set(harp_rows["lineage"]) == {"animalia arthropoda copepoda harpacticoida",
                                         "animalia arthropoda copepoda harpacticoida tachidiidae euterpina"}
    assert set(harp_rows[harp_rows["depth"] == 6]["source"]) == {"zooscan"}


def test_reader_from_an_entry_point_is_picked_up_by_the_cli(tmp_path):
    """A third-party package registers a reader in the pzscale.readers entry-point group."""
    site = tmp_path / "site"
    pkg = site / "pz_csvreader"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent('''
        import csv, io
        import numpy as np
        from PIL import Image
        from pzscale.readers import Item, Reader, encode_png, records

        class GreyCSVReader(Reader):
            """Each CSV line: an id and a grey level; each becomes a 6x4 image of that level."""
            name = "greycsv"
            description = "test format: id,grey CSV"

            def guess_can_open(self, path, *, storage_options=None):
                return str(path).endswith(".greycsv")

            def plan(self, path, *, source=None, storage_options=None):
                lines = open(path).read().split()
                return [Item(source=str(path), rows=len(lines), size=len(lines), info={"source": source or "grey"})]

            def read(self, item, first, stop, *, storage_options=None):
                rows = list(csv.reader(open(item.source).read().split()))[first:stop]
                return records([{"image": {"bytes": encode_png(np.full((4, 6), int(g), np.uint8)), "path": i},
                                 "dataset": item.info["source"], "ObjID": i, "original_label": "grey"}
                                for i, g in rows])
    '''))
    dist = site / "pz_csvreader-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: pz-csvreader\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[pzscale.readers]\ngreycsv = pz_csvreader:GreyCSVReader\n")
    data = tmp_path / "values.greycsv"
    data.write_text("a,10\nb,200\nc,37\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    listed = subprocess.run([sys.executable, "-m", "pzscale.cli", "readers"], env=env, capture_output=True,
                            text=True, check=True)
    assert "greycsv" in listed.stdout
    url = str(tmp_path / "cat.zarr")
    done = subprocess.run([sys.executable, "-m", "pzscale.cli", "ingest", str(data), "--catalog", url,
                           "--workers", "1"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    ds = open_catalog(url)
    assert list(ds["image_id"].values) == ["grey:a", "grey:b", "grey:c"]
    assert [int(p[0, 0]) for p in read_images(url, [0, 1, 2])] == [10, 200, 37]
