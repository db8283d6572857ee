"""WebDataset tar shards, as Planktonzilla exports them for CLIP training.

A shard is a plain tar whose members are grouped into samples by key, the member name up to the first dot of its
basename: ``image_12.jpg`` + ``image_12.txt`` (the lineage text, "animalia arthropoda copepoda calanoida") and
optionally ``image_12.json`` (metadata) or ``image_12.cls`` (a class index, the label when nothing else gives one).
A sample counts as a row when it has an image; what is not read (samples without an image, members of other
fields, repeated names) is counted in one ``Item.notes`` line per shard. Members are read by their offsets in the
tar, found once at plan time.

Metadata is taken per sample: a json that does not parse (or is no object) loses its fields but not the row, which
gets the QC flag ``json_unparsed``; a number field that is no number ("abc", a latitude of "north") is left out
with ``<catalog name>_unparsed`` (``lat_unparsed``...), as EcoTaxa's reader does; a .cls that is no integer gets
``cls_unparsed`` and a .txt that is no UTF-8 ``txt_unparsed``. Flags travel in the records' ``reader_qc``.
"""

from __future__ import annotations

import json
import math
import posixpath
import re
import unicodedata
from collections import Counter
from typing import IO, Any

import fsspec
import pyarrow as pa

from pzscale.errors import InputError, one_line
from pzscale.faults import is_transient
from pzscale.readers.base import NUMBER_COLUMNS, Item, Reader, keys_only, records
from pzscale.readers.ecotaxa import MISSING_WORDS, parse_coordinate, parse_number
from pzscale.readers.folder import ARCHIVE_ERRORS, IMAGE_EXTENSIONS, read_spans, tar_members
from pzscale.schema import NUMBER_FROM_PARQUET

DEFAULT_SOURCE = "webdataset"
PEEK_MEMBERS = 20  # tar members guess_can_open looks at
KEY_AND_FIELD = re.compile(r"^((?:.*/)?[^./][^./]*)\.([^/]+)$")  # WebDataset's split: key . field (field may hold dots)
# text as given: the ingest parses (and flags) timestamps
JSON_TEXT = ("dataset", "original_label", "sample", "timestamp")
# number fields, named as Planktonzilla's parquet columns, and the catalog name their QC flag uses (lat_unparsed)
JSON_NUMBERS = {column: name for name, column in NUMBER_FROM_PARQUET.items() if column in NUMBER_COLUMNS}
METADATA_FIELDS = ("txt", "json", "cls")


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


def _group(shard: str, fh: IO[bytes], limit: int | None = None,
           odd: Counter | None = None) -> dict[str, dict[str, list]]:
    """Sample key -> field -> [member name, offset, size], from the tar headers. A repeated name keeps the last
    copy; files with no ``<key>.<field>`` name and repeated names are counted in ``odd`` when given."""
    samples: dict[str, dict[str, list]] = {}
    odd = Counter() if odd is None else odd
    for count, member in enumerate(tar_members(shard, fh), start=1):
        if member.isfile():
            split = key_and_field(member.name)
            if split is None:
                odd["unnamed"] += 1
            else:
                fields = samples.setdefault(split[0], {})
                odd["repeated"] += split[1] in fields
                fields[split[1]] = [member.name, member.offset_data, member.size]
        if limit is not None and count >= limit:
            break
    return samples


def _sample_entry(key: str, fields: dict[str, list], odd: Counter) -> dict[str, Any] | None:
    """What ``read`` needs of one sample: its image, text, json and cls members; None without an image.
    What is not read is counted in ``odd``."""
    images = sorted(f for f in fields if is_image_field(f))
    if not images:
        odd["no_image"] += 1
        odd["no_image_members"] += len(fields)
        return None
    entry: dict[str, Any] = {"key": key, "image": fields[images[0]]}  # several images: the first field by name
    odd["more_images"] += len(images) - 1
    for field in fields:
        if field in METADATA_FIELDS:
            entry[field] = fields[field]
        elif not is_image_field(field):
            odd[f"field:.{field}"] += 1
    return entry


def _shard_note(shard: str, odd: Counter) -> str:
    """One line telling what of a shard is not read; '' when everything is."""
    parts = []
    if odd["no_image"]:
        parts.append(f"{odd['no_image']} sample(s) without an image skipped ({odd['no_image_members']} member(s))")
    if odd["more_images"]:
        parts.append(f"{odd['more_images']} more image(s) of a sample that has several (its first image field by "
                     "name is read)")
    fields = sorted(((k.removeprefix("field:"), n) for k, n in odd.items() if k.startswith("field:") and n),
                    key=lambda t: (-t[1], t[0]))
    if fields:
        parts.append(f"{sum(n for _, n in fields)} member(s) of fields not read "
                     f"({', '.join(f'{n} {f}' for f, n in fields)})")
    if odd["repeated"]:
        parts.append(f"{odd['repeated']} member name(s) repeated in the tar (the last copy is read)")
    if odd["twins"]:
        parts.append(f"{odd['twins']} sample key(s) equal once Unicode-normalised (NFC), numbered #1, #2... in ids")
    if odd["unnamed"]:
        parts.append(f"{odd['unnamed']} file(s) with no <key>.<field> name (hidden, or no extension)")
    return f"{shard}: {'; '.join(parts)}" if parts else ""


