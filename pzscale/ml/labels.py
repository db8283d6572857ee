"""What a classifier learns and how it is scored: the target label of a catalog row, the name of the split
variable, and accuracy/macro-F1 per rank with the Planktonzilla truncation.

Shared by the stages that split, train, evaluate, zero-shot and few-shot (which never import each other).
At rank k (kingdom = 1 ... species = 7) true and predicted lineages are truncated to their first k words; a
lineage shorter than k contributes its full string ("evaluated only at ranks where annotated").
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score

from pzscale.schema import RANKS, STATUS_OK

# the catalog columns ``targets`` reads
TARGET_COLUMNS = ("lineage", "proposed_label", "original_label", "status")


def targets(cols: dict[str, np.ndarray]) -> np.ndarray:
    """The label a classifier learns: the lineage, else the proposed label, else the source's own raw label
    (a class folder's name when no taxonomy table mapped it: ``pzscale taxonomy report`` lists those as
    unmapped); '' when none or no image."""
    named = np.where(cols["proposed_label"] != "", cols["proposed_label"], cols["original_label"])
    target = np.where(cols["lineage"] != "", cols["lineage"], named).astype(object)
    target[cols["status"] != STATUS_OK] = ""
    return target


def truncate(lineages: list[str], depth: int) -> list[str]:
    return [" ".join(text.split()[:depth]) for text in lineages]


def scores(truth: list[str], predicted: list[str]) -> pd.DataFrame:
    """Accuracy and macro-F1 per rank for paired lineage strings."""
    rows = []
    for depth, rank in enumerate(RANKS, start=1):
        t, p = truncate(truth, depth), truncate(predicted, depth)
        rows.append({"rank": rank, "images": len(t), "classes": len(set(t)),
                     "accuracy": float(np.mean(np.array(t) == np.array(p))) if t else float("nan"),
                     "macro_f1": float(f1_score(t, p, average="macro", zero_division=0)) if t else float("nan")})
    return pd.DataFrame(rows)
