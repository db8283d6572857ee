"""Planktonzilla-17M parquet shards (the Hugging Face ``Image`` struct plus 29 columns)."""

from __future__ import annotations

import difflib

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pzscale.errors import InputError, one_line
from pzscale.faults import is_transient
from pzscale.readers.base import KEY_COLUMNS, Item, Reader, keys_only
from pzscale.schema import PARQUET_COLUMNS, PARQUET_REQUIRED


class ParquetReader(Reader):
    name = "parquet"
    description = "Planktonzilla-format parquet shards (HF Image struct + taxonomy and metadata columns)"

    def guess_can_open(self, path: str, *, storage_options: dict | None = None) -> bool:
        path = str(path)
        if path.endswith(".parquet") or "*" in path:
            return True
        fs, fpath = fsspec.core.url_to_fs(path, **(storage_options or {}))
        return fs.isdir(fpath) and any(p.endswith(".parquet") for p in fs.find(fpath))

    def plan(self, path: str, *, source: str | None = None, storage_options: dict | None = None) -> list[Item]:
        # ``source`` is ignored: every parquet row names its collection in ``dataset``.
        return [scan_file(p, storage_options=storage_options) for p in expand(path, storage_options)]

    def read(self, item: Item, first: int, stop: int, *, storage_options: dict | None = None) -> pa.Table:
        return _read(item, first, stop, item.info["columns"], storage_options)

    def read_keys(self, item: Item, *, storage_options: dict | None = None) -> pa.Table:
        columns = [c for c in KEY_COLUMNS if c in item.info["columns"]]  # the id columns alone: no image bytes
        return keys_only(_read(item, 0, item.rows, columns, storage_options))


def _read(item: Item, first: int, stop: int, columns: list[str], storage_options: dict | None) -> pa.Table:
    starts = np.concatenate([[0], np.cumsum(item.info["row_groups"])])
    first_rg = int(np.searchsorted(starts, first, side="right") - 1)
    last_rg = int(np.searchsorted(starts, stop, side="left"))
    groups = list(range(first_rg, last_rg))
    try:
        if fsspec.utils.get_protocol(item.source) == "file":
            # pyarrow's own file reader: no Python in the read path (measurably faster than fsspec's)
            table = pq.ParquetFile(item.source.removeprefix("file://")).read_row_groups(groups, columns=columns)
        else:
            with fsspec.open(item.source, "rb", **(storage_options or {})) as fh:
                table = pq.ParquetFile(fh, pre_buffer=True).read_row_groups(groups, columns=columns)
        # parquet does not check text on read: a corrupt page can hold invalid UTF-8 that only
        # fails later, in the middle of a shard task (found by tests/reliability/test_fuzz.py)
        table.validate(full=True)
    except (pa.ArrowException, OSError, ValueError, IndexError, KeyError) as e:
        if is_transient(e) or isinstance(e, InputError):
            raise
        raise InputError(f"{item.source}: cannot read rows {first}-{stop} ({one_line(e)})") from None
    return table.slice(first - int(starts[first_rg]), stop - first)


def expand(source: str, storage_options: dict | None) -> list[str]:
    """Parquet files named by ``source`` (a file, a folder or a glob), sorted."""
    fs, path = fsspec.core.url_to_fs(str(source), **(storage_options or {}))
    protocol = fsspec.utils.get_protocol(str(source))
    prefix = "" if protocol == "file" else f"{protocol}://"
    if fs.isdir(path):
        matches = [m for m in sorted(fs.find(path)) if m.endswith(".parquet")]
    elif any(ch in path for ch in "*?["):
        matches = sorted(fs.glob(path))
    elif fs.exists(path):
        matches = [path]
    else:
        raise InputError(f"{source}: no such file or folder")
    if not matches:
        raise InputError(f"{source}: no .parquet files found")
    return [prefix + m for m in matches]


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)


def _is_scalar(t: pa.DataType) -> bool:
    """Types the ingest turns into catalog text, numbers and times (nested and binary columns it cannot)."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    return any(check(t) for check in (
        pa.types.is_null, pa.types.is_boolean, pa.types.is_integer, pa.types.is_floating, pa.types.is_decimal,
        pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view, pa.types.is_timestamp,
        pa.types.is_date,
    ))


def scan_file(path: str, *, storage_options: dict | None = None) -> Item:
    """Read one parquet footer and check its schema. Raises InputError naming the file."""
    fs, fpath = fsspec.core.url_to_fs(path, **(storage_options or {}))
    size = fs.size(fpath)
    if size == 0:
        raise InputError(f"{path}: file is empty (0 bytes)")
    try:
        with fs.open(fpath, "rb") as fh:
            meta = pq.ParquetFile(fh).metadata
            schema = meta.schema.to_arrow_schema()
    except (pa.ArrowException, OSError, ValueError, IndexError, KeyError) as e:  # a corrupt footer raises any
        if isinstance(e, InputError):
            raise
        if is_transient(e):
            raise
        raise InputError(f"{path}: not a readable parquet file ({one_line(e)})") from None
    names = schema.names
    missing = [c for c in PARQUET_REQUIRED if c not in names]
    if missing:
        hints = []
        for col in missing:
            close = difflib.get_close_matches(col, names, n=1, cutoff=0.6)
            hints.append(f"{col} (found {close[0]!r})" if close else col)
        raise InputError(f"{path}: missing Planktonzilla column(s): {', '.join(hints)}")
    # Planktonzilla's columns, and a sample column where a lab's own shards carry one (Planktonzilla's do not)
    present = [c for c in (*PARQUET_COLUMNS, "sample") if c in names]
    repeated = sorted({c for c in present if names.count(c) > 1})
    if repeated:
        raise InputError(f"{path}: column(s) {', '.join(repeated)} appear more than once")
    image_type = schema.field("image").type
    if not (pa.types.is_struct(image_type) and image_type.get_field_index("bytes") >= 0
            and _is_binary(image_type.field("bytes").type)):
        raise InputError(f"{path}: column 'image' is {image_type}, expected struct<bytes: binary, path: string>")
    for column in present:
        column_type = schema.field(column).type
        if column != "image" and not _is_scalar(column_type):
            raise InputError(f"{path}: column '{column}' is {column_type}, expected text, a number, "
                             "a boolean or a time")
    row_groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    return Item(source=path, rows=meta.num_rows, size=size, info={"row_groups": row_groups, "columns": present})
