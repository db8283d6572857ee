"""The Darwin Core CSV reads back exactly: taxon names with any character, no spreadsheet formulas,
numbers as numbers (more Darwin Core checks on a real catalog are in test_abundance.py)."""

from __future__ import annotations

import csv

import numpy as np
import pandas as pd
import pytest

from pzscale import catalog
from pzscale.dwc import COLUMNS, export_dwc
from pzscale.schema import BY_NAME, TIME_FILL, VARIABLE_NAMES
from pzscale.tables import FORMULA_START

pytestmark = [pytest.mark.cluster]

GENERA = ["chaeto\rceros", "line\nbreak", 'say "hi"', "comma, genus", "tab\tgenus", "emoji 🦠 genus",
          "=cmd|' /c calc'!a0", "+plus", "-minus", "@sum(a1)", "plain"]
N, SHARD_LEN = 150, 64  # three shards: three parts joined


def make_catalog(url: str) -> pd.DataFrame:
    """A catalog of N rows whose genera are GENERA in turn, every 7th row not ok; returns what it holds."""
    cols = {}
    for name in VARIABLE_NAMES:
        var = BY_NAME[name]
        if var.dtype == "str":
            cols[name] = np.full(N, "", dtype=object)
        elif var.dtype == "bytes":
            cols[name] = np.full(N, b"", dtype=object)
        else:
            cols[name] = np.full(N, var.fill, dtype=var.dtype)
    rows = np.arange(N)
    genus = np.array(GENERA, dtype=object)[rows % len(GENERA)]
    cols.update(image_id=np.array([f"img-{i}" for i in rows], dtype=object), kingdom=np.full(N, "chromista", object),
                genus=genus, lineage=np.array([f"chromista {g}" for g in genus], dtype=object),
                status=np.where(rows % 7 == 3, "corrupt", "ok").astype(object),
                source=np.full(N, "=HYPERLINK(\"x\")", dtype=object),
                lat=-10.0 - rows / 4, lon=-170.0 + rows / 8, time=np.full(N, TIME_FILL, np.int64))
    group = catalog.create(url, n_rows=N, shard_len=SHARD_LEN)
    for _, start, stop in catalog.shard_ranges(0, N, SHARD_LEN):
        catalog.write_rows(group, start, stop, {k: v[start:stop] for k, v in cols.items()})
    return pd.DataFrame({k: cols[k] for k in ("image_id", "genus", "status", "source", "lat", "lon")})


def unquote(value: str) -> str:
    """The text as it was before formula neutralising."""
    return value[1:] if value.startswith("'") and value[1:].startswith(FORMULA_START) else value


def test_any_taxon_name_round_trips(client, tmp_path):
    truth = make_catalog(str(tmp_path / "c.zarr"))
    out = tmp_path / "occurrence.csv"
    result = export_dwc(str(tmp_path / "c.zarr"), str(out), client=client)
    ok = truth[truth["status"] == "ok"].reset_index(drop=True)
    back = pd.read_csv(out, dtype=str, keep_default_na=False)
    with open(out, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == list(back.columns) == list(COLUMNS)
    assert result["rows"] == len(back) == len(rows) - 1 == len(ok) > 100
    assert rows[1:] == back.values.tolist()  # both readers: the same values
    assert back["occurrenceID"].tolist() == ok["image_id"].tolist()
    names = ok["genus"].str.capitalize()
    assert back["scientificName"].map(unquote).tolist() == back["genus"].map(unquote).tolist() == names.tolist()
    formula = names.str.startswith(FORMULA_START)
    assert formula.sum() >= 4
    assert (back.loc[formula, "scientificName"] == "'" + names[formula]).all()  # neutralised
    assert (back.loc[~formula, "scientificName"] == names[~formula]).all()  # the rest as written
    assert (back["datasetName"] == "'=HYPERLINK(\"x\")").all()


def test_negative_numbers_stay_numbers(client, tmp_path):
    truth = make_catalog(str(tmp_path / "c.zarr"))
    out = tmp_path / "occurrence.csv"
    export_dwc(str(tmp_path / "c.zarr"), str(out), client=client)
    ok = truth[truth["status"] == "ok"].reset_index(drop=True)
    typed = pd.read_csv(out)
    assert typed["decimalLatitude"].dtype == np.float64 and typed["decimalLongitude"].dtype == np.float64
    np.testing.assert_allclose(typed["decimalLatitude"], ok["lat"])
    np.testing.assert_allclose(typed["decimalLongitude"], ok["lon"])
    text = out.read_text(encoding="utf-8")
    assert f",{ok['lat'][0]},{ok['lon'][0]}," in text and "'-" not in text.replace("'-minus", "")
