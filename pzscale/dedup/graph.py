"""Duplicate groups from links: connected components, and the keep rule that names each group by its kept row."""

from __future__ import annotations

import numpy as np
import scipy.sparse
from scipy.sparse.csgraph import connected_components


def rank_order(ok: np.ndarray, labelled: np.ndarray, area: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, rank): rows with an image from best to worst under the keep rule, and each row's position
    in that order (a large number for rows without an image)."""
    rows = np.flatnonzero(ok)
    order = rows[np.lexsort((rows, -area[rows], ~labelled[rows]))]
    rank = np.full(len(ok), np.iinfo(np.int64).max, np.int64)
    rank[order] = np.arange(len(order))
    return order, rank


def kept_rows(labels: np.ndarray, order: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """Group id per row from component labels (-1 = not in any group): the best-ranked row of its component."""
    out = np.full(len(labels), -1, np.int64)
    valid = np.flatnonzero(labels >= 0)
    if not len(valid):
        return out
    lab = labels[valid]
    _, comp = np.unique(lab, return_inverse=True)
    best = np.full(comp.max() + 1, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(best, comp, rank[valid])
    out[valid] = order[best[comp]]
    return out


def components(n: int, a: np.ndarray, b: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Connected-component label per row of the graph with edges (a, b); -1 where not ``valid``."""
    graph = scipy.sparse.coo_matrix((np.ones(len(a), np.int32), (np.asarray(a, np.int64), np.asarray(b, np.int64))),
                                    shape=(n, n)).tocsr()
    _, labels = connected_components(graph, directed=False)
    return np.where(valid, labels, -1).astype(np.int64)


def summary(group_of: np.ndarray) -> dict[str, int]:
    """Groups of two or more rows, rows that are not their group's kept row, and the largest group (a giant
    group means chains of look-alikes: lower the threshold or eps)."""
    dup = (group_of >= 0) & (group_of != np.arange(len(group_of)))
    sizes = np.bincount(group_of[group_of >= 0]) if (group_of >= 0).any() else np.zeros(1, np.int64)
    return {"groups": int(len(np.unique(group_of[dup]))), "duplicates": int(dup.sum()),
            "largest_group": int(sizes.max())}


def spanning_forest(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges of a spanning forest of the graph on hash values (a, b): each node linked to its component's root."""
    nodes, inv = np.unique(np.r_[a, b], return_inverse=True)
    labels = components(len(nodes), inv[: len(a)], inv[len(a) :], np.ones(len(nodes), bool))
    order = np.lexsort((nodes, labels))
    first = np.r_[True, labels[order][1:] != labels[order][:-1]]
    root = order[np.flatnonzero(first)][np.cumsum(first) - 1]
    keep = root != order
    return nodes[root[keep]], nodes[order[keep]]
