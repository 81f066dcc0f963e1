"""The OpenAI-compatible server (vita_jax.serve) on 127.0.0.1 against a tiny random checkpoint.

One server per module (8 slots, prompts sharded over 2 devices). The reference for every answer
is `vita_jax.generate.generate` run alone in this process on the same checkpoint directory, with
the prompt built by `vita_jax.generate.build_prompt`: the server has to produce exactly those
greedy tokens whatever else it is serving. The SIGTERM test stops the server and runs last.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import re
import time

import httpx2 as httpx
import openai
import pytest

from tests import serve_helpers
from vita_jax import generate as gen

# Server start-up and the compilations of each prompt bucket (server and references) take a few
# minutes on a small CPU machine: long tests, run by default, skipped with -m 'not slow'.
pytestmark = pytest.mark.slow
KEY = "test-key"
SHARDS = 2
MAX_FRAMES = 4
FLAGS = (f"--api_key={KEY}", "--max_batch=8", "--max_queue=4", "--max_prompt_len=256",
         "--max_new_tokens=1024", f"--seq_shards={SHARDS}", f"--max_frames={MAX_FRAMES}",
         "--grace_s=5")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  root = tmp_path_factory.mktemp("serve")
  server, model_dir, tokenizer, media = serve_helpers.start(
      root, f"--media_root={root / 'media'}", *FLAGS)
  model, tok = gen.load_for_inference(model_dir, tokenizer=tokenizer)
  client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=600)
  yield dict(server=server, model=model, tok=tok, media=media, client=client,
             model_name="tiny", url=server.url)
  server.stop()


def reference(env, prompt, n, image=None, video=None):
  """(tokens, text) of `generate` alone: greedy, EOS kept, as the server counts them."""
  model, tok = env["model"], env["tok"]
  ids, pixels = gen.build_prompt(model, tok, prompt, [image] if image else (), video or "",
                                 max_frames=MAX_FRAMES)
  eos = int(model.config.tokens.eos_id)
  tokens = gen.generate(model, ids, pixels, max_new_tokens=n, seq_shards=SHARDS,
                        eos_id=eos)[0].tolist()
  return tokens, tok.decode([t for t in tokens if t != eos], skip_special_tokens=True), ids


def data_url(path, mime):
  with open(path, "rb") as f:
    return f"data:{mime};base64," + base64.b64encode(f.read()).decode()


def content(prompt, image=None, video=None, local=False):
  parts = []
  if video:
    parts.append({"type": "video_url", "video_url": {"url": "file://" + video}})
  if image:
    url = ("file://" + image) if local else data_url(image, "image/png")
    parts.append({"type": "image_url", "image_url": {"url": url}})
  return parts + [{"type": "text", "text": prompt}]


def ask(env, prompt, n, image=None, video=None, stream=False, local=False, **kw):
  """-> (token ids, text, usage) from the server through the openai client."""
  extra = {"return_token_ids": True}
  if "top_k" in kw:                                   # not a parameter of the openai client
    extra["top_k"] = kw.pop("top_k")
  args = dict(model=env["model_name"], max_tokens=n, temperature=0.0,
              messages=[{"role": "user", "content": content(prompt, image, video, local)}],
              extra_body=extra)
  args.update(kw)
  client = env["client"]
  if not stream:
    out = client.chat.completions.create(**args)
    choice = out.choices[0]
    return choice.model_extra["token_ids"], choice.message.content, out.usage
  text, tokens, usage = [], None, None
  for chunk in client.chat.completions.create(stream=True,
                                              stream_options={"include_usage": True}, **args):
    if chunk.usage:
      usage = chunk.usage
    for c in chunk.choices:
      text.append(c.delta.content or "")
      if c.finish_reason:
        tokens = c.model_extra["token_ids"]
  return tokens, "".join(text), usage


def metric(env, name):
  text = httpx.get(env["url"] + "/metrics").text
  m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
  return float(m.group(1)) if m else 0.0


def test_models_health_metrics(env):
  assert [m.id for m in env["client"].models.list().data] == ["tiny"]
  health = httpx.get(env["url"] + "/health").json()
  assert health["status"] == "ok" and health["slots"] == 8
  text = httpx.get(env["url"] + "/metrics").text
  for name in ("vita_queue_depth", "vita_active_sequences", "vita_prompt_tokens_total",
               "vita_generated_tokens_total", "vita_time_to_first_token_seconds_bucket",
               "vita_time_per_output_token_seconds_bucket"):
    assert name in text


def test_eight_concurrent_requests_match_generate_alone(env):
  m = env["media"]
  # Images of 4 and 3 tiles and a 4-frame video: one vision shape on 2 devices (fewer compiles).
  img, img2, vid = m["img_00000.png"], m["img_00003.png"], m["vid_00000.mp4"]
  cases = [  # prompt, new tokens, image, video, streamed, image as a local path
      ("What colour is the shape?", 6, img, None, False, False),
      ("Which way does the ball move?", 9, None, vid, True, False),
      ("what is 2 + 3", 4, None, None, False, False),
      ("Describe it.", 11, img2, None, True, True),
      ("What shape is it? Answer in one word please.", 7, img2, None, False, False),
      ("hello", 3, None, None, True, False),
      ("What digit is shown in this picture?", 10, img2, None, False, False),
      ("Is the square red or blue or green or yellow?", 5, img, None, True, True),
  ]
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    futures = [pool.submit(ask, env, p, n, i, v, s, loc) for p, n, i, v, s, loc in cases]
    got = [f.result() for f in futures]
  for (prompt, n, image, video, _, _), (tokens, text, usage) in zip(cases, got):
    want_tokens, want_text, ids = reference(env, prompt, n, image, video)
    assert tokens == want_tokens, prompt
    assert text == want_text, prompt
    assert usage.prompt_tokens == ids.shape[1]          # visual tokens included
    assert usage.completion_tokens == len(want_tokens)
  assert metric(env, "vita_active_sequences") == 0


def test_seeded_sampling_is_reproducible(env):
  kw = dict(temperature=1.0, top_p=0.9, top_k=50)
  a = ask(env, "tell me a story", 12, seed=7, **kw)[0]
  with concurrent.futures.ThreadPoolExecutor(2) as pool:    # with another request in flight
    other = pool.submit(ask, env, "what is 1 + 1", 8)
    b = ask(env, "tell me a story", 12, seed=7, stream=True, **kw)[0]
    other.result()
  c = ask(env, "tell me a story", 12, seed=8, **kw)[0]
  assert a == b and len(a) == 12
  assert a != c


def test_release_put_api(env):
  image = env["media"]["img_00003.png"]
  want = reference(env, "<image>\nWhat digit is it?", 5, image)[1]
  body = {"prompts": ["<image>\nWhat digit is it?"], "image_path_list": [image],
          "video_path_list": None, "tokens_to_generate": 5, "max_num_frame": MAX_FRAMES,
          "temperature": 0, "top_k": 1, "top_p": 0}
  auth = {"Authorization": f"Bearer {KEY}"}
  r = httpx.put(env["url"] + "/api", json=body, headers=auth, timeout=600)
  assert r.status_code == 200 and r.json() == {"text": [want]}
  r = httpx.put(env["url"] + "/api", json={"prompt": "x"}, headers=auth)
  assert r.status_code == 400 and "prompts" in r.json()["message"]
  r = httpx.put(env["url"] + "/api", json=dict(body, image_path_list=["/etc/passwd"]),
                headers=auth)
  assert r.status_code == 400 and "outside --media_root" in r.json()["message"]


def test_bad_inputs_are_400_and_the_server_keeps_answering(env):
  want = reference(env, "what is 2 + 3", 4)[0]
  good = dict(model="tiny", max_tokens=4, temperature=0, return_token_ids=True,
              messages=[{"role": "user", "content": "what is 2 + 3"}])
  user = lambda c: dict(good, messages=[{"role": "user", "content": c}])
  junk_png = "data:image/png;base64," + base64.b64encode(b"not a png at all").decode()
  junk_mp4 = "data:video/mp4;base64," + base64.b64encode(b"\x00" * 64).decode()
  bad = [  # (body, headers, status, words in the message)
      (b"{not json", {}, 400, "not valid JSON"),
      (dict(good, messages="hi"), {}, 400, "messages"),
      (dict(good, temperature="hot"), {}, 400, "temperature"),
      (dict(good, max_tokens=-3), {}, 400, "max_tokens"),
      (dict(good, n=2), {}, 400, "n=2"),
      (user([{"type": "image_url", "image_url": {"url": junk_png}}]), {}, 400, "decoded"),
      (user([{"type": "video_url", "video_url": {"url": junk_mp4}}]), {}, 400, "decoded"),
      (user([{"type": "image_url", "image_url": {"url": "https://x.org/a.png"}}]), {}, 400,
       "network"),
      (user("<image>\nwhat is this?"), {}, 400, "placeholder"),
      (user("word " * 300), {}, 400, "max_prompt_len"),
      (dict(good, max_tokens=5000), {}, 400, "max_new_tokens"),
      (good, {"Authorization": "Bearer wrong"}, 401, "API key"),
      (good, {"Authorization": ""}, 401, "API key"),
  ]
  url = env["url"] + "/v1/chat/completions"
  for body, headers, status, words in bad:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **headers}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(url, content=data, headers=headers, timeout=600)
    assert r.status_code == status, (words, r.text)
    assert words.lower() in r.json()["error"]["message"].lower(), (words, r.text)
    ok = httpx.post(url, json=good, headers={"Authorization": f"Bearer {KEY}"}, timeout=600)
    assert ok.status_code == 200 and ok.json()["choices"][0]["token_ids"] == want, words


def _open_stream(client, max_tokens=1000):
  """A streamed request whose response headers have arrived (so it is queued or running)."""
  body = dict(model="tiny", max_tokens=max_tokens, temperature=0, stream=True,
              messages=[{"role": "user", "content": "count to a thousand"}])
  ctx = client.stream("POST", "/v1/chat/completions", json=body)
  response = ctx.__enter__()
  assert response.status_code == 200
  return ctx, response


def _wait_idle(env, timeout=60):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if httpx.get(env["url"] + "/health").json()["busy"] == 0:
      return True
    time.sleep(0.2)
  return False


def test_disconnect_mid_stream_frees_the_slot(env):
  cancelled = 'vita_requests_finished_total{finish_reason="cancelled"}'
  before = metric(env, cancelled)
  with httpx.Client(base_url=env["url"], timeout=600,
                    headers={"Authorization": f"Bearer {KEY}"}) as client:
    ctx, response = _open_stream(client)
    lines = response.iter_lines()
    assert next(lines).startswith("data: ")                # role chunk
    ctx.__exit__(None, None, None)                         # the client goes away
  assert _wait_idle(env)
  assert metric(env, cancelled) == before + 1


def test_full_queue_is_429_with_retry_after(env):
  assert _wait_idle(env)
  with httpx.Client(base_url=env["url"], timeout=600,
                    headers={"Authorization": f"Bearer {KEY}"}) as client:
    streams = [_open_stream(client) for _ in range(8 + 4)]  # 8 slots + 4 queued
    r = client.post("/v1/chat/completions", json=dict(
        model="tiny", max_tokens=2, messages=[{"role": "user", "content": "hi"}]))
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert "retry" in r.json()["error"]["message"]
    for ctx, _ in streams:
      ctx.__exit__(None, None, None)
  assert _wait_idle(env)
  want = reference(env, "hello", 3)[0]
  assert ask(env, "hello", 3)[0] == want


def test_sigterm_finishes_in_flight_and_exits_zero(env):
  server = env["server"]
  with httpx.Client(base_url=env["url"], timeout=600,
                    headers={"Authorization": f"Bearer {KEY}"}) as client:
    ctx, response = _open_stream(client, max_tokens=30)
    lines = response.iter_lines()
    next(lines)
    server.proc.send_signal(serve_helpers.signal.SIGTERM)
    rest = [line for line in lines if line]
    ctx.__exit__(None, None, None)
  assert rest[-1] == "data: [DONE]"
  finish = json.loads(rest[-2][6:])["choices"][0]["finish_reason"]
  assert finish in ("length", "stop", "abort")
  assert server.proc.wait(60) == 0, server.output()
  with pytest.raises(httpx.ConnectError):
    httpx.get(env["url"] + "/health", timeout=5)
