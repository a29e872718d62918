"""Connection limits uvicorn does not have: a header read timeout, a body read timeout, a
cap on open connections and on requests per kept-alive connection.

uvicorn's h11 protocol arms a timer only after a response (the keep-alive timeout), and
disarms it on any byte received: a client that opens a connection and sends a header line
every few seconds (slowloris) is held forever, and nothing bounds how many such clients
there are. `guarded_protocol` subclasses that protocol: the request line and headers must
arrive within --header_timeout of the connection's start (or the previous response's end),
however the bytes trickle in (408, then closed); a body that stalls for --body_timeout
(no byte while the server is reading) is cut; a connection beyond --max_connections is
answered 503 and closed before any of its bytes are read; the --keep_alive_requests-th
response on a connection says "connection: close".
"""
import dataclasses
import logging

import h11
from uvicorn.protocols.http import h11_impl

DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_BODY_TIMEOUT = 30.0
DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_KEEP_ALIVE_TIMEOUT = 5
DEFAULT_KEEP_ALIVE_REQUESTS = 1000

_TIMEOUT_408 = (b'HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n'
                b'connection: close\r\ncontent-length: %d\r\n\r\n%s')
_BUSY_503 = (b'HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n'
             b'retry-after: 1\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s')


def _error(template: bytes, message: str, kind: str) -> bytes:
  body = (b'{"error": {"message": "%s", "type": "%s", "param": null, "code": null}}'
          % (message.encode(), kind.encode()))
  return template % (len(body), body)


@dataclasses.dataclass
class ConnectionLimits:
  """The --header_timeout (all headers), --body_timeout (a stall in the body),
  --max_connections, --keep_alive_timeout (idle) and --keep_alive_requests flags (0: no
  bound, except keep_alive_timeout)."""
  header_timeout: float = DEFAULT_HEADER_TIMEOUT
  body_timeout: float = DEFAULT_BODY_TIMEOUT
  max_connections: int = DEFAULT_MAX_CONNECTIONS
  keep_alive_timeout: int = DEFAULT_KEEP_ALIVE_TIMEOUT
  keep_alive_requests: int = DEFAULT_KEEP_ALIVE_REQUESTS

  def check(self):
    if min(self.header_timeout, self.body_timeout, self.max_connections,
           self.keep_alive_requests) < 0 or self.keep_alive_timeout < 1:
      raise ValueError('--header_timeout, --body_timeout, --max_connections and '
                       '--keep_alive_requests must be >= 0 (0: no bound), '
                       '--keep_alive_timeout >= 1.')
    return self


def guarded_protocol(limits: ConnectionLimits):
  """An uvicorn http protocol class (uvicorn.Config(http=...)) enforcing `limits` (its
  length is the class it defines)."""
  limits = limits.check()

  class GuardedH11Protocol(h11_impl.H11Protocol):
    """uvicorn's h11 protocol with deadlines on reading a request, a connection cap and a
    per-connection request cap."""

    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      self._deadline = None   # asyncio.TimerHandle of the phase waited on
      self._phase = None      # 'headers' | 'body' | None (the app has the request)
      self._requests = 0

    def connection_made(self, transport):
      super().connection_made(transport)
      if limits.max_connections and len(self.connections) > limits.max_connections:
        logging.warning('refused a connection: %d open (--max_connections=%d)',
                        len(self.connections) - 1, limits.max_connections)
        transport.write(_error(_BUSY_503, 'too many open connections (--max_connections); '
                               'retry later.', 'server_error'))
        transport.close()
        return
      self._enter('headers')

    def connection_lost(self, exc):
      self._enter(None)
      super().connection_lost(exc)

    def _enter(self, phase, restart=False):
      if phase == self._phase and not restart:
        return
      if self._deadline is not None:
        self._deadline.cancel()
        self._deadline = None
      self._phase = phase
      seconds = {'headers': limits.header_timeout, 'body': limits.body_timeout}.get(phase)
      if seconds:
        self._deadline = self.loop.call_later(seconds, self._expired, phase)

    def _expired(self, phase):
      self._deadline = None
      if self.transport.is_closing():
        return
      if phase == 'body' and self.flow.read_paused:
        self._enter('body', restart=True)  # the server is not reading: not the client's fault
        return
      if phase == 'headers' and (self.cycle is None or self.cycle.response_complete):
        if self.conn.their_state is h11.IDLE and self.conn.our_state is h11.IDLE and (
            not self.conn.trailing_data[0]):
          self.transport.close()   # an idle kept-alive connection: nothing to answer
          return
        self.transport.write(_error(_TIMEOUT_408, 'the request headers did not arrive within '
                                    '--header_timeout.', 'timeout_error'))
      # The body: the app waits on it; closing makes its read end (a disconnect).
      self.transport.close()

    def handle_events(self):
      before = self.cycle
      super().handle_events()
      if self.cycle is not before and self.cycle is not None:
        self._requests += 1
        if limits.keep_alive_requests and self._requests >= limits.keep_alive_requests:
          # The last request on this connection: the response says so, then it closes.
          self.scope['headers'].append(h11_impl.CLOSE_HEADER)
          self.cycle.keep_alive = False
      state = self.conn.their_state
      # Headers: a deadline for all of them. Body: for each stretch without a byte (a body
      # may be long; one that stalls is cut).
      self._enter('headers' if state is h11.IDLE and (
          self.cycle is None or self.cycle.response_complete) else
          'body' if state is h11.SEND_BODY else None, restart=state is h11.SEND_BODY)

    def on_response_complete(self):
      super().on_response_complete()
      if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
        self._enter('headers')

  return GuardedH11Protocol

