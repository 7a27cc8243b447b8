"""The installed wheel, with its runtime dependencies only: import it and run one jitted step.

Run by .ci/run in a clean virtual environment outside the source tree (so `import mtl_optax`
finds the wheel, not the checkout): a 2-task model, its stacked Jacobian from
`mtl_optax.value_and_jacrev`, Nash-MTL then Adam, one jitted step; prints the import time and
the step's result and fails unless everything is finite.
"""

import time

t0 = time.perf_counter()
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import mtl_optax  # noqa: E402

import_s = time.perf_counter() - t0
assert "site-packages" in mtl_optax.__file__, mtl_optax.__file__
print(f"wheel smoke: mtl_optax {mtl_optax.__version__} from {mtl_optax.__file__}")
print(f"wheel smoke: import time {import_s:.2f} s (jax, optax, mtl_optax)")


def task_losses(params, x, y):
  pred = jnp.tanh(x @ params["trunk"]) @ params["heads"]
  return jnp.mean((pred - y) ** 2, axis=0) + 1e-3


K = 2
params = {"trunk": jnp.linspace(-0.5, 0.5, 16).reshape(4, 4), "heads": jnp.full((4, K), 0.1)}
x, y = jnp.linspace(-1.0, 1.0, 32).reshape(8, 4), jnp.tile(jnp.array([1.0, -0.5]), (8, 1))
tx = optax.chain(mtl_optax.nash_mtl(K, shared={"trunk": True, "heads": False}), optax.adam(1e-3))
state = tx.init(params)


@jax.jit
def step(params, state):
  losses, jac = mtl_optax.value_and_jacrev(task_losses)(params, x, y)
  updates, state = tx.update(jac, state, params, losses=losses)
  return optax.apply_updates(params, updates), state, losses


t0 = time.perf_counter()
new_params, state, losses = jax.block_until_ready(step(params, state))
step_s = time.perf_counter() - t0
moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in
            zip(jax.tree.leaves(new_params), jax.tree.leaves(params)))
finite = all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves((new_params, state, losses)))
print(f"wheel smoke: jitted step (compile + run) {step_s:.2f} s on {jax.devices()[0]}; "
      f"losses {[round(float(v), 6) for v in losses]}, largest parameter change {moved:.2e}, "
      f"finite {finite}")
assert finite and moved > 0, "the step is not finite or did not move the parameters"
print("wheel smoke: ok")
