"""Start `python -m vita_jax.serve` on a tiny random checkpoint for the server tests.

The checkpoint is written by `vita_jax.save_pretrained` (long_vita layout) with the demo
tokenizer beside it, so the server loads it exactly as a user's directory; the tests load the
same directory in-process for their references.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx2 as httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT_S = 600           # a loaded 2-core CI machine compiles slowly


def write_checkpoint(path: str) -> tuple[str, str]:
  """A tiny random long_vita directory and the demo tokenizer -> (model dir, tokenizer dir)."""
  from flax import nnx

  import vita_jax
  from configs import base
  from vita_jax.data.demo import ensure_demo_data
  from vita_jax.models.vlm import LongVITA
  tokenizer = os.path.join(ensure_demo_data(), "tokenizer")
  model_dir = os.path.join(path, "tiny")
  if not os.path.exists(os.path.join(model_dir, "config.json")):
    cfg = base.model_config("tiny")
    cfg.compute_dtype, cfg.remat = "float32", "none"
    vita_jax.save_pretrained(LongVITA(cfg, rngs=nnx.Rngs(0)), model_dir, layout="long_vita")
  return model_dir, os.path.abspath(tokenizer)


def demo_media(media_root: str) -> dict[str, str]:
  """Copies of demo images and a video under `media_root` -> {name: path}."""
  from vita_jax.data.demo import ensure_demo_data
  src = os.path.join(ensure_demo_data(), "demo", "media")
  os.makedirs(media_root, exist_ok=True)
  out = {}
  for name in ("img_00000.png", "img_00003.png", "vid_00000.mp4"):
    out[name] = shutil.copy(os.path.join(src, name), os.path.join(media_root, name))
  return out


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Server:
  """A server subprocess; `url` is its base URL."""

  def __init__(self, model_dir: str, tokenizer: str, log_path: str, *flags: str):
    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.log_path = log_path
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    self.log = open(log_path, "w")
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "vita_jax.serve", f"--model={model_dir}",
         f"--tokenizer={tokenizer}", f"--port={self.port}", *flags],
        cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
      if self.proc.poll() is not None:
        raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.output()}")
      try:
        if httpx.get(self.url + "/health", timeout=2).status_code == 200:
          return
      except httpx.HTTPError:
        pass
      time.sleep(0.5)
    self.stop()
    raise RuntimeError(f"the server did not answer within {START_TIMEOUT_S} s:\n"
                       f"{self.output()}")

  def output(self) -> str:
    self.log.flush()
    with open(self.log_path) as f:
      return f.read()[-4000:]

  def stop(self) -> int:
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)
      try:
        self.proc.wait(60)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    self.log.close()
    return self.proc.returncode


def start(root, *flags: str):
  """A tiny checkpoint, the demo media and a server on them under `root` ->
  (server, model_dir, tokenizer, {media name: path}); the caller stops the server."""
  model_dir, tokenizer = write_checkpoint(str(root))
  media = demo_media(str(root / "media"))
  return Server(model_dir, tokenizer, str(root / "server.log"), *flags), model_dir, tokenizer, \
      media
