"""Quantification under prior shift: a classifier of known behaviour (three overlapping Gaussian classes, exact
posteriors), validated on equal priors and applied to a group whose mix is shifted."""

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.spatial.distance import braycurtis

from pzscale.ml import quantification as q

MEANS = np.array([0.0, 1.5, 3.0])  # one feature, unit variance: neighbouring classes overlap (~23% confused)


def draw(priors, n, rng, min_prob=0.0) -> q.Predictions:
    true = rng.choice(len(priors), n, p=priors)
    x = rng.normal(MEANS[true], 1.0)
    likelihood = np.exp(-0.5 * (x[:, None] - MEANS[None, :]) ** 2)
    posteriors = likelihood / likelihood.sum(1, keepdims=True)  # calibrated for equal priors
    predicted = np.where(posteriors.max(1) >= min_prob, posteriors.argmax(1), 3)  # 3: unknown
    return q.Predictions(predicted, posteriors, true)


def truth_of(group: q.Predictions) -> np.ndarray:
    return np.bincount(group.true, minlength=3) / len(group)


@pytest.fixture(scope="module")
def shifted():
    rng = np.random.default_rng(1)
    return draw([1 / 3] * 3, 30_000, rng), draw([0.7, 0.2, 0.1], 20_000, rng)


def test_corrected_methods_recover_a_shifted_mix_that_counting_misses(shifted):
    validation, group = shifted
    truth = truth_of(group)
    found = q.composition(q.METHODS, group, 3, validation)
    errors = {m: q.absolute_error(p[:3], truth) for m, p in found.items()}
    for m, p in found.items():
        assert p[:3].min() >= 0 and np.nansum(p) == pytest.approx(1), m
    # counting pulls the mix towards the validation priors: the rare class is over-counted
    assert errors["cc"] > 0.05 and errors["pcc"] > 0.05 and found["cc"][2] > truth[2] + 0.03
    for method in ("acc", "pacc", "em"):  # sampling error only: ~0.01 at 20,000 images on these overlaps
        assert errors[method] < 0.02, (method, found[method], truth)


def test_an_unknown_bin_is_counted_by_cc_and_given_back_by_acc():
    rng = np.random.default_rng(3)
    validation, group = draw([1 / 3] * 3, 30_000, rng, 0.6), draw([0.7, 0.2, 0.1], 20_000, rng, 0.6)
    found = q.composition(("cc", "acc", "pcc"), group, 3, validation)
    assert found["cc"][3] > 0.2  # a fifth or more of the images fall below 0.6
    assert np.isnan(found["acc"][3]) and np.isnan(found["pcc"][3])
    assert q.absolute_error(found["acc"][:3], truth_of(group)) < 0.02


def test_without_shift_every_method_agrees_with_the_truth():
    rng = np.random.default_rng(2)
    validation, group = draw([1 / 3] * 3, 30_000, rng), draw([1 / 3] * 3, 30_000, rng)
    for method, p in q.composition(q.METHODS, group, 3, validation).items():
        assert q.absolute_error(p[:3], truth_of(group)) < 0.01, method


def test_sparse_posteriors_give_what_dense_ones_give(shifted):
    validation, group = shifted
    sparse = [q.Predictions(p.predicted, sp.csr_matrix(p.posteriors), p.true) for p in (validation, group)]
    weights = np.random.default_rng(0).poisson(1.0, len(group)).astype(float)
    dense = q.composition(q.METHODS, group, 3, validation, weights)
    for method, p in q.composition(q.METHODS, sparse[1], 3, sparse[0], weights).items():
        np.testing.assert_allclose(p, dense[method], atol=1e-9, err_msg=method)


def test_adjusted_inverts_a_known_confusion_exactly():
    rates = np.array([[0.8, 0.2, 0.0], [0.1, 0.7, 0.2], [0.0, 0.3, 0.7]])
    truth = np.array([0.5, 0.3, 0.2])
    np.testing.assert_allclose(q.adjusted(rates.T @ truth, rates), truth, atol=1e-6)
    # an observation no mix can give (all predicted as class 2, which class 2 reaches 70% at most): the
    # closest mix on the simplex, all class 2, never negative proportions
    p = q.adjusted(np.array([0.0, 0.0, 1.0]), rates)
    assert p.min() >= 0 and p.sum() == pytest.approx(1) and p.argmax() == 2


