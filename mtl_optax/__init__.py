"""mtl_optax: multi-task loss and gradient balancers as optax transformations."""

from mtl_optax.grad.base import aggregator, gram_aggregator, mean_tasks, sum_tasks
from mtl_optax.jacobian import task_weights, value_and_jacrev, value_and_reweighted_grad
from mtl_optax.loss.base import reweighter
from mtl_optax.loss.dwa import DWAState, dwa
from mtl_optax.loss.igb import BaseLoss, igb_v1
from mtl_optax.loss.learned import LearnedScaleState, imtl_l, uw
from mtl_optax.loss.random import RLWState, rlw
from mtl_optax.loss.scale import equal_weights, gls, log_losses

# -- gradient balancers (issue 3) --

# -- IGBv2 (issue 4) --

# -- metrics (issue 5) --
from mtl_optax.metrics import delta_m

__version__ = "0.1.0"
