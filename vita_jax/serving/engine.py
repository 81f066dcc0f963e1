"""The continuous-batching scheduler behind the server (vita_jax.serve).

One thread owns the model. The KV cache is a fixed pool of `max_batch` slots
(vita_jax.models.decoding.Slots, prompt rows sharded over `seq` as in `generate`). Between
decode steps the thread admits queued requests: the prompt goes through the same
context-parallel `vita_jax.generate.prefill` as a one-off `generate` call and its cache is
copied into a free slot. Then ONE jitted step (`decoding.decode_slots`) advances every slot, each
at its own length with its own temperature / top-k / top-p / seed; the host reads the [B] new
tokens, streams text, checks EOS, stop strings and max_tokens, and frees finished or cancelled
slots at once. Shapes are fixed, so the step compiles once and prefill + insert once per
prompt-length bucket. A greedy request gives the tokens `generate` gives for it alone, whatever
else is in flight: every row reads only its own slot.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading
import time

import jax
import numpy as np
from flax import nnx
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from vita_jax import generate as gen
from vita_jax.errors import InputError
from vita_jax.models import decoding


class QueueFull(Exception):
  """Every slot is busy and `max_queue` requests already wait: the caller answers 429."""


class Draining(Exception):
  """The server is shutting down and takes no new requests: the caller answers 503."""


@dataclasses.dataclass
class Request:
  """One chat turn, already encoded: ids int32 [1, S], pixels [tiles, H, W, 3] or None."""
  ids: np.ndarray
  pixels: np.ndarray | None = None
  max_tokens: int = 16
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  seed: int = 0
  stop: tuple[str, ...] = ()
  ignore_eos: bool = False       # run to max_tokens (benchmarks)


@dataclasses.dataclass
class Event:
  """What the engine tells a request's caller, once per generated token: the new text (may be
  empty while a character or a possible stop string is incomplete), and at the end the
  finish_reason."""
  text: str = ""
  finish_reason: str | None = None       # "stop" | "length" | "cancelled" | "error"
  error: str = ""
  prompt_tokens: int = 0
  token_ids: tuple[int, ...] = ()        # every token generated so far (EOS included)


class Handle:
  """A submitted request. `on_event(Event)` is called from the engine thread; `cancel()` from
  anywhere (a client that went away) frees the slot before the next decode step."""

  def __init__(self, request: Request, on_event):
    self.request, self.on_event = request, on_event
    self.cancelled = False
    self.submitted = self.last_time = time.perf_counter()
    self.tokens: list[int] = []
    self.sent = 0                        # characters of the answer already emitted

  def cancel(self) -> None:
    self.cancelled = True


class Metrics:
  """The Prometheus instruments of one engine, in their own registry (two servers in one
  process, as in tests, do not collide)."""

  def __init__(self, registry: CollectorRegistry | None = None):
    self.registry = registry or CollectorRegistry()
    r = self.registry
    self.queue = Gauge("vita_queue_depth", "requests waiting for a slot", registry=r)
    self.active = Gauge("vita_active_sequences", "slots decoding a request", registry=r)
    self.prompt_tokens = Counter("vita_prompt_tokens", "prompt tokens prefilled (visual "
                                 "tokens included)", registry=r)
    self.generated_tokens = Counter("vita_generated_tokens", "tokens generated", registry=r)
    self.finished = Counter("vita_requests_finished", "requests finished, by reason",
                            ["finish_reason"], registry=r)
    self.ttft = Histogram("vita_time_to_first_token_seconds", "submit to first token (queue "
                          "wait and prefill)", registry=r,
                          buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
    self.token_latency = Histogram("vita_time_per_output_token_seconds", "time between two "
                                   "tokens of one request", registry=r,
                                   buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1))


class Engine:
  """The slot pool and its scheduler thread; `start()` compiles the step and runs the thread."""

  def __init__(self, model, tok, *, seq_shards: int = 1, max_batch: int = 8,
               max_queue: int = 64, max_prompt_len: int = 4096, max_new_tokens: int = 512,
               registry: CollectorRegistry | None = None):
    for name, value in (("max_batch", max_batch), ("max_prompt_len", max_prompt_len),
                        ("max_new_tokens", max_new_tokens)):
      if value < 1:
        raise InputError(f"--{name}={value} must be at least 1")
    if max_queue < 0:
      raise InputError(f"--max_queue={max_queue} must be 0 or more")
    self.model, self.tok = model, tok
    self.eos = int(model.config.tokens.eos_id)
    self.max_batch, self.max_queue = max_batch, max_queue
    self.shards = seq_shards
    self.prompt_capacity = gen.bucket_length(max_prompt_len, seq_shards)
    self.max_new_tokens = max_new_tokens
    self.max_length = gen.max_length_of(model)
    self.mesh, self.state = gen.placement(model, seq_shards)
    graphdef = nnx.split(model)[0]
    self._step = jax.jit(functools.partial(decoding.decode_slots, graphdef, mesh=self.mesh),
                         donate_argnums=(1,))
    self._insert = jax.jit(functools.partial(decoding.insert_slot, mesh=self.mesh,
                                             shards=seq_shards), donate_argnums=(0,))
    self.metrics = Metrics(registry)
    self.slots = None
    self._queue: collections.deque[Handle] = collections.deque()
    self._active: list[Handle | None] = [None] * max_batch
    self._cv = threading.Condition()
    self._stopping = self.draining = False
    self._thread = threading.Thread(target=self._loop, name="vita-engine", daemon=True)

  # -- the caller's side ---------------------------------------------------------------------

  def start(self) -> Engine:
    """Build the pool and compile the decode step (a 1-token warm-up in slot 0), then serve."""
    logits, cache, lengths = gen.prefill(self.model, np.zeros((1, 1), np.int32),
                                         seq_shards=self.shards)
    cfg = self.model.llm.cfg
    self.slots = jax.jit(functools.partial(
        decoding.empty_slots, cfg, self.max_batch, self.prompt_capacity, self.max_new_tokens,
        cache.k.dtype, mesh=self.mesh))()
    self.slots, _ = self._insert(self.slots, np.int32(0), logits, cache, lengths[0],
                                 jax.random.PRNGKey(0), np.float32(0), np.int32(0),
                                 np.float32(1))
    self.slots, nxt = self._step(self.state, self.slots, np.zeros(self.max_batch, bool))
    jax.block_until_ready(nxt)
    self._thread.start()
    return self

  def check(self, request: Request) -> None:
    """Raise InputError (the caller answers 400) for a request this pool cannot hold."""
    s, n = request.ids.shape[1], request.max_tokens
    if not 1 <= n <= self.max_new_tokens:
      raise InputError(f"max_tokens={n} is outside 1..{self.max_new_tokens} (this server's "
                       "--max_new_tokens); ask for fewer tokens or restart the server with a "
                       "larger --max_new_tokens")
    if gen.bucket_length(s, self.shards) > self.prompt_capacity:
      raise InputError(f"the prompt has {s} tokens (visual tokens included), more than the "
                       f"{self.prompt_capacity} this server holds (--max_prompt_len); shorten "
                       "it (fewer frames or images) or restart with a larger --max_prompt_len")
    if self.max_length is not None and s + n > self.max_length:
      raise InputError(f"the prompt has {s} tokens and max_tokens={n}, {s + n} in all, more "
                       f"than the model's maximum length {self.max_length}; shorten the prompt "
                       "or ask for fewer tokens")

  def submit(self, request: Request, on_event) -> Handle:
    """Queue a checked request; raises InputError, QueueFull or Draining."""
    self.check(request)
    handle = Handle(request, on_event)
    with self._cv:
      if self.draining:
        raise Draining("the server is shutting down and takes no new requests")
      free = sum(h is None for h in self._active)
      if len(self._queue) >= self.max_queue + free:
        raise QueueFull(f"all {self.max_batch} slots are busy and {len(self._queue)} requests "
                        "wait; retry later")
      self._queue.append(handle)
      self.metrics.queue.set(len(self._queue))
      self._cv.notify()
    return handle

  def cancel(self, handle: Handle) -> None:
    handle.cancel()
    with self._cv:
      self._cv.notify()

  def busy(self) -> int:
    """Requests queued or decoding."""
    with self._cv:
      return len(self._queue) + sum(h is not None for h in self._active)

  def drain(self, grace_s: float) -> None:
    """Take no new requests; cancel what is still running after `grace_s` seconds."""
    with self._cv:
      self.draining = True

    def cancel_all():
      with self._cv:
        for h in list(self._queue) + [h for h in self._active if h is not None]:
          h.cancel()
        self._cv.notify()

    timer = threading.Timer(grace_s, cancel_all)
    timer.daemon = True
    timer.start()

  def shutdown(self) -> None:
    with self._cv:
      self._stopping = True
      for h in list(self._queue) + [h for h in self._active if h is not None]:
        h.cancel()
      self._cv.notify()
    if self._thread.is_alive():
      self._thread.join(timeout=30)

  # -- the engine thread ---------------------------------------------------------------------

  def _loop(self) -> None:
    while True:
      with self._cv:
        while not (self._stopping or self._queue or any(self._active)):
          self._cv.wait()
        admit = []
        for slot, h in enumerate(self._active):
          if h is not None and h.cancelled:
            self._finish(slot, h, "cancelled")
        while self._queue and None in self._active:
          h = self._queue.popleft()
          if h.cancelled:
            self._end(h, Event(finish_reason="cancelled"))
            continue
          slot = self._active.index(None)
          self._active[slot] = h
          admit.append((slot, h))
        self.metrics.queue.set(len(self._queue))
        if self._stopping and not any(self._active) and not admit:
          return
      for slot, h in admit:
        self._admit(slot, h)
      if any(self._active):
        self._decode()
      self.metrics.active.set(sum(h is not None for h in self._active))

  def _admit(self, slot: int, h: Handle) -> None:
    r = h.request
    try:
      # max_new_tokens=1: `check` did the length test, and prefill's own generated-token
      # buffer (sized by it, a compile per size) is not used here.
      logits, cache, lengths = gen.prefill(self.model, r.ids, r.pixels, seq_shards=self.shards,
                                           max_new_tokens=1)
      s = int(lengths[0])
      self.slots, first = self._insert(
          self.slots, np.int32(slot), logits, cache, np.int32(s),
          jax.random.PRNGKey(r.seed), np.float32(r.temperature), np.int32(r.top_k),
          np.float32(r.top_p))
      first = int(first)
    except Exception as e:  # noqa: BLE001 - one bad request must not stop the others
      with self._cv:
        self._active[slot] = None
      self._end(h, Event(finish_reason="error", error=f"{type(e).__name__}: {e}"))
      return
    self.metrics.prompt_tokens.inc(s)
    self.metrics.ttft.observe(time.perf_counter() - h.submitted)
    self._advance(slot, h, first, first_token=True)

  def _decode(self) -> None:
    active = np.asarray([h is not None for h in self._active])
    self.slots, nxt = self._step(self.state, self.slots, active)
    nxt = np.asarray(nxt)
    for slot, h in enumerate(self._active):
      if h is not None:
        self._advance(slot, h, int(nxt[slot]))

  def _advance(self, slot: int, h: Handle, token: int, first_token: bool = False) -> None:
    """Record one token: emit the text that is safe to show, end the request if it is done."""
    now = time.perf_counter()
    if not first_token:
      self.metrics.token_latency.observe(now - h.last_time)
    h.last_time = now
    h.tokens.append(token)
    self.metrics.generated_tokens.inc()
    r = h.request
    text = self.tok.decode([t for t in h.tokens if t != self.eos], skip_special_tokens=True)
    finish = "stop" if token == self.eos and not r.ignore_eos else None
    hits = [i for i in (text.find(s, max(0, h.sent - len(s))) for s in r.stop) if i >= 0]
    if hits:
      text, finish = text[:min(hits)], "stop"
    if finish is None and len(h.tokens) >= r.max_tokens:
      finish = "length"
    if h.cancelled:
      finish = "cancelled"
    shown = len(text) if finish else _safe_length(text, r.stop)
    delta, h.sent = text[h.sent:shown], max(h.sent, shown)
    if finish:
      self._finish(slot, h, finish, delta)
    else:
      h.on_event(Event(text=delta, token_ids=tuple(h.tokens)))

  def _finish(self, slot: int, h: Handle, reason: str, text: str = "") -> None:
    self._active[slot] = None
    self.metrics.active.set(sum(a is not None for a in self._active))
    self._end(h, Event(text=text, finish_reason=reason))

  def _end(self, h: Handle, event: Event) -> None:
    event.prompt_tokens = int(h.request.ids.shape[1])
    event.token_ids = tuple(h.tokens)
    self.metrics.finished.labels(event.finish_reason).inc()
    h.on_event(event)


def _safe_length(text: str, stops) -> int:
  """How much of an unfinished answer can be shown: not a trailing partial UTF-8 character
  (decoded as U+FFFD) nor a tail that may be the start of a stop string."""
  end = len(text.rstrip("\ufffd"))
  for stop in stops:
    for k in range(min(len(stop) - 1, end), 0, -1):
      if text[end - k:end] == stop[:k]:
        end -= k
        break
  return end
