"""Shared pieces of the reliability tests: the session tally, and small catalog helpers.

The tally lives here, not in conftest.py, so that the tests and the summary hook share one object.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from pzscale import catalog, faults

SHARD_LEN = 64
SMALL_IMAGES = 320

# Hostile inputs that the suite tries elsewhere; listed in the summary so that nothing is tested twice.
COVERED_ELSEWHERE = {
    "unsafe tar/tar.gz/zip members (absolute, '..', links, devices)":
        "tests/readers/test_folder.py::test_unsafe_tar_members_are_refused, test_unsafe_zip_members_are_refused",
    "archive with a '..' member through ingest": "tests/test_ingest_formats.py::"
                                                 "test_archive_with_parent_member_is_refused_and_nothing_written",
    "pickled checkpoints that run code (torch.load weights_only)":
        "tests/test_models.py::test_pickle_needing_code_is_refused_and_never_runs, "
        "test_legacy_pickle_with_payload_is_refused",
    "truncated PNG": "tests/test_images.py::test_probe_rejects_truncated_png",
    "empty or truncated parquet": "tests/test_ingest.py::test_empty_or_truncated_file_fails_before_any_write",
    "NaN/inf/out-of-range metadata (records level)":
        "tests/test_ingest_columns.py::test_impossible_metadata_becomes_nan_with_a_qc_flag",
    "worker SIGKILLed mid-ingest, CLI job killed mid-run": "tests/test_resume.py",
    "classify job killed mid-run": "tests/test_ml_stages.py::test_killed_classify_resumes",
}


@dataclass
class Tally:
    faults: Counter = field(default_factory=Counter)
    hostile: list[str] = field(default_factory=list)
    fuzz_examples: Counter = field(default_factory=Counter)
    rows_checked: int = 0
    rows_lost: int = 0
    rows_duplicated: int = 0
    used: bool = False

    def add_faults(self, log_dir) -> Counter:
        found = faults.injected(log_dir)
        self.faults.update(found)
        self.used = True
        return found

    def hostile_input(self, name: str) -> None:
        self.hostile.append(name)
        self.used = True

    def check_rows(self, image_ids, expected_ids) -> tuple[int, int]:
        """Rows of ``expected_ids`` missing from ``image_ids``, and rows there more than once (both counted)."""
        got, want = Counter(map(str, image_ids)), Counter(map(str, expected_ids))
        lost = sum((want - got).values())
        duplicated = sum(n - 1 for n in got.values() if n > 1)
        self.rows_checked += len(want)
        self.rows_lost += lost
        self.rows_duplicated += duplicated
        self.used = True
        return lost, duplicated


TALLY = Tally()


def image_ids(url: str, storage_options: dict | None = None) -> np.ndarray:
    return catalog.open_group(url, storage_options=storage_options)["image_id"][:]

