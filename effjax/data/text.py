"""Byte-level text: the embedded ``python_stdlib`` corpus, sequence packing, a bigram baseline.

Tokens are bytes shifted by 2: ``PAD = 0``, ``BOS = 1`` (starts every document), byte
``c`` is token ``c + 2``; ``VOCAB_SIZE = 258``. A split becomes one stream of tokens,
``[BOS, doc 1..., BOS, doc 2..., ...]``, cut into windows of ``L + 1`` tokens at stride
``L`` (``PackedSource``): sequence ``k`` predicts stream tokens ``kL+1 .. kL+L`` from
``kL .. kL+L-1``, so every pair of neighbouring stream tokens is a prediction exactly once.
Segment ids and positions restart at each document inside a window, and at the window's
start for a document continued from the previous window (T5-style packing: the
continuation attends only within its window); a pair whose two tokens belong to different
documents (or padding) has weight 0. Packing is index
arithmetic over the stream, so the grain pipeline shuffles and checkpoints sequence
indices exactly as it does records.
"""

import hashlib
import math
import os
import sys
import sysconfig
from typing import Iterable

import numpy as np
import tensorflow_datasets as tfds

from effjax.data import builders

PAD, BOS, OFFSET = 0, 1, 2
VOCAB_SIZE = 256 + OFFSET
_VALIDATION_EVERY = 20  # One file in 20 (by path hash) is validation.
_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages",
                  "__pycache__"}


def stdlib_files(root: str | None = None) -> list[str]:
  """The standard library's ``*.py`` files (relative paths, sorted), without tests and
  installed packages: ``sysconfig``'s ``stdlib`` path of the running interpreter."""
  root = root or sysconfig.get_paths()["stdlib"]
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
    for f in filenames:
      if f.endswith(".py") and not f.startswith("test_"):
        out.append(os.path.relpath(os.path.join(dirpath, f), root))
  return sorted(out)


def is_validation_file(relpath: str) -> bool:
  """The deterministic split: a file is validation when its path's SHA-256 is 0 mod 20."""
  return int(hashlib.sha256(relpath.encode()).hexdigest()[:8], 16) % _VALIDATION_EVERY == 0


class PythonStdlib(builders.EmbeddedBuilder):
  """The running interpreter's standard-library source as byte-level documents, one per
  file: real text that nobody here wrote (about 10 MB for Python 3.11), built locally.

  The builder config is named after the Python version (``py3.11``); the dataset's
  metadata records that version, the number of files and a SHA-256 of all paths and
  contents, so two machines can check that they train on the same text.
  """

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(
      name=f"py{sys.version_info.major}.{sys.version_info.minor}",
      description=f"Python {sys.version_info.major}.{sys.version_info.minor}'s stdlib.")]

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description="Byte-level Python standard-library source, one document per file; "
                    "validation: files whose path hashes to 0 mod 20.",
        features=tfds.features.FeaturesDict({"text": tfds.features.Text(),
                                             "path": tfds.features.Text()}),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded.
    root = sysconfig.get_paths()["stdlib"]
    digest, docs = hashlib.sha256(), {"train": [], "validation": []}
    for rel in stdlib_files(root):
      with open(os.path.join(root, rel), "rb") as f:
        data = f.read()
      try:
        text = data.decode("utf-8")
      except UnicodeDecodeError:  # Kept as bytes would not round-trip through Text.
        continue
      digest.update(rel.encode() + b"\0" + data + b"\0")
      docs["validation" if is_validation_file(rel) else "train"].append((rel, text))
    self.info.metadata.update(python_version=sys.version.split()[0],
                              content_sha256=digest.hexdigest(),
                              num_files=sum(len(v) for v in docs.values()))
    return {split: self._generate_examples(v) for split, v in docs.items()}

  def _generate_examples(self, docs):
    for rel, text in docs:
      yield rel, {"text": text, "path": rel}


