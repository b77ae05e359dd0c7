"""Tests for dlcft_jax.metrics on hand-computed accuracy matrices."""

import numpy as np
import pytest

from dlcft_jax import metrics

# R[i][j]: accuracy on task j after training task i (None: not evaluated).
_R = [
    [90.0, None, None],
    [70.0, 80.0, None],
    [60.0, 65.0, 85.0],
]


def test_average_accuracy_defaults_to_last_row():
    assert metrics.average_accuracy(_R) == pytest.approx((60 + 65 + 85) / 3)


def test_average_accuracy_at_intermediate_tasks():
    assert metrics.average_accuracy(_R, t=0) == pytest.approx(90.0)
    assert metrics.average_accuracy(_R, t=1) == pytest.approx(75.0)
    assert metrics.average_accuracy(_R, t=-1) == pytest.approx(70.0)
    with pytest.raises(IndexError):
        metrics.average_accuracy(_R, t=3)


def test_weighted_average_equals_pooled_accuracy():
    # Task 0 has 100 test images, task 1 has 300: pooled accuracy after task 1
    # is (0.7 * 100 + 0.8 * 300) / 400.
    r = [[90.0, None], [70.0, 80.0]]
    got = metrics.average_accuracy(r, task_sizes=[100, 300])
    assert got == pytest.approx((70 * 100 + 80 * 300) / 400)
    # Equal sizes reduce to the plain mean.
    assert metrics.average_accuracy(r, task_sizes=[5, 5]) == pytest.approx(75)
    with pytest.raises(ValueError, match='one entry per task'):
        metrics.average_accuracy(r, task_sizes=[1, 2, 3])


def test_forgetting_hand_computed():
    # j=0: max(90, 70) - 60 = 30; j=1: 80 - 65 = 15.
    assert metrics.forgetting(_R) == pytest.approx(22.5)


def test_forgetting_uses_best_earlier_accuracy_not_diagonal():
    # Task 0 improves after task 1 (backward transfer), then drops.
    r = [[50.0, None, None], [70.0, 80.0, None], [60.0, 80.0, 90.0]]
    # j=0: max(50, 70) - 60 = 10; j=1: 80 - 80 = 0.
    assert metrics.forgetting(r) == pytest.approx(5.0)
    # BWT compares with the diagonal: (60 - 50 + 80 - 80) / 2 = 5.
    assert metrics.backward_transfer(r) == pytest.approx(5.0)


def test_backward_transfer_hand_computed():
    # (60 - 90 + 65 - 80) / 2.
    assert metrics.backward_transfer(_R) == pytest.approx(-22.5)


def test_single_task():
    r = [[42.0]]
    assert metrics.average_accuracy(r) == pytest.approx(42.0)
    assert metrics.forgetting(r) == 0.0
    assert metrics.backward_transfer(r) == 0.0


def test_numpy_input_with_nan_upper_triangle_and_full_matrix():
    r = np.array(_R, dtype=float)  # None -> nan
    assert np.isnan(r[0, 1])
    assert metrics.forgetting(r) == pytest.approx(22.5)
    # Upper-triangle values (e.g. Data-IL evaluates every task) are ignored.
    full = np.nan_to_num(r, nan=12.0)
    assert metrics.average_accuracy(full) == pytest.approx(70.0)
    assert metrics.forgetting(full) == pytest.approx(22.5)
    assert metrics.backward_transfer(full) == pytest.approx(-22.5)


def test_missing_lower_entry_is_an_error():
    r = [[90.0, None], [None, 80.0]]
    with pytest.raises(ValueError, match=r'missing \(i, j\): \[\(1, 0\)\]'):
        metrics.forgetting(r)


def test_non_square_is_an_error():
    with pytest.raises(ValueError, match='square'):
        metrics.average_accuracy([[1.0, 2.0]])
    with pytest.raises(ValueError, match='square'):
        metrics.backward_transfer([[1.0], [2.0, 3.0]])


def test_format_accuracy_matrix():
    text = metrics.format_accuracy_matrix(_R)
    lines = text.split('\n')
    assert len(lines) == 4
    # Fixed width: every line has the same length.
    assert len({len(line) for line in lines}) == 1
    assert lines[0].split() == ['after', 'T1', 'T2', 'T3', 'avg']
    assert lines[1].split() == ['T1', '90.00', '-', '-', '90.00']
    assert lines[3].split() == ['T3', '60.00', '65.00', '85.00', '70.00']


def test_format_accepts_partial_matrix():
    # While training runs, later rows are not filled in yet.
    r = [[90.0, None], [None, None]]
    lines = metrics.format_accuracy_matrix(r, precision=1).split('\n')
    assert lines[1].split() == ['T1', '90.0', '-', '90.0']
    assert lines[2].split() == ['T2', '-', '-', '-']
