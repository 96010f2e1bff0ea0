"""Optimizers, batch-size scaling rules and learning-rate schedules."""

from effjax.optim.factory import OPTIMIZERS, WEIGHT_DECAY_MASKS, create_optimizer, decay_mask
from effjax.optim.scaling import SCALING_RULES, scale_learning_rate
from effjax.optim.schedules import DECAYS, warmup_schedule
