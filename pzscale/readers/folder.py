"""Class-folder trees: ``<root>/<class>/<image>`` as a folder, a .tar, a .tar.gz/.tgz or a .zip.

The layout of the SEANOE nets (ZooScanNet, FlowCamNet, UVP6Net, ISIISNet...), WHOI and NDSB: the class of an
image is the name of the folder holding it, whatever lies above (archives often add top folders such as
``ZooScanNet/imgs/``). Archives are read in place and nothing is ever written. Members that would escape the
target folder if extracted (absolute paths, ``..``, links, devices) are still refused at plan time: they mark a
crafted or broken archive, and other tools (Planktonzilla's pipeline included) extract these archives to disk.
So are decompression bombs: a member expanding beyond ``pzscale.limits`` (size, compression ratio).

Nothing is left out in silence: files not taken (types Pillow cannot decode, hidden files, symlinks, which are not
followed, images outside any class folder) are counted per input and reported in one ``Item.notes`` line. A member
name an archive holds twice is read twice, as two rows; so are two files whose names differ only in their Unicode
form (NFC/NFD, which the ingest makes one): such rows get ids (and paths) ending in ``#1``, ``#2``, ... in order.
"""

from __future__ import annotations

import gzip
import os
import posixpath
import re
import stat
import tarfile
import unicodedata
import warnings
import zipfile
import zlib
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterator
from typing import IO, Any

import fsspec
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem
from PIL import features

from pzscale import limits
from pzscale.errors import InputError, one_line
from pzscale.faults import is_transient
from pzscale.readers.base import Item, Reader, keys_only, records

# Image types read when this Pillow decodes them (WebP, AVIF and JPEG 2000 are optional parts of Pillow).
OPTIONAL_TYPES = {".webp": ("webp", "WebP"), ".avif": ("avif", "AVIF"), ".jp2": ("jpg_2000", "JPEG 2000"),
                  ".j2k": ("jpg_2000", "JPEG 2000")}


def _pillow_has(feature: str) -> bool:
    with warnings.catch_warnings():  # an older Pillow warns of a feature it does not know (AVIF before 11.2)
        warnings.simplefilter("ignore")
        try:
            return bool(features.check(feature))
        except Exception:  # noqa: BLE001 - a feature Pillow cannot tell about is one it lacks
            return False


IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif"}
                             | {ext for ext, (feature, _) in OPTIONAL_TYPES.items() if _pillow_has(feature)})
# Image types that are skipped, and why (said in the skipped-files note).
UNREADABLE_TYPES = {
    ".svg": "vector image, not decoded", ".svgz": "vector image, not decoded",
    ".heic": "HEIF, no decoder", ".heif": "HEIF, no decoder",
    **{ext: f"no {what} support in this Pillow" for ext, (_, what) in OPTIONAL_TYPES.items()
       if ext not in IMAGE_EXTENSIONS},
}
SKIP_PHRASES = {  # counted reasons other than a file type, in the order the note gives them
    "symlink": "symlink(s) (not followed)",
    "special": "special file(s) (fifo, socket, device)",
    "hidden": "hidden file(s) (dot files, __MACOSX)",
    "hidden_dir": "hidden folder(s) (not entered)",
    "outside": "image(s) outside any class folder",
    "unreadable_dir": "unreadable folder(s) (permission or I/O error)",
}
LISTED_TYPES = 6  # other file types the note names one by one
ARCHIVE_SUFFIXES = {".tar.gz": "tar.gz", ".tgz": "tar.gz", ".tar": "tar", ".zip": "zip"}
PEEK_MEMBERS = 50  # archive members guess_can_open looks at
PEEK_LISTINGS = 30  # folder listings guess_can_open may make
PEEK_DEPTH = 3  # folder levels above the class folders guess_can_open descends
# What a truncated or corrupt archive raises while it is listed or read.
ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError)
ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}  # what zipfile reads


# ---------------------------------------------------------------- member safety (shared with webdataset.py)


