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


def _latest_good(mngr, restore_step, check_meta: Optional[MetaCheck]):
  """Newest step whose restore succeeds; a checkpoint that does not read back whole is
  skipped with a warning. check_meta errors (another run's checkpoint) are raised."""
  steps = sorted(mngr.all_steps(), reverse=True)
  for step in steps:
    where = paths.join(str(mngr.directory), str(step))
    try:
      restored, tree = restore_step(step)
      check_finite(tree, where)
    except Exception as e:  # pylint: disable=broad-except
      # orbax raises many kinds for a truncated or corrupt checkpoint.
      logging.warning('checkpoint %s is unreadable (%s: %s); trying the previous one', where,
                      type(e).__name__, str(e)[:300])
      continue
    if check_meta is not None:
      check_meta(restored['meta'], where)
    return restored, step
  if steps:
    logging.warning('none of the checkpoints %s could be restored', steps)
  return None


def restore_latest(mngr, abstract_state, *, check_meta: Optional[MetaCheck] = None,
                   with_data: bool = True):
  """(state, data_state, step) of the newest checkpoint that reads back whole, or None."""
  def restore_step(step):
    items = {'state': ocp.args.StandardRestore(abstract_state), 'meta': ocp.args.JsonRestore()}
    if with_data:
      items['data'] = ocp.args.JsonRestore()
    restored = mngr.restore(step, args=ocp.args.Composite(**items))
    return restored, restored['state'].params
  found = _latest_good(mngr, restore_step, check_meta)
  if found is None:
    return None
  restored, step = found
  return restored['state'], restored.get('data') if with_data else None, step


def restore_latest_params(directory: str, abstract_params, *,
                          check_meta: Optional[MetaCheck] = None):
  """(params, step) of the newest good checkpoint in directory, reading the parameters only.

  Orbax's partial restore reads just `state.params`: no optimizer state (~2x the parameters
  for Adam) is read or allocated. Returns None without a usable checkpoint.
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
    found = _latest_good(mngr, restore_step, check_meta)
  finally:
    mngr.close()
  if found is None:
    return None
  restored, step = found
  return restored['state']['params'], step
