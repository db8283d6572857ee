"""One fuzz target per reader: what it plans is what it reads, and the image ids of what it ingests are unique
(or made so by the ingest's duplicate-id policy).

Each target writes hostile but plausible inputs into a temporary folder (odd names, NFC/NFD twins, repeated
members and ids, hidden files, non-images, empty and corrupt images, broken tables), plans them with the reader
(``source="fuzz"``) and asserts, for every item it plans:

1. rows read == rows planned (and == the rows the example wrote, where that is known), also when the item is read
   in random ``[first, stop)`` windows that cover it, which give the same ids and image bytes as one whole read;
2. ``ids_of_table(read_keys(item))`` == the image ids of ``read`` (what the ingest checks before it writes is what a
   shard task writes);
3. for readers that make the ids (IFCB, class folders, WebDataset, EcoTaxa when object ids do not repeat) the image
   ids of all planned rows are unique; and for all readers, over all planned rows as ``check_ids`` and
   ``_ingest_shard`` apply ``pzscale.ids``: under ``suffix`` the ids become unique and exactly the second and later
   rows of an id are changed; under ``flag`` exactly the rows whose id is shared carry ``duplicate_image_id``.

``tests/reliability/test_fuzz.py`` fuzzes the parsers (bytes in, records or a PzscaleError out); the helpers and
strategies it has are reused here. What these targets found is pinned at the end as plain tests (fixed) or strict
xfail tests (none left).
"""

from __future__ import annotations

import io
import posixpath
import tarfile
import tempfile
import unicodedata
import warnings
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pzscale import readers
from pzscale.errors import PzscaleError
from pzscale.ids import FLAG_DUPLICATE, FLAG_SUFFIXED, apply_policy, hashes, occurrences, suffixed
from pzscale.readers import ecotaxa, ifcb
from pzscale.readers.base import Item, Reader
from pzscale.records import columns_from_table, ids_of_table, row_names
from tests.reliability.test_fuzz import ROI, _adc_line, _count, _planktonzilla_table, _png

