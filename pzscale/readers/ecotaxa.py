"""EcoTaxa import/export TSVs with their image files: in a folder tree, or inside a .zip read in place.

One ``Item`` per TSV. Row 1 holds the prefixed column names (``img_``, ``object_``, ``sample_``,
``acq_``, ``process_``); an optional row 2 gives the column types (``[t]`` / ``[f]``). Each data row
becomes one record whose image is the file named by ``img_file_name``, relative to the TSV's folder.
Columns are found by name, never by position (edited exports add columns anywhere).

A folder is searched recursively for TSVs and for zips holding TSVs (EcoTaxa imports zips found in a
folder too); a zip is read in place, never extracted. An unzipped copy beside its zip is planned twice.

``img_file_name`` is untrusted: a name that is absolute, climbs out with ``..`` or (on a local disk)
is a link leading out of the table's folder is never read; its row gets no image and says why. Zip
members beyond ``pzscale.limits`` (decompression bombs) are refused the same way.
"""

from __future__ import annotations

import csv
import io
import math
import os
import posixpath
import re
import unicodedata
import warnings
import zipfile
from datetime import datetime
from typing import IO, Any

import fsspec
import pandas as pd
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

from pzscale import limits
from pzscale.errors import InputError, one_line
from pzscale.faults import is_transient
from pzscale.readers.base import Item, Reader, keys_only, records
from pzscale.readers.folder import check_member_name
from pzscale.schema import instrument_family

BOM = b"\xef\xbb\xbf"  # UTF-8's byte-order mark
ENCODINGS = ("utf-8", "iso-8859-1")  # EcoTaxa exports are UTF-8; older ZooProcess/UVP tables are Latin-1
HEADER_BYTES = 65536  # enough for the header line of a 300-column table
CHECKPOINT = 2_000  # data rows between recorded byte offsets: a late slice seeks instead of re-parsing
WANTED = {
    "img_file_name", "object_id", "object_lat", "object_lon", "object_date", "object_time",
    "object_depth_min", "object_depth_max", "object_annotation_category", "object_annotation_hierarchy",
    "object_annotation_status", "object_aphiaid", "acq_pixel", "acq_instrument", "sample_id", "acq_id",
    "sample_tot_vol", "acq_sub_part",
}
# Optional columns copied as text: EcoTaxa name -> record column
TEXT_COLUMNS = {
    "object_annotation_hierarchy": "original_hierarchy",
    "object_annotation_status": "annotation_status",
    "object_aphiaid": "aphia_ID",
}


class EcoTaxaReader(Reader):
    """``Item.source`` is the TSV's location (``<zip>/<member>`` inside a zip); ``Item.info`` holds
    ``container`` (the TSV's or the zip's URL), ``member`` (the TSV's name in the zip, or ''),
    ``encoding``, ``type_row``, ``blank_lines``, ``offsets``/``offset_every`` (see ``read_table``)
    and ``source``, the collection name written to ``dataset``."""

    name = "ecotaxa"
    description = "EcoTaxa TSV tables (UVP, ZooScan, IFCB, VPR exports) with their images, in folders or zips"

    def guess_can_open(self, path: str, *, storage_options: dict | None = None) -> bool:
        try:
            fs, root = fsspec.core.url_to_fs(str(path), **(storage_options or {}))
            if fs.isdir(root):
                # walk, not find: stop at the first table instead of listing a whole bucket
                for folder, _, files in fs.walk(root):
                    if any(looks_ecotaxa(fs, posixpath.join(folder, name)) for name in sorted(files)):
                        return True
                return False
            return looks_ecotaxa(fs, root)
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            if is_transient(e):
                raise  # a throttled listing is not "not ours": the caller retries
            return False

    def plan(self, path: str, *, source: str | None = None, storage_options: dict | None = None) -> list[Item]:
        fs, root = fsspec.core.url_to_fs(str(path), **(storage_options or {}))
        if fs.isdir(root):
            files = sorted(fs.find(root))
        elif fs.exists(root):
            files = [root]
        else:
            raise InputError(f"{path}: no such file or folder")
        protocol = fsspec.utils.get_protocol(str(path))
        prefix = "" if protocol == "file" else f"{protocol}://"
        items = []
        for f in files:
            if is_tsv(f):
                item = plan_tsv(fs, f, prefix + f, source=source)
                items.extend([item] if item else [])
            elif is_zip(f):
                items.extend(plan_zip(fs, f, prefix + f, source=source))
        if not items:
            raise InputError(f"{path}: no EcoTaxa TSV (with an img_file_name or object_id column) found")
        return sorted(items, key=lambda it: (it.info["container"], it.info["member"]))

    def read(self, item: Item, first: int, stop: int, *, storage_options: dict | None = None) -> pa.Table:
        if item.error or stop <= first:
            return records([])
        try:
            read_rows = read_zip_rows if item.info["member"] else read_folder_rows
            rows = read_rows(item.info, first, stop, storage_options or {})
        except (OSError, ValueError, zipfile.BadZipFile, pd.errors.ParserError) as e:
            if is_transient(e) or isinstance(e, InputError):
                raise
            raise InputError(f"{item.source}: cannot read rows {first}-{stop} ({one_line(e)})") from None
        if len(rows) != stop - first:
            raise InputError(f"{item.source}: expected {stop - first} rows from row {first}, found {len(rows)}")
        return records(rows)

    def read_keys(self, item: Item, *, storage_options: dict | None = None) -> pa.Table:
        """The ids from the table alone: no image is opened."""
        if item.error or not item.rows:
            return keys_only(records([]))
        info, so = item.info, storage_options or {}
        if info["member"]:
            with fsspec.open(info["container"], "rb", **so) as fh, zipfile.ZipFile(fh) as zf, \
                    zf.open(info["member"]) as tsv:
                table = read_table(tsv, info["encoding"], first=0, stop=item.rows, **layout(info))
        else:
            with fsspec.open(info["container"], "rb", **so) as tsv:
                table = read_table(tsv, info["encoding"], first=0, stop=item.rows, **layout(info))
        return keys_only(records(table_records(table, info["source"], lambda name: b"",
                                               set(info.get("shared_object_ids", ())))))


