"""Errors raised by pzscale. Each inherits a builtin so callers can catch either."""

import re


class PzscaleError(Exception):
    """Base class of every pzscale error."""


class InputError(PzscaleError, ValueError):
    """An input file is unreadable or does not have the expected layout."""


class CatalogError(PzscaleError, ValueError):
    """A catalog is missing, inconsistent, or incompatible with the requested operation."""


class ShardAlignmentError(CatalogError):
    """A write would cover part of a shard, which is a read-modify-write race on object storage."""


class StageError(PzscaleError, RuntimeError):
    """One or more shard tasks of a stage failed; finished shards stay marked done."""


class ModelError(PzscaleError, ValueError):
    """A model directory or checkpoint cannot be loaded (missing, corrupt, or unsafe to unpickle)."""


def one_line(error: object, limit: int = 300) -> str:
    """An error's text on one line, the same on every run (object addresses removed, so that
    a message stored in the catalog is byte-identical after a rerun), at most ``limit`` characters."""
    text = re.sub(r" at 0x[0-9a-f]+", "", " ".join(str(error).split()))
    if not text and isinstance(error, BaseException):
        text = type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
