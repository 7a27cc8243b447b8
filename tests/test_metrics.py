"""delta_m against hand computations."""

import numpy as np
import pytest

from mtl_optax import delta_m


def test_hand_computation():
  # Task 1: error 2.0 vs 2.5 (lower is better) -> -20 %; task 2: accuracy 0.9 vs 0.8
  # (higher is better) -> -12.5 %; mean -16.25 %.
  got = delta_m([2.0, 0.9], [2.5, 0.8], [False, True])
  np.testing.assert_allclose(got, -16.25)


def test_worse_method_is_positive_and_baseline_is_zero():
  base = np.array([0.5, 0.7, 3.0])
  hib = np.array([True, True, False])
  np.testing.assert_allclose(delta_m(base, base, hib), 0.0)
  # every metric 10 % worse: accuracies x 0.9, error x 1.1 -> +10 %.
  np.testing.assert_allclose(delta_m(base * [0.9, 0.9, 1.1], base, hib), 10.0)


def test_leading_axes_are_kept():
  runs = np.array([[1.0, 1.0], [3.0, 1.0]])
  got = delta_m(runs, [2.0, 1.0], [False, False])
  np.testing.assert_allclose(got, [-25.0, 25.0])


def test_bad_input_raises():
  with pytest.raises(ValueError, match="last axis"):
    delta_m([1.0, 2.0], [1.0], [False])
  with pytest.raises(ValueError, match="zero"):
    delta_m([1.0], [0.0], [False])
