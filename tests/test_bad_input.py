"""Bad input gives a clear error at trace time; inside jit, bad loss values stay finite."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax
from jax.experimental import checkify

K = 3

BALANCERS = {
    "equal_weights": lambda: mtl_optax.equal_weights(K),
    "log_losses": lambda: mtl_optax.log_losses(K),
    "gls": lambda: mtl_optax.gls(K),
    "rlw": lambda: mtl_optax.rlw(K, key=0),
    "dwa": lambda: mtl_optax.dwa(K, 2),
    "uw": lambda: mtl_optax.uw(K),
    "imtl_l": lambda: mtl_optax.imtl_l(K),
    "igb_v1": lambda: mtl_optax.igb_v1(K, 2),
    "famo": lambda: mtl_optax.famo(K),
}
NAMES = sorted(BALANCERS)
LOG_BASED = ["gls", "igb_v1", "log_losses"]


def rows(k=K):
  return {"a": jnp.ones((k, 4)), "b": {"c": jnp.ones((k, 2, 3))}}


def losses(k=K):
  return jnp.linspace(0.5, 2.0, k)


def update_fn(tx, jit):
  fn = lambda u, s, l: tx.update(u, s, None, losses=l)
  return jax.jit(fn) if jit else fn


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_wrong_number_of_losses(name, jit):
  tx = BALANCERS[name]()
  with pytest.raises(ValueError, match=rf"{name}: losses have shape \(4,\), expected \(3,\)"):
    update_fn(tx, jit)(rows(), tx.init(None), losses(K + 1))


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_leaf_with_another_leading_axis(name, jit):
  tx = BALANCERS[name]()
  bad = {"a": jnp.ones((K, 4)), "b": {"c": jnp.ones((K + 1, 2, 3))}}
  with pytest.raises(ValueError, match=rf"{name}: leading task axes disagree .*\['c'\] has 4"):
    update_fn(tx, jit)(bad, tx.init(None), losses())


@pytest.mark.parametrize("name", ["dwa", "uw", "imtl_l", "igb_v1", "famo"])
def test_per_task_state_rejects_another_k(name):
  """Balancers whose state is per task check K against the stacked rows too."""
  tx = BALANCERS[name]()
  with pytest.raises(ValueError, match=rf"{name}: leading task axes disagree.*num_tasks has 3"):
    jax.jit(lambda u, s, l: tx.update(u, s, None, losses=l))(rows(2), tx.init(None), losses(2))


@pytest.mark.parametrize("name", NAMES)
def test_scalar_leaf(name):
  tx = BALANCERS[name]()
  bad = {"a": jnp.ones((K, 4)), "s": jnp.ones(())}
  with pytest.raises(ValueError, match=rf"{name}: leaf \['s'\] is a scalar"):
    tx.update(bad, tx.init(None), None, losses=losses())


NO_LOSSES = ["equal_weights", "rlw"]  # their weights do not read the losses


@pytest.mark.parametrize("name", NO_LOSSES)
def test_balancers_that_do_not_read_losses_do_not_need_them(name):
  tx = BALANCERS[name]()
  out, _ = jax.jit(lambda u, s: tx.update(u, s))(rows(), tx.init(None))
  assert jax.tree.structure(out.rows) == jax.tree.structure(rows())
  assert not mtl_optax.registry.METHODS[{"equal_weights": "ew"}.get(name, name)].properties & {
      "needs_losses"}


@pytest.mark.parametrize("name", sorted(set(NAMES) - set(NO_LOSSES)))
def test_missing_losses(name):
  tx = BALANCERS[name]()
  with pytest.raises(ValueError, match=rf"{name} needs the task losses"):
    tx.update(rows(), tx.init(None))
  chain = optax.chain(tx, mtl_optax.sum_tasks())
  with pytest.raises(ValueError, match=rf"{name} needs the task losses"):
    jax.jit(lambda u, s: chain.update(u, s, None))(rows(), chain.init(None))


@pytest.mark.parametrize("bad", [[0.5, 0.0, 1.0], [0.5, 1.0, -2.0]])
@pytest.mark.parametrize("name", LOG_BASED)
def test_non_positive_losses_raise_when_concrete(name, bad):
  tx = BALANCERS[name]()
  with pytest.raises(ValueError, match=rf"{name} takes log\(L_i\) and needs positive losses"):
    tx.update(rows(), tx.init(None), None, losses=jnp.asarray(bad))
  with pytest.raises(ValueError, match=rf"{name} takes log"):
    mtl_optax.task_weights(tx, tx.init(None), jnp.asarray(bad))


def test_famo_losses_below_min_losses_raise():
  tx = mtl_optax.famo(K, min_losses=[0.0, 0.6, 0.0])
  with pytest.raises(ValueError, match=r"famo .* needs losses >= min_losses; tasks \[1\]"):
    tx.update(rows(), tx.init(None), None, losses=jnp.asarray([1.0, 0.5, 1.0]))
  state = tx.update(rows(), tx.init(None), None, losses=jnp.ones(K))[1]
  with pytest.raises(ValueError, match=r"post_step_losses >= min_losses; tasks \[0, 1\]"):
    tx.update(rows(), state, None, losses=jnp.ones(K),
              post_step_losses=jnp.asarray([-1.0, 0.0, 1.0]))
  with pytest.raises(ValueError, match=r"famo \(post_step_losses\): losses have shape \(2,\)"):
    jax.jit(lambda s, p: tx.update(rows(), s, None, losses=jnp.ones(K), post_step_losses=p))(
        state, jnp.ones(2))
  with pytest.raises(ValueError, match=r"famo: min_losses has shape \(2,\), expected \(3,\)"):
    mtl_optax.famo(K, min_losses=[0.0, 0.0])


@pytest.mark.parametrize("name", LOG_BASED + ["famo", "dwa"])
def test_non_positive_losses_under_jit_sit_out(name):
  """Inside jit loss values are unknown at trace time: a task whose loss a log-taking balancer
  cannot take sits out the step (s_i = 0, its row dropped), never a 1e7 factor; the others keep
  the weights of the method without it."""
  tx = BALANCERS[name]()
  step = jax.jit(lambda s, l: tx.update(rows(), s, None, losses=l))
  state = tx.init(None)
  for _ in range(6):  # into epoch 3 for DWA and IGBv1
    out, state = step(state, jnp.asarray([0.0, -1.0, 2.0]))
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves((out, state)))
  if name == "dwa":  # takes no log: every task takes part
    return
  if name == "famo":  # log(L - L_min + eps): L = 0 = L_min is fine, L = -1 is not
    np.testing.assert_array_equal(out.rows["a"][1], 0.0)
    assert np.all(np.asarray(out.rows["a"])[[0, 2]] > 0)
    return
  np.testing.assert_array_equal(out.rows["a"][:2], 0.0)
  if name == "log_losses":  # s_3 = 1 / (L_3 + eps)
    np.testing.assert_allclose(out.rows["a"][2, 0], 1 / (2.0 + 1e-8), rtol=1e-6)
  if name == "gls":  # GLS of one task: s = GM / (1 L) = 1
    np.testing.assert_allclose(out.rows["a"][2, 0], 1.0, rtol=1e-6)


@pytest.mark.parametrize("name", LOG_BASED)
def test_non_positive_losses_are_an_error_under_checkify(name):
  tx = BALANCERS[name]()
  step = jax.jit(checkify.checkify(lambda s, l: tx.update(rows(), s, None, losses=l)))
  error, _ = step(tx.init(None), jnp.asarray([0.5, -1.0, 2.0]))
  with pytest.raises(checkify.JaxRuntimeError, match=rf"{name} takes log\(L_i\) and needs "
                     "positive losses"):
    error.throw()
  error, _ = step(tx.init(None), losses())
  error.throw()  # no error for positive losses


@pytest.mark.parametrize("make, what", [
    (lambda v: mtl_optax.dwa(v, 3), "dwa: num_tasks"),
    (lambda v: mtl_optax.dwa(K, v), "dwa: steps_per_epoch"),
    (lambda v: mtl_optax.igb_v1(v, 3), "igb_v1: num_tasks"),
    (lambda v: mtl_optax.igb_v1(K, v), "igb_v1: steps_per_epoch"),
    (lambda v: mtl_optax.uw(v), "uw: num_tasks"),
    (lambda v: mtl_optax.imtl_l(v), "imtl_l: num_tasks"),
    (lambda v: mtl_optax.famo(v), "famo: num_tasks"),
])
def test_hyperparameters_must_be_positive_ints(make, what):
  for bad in [0, -2, 1.5, 3.0, True, None, jnp.asarray(3)]:
    with pytest.raises(ValueError, match=rf"{what} must be a positive int, got"):
      make(bad)
  make(np.int64(3))  # NumPy integers are integers


def test_task_weights_of_gradient_balancers():
  w, _ = mtl_optax.task_weights(mtl_optax.mean_tasks(), mtl_optax.mean_tasks().init(None), losses())
  np.testing.assert_allclose(w, np.full(K, 1.0 / K))
  tx = mtl_optax.mgda(K)
  with pytest.raises(ValueError, match=r"Gram-based; pass gram="):
    mtl_optax.task_weights(tx, tx.init(None), losses())
  with pytest.raises(ValueError, match=r"gram has shape \(2, 2\), expected \(3, 3\)"):
    mtl_optax.task_weights(tx, tx.init(None), losses(), gram=jnp.eye(2))
  tx = mtl_optax.graddrop(K, key=0)
  with pytest.raises(ValueError, match=r"graddrop is not Gram-based"):
    mtl_optax.task_weights(tx, tx.init(None), losses(), gram=jnp.eye(K))
  chain = optax.chain(mtl_optax.log_losses(K), mtl_optax.mean_tasks(), optax.sgd(0.1))
  with pytest.raises(ValueError, match=r"without an optimizer"):
    jax.jit(lambda l: mtl_optax.task_weights(chain, chain.init(None), l))(losses())


@pytest.mark.parametrize("name", mtl_optax.registry.names())
def test_needs_losses_is_what_the_balancer_reads(name):
  """The registry's "needs_losses" says exactly which balancers fail without `losses`."""
  tx = mtl_optax.registry.build(name, K)
  jac = {"a": jnp.asarray(np.random.default_rng(0).normal(size=(K, 4)), jnp.float32)}
  needs = "needs_losses" in mtl_optax.registry.METHODS[name].properties
  if needs:
    with pytest.raises(ValueError, match="needs the task losses"):
      tx.update(jac, tx.init({"a": jnp.zeros(4)}), {"a": jnp.zeros(4)})
  else:
    tx.update(jac, tx.init({"a": jnp.zeros(4)}), {"a": jnp.zeros(4)})


@pytest.mark.parametrize("name", ["ew", "mgda", "db_mtl", "igb_v1"])
def test_integer_rows_are_an_error_that_names_the_balancer(name):
  tx = mtl_optax.registry.build(name, K)
  jac = {"a": jnp.ones((K, 4), jnp.int32)}
  with pytest.raises(ValueError, match=r"leaf \['a'\] of the stacked gradients has dtype int32; "
                     "gradients must be floating point"):
    tx.update(jac, tx.init({"a": jnp.zeros(4)}), {"a": jnp.zeros(4)},
              losses=jnp.ones(K))
