"""What the server passes to the decode core, checked over HTTP with the official openai
client: presence/frequency penalties and logit_bias applied on the device (greedy tokens
equal an independent forward-pass reference with OpenAI's formula), top_p at its smallest
is greedy (never the padding token), no request waits for a compile (Engine.warmup of
every shape), and the engine's ('admitted',) event feeding the queue-time and prefill-time
histograms.

These need the decode core's side of the contract (CONTRACT.md); the server validates and
forwards every parameter.
"""
# pylint: disable=protected-access
import json
import os
import time
import types
import urllib.request

import jax
import numpy as np
import pytest

from scone_jax import model as model_lib
from scone_jax import serving
from scone_jax import streaming
from test_server import build_export, start_server

PROMPT = 'The nation must protect'


@pytest.fixture(scope='module')
def live(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('server_penalties'))
  export_dir = build_export(root)
  srv = start_server(export_dir, os.path.join(root, 'server.log'), '--warmup=all')
  gen = serving.load(export_dir)
  yield types.SimpleNamespace(srv=srv, client=srv.client, url=srv.url, model='export',
                              gen=gen, tok=gen.tokenizer)
  if srv.proc.poll() is None:
    srv.proc.kill()
    srv.proc.wait()
  srv.log.close()


def _last_logits(gen, fed) -> np.ndarray:
  """The model's logits after `fed` (BOS included), by one forward pass without a cache."""
  fed = np.asarray(fed)
  ints = gen.prompt_batch([fed], [False], [1], fed.size).ints_NxWx4
  x = gen.input_vectors(gen.params, gen.rows_for(ints[..., 2]), ints)
  logits = gen.model.apply({'params': gen.params}, x, positions_BxL=ints[..., 1],
                           method=model_lib.SconeLM.backbone)
  return np.asarray(logits[0, -1], np.float64)


def _reference(live, n, presence=0.0, frequency=0.0, bias=None) -> list:
  """Greedy tokens with OpenAI's penalties: logits[t] - presence * (count[t] > 0) -
  frequency * count[t] + bias[t], counts over the tokens generated so far."""
  fed = [0] + live.tok.encode(PROMPT).tolist()
  out, counts = [], np.zeros(live.gen.config.vocab_size)
  for _ in range(n):
    logits = _last_logits(live.gen, fed + out)
    logits -= presence * (counts > 0) + frequency * counts
    for t, b in (bias or {}).items():
      logits[t] += b
    tok = int(np.argmax(logits))
    if tok == live.tok.eos_id:
      break
    out.append(tok)
    counts[tok] += 1
  return out


def _greedy(live, n, **kw) -> list:
  return live.client.completions.create(model=live.model, prompt=PROMPT, max_tokens=n,
                                        temperature=0, **kw).choices[0].token_ids


# First: it needs a server that has served nothing yet.
@pytest.mark.slow
def test_no_request_waits_for_a_compile(live):
  """Sampled, with logprobs, with penalties and bias, several prompts at once: each first
  of its kind is as quick as a greedy request (a compile takes seconds)."""
  kinds = [dict(temperature=1.0), dict(temperature=0.7, logprobs=3),
           dict(temperature=0, logprobs=0, echo=True),
           dict(temperature=1.0, extra_body={'top_k': 5}, top_p=0.5),
           dict(temperature=0, presence_penalty=0.5, logit_bias={'5': 3}),
           dict(temperature=1.0, frequency_penalty=0.5, logprobs=1),
           dict(temperature=1.0, prompt=[PROMPT] * 3), dict(temperature=0, prompt=['a'] * 4),
           dict(temperature=0, prompt=' '.join([PROMPT] * 6))]  # a wider prompt bucket
  for kw in kinds:
    args = dict(model=live.model, prompt=PROMPT, max_tokens=4)
    args.update(kw)
    t0 = time.perf_counter()
    live.client.completions.create(**args)
    assert time.perf_counter() - t0 < 2.0, (kw, time.perf_counter() - t0)


@pytest.mark.slow
def test_presence_and_frequency_penalties_change_greedy_tokens_as_openai_says(live):
  plain = _greedy(live, 16)
  assert plain == _reference(live, 16)
  for kw in (dict(presence_penalty=1.5), dict(frequency_penalty=1.0),
             dict(presence_penalty=-1.0, frequency_penalty=0.5)):
    got = _greedy(live, 16, **kw)
    want = _reference(live, 16, presence=kw.get('presence_penalty', 0),
                      frequency=kw.get('frequency_penalty', 0))
    assert got == want, kw
  assert _greedy(live, 16, presence_penalty=2.0) != plain


@pytest.mark.slow
def test_logit_bias_changes_greedy_tokens(live):
  plain = _greedy(live, 8)
  forced = _greedy(live, 8, logit_bias={'7': 100})
  assert forced == [7] * 8
  banned = _greedy(live, 8, logit_bias={str(plain[0]): -100})
  assert banned == _reference(live, 8, bias={plain[0]: -100}) and plain[0] not in banned
  chat = live.client.chat.completions.create(
      model=live.model, messages=[{'role': 'user', 'content': 'hi'}], max_tokens=4,
      temperature=0, logit_bias={'9': 100}, logprobs=True)
  nine = list(streaming.TokenTexts(live.tok).bytes(9))
  assert [e.bytes for e in chat.choices[0].logprobs.content] == [nine] * 4


@pytest.mark.slow
def test_the_smallest_top_p_is_greedy(live):
  plain = _greedy(live, 12)
  for seed in (1, 2):
    r = live.client.completions.create(model=live.model, prompt=PROMPT, max_tokens=12,
                                       temperature=1.0, top_p=1e-38, seed=seed)
    assert r.choices[0].token_ids == plain and 0 not in r.choices[0].token_ids


@pytest.mark.slow
def test_queue_and_prefill_times_are_observed(live):
  def counts():
    with urllib.request.urlopen(live.url + '/metrics', timeout=30) as r:
      text = r.read().decode()
    return {name: float(line.split()[-1]) for line in text.splitlines()
            for name in ('scone_request_queue_time_seconds_count',
                         'scone_request_prefill_time_seconds_count')
            if line.startswith(name)}

  before = counts()
  live.client.completions.create(model=live.model, prompt=[PROMPT] * 3, max_tokens=3,
                                 temperature=0)
  after = counts()
  for name, value in after.items():
    assert value - before.get(name, 0) == 3, (name, json.dumps(after))
  assert len(after) == 2