def _plan_shard(shard: str, source: str, storage_options: dict | None) -> Item:
    fs, fpath = fsspec.core.url_to_fs(shard, **(storage_options or {}))
    odd: Counter = Counter()
    try:
        size = fs.size(fpath)
        with fs.open(fpath, "rb") as fh:
            grouped = _group(shard, fh, odd=odd)
    except ARCHIVE_ERRORS as e:  # one bad shard among many is reported, not fatal
        if is_transient(e):
            raise
        return Item(source=shard, rows=0, size=0, info={"path": shard, "source": source},
                    error=f"{shard}: not a readable tar "
                    f"({one_line(e)})")
    samples = [e for key in sorted(grouped) if (e := _sample_entry(key, grouped[key], odd)) is not None]
    twins: dict[str, list[dict]] = {}
    for sample in samples:  # keys equal once Unicode-normalised would be one image id in the catalog
        twins.setdefault(unicodedata.normalize("NFC", sample["key"]), []).append(sample)
    for group in (g for g in twins.values() if len(g) > 1):
        odd["twins"] += len(group)
        for n, sample in enumerate(group, start=1):
            sample["twin"] = n
    error = "" if samples else f"{shard}: no samples with an image"
    note = _shard_note(shard, odd)
    return Item(source=shard, rows=len(samples), size=size, info={"path": shard, "source": source, "samples": samples},
                error=error, notes=[note] if note and samples else [])


def _number(column: str, value: Any) -> tuple[float | None, bool]:
    """A json value as a finite float, and whether it was given but is no number (bool, "abc", inf, a list)."""
    if value is None or isinstance(value, float) and math.isnan(value):  # null or NaN: no value
        return None, False
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None, True
    if isinstance(value, str):
        if value.strip().lower() in MISSING_WORDS:
            return None, False
        number = parse_coordinate(value) if column in ("Latitude", "Longitude") else parse_number(value.strip())
        return number, number is None
    try:
        number = float(value)
    except OverflowError:  # a json integer beyond any float
        return None, True
    return (number, False) if math.isfinite(number) else (None, True)


def _metadata(raw: bytes) -> tuple[dict[str, Any], list[str]]:
    """Record columns from a sample's json, and the QC flags of what did not parse; an unreadable json only
    loses that sample's metadata."""
    try:
        meta = json.loads(raw)
    except ValueError:  # not JSON, or not UTF-8
        return {}, ["json_unparsed"]
    if not isinstance(meta, dict):
        return {}, ["json_unparsed"]
    out: dict[str, Any] = {k: str(meta[k]) for k in JSON_TEXT if meta.get(k) not in (None, "")}
    flags = []
    for column, name in JSON_NUMBERS.items():
        number, unparsed = _number(column, meta.get(column))
        if number is not None:
            out[column] = number
        elif unparsed:
            flags.append(f"{name}_unparsed")
    return out, flags


def _text(raw: bytes) -> tuple[str, bool]:
    """A .txt or .cls member as stripped text, and whether it was no UTF-8 (undecodable bytes are replaced)."""
    try:
        return raw.decode("utf-8").strip(), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace").strip(), True


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
        return records(_rows(item, first, stop, ("image", *METADATA_FIELDS), storage_options))

    def read_keys(self, item: Item, *, storage_options: dict | None = None) -> pa.Table:
        """The ids without the images: only the json members are read (their dataset wins over the default)."""
        return keys_only(records(_rows(item, 0, item.rows, ("json",), storage_options)))


def _rows(item: Item, first: int, stop: int, fields: tuple[str, ...], storage_options: dict | None) -> list[dict]:
    """Records of samples [first, stop) from the members of ``fields`` (an image not read has empty bytes)."""
    if not item.rows:
        return []
    shard, samples = item.info["path"], item.info["samples"][first:stop]
    wanted = [(s, field) for s in samples for field in fields if field in s]
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
            "image": {"bytes": content.get((key, "image"), b""), "path": image},
            "dataset": item.info["source"],
            "original_path": f"/{name}/{image}",
            "ObjID": f"{stem}/{key}" + (f"#{sample['twin']}" if "twin" in sample else ""),
        }
        flags = []
        if (key, "txt") in content:
            text, undecodable = _text(content[key, "txt"])
            row["lineage"] = row["original_label"] = text
            flags += ["txt_unparsed"] if undecodable else []
        if (key, "json") in content:
            meta, unparsed = _metadata(content[key, "json"])
            row.update(meta)  # the json's dataset and label win when given
            flags += unparsed
        if (key, "cls") in content:
            index, undecodable = _text(content[key, "cls"])
            if re.fullmatch(r"[+-]?\d+", index):
                if not row.get("original_label"):  # a class index is the label only when nothing else gives one
                    row["original_label"] = str(int(index))
            elif index or undecodable:
                flags.append("cls_unparsed")
        row["reader_qc"] = ";".join(flags)
        rows.append(row)
    return rows
