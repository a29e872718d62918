"""What the training loop does beside the step, each at its own cadence: hooks.

The loop (`train._run_steps`) dispatches one step at a time and calls its hooks around it:
logging (metrics read one step late, non-finite stops, metrics.jsonl), profiling
(config.profile_steps), eval, checkpointing and preemption. A hook knows its cadence; the
loop knows only the order of calls below. Hooks take what they run as callables (evaluate,
save, ...), so this module imports nothing of the loop.
"""
import dataclasses
import logging
import math
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

from scone_jax import config as config_lib
from scone_jax import preemption


@dataclasses.dataclass
class LoopState:
  """What the loop and its hooks share during one run.

  last: the metrics train() returns (the last logged step's, the last eval's, and
  'preempted_at_step'). step_batch / stats / metrics: the step just dispatched (its host
  batch, its statistics from the builder, its metrics still on the device). preempted: the step just run is the
  preemption sync point (every host agrees); stop: a hook ends the loop after this step.
  """
  cfg: Any
  checkpoint_dir: str
  last: dict = dataclasses.field(default_factory=dict)
  last_saved: Optional[int] = None
  step_batch: Any = None
  stats: dict = dataclasses.field(default_factory=dict)
  metrics: Any = None
  preempted: bool = False
  stop: bool = False


class Hook:
  """One thing the loop does beside the step. For each step `done` (1-based, the step just
  dispatched) the loop calls, hook by hook in list order:

    before_step(done, s)    before the step is dispatched
    after_step(done, s)     after it is dispatched (its metrics still on the device)
    due(done, s) -> bool    whether run() happens at this step (the hook's cadence)
    flush(s)                when a pausing hook is due, and after the last step: read
                            what the device still owes (so lines stay in step order)
    run(done, s)            for each hook that is due
    close(s)                once when the loop ends, also on an error

  `pauses`: run() is host work that is not step time (eval, checkpoint); the loop times it
  and tells the hooks through `paused(seconds)`.
  """
  pauses = False

  def before_step(self, done: int, s: LoopState):
    pass

  def after_step(self, done: int, s: LoopState):
    pass

  def due(self, done: int, s: LoopState) -> bool:  # pylint: disable=unused-argument
    return False

  def flush(self, s: LoopState):
    pass

  def run(self, done: int, s: LoopState):
    pass

  def paused(self, seconds: float):
    pass

  def close(self, s: LoopState):
    pass


def every(n: int, done: int, cfg) -> bool:
  """The cadence of logging, eval and checkpoints: every n steps and at the run's last."""
  return done % n == 0 or done == cfg.num_train_steps


