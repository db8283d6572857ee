import numpy as np
import pytest

from pzscale import taxonomy
from pzscale.errors import InputError
from pzscale.schema import BY_NAME, VARIABLE_NAMES


@pytest.fixture(scope="module")
def table(sample_data):
    return taxonomy.read_table(str(sample_data / "planktonzilla" / "planktonzilla_taxonomy.csv"))


def _columns(sources, labels, hierarchies=None):
    n = len(sources)
    cols = {}
    for name in VARIABLE_NAMES:
        var = BY_NAME[name]
        if var.dtype == "str":
            cols[name] = np.full(n, "", dtype=object)
        elif var.dtype != "bytes":
            cols[name] = np.full(n, var.fill, dtype=var.dtype)
    cols["source"][:] = sources
    cols["original_label"][:] = labels
    cols["original_hierarchy"][:] = hierarchies or [""] * n
    return cols


def test_table_ids_are_integers_and_lineages_derived(table):
    row = table.loc[("zooscan", "Harpacticoida")]
    assert row["aphia_ID"] == "115348" and row["NCBI_ID"] == "163465"
    assert row["lineage"] == "animalia arthropoda copepoda harpacticoida tachidiidae euterpina"
    assert len(table) == 1485


def test_apply_fills_only_unlabelled_rows_by_source_hierarchy_or_other_collection(table):
    cols = _columns(["whoi", "zooscan", "newcruise", "whoi", "whoi"],
                    ["Chaetoceros", "Harpacticoida", "Harpacticoida", "unknown_thing", "dino_xyz"],
                    ["", "", "", "", "living>Eukaryota>Ceratium"])
    cols["lineage"][0], cols["root_class"][0] = "kept as is", "living"  # already harmonised upstream
    taxonomy.apply(table, cols)
    assert cols["lineage"][0] == "kept as is"
    assert cols["lineage"][1] == "animalia arthropoda copepoda harpacticoida tachidiidae euterpina"
    assert cols["aphia_id"][1] == 115348 and cols["plankton"][1] and cols["root_class"][1] == "living"
    assert cols["lineage"][2] == "" and cols["lineage"][3] == ""  # unknown source / unknown label
    assert cols["genus"][4] == "ceratium" and cols["aphia_id"][4] == 109506  # via the hierarchy's deepest node
    other = _columns(["newcruise"], ["Harpacticoida"])
    taxonomy.apply(table, other, table_source="global_uvp5")
    assert other["lineage"][0] == "animalia arthropoda copepoda harpacticoida" and other["aphia_id"][0] == 1102


def test_conflicts_find_harpacticoida(table):
    conflicts = taxonomy.conflicts(taxonomy.table_mappings(table))
    harp = conflicts[conflicts["raw_label"] == "harpacticoida"]
    assert set(harp["depth"]) == {4, 6} and list(harp["source"])[-1] == "zooscan"
    assert conflicts["raw_label"].nunique() >= 10


def test_bad_tables_are_refused(tmp_path):
    bad = tmp_path / "t.csv"
    bad.write_text("Dataset,Raw_Labels,Kingdom\nx,y,z\n")
    with pytest.raises(InputError, match="t.csv: not a Planktonzilla taxonomy table, missing column"):
        taxonomy.read_table(str(bad))
    with pytest.raises(InputError, match="cannot read taxonomy table"):
        taxonomy.read_table(str(tmp_path / "missing.csv"))
