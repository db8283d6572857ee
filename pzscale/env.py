"""The env stage: each image placed in its environment (temperature, salinity, chlorophyll ...)
by a nearest-cell join of its position, depth and time with a gridded product, per catalog shard.

For every joined name it writes two arrays along ``image``:

- ``env_<name>`` float32: the grid value (kelvin converted to degC), NaN unless the QC says
  ok or land_filled; attributes record the grid (path without credentials), the variable,
  units, method and tolerances;
- ``env_<name>_qc`` str, one of:

  ===============  ==============================================================================
  ``ok``           nearest cell within every tolerance, finite value
  ``out_of_range`` outside a tolerance: off the grid's box, before/after its time span, deeper
                   than its deepest level (a climatology has no time span)
  ``land_filled``  the nearest cell is NaN (land, ice, no data); the value is the nearest finite
                   cell of the same time and level within ``land_fill_km``
  ``no_data``      the nearest cell is NaN and no fill was asked or found within the radius
  ``no_position``  lat/lon unknown, or the time or depth this grid needs is unknown
  ``""``           not joined yet (the array's fill)
  ===============  ==============================================================================

The grid is opened inside each task (by path or URL and its storage options, never shipped
from the client) and only the box of cells a shard's points need is read. A shard is done for
``env/<name>`` when its marker covers the shard's rows and carries the hash of the join's
parameters; joining the same name again with other parameters needs ``overwrite=True``.
"""

from __future__ import annotations

import hashlib
import json
import re
import time

import numpy as np
from distributed import Client, get_client

from pzscale import catalog, grids
from pzscale.errors import CatalogError, InputError, StageError
from pzscale.grids import JoinOptions
from pzscale.progress import StageReport, run_shards

POINT_COLUMNS = ("lat", "lon", "depth_min", "depth_max", "time")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def names(name: str) -> dict[str, str]:
    """Catalog variables and stage the env stage writes for a joined name."""
    return {"value": f"env_{name}", "qc": f"env_{name}_qc", "stage": f"env/{name}"}


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


def env_shard(task: dict) -> dict:
    """Join the task's variables for one shard, write every array of the shard, then the markers."""
    started = time.perf_counter()
    url, so = task["catalog"], task["storage_options"]
    start, stop = task["start"], task["stop"]
    group = catalog.open_group(url, mode="r+", storage_options=so, check=False)
    points = catalog.read_rows(group, start, stop, POINT_COLUMNS)
    options = JoinOptions(**task["options"])
    joined = grids.join_variables(task["grid"], task["variables"], points, options=options,
                                  storage_options=task["grid_storage_options"])
    columns = {}
    for name, (values, qc) in joined.items():
        columns[names(name)["value"]], columns[names(name)["qc"]] = values, qc
    catalog.write_arrays(group, start, stop, columns)
    for name, (_, qc) in joined.items():
        counts = {flag: int(np.count_nonzero(qc == flag)) for flag in grids.QC_VALUES}
        catalog.mark_done(url, names(name)["stage"], task["shard"],
                          {"rows": [start, stop], "params": task["hashes"][name], "qc": counts},
                          storage_options=so, replace=True)
    return {"shard": task["shard"], "rows": stop - start, "seconds": time.perf_counter() - started}


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
    try:
        client = client or get_client()
    except ValueError:
        raise StageError("no Dask client: start one with pzscale.cluster.connect()") from None
    group = catalog.open_group(url, mode="r+", storage_options=storage_options)
    stages = catalog.metadata(group).get("stages", {})
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
        value = catalog.ensure_array(group, n["value"], dtype="float32", fill=np.nan)
        value.attrs.update({**desc, "description": f"{desc['variable']} of {desc['grid']} at the image "
                                                   "(NaN unless the QC is ok or land_filled)"})
        qc = catalog.ensure_array(group, n["qc"], dtype="str", fill="")
        qc.attrs.update({"description": f"QC of env_{name}: one of {list(grids.QC_VALUES)}; '' not joined",
                         "flag_values": list(grids.QC_VALUES), "grid": desc["grid"], "variable": desc["variable"]})
        catalog.record_stage(group, n["stage"], {**records[name], "params": hashes[name]})
    resolved = {name: record["variable"] for name, record in records.items()}
    tasks, skipped = _pending(url, resolved, hashes, storage_options)
    common = {"catalog": url, "storage_options": storage_options, "grid": grid,
              "grid_storage_options": grid_storage_options, "options": {**options.record(),
                                                                        "max_box_bytes": options.max_box_bytes}}
    stage = "env/" + ",".join(pairs)
    run = run_shards(client, env_shard, [{**t, **common, "hashes": {k: hashes[k] for k in t["variables"]}}
                                         for t in tasks], desc="env", skipped=skipped, show=progress)
    report = StageReport(stage, url, len(tasks) + skipped, skipped, len(run.results), run.images, run.seconds,
                         [f"shard {t['shard']}: {m}" for t, m in run.failures])
    if run.failures:
        raise StageError(f"{len(run.failures)} shard(s) failed; rerun to resume:\n{report}")
    return report


def _pending(url: str, pairs: dict[str, str], hashes: dict[str, str],
             storage_options: dict | None) -> tuple[list[dict], int]:
    """One task per shard with a variable whose marker is missing, stale (other parameters) or
    short (the catalog grew since); and the count of shards with nothing to do."""
    group = catalog.open_group(url, storage_options=storage_options)
    n_rows, shard_len = catalog.n_rows_of(group), catalog.metadata(group)["shard_len"]
    done = {}
    for name in pairs:
        infos = catalog.marker_infos(url, names(name)["stage"], storage_options=storage_options)
        done[name] = {s for s, info in infos.items() if info.get("params") == hashes[name]
                      and info.get("rows", [0, 0])[1] >= min(n_rows, (s + 1) * shard_len)}
    tasks, skipped = [], 0
    for shard, start, stop in catalog.shard_ranges(0, n_rows, shard_len):
        todo = {name: var for name, var in pairs.items() if shard not in done[name]}
        if todo:
            tasks.append({"shard": shard, "start": start, "stop": stop, "variables": todo})
        else:
            skipped += 1
    return tasks, skipped
