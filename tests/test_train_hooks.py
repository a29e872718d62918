"""The training loop's hook protocol (train._run_steps, train_hooks.Hook), with a fake step.

The real hooks run in every training test (test_train.py, test_reliability.py, test_accel.py);
this checks the order of calls the hooks rely on, without compiling anything.
"""
import types

import pytest

from scone_jax import train
from scone_jax import train_hooks


class Recorder(train_hooks.Hook):
  """Records every call; due every `every` steps; stops the loop at `stop_at`."""

  def __init__(self, name, log, every=0, pauses=False, stop_at=0):
    self.name, self.log, self.every, self.pauses, self.stop_at = name, log, every, pauses, stop_at

  def before_step(self, done, s):
    self.log.append((self.name, 'before', done))

  def after_step(self, done, s):
    assert s.metrics == {'step': done}  # the step just dispatched
    self.log.append((self.name, 'after', done))

  def due(self, done, s):
    return bool(self.every) and done % self.every == 0

  def flush(self, s):
    self.log.append((self.name, 'flush'))

  def run(self, done, s):
    self.log.append((self.name, 'run', done))
    if done == self.stop_at:
      s.stop = True

  def paused(self, seconds):
    assert seconds >= 0
    self.log.append((self.name, 'paused'))


def _loop(monkeypatch, hooks, steps=4):
  monkeypatch.setattr(train.step_batch_lib, 'device_put_batch', lambda sb, shardings: sb)
  trainer = types.SimpleNamespace(state=0, batch_shardings=None,
                                  train_step=lambda state, sb, rng: (state + 1,
                                                                     {'step': state + 1}))
  loader = types.SimpleNamespace(restored=[])
  loader.restore = loader.restored.append
  s = train_hooks.LoopState(cfg=None, checkpoint_dir='ckpt')
  batches = ((i, ({'i': i}, {})) for i in range(steps))
  train._run_steps(trainer, loader, batches, rng=None, hooks=hooks, s=s)
  return trainer, loader, s


def test_hooks_are_called_around_each_step_in_list_order(monkeypatch):
  log = []
  hooks = [Recorder('a', log), Recorder('b', log, every=2)]
  trainer, loader, _ = _loop(monkeypatch, hooks, steps=2)
  assert trainer.state == 2 and loader.restored == [{'step': 1}, {'step': 2}]
  assert log == [
      ('a', 'before', 1), ('b', 'before', 1), ('a', 'after', 1), ('b', 'after', 1),
      ('a', 'before', 2), ('b', 'before', 2), ('a', 'after', 2), ('b', 'after', 2),
      # b is due and does not pause: no flush before it, no pause reported
      ('b', 'run', 2),
      # the loop's end: everything the device still owes is read
      ('a', 'flush'), ('b', 'flush')]


def test_a_pausing_hook_gets_every_hook_flushed_first_and_its_time_reported(monkeypatch):
  log = []
  hooks = [Recorder('log', log), Recorder('eval', log, every=2, pauses=True)]
  _loop(monkeypatch, hooks, steps=2)
  assert log[log.index(('eval', 'after', 2)) + 1:] == [
      ('log', 'flush'), ('eval', 'flush'), ('eval', 'run', 2),
      ('log', 'paused'), ('eval', 'paused'), ('log', 'flush'), ('eval', 'flush')]


def test_a_hook_stops_the_loop_after_its_step(monkeypatch):
  log = []
  hooks = [Recorder('ckpt', log, every=1, pauses=True),
           Recorder('preempt', log, every=3, stop_at=3)]
  trainer, _, s = _loop(monkeypatch, hooks, steps=6)
  assert trainer.state == 3 and s.stop
  # The checkpoint of step 3 ran before the stop (hooks run in list order).
  assert log.index(('ckpt', 'run', 3)) < log.index(('preempt', 'run', 3))
  assert ('ckpt', 'before', 4) not in log


@pytest.mark.parametrize('done,expected', [(3, True), (4, False), (6, True), (10, True)])
def test_every_is_the_cadence_and_the_last_step(done, expected):
  cfg = types.SimpleNamespace(num_train_steps=10)
  assert train_hooks.every(3, done, cfg) is expected
