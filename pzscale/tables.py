"""CSV and TSV tables that read back exactly, and that a spreadsheet opens as data, never as formulas.

Every CSV/TSV pzscale writes goes through ``write_csv``:

- quoting: ``csv.QUOTE_NONNUMERIC``: every text cell and the header are quoted (``"`` doubled inside), numbers
  (int, float, bool) are not, so commas, quotes, tabs, ``\\n``, ``\\r`` and any Unicode round-trip through
  ``pandas.read_csv`` and Python's ``csv`` module alike; rows end in ``\\n``; UTF-8. A missing value is
  written as ``""``.
- formulas (OWASP "CSV injection"): a text cell starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage
  return gets a leading single quote ``'`` (``=1+2`` is written ``'=1+2``), so a spreadsheet shows it as text.
  Only text (object, string or categorical columns) is touched: numbers stay numbers, so a negative latitude
  is written ``-12.5``. A reader that wants the raw text back drops the leading ``'`` of such cells.

Layer 0: imports only the standard library and pandas.
"""

from __future__ import annotations

import csv
from typing import IO

import pandas as pd

QUOTING = csv.QUOTE_NONNUMERIC
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def safe_text(series: pd.Series) -> pd.Series:
    """``series`` with a ``'`` before every text cell starting with ``=``, ``+``, ``-``, ``@``, a tab or a
    carriage return (spreadsheet formula neutralising, per OWASP); numeric and boolean columns, missing
    values and non-text cells come back unchanged."""
    if isinstance(series.dtype, pd.CategoricalDtype):
        series = series.astype(object)
    if not (pd.api.types.is_object_dtype(series.dtype) or pd.api.types.is_string_dtype(series.dtype)):
        return series
    hit = pd.Series([isinstance(v, str) and v.startswith(FORMULA_START) for v in series], index=series.index,
                    dtype=bool)
    if not hit.any():
        return series
    out = series.astype(object)
    out[hit] = "'" + out[hit].astype(str)
    return out


def write_csv(frame: pd.DataFrame, target: str | IO[str] | None, *, sep: str = ",", header: bool = True,
              neutralise: bool = True) -> str | None:
    """Write ``frame`` (without its index) as CSV, or TSV with ``sep="\\t"``, to ``target``: a local path or a
    text file opened with ``newline=""`` (else ``\\r`` in a cell may be translated). With ``target=None`` the
    text is returned instead (``write_csv(pd.DataFrame(columns=names), None)`` is a header line).

    Text cells and the header are quoted, numbers not (``csv.QUOTE_NONNUMERIC``), so any character
    round-trips; with ``neutralise`` (the default) text cells starting with ``=``, ``+``, ``-``, ``@``, a tab
    or a carriage return get a leading ``'`` (see ``safe_text``), numeric cells are never changed.
    """
    if neutralise:
        frame = frame.copy(deep=False)
        for i in range(frame.shape[1]):
            frame.isetitem(i, safe_text(frame.iloc[:, i]))
    return frame.to_csv(target, sep=sep, header=header, index=False, quoting=QUOTING, lineterminator="\n",
                        encoding="utf-8")
