"""Checks of static hyperparameters, shared by every balancer family."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def check_positive_int(value: int, what: str) -> int:
  """Raises unless `value` is a positive integer (a static hyperparameter; not a bool)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
    raise ValueError(f"{what} must be a positive int, got {value!r}.")
  return int(value)


def check_nonnegative_int(value: int, what: str) -> int:
  """Raises unless `value` is an integer >= 0 (not a bool)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
    raise ValueError(f"{what} must be a non-negative int, got {value!r}.")
  return int(value)


def check_choice(value: T, choices: Sequence[T], what: str) -> T:
  """Raises unless `value` is one of `choices` (a string mode)."""
  if value not in choices:
    raise ValueError(f"{what} must be one of {tuple(choices)}, got {value!r}.")
  return value


def check_in_range(value: float, low: float, high: float, what: str, *,
                   open_low: bool = False, open_high: bool = False) -> float:
  """Raises unless the number `value` is in the interval from `low` to `high` (each end
  closed unless `open_low` / `open_high`). Arrays (e.g. traced by `optax.inject_hyperparams`)
  are not checked."""
  if isinstance(value, numbers.Real):
    above = value > low if open_low else value >= low
    below = value < high if open_high else value <= high
    if not (above and below):
      interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
      raise ValueError(f"{what} must be in {interval}, got {value!r}.")
  return value
