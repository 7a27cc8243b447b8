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


# Covalent radii of H, C, N, O, F (Angstrom; Cordero et al. 2008): atoms closer than the sum of
# their radii plus BOND_SLACK are bonded.
COVALENT_RADII = (0.31, 0.76, 0.71, 0.66, 0.57)
CHARGES = (1.0, 6.0, 7.0, 8.0, 9.0)
BOND_SLACK = 0.4


def molecule_graph(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Node features, edge features and masks of padded molecules from Z and coordinates.

  Args:
    x: `(B, N, 4)`: nuclear charge Z (0 marks a padding slot) and coordinates in Angstrom
      (`benchmarks.data.qm9_graphs`).

  Returns:
    nodes `(B, N, 11)`: one-hot element (H, C, N, O, F), Z, one-hot number of bonded
      neighbours (1, 2, 3, >= 4) and number of bonded hydrogens; edges `(B, N, N, 3)`: bonded
      (0/1), distance and distance over the sum of covalent radii; `node_mask` `(B, N)`;
      `edge_mask` `(B, N, N)`: both atoms real and distinct (the complete graph).
  """
  z, pos = x[..., 0], x[..., 1:]
  node_mask = z > 0
  onehot = (z[..., None] == jnp.asarray(CHARGES)).astype(x.dtype)
  radius = onehot @ jnp.asarray(COVALENT_RADII, x.dtype)
  n = z.shape[-1]
  edge_mask = node_mask[:, :, None] & node_mask[:, None, :] & ~jnp.eye(n, dtype=bool)
  diff = pos[:, :, None] - pos[:, None, :]
  dist = jnp.sqrt(jnp.sum(diff**2, -1) + jnp.eye(n, dtype=x.dtype))  # no sqrt(0) on the diagonal
  reach = radius[:, :, None] + radius[:, None, :]
  bonded = (edge_mask & (dist < reach + BOND_SLACK)).astype(x.dtype)
  degree = bonded.sum(-1)
  degree_hot = (jnp.minimum(degree, 4.0)[..., None] == jnp.arange(1.0, 5.0)).astype(x.dtype)
  num_h = bonded @ onehot[..., 0:1]
  nodes = jnp.concatenate([onehot, z[..., None], degree_hot, num_h], -1)
  edges = jnp.stack([bonded, dist, dist / jnp.maximum(reach, 1e-3)], -1)
  mask = edge_mask[..., None].astype(x.dtype)
  return nodes * node_mask[..., None], edges * mask, node_mask, edge_mask


class NNConv(nn.Module):
  """Edge-conditioned convolution (Gilmer et al. 2017; PyG `NNConv`, aggr="mean"):
  h_i' = W_root h_i + b + mean_{j != i} h_j Theta(e_ij), Theta(e) = reshape(A relu(B e + c) + a).

  The per-edge `(dim, dim)` matrices are never formed: sum_j u_ijk (h_j A_k) contracts the
  hidden units u = relu(B e + c) with h A first, the same function at a fraction of the memory.
  """
  dim: int
  edge_hidden: int = 128

  @nn.compact
  def __call__(self, h: jax.Array, edges: jax.Array, edge_mask: jax.Array) -> jax.Array:
    d = h.shape[-1]
    u = nn.relu(nn.Dense(self.edge_hidden, name="edge_hidden")(edges))
    init = nn.initializers.lecun_normal()
    kernel = self.param("edge_kernel", init, (self.edge_hidden, d * self.dim))
    bias = self.param("edge_bias", nn.initializers.zeros, (d * self.dim,))
    kernel = kernel.reshape(self.edge_hidden, d, self.dim)
    mask = edge_mask.astype(h.dtype)
    per_unit = jnp.einsum("bjd,kde->bjke", h, kernel)
    messages = (jnp.einsum("bijk,bjke->bie", u * mask[..., None], per_unit)
                + jnp.einsum("bij,bjd,de->bie", mask, h, bias.reshape(d, self.dim)))
    messages = messages / jnp.maximum(mask.sum(-1, keepdims=True), 1.0)
    return nn.Dense(self.dim, use_bias=False, name="root")(h) + messages + self.param(
        "bias", nn.initializers.zeros, (self.dim,))


class Set2Set(nn.Module):
  """Set2Set readout (Vinyals et al. 2016; PyG `Set2Set`): `steps` LSTM steps of attention
  over the real nodes; returns `(B, 2 dim)`."""
  steps: int = 3

  @nn.compact
  def __call__(self, h: jax.Array, node_mask: jax.Array) -> jax.Array:
    b, _, d = h.shape
    lstm = nn.OptimizedLSTMCell(d, name="lstm")
    carry = (jnp.zeros((b, d), h.dtype), jnp.zeros((b, d), h.dtype))
    q_star = jnp.zeros((b, 2 * d), h.dtype)
    for _ in range(self.steps):
      carry, q = lstm(carry, q_star)
      scores = jnp.where(node_mask, jnp.einsum("bnd,bd->bn", h, q), -jnp.inf)
      attention = jax.nn.softmax(scores, axis=-1, where=node_mask)
      r = jnp.einsum("bn,bnd->bd", jnp.where(node_mask, attention, 0.0), h)
      q_star = jnp.concatenate([q, r], -1)
    return q_star


class GNN(nn.Module):
  """The seed papers' QM9 network (Navon et al. 2022 and LibMTL, after PyG's qm9_nn_conv):
  Dense + ReLU to `dim`, `steps` rounds of ReLU(NNConv) and a GRU update (weights shared across
  rounds), Set2Set (3 steps), Dense + ReLU to `dim`. Input: padded molecules `(B, N, 4)`
  (`molecule_graph`); a molecule's output depends neither on the order of its atoms nor on
  its padding."""
  dim: int = 64
  steps: int = 3

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    nodes, edges, node_mask, edge_mask = molecule_graph(x)
    h = nn.relu(nn.Dense(self.dim, name="lin0")(nodes))
    conv, gru = NNConv(self.dim, name="conv"), nn.GRUCell(self.dim, name="gru")
    b, n, _ = h.shape
    for _ in range(self.steps):
      m = nn.relu(conv(h, edges, edge_mask))
      h, _ = gru(h.reshape(b * n, -1), m.reshape(b * n, -1))
      h = h.reshape(b, n, -1)
    return nn.relu(nn.Dense(self.dim, name="lin1")(Set2Set(name="set2set")(h, node_mask)))


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
  """`model` is "mlp" (`depth` layers of width `hidden`), "lenet" or "gnn" (`GNN` of width
  `hidden` with `depth` message-passing rounds; inputs `benchmarks.data.qm9_graphs`)."""
  if model == "mlp":
    trunk = MLP((hidden,) * depth)
  elif model == "lenet":
    trunk = LeNet()
  elif model == "gnn":
    trunk = GNN(hidden, depth)
  else:
    raise ValueError(f"Unknown model {model!r}; use 'mlp', 'lenet' or 'gnn'.")
  return MultiHead(trunk, num_tasks, num_outputs)