class LoggingHook(Hook):
  """Reads each step's metrics one step late (the host never stalls the device to log),
  stops on a non-finite loss or gradient norm, and every cfg.log_every_steps writes the
  train line: tokens/s, step time (eval and checkpoint time left out), MFU, f-gram stats.

  flops_per_token(fgram_positions_per_token) -> model FLOPs per token; compile_line: the
  compile metrics written with the first logged line; counter: the run's CompileCounter.
  """

  _FGRAM_STATS = ('fgram_matched', 'fgram_unique', 'fgram_rows', 'fgram_positions',
                  'fgram_useful', 'fgram_overflow')

  def __init__(self, cfg, writer, counter, compile_line: dict, flops_per_token: Callable,
               peak_flops: float, fgram_rows: int):
    self.cfg, self.writer, self.counter = cfg, writer, counter
    self.compile_line, self.flops_per_token, self.peak = compile_line, flops_per_token, peak_flops
    self.fgram_rows = fgram_rows
    self.compiled_before, self.step_compiled_before = counter.compiles, counter.step_compiles()
    self.t_last, self.tokens_since, self.steps_since, self.paused_s = time.time(), 0, 0, 0.0
    self.fgram_stats = dict.fromkeys(self._FGRAM_STATS, 0)
    self.pending = None  # (done, device metrics, logged counters or None) of the last step

  def before_step(self, done, s):
    if s.stats['fgram_overflow']:
      logging.warning('step %d: its f-grams need %d packed rows, more than the run\'s %d; '
                      'it runs with its own shape (compiled once). Raise '
                      'config.fgram_model.rows or rows_headroom if this repeats.', done,
                      s.stats['fgram_rows'] // self.cfg.grad_accum_steps, self.fgram_rows)

  def after_step(self, done, s):
    self.steps_since += 1
    self.tokens_since += int(np.sum(s.step_batch['loss_mask']))
    for k in self.fgram_stats:
      self.fgram_stats[k] += s.stats[k]
    logged = None
    if every(self.cfg.log_every_steps, done, self.cfg):
      logged = (self.tokens_since, self.steps_since, self.fgram_stats, self.paused_s)
      self.tokens_since, self.steps_since, self.paused_s = 0, 0, 0.0
      self.fgram_stats = dict.fromkeys(self._FGRAM_STATS, 0)
    self.flush(s)
    self.pending = (done, s.metrics, logged)

  def flush(self, s):
    if self.pending is not None:
      pending, self.pending = self.pending, None
      self._finish(*pending, s)

  def paused(self, seconds):
    self.paused_s += seconds

  def _finish(self, done, metrics, logged, s):
    """Reads step `done`'s metrics, stops on non-finite ones, logs them if it is a log step."""
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not (math.isfinite(metrics['loss']) and math.isfinite(metrics['grad_norm'])):
      what = 'loss' if not math.isfinite(metrics['loss']) else 'gradient norm'
      raise non_finite(f'{what} at step {done} (loss {metrics["loss"]}, grad_norm '
                       f'{metrics["grad_norm"]})', s)
    if logged is None:
      return
    tokens, steps, stats, paused = logged
    now = time.time()
    # Eval and checkpoint time in this interval is not step time.
    elapsed, self.t_last = max(now - self.t_last - paused, 1e-9), now
    s.last = dict(metrics)
    s.last.update(self._rates(tokens, steps, stats, elapsed))
    last = s.last
    mfu = f'  MFU {100 * last["mfu"]:.1f}%' if 'mfu' in last else ''
    eta = (self.cfg.num_train_steps - done) * elapsed / max(steps, 1)
    logging.info('step %d/%d  loss %.4f  %s tokens/s  %.1f ms/step%s  lr %.2e  ETA %s', done,
                 self.cfg.num_train_steps, last['loss'], f'{last["tokens_per_s"]:,.0f}',
                 1e3 * last['step_time_s'], mfu, last['learning_rate'], format_eta(eta))
    self.writer.write(done, {f'train/{k}': v for k, v in last.items()} | self.compile_line)
    self.compile_line = {}

  def _rates(self, tokens, steps, stats, elapsed) -> dict:
    """Throughput, FLOPs, compiles and f-gram statistics of one logging interval."""
    cfg, counter = self.cfg, self.counter
    positions_per_step = cfg.batch_size * cfg.seq_len
    # Model FLOPs count every position of the batch (padding included), the f-gram model
    # every executed slot.
    fgram_per_token = stats['fgram_positions'] * jax.process_count() / (steps * positions_per_step)
    flops_per_token = self.flops_per_token(fgram_per_token)
    positions_per_s = steps * positions_per_step / elapsed
    out = dict(tokens_per_s=tokens * jax.process_count() / elapsed,
               step_time_s=elapsed / steps, model_flops_per_token=flops_per_token,
               model_tflops_per_s=flops_per_token * positions_per_s / 1e12,
               **counter.snapshot(),
               compiles_after_step_1=counter.compiles - self.compiled_before,
               step_compiles_after_step_1=counter.step_compiles() - self.step_compiled_before)
    if self.peak:
      out['mfu'] = flops_per_token * positions_per_s / (self.peak * jax.device_count())
    if stats['fgram_overflow']:
      out['fgram_overflow_batches'] = stats['fgram_overflow']
    if stats['fgram_matched']:
      out['fgram_match_rate'] = stats['fgram_matched'] / max(tokens, 1)
      out['fgram_rows_per_step'] = stats['fgram_rows'] / steps
      # Executed (packed rows × pack_len, what training FLOPs count) vs needed positions.
      out['fgram_positions_per_step'] = stats['fgram_positions'] / steps
      out['fgram_useful_positions_per_step'] = stats['fgram_useful'] / steps
      if cfg.fgram_model.dedupe:
        out['fgram_unique_per_step'] = stats['fgram_unique'] / steps
    return out


class ProfileHook(Hook):
  """A jax.profiler trace of steps A..B-1 (config.profile_steps 'A,B') into `directory`."""

  def __init__(self, profile_steps: str, directory: str, state_of: Callable):
    self.steps = config_lib.parse_profile_steps(profile_steps)
    self.directory, self.state_of = directory, state_of
    self.profiling = False

  def before_step(self, done, s):
    if self.steps and done == self.steps[0]:
      jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
      self.profiling = True

  def after_step(self, done, s):
    if self.profiling and done == self.steps[1] - 1:
      jax.block_until_ready(self.state_of())
      jax.profiler.stop_trace()
      self.profiling = False
      logging.info('profiled steps %d..%d into %s', self.steps[0], self.steps[1] - 1,
                   self.directory)

  def close(self, s):
    if self.profiling:
      jax.profiler.stop_trace()
      self.profiling = False


class EvalHook(Hook):
  """Every cfg.eval_every_steps (and at the last step): evaluate() -> log, metrics.jsonl."""
  pauses = True

  def __init__(self, cfg, writer, evaluate: Callable[[], dict]):
    self.cfg, self.writer, self.evaluate = cfg, writer, evaluate

  def due(self, done, s):
    return every(self.cfg.eval_every_steps, done, self.cfg)

  def run(self, done, s):
    ev = self.evaluate()
    logging.info('eval at step %d: loss %.4f  ppl %.2f  bits/byte %.4f', done, ev['loss'],
                 ev['ppl'], ev['bits_per_byte'])
    self.writer.write(done, {f'eval/{k}': v for k, v in ev.items()})
    s.last.update({f'eval_{k}': v for k, v in ev.items()})


class CheckpointHook(Hook):
  """Every cfg.checkpoint_every_steps, at the last step and at a preemption point: checks
  the parameters are finite, then save(force) (forced at a preemption: saved whatever
  the manager's own interval says)."""
  pauses = True

  def __init__(self, cfg, params_finite: Callable[[], bool], save: Callable[[bool], Any]):
    self.cfg, self.params_finite, self.save = cfg, params_finite, save

  def due(self, done, s):
    return every(self.cfg.checkpoint_every_steps, done, self.cfg) or s.preempted

  def run(self, done, s):
    if not self.params_finite():
      raise non_finite(f'parameters after step {done}', s)
    self.save(s.preempted)
    s.last_saved = done


class PreemptionHook(Hook):
  """Asks every host at every step whether this is the preemption point (SIGTERM, or a
  notice from another host); there the checkpoint hook saves and the loop stops."""

  def __init__(self):
    self.watch = preemption.Preemption().__enter__()

  def after_step(self, done, s):
    s.preempted = self.watch.reached(done)   # every host, every step

  def due(self, done, s):
    return s.preempted

  def run(self, done, s):
    logging.warning('%s: stopping at step %d with a checkpoint there; run the same '
                    'command again to resume', self.watch.signal_name, done)
    s.last['preempted_at_step'] = done
    s.stop = True

  def close(self, s):
    self.watch.__exit__(None, None, None)


def non_finite(what: str, s: LoopState) -> FloatingPointError:
  if s.last_saved is None:
    where = f'no checkpoint was saved before it in {s.checkpoint_dir}'
  else:
    where = f'the last good checkpoint is step {s.last_saved} in {s.checkpoint_dir}'
  return FloatingPointError(f'non-finite {what}; {where}. Lower config.learning_rate (or check '
                            'the data) and rerun: training resumes from the last checkpoint.')


def format_eta(seconds):
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'
