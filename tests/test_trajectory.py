import math

import numpy as np
import pytest
import torch

from hf_vattr import trajectory as T


TRIANGLE = np.array([[0.0, 0.0], [3.0, 0.0], [3.0, 4.0]])  # legs 3 and 4, hypotenuse 5


def test_path_length_displacement_tortuosity_on_345_triangle():
    assert T.path_length(TRIANGLE) == pytest.approx(7.0)
    assert T.displacement(TRIANGLE) == pytest.approx(5.0)
    assert T.tortuosity(TRIANGLE) == pytest.approx(1.4)


def test_straight_line_has_tortuosity_one():
    line = np.outer([0.0, 1.0, 2.5, 7.0], [1.0, -2.0, 0.5])
    assert T.tortuosity(line) == pytest.approx(1.0)
    assert T.path_length(line) == pytest.approx(T.displacement(line))


def test_tortuosity_edge_cases():
    assert math.isinf(T.tortuosity([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]))  # closed loop
    assert math.isnan(T.tortuosity([[1.0, 1.0], [1.0, 1.0]]))  # never moved
    assert math.isnan(T.tortuosity([[1.0, 2.0]]))  # single step
    assert T.path_length([[1.0, 2.0]]) == 0.0
    assert T.displacement([[1.0, 2.0]]) == 0.0


def test_concentration_entropy_and_gini():
    assert T.concentration([0.0, 3.0, 0.0, 0.0]) == pytest.approx(1.0)
    assert T.concentration([2.0, 2.0, 2.0, 2.0]) == pytest.approx(0.0)
    assert T.concentration([2.0, -5.0, 0.0, 0.0]) == pytest.approx(1.0)  # negatives clipped
    assert T.concentration([1.0, 1.0, 0.0, 0.0]) == pytest.approx(0.5)  # 1 - log2/log4
    assert T.concentration([10.0, 10.0, 0.0, 0.0]) == pytest.approx(0.5)  # scale-free
    assert T.concentration([0.0, 3.0, 0.0], "gini") == pytest.approx(1.0)
    assert T.concentration([1.0, 1.0, 1.0], "gini") == pytest.approx(0.0)
    # sorted p [0, 0, .5, .5], weights [-3, -1, 1, 3] -> 2/4 = 0.5, rescaled 4/3 -> 2/3
    assert T.concentration([1.0, 1.0, 0.0, 0.0], "gini") == pytest.approx(2.0 / 3.0)
    assert math.isnan(T.concentration([0.0, -1.0, 0.0]))  # no positive evidence
    assert T.concentration([0.7]) == 1.0


def test_concentration_validation():
    with pytest.raises(ValueError, match="1-D"):
        T.concentration([[1.0, 2.0]])
    with pytest.raises(ValueError, match="1-D"):
        T.concentration([])
    with pytest.raises(ValueError, match="NaN"):
        T.concentration([1.0, float("nan")])
    with pytest.raises(ValueError, match="unknown method"):
        T.concentration([1.0, 2.0], "softmax")


def test_concentration_curve_bins_by_progress():
    one_hot, uniform = [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]
    traj = np.array([one_hot, one_hot, uniform, uniform])
    np.testing.assert_allclose(T.concentration_curve(traj, num_bins=2), [1.0, 0.0])
    # 4 steps at progress 1/8, 3/8, 5/8, 7/8 -> bins 1, 3, 5, 7 of 8
    curve = T.concentration_curve(traj, num_bins=8)
    np.testing.assert_allclose(curve[[1, 3, 5, 7]], [1.0, 1.0, 0.0, 0.0])
    assert np.all(np.isnan(curve[[0, 2, 4, 6]]))
    with pytest.raises(ValueError, match="num_bins"):
        T.concentration_curve(traj, num_bins=0)


