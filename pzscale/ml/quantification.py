"""Composition estimates corrected for classifier error (quantification), for one group of images.

Classify-and-count is biased whenever a group's class mix differs from the data the classifier was validated on
(prior shift: the normal case between cruises), most for rare taxa. The estimators take a group's predictions
(labels, or posterior probabilities as a dense array or a scipy sparse matrix: the stored top-k) and the model's
behaviour on labelled validation images:

- ``cc``: classify and count (Forman 2008's baseline);
- ``pcc``: probabilistic classify and count, the mean posterior (Bella et al. 2010);
- ``acc``: adjusted classify and count: ``observed = rates.T @ true`` solved for ``true`` on the simplex, with
  ``rates[i, j]`` = P(predicted j | true i) on the validation images (Forman 2008, multi-class); the predicted
  bins may hold one more than the classes, an "unknown" bin of low-confidence predictions, which the solve
  gives back to the classes they come from;
- ``pacc``: the same with the mean validation posterior per true class (Bella et al. 2010);
- ``em``: the priors re-estimated by expectation maximisation of the posteriors (Saerens, Latinne and Decaestecker
  2002), which assumes posteriors calibrated on the validation priors: they are first recalibrated on the
  validation images by bias-corrected temperature scaling (Alexandari, Kundaje and Shrikumar 2020, who found
  EM with it hard to beat under label shift; a network trained for a couple of epochs is far from calibrated).

Classes are integer codes ``0..n_classes-1``. Every function takes per-image ``weights`` (None: all 1), so that
intervals come from the Poisson bootstrap (each image weighted by a Poisson(1) draw per round, which resamples a
group without gathering or indexing it: Hanley and MacGibbon 2006, Chamandy et al. 2012). Scores of an estimate
against a known composition: ``absolute_error`` and ``bray_curtis``. ``read_predictions`` gathers a catalog's
stored predictions for them: one read task per shard, a few bytes per image on the client (the top-k).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from distributed import Client
from scipy.optimize import nnls

from pzscale.errors import CatalogError, InputError
from pzscale.ml.inference import rank_groups
from pzscale.ml.labels import TARGET_COLUMNS, targets
from pzscale.schema import RANKS, SPLIT, STATUS_OK, TIME_FILL, prediction_name
from pzscale.stage import Catalog, map_shards

METHODS = ("cc", "pcc", "acc", "pacc", "em")
NEEDS_VALIDATION = ("acc", "pacc", "em")
SIMPLEX_WEIGHT = 1e3  # how hard the adjusted solve holds the proportions to a sum of 1 (a row of the NNLS system)


def _weights(n: int, weights: np.ndarray | None) -> np.ndarray:
    return np.ones(n) if weights is None else np.asarray(weights, np.float64)


def _weighted_mean(posteriors, w: np.ndarray) -> np.ndarray:
    """``sum_i w_i posteriors_i / sum_i w_i`` of a dense or sparse (n, C) matrix."""
    total = np.asarray(w @ posteriors, np.float64).ravel()
    return total / max(w.sum(), 1e-300)


def classify_and_count(predicted: np.ndarray, n_bins: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Proportions of the predicted bins (``predicted``: int codes below ``n_bins``)."""
    predicted = np.asarray(predicted, np.int64)
    counts = np.bincount(predicted, weights=_weights(len(predicted), weights), minlength=n_bins)[:n_bins]
    return counts / max(counts.sum(), 1e-300)


def probabilistic_cc(posteriors, weights: np.ndarray | None = None) -> np.ndarray:
    """The (weighted) mean posterior; rows of ``posteriors`` sum to 1."""
    return _weighted_mean(posteriors, _weights(posteriors.shape[0], weights))


def confusion_rates(true: np.ndarray, predicted: np.ndarray, n_classes: int, n_bins: int | None = None,
                    weights: np.ndarray | None = None) -> np.ndarray:
    """``rates[i, j]`` = P(predicted bin j | true class i) on labelled (validation) images, (n_classes, n_bins);
    a class with no labelled image gets the identity row (assumed always recognised: nothing is known to correct
    it by)."""
    true, predicted = np.asarray(true, np.int64), np.asarray(predicted, np.int64)
    n_bins = n_bins or n_classes
    flat = np.bincount(true * n_bins + predicted, weights=_weights(len(true), weights), minlength=n_classes * n_bins)
    return _row_normalised(flat[: n_classes * n_bins].reshape(n_classes, n_bins))


