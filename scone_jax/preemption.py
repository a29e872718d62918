"""Preemption: SIGTERM finishes the current step, checkpoints it on every host, and exits.

A preempted Cloud TPU VM gets SIGTERM and some seconds of grace. The training loop asks
`Preemption.reached(step)` after each step; when it says yes, the loop saves a checkpoint
at that step (every host, the same step), waits for it to be durable and returns, and the
CLI exits with `EXIT_CODE` so a scheduler or launcher knows to start the job again (it
resumes exactly there).

Several processes (jax.distributed): JAX's preemption sync manager (the coordination
service, which catches SIGTERM itself) propagates a notice from any host to all of them
and names one step — the largest step any host has reached, plus one — at which every
host's `reached_preemption_sync_point` says yes, so all hosts save the same step. One
process: a Python SIGTERM handler sets a flag; the next step boundary is the sync point.
"""
import logging
import signal
import threading

import jax
from jax.experimental import multihost_utils

EXIT_CODE = 75   # EX_TEMPFAIL: stopped early on purpose, run the same command again


class Preemption:
  """Watches for a preemption notice; use as a context manager around the training loop."""

  def __init__(self):
    self._flag = threading.Event()
    self._previous = None
    self._multihost = jax.process_count() > 1
    self._service = self._multihost
    self.signal_name = None

  def __enter__(self) -> 'Preemption':
    if not self._multihost and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_signal(self, signum, frame):  # pylint: disable=unused-argument
    self.signal_name = signal.Signals(signum).name
    self._flag.set()

  def reached(self, step: int) -> bool:
    """Whether to checkpoint at `step` and stop. Every host must call it at every step."""
    if not self._service:
      return self._flag.is_set()
    try:
      reached = multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError as e:
      # jax_enable_preemption_service is off: no host learns of the others' notices, so
      # stopping on one host's own signal would leave the others waiting in a collective.
      logging.warning('preemption notices are not synchronised across hosts (%s); a '
                      'SIGTERM stops the run without a final checkpoint', e)
      self._service = False
      return False
    if reached:
      self.signal_name = 'SIGTERM'
    return reached