def unsafe_member(archive: str, name: str, why: str) -> InputError:
    # repr() escapes newlines and control characters a crafted name could use to forge extra message lines
    return InputError(f"{archive}: unsafe member '{repr(name)[1:-1]}' ({why})")


def check_member_name(archive: str, name: str) -> None:
    """Raise InputError for a member name that is absolute or climbs out with ``..``."""
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        raise unsafe_member(archive, name, "absolute path")
    if ".." in re.split(r"[/\\]", name):
        raise unsafe_member(archive, name, "'..' in path")


def check_tar_member(archive: str, member: tarfile.TarInfo) -> None:
    """Raise InputError for an unsafe name, a link or a device file in a tar."""
    check_member_name(archive, member.name)
    if member.issym() or member.islnk():
        raise unsafe_member(archive, member.name, f"link to '{repr(member.linkname)[1:-1]}'")
    if member.isdev():
        raise unsafe_member(archive, member.name, "device file")


def check_zip_member(archive: str, info: zipfile.ZipInfo) -> None:
    """Raise InputError for an unsafe name, a symlink or a device file in a zip (Unix mode bits)."""
    check_member_name(archive, info.filename)
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise unsafe_member(archive, info.filename, "symlink")
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        raise unsafe_member(archive, info.filename, "device file")


def tar_members(archive: str, fileobj: IO[bytes], *, gz: bool = False) -> Iterator[tarfile.TarInfo]:
    """Safe members of a tar, in archive order; raise InputError at the first unsafe one.

    A generator, so a caller that peeks stops reading early. ``offset_data`` of each member is its position
    in the (decompressed) tar stream, which ``read_spans`` uses to read members without tarfile. A member
    declaring more bytes than ``limits.current()`` allows is refused before its data is read, and a gzip
    stream that expands beyond the compression-ratio limit is refused as soon as it does.
    """
    bounds = limits.current()
    start = fileobj.tell() if gz else 0
    with tarfile.open(fileobj=fileobj, mode="r|gz" if gz else "r:") as tar:
        while (member := tar.next()) is not None:
            tar.members.clear()  # tarfile keeps every header read; a million-member plan needs only a few fields
            check_tar_member(archive, member)
            bounds.check_member(archive, member.name, member.size)
            if gz:  # decompressed up to this member's data, from this many compressed bytes
                bounds.check_ratio(f"{archive}: the gzip stream", member.offset_data, fileobj.tell() - start)
            if member.isfile() and member.issparse():
                raise InputError(f"{archive}: member '{repr(member.name)[1:-1]}' is a sparse file (not supported)")
            yield member
        if gz:  # the last member's data, decompressed to reach the end
            bounds.check_ratio(f"{archive}: the gzip stream", tar.offset, fileobj.tell() - start)


def read_spans(fileobj: IO[bytes], spans: list[tuple[int, int]], *, gz: bool = False) -> list[bytes]:
    """Bytes at ``(offset, size)`` spans of a tar stream, in the order given.

    A plain tar seeks to each span. gzip has no random access: a .tar.gz is decompressed from the start up to
    the last span wanted, so every shard task of a big .tar.gz pays for everything before its rows (prefer an
    uncompressed .tar for large archives). Spans are visited in offset order so the gzip stream only moves forward.
    """
    stream: IO[bytes] = gzip.GzipFile(fileobj=fileobj) if gz else fileobj
    out: list[bytes] = [b""] * len(spans)
    for index in sorted(range(len(spans)), key=lambda i: spans[i][0]):
        offset, size = spans[index]
        stream.seek(offset)
        data = stream.read(size)
        if len(data) != size:
            raise EOFError(f"member at offset {offset} ends early ({len(data)} of {size} bytes)")
        out[index] = data
    return out


# ---------------------------------------------------------------- layout


