"""Orbax checkpoints of a run: save, restore the latest good one, restore parameters only.

A checkpoint step holds three items: `state` (step, params, optimizer state), `data` (the
input iterator's state, for an exact resume) and `meta` (config, tokenizer and f-gram set
fingerprints). Functions take abstract trees (`jax.ShapeDtypeStruct` with shardings), not a
trainer, so train and export share them and a restore lands directly in its shardings.
"""
import logging
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from scone_jax import paths

ITEMS = ('state', 'data', 'meta')


def manager(directory: str, *, keep: int, async_save: bool = True,
            writer: bool = False) -> ocp.CheckpointManager:
  """writer: the run's one trainer, which first removes checkpoints left half-written.

  On gs:// orbax writes a step in place and marks it done with commit_success.txt; a step a
  killed trainer left unmarked would otherwise be written into again on resume (tensorstore
  then reads the dead save's partial OCDBT manifest). Only the writer may remove them: an
  eval or export beside a running trainer would delete the save in progress.
  """
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=async_save,
                                         cleanup_tmp_directories=writer)
  return ocp.CheckpointManager(paths.abspath(directory), options=options, item_names=ITEMS)


def save(mngr, step: int, state, data_state: dict, meta: dict, *, force=False):
  return mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
      meta=ocp.args.JsonSave(meta)), force=force)


def abstract_like(tree, shardings):
  """ShapeDtypeStructs of `tree` (arrays or structs) placed in `shardings`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def check_finite(tree, where: str):
  bad = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(tree)
         if not bool(jnp.all(jnp.isfinite(x)))]
  if bad:
    raise ValueError(f'non-finite values in {where}: {bad[:3]}')


MetaCheck = Callable[[dict, str], None]


def check_fingerprints(meta: dict, *, tokenizer: str, fgrams: Optional[str], where: str):
  """Refuses a checkpoint trained with another tokenizer or f-gram set."""
  if meta.get('fgram_fingerprint') != fgrams:
    raise ValueError(
        f'checkpoint {where} was trained with f-gram set {str(meta.get("fgram_fingerprint"))[:12]}'
        f' but this run uses {str(fgrams)[:12]}; use the original f-gram set '
        '(--config.fgrams.path) or a new --workdir.')
  if meta.get('tokenizer_fingerprint') != tokenizer:
    raise ValueError(f'checkpoint {where} was trained with another tokenizer '
                     f'({str(meta.get("tokenizer_fingerprint"))[:12]} vs {tokenizer[:12]}); '
                     'use a new --workdir.')


def _path_key(k) -> str:
  """One step of a tree path as a plain name: `['mu']`, `.mu` and `[0]` compare by name."""
  for attr in ('key', 'name', 'idx'):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _leaf_specs(tree) -> dict:
  """{path: (shape, dtype)} of a tree's array leaves (arrays, structs or orbax metadata)."""
  return {'/'.join(_path_key(k) for k in path): (tuple(leaf.shape), str(leaf.dtype))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
          if hasattr(leaf, 'shape') and hasattr(leaf, 'dtype')}


def _stored_metadata(directory: str, step: int):
  """The tree of shapes and dtypes stored for a step's `state` (reads no arrays)."""
  handler = ocp.PyTreeCheckpointHandler()
  try:
    stored = handler.metadata(paths.as_epath(paths.join(directory, str(step), 'state')))
  finally:
    handler.close()
  return getattr(stored, 'tree', stored)


def check_structure(stored, expected, where: str, *, limit: int = 5):
  """Raises ValueError when a checkpoint's stored leaves differ from the restore target.

  `stored` is the orbax metadata tree, `expected` the abstract target; leaves are compared
  by path, shape and dtype. A mismatch is a run of another model, not a damaged file.
  """
  have, want = _leaf_specs(stored), _leaf_specs(expected)
  show = lambda spec: 'absent' if spec is None else f'{list(spec[0])} {spec[1]}'
  # In the target's order (step, params, opt_state): the parameters come before the optimizer.
  order = list(want) + sorted(set(have) - set(want))
  diffs = [f'{p}: {show(have.get(p))} -> {show(want.get(p))}'
           for p in order if have.get(p) != want.get(p)]
  if diffs:
    more = f' (and {len(diffs) - limit} more)' if len(diffs) > limit else ''
    raise ValueError(
        f'checkpoint {where} holds another model: {len(diffs)} of its leaves differ from this '
        f'config (stored -> expected): {"; ".join(diffs[:limit])}{more}. It was not restored '
        'or changed; use a new --workdir, or the config this run was trained with.')


def set_aside(directory: str, step: int) -> str:
  """Renames a damaged step to `<step>.unreadable[.n]`, which orbax neither lists nor deletes.

  Kept for inspection: a step that failed to read may still hold the only copy of hours of
  training (e.g. a transient storage error). Returns the new path. On gs:// it is a copy of
  every object, then a delete (`paths.replace`).
  """
  src = paths.join(directory, str(step))
  dst = paths.join(directory, f'{step}.unreadable')
  n = 1
  while paths.exists(dst):
    dst = paths.join(directory, f'{step}.unreadable.{n}')
    n += 1
  paths.replace(src, dst)
  return dst


