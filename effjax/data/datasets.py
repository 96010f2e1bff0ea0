"""The dataset catalogue: embedded builders plus any TFDS dataset prepared in a ``data_dir``."""

import collections
import contextlib
import dataclasses
import os
from typing import Any, Optional

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

tfds.disable_progress_bar()

from effjax.data import builders
from effjax.data import preprocess as pp
from effjax.data import text

EMBEDDED = ("mnist1d", "digits", "python_stdlib")


class DatasetError(ValueError):
  """A dataset that cannot be found or read; the message names it and the data_dir."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """How effjax reads one dataset.

  Attributes:
    input_key, label_key: feature names in the TFDS records.
    kind: input kind for ``preprocess.make_preprocess_fn``; ``'text'``: documents packed
      into sequences of ``config.dataset.seq_len`` tokens (``effjax.data.text``).
    input_shape: the model's per-example input shape after preprocessing (text: set by
      the sequence length, see ``input_shape``).
    num_classes: label classes (checked against the TFDS features when loaded); text:
      the vocabulary size.
    train_split, eval_split: TFDS split names.
    in_memory: load the whole split into host memory (small datasets), instead of reading
      records by random access from array_record files.
    augment: default train augmentation.
    mean, std: per-channel statistics for image inputs.
  """
  input_key: str
  label_key: Optional[str]
  kind: str
  input_shape: tuple[int, ...]
  num_classes: int
  train_split: str = "train"
  eval_split: str = "test"
  in_memory: bool = False
  augment: str = "none"
  mean: Optional[tuple[float, ...]] = None
  std: Optional[tuple[float, ...]] = None


SPECS = {
    "mnist1d": DatasetSpec("x", "label", "vector", (40,), 10, in_memory=True),
    "digits": DatasetSpec("image", "label", "digits", (8, 8, 1), 10, in_memory=True),
    "cifar10": DatasetSpec("image", "label", "image", (32, 32, 3), 10, augment="flip_crop",
                           mean=pp.CIFAR_MEAN, std=pp.CIFAR_STD),
    "cifar100": DatasetSpec("image", "label", "image", (32, 32, 3), 100, augment="flip_crop",
                            mean=pp.CIFAR_MEAN, std=pp.CIFAR_STD),
    "imagenet2012": DatasetSpec("image", "label", "image", (224, 224, 3), 1000,
                                eval_split="validation", augment="inception_crop",
                                mean=pp.IMAGENET_MEAN, std=pp.IMAGENET_STD),
    "python_stdlib": DatasetSpec("text", None, "text", (), text.VOCAB_SIZE,
                                 eval_split="validation", in_memory=True),
    "lm1b": DatasetSpec("text", None, "text", (), text.VOCAB_SIZE, in_memory=True),
}


def input_shape(spec: DatasetSpec, seq_len: int = 0) -> tuple[int, ...]:
  """The model's per-example input shape: ``(seq_len,)`` for text, else the spec's."""
  return (int(seq_len),) if spec.kind == "text" else tuple(spec.input_shape)


def default_data_dir() -> str:
  """``$TFDS_DATA_DIR`` if set, else TFDS's own default ``~/tensorflow_datasets``."""
  return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def get_spec(name: str) -> DatasetSpec:
  if name not in SPECS:
    raise DatasetError(f"dataset.name={name!r} is not supported; expected one of {sorted(SPECS)}")
  return SPECS[name]


def get_builder(name: str, data_dir: Optional[str] = None, num_examples: Optional[int] = None,
                build: bool = True) -> tfds.core.DatasetBuilder:
  """Returns the TFDS builder for ``name``, prepared in ``data_dir``.

  Embedded datasets are generated on first use (no network). Any other dataset must
  already be prepared in ``data_dir`` as array_record files.

  Args:
    name: a key of ``SPECS``.
    data_dir: where TFDS datasets live; ``None`` means ``default_data_dir()``.
    num_examples: mnist1d only: total examples to generate (80/20 train/test).
    build: generate an embedded dataset if it is missing.

  Returns:
    A prepared ``tfds.core.DatasetBuilder``.

  Raises:
    DatasetError: the dataset is unknown or not prepared in ``data_dir``.
  """
  get_spec(name)
  data_dir = data_dir or default_data_dir()
  if name in EMBEDDED:
    return _embedded_builder(name, data_dir, num_examples, build)
  else:
    if not os.path.isdir(data_dir):
      raise DatasetError(f"dataset {name!r} not found: data_dir {data_dir!r} does not exist")
    # TFDS logs a warning for every version folder it cannot use; the error below says it.
    previous = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)
    try:
      builder = tfds.builder(name, data_dir=data_dir)
      prepared = builder.is_prepared()
    finally:
      logging.set_verbosity(previous)
    if not prepared:
      raise DatasetError(
          f"dataset {name!r} not found in data_dir {data_dir!r} (looked for {builder.data_dir}); "
          f"prepare it there with `tfds build {name} --data_dir={data_dir} "
          "--file_format=array_record`")
    return builder


@contextlib.contextmanager
def _quiet_absl():
  """absl (TFDS's logger) at ERROR: hides TFDS's "Using custom data configuration" and
  "Variant folder ... has no dataset_info.json" warnings about effjax's own builders."""
  previous = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    yield
  finally:
    logging.set_verbosity(previous)


