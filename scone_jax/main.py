"""scone_jax command line: extract → train → eval → export → generate / serve.

  python -m scone_jax.main --mode=extract --config=experiments/configs/scone.py --workdir=DIR  # tokenizer, f-grams, token shards
  python -m scone_jax.main --mode=train   --config=experiments/configs/scone.py --workdir=DIR
  python -m scone_jax.main --mode=eval    --config=... --workdir=DIR --eval_text=a.txt,b.txt
  python -m scone_jax.main --mode=export  --config=... --workdir=DIR [--export_dir=OUT] [--fgram_set=a.npz[,b.npz]]
  python -m scone_jax.main --mode=generate --export_dir=OUT --prompt="..."
  python -m scone_jax.main --mode=serve --export_dir=OUT [--port=8000] [--max_batch=8] [--api_key_file=F] [--mesh=tensor:8]
  python -m scone_jax.main --mode=compile --config=... --topology=v5e:4x4 [--num_slices=N] [--table_storage=host --matcher_storage=host] [--mesh=tensor:4]

This file wires stages together; the work happens in the modules it calls.
"""
import json
import logging as py_logging
import os
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

MODES = ('extract', 'train', 'eval', 'export', 'generate', 'serve', 'compile')

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Run config file (a get_config() .py), e.g. experiments/configs/scone.py.',
    lock_config=True)
_MODE = flags.DEFINE_enum('mode', 'train', MODES, 'What to run.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (artifacts and checkpoints).')
_EVAL_TEXT = flags.DEFINE_list('eval_text', None,
                               'Plain-text files (blank-line-separated documents) to evaluate.')
_EXPORT_DIR = flags.DEFINE_string('export_dir', None, 'Export directory (default WORKDIR/export).')
_FGRAM_SET = flags.DEFINE_list(
    'fgram_set', None, '--mode=export: the f-gram set(s) whose table to export instead of the '
    'run\'s own: fgrams.npz files made by --mode=extract with this run\'s tokenizer (any '
    'corpus, S or max_len; a set of another tokenizer is refused). a.npz,b.npz: their union, '
    'each f-gram once, ranked by the sum of the sets\' counts, then by token tuple.')
_PROMPT = flags.DEFINE_multi_string('prompt', None, 'Prompt(s) for --mode=generate.')
_MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', 64, 'Tokens to generate per prompt.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.0, '0 = greedy decoding.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Sample from the k most likely tokens (0 = off).')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling mass (1 = off).')
_TABLE_STORAGE = flags.DEFINE_enum(
    'table_storage', 'host', ('device', 'host', 'ram', 'mmap', 'tensorstore'),
    'Where serving keeps the f-gram table: device (accelerator memory) or host (host memory '
    'the compiled step gathers from), both read inside the decode step; ram, mmap or '
    'tensorstore (tables bigger than memory): host lookups called from the step.')
_MATCHER_STORAGE = flags.DEFINE_enum(
    'matcher_storage', None, ('device', 'host'),
    'Where serve, generate, eval and compile keep the f-gram matcher (~39 bytes per f-gram): '
    'device (accelerator memory, replicated per chip) or host (host memory, read by the '
    'compiled step: the accelerator then holds nothing that grows with the number of '
    'f-grams). Default: host unless --table_storage=device.')
_MESH = flags.DEFINE_string(
    'mesh', '', 'serve / generate / eval of an export: tensor-parallel over local devices. '
    'tensor:N (or N; -1 = every local device) splits the main model\'s attention heads and MLP '
    'units (as training\'s mesh.tensor does) and the KV cache\'s heads over N devices; the '
    'f-gram table stays in --table_storage (device/host: split along d over the same devices). '
    'Empty: one device. With --mode=compile: the decode chunk over tensor:N of the topology\'s '
    'first N chips.')
_TABLE_DTYPE = flags.DEFINE_enum(
    'table_dtype', None, ('float32', 'float16', 'bfloat16', 'int8'),
    'The f-gram table as serve, generate and eval hold it (default: the export\'s dtype): '
    'float16 / bfloat16, or int8 with a float32 scale per row (about half of float16\'s '
    'host memory; rows dequantized in the gather). Converted as the table is read.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed for --mode=generate.')
