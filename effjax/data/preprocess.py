"""Preprocessing and augmentation on host numpy batches (run in grain's worker threads).

Every function maps a batch ``{'input': ..., 'label': ...}`` of raw records to model-ready
float32 inputs and int32 labels. Random augmentations take one ``np.random.Generator``
per row, which the pipeline seeds from (dataset seed, the row's global stream position):
reproducible after a resume, and identical whatever the number of processes. (A single
generator for the whole batch is accepted too, for direct use.)
"""

from typing import Any, Callable, Sequence

import numpy as np

Batch = dict[str, Any]

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

AUGMENTATIONS = ("none", "flip_crop", "inception_crop", "shift_noise")
Rngs = np.random.Generator | Sequence[np.random.Generator]


def _draw(rngs: Rngs, b: int, fn: Callable[[np.random.Generator, Any], np.ndarray]):
  """``fn(rng, size)`` for a batch of ``b`` rows: one vectorised draw from a single
  generator, or one draw per row from per-row generators."""
  if isinstance(rngs, np.random.Generator):
    return fn(rngs, b)
  if len(rngs) != b:
    raise ValueError(f"{len(rngs)} row generators for a batch of {b}")
  return np.asarray([fn(r, None) for r in rngs])


def normalize(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """Per-channel ``(x - mean) / std`` in float32."""
  return ((x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(np.float32)


def random_flip_crop(images: np.ndarray, rng: Rngs, pad: int = 4) -> np.ndarray:
  """The standard CIFAR augmentation: zero-pad by ``pad``, random crop back, random h-flip.

  Vectorised over the batch: one gather instead of a Python loop over examples.
  ``rng`` is one generator per row (the pipeline's) or one for the batch.
  """
  b, h, w = images.shape[:3]
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  draws = _draw(rng, b, lambda r, n: np.stack([r.integers(0, 2 * pad + 1, size=n),
                                               r.integers(0, 2 * pad + 1, size=n),
                                               r.random(n) < 0.5], -1))
  dy, dx, flip = draws[:, 0].astype(np.int64), draws[:, 1].astype(np.int64), draws[:, 2] > 0
  rows = dy[:, None] + np.arange(h)[None, :]                       # (b, h)
  cols = dx[:, None] + np.arange(w)[None, :]                       # (b, w)
  cols = np.where(flip[:, None], cols[:, ::-1], cols)
  return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


def random_shift_noise(x: np.ndarray, rng: Rngs, max_shift: int = 4,
                       noise: float = 0.1) -> np.ndarray:
  """mnist1d-style augmentation of 1-D signals ``[b, length]``: a random circular
  translation by ``-max_shift..max_shift`` positions and iid Gaussian noise of std
  ``noise`` (two of the transforms that generate mnist1d, Greydanus 2020,
  arXiv:2011.14439)."""
  b, n = x.shape[:2]
  shifts = _draw(rng, b, lambda r, k: r.integers(-max_shift, max_shift + 1, size=k))
  eps = _draw(rng, b, lambda r, k: r.standard_normal((n,) if k is None else (k, n)))
  idx = (np.arange(n)[None, :] - shifts[:, None]) % n
  return (np.take_along_axis(x, idx, axis=1) + noise * eps).astype(np.float32)


def mnist1d_view(x: np.ndarray, rng: Rngs, max_shift: int = 8, scale_coeff: float = 0.4,
                 shear_scale: float = 0.75, corr_noise_scale: float = 0.25,
                 iid_noise_scale: float = 0.02) -> np.ndarray:
  """One random view of 1-D signals ``[b, length]`` from mnist1d's own transforms, in its
  order: scale by ``1 + scale_coeff * (u - 1/2)``, circular translation by
  ``-max_shift..max_shift``, correlated noise (``corr_noise_scale`` times Gaussian noise
  smoothed with sigma 2) and iid noise, then a linear shear of slope
  ``shear_scale * (u - 1/2)``. The defaults are mnist1d's generator arguments; the
  translation is in positions of the final 40-sample signal.

  ``rng`` is one generator per row (the pipeline's) or one for the batch; a row's view
  depends only on its generator, so a resumed run replays it exactly.

  References:
    Greydanus 2020, arXiv:2011.14439 (mnist1d's transforms; ``mnist1d.transform``).
  """
  from scipy.ndimage import gaussian_filter1d  # pylint: disable=g-import-not-at-top
  x = np.asarray(x, np.float32)
  b, n = x.shape[:2]

  def draws(r, k):
    size = (k,) if k is not None else ()
    return np.concatenate([np.stack([r.random(size), r.integers(-max_shift, max_shift + 1, size),
                                     r.random(size)], -1),
                           r.standard_normal(size + (2 * n,))], -1)

  d = _draw(rng, b, draws)
  scale, shift, shear = d[:, 0], d[:, 1].astype(np.int64), d[:, 2]
  corr, iid = d[:, 3:3 + n], d[:, 3 + n:]
  x = x * (1.0 + scale_coeff * (scale[:, None] - 0.5))
  x = np.take_along_axis(x, (np.arange(n)[None, :] - shift[:, None]) % n, axis=1)
  x = x + gaussian_filter1d(corr_noise_scale * corr, 2.0, axis=-1) + iid_noise_scale * iid
  x = x - shear_scale * (shear[:, None] - 0.5) * np.linspace(-0.5, 0.5, n)[None, :]
  return x.astype(np.float32)


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))


def inception_crop(image: np.ndarray, rng: np.random.Generator, size: int = 224,
                   scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
  """Random-resized crop (Szegedy et al. 2015), as in the ResNet-50 reference recipes."""
  h, w = image.shape[:2]
  area = h * w
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
    cw = int(round(np.sqrt(target * aspect)))
    ch = int(round(np.sqrt(target / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      y = rng.integers(0, h - ch + 1)
      x = rng.integers(0, w - cw + 1)
      return _resize(image[y:y + ch, x:x + cw], (size, size))
  return center_crop(image, size)  # Fallback, as torchvision does.


def center_crop(image: np.ndarray, size: int = 224, crop_fraction: float = 0.875) -> np.ndarray:
  """Resize the shorter side to ``size / crop_fraction``, then take the central crop."""
  h, w = image.shape[:2]
  short = size / crop_fraction
  nh, nw = (int(round(short * h / w)), int(round(short))) if w < h else (
      int(round(short)), int(round(short * w / h)))
  image = _resize(image, (nh, nw))
  y, x = (nh - size) // 2, (nw - size) // 2
  return image[y:y + size, x:x + size]


def make_preprocess_fn(kind: str, *, train: bool, augment: str, image_size: int = 224,
                       mean=None, std=None) -> Callable[[Batch, Rngs], Batch]:
  """Returns ``fn(batch, rng) -> batch`` producing ``{'input': f32, 'label': i32}``.

  Args:
    kind: how inputs are stored: ``'vector'`` (already standardised floats, mnist1d),
      ``'digits'`` (0..16 grey levels), ``'image'`` (uint8 RGB) or ``'text'`` (packed
      sequences from ``effjax.data.text.PackedSource``, passed through).
    train: whether random augmentation applies.
    augment: one of ``AUGMENTATIONS``; ignored when ``train`` is False except that
      ``'inception_crop'`` selects the matching centre-crop evaluation transform.
      ``'inception_crop'`` is followed by a random horizontal flip, as in the reference
      ResNet-50 recipes (Goyal et al. 2017; the flax ImageNet example);
      ``'shift_noise'`` applies to ``'vector'`` inputs.
    image_size: output size for ``inception_crop``.
    mean, std: per-channel statistics for ``'image'`` inputs (after scaling to [0, 1]).

  Returns:
    A function from a raw batch and a numpy generator to a preprocessed batch.
  """
  if augment not in AUGMENTATIONS:
    raise ValueError(f"input.augment={augment!r} is not one of {AUGMENTATIONS}")

  if augment == "shift_noise" and kind != "vector":
    raise ValueError(f"input.augment='shift_noise' applies to vector inputs, not {kind!r}")
  if kind == "text":
    if augment != "none":
      raise ValueError(f"input.augment={augment!r}: text has no augmentation (use 'none')")
    return _text_passthrough

  def fn(batch: Batch, rng: Rngs) -> Batch:
    x = batch["input"]
    if kind == "vector":
      x = np.asarray(x, np.float32)
      if train and augment == "shift_noise":
        x = random_shift_noise(x, rng)
    elif kind == "digits":
      x = np.asarray(x, np.float32) / 16.0
    elif kind == "image":
      if augment == "inception_crop":
        if train:
          rows = [rng] * len(x) if isinstance(rng, np.random.Generator) else rng
          x = np.stack([inception_crop(im, r, image_size) for im, r in zip(x, rows)])
          flip = _draw(rng, len(x), lambda r, n: r.random(n) < 0.5)
          x = np.where(flip[:, None, None, None], x[:, :, ::-1], x)
        else:
          x = np.stack([center_crop(im, image_size) for im in x])
      else:
        x = np.stack(list(x)) if isinstance(x, list) else x
        if train and augment == "flip_crop":
          x = random_flip_crop(x, rng)
      x = normalize(x.astype(np.float32) / 255.0, mean, std)
    else:
      raise ValueError(f"unknown input kind {kind!r}; expected vector, digits or image")
    out = {"input": x, "label": np.asarray(batch["label"], np.int32)}
    if "mask" in batch:
      out["mask"] = batch["mask"]
    return out

  return fn


def _text_passthrough(batch: Batch, rng: Rngs) -> Batch:
  """Packed text batches are model-ready already."""
  del rng
  return batch