def posterior_rates(true: np.ndarray, posteriors, n_classes: int, weights: np.ndarray | None = None) -> np.ndarray:
    """``rates[i]`` = the mean posterior of labelled (validation) images of true class ``i`` (identity row where a
    class has none): the probabilistic counterpart of ``confusion_rates``."""
    true = np.asarray(true, np.int64)
    w = _weights(len(true), weights)
    by_class = sp.csr_matrix((w, (true, np.arange(len(true)))), shape=(n_classes, len(true)))
    return _row_normalised(np.asarray((by_class @ posteriors).todense() if sp.issparse(posteriors)
                                      else by_class @ posteriors, np.float64))


def _row_normalised(m: np.ndarray) -> np.ndarray:
    totals = m.sum(axis=1, keepdims=True)
    out = np.divide(m, totals, out=np.zeros_like(m, dtype=np.float64), where=totals > 0)
    empty = np.flatnonzero(totals[:, 0] == 0)
    out[empty, empty] = 1.0
    return out


def adjusted(observed: np.ndarray, rates: np.ndarray) -> np.ndarray:
    """The class proportions ``p`` (on the simplex) that best explain the observed bins ``observed = rates.T @ p``
    in least squares (``rates``: classes x bins).

    Non-negative least squares with one heavily weighted row holding ``sum(p) = 1``, then renormalised: the
    clipping of the plain inverse (solve, set negatives to 0) is biased when the system is ill-conditioned,
    which it is for look-alike taxa."""
    observed, rates = np.asarray(observed, np.float64), np.asarray(rates, np.float64)
    n_classes = rates.shape[0]
    a = np.vstack([rates.T, np.full(n_classes, SIMPLEX_WEIGHT)])
    b = np.r_[observed, SIMPLEX_WEIGHT]
    p, _ = nnls(a, b, maxiter=50 * max(n_classes, len(observed)))
    total = p.sum()
    return p / total if total > 0 else np.full(n_classes, 1.0 / n_classes)


def em_priors(posteriors, train_priors: np.ndarray, weights: np.ndarray | None = None, *,
              start: np.ndarray | None = None, tol: float = 1e-6, max_iter: int = 1000) -> np.ndarray:
    """Class priors of a group re-estimated from posteriors calibrated on ``train_priors`` (Saerens et al. 2002):
    reweight each posterior by new prior / old prior, renormalise, take the (weighted) mean; until the priors
    settle. ``start``: the first guess (default the mean posterior)."""
    w = _weights(posteriors.shape[0], weights)
    train = np.clip(np.asarray(train_priors, np.float64), 1e-12, None)
    priors = probabilistic_cc(posteriors, w) if start is None else np.asarray(start, np.float64)
    dense = not sp.issparse(posteriors)
    probs = np.asarray(posteriors, np.float64) if dense else sp.csr_matrix(posteriors, dtype=np.float64)
    for _ in range(max_iter):
        ratio = priors / train
        if dense:
            weighted = probs * ratio
            row_sums = weighted.sum(axis=1)
        else:
            weighted = probs @ sp.diags(ratio)
            row_sums = np.asarray(weighted.sum(axis=1)).ravel()
        scale = w / np.clip(row_sums, 1e-300, None)  # each image's reweighted posterior sums to its weight
        new = np.asarray(scale @ weighted, np.float64).ravel() / max(w.sum(), 1e-300)
        if np.abs(new - priors).max() < tol:
            return new
        priors = new
    return priors


@dataclass(frozen=True)
class Predictions:
    """Some images' predictions over ``n_classes`` classes: the predicted bin of each (a class code, or
    ``n_classes`` for "unknown": below the confidence threshold), their posteriors (n, n_classes; dense or
    sparse) and, for labelled (validation) images, their true class codes."""

    predicted: np.ndarray
    posteriors: object
    true: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.predicted)