def test_truncate_uses_ceil_without_float_noise():
    traj = np.arange(20.0).reshape(10, 2)
    assert len(T.truncate(traj, 0.3)) == 3
    assert len(T.truncate(traj, 0.1 * 3)) == 3  # (0.1 * 3) * 10 == 3.0000000000000004
    assert len(T.truncate(traj, 0.1 * 7)) == 7  # (0.1 * 7) * 10 == 7.000000000000001
    assert len(T.truncate(traj, 0.25)) == 3  # ceil(2.5)
    assert len(T.truncate(traj, 0.01)) == 1
    assert len(T.truncate(traj, 1.0)) == 10
    assert len(T.truncate(traj[:3], 0.5)) == 2
    with pytest.raises(ValueError, match="fraction"):
        T.truncate(traj, 0.0)


def _straight(n, scale):
    return np.outer(np.arange(n, dtype=float), [scale, 0.0])


def _turns_after_three(n, scale):
    """Straight for the first 3 steps, then zigzags: only visible from step 4 on."""
    pts = [[scale * i, 0.0] for i in range(3)]
    for i in range(3, n):
        pts.append([scale * 2, scale * (1.0 if i % 2 else -1.0)])
    return np.array(pts)


def test_failure_auc_over_progress_truncation():
    trajs = [_straight(10, 1.0), _straight(10, 2.0), _turns_after_three(10, 1.0), _turns_after_three(10, 3.0)]
    failed = [False, False, True, True]
    res = T.failure_auc_over_progress(trajs, failed, fractions=(0.1, 0.2, 0.3, 0.4, 1.0))
    np.testing.assert_allclose(res["fraction"], [0.1, 0.2, 0.3, 0.4, 1.0])
    # 0.1 -> 1 step: tortuosity undefined for all -> nan, nobody used
    assert math.isnan(res["auc"][0]) and res["n"][0] == 0
    # 0.2, 0.3 -> 2, 3 steps: all straight so far -> ties -> 0.5
    np.testing.assert_allclose(res["auc"][1:3], [0.5, 0.5])
    # 0.4 and later: the failed ones have turned
    np.testing.assert_allclose(res["auc"][3:], [1.0, 1.0])
    np.testing.assert_array_equal(res["n"], [0, 4, 4, 4, 4])


def test_failure_auc_default_fractions_inf_and_single_class():
    loop = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])  # tortuosity inf
    zigzag = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, -1.0], [3.0, 0.0]])
    res = T.failure_auc_over_progress([loop, zigzag, _straight(4, 1.0)], [True, True, False])
    assert len(res["fraction"]) == 10 and res["fraction"][-1] == pytest.approx(1.0)
    assert res["auc"][-1] == pytest.approx(1.0)
    only_ok = T.failure_auc_over_progress([_straight(4, 1.0), zigzag], [False, False], fractions=[1.0])
    assert math.isnan(only_ok["auc"][0]) and only_ok["n"][0] == 2


def test_failure_auc_validation():
    with pytest.raises(ValueError, match="one bool per trajectory"):
        T.failure_auc_over_progress([TRIANGLE, TRIANGLE], [True])
    with pytest.raises(ValueError, match="no trajectories"):
        T.failure_auc_over_progress([], [])
    with pytest.raises(ValueError, match="fractions"):
        T.failure_auc_over_progress([TRIANGLE], [True], fractions=[0.5, 1.5])
    with pytest.raises(ValueError, match=r"trajectories\[1\]"):
        T.failure_auc_over_progress([TRIANGLE, [1.0, 2.0]], [True, False])


def test_trajectory_validation():
    with pytest.raises(ValueError, match="2-D"):
        T.path_length([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="empty"):
        T.path_length(np.zeros((0, 3)))
    with pytest.raises(ValueError, match=r"steps \[1\]"):
        T.tortuosity([[0.0, 0.0], [float("inf"), 0.0]])


def test_trajectory_stats():
    st = T.trajectory_stats(torch.tensor(TRIANGLE, requires_grad=True))
    assert st.num_steps == 3
    assert st.path_length == pytest.approx(7.0)
    assert st.displacement == pytest.approx(5.0)
    assert st.tortuosity == pytest.approx(1.4)
    # step 0 is all zeros (nan, skipped), step 1 one-hot (1), step 2 p = [3/7, 4/7]
    h = -(3 / 7 * math.log(3 / 7) + 4 / 7 * math.log(4 / 7))
    assert st.mean_concentration == pytest.approx((1.0 + 1.0 - h / math.log(2)) / 2)
