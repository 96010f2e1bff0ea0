"""Optimizers, batch-size scaling rules and learning-rate schedules."""

from effjax.optim.factory import (ELEMENTWISE_OPTIMIZERS, OPTIMIZERS, WEIGHT_DECAY_MASKS,
                                  create_optimizer, decay_mask,
                                  is_lr_injected, set_learning_rate)
from effjax.optim.scaling import SCALING_RULES, ema_decay_for_batch, scale_learning_rate
from effjax.optim.schedules import DECAYS, warmup_schedule
from effjax.optim.transforms import (ScaleByLambState, ScaleByTrustRatioState, all_mask,
                                     clip_by_global_norm, default_mask, lamb, lars,
                                     scale_by_lamb, scale_by_trust_ratio, stacked_mask,
                                     trust_ratio_stats,
                                     trust_ratios, tvlars, tvlars_factor)