def container_kind(path: str) -> str | None:
    """'tar', 'tar.gz' or 'zip' from the file name; None for anything else."""
    lower = path.lower()
    return next((kind for suffix, kind in ARCHIVE_SUFFIXES.items() if lower.endswith(suffix)), None)


def default_source(path: str) -> str:
    """The archive's or folder's name without its container suffix, lowercased: ZooScanNet.tar.gz -> zooscannet."""
    name = posixpath.basename(path.rstrip("/\\"))
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)].lower()
    return name.lower()


def is_image_name(filename: str) -> bool:
    """An image file name (by extension), not hidden: macOS archives carry ``._<img>.png`` resource forks."""
    return not filename.startswith(".") and posixpath.splitext(filename)[1].lower() in IMAGE_EXTENSIONS


def _parts(name: str) -> list[str]:
    return [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]


def skip_reason(name: str) -> str | None:
    """Why a file of a class-folder tree (its name relative to the root) is not taken; None when it is.

    'hidden', 'outside' (an image with no folder above it) or 'type:<extension>' (not an image type read here).
    """
    parts = _parts(name)
    if not parts or any(p.startswith(".") or p == "__MACOSX" for p in parts):  # dot files, hidden and macOS folders
        return "hidden"
    extension = posixpath.splitext(parts[-1])[1].lower()
    if extension not in IMAGE_EXTENSIONS:
        return f"type:{extension or '(no extension)'}"
    return "outside" if len(parts) < 2 else None


def class_and_file(name: str) -> tuple[str, str] | None:
    """(class folder, file name) of an image member in a class folder; None for anything else."""
    if skip_reason(name) is not None:
        return None
    parts = _parts(name)
    return parts[-2], parts[-1]


def skipped_note(path: str, skipped: Counter) -> str:
    """One line telling how many entries of an input were not taken, and why; '' when none."""
    total = sum(skipped.values())
    if not total:
        return ""
    types = sorted(((k.removeprefix("type:"), n) for k, n in skipped.items() if k.startswith("type:")),
                   key=lambda t: (-t[1], t[0]))
    parts = [f"{n} {ext} ({UNREADABLE_TYPES[ext]})" for ext, n in types if ext in UNREADABLE_TYPES]
    other = [(ext, n) for ext, n in types if ext not in UNREADABLE_TYPES]
    if other:
        listed = ", ".join(f"{n} {ext}" for ext, n in other[:LISTED_TYPES])
        more = f", {sum(n for _, n in other[LISTED_TYPES:])} more in {len(other) - LISTED_TYPES} other type(s)" \
            if len(other) > LISTED_TYPES else ""
        parts.append(f"{sum(n for _, n in other)} not an image type read ({listed}{more})")
    parts += [f"{skipped[key]} {phrase}" for key, phrase in SKIP_PHRASES.items() if skipped[key]]
    return f"{path}: {total} {'entry' if total == 1 else 'entries'} skipped: {', '.join(parts)}"


def _local_tree(root: str) -> tuple[dict[str, int], Counter]:
    found, skipped = {}, Counter()
    for dirpath, dirnames, filenames in os.walk(root, onerror=lambda _: skipped.update(["unreadable_dir"])):
        keep = []
        for d in dirnames:  # followlinks=False, and symlinked folders are counted, not entered
            if d.startswith("."):
                skipped["hidden_dir"] += 1  # not walked: .snapshot, .git and the like can be huge
            elif os.path.islink(os.path.join(dirpath, d)):
                skipped["symlink"] += 1
            else:
                keep.append(d)
        dirnames[:] = keep
        for filename in filenames:
            full = os.path.join(dirpath, filename)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            st = os.lstat(full)
            reason = skip_reason(rel)
            if reason != "hidden":  # a symlink is one whatever its name says (but a dot file is hidden first)
                if stat.S_ISLNK(st.st_mode):  # may point out of the root: never followed
                    reason = "symlink"
                elif not stat.S_ISREG(st.st_mode):
                    reason = "special"
            if reason is None:
                found[rel] = st.st_size
            else:
                skipped[reason] += 1
    return found, skipped