# ---------------------------------------------------------------------------------------------- planning


def is_tsv(path: str) -> bool:
    # "._name" files are macOS AppleDouble shadows, not tables
    return path.lower().endswith(".tsv") and not posixpath.basename(path).startswith("._")


def is_zip(path: str) -> bool:
    return path.lower().endswith(".zip") and not posixpath.basename(path).startswith("._")


def header_of(data: bytes) -> list[str]:
    """Column names on the first line of a TSV (names are ASCII, so the encoding does not matter here)."""
    line = data.removeprefix(BOM).split(b"\n", 1)[0]
    return [c.strip() for c in line.decode("iso-8859-1").split("\t")]


def is_ecotaxa_header(columns: list[str]) -> bool:
    return "img_file_name" in columns or "object_id" in columns


def looks_ecotaxa(fs: Any, path: str) -> bool:
    """Whether ``path`` is a TSV with an EcoTaxa header, or a zip holding one (reads first lines only)."""
    if is_tsv(path):
        with fs.open(path, "rb") as fh:
            return is_ecotaxa_header(header_of(fh.read(HEADER_BYTES)))
    if is_zip(path):
        with fs.open(path, "rb") as fh, zipfile.ZipFile(fh) as zf:
            for member in zip_tables(zf):
                with zf.open(member) as tsv:
                    if is_ecotaxa_header(header_of(tsv.read(HEADER_BYTES))):
                        return True
    return False


def zip_tables(zf: zipfile.ZipFile) -> list[str]:
    return sorted(m for m in zf.namelist() if is_tsv(m) and not m.startswith("__MACOSX/"))


def encoding_of(data: bytes) -> str:
    """The first of ``ENCODINGS`` that decodes ``data`` (Latin-1 decodes anything)."""
    for encoding in ENCODINGS[:-1]:
        try:
            data.decode(encoding)
            return encoding
        except UnicodeDecodeError:
            continue
    return ENCODINGS[-1]


def item_info(container: str, member: str, **more: Any) -> dict[str, Any]:
    # container: the TSV's URL, or the zip's URL when member (the TSV's name inside the zip) is set
    return {"container": container, "member": member, **more}


def plan_tsv(fs: Any, path: str, url: str, *, source: str | None) -> Item | None:
    """The item of one TSV file; None when its header is not EcoTaxa's (some other table)."""
    try:
        data = fs.cat_file(path)
    except OSError as e:
        if is_transient(e):
            raise
        return Item(source=url, rows=0, size=0, info=item_info(url, ""), error=f"{url}: unreadable ({one_line(e)})")
    if not is_ecotaxa_header(header_of(data)):
        return None
    return plan_table(data, url, item_info(url, ""), source=source)


