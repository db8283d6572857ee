"""The sharded Zarr v3 catalog: layout, shard-aligned writes, done markers, and reading.

One Zarr group per collection of images; every per-image array is 1-D (or leads with)
the ``image`` dimension and is sharded with the same shard length, so one task owns
shard ``i`` of every array and each write is one object per array (atomic on S3).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from importlib.metadata import version
from typing import Any

import fsspec
import numpy as np
import xarray as xr
import zarr
from fsspec.implementations.local import LocalFileSystem
from zarr.core.sync import sync

from pzscale import images, progress
from pzscale.errors import CatalogError, ShardAlignmentError, one_line
from pzscale.progress import call_with_backoff
from pzscale.schema import BY_NAME, COORDINATES, VARIABLE_NAMES, VARIABLES

DEFAULT_SHARD_LEN = 16384
# Rows per Zarr chunk inside a shard, the same for every variable (xarray makes one Dask chunk of
# each Zarr chunk, and mixed chunk lengths along one dimension break ``ds.chunks`` and dataframes).
# It is also the random-read unit: ~20 MB of encoded images at Planktonzilla's 5 KB average, and
# 4 Dask chunks per default shard (about 4,300 per variable for 17.4M images).
CHUNK_LEN = 4096
SHARD_UNIT = 256  # shard lengths above CHUNK_LEN are multiples of this
# 1: env QC arrays of strings; 2: env QC arrays of int8 CF flag codes (``pzscale migrate`` brings 1 to 2)
LAYOUT_VERSION = 3
MIGRATABLE_LAYOUTS = (1, 2)
ATTRS_KEY = "pzscale"
DIM = "image"

# zarr decodes a shard's inner chunks one batch of 1 at a time by default; in batches of 16 a 65,536-row shard of
# a numeric column reads in ~30-45% less time (9-10 -> 5-6 ms on the VM, 2026-12-04). The user's setting wins.
if "ZARR_CODEC_PIPELINE__BATCH_SIZE" not in os.environ:
    zarr.config.set({"codec_pipeline.batch_size": 16})

# image_bytes uses zarr's vlen-bytes data type on purpose (lossless, row-aligned encoded
# images); zarr warns on every open that the type is not yet in the v3 spec.
warnings.filterwarnings("ignore", category=zarr.errors.UnstableSpecificationWarning)
# pzscale's own objects (done markers, ingest plans) live in this zarr subgroup, so that
# listing the catalog's members stays clean.
PRIVATE = "_pzscale"


# ---------------------------------------------------------------- URLs and stores


def check_url(url: str) -> None:
    """Raise a one-line CatalogError for a URL whose scheme fsspec cannot serve here."""
    protocol = fsspec.utils.get_protocol(str(url))
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise CatalogError(
            f"{url}: unknown URL scheme '{protocol}://'; use a local path, file://, s3:// or "
            "another fsspec protocol"
        ) from None
    except ImportError as e:
        extra = " (pip install 'pzscale[s3]')" if protocol in ("s3", "s3a") else ""
        raise CatalogError(f"{url}: '{protocol}://' needs a package that is missing{extra}: {e}") from None


def _fs(url: str, storage_options: dict | None) -> tuple[fsspec.AbstractFileSystem, str]:
    check_url(url)
    return fsspec.core.url_to_fs(str(url), **(storage_options or {}))


def exists(url: str, *, storage_options: dict | None = None) -> bool:
    fs, root = _fs(url, storage_options)
    try:
        return fs.exists(f"{root}/zarr.json")
    except PermissionError:
        if isinstance(fs, LocalFileSystem):
            raise CatalogError(f"{url}: permission denied") from None
        # The first request to a store: wrong or missing credentials surface here, in one line
        # that never repeats them.
        raise CatalogError(
            f"{url}: access denied; check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in the "
            "environment, an fsspec config, or key/secret in storage_options) and the endpoint"
        ) from None
    except Exception as e:  # an unreachable endpoint, bad options...: one line, not a botocore traceback
        raise CatalogError(f"{url}: cannot reach the store ({type(e).__name__}: {one_line(e)})") from None


# ---------------------------------------------------------------- layout


def shard_ranges(row_start: int, row_stop: int, shard_len: int) -> list[tuple[int, int, int]]:
    """(shard index, first row, stop row) of every shard touched by rows [row_start, row_stop)."""
    if row_stop <= row_start:
        return []
    first, last = row_start // shard_len, -(-row_stop // shard_len)
    return [
        (i, max(i * shard_len, row_start), min((i + 1) * shard_len, row_stop))
        for i in range(first, last)
    ]


def check_aligned(start: int, stop: int, n_rows: int, shard_len: int) -> None:
    """A write must cover whole shards: a partial shard write is a lost-update race."""
    if start % shard_len or not (stop % shard_len == 0 or stop == n_rows) or stop <= start:
        raise ShardAlignmentError(
            f"rows [{start}, {stop}) are not whole shards of length {shard_len} "
            f"in a catalog of {n_rows} rows"
        )


def chunk_len(shard_len: int) -> int:
    """Rows per Zarr chunk for a shard length: the largest divisor of ``shard_len`` up to ``CHUNK_LEN``
    that is a multiple of ``SHARD_UNIT`` (a small shard is one chunk)."""
    if shard_len <= CHUNK_LEN:
        return shard_len
    return next(c for c in range(CHUNK_LEN, 0, -SHARD_UNIT) if shard_len % c == 0)


def _array_kwargs(var_name: str, shard_len: int) -> dict[str, Any]:
    var = BY_NAME[var_name]
    chunks = (chunk_len(shard_len),)
    if var.dtype == "bytes":  # encoded PNG/JPEG does not compress further
        return dict(dtype=zarr.dtype.VariableLengthBytes(), chunks=chunks, compressors=None)
    dtype = str if var.dtype == "str" else var.dtype
    return dict(dtype=dtype, fill_value=var.fill, chunks=chunks)


def variable_attrs(var_name: str) -> dict[str, Any]:
    """A catalog variable's attributes: description, units and, for coordinates, CF's."""
    var = BY_NAME[var_name]
    attrs: dict[str, Any] = {"description": var.description, **dict(var.cf)}
    if var.units:
        attrs["units"] = var.units
    if var.name == "time":
        attrs["calendar"] = "proleptic_gregorian"
    return attrs


def group_attrs(meta: dict[str, Any]) -> dict[str, Any]:
    """The group attributes: CF's (a discrete-sampling "point" collection along ``image``, whose
    coordinates are named here so that any xarray makes them coordinates) and pzscale's own record
    as JSON text, which netCDF, Zarr and every reader store (a nested mapping fails ``to_netcdf``)."""
    return {"Conventions": "CF-1.11", "featureType": "point", "title": "pzscale plankton image catalog",
            "coordinates": " ".join(COORDINATES), ATTRS_KEY: json.dumps(meta, sort_keys=True)}


def storable_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """Attributes netCDF can store: nested mappings flattened to ``key_subkey``, None left out."""
    out: dict[str, Any] = {}
    for key, value in attrs.items():
        if isinstance(value, dict):
            out.update({f"{key}_{k}": v for k, v in storable_attrs(value).items()})
        elif value is not None:
            out[key] = value
    return out


def consolidate(group: zarr.Group) -> None:
    """Rewrite the consolidated metadata (every array's metadata in the root zarr.json) after a
    client-side metadata change, so ``xr.open_zarr(url, consolidated=True)`` sees the catalog as it
    is. pzscale itself never reads it: its own opens list the arrays (``use_consolidated=False``)."""
    def write() -> None:
        with warnings.catch_warnings():
            # "not part of the v3 specification": xarray and zarr-python read it all the same
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            # the folders of done markers and plans in the private group are not Zarr nodes (and are not listed)
            warnings.filterwarnings("ignore", message="Object at .* is not recognized", category=UserWarning)
            zarr.consolidate_metadata(group.store, path=group.path, zarr_format=3)

    call_with_backoff(write, backoff=progress.DEFAULT_BACKOFF)


def create(
    url: str,
    *,
    n_rows: int,
    shard_len: int = DEFAULT_SHARD_LEN,
    plans: list[dict] | None = None,
    storage_options: dict | None = None,
) -> zarr.Group:
    """Create a catalog of ``n_rows`` rows; every array is sharded by ``shard_len`` rows.

    The group attributes (layout, shard length, ``plans``) are written first and the arrays
    after, so a creation cut short is finished by ``ensure_rows`` on the next run.
    """
    if shard_len <= 0 or (shard_len > SHARD_UNIT and shard_len % SHARD_UNIT):
        raise CatalogError(f"shard length {shard_len} must be a positive multiple of {SHARD_UNIT}")
    if exists(url, storage_options=storage_options):
        raise CatalogError(f"{url}: a catalog already exists here")
    meta = {"layout": LAYOUT_VERSION, "version": version("pzscale"), "shard_len": shard_len,
            "plans": plans or [], "stages": {}}
    group = zarr.open_group(url, mode="w-", zarr_format=3, storage_options=storage_options,
                            attributes=group_attrs(meta))
    ensure_rows(group, n_rows)
    return group


def ensure_rows(group: zarr.Group, n_rows: int) -> None:
    """Create the private group and any missing variable, and grow every array to ``n_rows`` (never shrinks).

    Growing only rewrites array metadata; existing shards stay as they are. Each request is retried
    on its own when storage throttles (a catalog has ~40 arrays, each a few requests).
    """
    def retried(fn: Any, *args: Any, **kwargs: Any) -> Any:
        return call_with_backoff(lambda: fn(*args, **kwargs), backoff=progress.DEFAULT_BACKOFF)

    shard_len = metadata(group)["shard_len"]
    if not retried(group.__contains__, PRIVATE):  # first: a listing must never meet a folder without metadata
        retried(group.create_group, PRIVATE, attributes={
            "description": "done/<stage>/<shard>.json markers (written after a shard's arrays), plans/<id>.json"})
    present = retried(lambda: dict(group.arrays()))
    for var in VARIABLES:
        if var.name in present:
            continue
        present[var.name] = retried(
            group.create_array, var.name, shape=(n_rows,), shards=(shard_len,), dimension_names=[DIM],
            attributes=variable_attrs(var.name), **_array_kwargs(var.name, shard_len),
        )
    for arr in present.values():
        if arr.shape[0] < n_rows:
            retried(arr.resize, (n_rows, *arr.shape[1:]))
    consolidate(group)


def open_group(
    url: str, *, mode: str = "r", storage_options: dict | None = None, check: bool = True,
    layouts: tuple[int, ...] = (LAYOUT_VERSION,),
) -> zarr.Group:
    """Open a catalog group of one of ``layouts``; with ``check``, verify every array has the catalog's
    rows and shards. A catalog of an older layout is refused with the command that migrates it."""
    if not exists(url, storage_options=storage_options):
        raise CatalogError(f"{url}: no catalog here (no zarr.json)")
    group = zarr.open_group(url, mode=mode, zarr_format=3, storage_options=storage_options, use_consolidated=False)
    try:
        meta = metadata(group)
    except CatalogError as e:
        raise CatalogError(f"{url}: {e}") from None
    except KeyError:
        meta = None
    layout = (meta or {}).get("layout")
    if layout in MIGRATABLE_LAYOUTS and layout not in layouts:
        raise CatalogError(f"{url}: a catalog of layout {layout} (an older pzscale); "
                           f"run `pzscale migrate --catalog {url}` to bring it to layout {LAYOUT_VERSION}")
    if not meta or layout not in layouts:
        raise CatalogError(f"{url}: not a pzscale catalog of layout {LAYOUT_VERSION}")
    if check:
        _checked_arrays(group, url)
    return group


def _checked_arrays(group: zarr.Group, where: str) -> dict[str, zarr.Array]:
    """All arrays of the catalog (one concurrent listing), after checking rows and shards agree."""
    arrays = dict(group.arrays())
    missing = [name for name in VARIABLE_NAMES if name not in arrays]
    if missing:
        raise CatalogError(f"{where}: catalog lacks arrays {missing}; rerun the ingest to finish creating it")
    n_rows, shard_len = arrays["image_id"].shape[0], metadata(group)["shard_len"]
    for name, arr in arrays.items():
        if arr.shape[0] != n_rows or (arr.shards or arr.chunks)[0] != shard_len:
            raise CatalogError(
                f"{where}: array {name} has shape {arr.shape} and shards {arr.shards}; "
                f"expected {n_rows} rows in shards of {shard_len}"
            )
    return arrays


def metadata(group: zarr.Group) -> dict[str, Any]:
    """pzscale's record in the group attributes (JSON text; a mapping in catalogs written before)."""
    meta = group.attrs[ATTRS_KEY]
    try:
        meta = json.loads(meta) if isinstance(meta, str) else meta
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise CatalogError(f"the group attribute {ATTRS_KEY!r} is not a JSON object: a damaged catalog")
    return dict(meta)


def update_metadata(group: zarr.Group, **changes: Any) -> None:
    """Update pzscale's group attributes. Only the client calls this, never a shard task."""
    meta = metadata(group)
    meta.update(changes)
    group.attrs.update(group_attrs(meta))
    consolidate(group)


def update_attrs(group: zarr.Group, name: str, attrs: dict[str, Any]) -> None:
    """Add attributes to array ``name`` (client only), stored so netCDF can take them."""
    group[name].attrs.update(storable_attrs(attrs))
    consolidate(group)


def record_stage(group: zarr.Group, stage: str, record: dict) -> None:
    """Record a stage's parameters in the group attributes (client only; never credentials)."""
    stages = metadata(group).get("stages", {})
    if stages.get(stage) != record:
        update_metadata(group, stages={**stages, stage: record})


def n_rows_of(group: zarr.Group) -> int:
    return group["image_id"].shape[0]


def write_rows(group: zarr.Group, start: int, stop: int, columns: dict[str, np.ndarray]) -> None:
    """Write whole shards [start, stop) of every catalog variable, all arrays at once."""
    missing = set(VARIABLE_NAMES) - set(columns)
    if missing:
        raise CatalogError(f"write of rows [{start}, {stop}) lacks variables {sorted(missing)}")
    write_arrays(group, start, stop, {name: columns[name] for name in VARIABLE_NAMES})


def write_arrays(group: zarr.Group, start: int, stop: int, columns: dict[str, np.ndarray]) -> None:
    """Write whole shards [start, stop) of the named arrays (a stage's outputs), all at once."""
    where = f"write of rows [{start}, {stop})"
    arrays = _arrays_to_write(group, [*columns, "image_id"], where)
    n_rows, shard_len = arrays["image_id"].shape[0], metadata(group)["shard_len"]
    for name in columns:
        arr = arrays[name]
        if arr.shape[0] != n_rows or (arr.shards or arr.chunks)[0] != shard_len:
            raise CatalogError(f"{where}: array {name} has shape {arr.shape} and shards {arr.shards}; "
                               f"expected {n_rows} rows in shards of {shard_len}")
    check_aligned(start, stop, n_rows, shard_len)
    for name, values in columns.items():
        if len(values) != stop - start:
            raise CatalogError(f"variable {name} has {len(values)} values for {stop - start} rows")

    async def write_all() -> None:
        # One round trip to zarr's event loop for all arrays instead of one per array
        # (half the write time on local disk; on S3 the PUTs overlap).
        await asyncio.gather(*(arrays[n].async_array.setitem(slice(start, stop), v) for n, v in columns.items()))

    sync(write_all())


def _arrays_to_write(group: zarr.Group, names: list[str], where: str) -> dict[str, zarr.Array]:
    """The named arrays only: a stage writing two arrays reads two metadata documents, not every
    array's (on S3 each is a GET); many names are read with one concurrent listing."""
    if len(names) > 8:
        arrays = dict(group.arrays())
    else:
        arrays = {}
        for name in names:
            with contextlib.suppress(KeyError):
                arrays[name] = group[name]
    unknown = sorted(set(names) - set(arrays))
    if unknown:
        raise CatalogError(f"{where}: no arrays {unknown} in the catalog")
    return arrays


def ensure_array(
    group: zarr.Group,
    name: str,
    *,
    dtype: str,
    fill: Any,
    trailing: tuple[int, ...] = (),
    dims: tuple[str, ...] = (),
    attrs: dict | None = None,
) -> zarr.Array:
    """Create a stage's output array (rows x ``trailing``) sharded like every other, or check it.

    Called from the client before a stage's tasks run; an existing array must have the same
    dtype and trailing shape (a model's outputs keep their shape across runs).
    """
    present = dict(group.arrays())
    n_rows, shard_len = present["image_id"].shape[0], metadata(group)["shard_len"]
    if name in present:
        arr = present[name]
        same_dtype = arr.dtype.kind in "TUO" if dtype == "str" else arr.dtype == np.dtype(dtype)
        if arr.shape[1:] != trailing or not same_dtype:
            raise CatalogError(f"array {name} exists with dtype {arr.dtype} and shape {arr.shape}; "
                               f"this stage writes {dtype} x {trailing}")
        if arr.shape[0] < n_rows:
            arr.resize((n_rows, *trailing))
            consolidate(group)
        return arr
    # the chunk length of the catalog's own variables, so every image variable has the same Dask chunks
    inner = present["image_id"].chunks[0]
    arr = group.create_array(
        name, shape=(n_rows, *trailing), shards=(shard_len, *trailing), chunks=(inner, *trailing),
        dtype=str if dtype == "str" else dtype, fill_value=fill, dimension_names=[DIM, *dims],
        attributes=storable_attrs(attrs or {}),
    )
    consolidate(group)
    return arr


def read_rows(group: zarr.Group, start: int, stop: int, names: Iterable[str] = VARIABLE_NAMES) -> dict:
    """Rows [start, stop) of the named arrays, read concurrently (as ``write_arrays`` writes): one round trip
    to zarr's event loop for all of them, so on object storage their GETs overlap (on local disk it is
    no faster)."""
    arrays = {name: group[name] for name in names}

    async def read_all() -> list:
        return await asyncio.gather(*(arr.async_array.getitem(slice(start, stop)) for arr in arrays.values()))

    return dict(zip(arrays, sync(read_all()), strict=True))


def with_stored_rows(group: zarr.Group, start: int, first_new: int, new: dict[str, np.ndarray]) -> dict:
    """Prefix values for rows [first_new, ...) with the stored values of rows [start, first_new).

    A task that adds rows to a shard already partly written (an appended collection, a stage
    catching up after an append) rewrites those rows unchanged, so its write still covers
    the whole shard and earlier results stay byte for byte.
    """
    if first_new == start:
        return new
    stored = read_rows(group, start, first_new, list(new))
    return {name: np.concatenate([stored[name].astype(v.dtype), v]) for name, v in new.items()}


# ---------------------------------------------------------------- done markers


def _marker_dir(root: str, stage: str) -> str:
    return f"{root}/{PRIVATE}/done/{stage}"


def put_json(url: str, key: str, obj: Any, *, storage_options: dict | None = None) -> None:
    """Store a JSON object under the catalog's private prefix (``_pzscale/<key>``)."""
    fs, root = _fs(url, storage_options)
    path = f"{root}/{PRIVATE}/{key}"
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, json.dumps(obj).encode())


