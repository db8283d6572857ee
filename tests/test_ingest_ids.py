"""Image ids across inputs and the catalog (checked before any write, with a policy), and one input file's
types never failing another's shard: a real LocalCluster of worker processes."""

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pzscale import catalog, info, open_catalog
from pzscale.errors import InputError, StageError
from pzscale.ids import occurrences
from pzscale.ingest import ingest
from pzscale.synth import synth

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def two_copies(tmp_path_factory):
    """One small Planktonzilla file and a renamed copy of it: the same rows under another file name."""
    root = tmp_path_factory.mktemp("ids")
    synth(root / "a", images=40, seed=3, rows_per_file=40)
    first = sorted((root / "a").glob("*.parquet"))[0]
    (root / "b").mkdir()
    shutil.copy(first, root / "b" / "copy.parquet")
    return first, root / "b" / "copy.parquet"


def _ids(url):
    ds = open_catalog(url)
    return ds["image_id"].values, ds["qc"].values


def test_occurrences_count_earlier_equals_and_group_sizes():
    before, size = occurrences(np.array([5, 3, 5, 5, 1, 3], dtype=np.uint64))
    assert before.tolist() == [0, 0, 1, 2, 0, 1]
    assert size.tolist() == [3, 2, 3, 3, 1, 2]


def test_the_same_rows_under_two_file_names_are_flagged_and_reported(two_copies, client, tmp_path):
    url = str(tmp_path / "c.zarr")
    report = ingest([str(p) for p in two_copies], url, client=client, progress=False)
    image_id, qc = _ids(url)
    assert len(image_id) == 80 and len(set(image_id)) == 40  # kept: a policy, not a guess, drops rows
    assert all("duplicate_image_id" in q for q in qc)
    notes = "\n".join(report.input_notes)
    assert "80 new row(s) share an image id with another row (40 id(s))" in notes
    assert "copy.parquet row 0" in notes and "(flag)" in notes
    summary = info.summarize(url)
    assert summary["shared_image_ids"] == {"rows": 80, "ids": 40}
    assert "DUPLICATE IMAGE IDS: 80 rows share 40 id(s)" in info.format_summary(summary)


def test_suffix_makes_later_ids_unique_and_refuse_writes_nothing(two_copies, client, tmp_path):
    url = str(tmp_path / "s.zarr")
    ingest([str(p) for p in two_copies], url, client=client, progress=False, duplicate_ids="suffix")
    image_id, qc = _ids(url)
    assert len(set(image_id)) == 80
    assert all(i.endswith("~2") for i in image_id[40:]) and not any(i.endswith("~2") for i in image_id[:40])
    assert all("image_id_suffixed" in q for q in qc[40:]) and not any("image_id_suffixed" in q for q in qc[:40])
    assert info.summarize(url)["shared_image_ids"] == {"rows": 0, "ids": 0}

    refused = str(tmp_path / "r.zarr")
    with pytest.raises(InputError, match=r"40 id\(s\).*nothing written"):
        ingest([str(p) for p in two_copies], refused, client=client, progress=False, duplicate_ids="refuse")
    assert not catalog.exists(refused)


def test_an_append_checks_the_new_ids_against_the_catalog(two_copies, client, tmp_path):
    url = str(tmp_path / "a.zarr")
    ingest([str(two_copies[0])], url, client=client, progress=False)
    report = ingest([str(two_copies[1])], url, client=client, progress=False, append=True, duplicate_ids="suffix")
    assert "40 new row(s)" in "\n".join(report.input_notes) and "catalog row 0" in "\n".join(report.input_notes)
    image_id, _ = _ids(url)
    assert len(set(image_id)) == 80 and image_id[40].endswith("~2")
    with pytest.raises(InputError, match="share an image id"):
        ingest([str(two_copies[1])], url, client=client, progress=False, append=True, duplicate_ids="refuse")


def test_files_whose_columns_differ_in_type_share_a_shard(two_copies, client, tmp_path):
    """Latitude float in one file and text in the other, in one shard: values and QC flags, not
    'ArrowTypeError: Unable to merge' failing the shard on every rerun."""
    table = pq.read_table(two_copies[0])
    as_text = table.set_column(table.schema.get_field_index("Latitude"), "Latitude",
                               pa.array(["45.5"] * 39 + ["north"], pa.string()))
    as_text = as_text.set_column(as_text.schema.get_field_index("ObjID"), "ObjID",
                                 pa.array([f"t{i}" for i in range(40)], pa.string()))
    (tmp_path / "in").mkdir()
    pq.write_table(table, tmp_path / "in" / "1-float.parquet")
    pq.write_table(as_text, tmp_path / "in" / "2-text.parquet")
    url = str(tmp_path / "t.zarr")
    report = ingest([str(tmp_path / "in")], url, client=client, progress=False)
    assert report.shards_written == 1 and not report.failures
    ds = open_catalog(url)
    lat, qc = ds["lat"].values, ds["qc"].values
    np.testing.assert_allclose(lat[:40], table.column("Latitude").to_numpy().astype(float), equal_nan=True)
    assert (lat[40:79] == 45.5).all() and np.isnan(lat[79]) and "lat_unparsed" in qc[79]


def test_a_shard_that_fails_for_a_bug_names_the_input_file_and_row(two_copies, client, tmp_path, monkeypatch):
    from pzscale.ingest import _read_segment
    from pzscale.readers.base import Item

    class Broken:
        def read(self, item, first, stop, *, storage_options=None):
            if first <= 7 < stop:
                raise KeyError("boom")
            return pq.read_table(two_copies[0]).slice(first, stop - first)

    monkeypatch.setattr("pzscale.readers.get", lambda name: Broken())
    with pytest.raises(StageError, match=r"copy\.parquet row 7: KeyError: 'boom'"):
        _read_segment("broken", Item(str(two_copies[1]), 40, 1), 0, 40, None)


def test_suffix_takes_the_next_free_number_after_an_earlier_suffixed_ingest(two_copies, client, tmp_path):
    """The catalog holds x and x~2 (an earlier suffixed ingest): a third copy becomes x~3, never a second x~2."""
    url = str(tmp_path / "n.zarr")
    ingest([str(p) for p in two_copies], url, client=client, progress=False, duplicate_ids="suffix")
    third = tmp_path / "third.parquet"
    shutil.copy(two_copies[0], third)
    ingest([str(third)], url, client=client, progress=False, append=True, duplicate_ids="suffix")
    image_id, _ = _ids(url)
    assert len(image_id) == 120 and len(set(image_id)) == 120
    assert all(i.endswith("~3") for i in image_id[80:])