def test_rates_of_classes_without_validation_images_are_the_identity():
    rates = q.confusion_rates(np.array([0, 0, 1]), np.array([0, 1, 1]), 3)
    np.testing.assert_allclose(rates, [[0.5, 0.5, 0], [0, 1, 0], [0, 0, 1]])
    post = q.posterior_rates(np.array([0, 0]), np.array([[0.6, 0.4, 0], [0.8, 0.2, 0]]), 3)
    np.testing.assert_allclose(post, [[0.7, 0.3, 0], [0, 1, 0], [0, 0, 1]])


def test_em_returns_the_validation_priors_when_nothing_shifted():
    posteriors = np.array([[0.9, 0.1], [0.1, 0.9]])
    np.testing.assert_allclose(q.em_priors(posteriors, np.array([0.5, 0.5])), [0.5, 0.5], atol=1e-6)


def test_bootstrap_intervals_hold_the_truth_and_narrow_with_more_images(shifted):
    validation, group = shifted
    truth = truth_of(group)
    wide = q.bootstrap(q.METHODS, group, 3, validation, rounds=100, level=0.99)
    for method in ("acc", "pacc", "em"):
        low, high = wide[method]
        assert (low[:3] <= truth).all() and (truth <= high[:3]).all(), method
        assert (high[:3] - low[:3]).max() < 0.08  # 99%: the adjusted methods invert look-alikes, which widens it
    assert np.isnan(wide["acc"][0][3]) and not np.isnan(wide["cc"][0][3])
    few = q.Predictions(group.predicted[:500], group.posteriors[:500], group.true[:500])
    narrow_low, narrow_high = wide["pacc"]
    few_low, few_high = q.bootstrap(("pacc",), few, 3, validation, rounds=100, level=0.99)["pacc"]
    assert ((few_high - few_low)[:3] > (narrow_high - narrow_low)[:3]).all()
    again = q.bootstrap(q.METHODS, group, 3, validation, rounds=100, level=0.99)
    for method in q.METHODS:  # seeded: the same intervals every run
        np.testing.assert_array_equal(again[method][0], wide[method][0])


def test_scores_match_scipy_and_unknown_methods_are_named(shifted):
    a, b = np.array([10.0, 0.0, 5.0]), np.array([4.0, 6.0, 5.0])
    assert q.bray_curtis(a, b) == pytest.approx(braycurtis(a, b))
    assert q.absolute_error([0.5, 0.5], [0.7, 0.3]) == pytest.approx(0.2)
    with pytest.raises(ValueError, match=r"unknown quantification method\(s\) \['hdy'\]"):
        q.composition(("hdy",), shifted[1], 3)
    with pytest.raises(ValueError, match="acc need validation images"):
        q.composition(("cc", "acc"), shifted[1], 3)


def test_sample_volumes_flag_readers_word_and_robust_outliers_per_source():
    samples = np.array(["a", "a", "b", "c", "d", "e", "f", "g", "", "h"])
    volume = np.array([5.0, 5.0, 5.2, 4.9, 50.0, 5.1, 4.8, 2.6, 3.0, np.nan])
    qc = np.array(["", "", "volume_implausible", "", "", "", "", "", "", ""])
    source = np.array(["cruise"] * 8 + ["x", "cruise"])
    found = q.sample_volumes(samples, volume, qc, source, np.array(["IFCB"] * 10))
    assert "" not in found.index and found.loc["a", "volume_ml"] == 5.0
    assert found["volume_qc"].to_dict() == {"a": "ok", "b": "implausible", "c": "ok", "d": "outlier", "e": "ok",
                                            "f": "ok", "g": "ok", "h": "unknown"}  # g: half the median, not 10x


