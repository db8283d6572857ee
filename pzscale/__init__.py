"""pzscale: plankton image catalogs at Planktonzilla-17M scale, on Dask."""

from importlib.metadata import version

from pzscale.catalog import open_catalog, read_images
from pzscale.errors import CatalogError, InputError, PzscaleError, ShardAlignmentError, StageError

__version__ = version("pzscale")

__all__ = [
    "CatalogError",
    "InputError",
    "PzscaleError",
    "ShardAlignmentError",
    "StageError",
    "__version__",
    "open_catalog",
    "read_images",
]
