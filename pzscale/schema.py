"""The catalog contract: per-image variables, their dtypes and fill values, and the
Planktonzilla parquet columns they come from."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RANKS = ("kingdom", "phylum", "class", "order", "family", "genus", "species")

STATUS_OK = "ok"
STATUS_DECODE_ERROR = "decode_error"
STATUS_MISSING_IMAGE = "missing_image"

TIME_UNITS = "milliseconds since 1970-01-01T00:00:00"
TIME_FILL = np.iinfo(np.int64).min  # decoded as NaT by xarray


@dataclass(frozen=True)
class Variable:
    name: str
    dtype: str  # "str", "bytes" (variable length) or a numpy dtype name
    fill: object
    description: str
    units: str | None = None
    # CF attributes (standard_name, long_name, axis, positive) of the coordinates any CF tool looks for
    cf: tuple[tuple[str, str], ...] = ()


def _s(name: str, description: str) -> Variable:
    return Variable(name, "str", "", description)


VARIABLES: tuple[Variable, ...] = (
    _s("image_id", "unique, stable id: '<source>:<original id>'"),
    _s("source", "collection the image comes from (Planktonzilla 'dataset')"),
    _s("instrument", "imaging instrument family"),
    _s("original_label", "label as given by the source"),
    _s("original_path", "path of the image in the source archive"),
    _s("object_id", "object id in the source (EcoTaxa objid, IFCB ROI, ...)"),
    _s("sample", "sample the image was taken in: IFCB bin, EcoTaxa sample_id (else acq_id), the folder above a class "
                 "folder, or as the ingest was told ('' unknown)"),
    *(_s(rank, f"harmonised taxonomy: {rank}") for rank in RANKS),
    _s("lineage", "lowercase non-empty ranks joined by spaces (Planktonzilla text format)"),
    _s("proposed_label", "harmonised label (binomial at species level)"),
    Variable("plankton", "bool", False, "true for living plankton (false also when unknown)"),
    _s("root_class", "living, detritus, artefact or inert ('' when unknown)"),
    _s("qualifier", "full_body, larvae, part_head, ... ('' when none)"),
    Variable("aphia_id", "int64", 0, "WoRMS AphiaID (0 = none)"),
    _s("wikidata_id", "Wikidata Q-id"),
    _s("ecotaxa_id", "EcoTaxa taxon id(s), ';'-joined"),
    _s("ncbi_id", "NCBI taxonomy id"),
    _s("bold_id", "BOLD id"),
    Variable("lat", "float64", np.nan, "latitude of the sample", "degrees_north",
             (("standard_name", "latitude"), ("long_name", "latitude of the sample"), ("axis", "Y"))),
    Variable("lon", "float64", np.nan, "longitude of the sample", "degrees_east",
             (("standard_name", "longitude"), ("long_name", "longitude of the sample"), ("axis", "X"))),
    Variable("depth_min", "float32", np.nan, "shallowest depth sampled", "m",
             (("standard_name", "depth"), ("long_name", "shallowest depth sampled"), ("axis", "Z"),
              ("positive", "down"))),
    Variable("depth_max", "float32", np.nan, "deepest depth sampled", "m",
             (("standard_name", "depth"), ("long_name", "deepest depth sampled"), ("positive", "down"))),
    Variable("time", "int64", TIME_FILL, "sampling time, UTC", TIME_UNITS,
             (("standard_name", "time"), ("long_name", "sampling time, UTC"), ("axis", "T"))),
    Variable(
        "instrument_temperature", "float32", np.nan,
        "instrument housing temperature (not seawater)", "degree_Celsius",
    ),
    Variable("instrument_humidity", "float32", np.nan, "instrument housing humidity", "percent"),
    Variable("volume_analysed", "float32", np.nan, "sample volume imaged for this image's sample (IFCB)", "mL"),
    Variable("pixel_size", "float32", np.nan, "physical size of one pixel", "um"),
    _s("original_hierarchy", "the source's own label path (EcoTaxa annotation hierarchy)"),
    _s("annotation_status", "validated, predicted, dubious ... ('' unknown)"),
    _s("qc", "';'-joined quality flags of the metadata ('' = all ok); flagged values are NaN/NaT"),
    _s("license", "licence of the image"),
    _s("license_url", "licence URL"),
    Variable("height", "int32", 0, "image height", "pixel"),
    Variable("width", "int32", 0, "image width", "pixel"),
    _s("mode", "PIL pixel mode of the decoded image (L, RGB, I;16, ...)"),
    _s("status", "ok, decode_error or missing_image"),
    _s("error", "why the row is not ok ('' when ok)"),
    Variable("image_bytes", "bytes", b"", "the source's encoded image, byte for byte"),
)

VARIABLE_NAMES = tuple(v.name for v in VARIABLES)
# CF auxiliary coordinates of every image (a CF "point" feature type along the image dimension)
COORDINATES = tuple(v.name for v in VARIABLES if v.cf)
BY_NAME = {v.name: v for v in VARIABLES}

# Planktonzilla-17M parquet schema (planktonzilla constants.CONSOLIDATED_COLUMNS).
# v1.0 shards carry the first 22 columns; v1.1 adds the ids, timestamp and licences.
PARQUET_REQUIRED = (
    "image", "dataset", "original_label", "original_path",
    "Kingdom", "Phylum", "Class", "Order", "Family", "Genus", "Species",
    "proposed_label", "plankton", "root_class", "qualifier",
    "Latitude", "Humidity", "Temperature", "Longitude", "ObjID", "Depth_max", "Depth_min",
)
PARQUET_OPTIONAL = (
    "wikidata_ID", "ecotaxa_ID", "aphia_ID", "NCBI_ID", "BOLD_ID", "timestamp", "license", "license_url",
)
PARQUET_COLUMNS = PARQUET_REQUIRED + PARQUET_OPTIONAL

# catalog variable <- parquet column, for the columns copied as text
TEXT_FROM_PARQUET = {
    "source": "dataset",
    "original_label": "original_label",
    "original_path": "original_path",
    "object_id": "ObjID",
    "sample": "sample",
    **{rank: rank.capitalize() for rank in RANKS},
    "proposed_label": "proposed_label",
    "root_class": "root_class",
    "qualifier": "qualifier",
    "wikidata_id": "wikidata_ID",
    "ecotaxa_id": "ecotaxa_ID",
    "ncbi_id": "NCBI_ID",
    "bold_id": "BOLD_ID",
    "license": "license",
    "license_url": "license_url",
    "original_hierarchy": "original_hierarchy",
    "annotation_status": "annotation_status",
}
NUMBER_FROM_PARQUET = {
    "lat": "Latitude",
    "lon": "Longitude",
    "depth_min": "Depth_min",
    "depth_max": "Depth_max",
    "instrument_temperature": "Temperature",
    "instrument_humidity": "Humidity",
    "volume_analysed": "volume_analysed_ml",
    "pixel_size": "pixel_size_um",
}

# Instrument family of each Planktonzilla source (the dataset card's source table).
SOURCE_INSTRUMENTS = {
    "global_uvp5": "UVP5",
    "whoi": "IFCB",
    "jedioceans": "CPICS",
    "zooscan": "ZooScan",
    "zoocamnet": "ZooCAM",
    "uvp6net": "UVP6",
    "isiisnet": "ISIIS",
    "flowcamnet": "FlowCam",
    "planktoscope": "PlanktoScope",
    "medplanktonset": "IFCB",
    "syke_ifcb_2022": "IFCB",
    "planktonset1.0": "ISIIS-2",
    "sykezooscan2024": "ZooScan",
    "zoolake": "DSPC",
    "lensless": "Lensless",
}
# Instrument families also recognised as a source-name suffix (ecotaxa_vpr -> VPR).
INSTRUMENT_FAMILIES = sorted({*SOURCE_INSTRUMENTS.values(), "VPR", "LOKI", "CytoSense"})


def lineage(ranks: list[str | None]) -> str:
    """Planktonzilla lineage text: lowercase non-empty ranks joined by single spaces."""
    return " ".join(r.strip().lower() for r in ranks if r and r.strip())


def instrument_family(text: str) -> str:
    """Instrument family for an instrument name as written by a source (``uvp6``, ``zooscan_nan``,
    ``IFCB``); unknown names are kept as written."""
    t = text.strip().lower()
    matches = [f for f in INSTRUMENT_FAMILIES if t.startswith(f.lower())]
    return max(matches, key=len) if matches else text.strip()


def instrument_of(source: str) -> str:
    """Instrument family for a source name; sources named '<anything>_<instrument>' map by suffix."""
    if source in SOURCE_INSTRUMENTS:
        return SOURCE_INSTRUMENTS[source]
    suffix = source.rsplit("_", 1)[-1].lower()
    by_family = {v.lower(): v for v in INSTRUMENT_FAMILIES}
    return by_family.get(suffix, "")


# ---------------------------------------------------------------- names of stage outputs
# Every array a stage adds to the catalog is named here, so stages that read another stage's
# outputs (abundance, dwc, evaluate, split, train, dedup) never spell the pattern themselves.

PREDICTION_PREFIX, EMBEDDING_PREFIX = "pred__", "emb__"
DUPLICATE_METHODS = ("exact", "near", "semantic")
DUPLICATE_KEEP = "dup_keep"
SPLIT = "split"


def prediction_name(model: str, key: str) -> str:
    """``pred__<model>__<key>``: key ``label``, ``prob``, ``topk_label``, ``topk_prob``, a rank or ``<rank>_prob``."""
    return f"{PREDICTION_PREFIX}{model}__{key}"


def embedding_name(model: str) -> str:
    """``emb__<model>``: a model's float16 image embeddings (rows x dim); also accepts the name itself."""
    return model if model.startswith(EMBEDDING_PREFIX) else f"{EMBEDDING_PREFIX}{model}"


def predicting_models(names: list[str] | set[str]) -> list[str]:
    """Models with class predictions among array ``names`` (those with ``pred__<model>__label``)."""
    return sorted({n[len(PREDICTION_PREFIX):].rsplit("__", 1)[0] for n in names
                   if n.startswith(PREDICTION_PREFIX) and n.endswith("__label")})


def embedding_arrays(names: list[str] | set[str]) -> list[str]:
    """The ``emb__<model>`` arrays among ``names``."""
    return sorted(n for n in names if n.startswith(EMBEDDING_PREFIX))


def duplicate_name(method: str) -> str:
    """``dup_<method>``: per row the catalog row of its duplicate group's kept row."""
    return f"dup_{method}"


def env_names(name: str) -> dict[str, str]:
    """Arrays and marker stage of an environmental join named ``name``."""
    return {"value": f"env_{name}", "qc": f"env_{name}_qc", "stage": f"env/{name}"}
