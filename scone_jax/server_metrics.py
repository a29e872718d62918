"""The server's Prometheus metrics: what a vLLM dashboard reads, under scone_ names.

Per request (a choice: one prompt's completion): end-to-end latency, queue time (arrival to
admission into a decode slot), prefill time (admission to first token), decode time (first
to last token), time to first token, inter-token latency (every gap between a request's
tokens), prompt and generation token counts, and finished requests by finish reason. Rates
(tokens/s, requests/s) are left to Prometheus (`rate(scone_generation_tokens_total[1m])`):
a gauge computed between scrapes would change with whoever scrapes.
"""
import time

_LATENCY = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
_TOKEN_GAP = (.001, .0025, .005, .01, .02, .04, .08, .16, .32, .64, 1.28, 2.56, 5, 10)
_STEP = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, .01, .03, .1, .3, 1, 3)
_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
ENDPOINTS = ('/v1/completions', '/v1/chat/completions', '/v1/models', '/health', '/metrics',
             '/tokenize', '/detokenize', '/tokenizer_info')


class Metrics:
  """The metrics of one app (a registry of its own)."""

  def __init__(self, engines: dict):
    import prometheus_client as prom  # pylint: disable=g-import-not-at-top
    self.prom = prom
    r = self.registry = prom.CollectorRegistry()

    def hist(name, doc, buckets):
      return prom.Histogram(f'scone_{name}', doc, ['model'], registry=r, buckets=buckets)

    self.requests = prom.Counter('scone_http_requests', 'HTTP requests by endpoint and status.',
                                 ['endpoint', 'status'], registry=r)
    self.prompt_tokens = prom.Counter('scone_prompt_tokens', 'Prompt tokens admitted.',
                                      ['model'], registry=r)
    self.generation_tokens = prom.Counter('scone_generation_tokens', 'Tokens generated.',
                                          ['model'], registry=r)
    self.success = prom.Counter('scone_request_success', 'Finished requests (one per '
                                'completion) by finish reason: stop, length, abort (cancelled '
                                'or timed out), error.', ['model', 'finished_reason'],
                                registry=r)
    self.e2e = hist('e2e_request_latency_seconds', 'From arrival to the last token.', _LATENCY)
    self.queue = hist('request_queue_time_seconds', 'From arrival to admission into a decode '
                      'slot (its prefill starts).', _LATENCY)
    self.prefill = hist('request_prefill_time_seconds', 'From admission to the first token.',
                        _LATENCY)
    self.decode = hist('request_decode_time_seconds', 'From the first token to the last.',
                       _LATENCY)
    self.ttft = hist('time_to_first_token_seconds', 'From arrival to the first token.',
                     _LATENCY)
    self.itl = hist('inter_token_latency_seconds', 'Between consecutive tokens of a request.',
                    _TOKEN_GAP)
    self.tpot = hist('time_per_output_token_seconds', 'Per request: (last token - first '
                     'token) / (tokens - 1).', _TOKEN_GAP)
    self.prompt_hist = hist('request_prompt_tokens', 'Prompt tokens per request (BOS '
                            'included).', _TOKENS)
    self.generation_hist = hist('request_generation_tokens', 'Tokens generated per request.',
                                _TOKENS)
    self.timings = {
        'table_lookup': hist('table_lookup_seconds', 'Host table lookup per decode step (ram, '
                             'mmap, tensorstore storages; device and host storages gather '
                             'inside the step).', _STEP),
        'decode_step': hist('decode_step_seconds', 'One decode step of every slot (lookup '
                            'included), its share of an on-device decode chunk.', _STEP)}
    gauges = {
        'pending': prom.Gauge('scone_queue_length', 'Prompts waiting for a decode slot.',
                              ['model'], registry=r),
        'active': prom.Gauge('scone_active_slots', 'Decode slots in use.', ['model'],
                             registry=r),
        'slots': prom.Gauge('scone_slots', 'Decode slots (--max_batch).', ['model'],
                            registry=r)}
    for name, engine in engines.items():
      for key, gauge in gauges.items():
        gauge.labels(name).set_function(lambda e=engine, k=key: e.load()[k])
      engine.on_timing = (lambda kind, seconds, n=name:
                          self.timings[kind].labels(n).observe(seconds))

  def finished(self, completion):
    """Observes a request's choices once it is over (done, cancelled or failed)."""
    model, arrived = completion.params.model, completion.arrived
    end = time.perf_counter()
    for c in completion.choices:
      self.prompt_hist.labels(model).observe(len(c.prompt_ids))
      self.generation_hist.labels(model).observe(c.completion_tokens)
      self.generation_tokens.labels(model).inc(c.completion_tokens)
      reason = c.finish_reason or ('error' if c.error is not None else 'abort')
      self.success.labels(model, reason).inc()
      times = c.token_times
      last = times[-1] if times else end
      self.e2e.labels(model).observe(max(last, arrived) - arrived)
      if c.admitted_at is not None:
        self.queue.labels(model).observe(c.admitted_at - arrived)
        if times:
          self.prefill.labels(model).observe(times[0] - c.admitted_at)
      if not times:
        continue
      self.ttft.labels(model).observe(times[0] - arrived)
      self.decode.labels(model).observe(times[-1] - times[0])
      itl = self.itl.labels(model)
      for a, b in zip(times, times[1:]):
        itl.observe(b - a)
      if len(times) > 1:
        self.tpot.labels(model).observe((times[-1] - times[0]) / (len(times) - 1))

  def text(self) -> bytes:
    return self.prom.generate_latest(self.registry)
