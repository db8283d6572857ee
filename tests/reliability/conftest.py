"""Fixtures and the session summary of the reliability tests.

- ``tally``: what the tests injected and tried (storage faults, hostile inputs, fuzz examples)
  and the rows they lost or duplicated; printed at the end of the session. Every test asserts
  rows lost == 0 and rows duplicated == 0 itself: the summary is a report, not the check.
- ``small_synth`` / ``small_clean``: a 320-image synthetic collection (5 shards of 64) and its
  uninterrupted ingest on the session cluster, the reference the disturbed runs must equal.
- ``fast_backoff``: transient-error retries with millisecond pauses, so the tests stay quick.
"""

from __future__ import annotations

import pytest

from pzscale import catalog, progress
from pzscale.ingest import ingest
from pzscale.synth import synth
from tests.reliability.helpers import COVERED_ELSEWHERE, SHARD_LEN, SMALL_IMAGES, TALLY, Tally


@pytest.fixture(scope="session")
def tally() -> Tally:
    return TALLY


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not TALLY.used:
        return
    write = terminalreporter.write_line
    terminalreporter.section("reliability summary")
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(TALLY.faults.items()))
    write(f"faults injected: {sum(TALLY.faults.values())} ({kinds or 'none'})")
    write(f"hostile inputs tried: {len(TALLY.hostile)}" + (f" ({'; '.join(TALLY.hostile)})" if TALLY.hostile else ""))
    fuzz = ", ".join(f"{k} {v}" for k, v in sorted(TALLY.fuzz_examples.items()))
    write(f"fuzz examples: {sum(TALLY.fuzz_examples.values())} ({fuzz or 'none'})")
    write(f"rows checked: {TALLY.rows_checked}; rows lost: {TALLY.rows_lost} (must be 0); "
          f"rows duplicated: {TALLY.rows_duplicated} (must be 0)")
    write("also covered elsewhere:")
    for what, where in COVERED_ELSEWHERE.items():
        write(f"  {what}: {where}")


@pytest.fixture
def fast_backoff(monkeypatch):
    """Millisecond pauses between attempts: the tests check the retries, not the waiting."""
    monkeypatch.setattr(progress, "DEFAULT_BACKOFF", progress.Backoff(attempts=8, base_s=0.005, max_s=0.05))


@pytest.fixture(scope="session")
def small_synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("small_synth")
    synth(out, images=SMALL_IMAGES, seed=11, rows_per_file=150, row_group_size=50)
    return out


@pytest.fixture(scope="session")
def small_clean(small_synth, client, tmp_path_factory):
    """(url, report, checksums, image ids) of the small collection ingested without any disturbance."""
    url = str(tmp_path_factory.mktemp("small_clean") / "catalog.zarr")
    report = ingest([str(small_synth)], url, shard_len=SHARD_LEN, client=client, progress=False)
    ids = catalog.open_group(url)["image_id"][:]
    return url, report, catalog.checksums(url), ids
