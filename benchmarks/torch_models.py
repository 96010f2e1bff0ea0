"""PyTorch twins of effjax's benchmark models and LARS, for ``benchmarks/train_step.py``.

Only the benchmark imports this (``pip install torch==2.13.0``); effjax never does. The
architectures follow ``effjax.models`` layer for layer (same widths, kernels, strides,
normalization and pooling), and ``LARS`` follows ``optax.lars``'s maths (decay and trust
ratio on every parameter), so both sides do the same work.
"""

import torch
from torch import nn
import torch.nn.functional as F


class CNN1D(nn.Module):
  """effjax.models.CNN1D: [Conv(5) -> BN -> ReLU] per width, stride 2 after the first,
  mean and max pooling concatenated, a linear head."""

  def __init__(self, num_classes, widths=(64, 128, 128), kernel_size=5):
    super().__init__()
    layers, c = [], 1
    for i, w in enumerate(widths):
      layers += [nn.Conv1d(c, w, kernel_size, stride=1 if i == 0 else 2,
                           padding=kernel_size // 2, bias=False), nn.BatchNorm1d(w), nn.ReLU()]
      c = w
    self.body = nn.Sequential(*layers)
    self.head = nn.Linear(2 * c, num_classes)

  def forward(self, x):
    x = self.body(x[:, None, :])
    return self.head(torch.cat([x.mean(-1), x.amax(-1)], -1))


class BasicBlock(nn.Module):

  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.norm1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.norm2 = nn.BatchNorm2d(cout)
    nn.init.zeros_(self.norm2.weight)  # Goyal et al.: each block starts as the identity.
    self.proj = None
    if stride != 1 or cin != cout:
      self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                nn.BatchNorm2d(cout))

  def forward(self, x):
    y = F.relu(self.norm1(self.conv1(x)))
    y = self.norm2(self.conv2(y))
    return F.relu((x if self.proj is None else self.proj(x)) + y)


class ResNet18(nn.Module):
  """effjax.models.resnet18 with the CIFAR stem (one 3x3 conv, no max-pool)."""

  def __init__(self, num_classes, widths=(64, 128, 256, 512)):
    super().__init__()
    self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
                              nn.BatchNorm2d(widths[0]), nn.ReLU())
    blocks, c = [], widths[0]
    for i, w in enumerate(widths):
      for j in range(2):
        blocks.append(BasicBlock(c, w, 2 if (i > 0 and j == 0) else 1))
        c = w
    self.blocks = nn.Sequential(*blocks)
    self.head = nn.Linear(c, num_classes)

  def forward(self, x):  # x: NHWC, as effjax feeds it.
    x = self.blocks(self.stem(x.permute(0, 3, 1, 2)))
    return self.head(x.mean((2, 3)))


class EncoderBlock(nn.Module):

  def __init__(self, d, heads, mlp_ratio):
    super().__init__()
    self.norm1, self.norm2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
    self.attention = nn.MultiheadAttention(d, heads, batch_first=True)
    self.mlp_in, self.mlp_out = nn.Linear(d, d * mlp_ratio), nn.Linear(d * mlp_ratio, d)

  def forward(self, x):
    y = self.norm1(x)
    x = x + self.attention(y, y, y, need_weights=False)[0]
    return x + self.mlp_out(F.gelu(self.mlp_in(self.norm2(x))))


class Transformer(nn.Module):
  """effjax.models.TransformerEncoder: scalar embedding, learned positions, pre-LN blocks,
  final LayerNorm, mean pooling, linear head."""

  def __init__(self, num_classes, length=40, width=64, layers=2, heads=4, mlp_ratio=4):
    super().__init__()
    self.embed = nn.Linear(1, width)
    self.position = nn.Parameter(torch.randn(1, length, width) * 0.02)
    self.blocks = nn.Sequential(*[EncoderBlock(width, heads, mlp_ratio) for _ in range(layers)])
    self.final_norm = nn.LayerNorm(width, eps=1e-6)
    self.head = nn.Linear(width, num_classes)

  def forward(self, x):
    x = self.embed(x[..., None]) + self.position
    return self.head(self.final_norm(self.blocks(x)).mean(1))


def create(name: str, num_classes: int) -> nn.Module:
  return {"cnn1d": CNN1D, "resnet18": ResNet18, "transformer": Transformer}[name](num_classes)


class LARS(torch.optim.Optimizer):
  """``optax.lars`` in PyTorch: ``u = g + wd * w``, ``r = eta * ||w|| / ||u||`` (1 where a
  norm is 0), ``v <- m * v + lr * r * u``, ``w <- w - v``."""

  def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, trust_coefficient=1e-3):
    super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                  eta=trust_coefficient))

  @torch.no_grad()
  def step(self):  # pylint: disable=arguments-differ
    for group in self.param_groups:
      for p in group["params"]:
        if p.grad is None:
          continue
        u = p.grad.add(p, alpha=group["weight_decay"])
        w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(u)
        ratio = torch.where((w_norm > 0) & (u_norm > 0), group["eta"] * w_norm / u_norm,
                            torch.ones_like(w_norm))
        state = self.state[p]
        if "v" not in state:
          state["v"] = torch.zeros_like(p)
        v = state["v"]
        v.mul_(group["momentum"]).add_(u * ratio, alpha=group["lr"])
        p.sub_(v)


def make_step(model: nn.Module, opt: LARS, compiled: bool):
  """One training step: forward, cross-entropy, backward, LARS. ``compiled`` wraps the
  model and the optimizer step in ``torch.compile``, as the PyTorch docs recommend."""
  model.train()
  forward = torch.compile(model) if compiled else model
  opt_step = torch.compile(opt.step) if compiled else opt.step

  def step(x, y):
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(forward(x), y)
    loss.backward()
    opt_step()
    return loss.detach()
  return step
