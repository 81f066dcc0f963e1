"""The long-video QA runner: answer extraction on real-style answers, the three benchmark
layouts, and a generated set (demo moving-ball and needle videos, known answers) run end to end
on a tiny random model, in process and through the OpenAI client against a stand-in server."""

import json
import os
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

from vita_jax.errors import UserError
from vita_jax.eval import videoqa
from vita_jax.eval import videoqa_data as vd

FOUR = ("up", "down", "left", "right")


@pytest.mark.parametrize("response, want", [
    ("B", "B"), ("b", "B"), ("C.", "C"), ("(D)", "D"), ("(A) up", "A"), ("B) down", "B"),
    ("C: the ball moves left", "C"), ("A. up", "A"), ("Answer: D", "D"),
    ("The best answer is A.", "A"), ("The best answer is: B", "B"), ("Best option:(C", "C"),
    ("The answer is (B).", "B"), ("Best option: (C)", "C"),
    ("I think the answer is D because the ball goes right.", "D"), ("**C**", "C"),
    ("Option B is correct.", "B"), ("D\n", "D"),
    ("The ball moves to the left.", "C"),          # no letter: the option's text
    ("left or right, hard to say", None),          # two options named
    ("A ball moves up", "A"),                      # the article, then the option text
    ("E", None),                                   # past the last of four options
    ("None of the above.", None), ("", None), ("   ", None),
])
def test_extract_letter(response, want):
  assert vd.extract_letter(response, FOUR) == want


def test_extract_letter_option_text_prefers_the_longest_and_five_options():
  options = ("a blue square", "a red circle", "red", "green", "a cross")
  assert vd.extract_letter("It shows a red circle.", options) == "B"
  assert vd.extract_letter("E", options) == "E"
  assert vd.extract_letter("A red circle", options) == "B"


def test_prompt():
  q = vd.Question("1", "v.mp4", "Which way?", FOUR, "D", "short")
  lines = vd.build_prompt(q).splitlines()
  assert lines[0].endswith("Respond with only the letter (A, B, C, or D) of the correct option.")
  assert lines[1:] == ["Which way?", "A. up", "B. down", "C. left", "D. right",
                       "The best answer is:"]
  two = vd.Question("2", "v.mp4", "Q?", ("yes", "no"), "A", "short")
  assert "(A or B)" in vd.build_prompt(two)


VIDEOMME = {"video_id": "001", "duration": "medium", "domain": "Sports", "videoID": "fFjv93ACGo8",
            "question_id": "001-1", "task_type": "Counting Problem", "question": "How many?",
            "options": ["A. 1.", "B. 2.", "C. 3.", "D. 4."], "answer": "C"}
MLVU = {"video": "movie101_66.mp4", "duration": 1480, "question": "Why?",
        "candidates": ["rain", "sun", "snow", "wind"], "answer": "snow",
        "question_type": "plotQA"}
LVB = {"video_id": "86CxyhFV9MI", "video_path": "86CxyhFV9MI.mp4", "id": "86CxyhFV9MI_0",
       "question": "What is shown?", "candidates": ["cat", "dog", "bird", "fish", "cow"],
       "correct_choice": 4, "duration_group": 600, "question_category": "TOS", "duration": 527.1}


@pytest.mark.parametrize("fmt", ["json", "jsonl", "wrapped"])
@pytest.mark.parametrize("record, want", [
    (VIDEOMME, vd.Question("001-1", "fFjv93ACGo8.mp4", "How many?", ("1.", "2.", "3.", "4."),
                           "C", "medium", "Counting Problem")),
    (MLVU, vd.Question(vd._made_id("movie101_66.mp4", "Why?", ["rain", "sun", "snow", "wind"]),
                       "movie101_66.mp4", "Why?", ("rain", "sun", "snow", "wind"), "C", "long",
                       "plotQA")),
    (LVB, vd.Question("86CxyhFV9MI_0", "86CxyhFV9MI.mp4", "What is shown?",
                      ("cat", "dog", "bird", "fish", "cow"), "E", "180-600s", "TOS")),
], ids=["videomme", "mlvu", "longvideobench"])
def test_layouts(tmp_path, record, want, fmt):
  other = dict(record, question="Another?")
  path = tmp_path / ("q.jsonl" if fmt == "jsonl" else "q.json")
  if fmt == "jsonl":
    path.write_text(json.dumps(record) + "\n\n" + json.dumps(other) + "\n")
  else:
    path.write_text(json.dumps({"questions": [record, other]} if fmt == "wrapped"
                               else [record, other]))
  layout, questions = vd.load_questions(str(path))
  assert layout in vd.LAYOUTS and len(questions) == 2
  assert questions[0] == want
  # Ids are distinct even where the file repeats one (Video-MME / LVB ids here).
  assert questions[1].id != questions[0].id and questions[1].question == "Another?"
  assert vd.load_questions(str(path), layout)[1] == questions