def composition(methods: tuple[str, ...], group: Predictions, n_classes: int, validation: Predictions | None = None,
                group_weights: np.ndarray | None = None, validation_weights: np.ndarray | None = None,
                start: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Each method's proportions for ``group``, as (n_classes + 1,) arrays whose last entry is the unknown bin
    (counted by ``cc`` only; NaN for the methods that give low-confidence images back to their classes).
    ``acc``, ``pacc`` and ``em`` need ``validation`` (labelled images of the model's validation split);
    ``start``: EM's first guess per method (a bootstrap round starts from the point estimate)."""
    unknown = np.array([np.nan])
    missing = [m for m in methods if m not in METHODS]
    if missing:
        raise ValueError(f"unknown quantification method(s) {missing}: choose from {', '.join(METHODS)}")
    if validation is None and set(methods) & set(NEEDS_VALIDATION):
        raise ValueError(f"methods {', '.join(m for m in methods if m in NEEDS_VALIDATION)} need validation images")
    out: dict[str, np.ndarray] = {}
    observed = classify_and_count(group.predicted, n_classes + 1, group_weights)
    if "cc" in methods:
        out["cc"] = observed
    if "pcc" in methods:
        out["pcc"] = np.r_[probabilistic_cc(group.posteriors, group_weights), unknown]
    if "acc" in methods:
        rates = confusion_rates(validation.true, validation.predicted, n_classes, n_classes + 1, validation_weights)
        out["acc"] = np.r_[adjusted(observed, rates), unknown]
    if "pacc" in methods:
        rates = posterior_rates(validation.true, validation.posteriors, n_classes, validation_weights)
        out["pacc"] = np.r_[adjusted(probabilistic_cc(group.posteriors, group_weights), rates), unknown]
    if "em" in methods:
        priors = classify_and_count(validation.true, n_classes, validation_weights)
        scaling = _calibration(validation, validation_weights)
        out["em"] = np.r_[em_priors(calibrated(group.posteriors, *scaling), priors, group_weights,
                                    start=None if start is None else start["em"][:-1]), unknown]
    return out


def _log_support(posteriors) -> sp.csr_matrix:
    """The posteriors as a sparse matrix of their non-zero entries (the stored top-k: the support)."""
    m = sp.csr_matrix(posteriors, dtype=np.float64)
    m.eliminate_zeros()
    return m


def _softmax_rows(rows: np.ndarray, n_rows: int, logits: np.ndarray) -> np.ndarray:
    """Softmax of ``logits`` within the runs of entries sharing a row (``rows``: each entry's, sorted)."""
    if not len(rows):
        return logits
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    sizes = np.diff(np.r_[starts, len(rows)])
    e = np.exp(logits - np.repeat(np.maximum.reduceat(logits, starts), sizes))
    return e / np.repeat(np.add.reduceat(e, starts), sizes)


_CALIBRATIONS: dict = {}  # weights digest -> fit, for one validation set: a bootstrap round's fit serves every group


def _calibration(validation: Predictions, weights: np.ndarray | None) -> tuple[float, np.ndarray]:
    if _CALIBRATIONS.get("validation") is not validation:  # only the latest validation set is held
        _CALIBRATIONS.clear()
        _CALIBRATIONS["validation"] = validation
    key = None if weights is None else hashlib.blake2b(np.ascontiguousarray(weights)).digest()
    if key not in _CALIBRATIONS:
        _CALIBRATIONS[key] = fit_calibration(validation.true, validation.posteriors, weights)
    return _CALIBRATIONS[key]


def fit_calibration(true: np.ndarray, posteriors, weights: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """Bias-corrected temperature scaling fitted on labelled images: ``(1/T, b)`` minimising the (weighted)
    negative log likelihood of ``softmax(log p / T + b)`` over each image's support. Images whose true class
    lies outside their support (beyond the stored top-k) cannot be scored and are left out."""
    m = _log_support(posteriors)
    true = np.asarray(true, np.int64)
    w = _weights(m.shape[0], weights)
    rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
    is_true = m.indices == true[rows]
    scored = np.bincount(rows, weights=is_true, minlength=m.shape[0]) > 0
    keep = scored[rows]
    log_p, cols, rows, is_true = np.log(m.data[keep]), m.indices[keep], rows[keep], is_true[keep]
    n_classes = m.shape[1]
    if not keep.any():
        return 1.0, np.zeros(n_classes)

    def nll(theta: np.ndarray) -> tuple[float, np.ndarray]:
        logits = theta[0] * log_p + theta[1:][cols]
        q = _softmax_rows(rows, m.shape[0], logits)
        wq = w[rows] * (q - is_true)
        loss = -float((w[rows] * is_true * np.log(np.clip(q, 1e-300, None))).sum())
        return loss, np.r_[(wq * log_p).sum(), np.bincount(cols, weights=wq, minlength=n_classes)]

    from scipy.optimize import minimize

    theta = minimize(nll, np.r_[1.0, np.zeros(n_classes)], jac=True, method="L-BFGS-B",
                     bounds=[(1e-3, None)] + [(None, None)] * n_classes).x
    return float(theta[0]), theta[1:] - theta[1:].mean()


def calibrated(posteriors, inverse_temperature: float, bias: np.ndarray) -> sp.csr_matrix:
    """``softmax(log p / T + b)`` over each image's support (sparse, rows summing to 1)."""
    m = _log_support(posteriors)
    if not m.nnz:
        return m
    rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
    m.data = _softmax_rows(rows, m.shape[0], inverse_temperature * np.log(m.data) + bias[m.indices])
    return m


def bootstrap_draws(methods: tuple[str, ...], group: Predictions, n_classes: int,
                    validation: Predictions | None = None, *, rounds: int = 100, seed: int = 0,
                    point: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """``composition`` per method over ``rounds`` Poisson-bootstrap rounds that resample the group's images and the
    validation images behind the rates, as (rounds, n_classes + 1) arrays; ``point``: the estimates without
    resampling when the caller has them (EM starts each round there)."""
    point = point or composition(methods, group, n_classes, validation)
    seeds = np.random.SeedSequence(seed).spawn(2)
    rng_group, rng_val = (np.random.default_rng(s) for s in seeds)
    draws: dict[str, list] = {m: [] for m in methods}
    for _ in range(rounds):
        gw = rng_group.poisson(1.0, len(group)).astype(np.float64)
        vw = None if validation is None else rng_val.poisson(1.0, len(validation)).astype(np.float64)
        for m, p in composition(methods, group, n_classes, validation, gw, vw, start=point).items():
            draws[m].append(p)
    return {m: np.array(d).reshape(rounds, n_classes + 1) for m, d in draws.items()}


def bootstrap(methods: tuple[str, ...], group: Predictions, n_classes: int, validation: Predictions | None = None,
              *, rounds: int = 100, level: float = 0.9, seed: int = 0, point: dict[str, np.ndarray] | None = None
              ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Percentile intervals (low, high) per method of ``bootstrap_draws``."""
    draws = bootstrap_draws(methods, group, n_classes, validation, rounds=rounds, seed=seed, point=point)
    return {m: interval(d, level) for m, d in draws.items()}


def rolled_up(proportions: np.ndarray, class_taxon: np.ndarray, n_taxa: int) -> np.ndarray:
    """Proportions over classes (last axis; one more entry for the unknown bin, NaN where a method has none)
    summed into their taxa at a coarser rank (``class_taxon``: each class's taxon index), unknown kept last: so
    that every rank adds up to the same estimate."""
    p = np.asarray(proportions, np.float64)
    taxa = np.zeros((*p.shape[:-1], n_taxa))
    for c, t in enumerate(class_taxon):
        taxa[..., t] += p[..., c]
    return np.concatenate([taxa, p[..., -1:]], axis=-1)


def interval(draws: np.ndarray, level: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval (low, high) per class of bootstrap estimates ``draws`` (rounds, classes); NaN where
    the draws are (a method's unknown bin)."""
    draws = np.asarray(draws, np.float64)
    tail = (1 - level) / 2 * 100
    low, high = np.full(draws.shape[1], np.nan), np.full(draws.shape[1], np.nan)
    has = ~np.isnan(draws).any(axis=0)
    low[has], high[has] = np.percentile(draws[:, has], [tail, 100 - tail], axis=0)
    return low, high


SUMMABLE = ("pcc", "acc", "pacc")  # corrections whose group statistics are sums over images: per-cell tables


def summed_rates(method: str, validation: Predictions | None, n_classes: int) -> np.ndarray:
    """The validation rates a ``SUMMABLE`` method adjusts by (identity for ``pcc``, which needs no validation)."""
    if method == "acc":
        return confusion_rates(validation.true, validation.predicted, n_classes, n_classes + 1)
    if method == "pacc":
        return posterior_rates(validation.true, validation.posteriors, n_classes)
    if method == "pcc":
        return np.eye(n_classes)
    raise ValueError(f"{method!r} is not computed from sums: choose from {', '.join(SUMMABLE)}")


def composition_of_sums(method: str, bin_counts: np.ndarray, posterior_sums: np.ndarray, rates: np.ndarray
                        ) -> np.ndarray:
    """``composition``'s estimate for ``method`` (a ``SUMMABLE`` one, without the unknown bin) from a group's
    sums: images per predicted bin (n_classes + 1, the last the unknown bin) and summed posteriors (n_classes),
    so that groups can be gathered as small per-shard tables."""
    n = float(np.sum(bin_counts))
    if method == "acc":
        return adjusted(np.asarray(bin_counts, np.float64) / n, rates)
    mean = np.asarray(posterior_sums, np.float64) / n
    return mean if method == "pcc" else adjusted(mean, rates)


def absolute_error(estimated: np.ndarray, true: np.ndarray) -> float:
    """Mean absolute difference of two compositions over the classes."""
    return float(np.abs(np.asarray(estimated, np.float64) - np.asarray(true, np.float64)).mean())


def bray_curtis(a: np.ndarray, b: np.ndarray) -> float:
    """Bray-Curtis dissimilarity of two compositions (counts or proportions): sum |a - b| / sum (a + b)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    total = (a + b).sum()
    return float(np.abs(a - b).sum() / total) if total > 0 else 0.0


# ---------------------------------------------------------------- a catalog's predictions, gathered per shard


def taxa_of(classes: list[str], rank: str | None) -> tuple[list[str], np.ndarray]:
    """The taxa estimated at ``rank`` (None: the model's own classes) and each class's taxon index."""
    if rank is None:
        return list(classes), np.arange(len(classes))
    if rank not in RANKS:
        raise InputError(f"rank {rank!r}: choose one of {', '.join(RANKS)}")
    return rank_groups(list(classes))[rank]


def _truncated(labels: np.ndarray, rank: str | None) -> np.ndarray:
    if rank is None:
        return labels
    depth = RANKS.index(rank) + 1
    return np.array([" ".join(t.split()[:depth]) for t in labels], dtype=object)


def shard_predictions(cat: Catalog, start: int, stop: int, model: str, classes: list[str], rank: str | None,
                       by: str | None, extra: tuple[str, ...], with_truth: bool) -> dict[str, np.ndarray]:
    taxa, class_taxon = taxa_of(classes, rank)
    code = {t: i for i, t in enumerate(taxa)}
    class_code = {c: int(class_taxon[i]) for i, c in enumerate(classes)}
    label, prob = prediction_name(model, rank or "label"), prediction_name(model, f"{rank}_prob" if rank else "prob")
    topk_label, topk_prob = prediction_name(model, "topk_label"), prediction_name(model, "topk_prob")
    names = {label, prob, topk_label, topk_prob, "status", *extra, *([by] if by else []),
             *((SPLIT, *TARGET_COLUMNS) if with_truth else ())}
    cols = cat.read(start, stop, sorted(names))
    keep = (cols["status"] == STATUS_OK) & (cols[label] != "")
    out = {"row": np.flatnonzero(keep) + start,
           "predicted": np.array([code.get(t, -1) for t in cols[label][keep]], np.int32),
           "prob": cols[prob][keep].astype(np.float32),
           "topk": np.vectorize(lambda c: class_code.get(c, -1), otypes=[np.int32])(cols[topk_label][keep])
           if keep.any() else np.zeros((0, cols[topk_label].shape[1]), np.int32),
           "topk_prob": cols[topk_prob][keep].astype(np.float32)}
    if by:
        out["group"] = cols[by][keep]
    for name in extra:
        out[name] = cols[name][keep]
    if with_truth:
        truth = _truncated(targets(cols)[keep], rank)
        out["true"] = np.array([code.get(t, -1) for t in truth], np.int32)
        out["labelled"] = truth != ""
        out[SPLIT] = cols[SPLIT][keep] if SPLIT in cols else np.full(int(keep.sum()), "", dtype=object)
    return out


def read_predictions(cat: Catalog, model: str, classes: list[str], *, rank: str | None = None, by: str | None = None,
                     extra: tuple[str, ...] = (), with_truth: bool = False, client: Client | None = None
                     ) -> dict[str, np.ndarray]:
    """Model ``model``'s stored predictions of every decoded, classified row, at ``rank``: ``predicted`` (taxon
    codes of ``taxa_of(classes, rank)``), ``prob``, the top-k as taxon codes and probabilities, ``row``, the
    ``by`` variable as ``group``, the ``extra`` variables and, ``with_truth``, ``true`` (the taxon code of the
    row's label, -1 when the label is no taxon of the model's), ``labelled`` and the split."""
    arrays = set(cat.arrays())
    needed = [prediction_name(model, k) for k in ("label", "topk_label", "topk_prob")]
    if rank:
        needed += [prediction_name(model, rank), prediction_name(model, f"{rank}_prob")]
    missing = [n for n in needed if n not in arrays]
    if missing:
        raise CatalogError(f"{cat.url}: no {missing[0]}; run pzscale classify with this model first")
    for name in (by, *extra):
        if name and name not in arrays:
            raise InputError(f"{cat.url}: no variable {name!r} to group or read by")
    parts = map_shards(shard_predictions, cat, model, list(classes), rank, by, tuple(extra), with_truth,
                       client=client)
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]} if parts else {}


def posteriors_of(topk: np.ndarray, topk_prob: np.ndarray, n_taxa: int) -> sp.csr_matrix:
    """Sparse (n, n_taxa) posteriors from the stored top-k (classes of one taxon summed), renormalised over the
    top-k: exact where the top-k hold all the probability, an approximation of the tail otherwise."""
    n, k = topk.shape
    valid = topk >= 0
    rows = np.repeat(np.arange(n), k).reshape(n, k)[valid]
    matrix = sp.csr_matrix((topk_prob[valid].astype(np.float64), (rows, topk[valid])), shape=(n, n_taxa))
    matrix.sum_duplicates()
    totals = np.asarray(matrix.sum(axis=1)).ravel()
    return sp.diags(np.divide(1.0, totals, out=np.zeros(n), where=totals > 0)) @ matrix


def predictions_of(data: dict[str, np.ndarray], n_taxa: int, min_prob: float, rows: np.ndarray | None = None
                   ) -> Predictions:
    """``Predictions`` of the selected rows of ``read_predictions``'s output: predictions below ``min_prob`` (or
    of no taxon of the model's) in the unknown bin (code ``n_taxa``)."""
    pick = slice(None) if rows is None else rows
    predicted = data["predicted"][pick].astype(np.int64)
    predicted = np.where((predicted < 0) | (data["prob"][pick] < min_prob), n_taxa, predicted)
    return Predictions(predicted, posteriors_of(data["topk"][pick], data["topk_prob"][pick], n_taxa),
                       data["true"][pick].astype(np.int64) if "true" in data else None)


def validation_predictions(where: str | Catalog, model: str, classes: list[str], rank: str | None, split: str,
                           methods: tuple[str, ...], min_prob: float, storage_options: dict | None = None,
                           client: Client | None = None) -> Predictions:
    """The labelled images of the model's validation split (split ``split`` of catalog ``where``), for
    ``methods`` (named in the error when there are none)."""
    cat = where if isinstance(where, Catalog) else Catalog.open(where, storage_options)
    if SPLIT not in cat.arrays():
        raise CatalogError(f"{cat.url}: no {SPLIT} variable, so no validation images for "
                           f"{', '.join(m for m in methods if m in NEEDS_VALIDATION)}; run pzscale split, give the "
                           "catalog the model was validated on, or use methods cc,pcc")
    data = read_predictions(cat, model, classes, rank=rank, with_truth=True, client=client)
    rows = np.flatnonzero((data[SPLIT] == split) & (data["true"] >= 0)) if data else np.zeros(0, np.int64)
    if not len(rows):
        raise CatalogError(f"{cat.url}: no labelled image of split {split!r} with a taxon of the model and a "
                           f"prediction: nothing to learn the model's errors from")
    return predictions_of(data, len(taxa_of(classes, rank)[0]), min_prob, rows)


def _time_bins(values: np.ndarray, freq: str) -> np.ndarray:
    """The start of each time's bin: bins of ``freq`` (anchored ones such as MS or YS included) from the first
    time's day rolled back onto it; NaT stays NaT."""
    try:
        offset = pd.tseries.frequencies.to_offset(freq)
    except ValueError as e:
        raise InputError(f"time bin {freq!r} is not a pandas frequency (1D, 7D, MS, YS ...): {e}") from None
    times = pd.DatetimeIndex(values)
    known = times[~times.isna()]
    if not len(known):
        return values
    edges = pd.date_range(offset.rollback(known.min().normalize()), known.max() + offset, freq=offset)
    index = np.clip(edges.searchsorted(times, side="right") - 1, 0, len(edges) - 1)
    return np.where(times.isna(), np.datetime64("NaT"), edges.to_numpy()[index])


def group_keys(by: str, values: np.ndarray, bin_by: str | float | None = None) -> np.ndarray:
    """Group keys of variable ``by``'s values: as they are, or binned (``bin_by``: a pandas frequency such as
    ``1D`` or ``MS`` for times, a width for numbers: the lower edge of each bin). ``time`` (int64 milliseconds in
    the catalog) is grouped as datetimes, a missing time as NaT."""
    values = np.asarray(values)
    if by == "time":
        values = np.where(values == TIME_FILL, np.datetime64("NaT"), values.astype("datetime64[ms]"))
    if bin_by is None:
        return values
    if values.dtype.kind == "M":
        return _time_bins(values, str(bin_by))
    if values.dtype.kind in "iuf":
        width = float(bin_by)
        if width <= 0:
            raise InputError(f"bin width {bin_by!r}: must be positive")
        return np.floor(values / width) * width
    raise InputError(f"values of dtype {values.dtype} cannot be binned; group by them as they are")


def group_rows(keys: np.ndarray) -> dict:
    """Row indices of each group, in the order of the group keys; rows without a key (NaN, NaT) in no group."""
    codes, uniques = pd.factorize(pd.Series(keys), sort=True)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(uniques) + 1))
    return {uniques[i]: order[bounds[i]:bounds[i + 1]] for i in range(len(uniques))}


# ---------------------------------------------------------------- sample volumes and their QC

OUTLIER_Z = 3.5  # modified z-score (Iglewicz and Hoaglin 1993) of log volume beyond which a sample is an outlier
OUTLIER_MIN_SAMPLES = 5  # fewer samples of one source and instrument: no outlier test
OUTLIER_MIN_RATIO = 2.0  # nor closer than this factor to the median (near-equal volumes have a tiny MAD)
VOLUME_FLAG = "volume_implausible"  # a reader's QC flag on a sample's volume (an IFCB header that cannot be right)


def sample_volumes(sample: np.ndarray, volume_ml: np.ndarray, qc: np.ndarray, source: np.ndarray,
                   instrument: np.ndarray) -> pd.DataFrame:
    """One row per sample (index: the sample): ``volume_ml``, and ``volume_qc``: ``ok``, ``implausible`` (a reader
    flagged it), ``outlier`` (its log volume lies over ``OUTLIER_Z`` robust z-scores, and over a factor
    ``OUTLIER_MIN_RATIO``, from the median of its source and instrument: a volume ~10x off, pyifcb#70) or
    ``unknown`` (no volume). Images without a sample are left out: their volume cannot be counted once per
    sample."""
    frame = pd.DataFrame({"sample": sample, "volume_ml": np.asarray(volume_ml, np.float64),
                          "flagged": [VOLUME_FLAG in str(q).split(";") for q in qc], "source": source,
                          "instrument": instrument})
    frame = frame[frame["sample"] != ""]
    per = frame.groupby("sample", sort=True).agg(volume_ml=("volume_ml", "first"), flagged=("flagged", "any"),
                                                 source=("source", "first"), instrument=("instrument", "first"))
    per["volume_qc"] = np.where(~np.isfinite(per["volume_ml"]) | (per["volume_ml"] <= 0), "unknown",
                                np.where(per["flagged"], "implausible", "ok"))
    for _, members in per[per["volume_qc"] == "ok"].groupby(["source", "instrument"]):
        if len(members) < OUTLIER_MIN_SAMPLES:
            continue
        logs = np.log(members["volume_ml"].to_numpy())
        mad = np.median(np.abs(logs - np.median(logs)))
        z = 0.6745 * (logs - np.median(logs)) / mad if mad > 0 else np.zeros(len(logs))
        far = np.abs(logs - np.median(logs)) > np.log(OUTLIER_MIN_RATIO)
        per.loc[members.index[(np.abs(z) > OUTLIER_Z) & far], "volume_qc"] = "outlier"
    return per[["volume_ml", "volume_qc"]]
