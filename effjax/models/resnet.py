"""ResNets: CIFAR-style ResNet-20 and ResNet-18, and ImageNet ResNet-50 (v1.5).

The last normalization layer of each residual block starts with scale 0 (Goyal et al.
2017, arXiv:1706.02677, section 5.1), so every block starts as the identity, which is
what makes large-batch warmup stable.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from effjax.models.norms import make_conv, make_norm

_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class BasicBlock(nn.Module):
  filters: int
  strides: int
  norm: Any
  dtype: Any
  zero_init_residual: bool = True
  conv_cls: Any = nn.Conv

  @nn.compact
  def __call__(self, x):
    conv = lambda f, k, s, name: self.conv_cls(f, (k, k), (s, s), padding="SAME",
                                               use_bias=False, kernel_init=_conv_init,
                                               dtype=self.dtype, name=name)
    y = nn.relu(self.norm(name="norm1")(conv(self.filters, 3, self.strides, "conv1")(x)))
    y = conv(self.filters, 3, 1, "conv2")(y)
    y = self.norm(name="norm2", scale_init=(nn.initializers.zeros if self.zero_init_residual
                                            else nn.initializers.ones))(y)
    if x.shape != y.shape:
      x = self.norm(name="proj_norm")(conv(self.filters, 1, self.strides, "proj")(x))
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  filters: int
  strides: int
  norm: Any
  dtype: Any
  zero_init_residual: bool = True
  conv_cls: Any = nn.Conv

  @nn.compact
  def __call__(self, x):
    conv = lambda f, k, s, name: self.conv_cls(f, (k, k), (s, s), padding="SAME",
                                               use_bias=False, kernel_init=_conv_init,
                                               dtype=self.dtype, name=name)
    y = nn.relu(self.norm(name="norm1")(conv(self.filters, 1, 1, "conv1")(x)))
    # ResNet v1.5: the stride is on the 3x3 convolution.
    y = nn.relu(self.norm(name="norm2")(conv(self.filters, 3, self.strides, "conv2")(y)))
    y = conv(self.filters * 4, 1, 1, "conv3")(y)
    y = self.norm(name="norm3", scale_init=(nn.initializers.zeros if self.zero_init_residual
                                            else nn.initializers.ones))(y)
    if x.shape != y.shape:
      x = self.norm(name="proj_norm")(conv(self.filters * 4, 1, self.strides, "proj")(x))
    return nn.relu(x + y)


class ResNet(nn.Module):
  """A ResNet. ``cifar_stem`` uses one 3x3 convolution and no max-pool (32x32 inputs)."""
  num_classes: int
  stage_sizes: Sequence[int]
  block: str = "basic"
  widths: Sequence[int] = (64, 128, 256, 512)
  cifar_stem: bool = False
  norm: Any = "batch"  # A NORMS name or a NormConfig.
  zero_init_residual: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = make_norm(self.norm, train=train, dtype=self.dtype)
    conv = make_conv(self.norm, dtype=self.dtype)
    block = {"basic": BasicBlock, "bottleneck": Bottleneck}[self.block]
    x = x.astype(self.dtype)
    if self.cifar_stem:
      x = conv(self.widths[0], (3, 3), padding="SAME", use_bias=False, kernel_init=_conv_init,
               name="stem")(x)
      x = nn.relu(norm(name="stem_norm")(x))
    else:
      x = conv(self.widths[0], (7, 7), (2, 2), padding=[(3, 3), (3, 3)], use_bias=False,
               kernel_init=_conv_init, name="stem")(x)
      x = nn.relu(norm(name="stem_norm")(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for i, n in enumerate(self.stage_sizes):
      for j in range(n):
        x = block(self.widths[i], 2 if (i > 0 and j == 0) else 1, norm, self.dtype,
                  self.zero_init_residual, conv, name=f"stage{i + 1}_block{j + 1}")(x)
    x = x.mean(axis=(1, 2))
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, dtype=self.dtype,
                    name="head")(x).astype(jnp.float32)


def resnet20(num_classes, **kw):
  return ResNet(num_classes, (3, 3, 3), "basic", (16, 32, 64), cifar_stem=True, **kw)


def resnet18(num_classes, cifar_stem=True, **kw):
  return ResNet(num_classes, (2, 2, 2, 2), "basic", (64, 128, 256, 512), cifar_stem=cifar_stem,
                **kw)


def resnet50(num_classes, **kw):
  return ResNet(num_classes, (3, 4, 6, 3), "bottleneck", (64, 128, 256, 512), cifar_stem=False,
                **kw)