def test_mlvu_buckets_and_question_type_fallback():
  assert vd._mlvu(dict(MLVU, duration=100), "r")["bucket"] == "short"
  assert vd._mlvu(dict(MLVU, duration=600), "r")["bucket"] == "medium"
  assert vd._mlvu({k: v for k, v in MLVU.items() if k != "duration"}, "r")["bucket"] == "plotQA"


def test_parquet(tmp_path):
  import pyarrow as pa  # in the lock: Video-MME ships its questions as parquet
  import pyarrow.parquet as pq
  pq.write_table(pa.Table.from_pylist([VIDEOMME]), tmp_path / "q.parquet")
  assert vd.load_questions(str(tmp_path / "q.parquet"))[1][0].answer == "C"


@pytest.mark.parametrize("content, match", [
    ('[{"video": "a.mp4", "question": "q?"}]', r"fits none of the known layouts.*--layout="),
    ("[]", "holds no questions"),
    ('{"a": 1}', "expected a list of questions"),
    ('[{"videoID": "x", "question": "q", "options": ["A. a", "B. b"], "answer": "F"}]',
     r"record 0: answer 'F' is not one of the option letters A, B"),
])
def test_bad_files(tmp_path, content, match):
  path = tmp_path / "q.json"
  path.write_text(content)
  with pytest.raises(UserError, match=match):
    vd.load_questions(str(path))


def test_bad_jsonl_line_and_forced_layout(tmp_path):
  path = tmp_path / "q.jsonl"
  path.write_text(json.dumps(VIDEOMME) + "\n{oops\n")
  with pytest.raises(UserError, match=r"q.jsonl:2 is not valid JSON"):
    vd.load_questions(str(path))
  path.write_text(json.dumps(VIDEOMME) + "\n")
  with pytest.raises(UserError, match="record 0 lacks video_path, candidates, correct_choice"):
    vd.load_questions(str(path), "longvideobench")
  with pytest.raises(UserError, match="--layout='nope' is unknown"):
    vd.load_questions(str(path), "nope")


# End to end on generated videos.

FRAMES = 6


