"""Reader registry: built-in readers and third-party ones from the entry-point group
``pzscale.readers`` (``name = "package.module:ReaderClass"``).

``get(name)`` returns a reader instance, ``guess(path)`` asks each reader's
``guess_can_open`` (third-party readers first, then the built-ins from the most to the
least specific), ``available()`` lists them.
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from importlib.metadata import entry_points

from pzscale.errors import InputError
from pzscale.readers.base import Item, Reader, encode_png, records

__all__ = ["Item", "Reader", "available", "encode_png", "get", "guess", "records"]

ENTRY_POINT_GROUP = "pzscale.readers"

# Most specific first: the class-folder reader accepts any tree of images, so it goes last.
BUILTIN = {
    "parquet": "pzscale.readers.parquet:ParquetReader",
    "ifcb": "pzscale.readers.ifcb:IFCBReader",
    "ecotaxa": "pzscale.readers.ecotaxa:EcoTaxaReader",
    "webdataset": "pzscale.readers.webdataset:WebDatasetReader",
    "folder": "pzscale.readers.folder:ClassFolderReader",
}


def _load(target: str) -> type[Reader]:
    module, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, Reader)):
        raise TypeError(f"{target} is not a pzscale.readers.Reader subclass")
    return cls


@lru_cache
def _third_party() -> dict[str, str]:
    found = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in BUILTIN:  # no silent clobbering of a built-in format
            raise InputError(f"reader entry point {ep.name!r} ({ep.value}) shadows a built-in reader")
        found[ep.name] = ep.value
    return found


def available() -> dict[str, str]:
    """Reader name -> 'module:Class', third-party readers first."""
    return {**_third_party(), **BUILTIN}


@lru_cache
def get(name: str) -> Reader:
    """The reader called ``name``; an unknown name lists the ones installed."""
    targets = available()
    if name not in targets:
        raise InputError(f"unknown format {name!r}; installed readers: {', '.join(targets)}")
    return _load(targets[name])()


def guess(path: str, *, storage_options: dict | None = None) -> Reader:
    """The first reader whose ``guess_can_open`` accepts ``path``."""
    for name in available():
        reader = get(name)
        if reader.guess_can_open(path, storage_options=storage_options):
            return reader
    raise InputError(f"{path}: no reader recognises this input; pass --format ({', '.join(available())})")