def _latest_good(mngr, restore_step, check_meta: Optional[MetaCheck], select=lambda t: t,
                 expected=None, set_aside_damaged: bool = False):
  """Newest step whose restore succeeds; a damaged checkpoint (unreadable, truncated,
  non-finite) is skipped with a warning, and with set_aside_damaged moved out of orbax's
  sight so that neither its garbage collection nor a new save of that step deletes it.

  A checkpoint whose stored structure differs from `expected` (compared with the part of
  the stored tree `select` picks) raises, as do check_meta errors (another run's checkpoint).
  """
  directory = str(mngr.directory)
  steps = sorted(mngr.all_steps(), reverse=True)
  moved = []
  try:
    for step in steps:
      where = paths.join(directory, str(step))
      found = _try_step(directory, step, restore_step, select, expected)
      if isinstance(found, Exception):
        logging.warning('checkpoint %s is unreadable (%s: %s); trying the previous one', where,
                        type(found).__name__, str(found)[:300])
        if set_aside_damaged:
          moved.append(step)
          if jax.process_index() == 0:
            logging.warning('moved the unreadable checkpoint %s to %s (kept, not deleted)',
                            where, set_aside(directory, step))
        continue
      if check_meta is not None:
        check_meta(found['meta'], where)
      return found, step
  finally:
    _forget(mngr, moved)
  if steps:
    logging.warning('none of the checkpoints %s could be restored', steps)
  return None


def _try_step(directory, step, restore_step, select, expected):
  """The restored items of one step, or the exception that shows it damaged.

  Raises (does not return) a structure mismatch: that is another model, not damage.
  Multi-host: each process reads its own part of the step, so one may fail where another
  succeeds (a truncated shard file only it reads). The verdict is agreed before anything
  else happens (`_agree_damaged`): a step one process cannot read is damaged for all, so
  every process skips (and sets aside) the same steps and restores the same one.
  """
  where = paths.join(directory, str(step))
  error = None
  try:
    stored = _stored_metadata(directory, step)
  except Exception as e:  # pylint: disable=broad-except
    error = e
  if error is None and expected is not None:
    try:
      stored = select(stored)
    except (KeyError, TypeError, IndexError):
      stored = {}
    check_structure(stored, expected, where)
  restored = tree = None
  if error is None:
    try:
      restored, tree = restore_step(step)
    except Exception as e:  # pylint: disable=broad-except
      # orbax raises many kinds for a truncated or corrupt checkpoint.
      error = e
  if error is not None:
    _join_restore_barrier()
  if _agree_damaged(error is not None):
    return error or RuntimeError('another process could not read its part of it')
  try:
    check_finite(tree, where)   # on global arrays: every process takes part, same answer
  except ValueError as e:
    return e
  return restored


# orbax's Checkpointer.restore reads this process's part, then waits at this barrier for
# every process (a collective; CheckpointManagerOptions' default barrier prefix, None).
_RESTORE_BARRIER = 'Checkpointer:restore'


def _join_restore_barrier():
  """A process whose read failed before the restore's closing barrier joins it, so that the
  processes that read their parts leave the restore and every process reaches the
  agreement below through the same sequence of collectives."""
  if jax.process_count() > 1:
    ocp.multihost.sync_global_processes(
        ocp.multihost.unique_barrier_key(_RESTORE_BARRIER, prefix=None))


def _agree_damaged(damaged_here: bool) -> bool:
  """One decision for every process: damaged if any process found it so. Each process's
  verdict is gathered to all (a collective every process reaches once per step tried)."""
  if jax.process_count() == 1:
    return damaged_here
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  verdicts = multihost_utils.process_allgather(np.array([int(damaged_here)], np.int32))
  return bool(np.asarray(verdicts).any())


def _forget(mngr, moved):
  """Makes the manager re-list its steps after damaged ones were moved aside."""
  if not moved:
    return
  if jax.process_count() > 1:
    ocp.multihost.sync_global_processes('scone_jax_set_aside')
  mngr.reload()


def restore_latest(mngr, abstract_state, *, check_meta: Optional[MetaCheck] = None,
                   with_data: bool = True, set_aside_damaged: bool = False):
  """(state, data_state, step) of the newest checkpoint that reads back whole, or None.

  Raises ValueError, changing nothing, when a checkpoint's stored shapes differ from
  abstract_state. set_aside_damaged is for the run's own trainer (it saves and deletes steps
  in this directory); a reader leaves damaged steps where they are.
  """
  def restore_step(step):
    items = {'state': ocp.args.StandardRestore(abstract_state), 'meta': ocp.args.JsonRestore()}
    if with_data:
      items['data'] = ocp.args.JsonRestore()
    restored = mngr.restore(step, args=ocp.args.Composite(**items))
    return restored, restored['state'].params
  found = _latest_good(mngr, restore_step, check_meta, expected=abstract_state,
                       set_aside_damaged=set_aside_damaged)
  if found is None:
    return None
  restored, step = found
  return restored['state'], restored.get('data') if with_data else None, step


def restore_latest_params(directory: str, abstract_params, *,
                          check_meta: Optional[MetaCheck] = None):
  """(params, step) of the newest good checkpoint in directory, reading the parameters only.

  Orbax's partial restore reads just `state.params`: no optimizer state (~2x the parameters
  for Adam) is read or allocated. Returns None without a usable checkpoint; raises
  ValueError when the stored parameters' shapes differ from abstract_params. Read-only:
  damaged steps are skipped, never moved.
  """
  # A read-only manager of its own: one that already restored `state` whole has bound a
  # handler that refuses the partial-restore arguments.
  mngr = ocp.CheckpointManager(
      paths.abspath(directory), item_names=ITEMS,
      options=ocp.CheckpointManagerOptions(create=False, read_only=True))

  def restore_step(step):
    target = {'params': abstract_params}
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True),
        meta=ocp.args.JsonRestore()))
    return restored, restored['state']['params']
  try:
    found = _latest_good(mngr, restore_step, check_meta, select=lambda t: {'params': t['params']},
                         expected={'params': abstract_params})
  finally:
    mngr.close()
  if found is None:
    return None
  restored, step = found
  return restored['state']['params'], step
