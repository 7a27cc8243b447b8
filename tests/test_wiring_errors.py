"""Wiring mistakes: each raises at trace time (under jax.jit where it applies) with a message
that names the fix.

Model (batch 8): z = tanh(x W) (the encoder), L_i = mean_b (z_b . h_i - y_bi)^2 + 0.05.
"""

import jax
import numpy as np
import optax
import pytest

import mtl_optax
import tiny_model
from tiny_model import MASK, encode, heads, task_losses

K, D, H, B = 3, 4, 6, 8


def model(seed=0):
  return tiny_model.model(K, seed, d=D, h=H, b=B, spread=False)



REP = mtl_optax.value_and_representation_jacrev(encode, heads, shared=MASK)
END_THE_CHAIN = "end the balancer chain with a gradient balancer or mtl_optax.sum_tasks()"


def raises(match, fn, *args):
  """Runs `fn(*args)` under jax.jit (so the error is a trace-time one) and returns the
  error's message."""
  with pytest.raises(ValueError, match=match) as info:
    jax.jit(fn)(*args)
  return str(info.value)


# (a) an optimizer after a loss balancer, on value_and_jacrev's Jacobian

def test_optimizer_after_loss_balancer_names_stacked_rows():
  params, x, y = model()
  tx = optax.chain(mtl_optax.igb_v1(K, 10), optax.adam(1e-3))

  def step(params, state, x, y):
    losses, jac = mtl_optax.value_and_jacrev(task_losses)(params, x, y)
    return tx.update(jac, state, params, losses=losses)

  message = raises("StackedRows", step, params, tx.init(params), x, y)
  assert "K stacked per-task rows, not one update" in message
  assert END_THE_CHAIN in message and "mtl_optax.value_and_grad" in message


# (b) a loss balancer, then optax.sgd, then optax.apply_updates

@pytest.mark.parametrize("with_sgd", [True, False])
def test_apply_updates_on_loss_balancer_rows(with_sgd):
  params, x, y = model()
  tx = mtl_optax.log_losses(K)
  if with_sgd:
    tx = optax.chain(tx, optax.sgd(0.1))

  def step(params, state, x, y):
    losses, jac = mtl_optax.value_and_jacrev(task_losses)(params, x, y)
    updates, state = tx.update(jac, state, params, losses=losses)
    return optax.apply_updates(params, updates)

  message = raises("StackedRows", step, params, tx.init(params), x, y)
  assert END_THE_CHAIN in message


# (c) a loss balancer's rows handed to the representation path's pullback

def test_pullback_of_loss_balancer_rows_names_sum_tasks():
  params, x, y = model()
  tx = mtl_optax.log_losses(K)

  def step(params, x, y):
    losses, rows, pullback = REP(params, x, y)
    out, _ = tx.update(rows, tx.init(mtl_optax.row_like(rows)), losses=losses)
    return pullback(out)

  message = raises("pullback takes one row", step, params, x, y)
  assert "mtl_optax.sum_tasks()" in message and "loss balancer" in message


def test_pullback_of_a_parameter_shaped_tree():
  params, x, y = model()
  message = raises("pullback takes one row", lambda p: REP(p, x, y)[2](p), params)
  assert "mtl_optax.value_and_grad" in message


# (d) a balancer with per-task buffers initialized from the parameters, used on z-rows

@pytest.mark.parametrize("name", ["db_mtl", "moco", "excess_mtl"])
def test_buffers_initialized_for_another_path(name):
  params, x, y = model()
  tx = mtl_optax.registry.build(name, K)

  def step(params, state, x, y):
    losses, rows, pullback = REP(params, x, y)
    out, state = tx.update(rows, state, losses=losses)
    return pullback(out), state

  message = raises(f"{name}: its state holds per-task buffers", step,
                   params, tx.init(params), x, y)
  assert "balancer.init(mtl_optax.row_like(rows))" in message
  assert "mtl_optax.value_and_grad(...).init" in message
  # The fix works: the entry point's init builds the state from the z-rows.
  vg = mtl_optax.value_and_grad((encode, heads), tx, path="representation", shared=MASK)
  out, _ = jax.jit(vg.update)(params, vg.init(params, x, y), x, y)
  assert np.all(np.isfinite(out.weights))


# (e) a parameter mask function (NNX / dict style) given to a gradient balancer on the
# representation path

def by_path(params):
  """Reads path[0].key, as mask functions written for dict / NNX parameters do."""
  return jax.tree_util.tree_map_with_path(lambda path, _: path[0].key == "trunk", params)


@pytest.mark.parametrize("shared", [by_path, MASK], ids=["path_key_function", "dict"])
def test_parameter_mask_on_representation_path_names_shared_none(shared):
  params, x, y = model()
  tx = mtl_optax.mgda(K, shared=shared)

  def step(params, x, y):
    losses, rows, pullback = REP(params, x, y)
    out, _ = tx.update(rows, tx.init(mtl_optax.row_like(rows)), losses=losses)
    return pullback(out)

  message = raises("build the balancer with shared=None there", step, params, x, y)
  assert message.startswith("mgda:")
  vg = mtl_optax.value_and_grad((encode, heads), tx, path="representation", shared=MASK)
  raises("shared=None", vg.update, params, vg.init(params, x, y), x, y)


