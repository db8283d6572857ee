"""The command line's machinery, shared by every command in ``cli``: errors as one line, logging levels,
the options commands share, the checks made before a cluster starts, and the command's Dask client."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer

from pzscale import catalog
from pzscale.errors import PzscaleError, one_line

log = logging.getLogger("pzscale")

# the extra that installs each optional package (a missing one is named with the command to run)
_EXTRAS = {"sklearn": "ml", "torch": "ml", "torchvision": "ml", "kornia": "ml", "open_clip": "ml", "timm": "ml",
           "safetensors": "ml", "s3fs": "s3", "cartopy": "maps", "dask_kubernetes": "k8s", "dask_gateway": "k8s",
           "dask_cuda": "gpu"}


def one_line_message(error: BaseException) -> str:
    """What went wrong and what to do, on one line, for the errors a person can act on."""
    if isinstance(error, PzscaleError):
        return str(error)
    if isinstance(error, ModuleNotFoundError):
        module = (error.name or "").split(".")[0]
        extra = _EXTRAS.get(module)
        fix = f"pip install 'pzscale[{extra}]'" if extra else f"pip install {module}"
        return f"this command needs the Python package {module!r}, which is not installed: {fix}"
    if isinstance(error, OSError) and error.filename:
        return f"{error.filename}: {error.strerror or one_line(error)}"
    return f"{type(error).__name__}: {one_line(error)} (run with -v for the traceback)"


class App(typer.Typer):
    """Typer whose commands all end an error the same way: one line on stderr naming what is wrong,
    exit status 1 (with ``-v``, unexpected errors keep their traceback)."""

    def command(self, *args: Any, **kwargs: Any) -> Callable[[Callable], Callable]:
        register = super().command(*args, **kwargs)

        def decorator(fn: Callable) -> Callable:
            @functools.wraps(fn)
            def one_line_errors(*a: Any, **k: Any) -> Any:
                try:
                    return fn(*a, **k)
                except (typer.Exit, typer.Abort, typer.exceptions.TyperException):
                    raise  # usage errors (exit status 2) and exits are click's to report
                except Exception as e:
                    known = isinstance(e, PzscaleError | ModuleNotFoundError) or (
                        isinstance(e, OSError) and e.filename)
                    if not known and log.isEnabledFor(logging.DEBUG):
                        raise
                    typer.echo(f"error: {one_line_message(e)}", err=True)
                    raise typer.Exit(1) from None

            return register(one_line_errors)

        return decorator


class StderrHandler(logging.StreamHandler):
    """Log lines to whatever ``sys.stderr`` is when they are written (a test runner swaps it)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def configure_logging(verbose: int, quiet: bool) -> None:
    """``-q``: warnings and errors; default: info (progress lines, the dashboard link); ``-v``: debug;
    ``-vv``: Dask's own info lines too. Timestamped lines on stderr."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    handler = StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
    logging.getLogger("distributed").setLevel(logging.INFO if verbose > 1 else logging.WARNING)


CatalogOpt = Annotated[str, typer.Option("--catalog", "-c", envvar="PZSCALE_CATALOG",
                                         help="catalog URL: a path or s3://bucket/x.zarr")]
StorageOpt = Annotated[str | None, typer.Option(
    "--storage-options", envvar="PZSCALE_STORAGE_OPTIONS",
    help="fsspec storage options as JSON (credentials: use the environment)")]
SchedulerOpt = Annotated[str | None, typer.Option(
    "--scheduler", help="address of a running Dask scheduler; default: DASK_SCHEDULER_ADDRESS, else a local cluster")]
WorkersOpt = Annotated[int | None, typer.Option("--workers", help="local worker processes (default: cores)")]


def storage_options_of(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise typer.BadParameter(f"--storage-options is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise typer.BadParameter("--storage-options must be a JSON object")
    return value


ModelOpt = Annotated[str, typer.Option("--model", "-m", help="model directory (model_card.json + weights)")]
PrecisionOpt = Annotated[str, typer.Option(help="fp32, or bf16/fp16 under autocast (GPU)")]


def start_client(scheduler: str | None, workers: int | None):
    """The Dask client of a command, started after its arguments are checked (``check_inputs``)."""
    from pzscale.cluster import connect, describe

    client = connect(scheduler, n_workers=workers, quiet=True)
    log.info(describe(client))
    return client


def check_inputs(catalog_url: str | None = None, storage_options: dict | None = None, *, model: str | None = None,
           sources: list[str] | None = None, new_catalog: bool = False,
           grid: tuple[str, list[str], dict | None] | None = None) -> None:
    """The checks that take no cluster, made before one starts: a usage error costs no cluster start-up.
    Storage requests are retried like every other (a throttled or dropped request is no usage error)."""
    import fsspec

    from pzscale.stage import retry

    if catalog_url is not None:
        catalog.check_url(catalog_url)
        if not new_catalog and not retry(catalog.exists, catalog_url, storage_options=storage_options):
            raise PzscaleError(f"{catalog_url}: no catalog here (no zarr.json); create one with `pzscale ingest`")
    if model is not None:
        from pzscale.ml.models import ModelCard

        ModelCard.load(model)
    for source in sources or ():
        fs, path = fsspec.core.url_to_fs(source, **(storage_options or {}))
        if not retry(fs.exists, path):
            raise PzscaleError(f"{source}: no such file or folder")
    if grid is not None:
        from pzscale import grids
        from pzscale.env import parse_variables

        path, variables, grid_so = grid
        with grids.opened(path, storage_options=grid_so) as ds:
            for var in parse_variables(variables).values():
                grids.resolve_variable(ds, var, where=grids.redact(path))


TaxonModelOpt = Annotated[str | None, typer.Option(
    "--model", "-m", help="use this model id's predictions (pred__<id>__*) instead of the catalog's annotations")]
MinProbOpt = Annotated[float, typer.Option(help="with --model: the least probability a prediction needs")]