def _list_tree(fs: Any, root: str) -> tuple[dict[str, int], Counter]:
    """Image files under a folder (relative name -> size), and the files not taken counted by why."""
    if isinstance(fs, LocalFileSystem):
        return _local_tree(root)
    root = root.rstrip("/")
    found, skipped = {}, Counter()
    for path, meta in fs.find(root, detail=True).items():
        rel = posixpath.relpath(path, root)
        if (reason := skip_reason(rel)) is None:
            found[rel] = int(meta.get("size") or 0)
        else:
            skipped[reason] += 1
    return found, skipped


def _list_archive(archive: str, fh: IO[bytes], kind: str) -> tuple[list[tuple[str, list[int]]], Counter]:
    """Image members of an archive in archive order, as (name, [offset, size]) (tar) or (name, [index]) (zip,
    the position in its central directory), and the members not taken counted by why. A name the archive holds
    twice is listed twice: each copy is a row."""
    found: list[tuple[str, list[int]]] = []
    skipped: Counter = Counter()
    if kind == "zip":
        bounds = limits.current()
        with zipfile.ZipFile(fh) as zf:
            for index, info in enumerate(zf.infolist()):
                check_zip_member(archive, info)
                if info.is_dir():
                    continue
                if (reason := skip_reason(info.filename)) is not None:
                    skipped[reason] += 1
                    continue
                _check_zip_readable(archive, info)
                # zipfile stops at the declared size, so checking the declaration bounds the read
                bounds.check_member(archive, info.filename, info.file_size, info.compress_size)
                found.append((info.filename, [index]))
        return found, skipped
    for member in tar_members(archive, fh, gz=kind == "tar.gz"):
        if not member.isfile():
            continue  # folders: links and devices were refused by tar_members
        if (reason := skip_reason(member.name)) is not None:
            skipped[reason] += 1
        else:
            found.append((member.name, [member.offset_data, member.size]))
    return found, skipped


def _check_zip_readable(archive: str, info: zipfile.ZipInfo) -> None:
    # Found now rather than as a failed shard task: Windows writes big zips with Deflate64 (method 9).
    if info.flag_bits & 0x1:
        raise InputError(f"{archive}: member '{repr(info.filename)[1:-1]}' is encrypted")
    if info.compress_type not in ZIP_METHODS:
        raise InputError(f"{archive}: member '{repr(info.filename)[1:-1]}' uses zip compression method "
                         f"{info.compress_type}, which Python's zipfile cannot read (re-zip it or use a .tar)")


def _peek_archive(archive: str, fh: IO[bytes], kind: str) -> bool:
    if kind == "zip":
        with zipfile.ZipFile(fh) as zf:
            names = []
            for info in zf.infolist()[:PEEK_MEMBERS]:
                check_zip_member(archive, info)
                names.append(info.filename)
    else:
        names = []
        for member in tar_members(archive, fh, gz=kind == "tar.gz"):
            names.append(member.name)
            if len(names) >= PEEK_MEMBERS:
                break
    return any(class_and_file(n) is not None for n in names)


def _peek_tree(fs: Any, root: str) -> bool:
    """Breadth-first look for an image inside a sub-folder, a few listings deep at most."""
    queue, listings = [(root, 0)], 0
    while queue and listings < PEEK_LISTINGS:
        folder, depth = queue.pop(0)
        listings += 1
        entries = sorted(fs.ls(folder, detail=True), key=lambda e: e["name"])
        names = [(posixpath.basename(e["name"].rstrip("/")), e) for e in entries]
        if depth > 0 and any(e["type"] == "file" and is_image_name(n) for n, e in names):
            return True
        if depth < PEEK_DEPTH:
            queue += [(e["name"], depth + 1) for n, e in names if e["type"] == "directory" and not n.startswith(".")]
    return False


# ---------------------------------------------------------------- the reader


