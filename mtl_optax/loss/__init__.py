"""Loss balancers (reweighters): stacked per-task gradients -> row-scaled stacked gradients."""