def plan_zip(fs: Any, path: str, url: str, *, source: str | None) -> list[Item]:
    """One item per EcoTaxa TSV inside the zip at ``path``; a zip without any gives none."""
    bounds = limits.current()
    try:
        with fs.open(path, "rb") as fh, zipfile.ZipFile(fh) as zf:
            for member in zip_tables(zf):  # before reading any table into memory
                info = zf.getinfo(member)
                bounds.check_member(url, member, info.file_size, info.compress_size)
            tables = {member: zf.read(member) for member in zip_tables(zf)}
    except (OSError, zipfile.BadZipFile, InputError) as e:
        if is_transient(e):
            raise
        problem = str(e) if isinstance(e, InputError) else f"{url}: not a readable zip ({one_line(e)})"
        return [Item(source=url, rows=0, size=0, info=item_info(url, ""), error=problem)]
    return [
        plan_table(data, f"{url}/{member}", item_info(url, member), source=source)
        for member, data in tables.items()
        if is_ecotaxa_header(header_of(data))
    ]


def plan_table(data: bytes, location: str, info: dict[str, Any], *, source: str | None) -> Item:
    """Count the data rows of one EcoTaxa TSV (its bytes) and record how to read it again."""
    encoding = encoding_of(data)

    def parse(**kw: Any) -> pd.DataFrame:
        return parse_tsv(io.BytesIO(data), encoding, **kw)

    try:
        head = parse(nrows=1)
        columns = list(head.columns)
        if "img_file_name" not in columns:
            raise InputError("no img_file_name column")
        type_row = len(head) > 0 and is_type_row(head.iloc[0].tolist())
        optional = [c for c in ("acq_instrument", "object_id") if c in columns]
        wanted = [columns[0], "img_file_name", *optional]
        body = parse(usecols=list(dict.fromkeys(wanted)))
        # blank lines: the parser drops them from rows but counts them when skipping lines (read_table)
        with_blanks = parse(usecols=[columns[0]], skip_blank_lines=False)
    except (InputError, ValueError, pd.errors.ParserError) as e:
        return Item(source=location, rows=0, size=len(data), info=info, error=f"{location}: {one_line(e)}")
    rows = len(body) - int(type_row)
    blank_lines = []
    if len(with_blanks) != len(body):
        blank_lines = blank_lines_of(data, encoding, len(with_blanks) - len(body)) or \
            blank_positions(with_blanks[columns[0]].tolist(), body[columns[0]].tolist())
    if source is None:
        source = "ecotaxa"
        if "acq_instrument" in columns and rows > 0:
            instrument = "_".join(body["acq_instrument"].iloc[int(type_row)].lower().split())
            source = f"ecotaxa_{instrument}" if instrument else source
    offsets = [] if blank_lines else row_offsets(data, 1 + int(type_row), rows)
    shared: list[str] = []
    if "object_id" in columns:  # objects with several images (ZooScan _1, _1b): their ids get the file name
        ids = body["object_id"].iloc[int(type_row):].map(same_id)  # equal as the catalog will store them
        shared = sorted(set(ids[ids.duplicated(keep=False) & (ids != "")]))
    more = {"encoding": encoding, "type_row": type_row, "blank_lines": blank_lines,
            "offsets": offsets, "offset_every": CHECKPOINT, "source": source, "shared_object_ids": shared}
    return Item(source=location, rows=rows, size=len(data), info={**info, **more})


def row_offsets(data: bytes, skip_lines: int, rows: int) -> list[int]:
    """Byte offsets of data rows 0, CHECKPOINT, 2 * CHECKPOINT... when one line is one row, else [].

    Quotes may hold line breaks and a lone CR also ends a row for the parser: then rows are not lines."""
    if b'"' in data or data.count(b"\r") != data.count(b"\r\n"):
        return []
    offsets, pos = [], 0
    for line in range(skip_lines + rows):
        if line >= skip_lines and (line - skip_lines) % CHECKPOINT == 0:
            offsets.append(pos)
        pos = data.find(b"\n", pos) + 1
    return offsets


def blank_lines_of(data: bytes, encoding: str, expected: int) -> list[int]:
    """Parser rows (after the header) that are blank lines, from the records themselves: a blank line has no
    cell at all, a row of empty cells has some ('' alone cannot tell them apart). [] if the count differs from
    ``expected`` (the parser's view; then ``blank_positions`` guesses from the values)."""
    records = csv.reader(io.StringIO(data.removeprefix(BOM).decode(encoding), newline=""), delimiter="\t")
    next(records, None)  # the header
    blanks = [i for i, cells in enumerate(records) if not cells]
    return blanks if len(blanks) == expected else []


