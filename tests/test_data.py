"""Embedded TFDS builders and the grain input pipeline."""

import numpy as np
import pytest

from effjax import data


def _split_by_id(data_dir, name, split, **kw):
  builder = data.get_builder(name, data_dir, **kw)
  src = data.load_split(builder, split, data.get_spec(name))
  order = np.argsort(src.arrays["id"])
  return {k: v[order] for k, v in src.arrays.items()}


def test_mnist1d_reproduces_canonical_split(data_dir):
  from mnist1d.data import get_dataset_args, make_dataset
  ref = make_dataset(get_dataset_args())
  train = _split_by_id(data_dir, "mnist1d", "train")
  test = _split_by_id(data_dir, "mnist1d", "test")
  assert train["input"].shape == (4000, 40) and test["input"].shape == (1000, 40)
  np.testing.assert_array_equal(train["id"], np.arange(4000))
  np.testing.assert_allclose(train["input"], ref["x"].astype(np.float32), rtol=0, atol=0)
  np.testing.assert_array_equal(train["label"], ref["y"])
  np.testing.assert_allclose(test["input"], ref["x_test"].astype(np.float32), rtol=0, atol=0)
  np.testing.assert_array_equal(test["label"], ref["y_test"])


def test_mnist1d_scales_to_n_examples(tmp_path):
  from mnist1d.data import get_dataset_args, make_dataset
  args = get_dataset_args()
  args.num_samples = 3000
  ref = make_dataset(args)
  train = _split_by_id(str(tmp_path), "mnist1d", "train", num_examples=3000)
  test = _split_by_id(str(tmp_path), "mnist1d", "test", num_examples=3000)
  assert len(train["label"]) == 2400 == data.mnist1d_train_size(3000)
  assert len(test["label"]) == 600
  np.testing.assert_array_equal(train["input"], ref["x"].astype(np.float32))
  np.testing.assert_array_equal(test["label"], ref["y_test"])


def test_digits_matches_sklearn(data_dir):
  from sklearn.datasets import load_digits
  ref = load_digits()
  train = _split_by_id(data_dir, "digits", "train")
  test = _split_by_id(data_dir, "digits", "test")
  assert len(train["label"]) + len(test["label"]) == 1797
  assert not set(train["id"]) & set(test["id"])
  for part in (train, test):
    np.testing.assert_array_equal(part["input"][..., 0], ref.images[part["id"]])
    np.testing.assert_array_equal(part["label"], ref.target[part["id"]])


def test_missing_dataset_names_dataset_and_data_dir(tmp_path):
  with pytest.raises(data.DatasetError) as e:
    data.get_builder("cifar10", str(tmp_path))
  assert "cifar10" in str(e.value) and str(tmp_path) in str(e.value)
  with pytest.raises(data.DatasetError) as e:
    data.get_builder("imagenet2012", str(tmp_path / "nowhere"))
  assert "imagenet2012" in str(e.value) and "nowhere" in str(e.value)
  assert not (tmp_path / "nowhere").exists()


def _source(n):
  return data.ArraySource({"input": np.arange(n, dtype=np.float32)[:, None],
                           "label": np.arange(n, dtype=np.int32)})


_ident = lambda batch, rng: batch


def _batches(n, batch_size, steps, **kw):
  it = iter(data.train_dataset(_source(n), _ident, global_batch_size=batch_size, **kw))
  return [next(it)["label"] for _ in range(steps)]


