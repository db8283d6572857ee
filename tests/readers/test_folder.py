"""Class-folder trees: a folder, .tar, .tar.gz and .zip of the same tree read alike, and unsafe archives are refused."""

from __future__ import annotations

import io
import os
import shutil
import stat
import tarfile
import unicodedata
import warnings
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from pzscale import images
from pzscale.errors import InputError
from pzscale.readers.folder import ClassFolderReader, check_member_name

READER = ClassFolderReader()
REAL_PNGS = ("irfcb/test_data/png/*/*.png", "irfcb/test_data/png2/*/*.png", "classipyr/test_data/example_png/*/*.png")


def _image_bytes(fmt: str, value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((6, 9), value, np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tree(tmp_path_factory, sample_data) -> Path:
    """tree/topdir/<class>/<image>: the real IFCB PNGs in their class folders, a few made here, and non-images."""
    root = tmp_path_factory.mktemp("folder") / "tree"
    top = root / "topdir"
    for pattern in REAL_PNGS:
        for png in sorted(sample_data.glob(pattern)):
            (top / png.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(png, top / png.parent.name / png.name)
    (top / "detritus").mkdir()
    (top / "detritus" / "a.jpg").write_bytes(_image_bytes("JPEG", 40))
    (top / "detritus" / "b.TIF").write_bytes(_image_bytes("TIFF", 80))  # extensions are case-insensitive
    (top / "detritus" / "notes.txt").write_text("not an image")
    (top / "detritus" / ".hidden.png").write_bytes(b"resource fork")
    (top / "README.md").write_text("ignored")
    return root


def _make_archives(root: Path, out: Path) -> dict[str, Path]:
    paths = {"tar": out / "tree.tar", "tar.gz": out / "tree.tar.gz", "zip": out / "tree.zip"}
    for kind, mode in (("tar", "w"), ("tar.gz", "w:gz")):
        with tarfile.open(paths[kind], mode) as tar:
            tar.add(root / "topdir", arcname="topdir")
    with zipfile.ZipFile(paths["zip"], "w") as zf:
        for file in sorted((root / "topdir").rglob("*")):
            zf.write(file, file.relative_to(root).as_posix())
    return paths


@pytest.fixture(scope="module")
def inputs(tree, tmp_path_factory) -> dict[str, Path]:
    return {"dir": tree, **_make_archives(tree, tmp_path_factory.mktemp("archives"))}


def _expected_images(tree: Path) -> list[str]:
    return sorted(
        p.relative_to(tree).as_posix() for p in tree.rglob("*")
        if p.suffix.lower() in {".png", ".jpg", ".tif"} and not p.name.startswith(".")
    )


def test_folder_and_archives_give_identical_plans_and_records(inputs, tree):
    expected = _expected_images(tree)
    assert len(expected) == 5
    tables = {}
    for kind, path in inputs.items():
        [item] = READER.plan(str(path))
        assert (item.source, item.info["source"], item.rows, item.error) == (str(path), "tree", len(expected), "")
        assert item.info["container"] == kind
        assert item.info["members"] == expected
        assert item.size > 0
        tables[kind] = READER.read(item, 0, item.rows).to_pylist()
    reference = tables["dir"]
    for kind, rows in tables.items():
        assert rows == reference, kind
    for name, row in zip(expected, reference, strict=True):
        label, filename = name.split("/")[-2:]
        assert row["image"] == {"bytes": (tree / name).read_bytes(), "path": name}  # bytes unchanged
        assert (row["dataset"], row["original_label"]) == ("tree", label)
        assert (row["original_path"], row["ObjID"]) == (f"/{label}/{filename}", f"{label}/{filename}")
    assert len({r["ObjID"] for r in reference}) == len(reference)
    assert {r["original_label"] for r in reference} == {"Cryptomonadales", "Mesodinium_rubrum", "detritus"}


@pytest.mark.parametrize("kind", ["dir", "tar", "tar.gz", "zip"])
def test_sub_ranges_match_the_full_read(inputs, kind):
    [item] = READER.plan(str(inputs[kind]))
    full = READER.read(item, 0, item.rows).to_pylist()
    assert READER.read(item, 1, 4).to_pylist() == full[1:4]
    assert READER.read(item, 3, 4).to_pylist() == full[3:4]
    chunks = [READER.read(item, i, min(i + 2, item.rows)).to_pylist() for i in range(0, item.rows, 2)]
    assert sum(chunks, []) == full


def test_source_defaults_to_the_archive_stem_and_a_given_source_wins(tree, tmp_path):
    archive = tmp_path / "ZooScanNet.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree / "topdir", arcname="ZooScanNet/imgs")
    [item] = READER.plan(str(archive))
    assert item.info["source"] == "zooscannet" and item.source == str(archive)
    assert READER.read(item, 0, 1).column("dataset").to_pylist() == ["zooscannet"]
    [given] = READER.plan(str(archive), source="zooscan")
    assert given.info["source"] == "zooscan"
    assert READER.read(given, 0, 1).column("original_path").to_pylist()[0].startswith("/Cryptomonadales/")


def test_guess_can_open(inputs, tmp_path):
    for path in inputs.values():
        assert READER.guess_can_open(str(path))
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "a.png").write_bytes(_image_bytes("PNG", 1))
    (loose / "b.txt").write_text("x")
    (loose / "sub").mkdir()
    (loose / "sub" / "data.csv").write_text("1,2")
    assert not READER.guess_can_open(str(loose))
    assert not READER.guess_can_open(str(loose / "a.png"))
    assert not READER.guess_can_open(str(tmp_path / "missing.tar"))
    (tmp_path / "broken.zip").write_bytes(b"not a zip")
    assert not READER.guess_can_open(str(tmp_path / "broken.zip"))


def test_unreadable_or_empty_inputs_raise_one_line_errors(tmp_path):
    (tmp_path / "broken.tar.gz").write_bytes(b"\x1f\x8b garbage")
    with tarfile.open(tmp_path / "empty.tar", "w") as tar:
        info = tarfile.TarInfo("top/notes.txt")
        tar.addfile(info, io.BytesIO(b""))
    for name, message in (("broken.tar.gz", "not a readable tar.gz"), ("empty.tar", "no images"),
                          ("nothing", "not a folder")):
        with pytest.raises(InputError, match=message) as err:
            READER.plan(str(tmp_path / name))
        assert "\n" not in str(err.value) and name in str(err.value)


def test_zip_members_zipfile_cannot_read_are_found_at_plan_time(tmp_path):
    archive = tmp_path / "deflate64.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("top/A/x.png", _image_bytes("PNG", 2))
    # mark the member as Deflate64 (method 9) in its local and central headers, as Windows writes big zips
    data = bytearray(archive.read_bytes())
    for signature, at in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
        start = data.index(signature) + at
        data[start:start + 2] = (9).to_bytes(2, "little")
    archive.write_bytes(bytes(data))
    with pytest.raises(InputError, match="'top/A/x.png' uses zip compression method 9"):
        READER.plan(str(archive))


def test_colliding_class_and_file_names_keep_unique_ids(tmp_path):
    png = _image_bytes("PNG", 3)
    for release in ("2006", "2007"):
        (tmp_path / "whoi" / release / "Ciliate").mkdir(parents=True)
        (tmp_path / "whoi" / release / "Ciliate" / "x.png").write_bytes(png)
    (tmp_path / "whoi" / "2007" / "Ciliate" / "y.png").write_bytes(png)
    [item] = READER.plan(str(tmp_path / "whoi"))
    rows = READER.read(item, 0, item.rows).to_pylist()
    assert [r["ObjID"] for r in rows] == ["2006/Ciliate/x.png", "2007/Ciliate/x.png", "Ciliate/y.png"]
    assert {r["original_path"] for r in rows} == {"/Ciliate/x.png", "/Ciliate/y.png"}


def test_a_file_gone_since_the_plan_is_an_empty_row(tree, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(tree, root)
    [item] = READER.plan(str(root))
    (root / item.info["members"][1]).unlink()
    images = READER.read(item, 0, 3).column("image").to_pylist()
    assert images[1]["bytes"] == b"" and images[0]["bytes"] and images[2]["bytes"]


# ---------------------------------------------------------------- safety


def _tar_with(path: Path, member: tarfile.TarInfo, mode: str = "w") -> Path:
    good = _image_bytes("PNG", 5)
    with tarfile.open(path, mode) as tar:
        ok = tarfile.TarInfo("top/A/good.png")
        ok.size = len(good)
        tar.addfile(ok, io.BytesIO(good))
        tar.addfile(member, io.BytesIO(good) if member.isfile() else None)
    return path


def _tar_member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    if kind == tarfile.REGTYPE:
        info.size = len(_image_bytes("PNG", 5))
    return info


UNSAFE_TAR_MEMBERS = {
    "parent": (_tar_member("../evil.png"), "'..' in path"),
    "nested_parent": (_tar_member("top/A/../../../evil.png"), "'..' in path"),
    "absolute": (_tar_member("/etc/evil.png"), "absolute path"),
    "symlink": (_tar_member("top/A/evil.png", tarfile.SYMTYPE, "/etc/passwd"), "link"),
    "hardlink": (_tar_member("top/A/evil.png", tarfile.LNKTYPE, "top/A/good.png"), "link"),
    "device": (_tar_member("top/A/evil.png", tarfile.CHRTYPE), "device"),
    "newline": (_tar_member("top/A/x\n/../evil.png"), "'..' in path"),
}


def _files_under(path: Path) -> set[Path]:
    return set(path.rglob("*"))


def _assert_refused(path: Path, member: str, why: str, workdir: Path) -> None:
    before = _files_under(workdir)
    with pytest.raises(InputError) as err:
        READER.plan(str(path))
    message = str(err.value)
    assert "\n" not in message
    shown = member.replace("\n", "\\n")  # the message escapes control characters
    assert message.startswith(f"{path}: unsafe member '{shown}'")
    assert why in message
    assert READER.guess_can_open(str(path))  # claimed, so that the plan says why it is refused
    assert _files_under(workdir) == before
    assert not (workdir.parent / "evil.png").exists() and not (workdir / "evil.png").exists()


@pytest.mark.parametrize("case", sorted(UNSAFE_TAR_MEMBERS))
@pytest.mark.parametrize("suffix,mode", [(".tar", "w"), (".tar.gz", "w:gz")])
def test_unsafe_tar_members_are_refused(tmp_path, case, suffix, mode):
    member, why = UNSAFE_TAR_MEMBERS[case]
    archive = _tar_with(tmp_path / f"evil{suffix}", member, mode)
    _assert_refused(archive, member.name, why, tmp_path)


def _zip_with(path: Path, name: str, mode_bits: int = 0) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("top/A/good.png", _image_bytes("PNG", 5))
        info = zipfile.ZipInfo(name)
        info.create_system, info.external_attr = 3, mode_bits << 16
        zf.writestr(info, b"/etc/passwd" if stat.S_ISLNK(mode_bits) else _image_bytes("PNG", 6))
    return path


@pytest.mark.parametrize("name,mode_bits,why", [
    ("../evil.png", 0, "'..' in path"),
    ("/etc/evil.png", 0, "absolute path"),
    ("C:/evil.png", 0, "absolute path"),
    ("top/A/evil.png", stat.S_IFLNK | 0o777, "symlink"),
    ("top/A/evil.png", stat.S_IFIFO | 0o644, "device"),
])
def test_unsafe_zip_members_are_refused(tmp_path, name, mode_bits, why):
    archive = _zip_with(tmp_path / "evil.zip", name, mode_bits)
    _assert_refused(archive, name, why, tmp_path)


def test_check_member_name_accepts_ordinary_names():
    for name in ("top/A/x.png", "./top/A/x.png", "top/A/x..y.png", "A/..hidden.png"):
        check_member_name("a.tar", name)


def test_symlinks_in_a_folder_are_not_followed(tree, tmp_path):
    outside = tmp_path / "outside"
    (outside / "Secret").mkdir(parents=True)
    (outside / "Secret" / "evil.png").write_bytes(_image_bytes("PNG", 9))
    root = tmp_path / "linked"
    shutil.copytree(tree, root)
    (root / "topdir" / "detritus" / "evil.png").symlink_to(outside / "Secret" / "evil.png")
    (root / "topdir" / "Secret").symlink_to(outside / "Secret", target_is_directory=True)
    [item] = READER.plan(str(root))
    assert item.info["members"] == _expected_images(tree)


# ---------------------------------------------------------------- nothing left out in silence (issue 17)


def _webp_read() -> bool:
    return features.check("webp")


@pytest.fixture
def mixed_tree(tmp_path) -> Path:
    """classes/<class>/<file> with files of every kind the reader takes or skips, in known numbers."""
    root = tmp_path / "classes"
    (root / "A").mkdir(parents=True)
    (root / "B").mkdir()
    (root / "A" / "ok1.png").write_bytes(_image_bytes("PNG", 1))
    (root / "A" / "ok2.jpg").write_bytes(_image_bytes("JPEG", 2))
    (root / "A" / "empty.png").write_bytes(b"")  # taken: a missing_image row, not a skip
    (root / "B" / "w1.webp").write_bytes(_image_bytes("WEBP", 3))
    (root / "B" / "w2.WEBP").write_bytes(_image_bytes("WEBP", 4))
    (root / "A" / "v.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    (root / "B" / "notes.txt").write_text("x")
    (root / "B" / "data.csv").write_text("1,2")
    (root / "B" / "noext").write_text("x")
    (root / "A" / ".hidden.png").write_bytes(_image_bytes("PNG", 5))  # hidden: 2 files and 1 folder's file
    (root / "B" / ".DS_Store").write_bytes(b"\0")
    (root / "__MACOSX" / "A").mkdir(parents=True)
    (root / "__MACOSX" / "A" / "._ok1.png").write_bytes(b"fork")
    (root / ".snapshot" / "A").mkdir(parents=True)  # a hidden folder: counted once, never entered
    (root / ".snapshot" / "A" / "ok1.png").write_bytes(_image_bytes("PNG", 1))
    outside = tmp_path / "outside"
    (outside / "Secret").mkdir(parents=True)
    (outside / "Secret" / "evil.png").write_bytes(_image_bytes("PNG", 9))
    (root / "A" / "link.png").symlink_to(root / "A" / "ok1.png")  # 3 symlinks: a file, a broken one, a folder
    (root / "B" / "broken.png").symlink_to(tmp_path / "missing.png")
    (root / "Secret").symlink_to(outside / "Secret", target_is_directory=True)
    os.mkfifo(root / "A" / "pipe.png")  # not a regular file
    (root / "loose.png").write_bytes(_image_bytes("PNG", 6))  # an image in no class folder
    return root


def test_files_not_taken_from_a_folder_are_counted_in_one_note_per_input(mixed_tree):
    [item] = READER.plan(str(mixed_tree))
    webp = ["B/w1.webp", "B/w2.WEBP"] if _webp_read() else []
    assert item.info["members"] == sorted(["A/empty.png", "A/ok1.png", "A/ok2.jpg", *webp])
    types = "1 .svg (vector image, not decoded)" + ("" if _webp_read() else
                                                    ", 2 .webp (no WebP support in this Pillow)")
    total = 13 + (0 if _webp_read() else 2)
    assert item.notes == [
        f"{mixed_tree}: {total} entries skipped: {types}, 3 not an image type read (1 (no extension), 1 .csv, "
        "1 .txt), 3 symlink(s) (not followed), 1 special file(s) (fifo, socket, device), 3 hidden file(s) "
        "(dot files, __MACOSX), 1 hidden folder(s) (not entered), 1 image(s) outside any class folder"
    ]
    rows = READER.read(item, 0, item.rows).to_pylist()
    assert len(rows) == item.rows  # planned rows are the rows read
    by_path = {r["image"]["path"]: r for r in rows}
    assert by_path["A/empty.png"]["image"]["bytes"] == b""
    for name in webp:  # WebP is read when Pillow decodes it, and it does decode
        assert by_path[name]["original_label"] == "B"
        assert images.probe(by_path[name]["image"]["bytes"])[:2] == (6, 9)


def test_an_input_with_only_skipped_files_says_why_it_has_no_images(tmp_path):
    (tmp_path / "svgs" / "A").mkdir(parents=True)
    for i in range(2):
        (tmp_path / "svgs" / "A" / f"{i}.svg").write_text("<svg/>")
    with pytest.raises(InputError, match=r"no images in .*; 2 entries skipped: 2 \.svg \(vector image"):
        READER.plan(str(tmp_path / "svgs"))


def test_skip_notes_without_skips_and_with_many_types():
    from pzscale.readers.folder import skipped_note

    assert skipped_note("x", Counter()) == ""
    many = Counter({f"type:.e{i}": 1 for i in range(8)} | {"type:.txt": 3})
    assert skipped_note("x", many) == ("x: 11 entries skipped: 11 not an image type read (3 .txt, 1 .e0, 1 .e1, "
                                       "1 .e2, 1 .e3, 1 .e4, 3 more in 3 other type(s))")
    assert skipped_note("x", Counter(symlink=1)) == "x: 1 entry skipped: 1 symlink(s) (not followed)"


def _archive_members() -> list[tuple[str, bytes]]:
    return [("top/A/x.png", _image_bytes("PNG", 1)), ("top/A/y.webp", _image_bytes("WEBP", 2)),
            ("top/A/z.svg", b"<svg/>"), ("top/A/.hid.png", b"x"), ("__MACOSX/top/A/._x.png", b"fork"),
            ("top/README.md", b"readme"), ("loose.png", _image_bytes("PNG", 3)), ("top/B/n.txt", b"x")]


def _write_tar(path: Path, members: list[tuple[str, bytes]], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tar:
        tar.addfile(_dir_info("top"))
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _dir_info(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def _write_zip(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w") as zf:
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns of a name written twice: that is the point
        zf.writestr("top/", b"")
        for name, data in members:
            zf.writestr(name, data)
    return path


@pytest.mark.parametrize("kind", ["tar", "tar.gz", "zip"])
def test_archive_members_not_taken_are_counted(tmp_path, kind):
    path = tmp_path / f"classes.{kind}"
    if kind == "zip":
        _write_zip(path, _archive_members())
    else:
        _write_tar(path, _archive_members(), "w:gz" if kind == "tar.gz" else "w")
    [item] = READER.plan(str(path))
    webp = _webp_read()
    assert item.info["members"] == ["top/A/x.png", *(["top/A/y.webp"] if webp else [])]
    types = "1 .svg (vector image, not decoded)" + ("" if webp else ", 1 .webp (no WebP support in this Pillow)")
    assert item.notes == [f"{path}: {6 if webp else 7} entries skipped: {types}, 2 not an image type read (1 .md, "
                          "1 .txt), 2 hidden file(s) (dot files, __MACOSX), 1 image(s) outside any class folder"]
    assert READER.read(item, 0, item.rows).num_rows == item.rows


@pytest.mark.parametrize("kind", ["tar", "tar.gz", "zip"])
def test_a_member_name_held_twice_is_read_twice_as_distinct_rows(tmp_path, kind):
    first, second, other = _image_bytes("PNG", 10), _image_bytes("PNG", 20), _image_bytes("PNG", 30)
    members = [("top/A/x.png", first), ("top/B/y.png", other), ("top/A/x.png", second)]
    path = tmp_path / f"twice.{kind}"
    if kind == "zip":
        _write_zip(path, members)
    else:
        _write_tar(path, members, "w:gz" if kind == "tar.gz" else "w")
    [item] = READER.plan(str(path))
    assert item.rows == 3 and item.info["members"] == ["top/A/x.png", "top/A/x.png", "top/B/y.png"]
    assert item.notes == [f"{path}: 2 row(s) are copies of a member name the archive holds more than once: each is "
                          "read as its own row, its id and path ending in '#1', '#2'... in archive order"]
    rows = READER.read(item, 0, item.rows).to_pylist()
    assert [r["image"]["bytes"] for r in rows] == [first, second, other]  # both copies, in archive order
    assert [r["ObjID"] for r in rows] == ["A/x.png#1", "A/x.png#2", "B/y.png"]
    assert [r["original_path"] for r in rows] == ["/A/x.png#1", "/A/x.png#2", "/B/y.png"]
    assert [r["image"]["path"] for r in rows] == ["top/A/x.png#1", "top/A/x.png#2", "top/B/y.png"]
    for lo in range(3):  # any sub-range numbers its rows as the full read does
        assert READER.read(item, lo, lo + 1).to_pylist() == rows[lo:lo + 1]


def test_class_folders_equal_once_unicode_normalised_keep_distinct_ids(tmp_path):
    nfc, nfd = unicodedata.normalize("NFC", "Cératium"), unicodedata.normalize("NFD", "Cératium")
    assert nfc != nfd
    root = tmp_path / "unicode"
    for i, name in enumerate((nfc, nfd)):
        (root / name).mkdir(parents=True)
        (root / name / "x.png").write_bytes(_image_bytes("PNG", 40 + i))
    (root / nfd / "y.png").write_bytes(_image_bytes("PNG", 50))
    [item] = READER.plan(str(root))
    assert item.rows == 3
    rows = READER.read(item, 0, 3).to_pylist()
    ids = [unicodedata.normalize("NFC", r["ObjID"]) for r in rows]  # as the ingest stores them
    assert len(set(ids)) == 3
    assert sorted(ids) == sorted([f"{nfc}/x.png#1", f"{nfc}/x.png#2", f"{nfc}/y.png"])
    assert item.notes == [f"{root}: 2 row(s) have names equal once Unicode-normalised (NFC): each is read as its "
                          "own row, its id and path ending in '#1', '#2'... in archive order"]


def test_read_keys_gives_the_ids_of_read_without_the_images(inputs, mixed_tree, tmp_path):
    from pzscale.readers.base import keys_only

    twice = _write_zip(tmp_path / "twice.zip", [("top/A/x.png", b"1"), ("top/A/x.png", b"2")])
    for path in [*inputs.values(), mixed_tree, twice]:
        [item] = READER.plan(str(path))
        assert READER.read_keys(item).to_pylist() == keys_only(READER.read(item, 0, item.rows)).to_pylist()


def test_the_sample_is_the_folder_above_the_class_folder(tmp_path):
    for where in ("cruise7/station_12/copepod/a.png", "cruise7/station_12/diatom/b.png", "station_13/copepod/c.png",
                  "copepod/d.png"):
        (tmp_path / where).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / where).write_bytes(_image_bytes("PNG", 90))
    [item] = READER.plan(str(tmp_path))
    rows = READER.read(item, 0, item.rows).to_pylist()
    found = {r["image"]["path"]: r["sample"] for r in rows}
    assert found == {"cruise7/station_12/copepod/a.png": "station_12", "cruise7/station_12/diatom/b.png": "station_12",
                     "station_13/copepod/c.png": "station_13", "copepod/d.png": ""}
