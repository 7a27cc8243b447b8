"""Hard-parameter-sharing models in Flax: a shared `trunk` and one linear head per task."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

TRUNK = "trunk"  # the name of the shared submodule; every other parameter is task-specific


class MLP(nn.Module):
  """Dense + ReLU layers on the flattened input."""
  features: Sequence[int]

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape(x.shape[0], -1)
    for width in self.features:
      x = nn.relu(nn.Dense(width)(x))
    return x


class LeNet(nn.Module):
  """A LeNet-like CNN: two 5x5 convolutions with max pooling, then a dense layer."""
  channels: Sequence[int] = (10, 20)
  hidden: int = 50

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for c in self.channels:
      x = nn.relu(nn.max_pool(nn.Conv(c, (5, 5), padding="VALID")(x), (2, 2), (2, 2)))
    return nn.relu(nn.Dense(self.hidden)(x.reshape(x.shape[0], -1)))


class MultiHead(nn.Module):
  """`trunk` shared by all tasks, then `num_tasks` linear heads; outputs `(K, batch, out)`.

  The heads are stored stacked (kernel `(K, hidden, out)`, bias `(K, out)`): task k's loss
  touches only slice k, so a head's gradient rows are zero outside their own slice.
  """
  trunk: nn.Module
  num_tasks: int
  num_outputs: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.trunk(x)
    shape = (self.num_tasks, h.shape[-1], self.num_outputs)
    kernel = self.param("head_kernel", nn.initializers.lecun_normal(batch_axis=(0,)), shape)
    bias = self.param("head_bias", nn.initializers.zeros, (self.num_tasks, self.num_outputs))
    return jnp.einsum("bh,kho->kbo", h, kernel) + bias[:, None]


def representation_split(model: MultiHead) -> tuple[Callable, Callable]:
  """`(encode, heads)` of the representation path: `encode(variables, x) -> z = trunk(x)`,
  `heads(variables, z) -> (K, batch, out)`, so that `heads(v, encode(v, x)) = model.apply(v, x)`."""
  def encode(variables, x):
    return model.trunk.apply({"params": variables["params"][TRUNK]}, x)

  def heads(variables, z):
    p = variables["params"]
    return jnp.einsum("bh,kho->kbo", z, p["head_kernel"]) + p["head_bias"][:, None]

  return encode, heads


def shared_mask(params: optax.Params) -> optax.Params:
  """True on the trunk's leaves (shared), False on the heads (task-specific)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(getattr(p, "key", None) == TRUNK for p in path), params)


def build(model: str, num_tasks: int, num_outputs: int, hidden: int = 256,
          depth: int = 3) -> MultiHead:
  """`model` is "mlp" (`depth` layers of width `hidden`) or "lenet"."""
  if model == "mlp":
    trunk = MLP((hidden,) * depth)
  elif model == "lenet":
    trunk = LeNet()
  else:
    raise ValueError(f"Unknown model {model!r}; use 'mlp' or 'lenet'.")
  return MultiHead(trunk, num_tasks, num_outputs)