def blank_positions(with_blanks: list[str], without: list[str]) -> list[int]:
    """Parser rows (after the header) that are blank lines, from one column parsed with and without them.

    A blank line reads as '' like an empty cell; where both could match, the earlier row is taken as
    the data row, which reads the same rows back (the parser skips a blank line it starts on)."""
    blanks, j = [], 0
    for i, value in enumerate(with_blanks):
        if j == len(without):
            break  # trailing blank lines never shift a data row
        if value == without[j]:
            j += 1
        else:
            blanks.append(i)
    return blanks


def is_type_row(cells: list[Any]) -> bool:
    """EcoTaxa's optional second row of column types: every non-empty cell is ``[t]``, ``[f]``..."""
    texts = [c.strip() for c in cells if isinstance(c, str) and c.strip()]
    return bool(texts) and all(t.startswith("[") for t in texts)


# ---------------------------------------------------------------------------------------------- reading


def read_table(handle: IO[bytes], encoding: str, *, first: int = 0, stop: int | None = None,
               type_row: bool = False, blank_lines: list[int] | None = None, offsets: list[int] | None = None,
               offset_every: int = CHECKPOINT, columns: set[str] | None = None) -> pd.DataFrame:
    """Data rows ``[first, stop)`` of an EcoTaxa TSV as text ('' when empty), without the type row.

    ``type_row``, ``blank_lines``, ``offsets`` and ``offset_every`` come from the plan (``Item.info``).
    ``columns`` limits the columns parsed (default: those records need; an empty set: all).
    """
    wanted = WANTED if columns is None else columns
    kw = {"nrows": None if stop is None else stop - first, "usecols": (lambda c: c in wanted) if wanted else None}
    checkpoint = first // offset_every if offsets else 0
    if checkpoint:  # seek to a recorded row start (no quotes nor blank lines there), parse from it
        names = list(parse_tsv(handle, encoding, nrows=0).columns)
        if wanted:  # by name: with a callable, a row with more cells than names makes the parser raise IndexError
            kw["usecols"] = [name for name in names if name in wanted]
        handle.seek(offsets[checkpoint])
        table = parse_tsv(handle, encoding, header=None, names=names,
                          skiprows=first - checkpoint * offset_every, **kw)
        return table.fillna("")
    line = first + int(type_row)  # parser row (after the header) of data row ``first``, blank lines included
    for b in sorted(blank_lines or []):
        if b <= line:
            line += 1
    # the C parser skips rows without building them, but still scans them
    return parse_tsv(handle, encoding, skiprows=range(1, 1 + line), **kw).fillna("")


def parse_tsv(handle: IO[bytes], encoding: str, **kw: Any) -> pd.DataFrame:
    """pandas' C parser on a TSV, all cells as text. ``index_col=False``: without it a first row with more
    cells than the header (trailing tabs) silently turns the leading columns into an index, shifting names."""
    # A byte-order mark before Latin-1 content (spreadsheet tools write one) would decode as "ï»¿" glued to the
    # first column's name, losing that column: skip it whatever the encoding is.
    if handle.tell() == 0 and handle.read(len(BOM)) != BOM:
        handle.seek(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pd.errors.ParserWarning)  # the extra empty cells it drops
        return pd.read_csv(handle, sep="\t", dtype=str, keep_default_na=False, encoding=encoding,
                           index_col=False, **{"header": 0, **kw})


def layout(info: dict[str, Any]) -> dict[str, Any]:
    """The ``read_table`` arguments the plan recorded."""
    return {k: info[k] for k in ("type_row", "blank_lines", "offsets", "offset_every")}


def read_folder_rows(info: dict[str, Any], first: int, stop: int, so: dict) -> list[dict[str, Any]]:
    fs, tsv_path = fsspec.core.url_to_fs(info["container"], **so)
    with fs.open(tsv_path, "rb") as tsv:
        table = read_table(tsv, info["encoding"], first=first, stop=stop, **layout(info))
    folder = posixpath.dirname(tsv_path)

    def load(name: str) -> bytes:
        path = image_path(info["container"], folder, name)
        if isinstance(fs, LocalFileSystem):
            real, root = os.path.realpath(path), os.path.realpath(folder)
            if os.path.commonpath([real, root]) != root:
                raise InputError(f"{info['container']}: img_file_name '{repr(name)[1:-1]}' is a link leading "
                                 "out of the table's folder")
        try:
            return fs.cat_file(path)
        except OSError as e:  # a missing image marks its row (missing_image), not the whole read
            if is_transient(e):
                raise  # a timeout is not a missing image: the shard task is retried
            raise InputError(f"{info['container']}: cannot read image '{repr(name)[1:-1]}' "
                             f"({type(e).__name__})") from None

    return table_records(table, info["source"], load, set(info.get("shared_object_ids", ())))