def _write_set(root) -> str:
  """Four videos with known answers (mp4 and frame folders, ball and needle) and one question
  whose video is missing; Video-MME layout as JSON Lines."""
  from vita_jax.data import demo
  from vita_jax.data.video import write_mp4
  rng = np.random.default_rng(0)
  os.makedirs(root / "videos")
  records = []

  def add(name, frames, mp4, question, options, truth, duration):
    if mp4:
      write_mp4(str(root / "videos" / f"{name}.mp4"), frames, fps=1)
    elif frames is not None:
      os.makedirs(root / "videos" / name)
      for i, frame in enumerate(frames):
        Image.fromarray(frame).save(root / "videos" / name / f"{i:03d}.png")
    records.append({"videoID": name, "question_id": name, "duration": duration,
                    "question": question, "task_type": "motion" if "ball" in name else "needle",
                    "options": [f"{'ABCD'[i]}. {o}" for i, o in enumerate(options)],
                    "answer": "ABCD"[options.index(truth)]})

  ball = "Which way does the ball move?"
  add("ball_right", demo.moving_video(rng, FRAMES, "right", "red"), True, ball, FOUR, "right",
      "short")
  add("ball_up", demo.moving_video(rng, FRAMES, "up", "blue"), False, ball, FOUR, "up", "medium")
  for k, mp4 in enumerate((True, False)):
    frames, truth = demo.make_needle_video(FRAMES, 0.5, seed=k)
    options = sorted({truth, "a red circle", "a blue square", "a green cross", "a yellow cross"}
                     - {truth})[:3] + [truth]
    add(f"needle_{k}", frames, mp4, demo.NEEDLE_QUESTION, options, truth, "long")
  add("gone", None, False, ball, FOUR, "left", "short")
  (root / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(root / "set.jsonl")


SHARDS = 1


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """(data file, video root) of the generated set."""
  root = tmp_path_factory.mktemp("videoqa")
  return _write_set(root), str(root / "videos")


@pytest.fixture(scope="module")
def tiny(dataset):
  """(tiny random model, a byte-level tokenizer trained on the set's text)."""
  from flax import nnx
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  from configs import base
  from vita_jax.data import tokenizer as tokenizer_lib
  from vita_jax.models.vlm import LongVITA
  data = dataset[0]
  # Built with `tokenizers` alone: the demo tokenizer's trainer would import transformers (~10 s).
  backend = Tokenizer(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  backend.train_from_iterator(
      open(data).read().splitlines() + ["user\n", "assistant\n"],
      trainers.BpeTrainer(vocab_size=512, special_tokens=list(tokenizer_lib.SPECIAL_TOKENS),
                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                          show_progress=False))
  tok = tokenizer_lib.Tokenizer(backend)
  cfg = base.model_config("tiny")
  cfg.compute_dtype = "float32"
  cfg.llm.vocab_size = tok.vocab_size      # every token it can draw decodes to some text
  return LongVITA(cfg, rngs=nnx.Rngs(0)), tok


def _options(dataset, out, **kw):
  data, videos = dataset
  return videoqa.Options(data=data, video_root=videos, out=str(out), max_frames=8,
                         max_new_tokens=4, seq_shards=SHARDS, **kw)


def _answerer(tiny):
  model, tok = tiny
  return videoqa.ModelAnswerer(model, tok, max_frames=8, max_new_tokens=4, seq_shards=SHARDS)


@pytest.fixture(scope="module")
def fresh(dataset, tiny, tmp_path_factory):
  """One uninterrupted in-process run: (summary, the results.jsonl path)."""
  out = tmp_path_factory.mktemp("fresh")
  summary, _ = videoqa.run(_options(dataset, out), _answerer(tiny), progress=False)
  return summary, out / "results.jsonl"


def _recount(path):
  """accuracy overall and per bucket from results.jsonl, counted the plain way."""
  rows = [json.loads(line) for line in open(path)]
  per = {}
  for r in rows:
    assert r["pred"] == vd.extract_letter(r["response"], r["options"])
    per.setdefault(r["bucket"], []).append(r["pred"] == r["answer"])
  return rows, sum(r["pred"] == r["answer"] for r in rows) / len(rows), per


@pytest.mark.slow      # the tiny model's first compile: ~30 s of CPU
def test_in_process_end_to_end(fresh):
  summary, path = fresh
  rows, acc, per = _recount(path)
  assert [r["id"] for r in rows] == ["ball_right", "ball_up", "needle_0", "needle_1"]
  assert summary["accuracy"] == pytest.approx(acc) and summary["answered"] == 4
  assert {b: (n, c) for b, n, c in summary["buckets"]} == {b: (len(v), sum(v))
                                                           for b, v in per.items()}
  assert [b for b, _, _ in summary["buckets"]] == ["short", "medium", "long"]
  assert [c for c, _, _ in summary["categories"]] == ["motion", "needle"]
  assert [s["id"] for s in summary["skipped"]] == ["gone"]
  assert "missing video" in summary["skipped"][0]["reason"]
  text = (path.parent / "summary.md").read_text()
  assert f"| **overall** | 4 | {summary['correct']} |" in text and "skipped gone" in text


def test_accuracy_of_scripted_answers(dataset, tmp_path):
  """Known answers in the forms models give: 3 of 4 right, the wrong one in the long bucket."""
  said = {"ball_right": "D", "ball_up": "The ball moves up.", "needle_0": "(A)",
          "needle_1": "Answer: D"}      # a needle's truth is its last option, D
  summary, text = videoqa.run(
      _options(dataset, tmp_path),
      lambda prompt, video: said[os.path.basename(video).removesuffix(".mp4")], progress=False)
  assert (summary["answered"], summary["correct"], summary["accuracy"]) == (4, 3, 0.75)
  assert summary["buckets"] == [("short", 1, 1), ("medium", 1, 1), ("long", 2, 1)]
  assert "| long | 2 | 1 | 50.0 |" in text and "| **overall** | 4 | 3 | **75.0** |" in text


@pytest.mark.slow
def test_resume_after_an_interrupted_run(dataset, tiny, fresh, tmp_path):
  # Interrupted after two questions (the second record cut mid-line), then rerun.
  calls, answer = [], _answerer(tiny)
  counting = lambda prompt, video: calls.append(video) or answer(prompt, video)
  videoqa.run(_options(dataset, tmp_path, limit=2), counting, progress=False)
  path = tmp_path / "results.jsonl"
  path.write_bytes(path.read_bytes()[:-20])
  resumed, _ = videoqa.run(_options(dataset, tmp_path), counting, progress=False)
  assert path.read_bytes() == fresh[1].read_bytes()
  assert len(calls) == 2 + 3           # the cut record was asked again, nothing else twice
  assert resumed == fresh[0]
  again, _ = videoqa.run(_options(dataset, tmp_path), counting, progress=False)
  assert len(calls) == 5 and again == fresh[0]     # all answered: only "gone" is retried


def _stand_in_server(model, tok, api_key):
  """An OpenAI-style /v1/chat/completions on 127.0.0.1 that answers with vita_jax.generate in
  this process (video from the request's video_url part, frames from its max_frames)."""
  import fastapi
  import uvicorn

  from vita_jax import generate as gen
  app, seen = fastapi.FastAPI(), []

  def check(request):
    if request.headers.get("authorization") != f"Bearer {api_key}":
      raise fastapi.HTTPException(401, "bad key")

  @app.get("/v1/models")
  def models(request: fastapi.Request):
    check(request)
    return {"object": "list", "data": [{"id": "tiny", "object": "model", "created": 0,
                                        "owned_by": "test"}]}

  @app.post("/v1/chat/completions")
  async def chat(request: fastapi.Request):
    check(request)
    body = await request.json()
    seen.append(body)
    parts = body["messages"][0]["content"]
    text = next(p["text"] for p in parts if p["type"] == "text")
    url = next(p["video_url"]["url"] for p in parts if p["type"] == "video_url")
    ids, pixels = gen.build_prompt(model, tok, text, video=url.removeprefix("file://"),
                                   max_frames=body.get("max_frames", 64))
    eos = int(model.config.tokens.eos_id)
    out = gen.generate(model, ids, pixels, max_new_tokens=body["max_tokens"],
                       seq_shards=SHARDS, eos_id=eos)
    answer = tok.decode([t for t in out[0] if t != eos], skip_special_tokens=True)
    return {"id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": answer}}],
            "usage": {"prompt_tokens": ids.shape[1], "completion_tokens": out.shape[1],
                      "total_tokens": ids.shape[1] + out.shape[1]}}

  sock = socket.socket()
  sock.bind(("127.0.0.1", 0))
  server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
  thread = threading.Thread(target=server.run, kwargs=dict(sockets=[sock]), daemon=True)
  thread.start()
  deadline = time.time() + 20
  while not server.started and time.time() < deadline:
    time.sleep(0.05)
  return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}", seen


