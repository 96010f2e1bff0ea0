"""The path for TFDS datasets prepared in a data_dir (cifar10, imagenet2012, ...).

No real dataset can be downloaded here, so a stand-in builder writes a tiny ``cifar10``
(same name, version, features and splits as the real one) into a temporary data_dir;
effjax then finds it through ``tfds.builder('cifar10', data_dir=...)`` as it would the
real thing, reads PNG-encoded images by random access and trains on them.
"""

import io

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

import effjax
from effjax import data as data_lib
from tests.helpers import tiny_config


class _StandInCifar10(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  name = "cifar10"
  VERSION = tfds.core.Version("3.0.2")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "id": tfds.features.Text(),
        "image": tfds.features.Image(shape=(32, 32, 3)),
        "label": tfds.features.ClassLabel(num_classes=10)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(96, 0), "test": self._generate_examples(40, 1)}

  def _generate_examples(self, n, seed):
    rng = np.random.default_rng(seed)
    for i in range(n):
      label = i % 10
      image = rng.integers(0, 64, size=(32, 32, 3)).astype(np.uint8)
      image[:, :, label % 3] += np.uint8(12 * label)  # Make the classes learnable.
      png = io.BytesIO()
      PIL.Image.fromarray(image).save(png, format="PNG")  # As prepared with TensorFlow.
      yield f"{seed}_{i}", {"id": f"{seed}_{i}", "image": png.getvalue(), "label": label}


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds_cifar"))
  _StandInCifar10(data_dir=d, file_format="array_record").download_and_prepare(
      file_format="array_record")
  return d


def test_prepared_tfds_dataset_is_found_and_read(cifar_dir):
  builder = data_lib.get_builder("cifar10", cifar_dir)
  assert type(builder).__name__ == "Cifar10"  # TFDS's own class, not the stand-in.
  spec = data_lib.get_spec("cifar10")
  source = data_lib.load_split(builder, "train", spec)
  assert len(source) == 96
  batch = source.gather(np.arange(8))
  assert batch["input"].shape == (8, 32, 32, 3) and batch["input"].dtype == np.uint8
  fn = data_lib.make_preprocess_fn("image", train=True, augment="flip_crop",
                                   mean=spec.mean, std=spec.std)
  out = fn(batch, np.random.default_rng(0))
  assert out["input"].dtype == np.float32 and out["input"].shape == (8, 32, 32, 3)
  assert abs(float(out["input"].mean())) < 3.0


def test_train_on_prepared_dataset(cifar_dir, tmp_path):
  """A prepared cifar10-shaped dataset trains and evaluates end to end: its images through
  the input pipeline into a model, every test example counted once. (An MLP: the model is
  not what is tested here; ResNet-20 takes every norm in test_models.py, and compiling
  its train step cost this test 7 of its 18-26 s in the suite.)"""
  config = tiny_config(cifar_dir, **{"dataset.name": "cifar10", "dataset.num_train_examples": 96,
                                     "model.name": "mlp", "batch_size": 32,
                                     "eval_batch_size": 16, "num_epochs": 2.0})
  summary = effjax.train_and_evaluate(config, str(tmp_path), verbose=False)
  assert summary["final_step"] == 6
  assert summary["eval/count"] == 40  # 40 = 2 full global batches of 16 + a masked partial.
  assert np.isfinite(summary["eval/loss"])


def test_unprepared_split_or_missing_version_is_named(tmp_path):
  (tmp_path / "cifar10").mkdir()
  with pytest.raises(data_lib.DatasetError, match="dataset 'cifar10' not found in data_dir"):
    data_lib.get_builder("cifar10", str(tmp_path))


class _StandInLm1b(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A tiny ``lm1b`` with the real one's name, version, ``text`` feature and splits."""
  name = "lm1b"
  VERSION = tfds.core.Version("1.1.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(300, 0), "test": self._generate_examples(40, 1)}

  def _generate_examples(self, n, seed):
    rng = np.random.default_rng(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "home"]
    for i in range(n):
      yield f"{seed}_{i}", {"text": " ".join(rng.choice(words, rng.integers(3, 12))) + " ."}


def test_prepared_text_dataset_is_packed_and_trains_an_lm(tmp_path_factory, tmp_path):
  d = str(tmp_path_factory.mktemp("tfds_lm1b"))
  _StandInLm1b(data_dir=d, file_format="array_record").download_and_prepare(
      file_format="array_record")
  builder = data_lib.get_builder("lm1b", d)
  assert builder.name == "lm1b"  # Found by name in the data_dir.
  spec = data_lib.get_spec("lm1b")
  train = data_lib.load_split(builder, "train", spec, seq_len=32)
  texts = [r["text"] for r in builder.as_data_source("train")]
  assert len(texts) == 300
  # The packed stream is every sentence, BOS-prefixed, in the split's order.
  np.testing.assert_array_equal(train.stream, data_lib.encode(texts))
  config = tiny_config(d, **{"task": "lm", "dataset.name": "lm1b", "dataset.seq_len": 32,
                             "dataset.num_train_examples": 64, "model.name": "decoder_lm",
                             "model.widths": (32,), "model.num_heads": 2, "batch_size": 16,
                             "eval_batch_size": 16, "num_epochs": 4.0,
                             "optimizer.name": "adamw", "optimizer.base_learning_rate": 1e-2,
                             "optimizer.base_batch_size": 16})
  summary = effjax.train_and_evaluate(config, str(tmp_path), verbose=False)
  assert summary["final_step"] == 16
  # Uniform over the 258 tokens is 8.0 bits per byte; 16 steps learn the ten words' letters.
  assert summary["eval/bits_per_byte"] < 4.0
  assert 0 < summary["baseline/bigram_bits_per_byte"] < 3.0
  # Eval scores every within-sentence pair of the test split once.
  test = data_lib.load_split(builder, "test", spec, seq_len=32, train=False)
  assert summary["eval/count"] == data_lib.text.pair_counts(test).sum()