# (f) a mask dict with a wrong key on the stacked path (and the Gram-only path)

@pytest.mark.parametrize("name", ["mgda", "pcgrad", "db_mtl"])
def test_mask_with_a_wrong_key_names_the_balancer(name):
  params, x, y = model()
  tx = mtl_optax.registry.build(name, K, shared={"trunck": True, "heads": False})

  def step(params, state, x, y):
    losses, jac = mtl_optax.value_and_jacrev(task_losses)(params, x, y)
    return tx.update(jac, state, params, losses=losses)

  match = f"{name}: the shared= mask does not match the parameters"
  with pytest.raises(ValueError, match=match) as info:  # already at init, for buffers
    jax.jit(step)(params, tx.init(params), x, y)
  assert "trunck" in str(info.value)
  vg = mtl_optax.value_and_grad(task_losses, tx)
  with pytest.raises(ValueError, match=match):
    jax.jit(vg.update)(params, vg.init(params), x, y)


def test_mask_with_a_wrong_key_on_gram_path():
  params, x, y = model()
  vg = mtl_optax.value_and_grad(task_losses, mtl_optax.imtl_g(K, shared={"trunck": True}),
                                path="gram")
  raises("imtl_g: the shared= mask does not match", vg.update, params, vg.init(params), x, y)


# (g) an optimizer inside the Gram-only path

APPLY = "apply the optimizer to the gradient it returns"


@pytest.mark.parametrize("first", ["mgda", "log_losses"])
def test_optimizer_on_gram_only_path(first):
  params, x, y = model()
  balancer = mtl_optax.mgda(K) if first == "mgda" else mtl_optax.log_losses(K)
  for tx in (optax.chain(balancer, optax.adam(1e-3)), optax.chain(balancer, optax.sgd(0.1))):
    step = mtl_optax.value_and_reweighted_grad(task_losses, tx)
    message = raises("value_and_reweighted_grad takes a loss balancer", step,
                     params, tx.init(params), x, y)
    assert APPLY in message and "unsupported operand" not in message
    vg = mtl_optax.value_and_grad(task_losses, tx, path="gram")
    message = raises(r"value_and_grad \(Gram-only path\) takes", vg.update,
                     params, vg.init(params), x, y)
    assert APPLY in message and "unsupported operand" not in message


# (h) an optimizer chained after the balancer, given to value_and_grad

@pytest.mark.parametrize("path", ["stacked", "representation"])
@pytest.mark.parametrize("first", ["mgda", "log_losses", "log_losses+mgda"])
def test_optimizer_in_value_and_grad(path, first):
  params, x, y = model()
  balancer = {"mgda": lambda: mtl_optax.mgda(K),
              "log_losses": lambda: mtl_optax.log_losses(K),
              "log_losses+mgda": lambda: optax.chain(mtl_optax.log_losses(K),
                                                     mtl_optax.mgda(K))}[first]()
  tx = optax.chain(balancer, optax.adam(1e-3))
  vg = mtl_optax.value_and_grad(
      (encode, heads) if path == "representation" else task_losses, tx, path=path,
      shared=MASK if path == "representation" else None)
  message = raises("without an optimizer", vg.update, params, vg.init(params, x, y), x, y)
  assert "out.grad" in message


# (i) value_and_grad's own arguments

def test_value_and_grad_argument_errors():
  tx = mtl_optax.mgda(K)
  with pytest.raises(ValueError, match="path must be one of"):
    mtl_optax.value_and_grad(task_losses, tx, path="gram_only")
  with pytest.raises(ValueError, match="representation path needs shared="):
    mtl_optax.value_and_grad((encode, heads), tx, path="representation")
  with pytest.raises(ValueError, match=r"takes fun=\(encode, task_losses\)"):
    mtl_optax.value_and_grad(task_losses, tx, path="representation", shared=MASK)
  for path in ("stacked", "gram"):
    with pytest.raises(ValueError, match="is for path='representation'"):
      mtl_optax.value_and_grad((encode, heads), tx, path=path)
    with pytest.raises(ValueError, match="gradient balancers take shared= themselves"):
      mtl_optax.value_and_grad(task_losses, tx, path=path, shared=MASK)
  with pytest.raises(ValueError, match="chunk_size must be a positive int"):
    mtl_optax.value_and_grad(task_losses, tx, path="gram", chunk_size=0)


@pytest.mark.parametrize("name", ["moco", "graddrop", "db_mtl"])
def test_gradient_balancer_not_gram_based_on_gram_path(name):
  params, x, y = model()
  vg = mtl_optax.value_and_grad(task_losses, mtl_optax.registry.build(name, K), path="gram")
  message = raises(f"{name} is not Gram-based", vg.update, params, vg.init(params), x, y)
  assert "use the stacked or the representation path" in message


def test_losses_not_a_vector():
  params, x, y = model()
  for path in ("stacked", "gram"):
    vg = mtl_optax.value_and_grad(lambda p, x, y: task_losses(p, x, y).sum(),
                                  mtl_optax.mgda(K), path=path)
    raises("vector of K losses", vg.update, params, vg.init(params), x, y)
