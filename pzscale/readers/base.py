"""The reader contract: plan items cheaply, then read rows of an item as records.

A reader turns one kind of input (Planktonzilla parquet, IFCB bins, EcoTaxa exports,
class-folder archives, WebDataset tars) into **records**: a ``pyarrow.Table`` whose
columns are the Planktonzilla parquet columns (``RECORD_COLUMNS``; any may be missing,
``image`` is required). Every reader feeds the same plan -> shard-task -> write path
in ``pzscale.ingest``, so resume and append work alike for all formats.

Readers never write. They report per-item problems found while planning as
``Item.error`` (the item then yields no rows and the ingest report lists it), and
per-row problems as a row whose ``image`` bytes are empty (with the reason in
``image_error`` when the reader refused them) or undecodable. Transient storage errors
(``pzscale.faults.is_transient``) are raised as they are, never turned into a row's or an
item's problem, so that the shard task is retried instead of recording a missing image.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
from PIL import Image

from pzscale.schema import PARQUET_COLUMNS

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

# Columns a reader may fill beyond Planktonzilla's 30 (pzscale's own additions).
EXTRA_COLUMNS = {
    "sample": pa.string(),  # the sample an image was taken in (IFCB bin, EcoTaxa sample_id, folder above the class)
    "volume_analysed_ml": pa.float64(),  # sample volume imaged, for abundance (IFCB ml_analyzed)
    "pixel_size_um": pa.float64(),  # physical size of one pixel (EcoTaxa acq_pixel, in micrometres)
    "original_hierarchy": pa.string(),  # the source's own label path (EcoTaxa annotation hierarchy)
    "annotation_status": pa.string(),  # validated / predicted / dubious / unclassified ('' unknown)
    "lineage": pa.string(),  # only when the source gives a lineage text but no ranks (WebDataset)
    "instrument": pa.string(),  # instrument family when the reader knows it (IFCB, UVP6, ...)
    "image_error": pa.string(),  # why a row has no image bytes when a reader refused to read them (unsafe path)
    "reader_qc": pa.string(),  # ';'-joined QC flags of values the reader could not parse (lat_unparsed...)
}
NUMBER_COLUMNS = {"Latitude", "Longitude", "Depth_min", "Depth_max", "Humidity", "Temperature"}


def record_type(column: str) -> pa.DataType:
    if column == "image":
        return IMAGE_TYPE
    if column == "plankton":
        return pa.bool_()
    if column in NUMBER_COLUMNS:
        return pa.float64()
    if column in EXTRA_COLUMNS:
        return EXTRA_COLUMNS[column]
    return pa.string()


RECORD_COLUMNS = (*PARQUET_COLUMNS, *EXTRA_COLUMNS)


@dataclass(frozen=True)
class Item:
    """One unit of input a reader plans: a parquet file, an IFCB bin, a TSV, an archive.

    ``rows`` must be exact: the plan gives every row a catalog row before any is read.
    ``info`` holds whatever ``read`` needs again (JSON-serialisable: it travels to workers
    and into the catalog's plan record). ``error`` marks an item that cannot be read at
    all (an empty or partial IFCB bin...): it has ``rows == 0`` and is reported, not fatal.
``notes`` are what the ingest report should tell of an item that is read (files of a folder
skipped and why, a header that disagrees with the data), one line each, naming the file.
    """

    source: str  # path or URL of the item: what errors and the report name
    rows: int
    size: int
    info: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    notes: list[str] = field(default_factory=list)  # what the report should say of a readable item


class Reader:
    """Base class of readers. Subclasses set ``name`` and ``description`` and implement
    ``guess_can_open``, ``plan`` and ``read``; they are registered by name (built-ins) or
    through the entry-point group ``pzscale.readers`` (third parties)."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def guess_can_open(self, path: str, *, storage_options: dict | None = None) -> bool:
        """Cheap check (names, magic bytes) whether this reader understands ``path``."""
        raise NotImplementedError

    def plan(self, path: str, *, source: str | None = None, storage_options: dict | None = None) -> list[Item]:
        """Items under ``path`` (a file or a folder), in a deterministic order, with exact row counts.

        ``source`` names the collection (Planktonzilla's ``dataset``) when the input does not.
        Raise ``pzscale.errors.InputError`` (one line, naming the file) only when nothing
        under ``path`` can be read; otherwise report bad items through ``Item.error``.
        """
        raise NotImplementedError

    def read(self, item: Item, first: int, stop: int, *, storage_options: dict | None = None) -> pa.Table:
        """Rows ``[first, stop)`` of ``item`` as records (see ``records``)."""
        raise NotImplementedError

    def read_keys(self, item: Item, *, storage_options: dict | None = None) -> pa.Table:
        """All rows of ``item`` with only the columns image ids are made of (``KEY_COLUMNS``), for the
        ingest's id check before it writes. This default reads the rows in blocks and drops the images;
        readers override it where the ids come without reading images."""
        blocks = [self.read(item, first, min(first + KEY_BLOCK, item.rows), storage_options=storage_options)
                  for first in range(0, item.rows, KEY_BLOCK)]
        return keys_only(pa.concat_tables(blocks, promote_options="permissive") if blocks else records([]))

    def __repr__(self) -> str:
        return f"<pzscale reader {self.name!r}: {self.description}>"


KEY_COLUMNS = ("dataset", "ObjID", "original_path")  # what ``records.image_ids`` is made of
KEY_BLOCK = 4096


def keys_only(table: pa.Table) -> pa.Table:
    """The key columns of a records table, in their own types (``records.ids_of_table`` turns them to text as
    the ingest does)."""
    columns = {c: table.column(c) for c in KEY_COLUMNS if c in table.column_names}  # as read: the ids are made alike
    return pa.table(columns) if columns else pa.table({"dataset": pa.nulls(table.num_rows, pa.string())})


def records(rows: list[dict[str, Any]]) -> pa.Table:
    """A records table from dicts keyed by ``RECORD_COLUMNS`` names.

    ``image`` is ``{"bytes": ..., "path": ...}`` with *encoded* image bytes (use
    ``encode_png`` for raw pixels); columns no row has are left out.
    """
    present = [c for c in RECORD_COLUMNS if any(c in r for r in rows)]
    if "image" not in present:
        present.insert(0, "image")
    schema = pa.schema([pa.field(c, record_type(c)) for c in present])
    return pa.Table.from_pylist([{c: r.get(c) for c in present} for r in rows], schema=schema)


def encode_png(pixels: np.ndarray) -> bytes:
    """Lossless PNG of raw pixels (8- or 16-bit greyscale, or RGB): decoding gives them back exactly."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)  # fast; size is not the point
    return buf.getvalue()
