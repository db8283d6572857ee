"""Errors raised by pzscale. Each inherits a builtin so callers can catch either."""


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
