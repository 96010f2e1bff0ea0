"""TFDS builders for effjax's embedded datasets, generated locally with no network.

* ``mnist1d``: the procedural generator of the ``mnist1d`` package (Greydanus 2020,
  arXiv:2011.14439) with its default arguments and seed 42. Builder config ``n5000``
  reproduces the canonical 4000/1000 split; ``n<N>`` scales it to N examples (80/20).
* ``digits``: scikit-learn's bundled 8x8 scans of handwritten digits (1797 examples),
  split 80/20 with a fixed permutation.

Both are written as ``array_record`` files so that they can be read by random access
(grain) without TensorFlow.
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

MNIST1D_CANONICAL_SIZE = 5000
_TRAIN_FRACTION = 0.8


class EmbeddedBuilder(tfds.core.GeneratorBasedBuilder):
  """A builder of data generated locally: TFDS's "Downloading and preparing dataset
  Unknown size ..." and "downloaded and prepared" lines are not printed (nothing is
  downloaded); ``effjax.data.get_builder`` prints one line of its own instead."""

  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass


@dataclasses.dataclass
class Mnist1dConfig(tfds.core.BuilderConfig):
  """Builder config for mnist1d: ``num_examples`` in total, split 80/20."""
  num_examples: int = MNIST1D_CANONICAL_SIZE


def mnist1d_train_size(num_examples):
  """Train-split size of ``n<num_examples>``: the generator makes ``num_examples // 10``
  examples per class and puts the first 80% in train. Works on ints and on
  ``ml_collections.FieldReference``s, so a config can derive it lazily."""
  return (num_examples // 10) * 8


def mnist1d_config(num_examples: int) -> Mnist1dConfig:
  """Returns the builder config that generates ``num_examples`` mnist1d examples."""
  return Mnist1dConfig(
      name=f"n{int(num_examples)}",
      version=Mnist1d.VERSION,
      num_examples=int(num_examples),
      description=f"{num_examples} examples from mnist1d's generator (seed 42).")


class Mnist1d(EmbeddedBuilder):
  """MNIST-1D (Greydanus 2020, arXiv:2011.14439), generated procedurally."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [
      Mnist1dConfig(name=f"n{MNIST1D_CANONICAL_SIZE}", version=tfds.core.Version("1.0.0"),
                    num_examples=MNIST1D_CANONICAL_SIZE,
                    description="The canonical 4000/1000 split."),
  ]

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description="MNIST-1D: 40-sample 1D signals of 10 digit templates.",
        features=tfds.features.FeaturesDict({
            "x": tfds.features.Tensor(shape=(40,), dtype=np.float32),
            "label": tfds.features.ClassLabel(num_classes=10),
            "id": np.int64,
        }),
        supervised_keys=("x", "label"),
        citation="Greydanus, S. Scaling down deep learning. arXiv:2011.14439 (2020).",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded.
    from mnist1d.data import get_dataset_args, make_dataset  # pylint: disable=g-import-not-at-top
    args = get_dataset_args()
    args.num_samples = self.builder_config.num_examples
    data = make_dataset(args)
    n_train = len(data["y"])
    return {
        "train": self._generate_examples(data["x"], data["y"], 0),
        "test": self._generate_examples(data["x_test"], data["y_test"], n_train),
    }

  def _generate_examples(self, xs, ys, first_id):
    for i, (x, y) in enumerate(zip(xs, ys)):
      # `id` is the position in mnist1d's own (x, x_test) arrays, so the split can be
      # compared with the package's output although TFDS reorders records on disk.
      yield i, {"x": x.astype(np.float32), "label": int(y), "id": first_id + i}


class Digits(EmbeddedBuilder):
  """scikit-learn's 8x8 handwritten digits (UCI optdigits test set)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description="1797 8x8 grey-level scans of digits, pixel values 0..16.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
            "id": np.int64,
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    digits = load_digits()
    perm = np.random.default_rng(0).permutation(len(digits.target))
    n_train = int(round(_TRAIN_FRACTION * len(perm)))
    images = digits.images.astype(np.uint8)[..., None]
    return {
        "train": self._generate_examples(images, digits.target, perm[:n_train]),
        "test": self._generate_examples(images, digits.target, perm[n_train:]),
    }

  def _generate_examples(self, images, labels, ids):
    for i in ids:
      yield int(i), {"image": images[i], "label": int(labels[i]), "id": int(i)}
