import math

import numpy as np
import pytest
import torch

from hf_vattr import metrics as M


# --------------------------------------------------------------------------- LDS


def test_lds_perfect_monotone_is_one_and_reversed_is_minus_one():
    scores = np.array([0.5, 1.0, 2.0, 4.0])
    masks = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=bool)
    pred = masks @ scores  # 0.5, 1, 1.5, 2, 6
    assert M.lds(scores, masks, np.exp(pred)) == pytest.approx(1.0)  # monotone, not linear
    assert M.lds(scores, masks, -pred**3) == pytest.approx(-1.0)


def test_lds_three_subset_hand_example():
    # predicted subset effects: [1, 5, 3] -> ranks [1, 3, 2]; actual ranks [2, 1, 3]
    # d = [-1, 2, -1], sum d^2 = 6, rho = 1 - 6*6 / (3*8) = -0.5
    scores = [1.0, 2.0, 3.0]
    masks = [[True, False, False], [False, True, True], [True, True, False]]
    np.testing.assert_allclose(M.subset_predictions(scores, masks), [1.0, 5.0, 3.0])
    assert M.lds(scores, masks, [0.5, 0.2, 0.9]) == pytest.approx(-0.5)


def test_lds_mask_convention_true_means_ablated():
    # Only region 0 matters; subsets that ablate it have the big drop.
    scores = [1.0, 0.1]
    masks = [[True, False], [False, True], [False, False]]
    assert M.lds(scores, masks, [2.0, 0.1, 0.0]) == pytest.approx(1.0)
    # The complementary (keep-mask) reading ranks exactly the other way.
    assert M.lds(scores, ~np.array(masks), [2.0, 0.1, 0.0]) == pytest.approx(-1.0)


def test_lds_constant_prediction_or_effect_is_nan():
    masks = [[1, 0], [0, 1], [1, 0]]
    assert math.isnan(M.lds([1.0, 1.0], masks, [0.1, 0.2, 0.3]))
    assert math.isnan(M.lds([1.0, 2.0], masks, [0.3, 0.3, 0.3]))


def test_lds_validation_errors():
    with pytest.raises(ValueError, match="columns"):
        M.lds([1.0, 2.0, 3.0], [[1, 0], [0, 1]], [1.0, 2.0])
    with pytest.raises(ValueError, match="one measured effect per mask row"):
        M.lds([1.0, 2.0], [[1, 0], [0, 1]], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="NaN"):
        M.lds([1.0, float("nan")], [[1, 0], [0, 1]], [1.0, 2.0])
    with pytest.raises(ValueError, match="NaN"):
        M.lds([1.0, 2.0], [[1, 0], [0, 1]], [1.0, float("nan")])
    with pytest.raises(ValueError, match="boolean"):
        M.lds([1.0, 2.0], [[2, 0], [0, 1]], [1.0, 2.0])
    with pytest.raises(ValueError, match="empty"):
        M.lds([], np.zeros((2, 0), bool), [1.0, 2.0])
    with pytest.raises(ValueError, match="M=0"):
        M.lds([1.0, 2.0], np.zeros((0, 2), bool), [])
    with pytest.raises(ValueError, match="2-D"):
        M.lds([1.0, 2.0], [1, 0], [1.0])


def test_lds_accepts_torch_tensors_with_grad():
    scores = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    masks = torch.tensor([[True, False, False], [False, True, True], [True, True, False]])
    actual = torch.tensor([0.5, 0.2, 0.9], dtype=torch.bfloat16)
    assert M.lds(scores, masks, actual) == pytest.approx(-0.5)


# --------------------------------------------------------------------------- top-k