def read_zip_rows(info: dict[str, Any], first: int, stop: int, so: dict) -> list[dict[str, Any]]:
    bounds = limits.current()
    with fsspec.open(info["container"], "rb", **so) as fh, zipfile.ZipFile(fh) as zf:
        with zf.open(info["member"]) as tsv:
            table = read_table(tsv, info["encoding"], first=first, stop=stop, **layout(info))
        members = {i.filename: i for i in zf.infolist()}
        folder = posixpath.dirname(info["member"])

        def load(name: str) -> bytes:
            member = image_path(info["container"], folder, name)
            if member not in members:
                raise InputError(f"{info['container']}: no member '{repr(member)[1:-1]}'")
            found = members[member]
            bounds.check_member(info["container"], member, found.file_size, found.compress_size)
            return zf.read(found)

        return table_records(table, info["source"], load, set(info.get("shared_object_ids", ())))


def image_path(container: str, folder: str, name: str) -> str:
    """Where ``img_file_name`` lies, relative to the table's folder; InputError for a name that would leave it."""
    # img_file_name may hold sub-folders, written with backslashes by Windows tools
    relative = name.strip().replace("\\", "/")
    check_member_name(container, relative)  # absolute, or '..': never read
    return posixpath.normpath(posixpath.join(folder, relative))


def table_records(table: pd.DataFrame, source: str, load: Any, shared_object_ids: set[str] | None = None
                  ) -> list[dict[str, Any]]:
    """Records for the rows of ``read_table``; ``load(img_file_name)`` gives the image bytes, or raises
    InputError saying why it cannot (the row then has no image, and that reason).

    Ids of objects with several images (``shared_object_ids``) get the image's file name, so that
    every image keeps its own catalog id."""
    rows = []
    cache: dict[str, tuple[bytes | None, str]] = {}  # several rows may name one image
    for cells in table.to_dict("records"):
        name = cells.get("img_file_name", "")
        if name and name not in cache:
            try:
                cache[name] = (load(name), "")
            except InputError as e:
                cache[name] = (None, str(e))
        data, why = cache.get(name, (None, "")) if name else (None, "no img_file_name")
        row: dict[str, Any] = {
            "image": {"bytes": data, "path": name},
            "image_error": why,
            "dataset": source,
            "ObjID": object_id(cells.get("object_id", ""), name, shared_object_ids or set()),
            "instrument": instrument_family(cells.get("acq_instrument", "")),
            # the sample (a net tow, a UVP profile); an export without sample columns has acquisitions at least
            "sample": (cells.get("sample_id", "").strip() or cells.get("acq_id", "").strip()),
            "original_path": name,
            "original_label": cells.get("object_annotation_category", ""),
            "Latitude": parse_coordinate(cells.get("object_lat", "")),
            "Longitude": parse_coordinate(cells.get("object_lon", "")),
            "Depth_min": parse_number(cells.get("object_depth_min", "")),
            "Depth_max": parse_number(cells.get("object_depth_max", "")),
            "timestamp": parse_time(cells.get("object_date", ""), cells.get("object_time", "")),
        }
        row["reader_qc"] = unparsed_flags(row, cells)
        for column, record_column in TEXT_COLUMNS.items():
            if column in cells:
                row[record_column] = cells[column].strip()
        if "acq_pixel" in cells:
            row["pixel_size_um"] = parse_number(cells["acq_pixel"])  # EcoTaxa gives µm per pixel
        row["volume_analysed_ml"] = zooscan_volume_ml(cells)
        rows.append(row)
    return rows