def _embedded_builder(name: str, data_dir: str, num_examples: Optional[int], build: bool):
  """The builder of an embedded dataset, generated here (one printed line) if missing."""
  with _quiet_absl():
    if name == "mnist1d":
      n = num_examples or builders.MNIST1D_CANONICAL_SIZE
      config = (f"n{n}" if n == builders.MNIST1D_CANONICAL_SIZE else builders.mnist1d_config(n))
      builder = builders.Mnist1d(data_dir=data_dir, config=config, file_format="array_record")
      what = f"{n:,} examples"
    elif name == "digits":
      builder = builders.Digits(data_dir=data_dir, file_format="array_record")
      what = "scikit-learn's 1,797 scans"
    else:
      builder = text.PythonStdlib(data_dir=data_dir, file_format="array_record")
      what = f"the standard library source of {builder.builder_config.name}"
    if builder.is_prepared():
      return builder
    if not build:
      raise DatasetError(f"dataset {name!r} is not built in data_dir {data_dir!r}")
    print(f"effjax: generating {name} ({what}) into {builder.data_dir} (once, locally; "
          "nothing is downloaded)", flush=True)
    builder.download_and_prepare(file_format="array_record")
  return builder


class ArraySource:
  """A split held in host memory as a dict of equally long numpy arrays (random access)."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    lengths = {len(v) for v in arrays.values()}
    if len(lengths) != 1:
      raise ValueError(f"arrays have different lengths: {lengths}")
    self.arrays = arrays
    self._len = lengths.pop()

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {k: v[index] for k, v in self.arrays.items()}

  def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[indices] for k, v in self.arrays.items()}


class Head:
  """The first ``n`` records of a random-access source (e.g. a probe's labelled subset)."""

  def __init__(self, source: Any, n: int):
    if not 0 < n <= len(source):
      raise ValueError(f"Head of {n} records from a source of {len(source)}")
    self.source, self._len = source, int(n)

  def __len__(self) -> int:
    return self._len

  def gather(self, indices: np.ndarray) -> dict[str, Any]:
    return self.source.gather(np.asarray(indices))


class RecordSource:
  """A split read by random access from array_record files, decoded per record."""

  def __init__(self, data_source: Any):
    self.data_source = data_source

  def __len__(self) -> int:
    return len(self.data_source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.data_source[int(index)]

  def gather(self, indices: np.ndarray) -> dict[str, Any]:
    records = self.data_source.__getitems__([int(i) for i in indices])
    out = {}
    for key in records[0]:
      values = [r[key] for r in records]
      try:
        out[key] = np.stack(values)
      except ValueError:  # Images of different sizes (ImageNet) stay a list until cropped.
        out[key] = values
    return out


_IN_MEMORY: collections.OrderedDict = collections.OrderedDict()
_IN_MEMORY_SIZE = 4  # Splits kept: a run's train and eval splits, of two datasets.


def _in_memory(builder: tfds.core.DatasetBuilder, split: str, spec: DatasetSpec, source):
  """A small split read into host memory: the text's token stream, or the ``input``,
  ``label`` and ``id`` arrays. Kept (read-only) for the next run in this process on the
  same files: a sweep's worker or a notebook parses each split once, not once per run
  (TFDS parses record by record: 0.4 s for mnist1d's 5000)."""
  files = tuple((e.name, st.st_mtime_ns, st.st_size)
                for e in sorted(os.scandir(builder.data_dir), key=lambda e: e.name)
                for st in [e.stat()])
  key = (builder.data_dir, split, spec.kind, spec.input_key, spec.label_key, files)
  if key in _IN_MEMORY:
    _IN_MEMORY.move_to_end(key)
    return _IN_MEMORY[key]
  records = source.__getitems__(list(range(len(source))))
  if spec.kind == "text":
    value = text.encode(r[spec.input_key] for r in records)
    value.setflags(write=False)
  else:
    value = {"input": np.stack([r[spec.input_key] for r in records]),
             "label": np.asarray([r[spec.label_key] for r in records], np.int32),
             "id": np.asarray([r.get("id", i) for i, r in enumerate(records)], np.int64)}
    for v in value.values():
      v.setflags(write=False)
  _IN_MEMORY[key] = value
  while len(_IN_MEMORY) > _IN_MEMORY_SIZE:
    _IN_MEMORY.popitem(last=False)
  return value


def load_split(builder: tfds.core.DatasetBuilder, split: str, spec: DatasetSpec,
               seq_len: int = 0, train: bool = True):
  """Returns a random-access source over ``split``: with keys ``input`` and ``label``, or
  for text a ``text.PackedSource`` of ``seq_len``-token sequences (with ``train=False``
  the last, partial one is padded, so that eval scores every token).

  A text split is read into host memory once, as a uint16 token stream (2 bytes per
  byte of text: python_stdlib 20 MB; lm1b's train split about 8 GB)."""
  if split.split("[")[0] not in builder.info.splits:  # "validation[:2%]" slices one.
    raise DatasetError(f"split {split!r} not in dataset {builder.name!r}; "
                       f"available: {sorted(builder.info.splits)}")
  try:
    source = builder.as_data_source(split=split)
  except Exception as e:  # pylint: disable=broad-except
    raise DatasetError(f"cannot read dataset {builder.name!r} split {split!r} from "
                       f"{builder.data_dir!r} as array_record: {e}") from e
  if spec.kind == "text":
    return text.PackedSource(_in_memory(builder, split, spec, source), seq_len,
                             pad_tail=not train)
  if spec.in_memory:
    return ArraySource(_in_memory(builder, split, spec, source))
  return _RenamedSource(RecordSource(source), spec)


class _RenamedSource:
  """Maps a record source's feature names to ``input``/``label``."""

  def __init__(self, source: RecordSource, spec: DatasetSpec):
    self.source, self.spec = source, spec

  def __len__(self) -> int:
    return len(self.source)

  def gather(self, indices: np.ndarray) -> dict[str, Any]:
    batch = self.source.gather(indices)
    return {"input": batch[self.spec.input_key], "label": batch[self.spec.label_key]}
