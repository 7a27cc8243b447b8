"""Multi-task evaluation metrics."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def delta_m(metrics: ArrayLike, baseline: ArrayLike, higher_is_better: ArrayLike) -> np.ndarray:
  """Delta_m (%): the mean relative change of a method's metrics against a baseline (STL).

  Delta_m = 100 / K' sum_k (-1)^{delta_k} (M_m,k - M_b,k) / M_b,k over the K' metrics, with
  delta_k = 1 where higher is better, so lower Delta_m is better. Maninis et al. 2019
  (Attentive single-tasking); Dai et al. 2023 (IGB), Eq. 5. DB-MTL (Lin et al.) reports its
  negative, Delta_p.

  Args:
    metrics: `(..., K')` metrics of the method; leading axes (e.g. seeds) are kept.
    baseline: `(K',)` metrics of the baseline, nonzero.
    higher_is_better: `(K',)` bools, delta_k.

  Returns:
    Delta_m in percent, shape `metrics.shape[:-1]`.

  References:
    Maninis et al. 2019, "Attentive Single-Tasking of Multiple Tasks", CVPR,
    arXiv:1904.08918; Dai et al. 2023, "Improvable Gap Balancing for Multi-Task Learning",
    UAI, arXiv:2307.15429, Eq. 5.

  Example:
    >>> import numpy as np, mtl_optax
    >>> metrics, baseline = [0.9, 0.5], [1.0, 0.4]  # an accuracy and an error
    >>> print(np.round(mtl_optax.delta_m(metrics, baseline, [True, False]), 3))  # % worse
    17.5
  """
  metrics = np.asarray(metrics, np.float64)
  baseline = np.asarray(baseline, np.float64)
  sign = np.where(np.asarray(higher_is_better, bool), -1.0, 1.0)
  if metrics.shape[-1:] != baseline.shape or baseline.shape != sign.shape:
    raise ValueError(
        f"delta_m: metrics {metrics.shape}, baseline {baseline.shape} and higher_is_better "
        f"{sign.shape} must share the last axis K'."
    )
  if np.any(baseline == 0):
    raise ValueError("delta_m: the baseline has a zero metric; the relative change is undefined.")
  return 100.0 * np.mean(sign * (metrics - baseline) / baseline, axis=-1)
