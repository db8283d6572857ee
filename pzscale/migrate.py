"""Bring a catalog written by an older pzscale to the current layout: ``pzscale migrate --catalog URL``.

Layout 2 -> 3: the ``sample`` variable, empty ('' = unknown) for the rows ingested before (no data is written: the
array's fill value is ''; reingesting the inputs into a new catalog fills it).

Layout 1 -> 2: every env QC array (``env_<name>_qc``, strings) becomes a CF flag variable of int8 codes
(``grids.QC_FLAG_VALUES``; its other attributes kept). Safe to interrupt and rerun: the codes are first written
whole to a side array ``_migrating_<name>``, only then is the string array replaced by them, and the layout is
raised last, so a rerun carries on from the step it reached and nothing is lost in between. It runs on the client,
one shard at a time (a 17.4M-row catalog: ~4,300 shards of each QC array at ~35 ms each, ~2.5 minutes per array
on local disk); catalogs of the current layout are left as they are.
"""

from __future__ import annotations

import contextlib

import numpy as np
import zarr

from pzscale import catalog, grids
from pzscale.errors import CatalogError
from pzscale.schema import VARIABLE_NAMES

SIDE = "_migrating_"


def migrate(url: str, *, storage_options: dict | None = None, log=print) -> dict:
    """Migrate the catalog at ``url`` in place; returns {"from": layout, "to": layout, "arrays": [migrated]}."""
    group = catalog.open_group(url, mode="r+", storage_options=storage_options, check=False,
                               layouts=(*catalog.MIGRATABLE_LAYOUTS, catalog.LAYOUT_VERSION))
    layout = catalog.metadata(group)["layout"]
    if layout == catalog.LAYOUT_VERSION:
        return {"from": layout, "to": layout, "arrays": []}
    arrays = dict(group.arrays())
    # string QC arrays, and those a stopped run left half done (side array present)
    names = sorted({name for name, arr in arrays.items() if _is_env_qc(name) and arr.dtype.kind in "TUO"}
                   | {name[len(SIDE):] for name in arrays if name.startswith(SIDE)})
    for name in names:
        _migrate_qc(group, name)
        log(f"{url}: {name} is now int8 QC codes (CF flags)")
    added = sorted(set(VARIABLE_NAMES) - set(group.array_keys()))
    catalog.ensure_rows(group, catalog.n_rows_of(group))  # variables of later layouts (sample), all fill
    if added:
        log(f"{url}: {', '.join(added)} added, '' (unknown) for every row")
    names += added
    catalog.update_metadata(group, layout=catalog.LAYOUT_VERSION)
    return {"from": layout, "to": catalog.LAYOUT_VERSION, "arrays": names}


def _is_env_qc(name: str) -> bool:
    return name.startswith("env_") and name.endswith("_qc")


def _migrate_qc(group: zarr.Group, name: str) -> None:
    side = SIDE + name
    arrays = dict(group.arrays())
    old = arrays.get(name)
    if old is not None and old.dtype.kind in "TUO":
        if side not in arrays or not arrays[side].attrs.get("complete"):
            attrs = {**old.attrs.asdict(), **_flag_attrs(name)}
            catalog.ensure_array(group, side, dtype="int8", fill=grids.QC_NOT_JOINED, attrs=attrs)
            _copy(group, name, side, grids.qc_codes)
            catalog.update_attrs(group, side, {"complete": True})
        del group[name]
        catalog.consolidate(group)
    elif side not in arrays:
        raise CatalogError(f"{name}: neither strings to migrate nor the codes of a migration under way")
    attrs = {k: v for k, v in group[side].attrs.asdict().items() if k != "complete"}
    catalog.ensure_array(group, name, dtype="int8", fill=grids.QC_NOT_JOINED, attrs=attrs)
    _copy(group, side, name, lambda codes: codes)
    with contextlib.suppress(KeyError):
        del group[side]
    catalog.consolidate(group)


def _copy(group: zarr.Group, source: str, target: str, convert) -> None:
    shard_len, n_rows = catalog.metadata(group)["shard_len"], catalog.n_rows_of(group)
    for _, start, stop in catalog.shard_ranges(0, n_rows, shard_len):
        values = catalog.read_rows(group, start, stop, [source])[source]
        catalog.write_arrays(group, start, stop, {target: np.asarray(convert(values), np.int8)})


def _flag_attrs(name: str) -> dict:
    return {"flag_values": list(grids.QC_FLAG_VALUES), "flag_meanings": grids.QC_FLAG_MEANINGS,
            "description": f"QC of {name[:-3]} (CF flags; -1: not joined yet)", "long_name": f"QC of {name[:-3]}"}