def test_topk_regions_order_and_ties():
    np.testing.assert_array_equal(M.topk_regions([0.1, 0.5, 0.5, 0.2], 2), [1, 2])
    np.testing.assert_array_equal(M.topk_regions([0.1, 0.5, 0.5, 0.2], 3), [1, 2, 3])
    np.testing.assert_array_equal(M.topk_regions([0.3, 0.3, 0.3], 1), [0])
    np.testing.assert_array_equal(M.topk_regions([0.0, 0.3, 0.3, 0.9], 2), [3, 1])
    many = np.tile([0.2, 0.7, 0.1, 0.7], 25)  # 50 tied 0.7s at odd indices
    np.testing.assert_array_equal(M.topk_regions(many, 4), [1, 3, 5, 7])


def test_topk_drop_calls_ablation_with_expected_mask():
    calls = []

    def ablate(mask):
        calls.append(mask)
        return 1.25

    assert M.topk_drop([0.1, 0.9, -0.4, 0.5, 0.5], ablate, k=2) == 1.25
    assert len(calls) == 1
    assert calls[0].dtype == bool
    np.testing.assert_array_equal(calls[0], [False, True, False, True, False])


def test_topk_drop_against_table():
    masks = [[1, 0, 0], [0, 1, 0], [0, 1, 1], [1, 1, 0]]
    ablate = M.ablation_from_table(masks, [0.3, 0.7, 1.5, 2.0])
    assert M.topk_drop([0.0, 5.0, 1.0], ablate, 1) == pytest.approx(0.7)
    assert M.topk_drop([0.0, 5.0, 1.0], ablate, 2) == pytest.approx(1.5)
    assert M.topk_drop([2.0, 5.0, 1.0], ablate, 2) == pytest.approx(2.0)
    with pytest.raises(KeyError, match=r"\[0, 1, 2\]"):
        M.topk_drop([2.0, 5.0, 1.0], ablate, 3)


