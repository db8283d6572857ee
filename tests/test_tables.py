"""CSV/TSV writing: any character round-trips through pandas and the csv module; formulas neutralised."""

from __future__ import annotations

import csv
import io

import numpy as np
import pandas as pd
import pytest

from pzscale import tables

NASTY = ["plain", "car\rriage", "new\nline", "both\r\nends", 'a "quoted" word', "comma, here", "tab\there",
         "emoji 🦠 ünïcode", "", "=1+2", "+33 6", "-minus", "@SUM(A1)", "\tlead tab", "\rlead cr", "'already"]


def frame() -> pd.DataFrame:
    n = len(NASTY)
    return pd.DataFrame({
        "name": NASTY,
        "lat": np.linspace(-45.5, 45.5, n),
        "count": np.arange(-3, n - 3),
        "ok": [True, False] * (n // 2),
        "maybe": [np.nan if i % 3 == 0 else -float(i) for i in range(n)],
        "text": pd.array(NASTY[::-1], dtype="string"),
    })


def expected(value: str) -> str:
    return "'" + value if value.startswith(tables.FORMULA_START) else value


@pytest.mark.parametrize("sep", [",", "\t"])
def test_any_character_round_trips_through_pandas_and_csv(tmp_path, sep):
    path = tmp_path / "t.csv"
    tables.write_csv(frame(), path, sep=sep)
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh, delimiter=sep))
    back = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    assert rows[0] == list(frame().columns) == list(back.columns)
    assert len(rows) - 1 == len(back) == len(NASTY)
    assert rows[1:] == back.values.tolist()  # both readers: the same values
    assert back["name"].tolist() == [expected(v) for v in NASTY]
    assert back["text"].tolist() == [expected(v) for v in NASTY[::-1]]
    # stripping the added quote gives the original text back
    assert [v[1:] if v.startswith("'") and v[1:].startswith(tables.FORMULA_START) else v
            for v in back["name"]] == NASTY


def test_numbers_stay_numbers(tmp_path):
    path = tmp_path / "t.csv"
    tables.write_csv(frame(), path)
    typed = pd.read_csv(path, keep_default_na=True)
    pd.testing.assert_series_equal(typed["lat"], frame()["lat"])
    pd.testing.assert_series_equal(typed["count"], frame()["count"])
    pd.testing.assert_series_equal(typed["maybe"], frame()["maybe"])
    assert typed["ok"].tolist() == frame()["ok"].tolist()
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[0] == '"name","lat","count","ok","maybe","text"'
    assert lines[1] == '"plain",-45.5,-3,True,"",' + '"\'already"'  # numbers unquoted, text quoted
    # a csv reader in QUOTE_NONNUMERIC mode gets the numbers as floats, the text as text
    tables.write_csv(frame().drop(columns="ok"), path)
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh, quoting=csv.QUOTE_NONNUMERIC))
    assert rows[1] == ["plain", -45.5, -3.0, "", "'already"]
    assert rows[2][1:4] == [pytest.approx(-45.5 + 91 / 15), -2.0, -1.0]


def test_safe_text_only_touches_text():
    numbers = pd.Series([-1.5, 2.0])
    assert tables.safe_text(numbers) is numbers
    mixed = pd.Series(["=x", None, -3, "-y", "ok"], dtype=object)
    assert tables.safe_text(mixed).tolist() == ["'=x", None, -3, "'-y", "ok"]
    cats = pd.Series(["@a", "b"], dtype="category")
    assert tables.safe_text(cats).tolist() == ["'@a", "b"]


def test_file_object_header_and_opt_out():
    buf = io.StringIO(newline="")
    tables.write_csv(pd.DataFrame({"a": ["=x"], "b": [-1]}), buf, header=False, neutralise=False)
    assert buf.getvalue() == '"=x",-1\n'
    assert tables.write_csv(pd.DataFrame(columns=["x", "y"]), None) == '"x","y"\n'
