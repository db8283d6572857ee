from pzscale.schema import PARQUET_COLUMNS, VARIABLE_NAMES, instrument_of, lineage


def test_lineage_skips_empty_ranks_and_lowercases():
    ranks = ["Animalia", "Cnidaria", "Hydrozoa", "Siphonophorae", "Abylidae", "Abylopsis", "tetragona"]
    assert lineage(ranks) == "animalia cnidaria hydrozoa siphonophorae abylidae abylopsis tetragona"
    assert lineage(["chromista", "radiozoa", "acantharia", None, "", " ", None]) == "chromista radiozoa acantharia"
    assert lineage([None] * 7) == ""


def test_thirty_planktonzilla_columns_and_unique_variables():
    assert len(PARQUET_COLUMNS) == 30
    assert len(set(VARIABLE_NAMES)) == len(VARIABLE_NAMES)


def test_instrument_of_known_and_suffixed_sources():
    assert instrument_of("whoi") == "IFCB"
    assert instrument_of("global_uvp5") == "UVP5"
    assert instrument_of("synth_zooscan") == "ZooScan"
    assert instrument_of("somewhere_else") == ""