def test_table_duplicates_raise_or_the_later_row_wins():
    masks = [[1, 0, 0], [0, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match="twice"):
        M.ablation_from_table(masks, [0.1, 0.5, 0.3])
    ablate = M.ablation_from_table(masks, [0.1, 0.5, 0.3], duplicates="last")
    assert ablate(np.array([True, False, False])) == 0.3
    assert ablate(np.array([False, True, True])) == 0.5
    with pytest.raises(ValueError, match="duplicates"):
        M.ablation_from_table(masks, [0.1, 0.5, 0.3], duplicates="first")


def test_topk_validation_errors():
    with pytest.raises(ValueError, match="out of range"):
        M.topk_regions([0.1, 0.2], 3)
    with pytest.raises(ValueError, match="out of range"):
        M.topk_drop([0.1, 0.2], lambda m: 0.0, 0)
    with pytest.raises(ValueError, match="integer"):
        M.topk_regions([0.1, 0.2], 1.5)
    with pytest.raises(ValueError, match="one number"):
        M.topk_drop([0.1, 0.2], lambda m: [1.0, 2.0], 1)
    with pytest.raises(ValueError, match="finite"):
        M.topk_drop([0.1, 0.2], lambda m: float("nan"), 1)
    with pytest.raises(ValueError, match="one effect per mask"):
        M.ablation_from_table([[1, 0]], [0.1, 0.2])
    with pytest.raises(ValueError, match="twice"):
        M.ablation_from_table([[1, 0], [1, 0]], [0.1, 0.2])


# --------------------------------------------------------------------------- R^2 / Pearson


def test_r2_known_values():
    a = [1.0, 2.0, 3.0]
    assert M.r2_score(a, a) == pytest.approx(1.0)
    assert M.r2_score([2.0, 2.0, 2.0], a) == pytest.approx(0.0)  # predicting the mean
    assert M.r2_score([1.0, 2.0, 4.0], a) == pytest.approx(0.5)  # SS_res 1, SS_tot 2
    # Raw R^2 is scale-sensitive, calibrated R^2 is not.
    assert M.r2_score([2.0, 4.0, 6.0], a) == pytest.approx(-6.0)  # 1 - 14/2
    assert M.calibrated_r2([2.0, 4.0, 6.0], a) == pytest.approx(1.0)
    assert math.isnan(M.r2_score([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]))


def test_pearson_known_values():
    # centered: [-1, 0, 1] and [-1, 1, 0] -> cov 1 / (sqrt2*sqrt2) = 0.5
    assert M.pearson([1.0, 2.0, 3.0], [1.0, 3.0, 2.0]) == pytest.approx(0.5)
    assert M.calibrated_r2([1.0, 2.0, 3.0], [1.0, 3.0, 2.0]) == pytest.approx(0.25)
    assert M.pearson([1.0, 2.0, 3.0], [30.0, 20.0, 10.0]) == pytest.approx(-1.0)
    assert math.isnan(M.pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    assert math.isnan(M.calibrated_r2([1.0, 2.0, 3.0], [0.0, 0.0, 0.0]))


def test_calibrated_r2_matches_least_squares_fit():
    rng = np.random.default_rng(0)
    p = rng.normal(size=20)
    a = 3.0 * p + rng.normal(size=20)
    slope, intercept = np.polyfit(p, a, 1)
    assert M.calibrated_r2(p, a) == pytest.approx(M.r2_score(slope * p + intercept, a))


def test_correlation_validation_errors():
    with pytest.raises(ValueError, match="same length"):
        M.pearson([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="same length"):
        M.r2_score([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="empty"):
        M.pearson([], [])
    with pytest.raises(ValueError, match="NaN"):
        M.r2_score([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(ValueError, match="1-D"):
        M.pearson([[1.0, 2.0]], [[1.0, 2.0]])


def test_summarize_skips_and_counts_undefined_spans():
    vals = [M.pearson([1.0, 2.0, 3.0], [1.0, 3.0, 2.0]), M.pearson([1.0, 2.0], [2.0, 1.0]), M.pearson([1.0, 1.0], [0.0, 1.0])]
    np.testing.assert_allclose(vals, [0.5, -1.0, np.nan])
    s = M.summarize(vals)
    assert s["mean"] == pytest.approx(-0.25)
    assert s["n"] == 2 and s["n_nan"] == 1
    assert s["std"] == pytest.approx(math.sqrt(2 * 0.75**2))
    assert s["sem"] == pytest.approx(s["std"] / math.sqrt(2))
    with pytest.raises(ValueError, match="empty"):
        M.summarize([])
    assert M.summarize([float("nan")])["n"] == 0


def test_pearson_and_r2_match_their_definitions_on_random_data():
    rng = np.random.default_rng(1)
    for _ in range(5):
        p, a = rng.normal(size=17), rng.normal(size=17)
        pc, ac = p - p.mean(), a - a.mean()
        assert M.pearson(p, a) == pytest.approx(pc @ ac / np.sqrt((pc @ pc) * (ac @ ac)), abs=1e-12)
        assert M.r2_score(p, a) == pytest.approx(1 - np.sum((a - p) ** 2) / np.sum(ac**2), abs=1e-12)


# --------------------------------------------------------------------------- glossary


def test_metric_glossary_resolves_the_names_reports_write():
    assert M.metric_label("top3_drop") == "Top-3 drop" and M.metric_label("r2_calibrated") == "R^2 (cal.)"
    assert M.metric_label("unknown") == "unknown" and M.metric_meaning("unknown") == ""
    assert "top-3 regions" in M.metric_meaning("top3_drop")
    assert M.metric_meaning("test_lds") == M.metric_meaning("lds") + "; on the test examples"
    assert M.metric_meaning("lds_sem").startswith("Standard error") and M.metric_meaning("lds") in M.metric_meaning("lds_sem")
    assert M.metric_meaning("val_loss").startswith("Best validation loss")  # its own entry, not "loss" on val
    for name in ("lds", "pearson", "pearson_pooled", "r2", "r2_calibrated", "top1_drop", "top5_drop", "pointing",
                 "num_spans", "split", "val_loss", "time_per_span_ms", "test_pointing", "test_top3_drop",
                 "deletion_auc", "insertion_auc", "r2_q1", "r2_calibrated_q5", "deletion_auc_sem",
                 "insertion_auc_answer", "num_spans_thinking", "top3_drop_answer_n", "test_lds_answer"):
        assert M.metric_meaning(name), name
    assert M.metric_label("r2_q3") == "R^2 Q3" and M.metric_label("r2_calibrated_q2") == "R^2 (cal.) Q2"
    assert M.metric_label("lds_answer") == "LDS (answer)" and M.metric_label("deletion_auc") == "Deletion AUC"
    assert "quintile 3" in M.metric_meaning("r2_q3")
    assert M.metric_meaning("pearson_answer") == M.metric_meaning("pearson") + "; on answer spans only"
    assert "higher is more faithful" in M.metric_meaning("insertion_auc")


# --------------------------------------------------------------------------- deletion / insertion AUC


def additive(effects):
    """An ``ablate`` whose drop is the sum of the ablated regions' effects (a linear model of the span)."""
    e = np.asarray(effects, dtype=float)
    return lambda mask: float(e[mask].sum())


def test_curve_steps_full_and_subsampled():
    np.testing.assert_array_equal(M.curve_steps(4), [0, 1, 2, 3, 4])  # K <= points: every region
    np.testing.assert_array_equal(M.curve_steps(4, None), [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(M.curve_steps(16, 4), [0, 4, 8, 12, 16])
    np.testing.assert_array_equal(M.curve_steps(10, 4), [0, 2, 5, 8, 10])  # round(2.5) = 2, round(7.5) = 8
    with pytest.raises(ValueError, match="points"):
        M.curve_steps(4, 0)


def test_deletion_and_insertion_auc_by_hand_additive():
    # K = 4, effects [3, 1, 0, 0], E = 4. Best order: D = [0, 3, 4, 4, 4] nats at x = 0, .25, .5, .75, 1;
    # trapezoid: .25 * ((0 + 3)/2 + (3 + 4)/2 + 4 + 4) = 3.25. Additive effects: insertion equal.
    ablate = additive([3.0, 1.0, 0.0, 0.0])
    best, worst = [4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]
    assert M.deletion_auc(best, ablate) == pytest.approx(3.25)
    assert M.insertion_auc(best, ablate) == pytest.approx(3.25)
    # Reversed order: D = [0, 0, 0, 1, 4] -> .25 * (0 + 0 + .5 + 2.5) = 0.75
    assert M.deletion_auc(worst, ablate) == pytest.approx(0.75)
    assert M.insertion_auc(worst, ablate) == pytest.approx(0.75)
    x, d = M.deletion_curve(best, ablate)
    np.testing.assert_allclose(x, [0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(d, [0, 3, 4, 4, 4])
    x, i = M.insertion_curve(worst, ablate)  # restore regions 3, 2, 1, 0: recovered 0, 0, 0, 1, 4
    np.testing.assert_allclose(i, [0, 0, 0, 1, 4])


def test_insertion_differs_from_deletion_when_regions_are_redundant():
    # The object is visible in region 0 or region 1: the span loses 2 nats only when both are ablated.
    def ablate(mask):
        return 2.0 if mask[0] and mask[1] else 0.0

    scores = [4.0, 3.0, 2.0, 1.0]
    # deletion: D = [0, 0, 2, 2, 2] -> .25 * (0 + 1 + 2 + 2) = 1.25
    assert M.deletion_auc(scores, ablate) == pytest.approx(1.25)
    # insertion: restoring region 0 alone brings it all back: I = [0, 2, 2, 2, 2] -> .25 * 7 = 1.75
    assert M.insertion_auc(scores, ablate) == pytest.approx(1.75)


def test_auc_subsampled_steps_and_masks():
    calls = []

    def ablate(mask):
        calls.append(mask.copy())
        return float(mask[:2].sum())  # regions 0 and 1 matter, 1 nat each; E = 2

    scores = np.arange(8.0)[::-1]  # order 0, 1, ..., 7
    # steps j = 0, 2, 4, 6, 8 -> D = [0, 2, 2, 2, 2] -> .25 * (1 + 2 + 2 + 2) = 1.75
    assert M.deletion_auc(scores, ablate, points=4) == pytest.approx(1.75)
    assert [int(m.sum()) for m in calls] == [2, 4, 6, 8]  # the empty mask is never measured
    masks = M.insertion_masks(scores, points=4)
    np.testing.assert_array_equal(masks.sum(1), [8, 6, 4, 2, 0])
    np.testing.assert_array_equal(masks[1], [False, False, True, True, True, True, True, True])
    np.testing.assert_array_equal(M.deletion_masks([0.1, 0.5, 0.5], None),
                                  [[0, 0, 0], [0, 1, 0], [0, 1, 1], [1, 1, 1]])  # ties to the lower index


def test_auc_is_nan_without_an_image_effect_and_checks_ablate():
    assert math.isnan(M.deletion_auc([1.0, 2.0], additive([0.0, 0.001])))  # E below MIN_TOTAL_EFFECT
    assert math.isnan(M.insertion_auc([1.0, 2.0], additive([-1.0, 0.5])))  # removing the image helps: E < 0
    assert M.deletion_auc([1.0, 2.0], additive([0.0, 0.001]), min_total=0.0) == pytest.approx(0.00075)
    with pytest.raises(ValueError, match="finite"):
        M.deletion_auc([1.0, 2.0], lambda m: float("nan"))
    with pytest.raises(ValueError, match="increase from 0 to 1"):
        M.curve_auc([0.0, 0.5], [0.0, 1.0], 1.0)


# --------------------------------------------------------------------------- R^2 by length quintile


def test_length_quantile_groups_equal_counts_with_ties():
    lengths = [50, 10, 30, 10, 90, 70, 10, 20, 40, 60]
    g = M.length_quantile_groups(lengths, 5)
    # sorted (ties in input order): 10(1) 10(3) | 10(6) 20(7) | 30(2) 40(8) | 50(0) 60(9) | 70(5) 90(4)
    np.testing.assert_array_equal(g, [3, 0, 2, 0, 4, 4, 1, 1, 2, 3])
    np.testing.assert_array_equal(M.length_quantile_groups([5, 1, 3], 5), [2, 0, 1])  # fewer items than groups
    assert np.bincount(M.length_quantile_groups(np.arange(23), 5)).tolist() == [5, 5, 5, 4, 4]


def test_r2_by_group_matches_sklearn_on_the_split_data():
    from sklearn.metrics import r2_score

    rng = np.random.default_rng(3)
    lengths = rng.integers(20, 2000, size=40)
    group_of_example = M.length_quantile_groups(lengths, 5)
    point_group = np.repeat(group_of_example, 6)  # 6 (span, region) points per example
    actual = rng.normal(size=point_group.size)
    predicted = actual + rng.normal(scale=0.5 + point_group / 2, size=point_group.size)
    raw = M.r2_by_group(predicted, actual, point_group)
    cal = M.r2_by_group(predicted, actual, point_group, calibrated=True)
    assert sorted(raw) == [0, 1, 2, 3, 4]
    order = np.argsort(lengths, kind="stable")
    for q, examples in enumerate(np.array_split(order, 5)):
        sel = np.isin(np.repeat(np.arange(40), 6), examples)
        assert raw[q] == pytest.approx(r2_score(actual[sel], predicted[sel]))
        assert cal[q] == pytest.approx(np.corrcoef(predicted[sel], actual[sel])[0, 1] ** 2)
    assert raw[0] > raw[4]  # the noise grows with the quintile
    assert math.isnan(M.r2_by_group([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [0, 0, 1])[1])  # one point
