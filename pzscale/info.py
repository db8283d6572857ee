"""Summaries of a catalog: rows, sources, label coverage, row status, stages done."""

from __future__ import annotations

from collections import Counter

import numpy as np

from pzscale import catalog, ids
from pzscale.stage import Catalog, map_shards, retry


def _count_shard(cat: Catalog, start: int, stop: int) -> dict:
    cols = cat.read(start, stop, ["source", "status", "lineage", "proposed_label", "original_label", "image_id"])
    written = cols["image_id"][cols["image_id"] != ""]
    harmonised = (cols["lineage"] != "") | (cols["proposed_label"] != "")
    return {
        "sources": Counter(cols["source"].tolist()),
        "status": Counter(cols["status"].tolist()),
        "with_lineage": int(np.count_nonzero(cols["lineage"] != "")),
        "with_label": int(np.count_nonzero(cols["proposed_label"] != "")),
        "with_raw_label_only": int(np.count_nonzero(~harmonised & (cols["original_label"] != ""))),
        "id_keys": ids.hashes(written),  # 8 bytes a row on the client: 139 MB for 17.4M images
    }


def _label_shard(cat: Catalog, start: int, stop: int) -> Counter:
    cols = cat.read(start, stop, ["source", "original_label", "lineage"])
    return Counter(zip(cols["source"].tolist(), cols["original_label"].tolist(), cols["lineage"].tolist(),
                       strict=True))


def label_mappings(url: str | Catalog, *, storage_options: dict | None = None) -> Counter:
    """Image counts by (source, original label, lineage) over the catalog, one task per shard."""
    return sum(map_shards(_label_shard, Catalog.open(url, storage_options)), Counter())


def summarize(url: str | Catalog, *, storage_options: dict | None = None) -> dict:
    """Counts over the whole catalog, one task per shard (memory stays flat as it grows)."""
    cat = Catalog.open(url, storage_options)
    meta = cat.metadata()
    n_rows, shard_len = cat.n_rows, cat.shard_len
    ranges = cat.shards()
    parts = map_shards(_count_shard, cat)
    total: dict = {"sources": Counter(), "status": Counter(), "with_lineage": 0, "with_label": 0,
                   "with_raw_label_only": 0}
    for p in parts:
        for key in total:
            total[key] += p[key]
    shared_rows, shared_ids = ids.count_duplicates(np.concatenate([np.zeros(0, np.uint64)] +
                                                                  [p["id_keys"] for p in parts]))
    stages = retry(catalog.stages_done, url, storage_options=storage_options)
    plans = []
    for p in meta["plans"]:
        expected = len(catalog.shard_ranges(p["row_start"], p["row_stop"], shard_len))
        done = len(stages.get(f"ingest/{p['id']}", ()))
        plans.append({"id": p["id"], "rows": [p["row_start"], p["row_stop"]], "items": p["items"],
                      "input_errors": p.get("input_errors", 0), "readers": p.get("readers", []),
                      "shards_done": done, "shards": expected})
    return {
        "url": url, "rows": n_rows, "shard_len": shard_len, "shards": len(ranges),
        "version": meta["version"], "sources": dict(total["sources"]), "status": dict(total["status"]),
        "with_lineage": total["with_lineage"], "with_label": total["with_label"],
        "with_raw_label_only": total["with_raw_label_only"],
        "shared_image_ids": {"rows": shared_rows, "ids": shared_ids},
        "plans": plans,
        "stages": {s: len(v) for s, v in stages.items() if not s.startswith("ingest/")},
    }


def format_summary(s: dict) -> str:
    rows = max(s["rows"], 1)
    lines = [
        f"catalog {s['url']}",
        f"  {s['rows']:,} images in {s['shards']} shard(s) of {s['shard_len']:,} rows (pzscale {s['version']})",
        "  sources: " + ", ".join(f"{k} {v:,}" for k, v in sorted(s["sources"].items())),
        f"  labelled: {s['with_label']:,} ({100 * s['with_label'] / rows:.1f}%), "
        f"with taxonomic lineage: {s['with_lineage']:,} ({100 * s['with_lineage'] / rows:.1f}%), "
        f"raw label only (unmapped, trained on as is): {s['with_raw_label_only']:,}",
        "  status: " + ", ".join(f"{k or 'unwritten'} {v:,}" for k, v in sorted(s["status"].items())),
    ]
    shared = s.get("shared_image_ids", {})
    if shared.get("rows"):
        lines.append(f"  DUPLICATE IMAGE IDS: {shared['rows']:,} rows share {shared['ids']:,} id(s) "
                     "(QC flag duplicate_image_id; `pzscale ingest --duplicate-ids suffix` makes them unique)")
    for p in s["plans"]:
        state = "complete" if p["shards_done"] == p["shards"] else "INCOMPLETE: rerun ingest to resume"
        skipped = f", {p['input_errors']} skipped" if p["input_errors"] else ""
        lines.append(f"  ingest {p['id']} ({'+'.join(p['readers'])}): rows {p['rows'][0]:,}..{p['rows'][1]:,} "
                     f"from {p['items']} input(s){skipped}, {p['shards_done']}/{p['shards']} shards done ({state})")
    for stage, n in sorted(s["stages"].items()):
        lines.append(f"  {stage}: {n}/{s['shards']} shards done")
    return "\n".join(lines)
