"""Gradient balancers (aggregators): stacked per-task gradients -> one gradient."""