def get_json(url: str, key: str, *, storage_options: dict | None = None) -> Any:
    fs, root = _fs(url, storage_options)
    try:
        return json.loads(fs.cat_file(f"{root}/{PRIVATE}/{key}"))
    except FileNotFoundError:
        raise CatalogError(f"{url}: missing {PRIVATE}/{key}") from None


def mark_done(
    url: str, stage: str, shard: int, info: dict, *, storage_options: dict | None = None, replace: bool = False
) -> bool:
    """Record that ``stage`` finished ``shard``. Call only after every array of the shard is written.

    The marker is created only if absent (``If-None-Match: *`` on S3, ``O_EXCL`` on disk): False
    means another attempt of the same shard and rows marked it first, which a task takes as
    done, since both attempts wrote the same bytes. A marker for other ``rows`` (a stage
    extending a shard after an append) is superseded, as is any marker with ``replace``.
    """
    fs, root = _fs(url, storage_options)
    fs.makedirs(_marker_dir(root, stage), exist_ok=True)
    body = json.dumps({"stage": stage, "shard": shard, "pzscale": version("pzscale"), **info}).encode()
    path = f"{_marker_dir(root, stage)}/{shard:06d}.json"
    if not replace:
        if create_only(fs, path, body):
            return True
        try:
            existing = json.loads(fs.cat_file(path))
        except ValueError:  # empty: the other attempt is writing its marker at this moment
            return False
        if existing.get("rows") == info.get("rows"):
            return False
    fs.pipe_file(path, body)
    return True


