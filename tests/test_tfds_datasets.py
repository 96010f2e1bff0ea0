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


def test_train_resnet20_on_prepared_dataset(cifar_dir, tmp_path):
  config = tiny_config(cifar_dir, **{"dataset.name": "cifar10", "dataset.num_train_examples": 96,
                                     "model.name": "resnet20", "batch_size": 32,
                                     "eval_batch_size": 16, "num_epochs": 2.0})
  summary = effjax.train_and_evaluate(config, str(tmp_path), verbose=False)
  assert summary["final_step"] == 6
  assert summary["eval/count"] == 40  # 40 = 2 full global batches of 16 + a masked partial.
  assert np.isfinite(summary["eval/loss"])


def test_unprepared_split_or_missing_version_is_named(tmp_path):
  (tmp_path / "cifar10").mkdir()
  with pytest.raises(data_lib.DatasetError, match="dataset 'cifar10' not found in data_dir"):
    data_lib.get_builder("cifar10", str(tmp_path))