def test_every_epoch_is_a_fresh_permutation():
  n, b = 96, 16
  batches = np.concatenate(_batches(n, b, 3 * n // b, seed=3))
  epochs = batches.reshape(3, n)
  for e in epochs:
    np.testing.assert_array_equal(np.sort(e), np.arange(n))
  assert not np.array_equal(epochs[0], epochs[1])
  assert not np.array_equal(epochs[0], np.arange(n))
  other = np.concatenate(_batches(n, b, n // b, seed=4))
  assert not np.array_equal(other, epochs[0])


@pytest.mark.parametrize("num_processes", [2, 4])
def test_processes_read_disjoint_shares_of_the_same_global_batches(num_processes):
  n, b, steps = 100, 32, 9  # Batches straddle epoch boundaries (100 % 32 != 0).
  single = _batches(n, b, steps, seed=1)
  shares = [_batches(n, b, steps, seed=1, process_index=p, process_count=num_processes)
            for p in range(num_processes)]
  for k in range(steps):
    np.testing.assert_array_equal(np.concatenate([s[k] for s in shares]), single[k])


def test_position_restores_exactly():
  ds = data.train_dataset(_source(50), _ident, global_batch_size=8, seed=0)
  it = iter(ds)
  for _ in range(9):
    next(it)
  state = it.get_state()
  expected = [next(it)["label"] for _ in range(5)]
  resumed = data.make_train_iterator(ds, state)
  for e in expected:
    np.testing.assert_array_equal(next(resumed)["label"], e)


def test_indivisible_batch_over_processes_is_an_error():
  with pytest.raises(ValueError, match="not divisible by the process count 3"):
    data.BatchIndices(10, 16, 0, 3)


def test_eval_batches_cover_the_split_once_with_padding_masked():
  src = _source(10)
  seen, masks = [], []
  for p in range(2):
    for batch in data.eval_batches(src, _ident, global_batch_size=4, process_index=p,
                                   process_count=2):
      assert len(batch["label"]) == 2
      seen.append(batch["label"][batch["mask"] > 0])
      masks.append(batch["mask"])
  assert sum(m.sum() for m in masks) == 10
  np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(10))
  assert data.num_eval_batches(10, 4) == 3


def test_flip_crop_takes_windows_of_the_padded_image():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, size=(16, 8, 8, 3)).astype(np.uint8)
  out = data.preprocess.random_flip_crop(images, np.random.default_rng(1), pad=2)
  assert out.shape == images.shape
  padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
  for i in range(16):
    windows = [padded[i, y:y + 8, x:x + 8] for y in range(5) for x in range(5)]
    assert any(np.array_equal(out[i], w) or np.array_equal(out[i], w[:, ::-1]) for w in windows)


def test_augmentation_is_reproducible_from_the_seed():
  images = np.random.default_rng(0).integers(0, 255, size=(40, 8, 8, 3)).astype(np.uint8)
  src = data.ArraySource({"input": images, "label": np.zeros(40, np.int32)})
  fn = data.make_preprocess_fn("image", train=True, augment="flip_crop", mean=(0, 0, 0),
                               std=(1, 1, 1))
  get = lambda seed: next(iter(data.train_dataset(src, fn, global_batch_size=8, seed=seed)))
  np.testing.assert_array_equal(get(0)["input"], get(0)["input"])
  assert not np.array_equal(get(0)["input"], get(1)["input"])


def test_worker_processes_give_the_same_batches_and_restore():
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # grain's multiprocessing reads its absl flags.
  images = np.random.default_rng(0).integers(0, 255, size=(64, 8, 8, 3)).astype(np.uint8)
  src = data.ArraySource({"input": images, "label": np.arange(64, dtype=np.int32)})
  fn = data.make_preprocess_fn("image", train=True, augment="flip_crop", mean=(0, 0, 0),
                               std=(1, 1, 1))
  threads = iter(data.train_dataset(src, fn, global_batch_size=8, seed=0))
  workers_ds = data.train_dataset(src, fn, global_batch_size=8, seed=0, num_workers=2)
  workers = iter(workers_ds)
  for _ in range(5):
    np.testing.assert_array_equal(next(threads)["input"], next(workers)["input"])
  restored = data.make_train_iterator(workers_ds, workers.get_state())
  for _ in range(3):
    np.testing.assert_array_equal(next(threads)["input"], next(restored)["input"])
  workers.close()
  restored.close()