class ClassFolderReader(Reader):
    name = "folder"
    description = "class-folder trees <root>/<class>/<image> as a folder, .tar, .tar.gz/.tgz or .zip (fallback)"

    def guess_can_open(self, path: str, *, storage_options: dict | None = None) -> bool:
        path = str(path)
        try:
            fs, fpath = fsspec.core.url_to_fs(path, **(storage_options or {}))
            kind = container_kind(path)
            if kind is None:
                return fs.isdir(fpath) and _peek_tree(fs, fpath)
            with fs.open(fpath, "rb") as fh:
                return _peek_archive(path, fh, kind)
        except InputError:
            return True  # an archive with unsafe members: claim it so that plan() says why it is refused
        except Exception as e:  # noqa: BLE001 - a guess never fails: anything unreadable is simply not ours
            if is_transient(e):
                raise  # ... but a throttled listing is not "not ours": the caller retries
            return False

    def plan(self, path: str, *, source: str | None = None, storage_options: dict | None = None) -> list[Item]:
        path = str(path)
        fs, fpath = fsspec.core.url_to_fs(path, **(storage_options or {}))
        kind = container_kind(path)
        try:
            if kind is None:
                if not fs.isdir(fpath):
                    raise InputError(f"{path}: not a folder, .tar, .tar.gz, .tgz or .zip")
                sizes, skipped = _list_tree(fs, fpath)
                size, kind = sum(sizes.values()), "dir"
                found = [(name, []) for name in sizes]
            else:
                size = fs.size(fpath)
                with fs.open(fpath, "rb") as fh:
                    found, skipped = _list_archive(path, fh, kind)
        except ARCHIVE_ERRORS as e:
            if is_transient(e):
                raise
            raise InputError(f"{path}: not a readable {kind or 'folder'} ({one_line(e)})") from None
        found.sort(key=lambda entry: entry[0])  # stable: copies of one name stay in archive order
        members = [name for name, _ in found]
        note = skipped_note(path, skipped)
        if not members:
            raise InputError(f"{path}: no images in <class>/<image> folders (extensions {sorted(IMAGE_EXTENSIONS)})"
                             + (f"; {note.removeprefix(f'{path}: ')}" if note else ""))
        info: dict[str, Any] = {"path": path, "container": kind, "members": members,
                                "source": source or default_source(path)}
        if kind in ("tar", "tar.gz"):
            info["spans"] = [where for _, where in found]
        long_ids = _colliding(sorted(set(members)))
        if long_ids:
            info["long_ids"] = long_ids
        numbered, repeated = _numbered(members, set(long_ids))
        if numbered:
            info["numbered"] = numbered
            if kind == "zip":  # a repeated name is read by its position: zipfile's lookup by name finds the last
                info["indexes"] = [where[0] for _, where in found]
        notes = [note] if note else []
        if numbered:
            why = [f"{n} row(s) {text}" for n, text in (
                (repeated, "are copies of a member name the archive holds more than once"),
                (len(numbered) - repeated, "have names equal once Unicode-normalised (NFC)")) if n]
            notes.append(f"{path}: {'; '.join(why)}: each is read as its own row, its id and path ending in "
                         "'#1', '#2'... in archive order")
        return [Item(source=path, rows=len(members), size=size, info=info, notes=notes)]

    def read(self, item: Item, first: int, stop: int, *, storage_options: dict | None = None) -> pa.Table:
        info = item.info
        path, kind, names = info["path"], info["container"], info["members"][first:stop]
        fs, fpath = fsspec.core.url_to_fs(path, **(storage_options or {}))
        try:
            if kind == "dir":
                # cat_ranges: concurrent on object stores, and no glob expansion of names like 'sp[1].png'.
                # A file gone since the plan is that row's problem (empty bytes), not the whole shard's;
                # a timeout or throttled request is the shard's (retried), never a missing image.
                found = fs.cat_ranges([f"{fpath.rstrip('/')}/{n}" for n in names], None, None, on_error="return")
                for d in found:
                    if isinstance(d, Exception) and is_transient(d):
                        raise d
                data = [b"" if isinstance(d, Exception) else d for d in found]
            else:
                with fs.open(fpath, "rb") as fh:
                    if kind == "zip":
                        with zipfile.ZipFile(fh) as zf:
                            if "indexes" in info:
                                listed = zf.infolist()
                                data = [zf.read(listed[i]) for i in info["indexes"][first:stop]]
                            else:
                                data = [zf.read(n) for n in names]
                    else:
                        spans = [tuple(s) for s in info["spans"][first:stop]]
                        data = read_spans(fh, spans, gz=kind == "tar.gz")
        except (*ARCHIVE_ERRORS, KeyError) as e:
            if is_transient(e):
                raise
            raise InputError(f"{path}: cannot read images {first}-{stop} ({one_line(e)})") from None
        rows = _rows(info, first, stop)
        for row, content in zip(rows, data, strict=True):
            row["image"]["bytes"] = content
        return records(rows)

    def read_keys(self, item: Item, *, storage_options: dict | None = None) -> pa.Table:
        """The ids from the plan alone: they are made of member names, so no image is read."""
        return keys_only(records(_rows(item.info, 0, item.rows)))


