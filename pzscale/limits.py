"""Limits that stop decompression bombs before they take a worker's memory.

An image may declare at most ``max_image_pixels`` pixels (a 100000 x 100000 PNG header is a
few bytes); an archive member may expand to at most ``max_member_bytes`` and to at most
``max_compression_ratio`` times its compressed size (once it is over ``RATIO_FLOOR_BYTES``:
small members of headers and text legitimately compress well). Defaults come from the
environment (``PZSCALE_MAX_IMAGE_PIXELS``, ``PZSCALE_MAX_MEMBER_BYTES``,
``PZSCALE_MAX_COMPRESSION_RATIO``) or from ``ingest(..., limits=Limits(...))``, which sends
them with every shard task. Code that checks a limit asks ``current()``.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from pzscale.errors import InputError

ENV = {
    "max_image_pixels": "PZSCALE_MAX_IMAGE_PIXELS",
    "max_member_bytes": "PZSCALE_MAX_MEMBER_BYTES",
    "max_compression_ratio": "PZSCALE_MAX_COMPRESSION_RATIO",
}
# Compression ratios count only above this size: a tar of tiny files is mostly zero-padded headers.
RATIO_FLOOR_BYTES = 1 << 20


@dataclass(frozen=True)
class Limits:
    # 10000 x 10000: far above any plankton vignette (Planktonzilla's widest is ~2.8k px), ~300 MB as RGB
    max_image_pixels: int = 100_000_000
    max_member_bytes: int = 1 << 30
    # deflate tops out near 1030:1; images and tables of real archives stay far below 100:1
    max_compression_ratio: float = 200.0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not value > 0:
                raise InputError(f"limit {name} must be positive, not {value!r}")

    @classmethod
    def from_env(cls) -> Limits:
        given = {}
        for name, var in ENV.items():
            text = os.environ.get(var, "").strip()
            if text:
                try:
                    given[name] = float(text) if name == "max_compression_ratio" else int(text)
                except ValueError:
                    raise InputError(f"{var}={text!r} is not a number") from None
        return cls(**given)

    def to_dict(self) -> dict:
        return asdict(self)

    def check_member(self, archive: str, member: str, size: int, compressed: int | None = None) -> None:
        """Raise InputError for an archive member that expands beyond these limits."""
        shown = repr(member)[1:-1]
        if size > self.max_member_bytes:
            raise InputError(f"{archive}: member '{shown}' expands to {size:,} bytes, over the limit of "
                             f"{self.max_member_bytes:,} ({ENV['max_member_bytes']})")
        if compressed is not None:
            self.check_ratio(f"{archive}: member '{shown}'", size, compressed)

    def check_ratio(self, what: str, size: int, compressed: int) -> None:
        """Raise InputError when ``size`` bytes came out of ``compressed`` bytes at a bomb's ratio."""
        if size > RATIO_FLOOR_BYTES and size > self.max_compression_ratio * max(compressed, 1):
            raise InputError(f"{what} expands {size / max(compressed, 1):,.0f} times ({compressed:,} to {size:,} "
                             f"bytes), over the limit of {self.max_compression_ratio:g} "
                             f"({ENV['max_compression_ratio']}): a decompression bomb?")


_CURRENT: contextvars.ContextVar[Limits | None] = contextvars.ContextVar("pzscale_limits", default=None)


def current() -> Limits:
    """The limits in force: those of ``using`` when inside one, else the environment's."""
    return _CURRENT.get() or Limits.from_env()


@contextlib.contextmanager
def using(limits: Limits | dict | None) -> Iterator[Limits]:
    """Apply ``limits`` (a Limits, its dict, or None for the environment's) in this thread."""
    value = Limits(**limits) if isinstance(limits, dict) else limits or Limits.from_env()
    token = _CURRENT.set(value)
    try:
        yield value
    finally:
        _CURRENT.reset(token)
