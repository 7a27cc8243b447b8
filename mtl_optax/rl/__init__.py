"""Reinforcement learning pieces: the Soft Actor-Critic agent that drives IGBv2."""

from mtl_optax.rl.replay import (ReplayBuffer, Transition, replay_add, replay_init,
                                 replay_sample)
from mtl_optax.rl.sac import SAC, SACState, sac
