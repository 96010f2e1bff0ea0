"""Embedded TFDS builders and the grain input pipeline."""

import os

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


def _augmented_sources():
  """(source, train preprocess) pairs for every random augmentation."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, size=(48, 8, 8, 3)).astype(np.uint8)
  big = rng.integers(0, 255, size=(48, 12, 10, 3)).astype(np.uint8)
  signals = rng.standard_normal((48, 40)).astype(np.float32)
  labels = np.arange(48, dtype=np.int32)
  img = dict(mean=(0, 0, 0), std=(1, 1, 1))
  return {
      "flip_crop": (data.ArraySource({"input": images, "label": labels}),
                    data.make_preprocess_fn("image", train=True, augment="flip_crop", **img)),
      "inception_crop": (data.ArraySource({"input": big, "label": labels}),
                         data.make_preprocess_fn("image", train=True, augment="inception_crop",
                                                 image_size=8, **img)),
      "shift_noise": (data.ArraySource({"input": signals, "label": labels}),
                      data.make_preprocess_fn("vector", train=True, augment="shift_noise")),
  }


def _global_batches(src, fn, process_count, steps=3, old_seeding=False):
  """The first ``steps`` global batches, each the concatenation of every process's share."""
  shares = []
  for p in range(process_count):
    if old_seeding:  # What the pipeline did before: grain seeds one rng per batch index.
      idx = data.BatchIndices(len(src), 16, p, process_count, seed=0)
      ds = idx.map(lambda e: src.gather(e["index"])).seed(0).random_map(fn).to_iter_dataset()
    else:
      ds = data.train_dataset(src, fn, global_batch_size=16, seed=0, process_index=p,
                              process_count=process_count)
    it = iter(ds)
    shares.append([next(it) for _ in range(steps)])
  return [{k: np.concatenate([s[i][k] for s in shares]) for k in shares[0][i]}
          for i in range(steps)]


@pytest.mark.parametrize("augment", ["flip_crop", "inception_crop", "shift_noise"])
def test_augmented_global_batches_do_not_depend_on_process_count(augment):
  src, fn = _augmented_sources()[augment]
  one = _global_batches(src, fn, 1)
  for n in (2, 4):
    for a, b in zip(one, _global_batches(src, fn, n)):
      np.testing.assert_array_equal(a["label"], b["label"])
      np.testing.assert_array_equal(a["input"], b["input"], err_msg=f"{augment}, {n} processes")
  # Augmentation really happened, and grain's per-element seeding (the old pipeline) gives
  # every process the same draws for its row j, so 2 processes differ from 1 there.
  assert not np.array_equal(one[0]["input"], fn(src.gather(one[0]["label"]),
                                                 np.random.default_rng(5))["input"])
  old_one = _global_batches(src, fn, 1, old_seeding=True)
  old_two = _global_batches(src, fn, 2, old_seeding=True)
  np.testing.assert_array_equal(old_one[0]["label"], old_two[0]["label"])
  assert not np.array_equal(old_one[0]["input"], old_two[0]["input"])


def test_imagenet_train_augmentation_flips():
  """inception_crop is followed by a random horizontal flip (reference recipes)."""
  image = np.tile(np.arange(16, dtype=np.uint8)[None, :, None] * 10, (16, 1, 3))
  fn = data.make_preprocess_fn("image", train=True, augment="inception_crop", image_size=16,
                               mean=(0, 0, 0), std=(1, 1, 1))
  rngs = [np.random.default_rng([0, i]) for i in range(64)]
  out = fn({"input": [image] * 64, "label": np.zeros(64, np.int32)}, rngs)["input"][..., 0]
  slope = np.diff(out.astype(np.float64), axis=2).mean(axis=(1, 2))  # Along the width.
  assert np.all(slope != 0)
  assert 10 < (slope > 0).sum() < 54  # Both orientations occur: the ramp was flipped.


def test_a_split_is_parsed_once_per_process_until_its_files_change(tmp_path):
  """The second run on the same files gets the arrays of the first (read-only, equal to
  a fresh parse); regenerated files are read anew."""
  spec = data.get_spec("digits")
  builder = data.get_builder("digits", str(tmp_path))
  first = data.load_split(builder, "train", spec)
  again = data.load_split(builder, "train", spec)
  assert again.arrays["input"] is first.arrays["input"]
  with pytest.raises(ValueError, match="read-only"):
    again.arrays["label"][0] = 0
  source = builder.as_data_source(split="train")
  fresh = np.stack([r[spec.input_key] for r in source.__getitems__(list(range(len(source))))])
  np.testing.assert_array_equal(first.arrays["input"], fresh)
  for f in os.scandir(builder.data_dir):  # As if regenerated: new times on the files.
    os.utime(f.path, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 1))
  reread = data.load_split(builder, "train", spec)
  assert reread.arrays["input"] is not first.arrays["input"]
  np.testing.assert_array_equal(reread.arrays["input"], fresh)
