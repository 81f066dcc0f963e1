"""Long-video multiple-choice QA (Video-MME, MLVU, LongVideoBench layouts): accuracy overall and
per duration bucket, on a model in process or on an OpenAI-compatible server.

    python -m vita_jax.eval.videoqa --model=runs/demo --data=videomme.parquet \
        --video_root=Video-MME/data --max_frames=64 --seq_shards=8 --out=runs/videomme
    python -m vita_jax.eval.videoqa --server=http://127.0.0.1:8000/v1 --data=lvb_val.json \
        --video_root=LongVideoBench/videos --out=runs/lvb

Each answer is appended to `OUT/results.jsonl` as soon as it comes, so a rerun skips the
questions already answered and only asks the rest (an interrupted run loses at most one). A
question whose video is missing or unreadable is skipped, counted and listed, never fatal: a
rerun asks it again. The Markdown table is printed and written to `OUT/summary.md`; it is
computed from results.jsonl, so it covers earlier runs too. File layouts, the prompt and the
answer extraction are in vita_jax.eval.videoqa_data.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import mimetypes
import os
import sys
from collections.abc import Callable

from vita_jax.errors import ConfigError, InputError, UserError
from vita_jax.eval import videoqa_data as vd
from vita_jax.eval.videoqa_data import Question

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov")


class SkipQuestion(Exception):
  """This question cannot be asked (its video is unreadable, the server refused it)."""


def find_video(root: str, name: str) -> str | None:
  """`root/name`, else the same stem with another video extension or as a frame directory."""
  path = os.path.join(root, name)
  if os.path.exists(path):
    return path
  stem = os.path.splitext(path)[0]
  return next((stem + ext for ext in ("",) + VIDEO_EXTENSIONS if os.path.exists(stem + ext)),
              None)


def read_results(path: str) -> dict[str, dict]:
  """{question id: record} already in results.jsonl. A last line cut short by a crash is
  dropped from the file, so that appending starts on a fresh line."""
  if not os.path.exists(path):
    return {}
  with open(path, "rb") as f:
    data = f.read()
  keep = data[:data.rfind(b"\n") + 1]
  if len(keep) != len(data):
    with open(path, "r+b") as f:
      f.truncate(len(keep))
  done = {}
  for n, line in enumerate(keep.decode("utf-8").splitlines(), 1):
    if line.strip():
      try:
        record = json.loads(line)
        done[record["id"]] = record
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise InputError(f"{path}:{n} is not a result record ({e}); move the file away to "
                         "start over") from e
  return done


def evaluate(questions: list[Question], answer: Callable[[str, str], str], out: str, *,
             video_root: str, progress: bool = True) -> dict:
  """Ask every question not yet in OUT/results.jsonl; -> the summary (see `summarize`).

  `answer(prompt, video_path) -> text` asks the model; it raises SkipQuestion for one
  question it cannot ask.
  """
  from tqdm import tqdm
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, "results.jsonl")
  done = read_results(path)
  todo = [q for q in questions if q.id not in done]
  earlier = [done[q.id] for q in questions if q.id in done]
  tally = [sum(bool(r["correct"]) for r in earlier), len(earlier)]    # right, answered
  skipped = []
  with open(path, "a", encoding="utf-8") as f, tqdm(
      total=len(questions), initial=len(questions) - len(todo), unit="q", desc="videoqa",
      disable=not progress, file=sys.stderr) as bar:
    for q in todo:
      video = find_video(video_root, q.video)
      try:
        if video is None:
          raise SkipQuestion(f"missing video {os.path.join(video_root, q.video)}")
        response = answer(vd.build_prompt(q), video)
      except SkipQuestion as e:
        skipped.append({"id": q.id, "reason": str(e)})
        bar.write(f"skipped {q.id}: {e}", file=sys.stderr)
        bar.update()
        continue
      pred = vd.extract_letter(response, q.options)
      record = dict(id=q.id, video=q.video, bucket=q.bucket, category=q.category,
                    question=q.question, options=list(q.options), answer=q.answer,
                    response=response, pred=pred, correct=pred == q.answer)
      done[q.id] = record
      f.write(json.dumps(record, ensure_ascii=False) + "\n")
      f.flush()
      tally[0], tally[1] = tally[0] + record["correct"], tally[1] + 1
      bar.set_postfix(acc=f"{tally[0] / tally[1]:.3f}", skipped=len(skipped))
      bar.update()
  return summarize([done[q.id] for q in questions if q.id in done], skipped, len(questions))


def summarize(records: list[dict], skipped: list[dict], total: int) -> dict:
  """Accuracy over the answered questions, overall and per duration bucket and category."""
  def table(key):
    groups: dict[str, list[bool]] = {}
    for r in records:
      if r.get(key):
        groups.setdefault(r[key], []).append(bool(r["correct"]))
    order = sorted(groups, key=lambda b: (vd.BUCKET_ORDER.index(b) if b in vd.BUCKET_ORDER
                                          else len(vd.BUCKET_ORDER), b))
    return [(name, len(groups[name]), sum(groups[name])) for name in order]
  correct = sum(bool(r["correct"]) for r in records)
  return dict(total=total, answered=len(records), correct=correct,
              accuracy=correct / len(records) if records else 0.0,
              no_letter=sum(r["pred"] is None for r in records),
              buckets=table("bucket"), categories=table("category"), skipped=skipped)


def markdown(summary: dict) -> str:
  pct = lambda c, n: f"{100 * c / n:.1f}" if n else "-"
  head = ["| duration | questions | correct | accuracy (%) |", "|---|---:|---:|---:|"]
  rows = [f"| {b} | {n} | {c} | {pct(c, n)} |" for b, n, c in summary["buckets"]]
  n, c = summary["answered"], summary["correct"]
  lines = head + rows + [f"| **overall** | {n} | {c} | **{pct(c, n)}** |"]
  if len(summary["categories"]) > 1:
    lines += ["", "| category | questions | correct | accuracy (%) |", "|---|---:|---:|---:|"]
    lines += [f"| {b} | {k} | {m} | {pct(m, k)} |" for b, k, m in summary["categories"]]
  lines += ["", f"{n} of {summary['total']} questions answered; {summary['no_letter']} answers "
            f"named no option (counted wrong); {len(summary['skipped'])} skipped in this run."]
  lines += [f"- skipped {s['id']}: {s['reason']}" for s in summary["skipped"]]
  return "\n".join(lines) + "\n"


class ModelAnswerer:
  """Greedy answers from a model in this process (vita_jax.generate's prefill and decode)."""

  def __init__(self, model, tok, *, max_frames: int, max_new_tokens: int, seq_shards: int):
    self.model, self.tok = model, tok
    self.max_frames, self.max_new_tokens, self.seq_shards = max_frames, max_new_tokens, seq_shards

  def __call__(self, prompt: str, video: str) -> str:
    from vita_jax import generate as gen
    try:
      ids, pixels = gen.build_prompt(self.model, self.tok, prompt, video=video,
                                     max_frames=self.max_frames)
    except (OSError, ValueError) as e:        # PyAV's errors are OSErrors / ValueErrors
      raise SkipQuestion(f"unreadable video {video}: {e}") from e
    eos = int(self.model.config.tokens.eos_id)
    try:
      out = gen.generate(self.model, ids, pixels, max_new_tokens=self.max_new_tokens,
                         seq_shards=self.seq_shards, eos_id=eos)
    except ValueError as e:                   # e.g. longer than the model's maximum length
      raise SkipQuestion(str(e)) from e
    return self.tok.decode([t for t in out[0] if t != eos], skip_special_tokens=True).strip()


def video_url(path: str, inline: bool) -> str:
  """A file:// URL (the server reads the file; it must lie under its --media_root) or, with
  `inline`, the file itself as a base64 data: URL (any server; video files only)."""
  path = os.path.abspath(path)
  if not inline:
    return "file://" + path
  if os.path.isdir(path):
    raise SkipQuestion(f"{path} is a frame directory, which cannot be sent inline; use "
                       "--video_transport=path")
  mime = mimetypes.guess_type(path)[0] or "video/mp4"
  with open(path, "rb") as f:
    return f"data:{mime};base64,{base64.b64encode(f.read()).decode()}"


class ServerAnswerer:
  """Greedy answers from an OpenAI-compatible server (vita_jax.serve, vLLM): one user message
  holding a `video_url` part (vLLM's extension) and the prompt as a `text` part."""

  def __init__(self, url: str, *, api_key: str = "", model: str = "", max_new_tokens: int,
               max_frames: int | None = None, inline: bool = False):
    import openai
    self.openai = openai
    base = url.rstrip("/")
    base = base if base.endswith("/v1") else base + "/v1"
    # A long video's prefill can take minutes: a generous timeout, and retries for 429s.
    self.client = openai.OpenAI(base_url=base, api_key=api_key or "EMPTY", max_retries=2,
                                timeout=3600.0)
    self.url, self.max_new_tokens, self.inline = base, max_new_tokens, inline
    # Sent only when asked for: a frame limit is not part of the OpenAI schema.
    self.extra = {"max_frames": max_frames} if max_frames else None
    self.model = model or self._call(lambda: self.client.models.list().data[0].id)

  def _call(self, fn):
    o = self.openai
    try:
      return fn()
    except o.AuthenticationError as e:
      raise ConfigError(f"{self.url} refused the API key (HTTP {e.status_code}); pass the "
                        "server's key with --api_key") from e
    except o.APIConnectionError as e:
      raise ConfigError(f"cannot reach {self.url} ({e}); start the server (python -m "
                        "vita_jax.serve --model=DIR) or fix --server") from e
    except IndexError as e:
      raise ConfigError(f"{self.url}/models lists no model; pass --served_model") from e

  def __call__(self, prompt: str, video: str) -> str:
    content = [{"type": "video_url", "video_url": {"url": video_url(video, self.inline)}},
               {"type": "text", "text": prompt}]
    try:
      reply = self._call(lambda: self.client.chat.completions.create(
          model=self.model, messages=[{"role": "user", "content": content}],
          max_tokens=self.max_new_tokens, temperature=0.0, extra_body=self.extra))
    except self.openai.APIStatusError as e:
      if e.status_code >= 500 or e.status_code == 429:
        raise ConfigError(f"{self.url} failed (HTTP {e.status_code}: {e.message}); check the "
                          "server's log, then rerun to resume") from e
      raise SkipQuestion(f"the server refused it (HTTP {e.status_code}: {e.message})") from e
    return (reply.choices[0].message.content or "").strip()


@dataclasses.dataclass
class Options:
  """What the command line says (the flags of the same names)."""
  data: str
  model: str = ""
  server: str = ""
  api_key: str = ""
  served_model: str = ""
  video_transport: str = "path"
  layout: str = ""
  video_root: str = ""
  max_frames: int = 64
  send_max_frames: bool = False     # --max_frames given: tell the server too
  max_new_tokens: int = 32
  seq_shards: int = 1
  tokenizer: str = ""
  out: str = ""
  limit: int = 0


def make_answerer(o: Options) -> Callable[[str, str], str]:
  if o.server:
    return ServerAnswerer(o.server, api_key=o.api_key, model=o.served_model,
                          max_new_tokens=o.max_new_tokens, inline=o.video_transport == "data",
                          max_frames=o.max_frames if o.send_max_frames else None)
  from vita_jax import generate as gen
  model, tok = gen.load_for_inference(o.model, tokenizer=o.tokenizer)
  return ModelAnswerer(model, tok, max_frames=o.max_frames, max_new_tokens=o.max_new_tokens,
                       seq_shards=o.seq_shards)


def run(o: Options, answer: Callable[[str, str], str] | None = None,
        progress: bool = True) -> tuple[dict, str]:
  """Evaluate as `o` says (with `answer`, when given, instead of o.model / o.server);
  -> (summary, its Markdown, also written to OUT/summary.md)."""
  if answer is None and bool(o.model) == bool(o.server):
    raise ConfigError("pass exactly one of --model=DIR (run the model here) or --server=URL "
                      "(ask an OpenAI-compatible server)")
  if o.limit < 0 or o.max_frames < 1 or o.max_new_tokens < 1:
    raise ConfigError(f"--limit={o.limit} must be >= 0, --max_frames={o.max_frames} and "
                      f"--max_new_tokens={o.max_new_tokens} >= 1")
  layout, questions = vd.load_questions(o.data, o.layout)
  questions = questions[:o.limit] if o.limit else questions
  root = o.video_root or os.path.dirname(os.path.abspath(o.data))
  if not os.path.isdir(root):
    raise ConfigError(f"--video_root={root!r} is not a directory; pass the folder that holds "
                      "the benchmark's videos")
  out = o.out or os.path.splitext(os.path.basename(o.data))[0] + "_videoqa"
  answer = answer or make_answerer(o)
  if progress:
    print(f"{len(questions)} {layout} questions from {o.data}; videos under {root}; results "
          f"in {out}/results.jsonl", file=sys.stderr)
  summary = evaluate(questions, answer, out, video_root=root, progress=progress)
  text = markdown(summary)
  with open(os.path.join(out, "summary.md"), "w", encoding="utf-8") as f:
    f.write(text)
  return summary, text


def main(argv):
  from absl import flags
  f = flags.FLAGS
  names = [field.name for field in dataclasses.fields(Options) if field.name != "send_max_frames"]
  o = Options(**{name: f[name].value for name in names}, send_max_frames=f["max_frames"].present)
  print(run(o)[1])


def _define_flags():
  from absl import flags
  flags.DEFINE_string("model", "", "training workdir or Hugging Face directory (in process)")
  flags.DEFINE_string("server", "", "OpenAI-compatible server URL, e.g. http://127.0.0.1:8000/v1")
  flags.DEFINE_string("api_key", os.environ.get("OPENAI_API_KEY", ""), "the server's API key")
  flags.DEFINE_string("served_model", "", "model name on the server (default: its first)")
  flags.DEFINE_enum("video_transport", "path", ["path", "data"],
                    "send the server file:// paths (under its --media_root) or the files inline")
  flags.DEFINE_string("data", None, "benchmark file: .json, .jsonl or .parquet", required=True)
  flags.DEFINE_enum("layout", "", [""] + list(vd.LAYOUTS), "force a layout (default: detect)")
  flags.DEFINE_string("video_root", "", "folder the file's video names are relative to "
                      "(default: the data file's folder)")
  flags.DEFINE_integer("max_frames", 64, "at most this many frames per video (1 fps)")
  flags.DEFINE_integer("max_new_tokens", 32, "answer length limit")
  flags.DEFINE_integer("seq_shards", 1, "devices the prompt is sharded over (--model)")
  flags.DEFINE_string("tokenizer", "", "tokenizer directory (--model; default: the model's)")
  flags.DEFINE_string("out", "", "results folder (default: <data file stem>_videoqa)")
  flags.DEFINE_integer("limit", 0, "only the first N questions (0 = all)")


def _run(argv):
  try:
    main(argv)
  except UserError as e:           # cli.run reports ConfigErrors; InputErrors too, here
    raise ConfigError(str(e)) from e


if __name__ == "__main__":
  from vita_jax import cli
  _define_flags()
  cli.run(_run)
