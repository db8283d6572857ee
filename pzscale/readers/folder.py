"""Class-folder trees: ``<root>/<class>/<image>`` as a folder, a .tar, a .tar.gz/.tgz or a .zip.

The layout of the SEANOE nets (ZooScanNet, FlowCamNet, UVP6Net, ISIISNet...), WHOI and NDSB: the class of an
image is the name of the folder holding it, whatever lies above (archives often add top folders such as
``ZooScanNet/imgs/``). Archives are read in place and nothing is ever written. Members that would escape the
target folder if extracted (absolute paths, ``..``, links, devices) are still refused at plan time: they mark a
crafted or broken archive, and other tools (Planktonzilla's pipeline included) extract these archives to disk.
So are decompression bombs: a member expanding beyond ``pzscale.limits`` (size, compression ratio).
"""

from __future__ import annotations

import gzip
import os
import posixpath
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from typing import IO, Any

import fsspec
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

from pzscale import limits
from pzscale.errors import InputError, one_line
from pzscale.faults import is_transient
from pzscale.readers.base import Item, Reader, records

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif"})
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


def class_and_file(name: str) -> tuple[str, str] | None:
    """(class folder, file name) of an image member in a class folder; None for anything else."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if len(parts) < 2 or not is_image_name(parts[-1]):
        return None
    if any(p.startswith(".") or p == "__MACOSX" for p in parts[:-1]):  # hidden folders, macOS metadata
        return None
    return parts[-2], parts[-1]


def _local_tree(root: str) -> dict[str, int]:
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):  # followlinks=False: symlinked folders are not entered
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for filename in filenames:
            full = os.path.join(dirpath, filename)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if class_and_file(rel) is None:
                continue
            st = os.lstat(full)
            if stat.S_ISREG(st.st_mode):  # skips symlinks, which may point out of the root, and fifos
                found[rel] = st.st_size
    return found


def _list_tree(fs: Any, root: str) -> dict[str, int]:
    """Image files under a folder: relative name -> size."""
    if isinstance(fs, LocalFileSystem):
        return _local_tree(root)
    root = root.rstrip("/")
    return {
        rel: int(meta.get("size") or 0)
        for path, meta in fs.find(root, detail=True).items()
        if class_and_file(rel := posixpath.relpath(path, root)) is not None
    }


def _list_archive(archive: str, fh: IO[bytes], kind: str) -> dict[str, list[int]]:
    """Image members of an archive: name -> [offset, size] (tar) or [] (zip). A repeated name keeps the last."""
    found: dict[str, list[int]] = {}
    if kind == "zip":
        bounds = limits.current()
        with zipfile.ZipFile(fh) as zf:
            for info in zf.infolist():
                check_zip_member(archive, info)
                if not info.is_dir() and class_and_file(info.filename) is not None:
                    _check_zip_readable(archive, info)
                    # zipfile stops at the declared size, so checking the declaration bounds the read
                    bounds.check_member(archive, info.filename, info.file_size, info.compress_size)
                    found[info.filename] = []
        return found
    for member in tar_members(archive, fh, gz=kind == "tar.gz"):
        if member.isfile() and class_and_file(member.name) is not None:
            found[member.name] = [member.offset_data, member.size]
    return found


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
        spans: dict[str, list[int]] = {}
        try:
            if kind is None:
                if not fs.isdir(fpath):
                    raise InputError(f"{path}: not a folder, .tar, .tar.gz, .tgz or .zip")
                sizes = _list_tree(fs, fpath)
                size, kind = sum(sizes.values()), "dir"
            else:
                size = fs.size(fpath)
                with fs.open(fpath, "rb") as fh:
                    spans = _list_archive(path, fh, kind)
                sizes = dict.fromkeys(spans, 0)
        except ARCHIVE_ERRORS as e:
            if is_transient(e):
                raise
            raise InputError(f"{path}: not a readable {kind or 'folder'} ({one_line(e)})") from None
        members = sorted(sizes)
        if not members:
            raise InputError(f"{path}: no images in <class>/<image> folders (extensions {sorted(IMAGE_EXTENSIONS)})")
        info: dict[str, Any] = {"path": path, "container": kind, "members": members,
                                "source": source or default_source(path)}
        if kind in ("tar", "tar.gz"):
            info["spans"] = [spans[m] for m in members]
        long_ids = _colliding(members)
        if long_ids:
            info["long_ids"] = long_ids
        return [Item(source=path, rows=len(members), size=size, info=info)]

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
                            data = [zf.read(n) for n in names]
                    else:
                        spans = [tuple(s) for s in info["spans"][first:stop]]
                        data = read_spans(fh, spans, gz=kind == "tar.gz")
        except (*ARCHIVE_ERRORS, KeyError) as e:
            if is_transient(e):
                raise
            raise InputError(f"{path}: cannot read images {first}-{stop} ({one_line(e)})") from None
        long_ids = set(info.get("long_ids", ()))
        rows = []
        for name, content in zip(names, data, strict=True):
            label, filename = class_and_file(name) or ("", name)
            rows.append({
                "image": {"bytes": content, "path": name},
                "dataset": item.info["source"],
                "original_label": label,
                "original_path": f"/{label}/{filename}",
                "ObjID": name if name in long_ids else f"{label}/{filename}",
            })
        return records(rows)


def _colliding(members: list[str]) -> list[str]:
    """Members whose '<class>/<file>' id is not unique (the same class in two releases): they get their full path.

    Planktonzilla renames such files; here the id keeps the member path, so ObjIDs stay unique and stable.
    """
    seen: dict[str, list[str]] = {}
    for name in members:
        label, filename = class_and_file(name) or ("", name)
        seen.setdefault(f"{label}/{filename}", []).append(name)
    return sorted(n for group in seen.values() if len(group) > 1 for n in group)
