"""One PNG of every stage's rate as a ratio to its ceiling and to its peer, with the targets.

Reads the ``summary`` entries of the newest result of each suite (CPU runs) and writes
``results/ratios.png``; the README links it.
"""

from __future__ import annotations

import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from common import RESULTS, load  # noqa: E402


def newest_entries() -> list[dict]:
    out = []
    for suite in ("ingest", "dedup", "embed", "env"):
        runs = [d for d in load(suite) if d["metadata"]["machine"].get("device", "cpu") == "cpu"]
        if runs:
            entries = [e for e in runs[-1].get("summary", []) if e.get("ceiling_ratio") or e.get("peer_ratio")]
            out += [e for e in entries if e["workers"] == max(x["workers"] for x in entries)
                    and e["images"] == max(x["images"] for x in entries if x["stage"] == e["stage"])]
    return out


def main() -> None:
    entries = newest_entries()
    if not entries:
        raise SystemExit("no results with ratios yet: run the suites first")
    labels = [textwrap.fill(f"{e['stage']} {e.get('model', '')}".strip(), 18) for e in entries]
    x = np.arange(len(entries))
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(entries)), 4))
    ceiling = [e.get("ceiling_ratio") or 0 for e in entries]
    peer = [e.get("peer_ratio") or 0 for e in entries]
    ax.bar(x - 0.2, ceiling, 0.4, label="pzscale / ceiling")
    ax.bar(x + 0.2, peer, 0.4, label="pzscale / peer")
    for i, e in enumerate(entries):
        if e.get("ceiling_target"):
            ax.hlines(e["ceiling_target"], i - 0.4, i, colors="k", linestyles="--", linewidth=1)
    ax.axhline(1.0, color="grey", linewidth=0.5)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ratio (log scale); dashes: target vs ceiling")
    ax.set_title("pzscale throughput relative to ceiling and peer (2 workers)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = RESULTS / "ratios.png"
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
