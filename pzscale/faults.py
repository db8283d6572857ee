"""Storage faults: which errors are transient (worth retrying), and a filesystem that injects them.

``is_transient`` sorts errors from object storage and file systems into the ones a retry with
backoff can get past (timeouts, dropped connections, S3 ``SlowDown``/5xx, which s3fs turns into
``OSError`` with ``EBUSY``/``EREMOTEIO``) and the ones it cannot (missing objects, refused
access, bad input: every pzscale error, except a CatalogError raised while handling a transient
error). Readers re-raise transient errors instead of turning them into a row's status, so a
flaky network never becomes silently missing images.

``FaultyFileSystem`` (``faulty://`` URLs) is the local file system with injected failures, to
check that a whole run completes, identically, on storage that throttles and drops requests::

    so = {"fail_rate": 0.05, "log_dir": "/tmp/faults"}
    ingest(["faulty:///data/in"], "faulty:///data/cat.zarr", storage_options=so)

A deterministic share ``fail_rate`` of (operation, path) pairs (among those matching
``fail_on``) fails ``fail_times`` times (then works, as a throttled request does on retry):
a timeout (the request hangs ``timeout_s``, then ``TimeoutError``), a reset connection, or
``OSError(EBUSY, "SlowDown")``.
``permanent`` patterns always fail (``PermissionError``); ``crash`` patterns end the worker
process (``os._exit``) the first time they match, as a machine lost mid-write.
Patterns are ``fnmatch`` globs on ``"<op>:<path>"`` with op ``read``, ``write``, ``list``,
``info`` or ``mkdir``. With ``log_dir`` every injected fault leaves a file there, so that
counts (``injected``) and "fail only n times" hold across worker processes.
The protocol is registered through the ``fsspec.specs`` entry point in pyproject.toml, so any
process with pzscale installed (a worker, the CLI) opens ``faulty://`` URLs without importing it.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import os
import time
from collections import Counter
from pathlib import Path

from fsspec.implementations.local import LocalFileSystem

from pzscale.errors import CatalogError, PzscaleError

EREMOTEIO = getattr(errno, "EREMOTEIO", errno.EIO)
# errno values of OSErrors that a later attempt may not see: s3fs maps SlowDown/503/409 to EBUSY and
# InternalError/500 to EREMOTEIO, and unknown S3 errors to EIO
TRANSIENT_ERRNOS = frozenset({
    errno.EAGAIN, errno.EBUSY, errno.EIO, EREMOTEIO, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED,
    errno.ECONNREFUSED, errno.EPIPE, errno.ENETDOWN, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EINTR,
})
PERMANENT_OS_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
# Network errors of botocore and aiohttp by class name, so neither has to be imported to classify them.
TRANSIENT_CLASS_NAMES = frozenset({
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "ResponseStreamingError", "IncompleteReadError", "ServerDisconnectedError", "ClientConnectionError",
    "ClientPayloadError", "ServerTimeoutError",
})
TRANSIENT_S3_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
    "InternalError", "ServiceUnavailable", "503", "500", "502", "504",
})


def is_transient(error: BaseException) -> bool:
    """Whether a retry, after a pause, may succeed where ``error`` stopped a storage request."""
    if isinstance(error, CatalogError):
        # "cannot reach the store" raised while handling a timeout is that timeout, reworded
        origin = error.__cause__ or error.__context__
        return origin is not None and is_transient(origin)
    if isinstance(error, PzscaleError):
        return False  # bad input, a failed stage, an unsafe model: the same again next time
    if isinstance(error, (TimeoutError, ConnectionError)):
        return True
    if isinstance(error, PERMANENT_OS_ERRORS):
        return False
    if isinstance(error, OSError) and error.errno in TRANSIENT_ERRNOS:
        return True
    names = {cls.__name__ for cls in type(error).__mro__}
    if names & TRANSIENT_CLASS_NAMES:
        return True
    if "ClientError" in names:  # botocore, before s3fs translated it
        response = getattr(error, "response", None) or {}
        code = str(response.get("Error", {}).get("Code", ""))
        status = str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        return code in TRANSIENT_S3_CODES or status.startswith("5")
    return False


# ---------------------------------------------------------------- fault injection

OPS = ("read", "write", "list", "info", "mkdir")


def _digest(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("\0".join(map(str, parts)).encode()).digest()[:8], "big")


def _in_worker() -> bool:
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return False
    return True


class FaultyFileSystem(LocalFileSystem):
    """The local file system behind ``faulty://``, failing some requests on purpose (see the module doc)."""

    protocol = "faulty"
    root_marker = "/"

    def __init__(
        self,
        fail_rate: float = 0.0,
        fail_times: int = 1,
        fail_on: tuple[str, ...] | list[str] = ("*",),
        timeout_s: float = 0.05,
        permanent: tuple[str, ...] | list[str] = (),
        crash: tuple[str, ...] | list[str] = (),
        log_dir: str | None = None,
        seed: int = 0,
        only_in_workers: bool = False,
        **kwargs,
    ):
        kwargs.pop("asynchronous", None)  # zarr asks every fsspec file system for async; this one is wrapped
        super().__init__(auto_mkdir=True, **kwargs)
        if not 0 <= fail_rate <= 1:
            raise ValueError(f"fail_rate {fail_rate} is not between 0 and 1")
        self.fail_rate, self.fail_times, self.fail_on, self.timeout_s = fail_rate, fail_times, tuple(fail_on), timeout_s
        self.permanent, self.crash = tuple(permanent), tuple(crash)
        self.log_dir, self.seed, self.only_in_workers = log_dir, seed, only_in_workers
        self._failed: Counter = Counter()  # without log_dir: faults per key in this process

    def _claim(self, token: str, limit: int, target: str) -> bool:
        """Whether this call is one of the first ``limit`` to claim ``token`` (across processes with log_dir);
        the log file of a claim holds the request (``op:path``) and the process id."""
        if self.log_dir is None:
            self._failed[token] += 1
            return self._failed[token] <= limit
        os.makedirs(self.log_dir, exist_ok=True)
        for n in range(limit):
            try:
                fd = os.open(os.path.join(self.log_dir, f"{token}-{n}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                continue
            os.write(fd, f"{target} pid={os.getpid()}".encode())
            os.close(fd)
            return True
        return False

    def _maybe_fail(self, op: str, path: str) -> None:
        if self.only_in_workers and not _in_worker():
            return
        path = self._strip_protocol(path)
        target = f"{op}:{path}"
        for pattern in self.crash:
            if fnmatch.fnmatchcase(target, pattern) and _in_worker() and \
                    self._claim(f"crash-{_digest(self.seed, pattern):016x}", 1, target):
                os._exit(1)  # a machine lost between two requests; never the client's own process
        for pattern in self.permanent:
            if fnmatch.fnmatchcase(target, pattern):
                self._claim(f"permanent-{_digest(self.seed, target, time.time_ns()):016x}", 1, target)
                raise PermissionError(errno.EACCES, f"injected permanent fault: {op} {path}")
        if not self.fail_rate or not any(fnmatch.fnmatchcase(target, p) for p in self.fail_on):
            return
        key = _digest(self.seed, op, path)
        if key / 2**64 >= self.fail_rate:
            return
        kind = ("timeout", "reset", "slowdown")[key % 3]
        if not self._claim(f"{kind}-{key:016x}", self.fail_times, target):
            return
        if kind == "timeout":
            time.sleep(self.timeout_s)
            raise TimeoutError(errno.ETIMEDOUT, f"injected timeout after {self.timeout_s} s: {op} {path}")
        if kind == "reset":
            raise ConnectionResetError(errno.ECONNRESET, f"injected connection reset: {op} {path}")
        raise OSError(errno.EBUSY, f"injected SlowDown (503): {op} {path}")

    def _open(self, path, mode="rb", block_size=None, **kwargs):
        self._maybe_fail("read" if mode.startswith("r") else "write", path)
        return super()._open(path, mode=mode, block_size=block_size, **kwargs)

    def ls(self, path, detail=False, **kwargs):
        self._maybe_fail("list", path)
        return super().ls(path, detail=detail, **kwargs)

    def info(self, path, **kwargs):
        self._maybe_fail("info", path)
        return super().info(path, **kwargs)

    def exists(self, path, **kwargs):
        # As s3fs: only "not found" means False; fsspec's default would answer False to a timeout too.
        try:
            self.info(path, **kwargs)
        except FileNotFoundError:
            return False
        return True

    def walk(self, path, maxdepth=None, topdown=True, on_error="omit", **kwargs):
        # As s3fs's listing: a failed request is raised, not taken for an empty folder ("omit" is fsspec's
        # default for a folder that vanished while walking, which this file system reports as not found).
        def omit_only_missing(error):
            if not isinstance(error, FileNotFoundError):
                raise error

        if on_error == "omit":
            on_error = omit_only_missing
        return super().walk(path, maxdepth=maxdepth, topdown=topdown, on_error=on_error, **kwargs)

    def isdir(self, path):
        # As s3fs: only "not found" means False; a timeout is raised, not taken for "not a folder".
        try:
            return self.info(path)["type"] == "directory"
        except FileNotFoundError:
            return False

    def isfile(self, path):
        try:
            return self.info(path)["type"] == "file"
        except FileNotFoundError:
            return False

    def makedirs(self, path, exist_ok=False):
        self._maybe_fail("mkdir", path)
        return super().makedirs(path, exist_ok=exist_ok)


def injected(log_dir: str | os.PathLike) -> Counter:
    """Faults a ``FaultyFileSystem`` with this ``log_dir`` injected, by kind (timeout, reset, slowdown,
    permanent, crash), summed over every process."""
    folder = Path(log_dir)
    if not folder.is_dir():
        return Counter()
    return Counter(p.name.split("-", 1)[0] for p in folder.iterdir())

