r"""Draws the training curves of one or several runs into one figure.

  python -m experiments.plot WORKDIR [WORKDIR ...] [--out=curves.png] [--x=step|examples]

Reads each ``WORKDIR/metrics.jsonl`` and draws loss, accuracy (or bits per byte, or
probe accuracy), LR, gradient/parameter/update norms, trust ratios, the noise scale and
the batch size where a run logged them, the runs overlaid (``effjax.plot``). Default
``--out``: ``WORKDIR/curves.png`` for one run, ``./curves.png`` for several.
"""

import os
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "The image to write (PNG).")
flags.DEFINE_enum("x", "step", ["step", "examples"], "The x-axis.")


def main(argv):
  workdirs = argv[1:]
  if not workdirs:
    sys.exit("error: name one or more workdirs: python -m experiments.plot WORKDIR ...")
  missing = [w for w in workdirs if not os.path.exists(os.path.join(w, "metrics.jsonl"))]
  if missing:
    sys.exit(f"error: no metrics.jsonl in {missing[0]!r}; give a run's workdir")
  from effjax import plot  # pylint: disable=g-import-not-at-top
  out = FLAGS.out or (os.path.join(workdirs[0], "curves.png") if len(workdirs) == 1
                      else "curves.png")
  drawn = plot.plot_curves(workdirs, out, x=FLAGS.x)
  print(f"wrote {out} ({', '.join(drawn)})")


if __name__ == "__main__":
  app.run(main)