def drop_shard(group: zarr.Group, name: str, shard: int) -> None:
    """Delete shard ``shard`` of array ``name`` (damaged: Zarr would read it before rewriting it)."""
    arr = group[name]
    path = arr.async_array.store_path / arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))
    sync(path.delete())


def forget_done(url: str, stage: str, shard: int, *, storage_options: dict | None = None) -> None:
    """Remove ``stage``'s done marker of ``shard`` (its data is damaged): a rerun of the stage redoes it."""
    fs, root = _fs(url, storage_options)
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(f"{_marker_dir(root, stage)}/{shard:06d}.json")


def create_only(fs: fsspec.AbstractFileSystem, path: str, body: bytes) -> bool:
    """Write ``body`` at ``path`` unless an object is there already; True if this call created it.

    The one exclusive create of pzscale (done markers, the ingest lock): ``O_EXCL`` on local disks,
    a conditional PUT (``If-None-Match: *``) on S3. A lost race is told from any other error by
    looking for the object, since stores report it differently.
    """
    try:
        if isinstance(fs, LocalFileSystem):
            with fs.open(path, "xb") as f:  # O_EXCL: pipe_file's "create" checks, then writes
                f.write(body)
        else:
            fs.pipe_file(path, body, mode="create")  # conditional PUT on S3
    except OSError:
        # The 412 of a lost race: FileExistsError on moto, a bare OSError on SeaweedFS.
        fs.invalidate_cache(path)
        if fs.exists(path):
            return False
        raise
    return True


