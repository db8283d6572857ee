"""The hash pass (stage ``dedup_hash``, one task per shard, resumable and incremental after an append): every
image decoded once, ``pixel_hash``, ``phash`` and ``phash_profile`` stored (see ``pzscale.imagehash``)."""

from __future__ import annotations

import numpy as np
from distributed import Client

from pzscale import catalog, imagehash, images
from pzscale.dedup.common import DECODE_BATCH, HASH_ARRAYS, HASH_STAGE, PHASH, PHASH_PROFILE, PIXEL_HASH
from pzscale.schema import STATUS_OK
from pzscale.stage import Catalog, ShardResult, ShardTask, StageReport, pending, require_client, run_stage


def _complete(info: dict) -> bool:
    """A marker of this pass: it lists every array of ``HASH_ARRAYS`` (an older pzscale wrote no profiles)."""
    return set(HASH_ARRAYS) <= set(info.get("arrays", ()))


def hash_shard(task: ShardTask) -> ShardResult:
    """Decode rows [row_from, stop) of one shard in batches and write the ``HASH_ARRAYS`` of the whole shard."""
    group = task.catalog.group("r+")
    start, row_from, stop = task.start, task.row_from, task.stop
    ok = np.flatnonzero(group["status"][row_from:stop] == STATUS_OK)
    pixel = np.zeros((stop - row_from, 2), np.uint64)
    phash = np.zeros(stop - row_from, np.uint64)
    profile = np.zeros((stop - row_from, imagehash.PROFILE_LEN), np.float16)
    for lo in range(0, len(ok), DECODE_BATCH):
        sel = ok[lo : lo + DECODE_BATCH]
        encoded = group["image_bytes"].get_orthogonal_selection((sel + row_from,))
        pixels = [images.decode(bytes(b)) for b in encoded]
        pixel[sel] = imagehash.pixel_hashes(pixels)
        phash[sel], profile[sel] = imagehash.phashes_and_profiles(pixels)
    new = catalog.with_stored_rows(group, start, row_from, {PIXEL_HASH: pixel, PHASH: phash, PHASH_PROFILE: profile})
    task.catalog.write(start, stop, new)
    # a marker without every array (an older pzscale) is replaced; one for fewer rows (an append since) is
    # superseded by mark_done itself
    return ShardResult(stop - row_from, {HASH_STAGE: {"computed": stop - row_from, "arrays": list(HASH_ARRAYS)}},
                       replace=task.params.get("replace", False))


def hash_images(url: str | Catalog, *, client: Client | None = None, storage_options: dict | None = None,
                progress: bool = True) -> StageReport:
    """The hash pass alone (resumable): ``pixel_hash``, ``phash`` and ``phash_profile`` for every row not hashed
    yet. A marker that does not list every array of ``HASH_ARRAYS`` (a catalog hashed by an older pzscale) has
    its whole shard hashed again."""
    client = require_client(client)
    cat = Catalog.open(url, storage_options)
    cat.ensure_array(PIXEL_HASH, dtype="uint64", fill=0, trailing=(2,), dims=("hash_word",), attrs={
        "description": "blake2b-128 of the decoded pixels, dtype and shape (two big-endian uint64 words); "
                       "0 where the row has no image"})
    cat.ensure_array(PHASH, dtype="uint64", fill=0, attrs={
        "description": "64-bit pHash as imagededup.methods.PHash (first bit most significant); 0 without image"})
    cat.ensure_array(PHASH_PROFILE, dtype="float16", fill=0, trailing=(imagehash.PROFILE_LEN,),
                     dims=("dct_coefficient",), attrs={
        "description": "the 63 AC coefficients of the pHash's 8 x 8 DCT block, orthonormal scaling, unit length: "
                       "dot products are correlations of low-passed thumbnails; 0 without image"})
    markers = cat.markers(HASH_STAGE)
    tasks, skipped = pending(cat, HASH_STAGE, valid=_complete, markers=markers)  # one listing, not two
    tasks = [t.with_params(replace=t.shard in markers and not _complete(markers[t.shard])) for t in tasks]
    return run_stage(HASH_STAGE, hash_shard, tasks, catalog=cat, client=client, skipped=skipped,
                     progress_bar=progress)


def row_info(cat: Catalog, start: int, stop: int, with_phash: bool) -> dict[str, np.ndarray]:
    """A shard's rows for the keep rule (image ok, labelled, area), and their pHashes."""
    cols = cat.read(start, stop, ["status", "lineage", "width", "height", *([PHASH] if with_phash else [])])
    out = {"ok": cols["status"] == STATUS_OK, "labelled": cols["lineage"] != "",
           "area": cols["width"].astype(np.int64) * cols["height"].astype(np.int64)}
    if with_phash:
        out["phash"] = cols[PHASH]
    return out