def _rows(info: dict[str, Any], first: int, stop: int) -> list[dict[str, Any]]:
    """Records of rows [first, stop) without their image bytes: everything but the bytes comes from the plan."""
    long_ids = set(info.get("long_ids", ()))
    numbers = _numbers_between(info.get("numbered", []), first, stop)
    rows = []
    for row, name in enumerate(info["members"][first:stop], start=first):
        label, filename = class_and_file(name) or ("", name)
        suffix = f"#{numbers[row]}" if row in numbers else ""
        parts = _parts(name)
        rows.append({
            "image": {"bytes": b"", "path": name + suffix},
            "dataset": info["source"],
            "sample": parts[-3] if len(parts) >= 3 else "",  # <sample>/<class>/<image>: the folder above the class
            "original_label": label,
            "original_path": f"/{label}/{filename}{suffix}",
            "ObjID": (name if name in long_ids else f"{label}/{filename}") + suffix,
        })
    return rows


def _colliding(members: list[str]) -> list[str]:
    """Members whose '<class>/<file>' id is not unique (the same class in two releases): they get their full path.

    Planktonzilla renames such files; here the id keeps the member path, so ObjIDs stay unique and stable.
    """
    seen: dict[str, list[str]] = {}
    for name in members:
        label, filename = class_and_file(name) or ("", name)
        seen.setdefault(unicodedata.normalize("NFC", f"{label}/{filename}"), []).append(name)  # as the ingest has it
    return sorted(n for group in seen.values() if len(group) > 1 for n in group)


def _numbered(members: list[str], long_ids: set[str]) -> tuple[list[list[int]], int]:
    """[row, n] for rows whose id (NFC, as the ingest stores it) another row shares even with long ids: the same
    name twice in an archive, or names that differ only in Unicode form. Each group is numbered 1, 2... in row
    order. Also returns how many of them are copies of a repeated name."""
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(members):
        label, filename = class_and_file(name) or ("", name)
        key = unicodedata.normalize("NFC", name if name in long_ids else f"{label}/{filename}")
        groups.setdefault(key, []).append(row)
    numbered = sorted([row, n] for rows in groups.values() if len(rows) > 1 for n, row in enumerate(rows, start=1))
    counts = Counter(members)
    return numbered, sum(1 for row, _ in numbered if counts[members[row]] > 1)


def _numbers_between(numbered: list[list[int]], first: int, stop: int) -> dict[int, int]:
    """The numbers of rows [first, stop) from the plan's sorted [row, n] pairs."""
    start = bisect_left(numbered, [first])
    out = {}
    for row, n in numbered[start:]:
        if row >= stop:
            break
        out[row] = n
    return out
