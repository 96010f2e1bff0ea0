"""Preemption: stop at a step every process agrees on, after SIGTERM or SIGINT.

A ``PreemptionGuard`` turns the first SIGTERM/SIGINT into a request to stop; the loop
asks ``should_stop(step)`` after each step, saves a checkpoint at the step where it says
True and exits with ``EXIT_PREEMPTED``. A second signal gets the default action (an
impatient Ctrl-C still kills).

With several processes, the signal may reach only some of them, and each process's host
loop may be a step or two ahead of the others (dispatch is asynchronous). Agreement goes
through the ``jax.distributed`` key-value store, without a device collective:

1. a signalled process posts ``notice/<process>``;
2. every process polls the ``notice/`` directory once per step (one RPC to the
   coordinator, no device sync); the first time it sees a notice it posts
   ``seen/<process> = <its current step>`` and waits for all processes' ``seen`` keys;
3. all stop after step ``max(seen)``: every process has posted a step it has reached, so
   each can reach the maximum, and all compute the same one.

This is the protocol of JAX's own preemption sync manager
(``multihost_utils.reached_preemption_sync_point``), which, however, only reacts to
SIGTERM delivered through its C++ notifier.
"""

import signal
import threading
from typing import Optional

import jax

EXIT_PREEMPTED = 4
_PREFIX = "effjax/preemption"


def _client():
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return distributed.global_state.client


class PreemptionGuard:
  """Catches SIGTERM/SIGINT while training; see the module docstring.

  Use as a context manager around the loop. Handlers are installed only in the main
  thread (Python delivers signals there); elsewhere the guard never fires.

  Args:
    signals: the signals that request a stop.
    namespace: key-value store prefix; distinct per run sharing a coordinator.
    timeout_s: how long to wait for the other processes' steps before giving up.
  """

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT), namespace: str = "run",
               timeout_s: float = 300.0):
    self.signals = tuple(signals)
    self.received: Optional[int] = None   # The first signal number, once one arrived.
    self.stop_step: Optional[int] = None  # The agreed step, once known.
    self._namespace = f"{_PREFIX}/{namespace}"
    self._timeout_ms = int(timeout_s * 1000)
    self._previous: dict = {}
    self._posted_notice = False
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
      return "a preemption notice from another process"
    return signal.Signals(self.received).name

  def should_stop(self, step: int) -> bool:
    """Whether to save and stop now, having completed ``step``. Call once per step."""
    if self.stop_step is not None:
      return step >= self.stop_step
    if not self._multi:
      if self.received is not None:
        self.stop_step = step
      return self.stop_step is not None
    client = _client()
    me = jax.process_index()
    if self.received is not None and not self._posted_notice:
      client.key_value_set(f"{self._namespace}/notice/{me}", str(step))
      self._posted_notice = True
    if not client.key_value_dir_get(f"{self._namespace}/notice/"):
      return False
    client.key_value_set(f"{self._namespace}/seen/{me}", str(step))
    seen = [int(client.blocking_key_value_get(f"{self._namespace}/seen/{p}", self._timeout_ms))
            for p in range(jax.process_count())]
    self.stop_step = max(seen)
    return step >= self.stop_step


class Preempted(Exception):
  """Training stopped on a signal after saving a checkpoint at ``step``."""

  def __init__(self, step: int, signal_name: str, workdir: str):
    super().__init__(f"preempted by {signal_name}: saved a checkpoint at step {step} in "
                     f"{workdir}; re-run the same command to resume")
    self.step = step