_VERBOSE = flags.DEFINE_bool('verbose', False, 'Show the traceback of a user error too.')
_HOST = flags.DEFINE_string('host', '127.0.0.1', 'Address --mode=serve listens on.')
_PORT = flags.DEFINE_integer('port', 8000, 'Port --mode=serve listens on (0 = any free port).')
_MAX_BATCH = flags.DEFINE_integer('max_batch', 8, 'Decode slots of --mode=serve: requests '
                                  'decoded together (continuous batching).')
_TOKENS_PER_DISPATCH = flags.DEFINE_integer(
    'tokens_per_dispatch', 8, 'Decode steps per compiled call of --mode=serve: requests join '
    'and leave between these chunks and their tokens stream when a chunk returns (1 = every '
    'token, more = fewer dispatches).')
_SERVED_MODEL_NAME = flags.DEFINE_string(
    'served_model_name', None, 'The model id --mode=serve answers to (default: the export '
    'directory\'s base name; the path is never shown to clients).')
_MAX_BODY_MB = flags.DEFINE_float('max_body_mb', 4.0, '--mode=serve: largest request body '
                                  '(MB); larger ones get 413.')
_MAX_PROMPTS = flags.DEFINE_integer('max_prompts_per_request', 256, '--mode=serve: most '
                                    'prompts in one completions request.')
_MAX_PENDING = flags.DEFINE_integer('max_pending', 1024, '--mode=serve: most prompts waiting '
                                    'for a decode slot; beyond it 503 with Retry-After '
                                    '(0 = no bound).')
_REQUEST_TIMEOUT = flags.DEFINE_float('request_timeout', 0.0, '--mode=serve: default and '
                                      'largest per-request "timeout" in seconds (0 = none).')
_DRAIN_TIMEOUT = flags.DEFINE_float('drain_timeout', 30.0, '--mode=serve: after SIGTERM, how '
                                    'long in-flight requests may finish before they are '
                                    'cancelled (0 = no deadline).')
_API_KEY = flags.DEFINE_string('api_key', None, '--mode=serve: require "Authorization: '
                               'Bearer KEY" on every endpoint but /health.')
_API_KEY_FILE = flags.DEFINE_string('api_key_file', None, '--mode=serve: accepted keys, one '
                                    'per line (kept out of the process list).')
_CHAT_TEMPLATE = flags.DEFINE_string(
    'chat_template', None, '--mode=serve: the Jinja chat template of /v1/chat/completions, '
    'or a Hugging Face tokenizer_config.json holding one (default: "Role: content" lines '
    'for a base model, then "Assistant:").')
_WARMUP = flags.DEFINE_enum(
    'warmup', 'all', ['all', 'shortest'], '--mode=serve: compile before serving every prompt '
    'width bucket (all: no request waits for a compile) or only the shortest (a faster start).')
_HEADER_TIMEOUT = flags.DEFINE_float('header_timeout', 10.0, '--mode=serve: seconds a client '
                                     'has to send a request\'s headers (0 = no bound).')
_BODY_TIMEOUT = flags.DEFINE_float('body_timeout', 30.0, '--mode=serve: seconds a request\'s '
                                   'body may stall (no byte arrives) before the connection '
                                   'is closed (0 = no bound).')
_MAX_CONNECTIONS = flags.DEFINE_integer('max_connections', 1024, '--mode=serve: most open '
                                        'connections; more are answered 503 and closed '
                                        '(0 = no bound).')
_KEEP_ALIVE_TIMEOUT = flags.DEFINE_integer('keep_alive_timeout', 5, '--mode=serve: seconds an '
                                           'idle kept-alive connection stays open.')
_KEEP_ALIVE_REQUESTS = flags.DEFINE_integer('keep_alive_requests', 1000, '--mode=serve: most '
                                            'requests on one connection (0 = no bound).')
