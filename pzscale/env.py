"""The env stage: each image placed in its environment (temperature, salinity, chlorophyll ...)
by a nearest-cell join of its position, depth and time with a gridded product, per catalog shard.

For every joined name it writes two arrays along ``image``:

- ``env_<name>`` float32: the grid value (kelvin converted to degC), NaN unless the QC says
  ok or land_filled; attributes record the grid (path without credentials), the variable,
  units, method and tolerances;
- ``env_<name>_qc`` int8, a CF flag variable (``flag_values`` -1..4, ``flag_meanings``; catalog
  layout 2, strings in layout 1: ``pzscale migrate``); ``grids.qc_names`` gives the strings:

  ====  ===============  ==============================================================================
  0     ``ok``           nearest cell within every tolerance, finite value
  1     ``out_of_range`` outside a tolerance: off the grid's box, before/after its time span, deeper
                         than its deepest level (a climatology has no time span)
  2     ``land_filled``  the nearest cell is NaN (land, ice, no data); the value is the nearest finite
                         cell of the same time and level within ``land_fill_km``
  3     ``no_data``      the nearest cell is NaN and no fill was asked or found within the radius
  4     ``no_position``  lat/lon unknown, or the time or depth this grid needs is unknown
  -1    ``not_joined``   not joined yet (the array's fill)
  ====  ===============  ==============================================================================

  Codes, not strings, because a string array costs ~30 ms a 65,536-row shard to write and as much to
  read (zarr's variable-length UTF-8 path), a quarter of the stage; int8 costs ~2 ms.

The grid is opened on the workers (by path or URL and its storage options, never shipped from
the client), once per worker process while the file is unchanged (``grids._OPENED``: its axes
are kept, its NetCDF handle closed between tasks), and only the box of cells a shard's points
need is read (``grids._BOXES`` keeps recent boxes). A shard is done for
``env/<name>`` when its marker covers the shard's rows and carries the hash of the join's
parameters; joining the same name again with other parameters needs ``overwrite=True``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import replace

import numpy as np
from distributed import Client

from pzscale import grids
from pzscale.catalog import storable_attrs
from pzscale.errors import CatalogError, InputError
from pzscale.grids import JoinOptions
from pzscale.schema import env_names
from pzscale.stage import Catalog, ShardResult, ShardTask, StageReport, pending, require_client, run_stage

POINT_COLUMNS = ("lat", "lon", "depth_min", "depth_max", "time")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def names(name: str) -> dict[str, str]:
    """Catalog variables and stage the env stage writes for a joined name."""
    return env_names(name)


def parse_variables(specs: list[str] | dict[str, str]) -> dict[str, str]:
    """``["sst=analysed_sst", "so"]`` -> ``{"sst": "analysed_sst", "so": "so"}`` (NAME=VARIABLE or NAME,
    NAME being also a ``grids.VARIABLE_MAP`` alias)."""
    pairs = dict(specs) if isinstance(specs, dict) else dict(
        (s.split("=", 1) if "=" in s else (s, s)) for s in specs)
    if not pairs:
        raise InputError("no variable to join: give at least one NAME=VARIABLE")
    for name, var in pairs.items():
        if not _NAME.match(name) or not var:
            raise InputError(f"bad variable spec {name}={var}: NAME must be a letter then letters, digits or _")
    return pairs


def params_hash(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def env_shard(task: ShardTask) -> ShardResult:
    """Join the task's variables for one shard and write every array of the shard (the runner writes
    one marker per variable after)."""
    p = task.params
    points = task.catalog.read(task.start, task.stop, POINT_COLUMNS)
    joined = grids.join_variables(p["grid"], p["variables"], points, options=JoinOptions(**p["options"]),
                                  storage_options=p["grid_storage_options"], codes=True)
    columns, markers = {}, {}
    for name, (values, codes) in joined.items():
        columns[names(name)["value"]], columns[names(name)["qc"]] = values, codes.astype(np.int8)
        counts = np.bincount(codes, minlength=len(grids.QC_VALUES))
        markers[names(name)["stage"]] = {"params": p["hashes"][name],
                                         "qc": {flag: int(c) for flag, c in zip(grids.QC_VALUES, counts, strict=True)}}
    task.catalog.write(task.start, task.stop, columns)
    return ShardResult(task.stop - task.start, markers, replace=True)


def env(
    url: str,
    grid: str,
    variables: list[str] | dict[str, str],
    *,
    options: JoinOptions | None = None,
    client: Client | None = None,
    storage_options: dict | None = None,
    grid_storage_options: dict | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> StageReport:
    """Join grid variables at every image's position, depth and time (resumable, one task per shard).

    ``variables`` maps the name written (``env_<name>``) to the grid's variable or an alias from
    ``grids.VARIABLE_MAP`` (``["sst"]`` finds ``analysed_sst`` in OSTIA). The grid is checked
    on the client first (variables, axes, calendars), so a bad grid fails before any write.
    """
    options = options or JoinOptions()
    pairs = parse_variables(variables)
    client = require_client(client)
    cat = Catalog.open(url, storage_options)
    stages = cat.metadata().get("stages", {})
    described, records, hashes = {}, {}, {}
    with grids.opened(grid, storage_options=grid_storage_options) as ds:
        for name, var in pairs.items():
            resolved = grids.resolve_variable(ds, var, where=grids.redact(grid))
            described[name] = grids.Grid(ds[resolved], source=grid, options=options).describe()
            records[name] = {"grid": grids.redact(grid), "variable": resolved, "options": options.record(),
                             "units": described[name]["units"]}
            hashes[name] = params_hash(records[name])
            previous = stages.get(names(name)["stage"])
            if previous and previous.get("params") != hashes[name] and not overwrite:
                raise CatalogError(
                    f"{url}: env_{name} was joined from {previous.get('grid')} variable {previous.get('variable')} "
                    f"with other parameters ({previous.get('options')}); pass overwrite=True (--overwrite) to "
                    "recompute it with these")
    for name, desc in described.items():
        n = names(name)
        _ensure_output(cat, n["value"], "float32", np.nan, {
            **desc, "description": f"{desc['variable']} of {desc['grid']} at the image "
                                   "(NaN unless the QC is ok or land_filled)"})
        _ensure_output(cat, n["qc"], "int8", grids.QC_NOT_JOINED, {
            "description": f"QC of env_{name} (CF flags; -1: not joined yet)", "long_name": f"QC of env_{name}",
            "flag_values": list(grids.QC_FLAG_VALUES), "flag_meanings": grids.QC_FLAG_MEANINGS,
            "grid": desc["grid"], "variable": desc["variable"]})
        cat.record_stage(n["stage"], {**records[name], "params": hashes[name]})
    resolved = {name: record["variable"] for name, record in records.items()}
    params = {"grid": grid, "grid_storage_options": grid_storage_options,
              "options": {**options.record(), "max_box_bytes": options.max_box_bytes}}
    tasks, skipped = _pending(cat, resolved, hashes, params)
    return run_stage("env/" + ",".join(pairs), env_shard, tasks, catalog=cat, client=client, skipped=skipped,
                     progress_bar=progress)


def _ensure_output(cat: Catalog, name: str, dtype: str, fill: object, attrs: dict) -> None:
    """An output array with these attributes: made with them, or given those that changed (each
    change rewrites the consolidated metadata: a rerun with the same grid and options rewrites none)."""
    arr = cat.ensure_array(name, dtype=dtype, fill=fill, attrs=attrs)
    stored = arr.attrs.asdict()
    if any(_json(stored.get(key)) != _json(value) for key, value in storable_attrs(attrs).items()):
        cat.update_attrs(name, attrs)


def _json(value: object) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _pending(cat: Catalog, pairs: dict[str, str], hashes: dict[str, str], params: dict) -> tuple[list[ShardTask], int]:
    """One task per shard with a variable whose marker is missing, stale (other parameters) or
    short (the catalog grew since); and the count of shards with nothing to do."""
    todo: dict[int, tuple[ShardTask, dict[str, str]]] = {}
    for name, var in pairs.items():
        # a shard's variables are joined together, whole: rows already joined are joined again
        tasks, _ = pending(cat, names(name)["stage"], valid=lambda info, name=name: info.get("params") == hashes[name])
        for task in tasks:
            todo.setdefault(task.shard, (task, {}))[1][name] = var
    tasks = [replace(task, row_from=task.start, stage="env", params={**params, "variables": variables,
                                                                     "hashes": {k: hashes[k] for k in variables}})
             for task, variables in (todo[shard] for shard in sorted(todo))]
    return tasks, len(cat.shards()) - len(tasks)
