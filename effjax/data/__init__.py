"""Datasets (TFDS builders, catalogue) and grain input pipelines."""

from effjax.data.builders import Digits, Mnist1d, mnist1d_config, mnist1d_train_size
from effjax.data.datasets import (ArraySource, DatasetError, DatasetSpec, EMBEDDED, SPECS, Head,
                                  RecordSource, default_data_dir, get_builder, get_spec,
                                  input_shape, load_split)
from effjax.data.pipeline import (BatchIndices, Prefetcher, eval_batches, make_train_iterator,
                                  num_eval_batches, train_dataset)
from effjax.data.preprocess import AUGMENTATIONS, make_preprocess_fn, mnist1d_view
from effjax.data.text import (PackedSource, PythonStdlib, VOCAB_SIZE, bigram_bits_per_byte,
                              decode, encode)
