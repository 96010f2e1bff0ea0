"""Preemption: stop at a step every process agrees on, after SIGTERM or SIGINT.

A ``PreemptionGuard`` turns the first SIGTERM/SIGINT into a request to stop; the loop
asks ``should_stop(step, at_log_point)`` after each step, saves a checkpoint at the step
where it says True and exits with ``EXIT_PREEMPTED``. A second signal gets the default
action (an impatient Ctrl-C still kills).

One process stops after the step in flight. With several, the signal may reach only some
of them, and their host loops run ahead of each other by up to ``log_every`` steps
(dispatch is asynchronous; only log points fetch from the devices). They agree at the
next log point, where every process is at the same step: each contributes its flag to a
small all-gather, and all stop if any was signalled. A host-side protocol that blocks a
process until the others report (as JAX's preemption sync manager does through its C++
notifier, which only reacts to SIGTERM) can deadlock here: the waiting process stops
dispatching steps whose collectives another process needs in order to reach the point
where it would report. So on multi-host runs, keep ``log_every`` small enough that
``log_every`` steps fit in the scheduler's grace period.
"""

import signal
import threading
from typing import Optional

import jax
import numpy as np

EXIT_PREEMPTED = 4


class PreemptionGuard:
  """Catches SIGTERM/SIGINT while training; see the module docstring.

  Use as a context manager around the loop. Handlers are installed only in the main
  thread (Python delivers signals there); elsewhere the guard never fires.

  Args:
    signals: the signals that request a stop.
  """

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self.signals = tuple(signals)
    self.received: Optional[int] = None   # The first signal number, once one arrived.
    self.stop_step: Optional[int] = None  # The agreed step, once known.
    self.signalled: list = []            # Processes that received one (several processes).
    self._previous: dict = {}
    self._multi = jax.process_count() > 1

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in self.signals:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, h in self._previous.items():
      signal.signal(s, h)
    self._previous = {}
    return False

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if self.received is None:
      self.received = signum
      for s in self.signals:  # A second signal acts as if no guard were installed.
        signal.signal(s, self._previous.get(s, signal.SIG_DFL))

  @property
  def signal_name(self) -> str:
    if self.received is None:
      return f"a signal to process {', '.join(map(str, self.signalled))}"
    return signal.Signals(self.received).name

  def should_stop(self, step: int, at_log_point: bool = True) -> bool:
    """Whether to save and stop now, having completed ``step``. Call after every step;
    with several processes, all must call it at the same steps with the same
    ``at_log_point`` (it runs a collective there)."""
    if self.stop_step is not None:
      return step >= self.stop_step
    if not self._multi:
      if self.received is not None:
        self.stop_step = step
      return self.stop_step is not None
    if not at_log_point:
      return False
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.int32(self.received is not None))
    if np.any(flags):
      self.stop_step = step
      self.signalled = [int(p) for p in np.flatnonzero(flags)]
    return self.stop_step is not None


class Preempted(Exception):
  """Training stopped on a signal after saving a checkpoint at ``step``."""

  def __init__(self, step: int, signal_name: str, workdir: str):
    super().__init__(f"preempted by {signal_name}: saved a checkpoint at step {step} in "
                     f"{workdir}; re-run the same command to resume")
    self.step = step