def zooscan_volume_ml(cells: dict[str, str]) -> float | None:
    """Water a ZooScan scan stands for: the volume the net filtered (``sample_tot_vol``, m³) over the sub-sampling
    part scanned (``acq_sub_part``: 4 = a quarter), in mL; None for other instruments (their volumes are
    instrument-specific: UVP's image volume times a frame count the export does not hold) or missing values."""
    if instrument_family(cells.get("acq_instrument", "")) != "ZooScan":
        return None
    filtered, part = parse_number(cells.get("sample_tot_vol", "")), parse_number(cells.get("acq_sub_part", ""))
    if filtered is None or part is None or filtered <= 0 or part <= 0:
        return None
    return filtered * 1e6 / part


MISSING_WORDS = {"", "nan", "na", "n/a", "none", "null", "-"}  # cells that say "no value" rather than a bad one
PARSED_FROM = {"lat": ("Latitude", "object_lat"), "lon": ("Longitude", "object_lon"),
               "depth_min": ("Depth_min", "object_depth_min"), "depth_max": ("Depth_max", "object_depth_max"),
               "time": ("timestamp", "object_date")}


def unparsed_flags(row: dict[str, Any], cells: dict[str, str]) -> str:
    """QC flags (``lat_unparsed``...) for cells that hold a value this reader could not parse ("inf", "abc",
    43°75'), so that a bad value is flagged in the catalog's ``qc`` rather than silently missing."""
    flags = [f"{name}_unparsed" for name, (column, cell) in PARSED_FROM.items()
             if row[column] is None and str(cells.get(cell, "")).strip().lower() not in MISSING_WORDS]
    return ";".join(flags)


def object_id(obj: str, image_name: str, shared: set[str]) -> str:
    return f"{obj}/{posixpath.basename(image_name)}" if same_id(obj) in shared else obj


def same_id(obj: str) -> str:
    """An object id as the ingest stores it (``records._text``: NFC, ``12.0`` as ``12``), so that ids equal
    there are found shared here."""
    return unicodedata.normalize("NFC", re.sub(r"^(\d+)\.0$", r"\1", obj))


def parse_number(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


# degrees, then optional minutes and seconds; "°" may arrive as "Â°" (UTF-8 read as Latin-1) or "º"
_DEGREES = re.compile(
    r"""^(?P<sign>[+-])?\s*(?P<deg>\d+(?:\.\d*)?)\s*(?:Â?°|º)
        \s*(?:(?P<min>\d+(?:\.\d*)?)\s*['′]?
        \s*(?:(?P<sec>\d+(?:\.\d*)?)\s*(?:"|″|'')?)?)?$""",
    re.VERBOSE,
)


def parse_coordinate(text: str) -> float | None:
    """Decimal degrees from ``43.5``, ``-12.25``, ``43°30.5``, ``43°0 0`` (UVP: degrees, minutes, seconds),
    ``-12°15.25'`` or ``12°15'S``; None when unparseable. No range check."""
    text = (text or "").strip()
    value = parse_number(text)
    if value is not None or not text:
        return value
    hemisphere = ""
    if text[-1].upper() in "NSEW":
        hemisphere, text = text[-1].upper(), text[:-1].strip()
    elif text[0].upper() in "NSEW":
        hemisphere, text = text[0].upper(), text[1:].strip()
    value = parse_number(text)  # "12.25S"
    if value is None:
        m = _DEGREES.match(text)
        if not m:
            return None
        value = float(m["deg"]) + float(m["min"] or 0) / 60 + float(m["sec"] or 0) / 3600
        if float(m["min"] or 0) >= 60 or float(m["sec"] or 0) >= 60:
            return None
        if m["sign"] == "-":  # the sign applies to the whole angle, minutes included
            value = -value
    return -abs(value) if hemisphere in ("S", "W") else value


def parse_time(date: str, time: str) -> str | None:
    """ISO 8601 UTC text from ``object_date`` (YYYYMMDD) and ``object_time`` (HHMMSS, HHMMSS.sss or
    HH:MM:SS.sss; a missing time is midnight); None without a valid date and time."""
    date = (date or "").strip().replace("-", "")
    if not (len(date) == 8 and date.isdigit()):
        return None
    time = (time or "").strip().replace(":", "")
    whole, _, fraction = time.partition(".")
    # times written as numbers lose their leading zeros: "90239" is 09:02:39, "420" is 00:04:20
    whole = whole.zfill(6) if whole else "000000"
    if not (len(whole) == 6 and whole.isdigit() and (fraction == "" or fraction.isdigit())):
        return None
    try:
        moment = datetime.strptime(date + whole, "%Y%m%d%H%M%S")
    except ValueError:
        return None
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    return f"{text}.{fraction[:6]}Z" if fraction else f"{text}Z"
