"""Covering grids: the default run takes each value of every axis at least once; the rest of
the full product runs under `-m slow`."""

import itertools

import pytest


def covering(*axes: list) -> list:
  """`pytest.param`s over the product of `axes`: case (i_0, i_1, ...) runs by default when
  i_j = i_0 mod len(axis j) for every j (axis 0 the longest: each value of each axis appears),
  and is marked slow otherwise.

  >>> [(p.values, bool(p.marks)) for p in covering(["a", "b"], [1, 2, 3])[:3]]
  Traceback (most recent call last):
  ...
  ValueError: covering: the first axis must be the longest
  >>> [bool(p.marks) for p in covering(["a", "b", "c"], [1, 2])]  # slow: a2, b1, c2
  [False, True, True, False, False, True]
  """
  if any(len(axis) > len(axes[0]) for axis in axes):
    raise ValueError("covering: the first axis must be the longest")
  params = []
  for idx in itertools.product(*(range(len(axis)) for axis in axes)):
    values = tuple(axis[i] for axis, i in zip(axes, idx))
    default = all(i == idx[0] % len(axis) for axis, i in zip(axes, idx))
    params.append(pytest.param(*values, marks=() if default else pytest.mark.slow))
  return params


def all_but(values: list, slow: set) -> list:
  """`pytest.param`s over `values`, those in `slow` marked slow (the default run keeps the rest,
  which exercise the same code)."""
  unknown = set(slow) - set(values)
  if unknown:
    raise ValueError(f"all_but: {sorted(unknown)} are not among the values")
  return [pytest.param(v, marks=pytest.mark.slow if v in slow else ()) for v in values]