_TOPOLOGY = flags.DEFINE_string('topology', None, 'TPU topology --mode=compile compiles for, '
                                'e.g. v5e:4x4, v5p:2x2x1, v4:4x4x4 (default: '
                                'config.compile.topology).')
_NUM_SLICES = flags.DEFINE_integer('num_slices', None, 'Slices of --topology (default: '
                                   'config.compile.num_slices); the mesh spans them with '
                                   'mesh.dcn_data.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Call jax.distributed.initialize() (multi-host; automatic on TPU pods '
    'and with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID set).')


def _init_distributed():
  import jax  # pylint: disable=g-import-not-at-top
  coordinator = os.environ.get('JAX_COORDINATOR_ADDRESS')
  if coordinator:
    jax.distributed.initialize(coordinator_address=coordinator,
                               num_processes=int(os.environ['JAX_NUM_PROCESSES']),
                               process_id=int(os.environ['JAX_PROCESS_ID']))
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()


class _QuietLibraries(py_logging.Filter):
  """Drops orbax's per-save INFO chatter so the progress lines stay readable, and the
  traceback orbax's save thread logs for a full disk (the trainer reports it as one error
  line; --verbose keeps it)."""
  _NOISY = (os.sep + 'orbax' + os.sep, os.sep + 'tensorstore' + os.sep)

  def filter(self, record):
    noisy = any(n in record.pathname for n in self._NOISY)
    if record.exc_info and not _VERBOSE.value:
      from scone_jax import paths  # pylint: disable=g-import-not-at-top
      if paths.is_disk_full(record.exc_info[1]):
        if record.name == 'asyncio':
          return False   # orbax's abandoned write tasks: "Task exception was never retrieved"
        if noisy:
          record.exc_info, record.exc_text = None, None
    return record.levelno >= py_logging.WARNING or not noisy


def _quiet_closed_loop_callbacks():
  """After a failed async checkpoint save, tensorstore still completes the abandoned writes
  and their callbacks hit orbax's closed event loop; each would print a traceback around
  the CLI's one-line error. Those (RuntimeError 'Event loop is closed') are dropped unless
  --verbose; every other uncaught exception is printed as before."""
  import threading  # pylint: disable=g-import-not-at-top

  def closed_loop(exc):
    return isinstance(exc, RuntimeError) and str(exc) == 'Event loop is closed'

  def excepthook(kind, value, tb, default=sys.excepthook):
    if not closed_loop(value):
      default(kind, value, tb)

  def thread_hook(args, default=threading.excepthook):
    if not closed_loop(args.exc_value):
      default(args)

  def unraisable_hook(args, default=sys.unraisablehook):
    if not closed_loop(args.exc_value):
      default(args)

  sys.excepthook, threading.excepthook, sys.unraisablehook = (excepthook, thread_hook,
                                                              unraisable_hook)


