"""Preemption: a SIGTERM becomes one step at which every process of the job stops.

Cloud TPU and spot VMs send SIGTERM before they take a machine away, and it may reach
only some processes, or reach them at different steps. A loop calls
`should_stop(step)` after every step, on every process, with the same step numbers;
it turns True on all processes at the same step, where the loop saves a checkpoint and
exits.

How the processes agree: under jax.distributed, JAX's preemption sync manager (started
by jax.distributed.initialize) catches SIGTERM in every process, and
`reached_preemption_sync_point(step)` is True on all of them at one step (the largest
step any process had reached when the notice spread, plus one). A single process
catches SIGTERM itself. Where the sync manager is off (jax_enable_preemption_service),
the processes all-gather their SIGTERM flags every `check_every` steps.
"""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


class Preempted(Exception):
  """A run stopped for preemption at `step`, its checkpoint saved: not a failure (the
  entry point prints one line and exits 0; rerunning resumes)."""

  def __init__(self, step: int):
    super().__init__(f"preempted at step {step}: checkpoint saved, rerun the same command "
                     f"to resume")
    self.step = step


def _sync_manager_available() -> bool:
  from jax._src import distributed  # The state jax.distributed.initialize fills in.
  state = distributed.global_state
  return state.client is not None and state.preemption_sync_manager is not None


class Preemption:
  """Install once per process (from the main thread), before the first step; then
  `should_stop(step)` every step, on every process. `close()` puts the previous SIGTERM
  handler back, unless the run stopped: a process on its way out with a checkpoint
  keeps ignoring further SIGTERMs (a scheduler may repeat them) until it exits."""

  def __init__(self, check_every: int = 1):
    self.check_every = max(1, int(check_every))
    self._signalled = threading.Event()
    self._previous = None
    self.mode = "jax" if jax.process_count() > 1 and _sync_manager_available() else "signal"
    if self.mode == "signal":
      # JAX's sync manager owns SIGTERM when it runs; otherwise we catch it here.
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
      if jax.process_count() > 1:
        self.mode = "allgather"
    self.stopped_at: int | None = None

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    logging.warning("SIGTERM: stopping after an agreed step, with a checkpoint")
    self._signalled.set()

  def should_stop(self, step: int) -> bool:
    """True at the same `step` on every process once any of them got SIGTERM."""
    if self.stopped_at is not None:
      return True
    if self.mode == "jax":
      stop = multihost_utils.reached_preemption_sync_point(step)
    elif self.mode == "signal":
      stop = self._signalled.is_set()
    else:
      stop = step % self.check_every == 0 and bool(np.any(
          multihost_utils.process_allgather(np.int32(self._signalled.is_set()))))
    if stop:
      self.stopped_at = step
    return stop

  def close(self) -> None:
    if self._previous is not None and self.stopped_at is None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
