"""mtl_optax: multi-task loss and gradient balancers as optax transformations."""

# The entry point: one call shape on the three paths.
from mtl_optax.balanced import BalancedGrad, ValueAndGrad, value_and_grad

# The layer below it: stacked Jacobian, single-backward / Gram-only, representation.
from mtl_optax.jacobian import task_weights, value_and_jacrev, value_and_reweighted_grad
from mtl_optax.representation import value_and_representation_jacrev
from mtl_optax.rows import GramRows, GramUpdate, RepresentationRows, StackedRows, row_like

# Every balancer's state, and the weights of its last update along a chain.
from mtl_optax.state import BalancerState, effective_weights

# Loss balancers (reweighters): stacked -> stacked.
from mtl_optax.loss.base import reweighter
from mtl_optax.loss.dwa import DWAState, dwa
from mtl_optax.loss.famo import FAMOState, famo
from mtl_optax.loss.igb import IGBv1State, igb_v1
from mtl_optax.loss.igb_v2 import IGBv2State, igb_v2
from mtl_optax.loss.learned import LearnedScaleState, imtl_l, uw
from mtl_optax.loss.random import RLWState, rlw
from mtl_optax.loss.scale import equal_weights, gls, log_losses
from mtl_optax.loss.scalarize import COSMOSState, cosmos, pbi
from mtl_optax.loss.stch import STCHState, stch

# Gradient balancers (aggregators): stacked -> one gradient; and their Gram -> weights functions.
from mtl_optax.grad.aligned_mtl import aligned_mtl, aligned_mtl_weights
from mtl_optax.grad.base import aggregator, gram_aggregator, mean_tasks, sum_tasks
from mtl_optax.grad.cagrad import cagrad, cagrad_weights
from mtl_optax.grad.config import config, config_weights
from mtl_optax.grad.constant import constant
from mtl_optax.grad.cr_mogm import CRMOGMState, cr_mogm, cr_mogm_weights
from mtl_optax.grad.db_mtl import DBMTLState, db_mtl
from mtl_optax.grad.excess_mtl import ExcessMTLState, excess_mtl
from mtl_optax.grad.fairgrad import FairGradState, fairgrad, fairgrad_weights
from mtl_optax.grad.dualproj import dualproj, dualproj_weights
from mtl_optax.grad.graddrop import GradDropState, graddrop
from mtl_optax.grad.gradnorm import GradNormState, gradnorm
from mtl_optax.grad.gradvac import GradVacState, gradvac, gradvac_weights
from mtl_optax.grad.imgrad import imgrad, imgrad_nash, imgrad_nash_weights, imgrad_weights
from mtl_optax.grad.imtl import imtl, imtl_g, imtl_g_weights
from mtl_optax.grad.mgda import mgda, mgda_weights
from mtl_optax.grad.moco import MoCoState, moco
from mtl_optax.grad.modo import MoDoState, modo, modo_weights
from mtl_optax.grad.nash_mtl import NashMTLState, nash_mtl, nash_mtl_weights
from mtl_optax.grad.pcd import PCDState, pcd, pcd_weights
from mtl_optax.grad.pcgrad import PCGradState, pcgrad, pcgrad_weights
from mtl_optax.grad.sdmgrad import SDMGradState, sdmgrad, sdmgrad_weights
from mtl_optax.grad.robust import krum, krum_weights, trimmed_mean
from mtl_optax.grad.upgrad import upgrad, upgrad_weights
from mtl_optax.grad.threshold import ThresholdState, threshold

# Watching training: conflict and imbalance diagnostics of each step.
from mtl_optax.diagnostics import (Diagnostics, DiagnosticsState, diagnostics_from_gram,
                                   diagnostics_from_rows, with_diagnostics)

# The SAC agent behind IGBv2.
from mtl_optax.rl import SAC, SACState, sac

# optax wrappers for shape-changing chains.
from mtl_optax.wrappers import apply_if_finite

# IGB's fusion of a loss and a gradient balancer, in the reference code's or Algorithm 3's reading.
from mtl_optax.fusion import fusion
# Metrics of the benchmark tables.
from mtl_optax.metrics import delta_m

# Every balancer by name (tests, benchmarks, configs).
from mtl_optax import registry

__version__ = "0.1.0"

__all__ = (
    "BalancedGrad",
    "BalancerState",
    "COSMOSState",
    "CRMOGMState",
    "DBMTLState",
    "DWAState",
    "Diagnostics",
    "DiagnosticsState",
    "ExcessMTLState",
    "FAMOState",
    "FairGradState",
    "GradDropState",
    "GradNormState",
    "GradVacState",
    "GramRows",
    "GramUpdate",
    "IGBv1State",
    "IGBv2State",
    "LearnedScaleState",
    "MoCoState",
    "MoDoState",
    "NashMTLState",
    "PCDState",
    "PCGradState",
    "RLWState",
    "RepresentationRows",
    "SAC",
    "SACState",
    "SDMGradState",
    "STCHState",
    "StackedRows",
    "ValueAndGrad",
    "ThresholdState",
    "aggregator",
    "aligned_mtl",
    "aligned_mtl_weights",
    "apply_if_finite",
    "cagrad",
    "cagrad_weights",
    "config",
    "config_weights",
    "constant",
    "cosmos",
    "cr_mogm",
    "cr_mogm_weights",
    "db_mtl",
    "delta_m",
    "diagnostics_from_gram",
    "diagnostics_from_rows",
    "dualproj",
    "dualproj_weights",
    "dwa",
    "effective_weights",
    "equal_weights",
    "excess_mtl",
    "fairgrad",
    "fairgrad_weights",
    "famo",
    "fusion",
    "gls",
    "graddrop",
    "gradnorm",
    "gradvac",
    "gradvac_weights",
    "gram_aggregator",
    "igb_v1",
    "igb_v2",
    "imgrad",
    "imgrad_nash",
    "imgrad_nash_weights",
    "imgrad_weights",
    "imtl",
    "imtl_g",
    "imtl_g_weights",
    "imtl_l",
    "krum",
    "krum_weights",
    "log_losses",
    "mean_tasks",
    "mgda",
    "mgda_weights",
    "moco",
    "modo",
    "modo_weights",
    "nash_mtl",
    "nash_mtl_weights",
    "pcd",
    "pcd_weights",
    "pbi",
    "pcgrad",
    "pcgrad_weights",
    "registry",
    "reweighter",
    "rlw",
    "row_like",
    "sac",
    "sdmgrad",
    "sdmgrad_weights",
    "stch",
    "sum_tasks",
    "task_weights",
    "threshold",
    "trimmed_mean",
    "upgrad",
    "upgrad_weights",
    "uw",
    "value_and_grad",
    "value_and_jacrev",
    "value_and_representation_jacrev",
    "value_and_reweighted_grad",
    "with_diagnostics",
)