@pytest.mark.slow
def test_through_the_openai_client_against_a_stand_in_server(dataset, tiny, fresh, tmp_path):
  model, tok = tiny
  server, thread, url, seen = _stand_in_server(model, tok, "sekrit")
  try:
    with pytest.raises(UserError, match="refused the API key.*--api_key"):
      videoqa.run(_options(dataset, tmp_path / "x", server=url, api_key="wrong"), progress=False)
    o = _options(dataset, tmp_path, server=url, api_key="sekrit", send_max_frames=True)
    served, _ = videoqa.run(o, progress=False)
  finally:
    server.should_exit = True
    thread.join(timeout=10)
  # The prompt and video went over the wire intact: the answers are the in-process ones.
  assert (tmp_path / "results.jsonl").read_bytes() == fresh[1].read_bytes()
  assert served == fresh[0]
  assert seen[0]["model"] == "tiny" and seen[0]["max_frames"] == 8
  assert seen[0]["temperature"] == 0 and seen[0]["max_tokens"] == 4
  kinds = [p["type"] for p in seen[0]["messages"][0]["content"]]
  assert kinds == ["video_url", "text"]


def test_unreachable_server_and_missing_model_flag(dataset, tmp_path):
  sock = socket.socket()
  sock.bind(("127.0.0.1", 0))
  port = sock.getsockname()[1]
  sock.close()                                    # nothing listens there now
  with pytest.raises(UserError, match=f"cannot reach http://127.0.0.1:{port}/v1"):
    videoqa.run(_options(dataset, tmp_path, server=f"http://127.0.0.1:{port}"), progress=False)
  with pytest.raises(UserError, match="exactly one of --model=DIR"):
    videoqa.run(_options(dataset, tmp_path), progress=False)


def test_command_line_error_is_one_line(tmp_path):
  """Through the real entry point (absl flags, cli.run): exit code 2 and one line."""
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  (tmp_path / "q.json").write_text('[{"video": "a.mp4", "question": "q?"}]')
  result = subprocess.run(
      [sys.executable, "-m", "vita_jax.eval.videoqa", "--model=m", f"--data={tmp_path}/q.json"],
      cwd=root, capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=root))
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.startswith("error: ") and "fits none of the known layouts" in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1
  with pytest.raises(UserError, match="does not exist"):
    videoqa.run(videoqa.Options(data=str(tmp_path / "none.json"), model="m"), progress=False)
