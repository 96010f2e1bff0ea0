r"""Trains a model from a config: ``python -m experiments.train --config=... --workdir=...``.

Examples:
  python -m experiments.train --config=configs/mnist1d_large_batch.py --workdir=/tmp/lb
  python -m experiments.train --config=configs/imagenet_resnet50.py --workdir=/tmp/x \
      --dry_run --config.dry_run_devices=256
  python -m experiments.train --config=configs/lm_python_stdlib.py:1.3b --dry_run

Exit codes: 0 done; 2 bad config, flag, workdir, dataset, or checkpoints in the workdir
that do not match the config (nothing written); 3 non-finite loss (the last checkpoint
holds the last finite state); 4 preempted by SIGTERM/SIGINT (a checkpoint of the current
step was written; re-run the same command to resume).
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a get_config() file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the summary.")
flags.DEFINE_bool("dry_run", False, "Build, compile one step, print sizes and cost, exit.")


def fail(message: str, code: int = 2):
  sys.stderr.write(f"error: {message}\n")
  sys.exit(code)


def _last_line(e: BaseException) -> str:
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return lines[-1] if lines else type(e).__name__


def parse_flags(argv):
  try:
    return FLAGS(argv)
  except flags.Error as e:
    if "parsing config file" in str(e):  # get_config() raised: its own last line says why.
      fail(f"cannot load --config={_config_arg()}: {_last_line(e)}")
    fail(str(e).splitlines()[0] if str(e) else repr(e))
  except (KeyError, AttributeError) as e:  # --config.<key> names no key of the config.
    key = str(e).strip().splitlines()[0].strip("'\"")
    bad = [a for a in argv if a.startswith("--config.") and key in a.split("=")[0]]
    fail(f"unknown config key in {bad[0] if bad else key!r}; allowed keys are those of "
         "effjax.config.base_config()")
  except (ValueError, TypeError) as e:
    fail(str(e).strip().splitlines()[0])
  except Exception as e:  # pylint: disable=broad-except
    # The config file itself does not load (a syntax error, an exception on import).
    fail(f"cannot load --config={_config_arg()}: {type(e).__name__}: {_last_line(e)}")


def _config_arg() -> str:
  return next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), "?")


def load_config():
  """``FLAGS.config``, or a one-line error (exit 2) for a missing or unloadable file."""
  try:
    config = FLAGS.config
    if config is not None:
      config.keys()  # A file that failed to load raises only when first read.
  except Exception as e:  # pylint: disable=broad-except
    fail(f"cannot load --config={_config_arg()}: {_last_line(e.__cause__ or e)}")
  if config is None:
    fail("--config is required, e.g. --config=configs/mnist1d_large_batch.py")
  return config


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; use --config, --workdir and --config.<key>=<value>")
  config = load_config()
  # Imported here so that flag errors answer fast, and so jax.distributed can initialise
  # before anything else touches a JAX backend.
  logging.set_verbosity(logging.WARNING)  # Orbax and TFDS log every file they touch at INFO.
  import effjax  # pylint: disable=g-import-not-at-top
  from effjax import data as data_lib  # pylint: disable=g-import-not-at-top
  try:
    effjax.validate(config)
    if FLAGS.dry_run:
      info = effjax.dry_run(config)
      mem = info["memory_per_device_bytes"]
      print(f"parameters:           {info['num_params']:,}")
      print(f"devices:              {info['num_devices']}")
      print("mesh (data, fsdp):    ({}, {})".format(*info["mesh"]))
      print(f"per-device batch:     {info['per_device_batch']}")
      print(f"FLOPs per step:       {info['flops_per_step']:.4g}")
      mib = lambda b: f"{b / 2**20:.1f} MiB" if b is not None else "n/a"
      print("memory per device:    " + mib(mem))
      for part, nbytes in info["memory"].items():
        print(f"  {part + ':':20s}{mib(nbytes)}")
      return
    if not FLAGS.workdir:
      fail("--workdir is required")
    effjax.distributed.maybe_initialize(config.distributed)
    import jax  # pylint: disable=g-import-not-at-top
    if jax.default_backend() == "cpu":
      effjax.distributed.pool_host_memory()  # Else each step faults its temporaries in anew.
    effjax.train_and_evaluate(config, FLAGS.workdir)
  except (effjax.ConfigError, data_lib.DatasetError) as e:
    fail(str(e))
  except effjax.NonFiniteError as e:
    fail(str(e), effjax.EXIT_NONFINITE)
  except effjax.Preempted as e:
    sys.stderr.write(f"{e}\n")
    sys.exit(effjax.EXIT_PREEMPTED)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