def encode(texts: Iterable) -> np.ndarray:
  """Documents (``str`` or ``bytes``) -> one uint16 token stream, each prefixed by BOS."""
  parts = []
  for t in texts:
    b = t.encode("utf-8") if isinstance(t, str) else bytes(t)
    parts.append(np.asarray([BOS], np.uint16))
    parts.append(np.frombuffer(b, np.uint8).astype(np.uint16) + OFFSET)
  return np.concatenate(parts) if parts else np.zeros((0,), np.uint16)


def decode(tokens: np.ndarray) -> bytes:
  """Tokens -> bytes (PAD and BOS dropped)."""
  t = np.asarray(tokens)
  return (t[t >= OFFSET] - OFFSET).astype(np.uint8).tobytes()


class PackedSource:
  """Fixed-length packed sequences over a token stream, by random access.

  Sequence ``k`` is the window ``stream[kL : kL+L+1]`` (the last one padded when
  ``pad_tail``; else only full windows). ``gather(indices)`` returns int32
  ``inputs``, ``targets``, ``segment_ids`` (1, 2, ... per document in the window; 0 on
  padding), ``positions`` (restarting at each document) and float32 ``weights``.

  Args:
    stream: the token stream (``encode``).
    seq_len: ``L``.
    pad_tail: include the last, partial window (eval: every pair predicted once).
  """

  def __init__(self, stream: np.ndarray, seq_len: int, pad_tail: bool = False):
    if seq_len < 1:
      raise ValueError(f"seq_len={seq_len} must be positive")
    self.stream = np.asarray(stream, np.uint16)
    self.seq_len = int(seq_len)
    self.doc_ids = np.cumsum(self.stream == BOS, dtype=np.int32)
    pairs = max(len(self.stream) - 1, 0)
    self._len = -(-pairs // self.seq_len) if pad_tail else pairs // self.seq_len

  def __len__(self) -> int:
    return self._len

  def gather(self, indices) -> dict[str, np.ndarray]:
    idx = np.asarray(indices, np.int64)[:, None] * self.seq_len + np.arange(self.seq_len + 1)
    n = len(self.stream)
    valid = idx < n
    safe = np.minimum(idx, n - 1)
    tok = np.where(valid, self.stream[safe], PAD).astype(np.int32)
    doc = np.where(valid, self.doc_ids[safe], -1)
    seg = np.where(valid[:, :-1], doc[:, :-1] - doc[:, :1] + 1, 0).astype(np.int32)
    j = np.arange(self.seq_len)
    start = np.concatenate([np.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    positions = j - np.maximum.accumulate(np.where(start, j, 0), axis=1)
    weights = (valid[:, 1:] & (doc[:, 1:] == doc[:, :-1])).astype(np.float32)
    return {"inputs": tok[:, :-1], "targets": tok[:, 1:], "segment_ids": seg,
            "positions": positions.astype(np.int32), "weights": weights}


def pair_counts(source: PackedSource) -> np.ndarray:
  """Counts of ``(token, next token)`` pairs inside one document, ``[V, V]``."""
  s, d = source.stream.astype(np.int64), source.doc_ids
  same = d[1:] == d[:-1]
  return np.bincount(s[:-1][same] * VOCAB_SIZE + s[1:][same],
                     minlength=VOCAB_SIZE * VOCAB_SIZE).reshape(VOCAB_SIZE, VOCAB_SIZE)


def bigram_bits_per_byte(train: PackedSource, evals: PackedSource) -> float:
  """Bits per byte of an add-one bigram model counted on ``train``, on the pairs that an
  LM is scored on in ``evals`` (every within-document pair of its stream, once)."""
  counts = pair_counts(train).astype(np.float64) + 1.0
  logp = np.log(counts / counts.sum(axis=1, keepdims=True))
  ev = pair_counts(evals)
  return float(-(ev * logp).sum() / ev.sum() / math.log(2.0))
