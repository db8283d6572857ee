"""Every reader's ``read_keys`` (what the ingest's image-id check reads before any write) gives the ids that
its ``read`` gives, on real files written by other tools, whatever it skips reading."""

from __future__ import annotations

import pytest

from pzscale import readers
from pzscale.records import ids_of_table, row_names

INPUTS = [
    ("ecotaxa", "ecotaxa_back"),
    ("ecotaxa", "zooprocess-lib"),
    ("ecotaxa", "irfcb/exdata/example_table_ifcb.tsv"),
    ("ifcb", "pyifcb"),
    ("ifcb", "classipyr"),
]


@pytest.mark.parametrize(("reader_name", "path"), INPUTS)
def test_read_keys_give_the_ids_of_read(sample_data, reader_name, path):
    reader = readers.get(reader_name)
    items = [i for i in reader.plan(str(sample_data / path), source="sample") if i.rows]
    assert items
    for item in items:
        names = row_names(item.source, 0, item.rows)
        from_keys = ids_of_table(reader.read_keys(item), names)
        from_rows = ids_of_table(reader.read(item, 0, item.rows), names)
        assert from_keys.tolist() == from_rows.tolist(), item.source