def done_shards(url: str, stage: str, *, storage_options: dict | None = None) -> set[int]:
    """Shards with a done marker for ``stage``: one LIST, never a read of the data."""
    fs, root = _fs(url, storage_options)
    fs.invalidate_cache(_marker_dir(root, stage))  # s3fs caches listings; markers come from other processes
    try:
        names = fs.ls(_marker_dir(root, stage), detail=False)
    except FileNotFoundError:
        return set()
    return {int(n.rsplit("/", 1)[-1].split(".")[0]) for n in names if n.endswith(".json")}


def marker_infos(url: str, stage: str, *, storage_options: dict | None = None) -> dict[int, dict]:
    """Every done marker of ``stage`` with its content (rows covered...), fetched in one batch."""
    fs, root = _fs(url, storage_options)
    shards = done_shards(url, stage, storage_options=storage_options)
    paths = [f"{_marker_dir(root, stage)}/{s:06d}.json" for s in sorted(shards)]
    bodies = fs.cat(paths) if paths else {}
    # keyed by the marker's file name: stores differ in how they spell the rest of the path
    return {int(p.rsplit("/", 1)[-1].split(".")[0]): json.loads(b) for p, b in bodies.items()}


def stages_done(url: str, *, storage_options: dict | None = None) -> dict[str, set[int]]:
    """Every stage with markers, and its finished shards."""
    fs, root = _fs(url, storage_options)
    fs.invalidate_cache(f"{root}/{PRIVATE}/done")
    try:
        found = fs.find(f"{root}/{PRIVATE}/done")
    except FileNotFoundError:
        return {}
    stages: dict[str, set[int]] = {}
    prefix = f"{root}/{PRIVATE}/done/"
    for path in found:
        if path.endswith(".json") and path.startswith(prefix) and "/" in path[len(prefix) :]:
            stage, name = path[len(prefix) :].rsplit("/", 1)
            stages.setdefault(stage, set()).add(int(name.split(".")[0]))
    return stages


