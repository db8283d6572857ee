"""Ocean grids for the environmental join, in four parts: ``naming`` opens NetCDF or Zarr grids
(``open_grid``, ``opened``) and names their variable (``VARIABLE_MAP``, ``resolve_variable``) and
axes (``find_axes``, ``detect_axes``, ``GridAxes``, ``vertical_metres``) the CF way: attributes,
then cf_xarray's criteria, then a table of names; ``axes`` holds the time axis (``TimeAxis``,
cftime calendars) and the nearest-lookup kernels (``Axis``, ``LonAxis``, ``regular_step``,
``nearest_sorted`` for regular grids, the KD-tree ``CellTree`` for curvilinear ones, sphere
geometry); ``join`` is the join engine (``JoinOptions``, ``Grid``, ``join_variables``, the
per-process caches of opened files ``_OPENED``, boxes ``_BOXES`` and trees ``_TREES``, ``QC_VALUES``);
``synthetic`` writes a small global grid with known values (``synthetic_grid``, ``synthetic_field``)
for demos and tests.
Every name below is re-exported so that ``from pzscale import grids; grids.X`` keeps working.
"""

from pzscale.grids.axes import (
    EARTH_RADIUS_KM,
    MS_PER_DAY,
    Axis,
    CellTree,
    LonAxis,
    TimeAxis,
    as_time_ms,
    chord_of_km,
    km_of_chord,
    months_of,
    nearest_sorted,
    regular_step,
    unit_vectors,
)
from pzscale.grids.join import (
    _BOXES,
    _OPENED,
    _TREES,
    QC_LAND_FILLED,
    QC_NAMES,
    QC_NO_DATA,
    QC_NO_POSITION,
    QC_OK,
    QC_OUT_OF_RANGE,
    QC_VALUES,
    Grid,
    JoinOptions,
    file_identity,
    join_variables,
)
from pzscale.grids.naming import (
    AXIS_ORDER,
    KELVIN_UNITS,
    VARIABLE_MAP,
    GridAxes,
    detect_axes,
    find_axes,
    open_grid,
    opened,
    redact,
    resolve_variable,
    vertical_metres,
)
from pzscale.grids.synthetic import SYNTHETIC_LAND, synthetic_field, synthetic_grid

__all__ = [
    "AXIS_ORDER",
    "EARTH_RADIUS_KM",
    "KELVIN_UNITS",
    "MS_PER_DAY",
    "QC_LAND_FILLED",
    "QC_NAMES",
    "QC_NO_DATA",
    "QC_NO_POSITION",
    "QC_OK",
    "QC_OUT_OF_RANGE",
    "QC_VALUES",
    "SYNTHETIC_LAND",
    "VARIABLE_MAP",
    "_BOXES",
    "_OPENED",
    "_TREES",
    "Axis",
    "CellTree",
    "Grid",
    "GridAxes",
    "JoinOptions",
    "LonAxis",
    "TimeAxis",
    "as_time_ms",
    "chord_of_km",
    "detect_axes",
    "file_identity",
    "find_axes",
    "join_variables",
    "km_of_chord",
    "months_of",
    "nearest_sorted",
    "open_grid",
    "opened",
    "redact",
    "regular_step",
    "resolve_variable",
    "synthetic_field",
    "synthetic_grid",
    "unit_vectors",
    "vertical_metres",
]
