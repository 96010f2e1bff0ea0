"""effjax: efficient large-batch training in JAX/Flax.

Public API:
  * ``effjax.train_and_evaluate(config, workdir)``, ``effjax.dry_run(config)``
  * ``effjax.train_step``, ``effjax.eval_step``, ``effjax.TrainState``
  * ``effjax.tasks``: the ``Task`` interface, ``ClassificationTask``, ``LanguageModelTask``,
    ``ContrastiveTask``
  * ``effjax.losses``: contrastive losses with global negatives (``nt_xent``,
    ``sigmoid_loss`` with its ``ppermute`` ring); ``effjax.moe``: expert routing and the
    load-balancing loss over the global batch
  * ``effjax.plot``: training curves from ``metrics.jsonl``
  * ``effjax.nnx`` (imported on its own): the batch-statistics layers as Flax NNX modules
  * ``effjax.Runner`` (shard_map / pmap), ``effjax.DATA_AXIS``
  * subpackages ``effjax.data``, ``effjax.models``, ``effjax.nn``, ``effjax.optim``; modules
    ``effjax.config``, ``effjax.checkpoint``, ``effjax.metrics``, ``effjax.distributed``, ``effjax.preemption``,
    ``effjax.stats`` (noise scale), ``effjax.adaptive`` (adaptive batch size),
    ``effjax.grid`` and ``effjax.sweep`` (multi-run experiments).
"""

from effjax import parallel

parallel.size_cpu_thread_pool()  # Before any JAX computation; see its docstring.

# pylint: disable=g-import-not-at-top,wrong-import-position
from effjax import (adaptive, checkpoint, config, data, distributed, grid, losses, metrics,
                    models, moe, nn, optim, plot, preemption, stats, sweep, tasks)
from effjax.config import ConfigError, base_config, validate
from effjax.preemption import EXIT_PREEMPTED, Preempted, PreemptionGuard
from effjax.parallel import (DATA_AXIS, Runner, global_norm, group_psum, make_mesh, packed_pmean,
                             packed_psum)
from effjax.steps import TrainState, create_train_state, cross_entropy, eval_step, train_step
from effjax.tasks import (ClassificationTask, ContrastiveTask, LanguageModelTask, LossOutput,
                          Task)
from effjax.trainer import EXIT_NONFINITE, NonFiniteError, dry_run, evaluate, train_and_evaluate

__version__ = "0.1.0"
