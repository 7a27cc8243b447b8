"""Byzantine-robust aggregation: Krum (Blanchard et al. 2017) and the coordinate-wise trimmed
mean (Yin et al. 2018)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mtl_optax import tree as tree_lib
from mtl_optax.checks import check_choice, check_nonnegative_int, check_positive_int
from mtl_optax.grad.base import aggregator, gram_aggregator

SCORES = ("squared", "distance")


def _check_krum(num_tasks: int, n_byzantine: int, n_selected: int, score: str) -> None:
  check_nonnegative_int(n_byzantine, "krum: n_byzantine")
  check_positive_int(n_selected, "krum: n_selected")
  check_choice(score, SCORES, "krum: score")
  if num_tasks < n_byzantine + 3 or num_tasks < n_selected:
    raise ValueError(f"krum: needs K >= n_byzantine + 3 = {n_byzantine + 3} rows and "
                     f"K >= n_selected = {n_selected}, got K = {num_tasks}.")


def krum_weights(gram: jax.Array, *, n_byzantine: int = 0, n_selected: int = 1,
                 score: str = "squared", present: jax.Array | None = None) -> jax.Array:
  """Krum's weights: 1 / n_selected on the n_selected rows of least score s(i) = sum of the
  ||g_i - g_j||^2 over the K - n_byzantine - 2 rows j != i closest to g_i (Blanchard et al.
  2017, Sec. 4; n_selected > 1: Multi-Krum), 0 elsewhere. The distances come from the Gram
  matrix: ||g_i - g_j||^2 = M_ii + M_jj - 2 M_ij.

  Args:
    gram: `(K, K)` Gram matrix M = G G^T of the rows g_i.
    n_byzantine: f, the number of rows that may be adversarial; needs K >= f + 3.
    n_selected: m, the number of rows averaged (1: Krum; m > 1: Multi-Krum); needs K >= m.
    score: 'squared' (the paper's sum of squared distances) or 'distance' (torchjd's sum of
      distances).
    present: `(K,)` bool of the tasks that take part (None: all): Krum of the present rows
      alone (n of them: n - f - 2 neighbours; with n < f + 3 every present row scores 0 and the
      first is chosen), 0 at the others.

  Returns:
    `(K,)` weights w of d = sum_i w_i g_i. Ties go to the lower index, so relabelling the
    tasks can change the choice: with K - f - 2 = 1 neighbour the two mutually closest rows
    always tie.

  References:
    Blanchard, El Mhamdi, Guerraoui, Stainer 2017, "Machine Learning with Adversaries:
    Byzantine Tolerant Gradient Descent", NeurIPS (preprint arXiv:1703.02757), Sec. 4 (Krum,
    Multi-Krum).

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax
    >>> g = jnp.array([[1.0, 0.0], [1.2, 0.1], [0.9, -0.1], [1.0, 0.3], [-5.0, 8.0]])
    >>> print(np.asarray(mtl_optax.krum_weights(g @ g.T, n_byzantine=1)))  # scores .07, .13, ...
    [1. 0. 0. 0. 0.]
  """
  k = gram.shape[0]
  _check_krum(k, n_byzantine, n_selected, score)
  sq_norms = jnp.diag(gram)
  distances = jnp.maximum(sq_norms[:, None] + sq_norms[None, :] - 2.0 * gram, 0.0)
  if score == "distance":
    distances = jnp.sqrt(distances)
  distances = jnp.where(jnp.eye(k, dtype=bool), jnp.inf, distances)
  ordered = jnp.sort(distances, axis=1)
  scores = ordered[:, :k - n_byzantine - 2].sum(axis=1)
  if present is not None:  # the usual step (every task present) as without `present`
    both = present[:, None] & present[None, :]
    ordered = jnp.sort(jnp.where(both, distances, jnp.inf), axis=1)
    near = jnp.arange(k) < jnp.sum(present) - n_byzantine - 2
    some = jnp.where(present, jnp.sum(jnp.where(near, ordered, 0.0), axis=1), jnp.inf)
    scores = jnp.where(jnp.all(present), scores, some)
  selected = jnp.argsort(scores, stable=True)[:n_selected]
  return jnp.zeros((k,), gram.dtype).at[selected].set(1.0 / n_selected)


def krum(num_tasks: int, n_byzantine: int = 0, n_selected: int = 1, *, score: str = "squared",
         shared: tree_lib.MaskOrFn = None) -> optax.GradientTransformationExtraArgs:
  """Krum: the row closest to its K - f - 2 nearest rows (Multi-Krum: the mean of the
  n_selected closest), a Byzantine-robust choice among the task gradients.

  Blanchard et al. 2017, Sec. 4, as torchjd's Krum (checked against torchjd/aggregation/
  _krum.py), except that the score is, as in the paper, the sum of squared distances (torchjd
  sums the distances themselves: `score='distance'`). The distances come from the Gram matrix,
  so Krum runs on all three paths (weights `krum_weights`). It needs K >= n_byzantine + 3
  rows, as torchjd (the paper's guarantee needs K > 2 n_byzantine + 2). Task-specific leaves get
  the plain sum.

  Args:
    num_tasks: K.
    n_byzantine: f, the number of rows that may be adversarial.
    n_selected: m, the number of rows averaged (1: Krum; m > 1: Multi-Krum).
    score: 'squared' (the paper) or 'distance' (torchjd).
    shared: the shared parameters: a pytree of bools like the parameters (a prefix is
      enough) or a callable on them; None: every leaf is shared.

  Returns:
    An `optax.GradientTransformationExtraArgs` from stacked per-task gradients (leading axis K
    on every leaf) to one gradient shaped like the parameters; its state is a
    `BalancerState` holding the last weights.

  References:
    Blanchard, El Mhamdi, Guerraoui, Stainer 2017, "Machine Learning with Adversaries:
    Byzantine Tolerant Gradient Descent", NeurIPS (preprint arXiv:1703.02757), Sec. 4.

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax
    >>> tx, params = mtl_optax.krum(5, n_byzantine=1, n_selected=2), {"w": jnp.zeros(2)}
    >>> jac = {"w": jnp.array([[1.0, 0.0], [1.2, 0.1], [0.9, -0.1], [1.0, 0.3], [-5.0, 8.0]])}
    >>> d, state = tx.update(jac, tx.init(params))  # Multi-Krum: the mean of rows 0 and 1
    >>> print(np.asarray(d["w"]).round(3), state.weights)
    [1.1  0.05] [0.5 0.5 0.  0.  0. ]
  """
  _check_krum(num_tasks, n_byzantine, n_selected, score)

  def weights(gram, state, losses, present):
    del losses
    w = krum_weights(gram, n_byzantine=n_byzantine, n_selected=n_selected, score=score,
                     present=present)
    return w, None, state

  return gram_aggregator("krum", num_tasks, lambda params: optax.EmptyState(), weights,
                         shared=shared, handles_absent=True)


def trimmed_mean(num_tasks: int, trim_number: int, *,
                 shared: tree_lib.MaskOrFn = None) -> optax.GradientTransformationExtraArgs:
  """Coordinate-wise trimmed mean: per parameter entry, drop the `trim_number` largest and the
  `trim_number` smallest of the K values, and average the K - 2 trim_number left.

  Yin et al. 2018, Def. 2 (beta = trim_number / K), as torchjd's TrimmedMean (checked against
  torchjd/aggregation/_trimmed_mean.py). Entry by entry, so it is not Gram-based: it runs on
  the stacked and representation paths only. Needs K >= 2 trim_number + 1. Task-specific
  leaves get the plain sum. On a step where only n tasks take part, the mean of their values
  with min(trim_number, (n - 1) // 2) cut at each end.

  Args:
    num_tasks: K.
    trim_number: b, the number of values dropped at each end of every entry.
    shared: the shared parameters: a pytree of bools like the parameters (a prefix is
      enough) or a callable on them; None: every leaf is shared.

  Returns:
    An `optax.GradientTransformationExtraArgs` from stacked per-task gradients (leading axis
    K on every leaf) to one gradient shaped like the parameters; its state's `weights` are
    1 / (K - 2 b) (each kept entry's weight in the mean).

  References:
    Yin, Chen, Ramchandran, Bartlett 2018, "Byzantine-Robust Distributed Learning: Towards
    Optimal Statistical Rates", ICML, arXiv:1803.01498, Def. 2 (coordinate-wise trimmed mean).

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax
    >>> tx = mtl_optax.trimmed_mean(3, trim_number=1)  # K = 3: the coordinate-wise median
    >>> jac = {"w": jnp.array([[1.0, 5.0], [-2.0, 0.0], [0.5, 1.0]])}
    >>> d, state = tx.update(jac, tx.init(None))
    >>> print(d["w"])
    [0.5 1. ]
  """
  check_positive_int(num_tasks, "trimmed_mean: num_tasks")
  check_nonnegative_int(trim_number, "trimmed_mean: trim_number")
  if num_tasks < 2 * trim_number + 1:
    raise ValueError(f"trimmed_mean: needs K >= 2 trim_number + 1 = {2 * trim_number + 1} "
                     f"rows, got K = {num_tasks}.")
  keep = slice(trim_number, num_tasks - trim_number)

  def aggregate(shared_rows, state, losses, params, present, axis_name=None):
    del losses, params, axis_name  # coordinate-wise: rows split over devices need nothing more
    weights = jnp.full((num_tasks,), 1.0 / (keep.stop - keep.start))

    def full(rows):
      return jax.tree.map(lambda r: jnp.sort(r, axis=0)[keep].mean(axis=0), rows), weights

    def some(rows):  # the present rows alone (n of them), min(b, (n - 1) // 2) cut at each end
      n = jnp.sum(present)
      cut = jnp.maximum(jnp.minimum(trim_number, (n - 1) // 2), 0)
      left = jnp.maximum(n - 2 * cut, 1)

      def mean(r):
        mask = present.reshape((-1,) + (1,) * (r.ndim - 1))
        idx = jnp.arange(num_tasks).reshape(mask.shape)
        ordered = jnp.sort(jnp.where(mask, r, jnp.inf), axis=0)
        kept = (idx >= cut) & (idx < n - cut)
        return jnp.sum(jnp.where(kept, ordered, 0.0), axis=0) / left.astype(r.dtype)
      return jax.tree.map(mean, rows), jnp.full((num_tasks,), 1.0 / left)

    out, weights = jax.lax.cond(jnp.all(present), full, some, shared_rows)
    return out, weights, None, state

  return aggregator("trimmed_mean", num_tasks, lambda params: optax.EmptyState(), aggregate,
                    shared=shared, handles_absent=True)