# Bounded like test_fuzz.FUZZ: about 5 s a target on two cores (each example writes its inputs, then reads them
# whole, in windows and as keys).
FUZZ = settings(max_examples=100, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

NFC, NFD = unicodedata.normalize("NFC", "\u00e9"), unicodedata.normalize("NFD", "\u00e9")  # one letter, two forms
CUTS = st.lists(st.integers(0, 24), max_size=3)  # window bounds within an item (taken modulo its rows + 1)
PNG = _png()
CORRUPT_PNG = PNG[:30]
IMAGE_CONTENT = st.sampled_from(["png"] * 3 + ["zero", "corrupt", "junk"])
CONTENT = {"png": PNG, "zero": b"", "corrupt": CORRUPT_PNG, "junk": b"not an image at all"}


# ---------------------------------------------------------------- the assertions every target makes


def _read_checked(reader: Reader, item: Item, cuts: list[int]) -> dict[str, np.ndarray]:
    """Catalog variables of every row of ``item``, read whole; asserts 1 and 2 of the module docstring."""
    names = row_names(item.source, 0, item.rows)
    whole = reader.read(item, 0, item.rows)
    assert whole.num_rows == item.rows, item.source
    columns = columns_from_table(whole, row_names=names)
    bounds = sorted({0, item.rows, *(c % (item.rows + 1) for c in cuts)})
    ids, images = [], []
    for first, stop in zip(bounds, bounds[1:], strict=False):
        part = reader.read(item, first, stop)
        assert part.num_rows == stop - first, (item.source, first, stop)
        window = columns_from_table(part, row_names=row_names(item.source, first, stop))
        ids += window["image_id"].tolist()
        images += window["image_bytes"].tolist()
    assert ids == columns["image_id"].tolist(), item.source
    assert images == columns["image_bytes"].tolist(), item.source
    keys = ids_of_table(reader.read_keys(item), names)
    assert keys.tolist() == columns["image_id"].tolist(), item.source
    for status in set(columns["status"].tolist()):
        event(f"a row {status}")
    return columns


def _read_plan(reader: Reader, items: list[Item], cuts: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Image ids and QC of all planned rows, in plan order (an item with an error has no rows)."""
    ids, qc = [np.zeros(0, object)], [np.zeros(0, object)]
    for item in items:
        if item.error:
            assert item.rows == 0, item.error
            continue
        columns = _read_checked(reader, item, cuts)
        ids.append(columns["image_id"])
        qc.append(columns["qc"])
        event(f"item rows: {min(item.rows, 5)}{'+' if item.rows >= 5 else ''}")
    event(f"item errors: {sum(bool(i.error) for i in items)}")
    return np.concatenate(ids), np.concatenate(qc)


def _check_id_policies(ids: np.ndarray, qc: np.ndarray) -> int:
    """Apply ``suffix`` and ``flag`` as ``check_ids`` + ``_ingest_shard`` do (one shard holding every row) and check
    the outcome against a count of the ids themselves (not their hashes). Returns how many rows were suffixed."""
    before, size = occurrences(hashes(ids))
    shared = np.flatnonzero(size > 1)
    counts, seen, later = Counter(ids.tolist()), Counter(), []
    for row, image_id in enumerate(ids.tolist()):
        if seen[image_id]:
            later.append(row)
        seen[image_id] += 1
    suffixed_ids, suffixed_qc = ids.copy(), qc.copy()
    renamed = suffixed(ids[shared].tolist(), before[shared], np.sort(hashes(ids)))
    apply_policy(suffixed_ids, suffixed_qc, shared, renamed, "suffix")
    assert len(set(suffixed_ids.tolist())) == len(suffixed_ids), "suffix left a shared image id"
    assert np.flatnonzero(suffixed_ids != ids).tolist() == later
    assert [r for r, q in enumerate(suffixed_qc) if FLAG_SUFFIXED in q.split(";")] == later
    assert all(suffixed_qc[r] == qc[r] for r in set(range(len(ids))) - set(later))  # other rows left as they are
    event("rows sharing an id" if later else "no id shared")
    flagged, flagged_qc = ids.copy(), qc.copy()
    apply_policy(flagged, flagged_qc, shared, [""] * len(shared), "flag")
    assert flagged.tolist() == ids.tolist()
    assert [r for r, q in enumerate(flagged_qc) if FLAG_DUPLICATE in q.split(";")] == \
        [r for r, image_id in enumerate(ids.tolist()) if counts[image_id] > 1]
    assert all(flagged_qc[r] == qc[r] for r in range(len(ids)) if counts[ids[r]] == 1)
    return len(later)


def _assert_unique(ids: np.ndarray) -> None:
    repeated = [i for i, n in Counter(ids.tolist()).items() if n > 1]
    assert not repeated, f"image ids made by the reader repeat: {repeated[:3]}"


# ---------------------------------------------------------------- IFCB

V1_LIDS = ("IFCB5_2012_028_081515", "IFCB1_2009_216_075913")
V2_LIDS = ("D20220522T000439_IFCB134", "D20150101T235959_IFCB010")
# mostly ROIs that cut, with IFCB's zero-size trigger lines and test_fuzz's broken ones (negative, fractional,
# NaN, -999 sizes; start bytes anywhere, beyond the .roi too) among them
GOOD_ROI = st.tuples(st.integers(1, 8), st.integers(1, 8), st.integers(0, 1900))
NO_IMAGE_ROI = st.tuples(st.integers(0, 8), st.booleans(), st.integers(0, 1900)).map(  # a zero width or height
    lambda r: (0, r[0], r[2]) if r[1] else (r[0], 0, r[2]))
BIN = st.fixed_dictionaries({
    "rois": st.lists(st.one_of(GOOD_ROI, GOOD_ROI, NO_IMAGE_ROI, ROI), max_size=8),
    "roi_size": st.one_of(st.just(2000), st.integers(0, 2000)),
    "damage": st.sampled_from(["none"] * 10 + ["no_roi", "empty_adc", "empty_hdr", "junk_line"]),
    "folder": st.sampled_from(["", "a", "a/b", NFC, "with space"]),
    "roi_count": st.sampled_from([None, 0, 3]),  # a header roiCount that may disagree (a note, not a change)
})


def _is_row(width: object, height: object) -> bool:
    """An ADC line with a ROI: IFCB writes a zero width or height for a trigger without an image (NaN counts)."""
    return float(width) != 0 and float(height) != 0


@FUZZ
@given(bins=st.lists(BIN, min_size=1, max_size=3), lids=st.permutations(V1_LIDS + V2_LIDS), cuts=CUTS)
def test_ifcb_bins_read_as_planned_with_unique_roi_ids(bins, lids, cuts):
    _count("reader target ifcb")
    expected: dict[str, list[str]] = {}  # lid -> its ids, for the bins written whole
    with tempfile.TemporaryDirectory() as root:
        for spec, lid in zip(bins, lids, strict=False):
            schema = ifcb.bin_schema(lid)
            folder = Path(root) / spec["folder"]
            folder.mkdir(parents=True, exist_ok=True)
            stem = folder / lid
            lines = [_adc_line(schema, *roi) for roi in spec["rois"]]
            if spec["damage"] == "junk_line":
                lines.insert(len(lines) // 2, "1,2,three")
            if spec["damage"] != "empty_adc":
                stem.with_suffix(".adc").write_text("\n".join(lines))
            else:
                stem.with_suffix(".adc").write_bytes(b"")
            hdr = "softwareVersion: 1" + ("" if spec["roi_count"] is None else f"\nroiCount: {spec['roi_count']}")
            stem.with_suffix(".hdr").write_text("" if spec["damage"] == "empty_hdr" else hdr)
            if spec["damage"] != "no_roi":
                size = spec["roi_size"]
                stem.with_suffix(".roi").write_bytes(bytes(range(256)) * (size // 256) + bytes(size % 256))
            if spec["damage"] == "none" and lines:
                expected[lid] = [f"fuzz:{ifcb.roi_name(lid, line)}"
                                 for line, roi in enumerate(spec["rois"]) if _is_row(roi[0], roi[1])]
        reader = readers.get("ifcb")
        items = reader.plan(root, source="fuzz")
        assert sorted(i.info["lid"] for i in items) == sorted(lids[: len(bins)])
        for item in items:
            if item.info["lid"] in expected:
                assert not item.error and item.rows == len(expected[item.info["lid"]]), item.source
            else:
                assert item.error and item.rows == 0
        ids, qc = _read_plan(reader, items, cuts)
    # ROI ids are <bin>_<ADC line>: unique, and exactly those of the lines with a ROI, broken ROIs included
    assert sorted(ids.tolist()) == sorted(i for lid_ids in expected.values() for i in lid_ids)
    _assert_unique(ids)
    assert _check_id_policies(ids, qc) == 0


# ---------------------------------------------------------------- EcoTaxa

IMAGE_FILES = {"a.png": PNG, "b.png": PNG, "sub/a.png": PNG, "sub/b.png": PNG, "zero.png": b"",
               "bad.png": CORRUPT_PNG, f"{NFC}.png": PNG}
IMG_CELLS = ["a.png", "b.png", "sub/a.png", "sub\\b.png", "missing.png", "zero.png", "bad.png", "", "../a.png",
             f"{NFC}.png", f"{NFD}.png", " a.png"]
# Object ids that differ only by Unicode form or by a '.0' the ingest drops once became one image id
# (test_object_ids_equal_once_normalised_keep_distinct_ids). Here object ids equal as text are the repeats.
OBJECT_CELLS = ["1", "2", "12", "obj_a", "obj b", "", NFC, "0", "m106_1", "m106_1b"]
EXTRA_COLUMNS = {"object_lat": ["", "43.5", "abc", "nan"], "object_annotation_category": ["", "Copepoda", NFD],
                 "acq_instrument": ["", "uvp6", "IFCB"], "sample_id": ["", "s 1", "x"]}
ECOTAXA_ROW = st.fixed_dictionaries({
    "img_file_name": st.sampled_from(IMG_CELLS), "object_id": st.sampled_from(OBJECT_CELLS),
    **{column: st.sampled_from(values) for column, values in EXTRA_COLUMNS.items()},
})


@FUZZ
@given(columns=st.lists(st.sampled_from(sorted(EXTRA_COLUMNS)), unique=True, max_size=3),
       with_object_id=st.booleans(), order=st.randoms(use_true_random=False),
       rows=st.lists(ECOTAXA_ROW, min_size=1, max_size=10), type_row=st.booleans(), blank_every=st.integers(0, 3),
       line_end=st.sampled_from(["\n", "\r\n"]), container=st.sampled_from(["folder", "zip"]), cuts=CUTS)
def test_ecotaxa_tables_read_as_planned_with_unique_object_ids(columns, with_object_id, order, rows, type_row,
                                                                 blank_every, line_end, container, cuts):
    _count("reader target ecotaxa")
    header = ["img_file_name", *(["object_id"] if with_object_id else []), *columns]
    if len(header) == 1:
        header.append("sample_id")  # one column: a row with an empty cell is a blank line, which is no row
    order.shuffle(header)  # columns are found by name, wherever they are
    lines = ["\t".join(header), *(["\t".join("[t]" for _ in header)] if type_row else [])]
    for i, row in enumerate(rows):
        lines.append("\t".join(row[c] for c in header))
        if blank_every and i % blank_every == 0:
            lines.append("")
    table = (line_end.join(lines) + line_end).encode()
    with tempfile.TemporaryDirectory() as root, pytest.MonkeyPatch.context() as patch:
        patch.setattr(ecotaxa, "CHECKPOINT", 2)  # late windows seek to recorded offsets even in small tables
        if container == "folder":
            (Path(root) / "sub").mkdir()
            (Path(root) / "ecotaxa_fuzz.tsv").write_bytes(table)
            for name, data in IMAGE_FILES.items():
                (Path(root) / name).write_bytes(data)
        else:
            with zipfile.ZipFile(Path(root) / "export.zip", "w") as zf:
                zf.writestr("ecotaxa_fuzz.tsv", table)
                for name, data in IMAGE_FILES.items():
                    zf.writestr(name, data)
        reader = readers.get("ecotaxa")
        [item] = reader.plan(root, source="fuzz")
        assert not item.error and item.rows == len(rows), item.error
        assert reader.read(item, 0, item.rows).column("original_path").to_pylist() == \
            [row["img_file_name"] for row in rows]  # the rows written, in their order
        ids, qc = _read_plan(reader, [item], cuts)
    objects = [row["object_id"] for row in rows]
    if with_object_id and "" not in objects and len(set(objects)) == len(objects):
        _assert_unique(ids)
    if with_object_id:  # an object with several images has one id per image file name (ZooScan's _1, _1b)
        with_id = [r for r, obj in enumerate(objects) if obj]
        images = [(objects[r], unicodedata.normalize("NFC", posixpath.basename(rows[r]["img_file_name"])))
                  for r in with_id]
        assert _groups(ids[with_id].tolist()) == _groups(images)
    _check_id_policies(ids, qc)


def _groups(values: list) -> list[list[int]]:
    """Positions of equal values, grouped: two lists give the same groups when they repeat alike."""
    groups: dict = {}
    for position, value in enumerate(values):
        groups.setdefault(value, []).append(position)
    return sorted(groups.values())


# ---------------------------------------------------------------- Planktonzilla parquet

# Ids ending in '~<n>' as the suffix policy writes them, float ObjIDs that are not whole (1.5, NaN, -0.0, 1e15):
# each once broke the id check (test_suffix_policy_..., test_float_objids_..., test_distinct_float_objids_...).
TEXT_IDS = st.one_of(st.none(), st.sampled_from(["1", "2", "12", "a", "A", NFC, NFD, " a", "", "1.5", "a~2", "1~2"]))
ID_TYPES = {
    "string": (pa.string(), TEXT_IDS),
    "large_string": (pa.large_string(), TEXT_IDS),
    "dictionary": (pa.dictionary(pa.int32(), pa.string()), TEXT_IDS),
    "int64": (pa.int64(), st.one_of(st.none(), st.sampled_from([0, 1, 2, 12]))),
    "float64": (pa.float64(), st.one_of(st.none(), st.sampled_from([0.0, 1.0, 2.0, 12.0, 1.5, float("nan"), -0.0,
                                                                     1e15, 2.5e10]))),
    "null": (pa.null(), st.none()),
}
DATASETS = (pa.string(), st.one_of(st.none(), st.sampled_from(["d", "e", "", " d"])))
PATHS = (pa.string(), st.one_of(st.none(), st.sampled_from(["x/1.png", "y/1.png", "1.png", "", f"{NFC}.png",
                                                           f"{NFD}.png", "a"])))


@st.composite
def parquet_files(draw) -> tuple[pa.Table, int]:
    """A Planktonzilla table whose id columns (dataset, ObjID, original_path) repeat, go missing and change type
    from file to file, and the row group size it is written with."""
    n = draw(st.integers(0, 6))
    id_type, id_values = ID_TYPES[draw(st.sampled_from(sorted(ID_TYPES)))]
    columns = {}
    for name, (arrow_type, values) in (("ObjID", (id_type, id_values)), ("dataset", DATASETS),
                                       ("original_path", PATHS)):
        columns[name] = pa.array([draw(values) for _ in range(n)], type=arrow_type)
    return _planktonzilla_table(n, **columns), draw(st.integers(1, 4))


@FUZZ
@given(files=st.lists(st.tuples(st.sampled_from(["part.parquet", "a/part.parquet", "b/part.parquet",
                                                 f"{NFC}/x.parquet", "z.parquet"]), parquet_files()),
                      min_size=1, max_size=3, unique_by=lambda f: f[0]), cuts=CUTS)
def test_parquet_files_read_as_planned_and_repeated_objids_are_resolved(files, cuts):
    _count("reader target parquet")
    with tempfile.TemporaryDirectory() as root:
        written = {}
        for name, (table, row_group_size) in files:
            path = Path(root) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, path, row_group_size=row_group_size)
            written[str(path)] = table.num_rows
        reader = readers.get("parquet")
        items = reader.plan(root, source="fuzz")
        assert {i.source: i.rows for i in items} == written
        ids, qc = _read_plan(reader, items, cuts)
    assert len(ids) == sum(written.values())
    _check_id_policies(ids, qc)  # repeats across files and types: '1', 1 and 1.0 are one id


# ---------------------------------------------------------------- class folders and archives

IMAGE_SUFFIXES = (".png", ".jpg", ".tif", ".gif")
FOLDERS = ["cop", "Cop", NFC, NFD, "a b", "\u65e5\u672c", "top/cop", f"top/{NFC}", "top/a b", ".hidden",
           "__MACOSX/cop", "cop/.git", ""]
FILES = ["a.png", "A.PNG", f"{NFC}.png", f"{NFD}.png", "b c.jpg", "x.tif", "d.gif", ".h.png", "._a.png",
         "notes.txt", "noext", "a.png.bak"]
ENTRY = st.tuples(st.sampled_from(FOLDERS), st.sampled_from(FILES), IMAGE_CONTENT)


def _takes(name: str) -> bool:
    """Whether a class-folder reader should read a file: an image type, in a class folder, nothing hidden."""
    parts = name.split("/")
    return (len(parts) > 1 and not any(p.startswith(".") or p == "__MACOSX" for p in parts)
            and parts[-1].lower().endswith(IMAGE_SUFFIXES))


def _write_container(root: Path, kind: str, members: list[tuple[str, bytes]]) -> Path:
    if kind == "dir":
        for name, data in members:
            (root / "tree" / name).parent.mkdir(parents=True, exist_ok=True)
            (root / "tree" / name).write_bytes(data)
        return root / "tree"
    path = root / f"odd name {NFC}.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(path, "w") as zf, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Duplicate name": archives may hold a name twice
            for name, data in members:
                zf.writestr(name, data)
        return path
    with tarfile.open(path, "w:gz" if kind == "tar.gz" else "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@FUZZ
@given(entries=st.lists(ENTRY, min_size=1, max_size=10), kind=st.sampled_from(["dir", "tar", "tar.gz", "zip"]),
       top=st.sampled_from(["", "Net/imgs/"]), repeat=st.lists(st.integers(0, 9), max_size=3), cuts=CUTS)
def test_class_folders_and_archives_read_as_planned_with_unique_ids(entries, kind, top, repeat, cuts):
    _count("reader target folder")
    members = [(f"{top}{folder}/{name}" if folder else f"{top}{name}", CONTENT[content])
               for folder, name, content in entries]
    if kind != "dir":  # an archive may hold a member name twice (a folder cannot), here with other bytes
        members += [(members[r % len(members)][0], PNG + b"copy %d" % copy) for copy, r in enumerate(repeat)]
    taken = [(name, data) for name, data in (dict(members).items() if kind == "dir" else members) if _takes(name)]
    expected = len(taken)
    with tempfile.TemporaryDirectory() as root:
        path = _write_container(Path(root), kind, members)
        reader = readers.get("folder")
        try:
            items = reader.plan(str(path), source="fuzz")
        except PzscaleError as e:
            assert expected == 0, e  # only an input with no image in a class folder is refused
            return
        assert [i.rows for i in items] == [expected]
        ids, qc = _read_plan(reader, items, cuts)
        read = reader.read(items[0], 0, expected).column("image").to_pylist()
    assert Counter(image["bytes"] for image in read) == Counter(data for _, data in taken)  # each copy read once
    # a name held twice, NFC/NFD twins, one <class>/<file> in two top folders: each row keeps its own id
    _assert_unique(ids)
    assert _check_id_policies(ids, qc) == 0


# ---------------------------------------------------------------- WebDataset shards

# Keys that differ only by Unicode form once collided (test_webdataset_keys_equal_once_normalised_keep_distinct_ids)
KEYS = ["s1", "S1", "dir/s1", "dir/s2", NFC, NFD, "a b", "x.y", "image_10", "\u65e5"]
FIELDS = ["png", "jpg", "JPG", "txt", "json", "cls", "seg.png", "extra"]
JSONS = [b'{"dataset": "zooscan", "Latitude": 43.5}', b'{"dataset": ""}', b'{"dataset": 5}', b"{", b"[]", b"null",
         b'{"Latitude": "north", "Depth_min": 1e999}', b"\xff\xfe", b'{"dataset": "other", "original_label": "x"}']
TEXTS = [b"animalia arthropoda", b"", b"\xff\xfe", "chromista \u00e9".encode()]
# Latin-1 text is NFC already (no Unicode twins); '\\' and ':' would make names the reader refuses as absolute paths
RANDOM_KEY = st.text(st.characters(codec="latin-1", exclude_categories=("Cc",), exclude_characters="./\\:"),
                     min_size=1, max_size=5)
# a sample's fields: mostly an image first; a field drawn twice is a member name the tar holds twice
SAMPLE = st.tuples(st.one_of(st.sampled_from(KEYS), RANDOM_KEY),
                   st.tuples(st.sampled_from(["png", "jpg", "JPG", "png", "txt", "seg.png"]),
                             st.lists(st.sampled_from(FIELDS), max_size=3)).map(lambda f: [f[0], *f[1]]),
                   st.integers(0, 99))
ODD_MEMBER = st.tuples(st.sampled_from([".hidden.png", "noext", "dir/.x.txt"]), st.just([""]), st.integers(0, 99))
SHARD = st.tuples(st.sampled_from(["shard-0.tar", "shard-1.tar", f"{NFC}.tar", "a b.tar", "garbage.tar"]),
                  st.lists(st.one_of(SAMPLE, SAMPLE, ODD_MEMBER), min_size=1, max_size=6))


def _member(key: str, field: str, pick: int) -> tuple[str, bytes]:
    name = f"{key}.{field}" if field else key
    field = field.lower()
    if field in ("png", "jpg"):
        data = CONTENT[["png", "png", "zero", "corrupt", "junk"][pick % 5]]
    elif field == "json":
        data = JSONS[pick % len(JSONS)]
    elif field == "txt":
        data = TEXTS[pick % len(TEXTS)]
    else:
        data = [b"3", b"x", b"", b"-1"][pick % 4]
    return name, data


def _samples_with_an_image(names: list[str]) -> int:
    """Keys (the name up to the first dot of its basename) having a member of an image field, as WebDataset groups."""
    keys = set()
    for name in names:
        folder, _, base = name.rpartition("/")
        if base.startswith(".") or "." not in base:
            continue
        stem, field = base.split(".", 1)
        if field.lower() in ("png", "jpg"):
            keys.add(f"{folder}/{stem}")
    return len(keys)


@FUZZ
@given(shards=st.lists(SHARD, min_size=1, max_size=2, unique_by=lambda s: s[0]), cuts=CUTS)
def test_webdataset_shards_read_as_planned_with_unique_ids(shards, cuts):
    _count("reader target webdataset")
    expected = {}
    with tempfile.TemporaryDirectory() as root:
        for shard, spec in shards:
            path = Path(root) / shard
            if shard == "garbage.tar":
                path.write_bytes(PNG * 3)  # not a tar: that shard is an item error, the others are read
                continue
            members = [_member(key, field, pick + i) for key, fields, pick in spec
                       for i, field in enumerate(fields)]
            with tarfile.open(path, "w") as tar:
                for name, data in members:  # repeated names too: the last copy is read
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            expected[str(path)] = _samples_with_an_image([name for name, _ in members])
        reader = readers.get("webdataset")
        try:
            items = reader.plan(root, source="fuzz")
        except PzscaleError as e:
            assert not any(expected.values()), e  # refused only when no shard has a sample with an image
            return
        assert {i.source: i.rows for i in items} == {
            str(Path(root) / shard): expected.get(str(Path(root) / shard), 0) for shard, _ in shards}
        ids, qc = _read_plan(reader, items, cuts)
    _assert_unique(ids)
    assert _check_id_policies(ids, qc) == 0


# ---------------------------------------------------------------- what the targets found, pinned (not fixed here)


def _parquet_ids(tmp_path: Path, objids: pa.Array) -> tuple[list[str], list[str]]:
    """(ids from read_keys, ids from read) of a one-file Planktonzilla parquet with these ObjIDs."""
    path = tmp_path / "part.parquet"
    pq.write_table(_planktonzilla_table(len(objids), ObjID=objids, dataset=pa.array(["d"] * len(objids))), path)
    reader = readers.get("parquet")
    [item] = reader.plan(str(path))
    names = row_names(item.source, 0, item.rows)
    from_rows = columns_from_table(reader.read(item, 0, item.rows), row_names=names)["image_id"]
    return ids_of_table(reader.read_keys(item), names).tolist(), from_rows.tolist()


@pytest.mark.parametrize("objid", [1.5, float("nan"), -0.0, 1e15])
def test_float_objids_give_read_keys_the_ids_of_read(tmp_path, objid):
    from_keys, from_rows = _parquet_ids(tmp_path, pa.array([objid], pa.float64()))
    assert from_keys == from_rows


def test_distinct_float_objids_keep_distinct_ids(tmp_path):
    from_keys, from_rows = _parquet_ids(tmp_path, pa.array([1.5, 2.0], pa.float64()))
    assert len(set(from_keys)) == 2  # what the pre-write check sees: no shared id
    assert len(set(from_rows)) == 2


def test_suffix_policy_leaves_no_shared_id_when_an_id_already_ends_in_a_suffix():
    ids = np.array(["fuzz:a", "fuzz:a", "fuzz:a~2"], dtype=object)
    qc = np.full(3, "", dtype=object)
    before, size = occurrences(hashes(ids))
    shared = np.flatnonzero(size > 1)
    apply_policy(ids, qc, shared, suffixed(ids[shared].tolist(), before[shared], np.sort(hashes(ids))), "suffix")
    assert len(set(ids.tolist())) == 3, ids.tolist()


@pytest.mark.parametrize("pair", [("12", "12.0"), (NFC, NFD)], ids=["float-text", "nfc-nfd"])
def test_object_ids_equal_once_normalised_keep_distinct_ids(tmp_path, pair):
    # two images of one object whose id is written two ways: each image keeps its own id (<id>/<file name>)
    rows = "".join(f"{name}\t{obj}\n" for name, obj in zip(("a.png", "b.png"), pair, strict=True))
    (tmp_path / "ecotaxa_x.tsv").write_bytes(f"img_file_name\tobject_id\n{rows}".encode())
    (tmp_path / "a.png").write_bytes(PNG)
    (tmp_path / "b.png").write_bytes(PNG)
    reader = readers.get("ecotaxa")
    [item] = reader.plan(str(tmp_path), source="fuzz")
    ids = columns_from_table(reader.read(item, 0, 2), row_names=row_names(item.source, 0, 2))["image_id"]
    assert len(set(ids.tolist())) == 2, ids.tolist()


def test_webdataset_keys_equal_once_normalised_keep_distinct_ids(tmp_path):
    with tarfile.open(tmp_path / "shard-0.tar", "w") as tar:
        for key in (NFC, NFD):
            info = tarfile.TarInfo(f"{key}.png")
            info.size = len(PNG)
            tar.addfile(info, io.BytesIO(PNG))
    reader = readers.get("webdataset")
    [item] = reader.plan(str(tmp_path), source="fuzz")
    assert item.rows == 2
    ids = columns_from_table(reader.read(item, 0, 2), row_names=row_names(item.source, 0, 2))["image_id"]
    assert len(set(ids.tolist())) == 2, ids.tolist()


def test_blank_lines_among_rows_whose_first_cell_is_empty_keep_windows_on_their_rows(tmp_path):
    (tmp_path / "ecotaxa_x.tsv").write_text("sample_id\timg_file_name\n\ta.png\n\n\tb.png\n\tc.png\n")
    reader = readers.get("ecotaxa")
    [item] = reader.plan(str(tmp_path), source="fuzz")
    assert reader.read(item, 0, 3).column("original_path").to_pylist() == ["a.png", "b.png", "c.png"]
    assert reader.read(item, 2, 3).column("original_path").to_pylist() == ["c.png"]