def _require(value, flag):
  if not value:
    raise app.UsageError(f'--{flag} is required for --mode={_MODE.value}.')
  return value


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  py_logging.getLogger('absl').setLevel(py_logging.INFO)
  logging.set_verbosity(logging.INFO)
  logging.use_absl_handler()
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if not _VERBOSE.value:
    _quiet_closed_loop_callbacks()
  mode = _MODE.value
  from scone_jax import paths  # pylint: disable=g-import-not-at-top
  for flag in (_WORKDIR, _EXPORT_DIR):
    if flag.value:
      try:
        paths.check(flag.value)
      except ValueError as e:
        raise app.UsageError(f'--{flag.name}={flag.value}: {e}') from None
      paths.check_access(flag.value)   # gs://: one error line if the bucket cannot be used

  if _FGRAM_SET.value and mode != 'export':
    raise app.UsageError(f'--fgram_set is for --mode=export; --mode={mode} uses the export\'s '
                         'or the run\'s own f-gram set.')
  serving_export = mode in ('serve', 'generate') or (
      mode == 'eval' and _EXPORT_DIR.value and not _WORKDIR.value)
  if _MESH.value and not serving_export and mode != 'compile':
    raise app.UsageError(f'--mesh is for serve, generate and eval of an --export_dir and for '
                         f'compile; --mode={mode} uses the config\'s mesh '
                         '(--config.mesh.tensor=N).')
  mesh = None
  if serving_export:
    from scone_jax import sharding  # pylint: disable=g-import-not-at-top
    mesh = sharding.serving_mesh(_MESH.value)

  if mode == 'serve':
    from scone_jax import server  # pylint: disable=g-import-not-at-top
    limits = server.Limits(max_body_mb=_MAX_BODY_MB.value,
                           max_prompts_per_request=_MAX_PROMPTS.value,
                           max_pending=_MAX_PENDING.value,
                           request_timeout=_REQUEST_TIMEOUT.value,
                           drain_timeout=_DRAIN_TIMEOUT.value,
                           header_timeout=_HEADER_TIMEOUT.value,
                           body_timeout=_BODY_TIMEOUT.value,
                           max_connections=_MAX_CONNECTIONS.value,
                           keep_alive_timeout=_KEEP_ALIVE_TIMEOUT.value,
                           keep_alive_requests=_KEEP_ALIVE_REQUESTS.value).check()
    server.run(_require(_EXPORT_DIR.value, 'export_dir'), host=_HOST.value, port=_PORT.value,
               table_storage=_TABLE_STORAGE.value, table_dtype=_TABLE_DTYPE.value,
               matcher_storage=_MATCHER_STORAGE.value,
               max_batch=_MAX_BATCH.value,
               tokens_per_dispatch=_TOKENS_PER_DISPATCH.value,
               served_model_name=_SERVED_MODEL_NAME.value, limits=limits,
               api_keys=server.read_api_keys(_API_KEY.value, _API_KEY_FILE.value), mesh=mesh,
               chat_template=_CHAT_TEMPLATE.value, warmup=_WARMUP.value)
    return

  if serving_export:
    from scone_jax import serving  # pylint: disable=g-import-not-at-top
    export_dir = _require(_EXPORT_DIR.value, 'export_dir')
    gen = serving.load(export_dir, table_storage=_TABLE_STORAGE.value, mesh=mesh,
                       table_dtype=_TABLE_DTYPE.value, matcher_storage=_MATCHER_STORAGE.value)
    if mode == 'generate':
      prompts = _require(_PROMPT.value, 'prompt')
      texts = gen.generate_text(prompts, max_new_tokens=_MAX_NEW_TOKENS.value,
                                temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                                top_p=_TOP_P.value, seed=_SEED.value)
      for prompt, text in zip(prompts, texts):
        print(f'=== {prompt!r}\n{prompt}{text}')
    else:
      from scone_jax import corpus  # pylint: disable=g-import-not-at-top
      docs = corpus.read_text_documents(_require(_EVAL_TEXT.value, 'eval_text'))
      print(json.dumps(gen.evaluate(docs)))
    return

  if mode == 'compile':
    # This host only compiles: its own backend stays the CPU (never probe for a local TPU);
    # the TPU devices are the topology's compile-only ones.
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
    from scone_jax import compile as compile_lib  # pylint: disable=g-import-not-at-top
    cfg = _CONFIG.value
    if cfg is None:
      raise app.UsageError('--config is required, e.g. experiments/configs/olmo1b.py:0.6b')
    topology = _TOPOLOGY.value or cfg.compile.topology
    if not topology:
      raise app.UsageError('--topology (e.g. v5e:4x4) or config.compile.topology is required '
                           'for --mode=compile.')
    num_slices = _NUM_SLICES.value or cfg.compile.num_slices
    from scone_jax import sharding  # pylint: disable=g-import-not-at-top
    report = compile_lib.compile_steps(
        cfg, topology, num_slices, table_storage=_TABLE_STORAGE.value,
        matcher_storage=_MATCHER_STORAGE.value,
        decode_tensor=sharding.parse_serving_mesh(_MESH.value) if _MESH.value else 0)
    for line in compile_lib.summary_lines(report):
      print(line)
    print(json.dumps(report))
    compile_lib.check_fits(report)
    return

  _init_distributed()
  from scone_jax import artifacts  # pylint: disable=g-import-not-at-top
  from scone_jax import train  # pylint: disable=g-import-not-at-top
  cfg = _CONFIG.value
  if cfg is None:
    raise app.UsageError('--config is required, e.g. --config=experiments/configs/scone.py')
  workdir = _require(_WORKDIR.value, 'workdir')
  train.validate_config(cfg)

  if mode == 'extract':
    # Everything before training: tokenizer, f-gram set, the training split's token shards.
    artifacts.check_config(cfg, workdir)
    artifacts.write_config(cfg, workdir)
    # An extraction needs no held-out split: heldout_fraction=0 gives every document to it.
    run = artifacts.prepare_run(cfg, workdir, need_heldout=False)
    if run.fgram_set is not None:
      print(artifacts.fgram_summary(run.fgram_set, run.tokenizer), end='')
      print(f'wrote {paths.join(workdir, artifacts.FGRAMS_FILE)}')
    if run.train_shards:
      from scone_jax import token_shards  # pylint: disable=g-import-not-at-top
      index = token_shards.read_index(run.train_shards)
      print(f'token shards {run.train_shards}: {index["num_docs"]:,} documents, '
            f'{index["num_tokens"]:,} tokens in {index["num_shards"]} shards')
  elif mode == 'train':
    import jax  # pylint: disable=g-import-not-at-top
    # One writer per run directory (process 0 holds the lock for a multi-host run).
    lock = artifacts.RunLock(workdir) if jax.process_index() == 0 else None
    if lock is not None:
      paths.makedirs(workdir)
      lock.acquire()
    try:
      artifacts.check_config(cfg, workdir)
      artifacts.write_config(cfg, workdir)
      run = artifacts.prepare_run(cfg, workdir)
      last = train.train(cfg, workdir, run)
    finally:
      if lock is not None:
        lock.release()
    print(json.dumps(last))
    if 'preempted_at_step' in last:
      from scone_jax import preemption  # pylint: disable=g-import-not-at-top
      sys.exit(preemption.EXIT_CODE)
  elif mode == 'eval':
    run = artifacts.prepare_run(cfg, workdir)
    trainer = train.load_for_eval(cfg, workdir, run)
    if _EVAL_TEXT.value:
      from scone_jax import corpus  # pylint: disable=g-import-not-at-top
      docs = corpus.read_text_documents(_EVAL_TEXT.value)
    else:
      docs = run.heldout_docs
    print(json.dumps(train.eval_documents(trainer, docs)))
  elif mode == 'export':
    from scone_jax import export  # pylint: disable=g-import-not-at-top
    run = artifacts.prepare_run(cfg, workdir)
    export_dir = _EXPORT_DIR.value or paths.join(workdir, 'export')
    summary = export.export(cfg, workdir, run, export_dir, fgram_set_paths=_FGRAM_SET.value)
    print(json.dumps(summary))


# Errors that are the user's to fix (bad input, missing file, full disk, a locked run):
# one line `error: ...`, exit 1 (2 for usage). Anything else is a bug: full traceback.
_USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError,
                NotADirectoryError, PermissionError, FloatingPointError, RuntimeError)


def _is_user_error(e: BaseException) -> bool:
  import errno  # pylint: disable=g-import-not-at-top
  if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
    return True
  return isinstance(e, _USER_ERRORS) and not isinstance(e, (NotImplementedError,
                                                             RecursionError))


def _main_with_errors(argv):
  try:
    main(argv)
  except app.UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except Exception as e:  # pylint: disable=broad-except
    if not _is_user_error(e):
      raise
    if _VERBOSE.value:
      traceback.print_exc()
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # ml_collections reports an unknown or ill-typed --config.FIELD=VALUE this way.
    bad = [a for a in argv[1:] if a.startswith('--config.')]
    print(f'error: a --config override is not a config field or has the wrong type ({e}); '
          f'overrides given: {" ".join(bad) or "none"}; see scone_jax/config.py.',
          file=sys.stderr)
    sys.exit(2)


def run():
  app.run(_main_with_errors, flags_parser=_parse_flags)


if __name__ == '__main__':
  sys.exit(run())
