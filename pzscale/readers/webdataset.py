"""WebDataset tar shards, as Planktonzilla exports them for CLIP training.

A shard is a plain tar whose members are grouped into samples by key, the member name up to the first dot of its
basename: ``image_12.jpg`` + ``image_12.txt`` (the lineage text, "animalia arthropoda copepoda calanoida") and
optionally ``image_12.json`` (metadata). A sample counts as a row when it has an image; stray members without
one are ignored. Members are read by their offsets in the tar, found once at plan time.
"""

from __future__ import annotations

import json
import math
import posixpath
import re
from typing import IO, Any

import fsspec
import pyarrow as pa

from pzscale.errors import InputError, one_line
from pzscale.faults import is_transient
from pzscale.readers.base import Item, Reader, records
from pzscale.readers.folder import ARCHIVE_ERRORS, IMAGE_EXTENSIONS, read_spans, tar_members

DEFAULT_SOURCE = "webdataset"
PEEK_MEMBERS = 20  # tar members guess_can_open looks at
KEY_AND_FIELD = re.compile(r"^((?:.*/)?[^./][^./]*)\.([^/]+)$")  # WebDataset's split: key . field (field may hold dots)
JSON_TEXT = ("dataset", "original_label", "timestamp")
JSON_NUMBERS = ("Latitude", "Longitude")


def key_and_field(name: str) -> tuple[str, str] | None:
    """('dir/image_12', 'jpg') for 'dir/image_12.jpg'; None for names without a field (or hidden ones)."""
    match = KEY_AND_FIELD.match(name)
    return (match.group(1), match.group(2).lower()) if match else None


def is_image_field(field: str) -> bool:
    return f".{field}" in IMAGE_EXTENSIONS


def _shard_paths(path: str, storage_options: dict | None) -> list[str]:
    """The .tar shards named by ``path`` (a .tar, a folder of them, or a glob), sorted, as openable URLs."""
    fs, fpath = fsspec.core.url_to_fs(path, **(storage_options or {}))
    protocol = fsspec.utils.get_protocol(path)
    prefix = "" if protocol == "file" else f"{protocol}://"
    if any(ch in fpath for ch in "*?["):
        found = fs.glob(fpath)
    elif fs.isdir(fpath):
        found = fs.glob(f"{fpath.rstrip('/')}/*.tar")
    else:
        found = [fpath]
    return [prefix + p for p in sorted(found) if p.lower().endswith(".tar")]


def _group(shard: str, fh: IO[bytes], limit: int | None = None) -> dict[str, dict[str, list]]:
    """Sample key -> field -> [member name, offset, size], from the tar headers (a repeated name keeps the last)."""
    samples: dict[str, dict[str, list]] = {}
    for count, member in enumerate(tar_members(shard, fh), start=1):
        split = key_and_field(member.name) if member.isfile() else None
        if split is not None:
            samples.setdefault(split[0], {})[split[1]] = [member.name, member.offset_data, member.size]
        if limit is not None and count >= limit:
            break
    return samples


def _sample_entry(key: str, fields: dict[str, list]) -> dict[str, Any] | None:
    """What ``read`` needs of one sample: its image, text and json members; None without an image."""
    images = sorted(f for f in fields if is_image_field(f))
    if not images:
        return None
    entry: dict[str, Any] = {"key": key, "image": fields[images[0]]}  # several images: the first field by name
    for field in ("txt", "json"):
        if field in fields:
            entry[field] = fields[field]
    return entry


def _plan_shard(shard: str, source: str, storage_options: dict | None) -> Item:
    fs, fpath = fsspec.core.url_to_fs(shard, **(storage_options or {}))
    try:
        size = fs.size(fpath)
        with fs.open(fpath, "rb") as fh:
            grouped = _group(shard, fh)
    except ARCHIVE_ERRORS as e:  # one bad shard among many is reported, not fatal
        if is_transient(e):
            raise
        return Item(source=shard, rows=0, size=0, info={"path": shard, "source": source},
                    error=f"{shard}: not a readable tar "
                    f"({one_line(e)})")
    samples = [e for key in sorted(grouped) if (e := _sample_entry(key, grouped[key])) is not None]
    error = "" if samples else f"{shard}: no samples with an image"
    return Item(source=shard, rows=len(samples), size=size, info={"path": shard, "source": source, "samples": samples},
                error=error)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _metadata(raw: bytes) -> dict[str, Any]:
    """Record columns from a sample's json; an unreadable json only loses that sample's metadata."""
    try:
        meta = json.loads(raw)
    except ValueError:
        return {}
    if not isinstance(meta, dict):
        return {}
    out: dict[str, Any] = {k: str(meta[k]) for k in JSON_TEXT if meta.get(k) not in (None, "")}
    out.update({k: n for k in JSON_NUMBERS if (n := _number(meta.get(k))) is not None})
    return out


class WebDatasetReader(Reader):
    name = "webdataset"
    description = "WebDataset .tar shards (<key>.jpg/.png + <key>.txt lineage, optional <key>.json), e.g. CLIP exports"

    def guess_can_open(self, path: str, *, storage_options: dict | None = None) -> bool:
        path = str(path)
        try:
            shards = _shard_paths(path, storage_options)
            if not shards:
                return False
            fs, fpath = fsspec.core.url_to_fs(shards[0], **(storage_options or {}))
            with fs.open(fpath, "rb") as fh:
                grouped = _group(shards[0], fh, limit=PEEK_MEMBERS)
        except Exception:  # noqa: BLE001 - a guess never fails: anything unreadable is simply not ours
            return False
        return any("txt" in fields and any(map(is_image_field, fields)) for fields in grouped.values())

    def plan(self, path: str, *, source: str | None = None, storage_options: dict | None = None) -> list[Item]:
        path = str(path)
        shards = _shard_paths(path, storage_options)
        if not shards:
            raise InputError(f"{path}: no .tar shards found")
        items = [_plan_shard(shard, source or DEFAULT_SOURCE, storage_options) for shard in shards]
        if not any(item.rows for item in items):
            raise InputError(items[0].error if len(items) == 1 else f"{path}: no samples with an image in any shard "
                             f"({items[0].error})")
        return items

    def read(self, item: Item, first: int, stop: int, *, storage_options: dict | None = None) -> pa.Table:
        shard, samples = item.info["path"], item.info["samples"][first:stop]
        wanted = [(s, field) for s in samples for field in ("image", "txt", "json") if field in s]
        fs, fpath = fsspec.core.url_to_fs(shard, **(storage_options or {}))
        try:
            with fs.open(fpath, "rb") as fh:
                data = read_spans(fh, [(s[field][1], s[field][2]) for s, field in wanted])
        except ARCHIVE_ERRORS as e:
            if is_transient(e):
                raise
            raise InputError(f"{shard}: cannot read samples {first}-{stop} ({one_line(e)})") from None
        content = {(s["key"], field): d for (s, field), d in zip(wanted, data, strict=True)}
        name = posixpath.basename(shard)
        stem = name[: -len(".tar")]
        rows = []
        for sample in samples:
            key, image = sample["key"], sample["image"][0]
            row: dict[str, Any] = {
                "image": {"bytes": content[key, "image"], "path": image},
                "dataset": item.info["source"],
                "original_path": f"/{name}/{image}",
                "ObjID": f"{stem}/{key}",
            }
            if "txt" in sample:
                text = content[key, "txt"].decode("utf-8", errors="replace").strip()
                row["lineage"] = row["original_label"] = text
            if "json" in sample:
                row.update(_metadata(content[key, "json"]))  # the json's dataset and label win when given
            rows.append(row)
        return records(rows)
