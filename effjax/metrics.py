"""Metric output: ``metrics.jsonl``, TensorBoard event files and a console progress line."""

import json
import math
import os

from etils import epath
import sys
import time
from typing import Any, Mapping, Optional

import numpy as np


def _to_float(v: Any) -> float:
  return float(np.asarray(v))


class MetricWriter:
  """Writes scalars to ``workdir/metrics.jsonl`` (one JSON object per logged step) and to
  TensorBoard event files in ``workdir/tensorboard``. Only the primary process writes.

  ``workdir`` may be any ``etils.epath`` path. Object stores (``gs://``) cannot append, so
  there the rows are kept and the whole file is rewritten at each write (it is small).
  """

  def __init__(self, workdir, primary: bool = True, tensorboard: bool = True):
    self.primary = primary
    self._jsonl = None
    self._tb = None
    self._path = epath.Path(workdir) / "metrics.jsonl"
    self._remote = "://" in os.fspath(workdir)
    self._rows: list[str] = []
    if primary:
      if self._remote:
        self._rows = self._path.read_text().splitlines(True) if self._path.exists() else []
      else:
        self._jsonl = open(self._path, "a", encoding="utf-8")
      if tensorboard:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(os.fspath(epath.Path(workdir) / "tensorboard"))

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.primary:
      return
    row = {"step": int(step)}
    # Counters (batch size, optimizer step, tokens) stay integers.
    row.update({k: int(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                else _to_float(v) for k, v in scalars.items()})
    if self._remote:
      self._rows.append(json.dumps(row) + "\n")
      self._path.write_text("".join(self._rows), encoding="utf-8")
    else:
      self._jsonl.write(json.dumps(row) + "\n")
      self._jsonl.flush()
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and math.isfinite(v):
          self._tb.add_scalar(k, v, int(step))

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
    if self._tb:
      self._tb.close()


def read_jsonl(path) -> list[dict]:
  """Reads a ``metrics.jsonl`` file (any ``etils.epath`` path) into a list of dicts."""
  text = epath.Path(path).read_text(encoding="utf-8")
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def _fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
  """A console progress line: step, steps/s, examples/s, loss, accuracy and ETA.

  On a terminal it redraws one line; otherwise (logs, CI) it prints one line per update.
  """

  def __init__(self, total_steps: int, batch_size: int, start_step: int = 0,
               enabled: bool = True, stream=None):
    self.total = total_steps
    self.batch_size = batch_size
    self.enabled = enabled
    self.stream = stream or sys.stdout
    # Jupyter's output area is no terminal but honours "\r": one updating line there too.
    self.notebook = "ipykernel" in sys.modules and stream is None
    self.tty = self.stream.isatty() or self.notebook
    self._width = 0
    self._t0 = time.perf_counter()
    self._last_t, self._last_step = self._t0, start_step

  def exclude(self, seconds: float) -> None:
    """Leaves ``seconds`` (an eval, a checkpoint) out of the next rate, so that steps/s
    and the ETA measure training alone and do not swing at eval and save steps."""
    self._last_t += seconds

  def rates(self, step: int) -> tuple[float, float]:
    """Steps/s and examples/s since the previous call."""
    now = time.perf_counter()
    dt = max(now - self._last_t, 1e-9)
    steps_per_sec = (step - self._last_step) / dt
    self._last_t, self._last_step = now, step
    return steps_per_sec, steps_per_sec * self.batch_size

  def update(self, step: int, steps_per_sec: float, scalars: Mapping[str, Any],
             extra: str = "") -> None:
    if not self.enabled:
      return
    eta = (self.total - step) / steps_per_sec if steps_per_sec > 0 else float("nan")
    frac = step / max(self.total, 1)
    bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
    line = (f"[{bar}] step {step}/{self.total} | {steps_per_sec:.2f} steps/s | "
            f"{steps_per_sec * self.batch_size:.0f} ex/s | "
            f"loss {_to_float(scalars['train/loss']):.4f} | "
            + "".join(f"{short} {_to_float(scalars[key]):.4f} | " for key, short in (
                ("train/accuracy", "acc"), ("train/alignment", "align")) if key in scalars) +
            f"ETA {_fmt_time(eta) if math.isfinite(eta) else '?'}{extra}")
    if self.notebook:  # No ANSI erase there: pad over the previous line instead.
      self.stream.write("\r" + line.ljust(self._width))
      self._width = len(line)
    elif self.tty:
      self.stream.write("\r" + line + "\033[K")
    else:
      self.stream.write(line + "\n")
    self.stream.flush()

  def message(self, text: str) -> None:
    if not self.enabled:
      return
    if self.tty:
      self.stream.write("\n")
    self.stream.write(text + "\n")
    self.stream.flush()

  def elapsed(self) -> float:
    return time.perf_counter() - self._t0
