"""The HTTP face of the engine (vita_jax.serve): OpenAI chat completions, the release's
`PUT /api`, health, Prometheus metrics and the chat page.

Bodies are parsed by hand rather than by pydantic models so that every bad field gets one
sentence naming it and the fix, in OpenAI's error object (`{"error": {"message", "type",
"param", "code"}}`; the release protocol answers `{"message": ...}`). Image decoding and
tokenization run in a worker thread, so the event loop only moves bytes; the engine thread
reports tokens back through `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from vita_jax.data.conversation import SampleError
from vita_jax.data.prompt import encode_messages
from vita_jax.errors import InputError
from vita_jax.serving import media
from vita_jax.serving.engine import Draining, Engine, QueueFull
from vita_jax.serving.engine import Request as EngineRequest

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
NUMBER = (int, float)


class ApiError(Exception):
  def __init__(self, status: int, message: str, param: str | None = None,
               kind: str = "invalid_request_error", headers: dict | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.kind = status, message, param, kind
    self.headers = headers or {}


def _field(body: dict, name: str, types, default=None, check=None, hint: str = ""):
  """body[name] if it has one of `types` (None means absent; bool is not a number)."""
  value = body.get(name)
  if value is None:
    return default
  ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in
                                         (types if isinstance(types, tuple) else (types,)))
  if not ok or (check is not None and not check(value)):
    raise ApiError(400, f"{name}={json.dumps(value)[:80]} is not valid; {name} must be {hint}",
                   param=name)
  return value


async def _json_body(request: Request) -> dict:
  raw = await request.body()
  try:
    body = json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ApiError(400, f"the request body is not valid JSON ({e}); send a JSON object") from e
  if not isinstance(body, dict):
    raise ApiError(400, f"the request body is a JSON {type(body).__name__}; send a JSON object")
  return body


class Api:
  """Turns JSON requests into engine requests and engine events into responses."""

  def __init__(self, engine: Engine, *, model_name: str, media_root: str = "",
               max_frames: int = 64):
    self.engine, self.model_name = engine, model_name
    self.media_root, self.max_frames = media_root, max_frames
    self.cfg, self.tok = engine.model.config, engine.tok

  # -- parsing ---------------------------------------------------------------------------------

  def _parts(self, content, where: str, pictures: list, clips: list, max_frames: int) -> str:
    """A message's content -> text with <image>/<video> placeholders; media decoded in order."""
    if isinstance(content, str):
      return content
    if not isinstance(content, list):
      raise ApiError(400, f"{where}.content must be a string or a list of content parts",
                     param=f"{where}.content")
    text = []
    for j, part in enumerate(content):
      at = f"{where}.content[{j}]"
      kind = part.get("type") if isinstance(part, dict) else None
      if kind == "text" and isinstance(part.get("text"), str):
        text.append(part["text"])
      elif kind in ("image_url", "video_url"):
        ref = part.get(kind)
        url = ref.get("url") if isinstance(ref, dict) else ref
        if not isinstance(url, str):
          raise ApiError(400, f"{at}.{kind}.url must be a string (a data: URL or a path under "
                         "--media_root)", param=f"{at}.{kind}")
        try:
          if kind == "image_url":
            pictures.append(media.load_image(url, self.media_root, f"{at} (image)"))
          else:
            clips.append(media.load_video(url, self.media_root, self.cfg.vision.image_size,
                                          max_frames, f"{at} (video)"))
        except InputError as e:
          raise ApiError(400, str(e), param=at) from e
        text.append("<image>\n" if kind == "image_url" else "<video>\n")
      else:
        raise ApiError(400, f"{at} is not a content part this server reads; use {{'type': "
                       "'text', 'text': ...}, {'type': 'image_url', 'image_url': {'url': ...}} "
                       "or {'type': 'video_url', 'video_url': {'url': ...}}", param=at)
    return "".join(text)

  def encode(self, messages: list[dict], pictures: list, clips: list):
    try:
      return encode_messages(self.cfg, self.tok, messages, pictures, clips)
    except SampleError as e:
      raise ApiError(400, f"{e}; put one <image> (<video>) in the text per image (video), or "
                     "none at all", param="messages") from e

  def chat_request(self, body: dict) -> tuple[EngineRequest, dict]:
    """An OpenAI chat body -> (engine request, options the response needs)."""
    messages = _field(body, "messages", list, hint="a non-empty list of messages",
                      check=lambda m: len(m) > 0)
    if messages is None:
      raise ApiError(400, "messages is missing; send a list of {'role', 'content'} objects",
                     param="messages")
    n = _field(body, "n", int, 1, lambda v: v == 1, "1 (one answer per request)")
    del n
    max_tokens = _field(body, "max_completion_tokens", int, None, lambda v: v >= 1, "an integer "
                        ">= 1") or _field(body, "max_tokens", int, self.engine.max_new_tokens,
                                          lambda v: v >= 1, "an integer >= 1")
    stop = _field(body, "stop", (str, list), [], lambda v: isinstance(v, str) or (
        len(v) <= 4 and all(isinstance(s, str) and s for s in v)), "a string or up to 4 strings")
    options = _field(body, "stream_options", dict, {}, hint="an object such as "
                     '{"include_usage": true}')
    request = EngineRequest(
        ids=None, max_tokens=max_tokens,
        temperature=float(_field(body, "temperature", NUMBER, 1.0, lambda v: 0 <= v <= 2,
                                 "a number in [0, 2]")),
        top_p=float(_field(body, "top_p", NUMBER, 1.0, lambda v: 0 < v <= 1,
                           "a number in (0, 1]")),
        top_k=max(0, _field(body, "top_k", int, 0, lambda v: v >= -1, "an integer >= -1 "
                            "(-1 or 0: all tokens)")),
        seed=_field(body, "seed", int, int(time.time_ns()) % 2**31, hint="an integer") % 2**31,
        stop=(stop,) if isinstance(stop, str) else tuple(stop),
        ignore_eos=_field(body, "ignore_eos", bool, False, hint="true or false"))
    pictures, clips, turns = [], [], []
    for i, m in enumerate(messages):
      if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise ApiError(400, f"messages[{i}] must be an object with a role in "
                       f"{', '.join(ROLES)}", param=f"messages[{i}]")
      content = self._parts(m.get("content") or "", f"messages[{i}]", pictures, clips,
                            self.max_frames)
      turns.append({"role": ROLES[m["role"]], "content": content})
    request.ids, request.pixels = self.encode(turns, pictures, clips)
    stream = _field(body, "stream", bool, False, hint="true or false")
    return request, dict(stream=stream, usage=bool(options.get("include_usage")),
                         token_ids=bool(_field(body, "return_token_ids", bool, False,
                                               hint="true or false")))

  def release_request(self, body: dict) -> list[EngineRequest]:
    """The release's PUT /api body -> one engine request per prompt."""
    prompts = _field(body, "prompts", list, None, lambda p: len(p) > 0 and all(
        isinstance(s, str) for s in p), "a non-empty list of strings")
    if prompts is None:
      raise ApiError(400, "prompts is missing; send {\"prompts\": [\"...\"], ...}")
    paths = lambda name: _field(body, name, list, [], lambda v: all(isinstance(s, str)
                                                                   for s in v), "a list of paths")
    images, videos = paths("image_path_list"), paths("video_path_list")
    if (images or videos) and len(prompts) != 1:
      raise ApiError(400, f"{len(prompts)} prompts with images/videos; send one prompt per "
                     "request when it has media")
    frames = _field(body, "max_num_frame", int, self.max_frames, lambda v: v >= 1,
                    "an integer >= 1")
    try:
      pictures = [media.load_image(p, self.media_root, f"image_path_list[{i}]")
                  for i, p in enumerate(images)]
      clips = [media.load_video(p, self.media_root, self.cfg.vision.image_size, frames,
                                f"video_path_list[{i}]") for i, p in enumerate(videos)]
    except InputError as e:
      raise ApiError(400, str(e)) from e
    common = dict(
        max_tokens=_field(body, "tokens_to_generate", int, 64, lambda v: v >= 1,
                          "an integer >= 1"),
        temperature=float(_field(body, "temperature", NUMBER, 0.0, lambda v: v >= 0,
                                 "a number >= 0")),
        top_k=max(0, _field(body, "top_k", int, 0, lambda v: v >= -1, "an integer >= 0")),
        top_p=float(_field(body, "top_p", NUMBER, 1.0, lambda v: 0 <= v <= 1,
                           "a number in [0, 1]")) or 1.0,
        seed=_field(body, "random_seed", int, 0, hint="an integer") % 2**31)
    out = []
    for prompt in prompts:
      ids, pixels = self.encode([{"role": "user", "content": prompt}], pictures, clips)
      out.append(EngineRequest(ids=ids, pixels=pixels, **common))
    return out

  # -- running ---------------------------------------------------------------------------------

  def submit(self, request: EngineRequest):
    """-> (handle, asyncio.Queue of engine events); engine refusals become ApiErrors."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def deliver(event):
      try:
        loop.call_soon_threadsafe(events.put_nowait, event)
      except RuntimeError:          # the loop is gone (shutdown): nobody is listening
        pass

    try:
      return self.engine.submit(request, deliver), events
    except InputError as e:
      raise ApiError(400, str(e), param="messages") from e
    except QueueFull as e:
      raise ApiError(429, str(e), kind="rate_limit_error", headers={"Retry-After": "1"}) from e
    except Draining as e:
      raise ApiError(503, str(e), kind="server_error") from e

  async def collect(self, handle, events, request: Request | None):
    """Wait for the whole answer -> (text, last event); cancels if the client goes away."""
    text = []
    while True:
      try:
        event = await asyncio.wait_for(events.get(), 0.5)
      except TimeoutError:
        if request is not None and await request.is_disconnected():
          self.engine.cancel(handle)
        continue
      text.append(event.text)
      if event.finish_reason:
        if event.finish_reason == "error":
          raise ApiError(500, f"generation failed: {event.error}", kind="server_error")
        return "".join(text), event


def _usage(event) -> dict:
  done = len(event.token_ids)
  return {"prompt_tokens": event.prompt_tokens, "completion_tokens": done,
          "total_tokens": event.prompt_tokens + done}


def _finish(reason: str) -> str:
  return "abort" if reason == "cancelled" else reason


def create_app(engine: Engine, *, model_name: str, api_key: str = "", media_root: str = "",
               max_frames: int = 64) -> FastAPI:
  api = Api(engine, model_name=model_name, media_root=media_root, max_frames=max_frames)
  app = FastAPI(title="Long-VITA (vita_jax)", docs_url=None, redoc_url=None)
  app.state.api = api

  @app.exception_handler(ApiError)
  async def on_error(request: Request, e: ApiError):
    if request.url.path == "/api":
      return JSONResponse({"message": e.message}, e.status, headers=e.headers)
    error = {"message": e.message, "type": e.kind, "param": e.param, "code": e.status}
    return JSONResponse({"error": error}, e.status, headers=e.headers)

  def authorize(request: Request) -> None:
    if api_key and request.headers.get("authorization", "") != f"Bearer {api_key}":
      raise ApiError(401, "missing or wrong API key; send the header 'Authorization: Bearer "
                     "<the server's --api_key>'", kind="authentication_error")

  @app.post("/v1/chat/completions")
  async def chat(request: Request):
    authorize(request)
    body = await _json_body(request)
    req, opts = await asyncio.to_thread(api.chat_request, body)
    handle, events = api.submit(req)
    rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if not opts["stream"]:
      text, last = await api.collect(handle, events, request)
      choice = {"index": 0, "message": {"role": "assistant", "content": text},
                "finish_reason": _finish(last.finish_reason), "logprobs": None}
      if opts["token_ids"]:
        choice["token_ids"] = list(last.token_ids)
      return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
              "choices": [choice], "usage": _usage(last)}

    def chunk(delta: dict, finish=None, **extra) -> str:
      choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None, **extra}
      data = {"id": rid, "object": "chat.completion.chunk", "created": created,
              "model": model_name, "choices": [choice]}
      return f"data: {json.dumps(data)}\n\n"

    async def stream():
      try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
          event = await events.get()
          if event.finish_reason == "error":
            error = {"message": f"generation failed: {event.error}", "type": "server_error"}
            yield f"data: {json.dumps({'error': error})}\n\n"
            break
          if event.text:
            yield chunk({"content": event.text})
          if event.finish_reason:
            extra = {"token_ids": list(event.token_ids)} if opts["token_ids"] else {}
            yield chunk({}, _finish(event.finish_reason), **extra)
            if opts["usage"]:
              data = {"id": rid, "object": "chat.completion.chunk", "created": created,
                      "model": model_name, "choices": [], "usage": _usage(event)}
              yield f"data: {json.dumps(data)}\n\n"
            break
        yield "data: [DONE]\n\n"
      finally:
        engine.cancel(handle)          # a no-op when finished; frees the slot on a disconnect

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})

  @app.put("/api")
  async def release(request: Request):
    authorize(request)
    body = await _json_body(request)
    reqs = await asyncio.to_thread(api.release_request, body)
    submitted = [api.submit(r) for r in reqs]
    answers = [await api.collect(h, q, request) for h, q in submitted]
    return {"text": [text for text, _ in answers]}

  @app.get("/v1/models")
  async def models(request: Request):
    authorize(request)
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                        "owned_by": "vita_jax"}]}

  @app.get("/health")
  async def health():
    status = "draining" if engine.draining else "ok"
    return JSONResponse({"status": status, "busy": engine.busy(), "slots": engine.max_batch},
                        503 if engine.draining else 200)

  @app.get("/metrics")
  async def metrics():
    return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

  page = os.path.join(os.path.dirname(__file__), "page.html")

  @app.get("/", response_class=HTMLResponse)
  async def index():
    with open(page) as f:
      return f.read().replace("{{MODEL}}", model_name)

  return app
