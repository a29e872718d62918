"""/tokenize and /detokenize of body-sized inputs in a process of their own.

SentencePiece's encode holds the GIL for as long as it runs: 5.8 s for a 3.6 MB prompt of
the tests' tiny vocabulary, during which no other thread of the server (the event loop, the
decode thread) runs at all, whichever pool it is called from. Inputs larger than
SMALL_CHARS (texts) or SMALL_IDS (ids) are therefore tokenized in a worker process
(spawned: the server's threads and JAX are never forked) and only their ids come back;
smaller ones take a few milliseconds and stay in the calling thread.
"""
import concurrent.futures
import multiprocessing
import os
import threading
import time
from typing import Optional

import numpy as np

from scone_jax import protocol
from scone_jax import tokenizer as tokenizer_lib

SMALL_CHARS = 64 << 10
SMALL_IDS = 16 << 10
_worker = {}


def _start(server_pid: int, path: str, kind: str, special_ids: dict, eos_id: int):
  # Watch first, with the pid the server gave: a server killed while this worker was still
  # importing is already gone here, and os.getppid() would name init instead of it.
  threading.Thread(target=_exit_with, args=(server_pid,), daemon=True).start()
  tok = tokenizer_lib.load(path, kind, special_ids)
  _worker.update(tokenizer=tok, specials=protocol.Specials(tok, eos_id))


def _exit_with(server_pid: int):
  """Ends this worker once the server is gone: a server killed outright (SIGKILL, OOM)
  never shuts its pool down, and a worker blocked on its queue would outlive it, holding
  the server's stdout and stderr open (a caller reading them to EOF would wait forever)."""
  while os.getppid() == server_pid:
    time.sleep(1.0)
  os._exit(0)  # pylint: disable=protected-access


def _ids(specials: protocol.Specials, text: str) -> np.ndarray:
  """text's ids, the BOS and EOS strings read as those tokens."""
  parts = []
  for plain, special in specials.pieces(text):
    parts.append(np.asarray(specials.tokenizer.encode(plain), np.int32))
    if special is not None:
      parts.append(np.asarray([special], np.int32))
  return np.concatenate(parts)


def _encode(text: str) -> np.ndarray:
  return _ids(_worker['specials'], text)


def _decode(ids: np.ndarray) -> str:
  return _worker['tokenizer'].decode(ids)


class Tokenizing:
  """Encode and decode for the tokenizer endpoints: inline when small, in the worker
  process when large (one at a time: the calling threads wait in its queue)."""

  def __init__(self, tokenizer, eos_id: int, workers: int = 1):
    self.specials = protocol.Specials(tokenizer, eos_id)
    self.tokenizer = tokenizer
    self._args = (tokenizer.path, tokenizer.kind, dict(getattr(tokenizer, 'overrides', {})),
                  eos_id)
    self._workers = workers
    self._pool: Optional[concurrent.futures.ProcessPoolExecutor] = None

  def start(self):
    """Starts the worker process (its first call would otherwise wait for it)."""
    if self._pool is None:
      self._pool = concurrent.futures.ProcessPoolExecutor(
          self._workers, mp_context=multiprocessing.get_context('spawn'),
          initializer=_start, initargs=(os.getpid(), *self._args))
      self._pool.submit(_encode, '')

  def encode(self, text: str) -> np.ndarray:
    if len(text) <= SMALL_CHARS:
      return _ids(self.specials, text)
    self.start()
    return self._pool.submit(_encode, text).result()

  def decode(self, ids: list) -> str:
    if len(ids) <= SMALL_IDS:
      return self.tokenizer.decode(ids)
    self.start()
    return self._pool.submit(_decode, np.asarray(ids, np.int32)).result()

  def shutdown(self):
    if self._pool is not None:
      self._pool.shutdown(wait=False, cancel_futures=True)
