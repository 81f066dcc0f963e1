"""An OpenAI-compatible server with continuous batching (docs/serving.md).

    python -m vita_jax.serve --model=runs/demo [--seq_shards=8] [--port=8000]

loads a training workdir or a Hugging Face directory (either layout) as `vita_jax.generate`
does, compiles the decode step of a pool of --max_batch slots (vita_jax.serving.engine), and
answers `POST /v1/chat/completions`, the release's `PUT /api`, `GET /v1/models`, `/health`,
`/metrics` and a chat page at `/` (vita_jax.serving.api). SIGTERM or Ctrl-C: new requests are
refused, running ones get --grace_s seconds to finish (then they are cancelled), exit code 0.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys


def define_flags():
  from absl import flags
  flags.DEFINE_string("model", None, "training workdir or Hugging Face directory", required=True)
  flags.DEFINE_string("tokenizer", "", "tokenizer directory (default: the model's)")
  flags.DEFINE_integer("seq_shards", 1, "devices each prompt (and its KV cache) is sharded over")
  flags.DEFINE_string("host", "127.0.0.1", "address to listen on (0.0.0.0: every interface)")
  flags.DEFINE_integer("port", 8000, "port to listen on")
  flags.DEFINE_integer("max_batch", 8, "KV-cache slots: sequences decoded together")
  flags.DEFINE_integer("max_queue", 64, "requests that may wait for a slot; more get 429")
  flags.DEFINE_integer("max_prompt_len", 4096, "longest prompt a slot holds (tokens, visual "
                       "included; rounded up to a prompt bucket)")
  flags.DEFINE_integer("max_new_tokens", 512, "most tokens one request may generate (also the "
                       "default max_tokens)")
  flags.DEFINE_integer("max_frames", 64, "video frames per video at most (1 fps)")
  flags.DEFINE_string("api_key", "", "if set, requests must send 'Authorization: Bearer KEY'")
  flags.DEFINE_string("media_root", "", "local image/video paths are read only under this "
                      "directory (unset: data: URLs only)")
  flags.DEFINE_string("served_model_name", "", "the model id clients see (default: the "
                      "--model directory's name)")
  flags.DEFINE_float("grace_s", 30.0, "seconds running requests get to finish on SIGTERM")
  flags.DEFINE_string("dtype", None, "compute dtype override, e.g. float32")


def serve(app, engine, host: str, port: int, grace_s: float) -> None:
  """Run uvicorn until SIGTERM/SIGINT, then drain: refuse new requests, give running ones
  `grace_s` seconds, cancel the rest, return (so the process exits 0: uvicorn's own handler
  would re-raise the signal after shutdown)."""
  import uvicorn

  class Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
      def on_signal(sig, frame):
        if not self.should_exit:
          print(f"[serve] signal {sig}: draining (grace {grace_s:g} s)", file=sys.stderr,
                flush=True)
          engine.drain(grace_s)
        elif sig == signal.SIGINT:
          self.force_exit = True
        self.should_exit = True

      previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
      try:
        yield
      finally:
        for s, handler in previous.items():
          signal.signal(s, handler)

  config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                          timeout_graceful_shutdown=int(grace_s) + 2)
  Server(config).run()


def main(argv):
  del argv
  from absl import flags, logging
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  from vita_jax.generate import load_for_inference
  from vita_jax.serving.api import create_app
  from vita_jax.serving.engine import Engine
  model, tok = load_for_inference(f.model, tokenizer=f.tokenizer, dtype=f.dtype)
  engine = Engine(model, tok, seq_shards=f.seq_shards, max_batch=f.max_batch,
                  max_queue=f.max_queue, max_prompt_len=f.max_prompt_len,
                  max_new_tokens=f.max_new_tokens).start()
  name = f.served_model_name or os.path.basename(os.path.normpath(f.model))
  if f.media_root and not os.path.isdir(f.media_root):
    from vita_jax.errors import ConfigError
    raise ConfigError(f"--media_root={f.media_root!r} is not a directory; pass an existing one")
  app = create_app(engine, model_name=name, api_key=f.api_key, media_root=f.media_root,
                   max_frames=f.max_frames)
  print(f"[serve] {name} on http://{f.host}:{f.port} ({f.max_batch} slots, prompts up to "
        f"{engine.prompt_capacity} tokens, seq_shards={f.seq_shards})", file=sys.stderr,
        flush=True)
  try:
    serve(app, engine, f.host, f.port, f.grace_s)
  finally:
    engine.shutdown()
  print("[serve] stopped", file=sys.stderr, flush=True)


if __name__ == "__main__":
  from vita_jax import cli
  define_flags()
  cli.run(main)