# ---------------------------------------------------------------- reading


def open_catalog(url: str, *, storage_options: dict | None = None) -> xr.Dataset:
    """Open a catalog as one lazy xarray Dataset along the ``image`` dimension.

    Every variable has Dask chunks of one shard, so ``map_blocks`` over the dataset runs one task
    per shard; selecting a few rows reads only the Zarr chunks that hold them. Time, lat, lon and
    depth are coordinates; ``ds.attrs["pzscale"]`` is pzscale's record (JSON text).
    """
    group = open_group(url, storage_options=storage_options)
    shard_len = metadata(group)["shard_len"]
    ds = xr.open_zarr(url, chunks={DIM: shard_len}, consolidated=False, storage_options=storage_options,
                      zarr_format=3)
    coords = [name for name in COORDINATES if name in ds.data_vars]  # catalogs written before CF attributes
    ds = ds.set_coords(coords)
    extra = sorted(set(ds.data_vars) - set(VARIABLE_NAMES))  # stage outputs: embeddings, predictions, splits
    return ds[[name for name in (*VARIABLE_NAMES, *extra) if name in ds.data_vars]]


def read_images(
    catalog: str | xr.Dataset, rows: Sequence[int] | np.ndarray, *, storage_options: dict | None = None
) -> list[np.ndarray]:
    """Lossless pixels of ``rows``: exactly what decoding the source's bytes gives.

    ``catalog`` is a URL (rows are catalog rows) or a Dataset from ``open_catalog``,
    possibly subset (rows are positions in that Dataset). Rows that failed to decode at
    ingest raise here too; check ``status`` first.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if isinstance(catalog, xr.Dataset):
        encoded = catalog["image_bytes"].isel({DIM: rows}).values
    else:
        group = open_group(catalog, storage_options=storage_options)
        encoded = group["image_bytes"].get_orthogonal_selection((rows,))
    return [images.decode(bytes(b)) for b in encoded]


def checksums(url: str, *, storage_options: dict | None = None) -> dict[str, str]:
    """sha256 of every array's content, read one shard at a time (memory stays flat)."""
    group = open_group(url, storage_options=storage_options)
    n_rows, shard_len = n_rows_of(group), metadata(group)["shard_len"]
    out = {}
    for name, arr in sorted(group.arrays()):
        digest = hashlib.sha256(f"{arr.dtype}{arr.shape}".encode())
        for _, start, stop in shard_ranges(0, n_rows, shard_len):
            block = arr[start:stop]
            if block.dtype.kind in "OTU" or block.dtype == object:
                for value in block.ravel():
                    item = value.encode() if isinstance(value, str) else bytes(value)
                    digest.update(len(item).to_bytes(8, "little") + item)
            else:
                digest.update(np.ascontiguousarray(block).tobytes())
        out[name] = digest.hexdigest()
    return out