def test_composition_from_a_groups_sums_is_the_composition_of_its_images(shifted):
    """The per-cell path of abundance --correct: the same estimate from summed bins and posteriors."""
    validation, group = shifted
    found = q.composition(q.SUMMABLE, group, 3, validation)
    bins = np.bincount(group.predicted, minlength=4).astype(float)
    sums = np.asarray(group.posteriors).sum(axis=0)
    for method in q.SUMMABLE:
        rates = q.summed_rates(method, validation if method != "pcc" else None, 3)
        np.testing.assert_allclose(q.composition_of_sums(method, bins, sums, rates), found[method][:3], atol=1e-9)
    with pytest.raises(ValueError, match="not computed from sums"):
        q.summed_rates("em", validation, 3)


def test_calibration_undoes_an_overconfident_temperature_and_helps_em(shifted):
    """Posteriors sharpened to the power 3 (a network too sure of itself): the fit finds 1/T near 1/3 and no bias,
    calibrated posteriors are those softmax gives, and EM on them finds the shifted mix that it misses without."""
    validation, group = shifted

    def sharpened(p):
        p = np.asarray(p) ** 3
        return p / p.sum(1, keepdims=True)

    sharp_val = q.Predictions(validation.predicted, sharpened(validation.posteriors), validation.true)
    sharp_group = q.Predictions(group.predicted, sharpened(group.posteriors), group.true)
    inverse_t, bias = q.fit_calibration(sharp_val.true, sharp_val.posteriors)
    assert inverse_t == pytest.approx(1 / 3, rel=0.05) and np.abs(bias).max() < 0.05
    logits = inverse_t * np.log(sharp_group.posteriors) + bias
    expected = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(q.calibrated(sharp_group.posteriors, inverse_t, bias).toarray(),
                               expected / expected.sum(1, keepdims=True), rtol=1e-9)
    truth = truth_of(group)
    priors = q.classify_and_count(sharp_val.true, 3)
    raw = q.absolute_error(q.em_priors(sp.csr_matrix(sharp_group.posteriors), priors), truth)
    fixed = q.composition(("em",), sharp_group, 3, sharp_val)["em"][:3]
    assert q.absolute_error(fixed, truth) < 0.02 < raw


def test_each_method_on_a_case_worked_by_hand():
    """Two classes. Validation: class 0 called 0,0,0,1 and class 1 called 1,1,1,0 (rates 0.75/0.25), mean
    posteriors 0.7/0.3 per true class. The group: called 0,0,0,1 with posteriors 0.8, 0.8, 0.6, 0.4 for class 0.
    cc = 3/4; pcc = mean posterior 0.65; acc solves 0.75 p + 0.25 (1 - p) = 0.75: p = 1; pacc solves
    0.7 p + 0.3 (1 - p) = 0.65: p = 0.875; em's fixed point is the maximum of the group's likelihood
    sum_i log(sum_c p_ic pi_c / 0.5), found here by a bounded scalar search."""
    from scipy.optimize import minimize_scalar

    val_post = np.array([[0.9, 0.1], [0.7, 0.3], [0.7, 0.3], [0.5, 0.5], [0.3, 0.7], [0.3, 0.7], [0.1, 0.9],
                         [0.5, 0.5]])
    validation = q.Predictions(np.array([0, 0, 0, 1, 1, 1, 1, 0]), val_post, np.array([0, 0, 0, 0, 1, 1, 1, 1]))
    post = np.array([[0.8, 0.2], [0.8, 0.2], [0.6, 0.4], [0.4, 0.6]])
    group = q.Predictions(np.array([0, 0, 0, 1]), post)
    found = q.composition(("cc", "pcc", "acc", "pacc"), group, 2, validation)
    np.testing.assert_allclose(found["cc"], [0.75, 0.25, 0.0])
    np.testing.assert_allclose(found["pcc"][:2], [0.65, 0.35])
    np.testing.assert_allclose(found["acc"][:2], [1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(found["pacc"][:2], [0.875, 0.125], atol=1e-6)
    best = minimize_scalar(lambda p: -np.log(post @ np.array([p, 1 - p]) / 0.5).sum(), bounds=(0, 1),
                           method="bounded", options={"xatol": 1e-9}).x
    np.testing.assert_allclose(q.em_priors(post, np.array([0.5, 0.5]), tol=1e-10), [best, 1 - best], atol=1e-5)
