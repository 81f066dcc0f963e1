"""Multiple-choice video QA files in the layouts of three long-video benchmarks, the prompt they
ask with and the answer-letter extraction their scoring scripts use. No JAX: `videoqa` runs it.

Layouts (one record = one question; JSON list, JSON Lines or parquet):

- videomme: video `videoID` (+ ".mp4"), `question`, `options` ("A. ..."), truth `answer` (a
  letter), bucket `duration` (short / medium / long), category `task_type`.
- mlvu: video `video`, `question`, `candidates` (texts), truth `answer` (the option's text),
  bucket from `duration` in seconds (else `question_type`), category `question_type`.
- longvideobench: video `video_path`, `question`, `candidates`, truth `correct_choice` (an
  index), bucket `duration_group`, category `question_category`.

Each file keeps its own question ids (`question_id`, `id`); MLVU has none, so one is made from
the video and the question, which keeps a rerun's ids stable (resuming relies on them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re

from vita_jax.errors import ConfigError, InputError

LETTERS = "ABCDEFGH"
# Required fields that identify each layout; a record must carry all of them.
LAYOUTS = {
    "videomme": ("videoID", "question", "options", "answer"),
    "mlvu": ("video", "question", "candidates", "answer"),
    "longvideobench": ("video_path", "question", "candidates", "correct_choice"),
}
# LongVideoBench's duration groups (seconds, the upper end of each group) and their ranges.
LVB_GROUPS = {8: "0-8s", 15: "8-15s", 60: "15-60s", 600: "180-600s", 3600: "900-3600s"}
# MLVU gives seconds; the buckets use Video-MME's split (short < 4 min <= medium <= 15 min).
SHORT_S, MEDIUM_S = 240, 900
BUCKET_ORDER = ("short", "medium", "long") + tuple(LVB_GROUPS.values())


@dataclasses.dataclass(frozen=True)
class Question:
  id: str
  video: str                 # as the file names it (relative to --video_root)
  question: str
  options: tuple[str, ...]   # option texts, without their letters
  answer: str                # the correct letter
  bucket: str                # duration bucket
  category: str = ""         # task type / question type, where the file has one


def read_records(path: str) -> list[dict]:
  """The records of a .json (a list, or an object holding one list), .jsonl or .parquet file."""
  if not os.path.isfile(path):
    raise ConfigError(f"--data={path!r} does not exist; pass a .json, .jsonl or .parquet file")
  ext = os.path.splitext(path)[1].lower()
  if ext == ".parquet":
    try:
      import pyarrow.parquet as pq
    except ImportError as e:
      raise ConfigError(f"reading {path!r} needs pyarrow, which is not installed; "
                        "pip install pyarrow, or convert the file to JSON Lines") from e
    return pq.read_table(path).to_pylist()
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if ext == ".jsonl":
    records = []
    for n, line in enumerate(text.splitlines(), 1):
      if line.strip():
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise InputError(f"{path}:{n} is not valid JSON ({e.msg}); each line of a .jsonl "
                           "file must be one JSON object") from e
    return records
  if ext != ".json":
    raise ConfigError(f"--data={path!r}: unknown file type {ext!r}; use .json, .jsonl or "
                      ".parquet")
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise InputError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from e
  if isinstance(data, dict):
    lists = [v for v in data.values() if isinstance(v, list)]
    if len(lists) != 1:
      raise InputError(f"{path} holds a JSON object; expected a list of questions (or an "
                       "object with exactly one list in it)")
    data = lists[0]
  if not isinstance(data, list):
    raise InputError(f"{path} holds a JSON {type(data).__name__}; expected a list of questions")
  return data


def detect_layout(records: list[dict], path: str = "the data file") -> str:
  """The layout whose required fields every record has."""
  if not records:
    raise InputError(f"{path} holds no questions")
  bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
  if bad is not None:
    raise InputError(f"{path}: record {bad} is a {type(records[bad]).__name__}, not an object")
  fits = [name for name, fields in LAYOUTS.items()
          if all(all(f in r for f in fields) for r in records)]
  if len(fits) != 1:
    wants = "; ".join(f"{name}: {', '.join(fields)}" for name, fields in LAYOUTS.items())
    raise InputError(f"{path} fits {'none' if not fits else 'several'} of the known layouts "
                     f"(its first record has fields {sorted(records[0])}; the layouts need "
                     f"{wants}); fix the file or pass --layout=")
  return fits[0]


def _text(value) -> str:
  return "" if value is None else str(value).strip()


def _options(record: dict, key: str, where: str) -> list[str]:
  value = record[key]
  if isinstance(value, str) or not hasattr(value, "__iter__"):
    raise InputError(f"{where}: {key!r} must be a list of options, got {value!r}")
  options = [_text(o) for o in value]
  if not 2 <= len(options) <= len(LETTERS):
    raise InputError(f"{where}: {len(options)} options; 2 to {len(LETTERS)} are supported")
  return options


def _seconds_bucket(seconds: float) -> str:
  return "short" if seconds < SHORT_S else "medium" if seconds <= MEDIUM_S else "long"


def _videomme(r: dict, where: str) -> dict:
  options = _options(r, "options", where)
  # "A. text" -> "text"; options without a letter are lettered in order.
  texts = [re.sub(rf"^\(?[{LETTERS}][.):]\s*", "", o) for o in options]
  answer = _text(r["answer"]).strip("().").upper()
  if answer not in LETTERS[:len(options)]:
    raise InputError(f"{where}: answer {r['answer']!r} is not one of the option letters "
                     f"{', '.join(LETTERS[:len(options)])}")
  video = _text(r["videoID"])
  return dict(id=_text(r.get("question_id")), video=video if "." in video else video + ".mp4",
              options=texts, answer=answer, bucket=_text(r.get("duration")) or "all",
              category=_text(r.get("task_type")))


def _mlvu(r: dict, where: str) -> dict:
  options = _options(r, "candidates", where)
  truth = _text(r["answer"])
  if truth not in options:
    raise InputError(f"{where}: answer {truth!r} is not one of the candidates {options}")
  duration, kind = r.get("duration"), _text(r.get("question_type"))
  try:
    bucket = _seconds_bucket(float(duration))
  except (TypeError, ValueError):
    bucket = kind or "all"
  return dict(id=_text(r.get("question_id") or r.get("id")), video=_text(r["video"]),
              options=options, answer=LETTERS[options.index(truth)], bucket=bucket,
              category=kind)


def _longvideobench(r: dict, where: str) -> dict:
  options = _options(r, "candidates", where)
  try:
    choice = int(r["correct_choice"])
  except (TypeError, ValueError):
    choice = -1
  if not 0 <= choice < len(options):
    raise InputError(f"{where}: correct_choice {r['correct_choice']!r} must be an index into "
                     f"its {len(options)} candidates")
  group = r.get("duration_group")
  try:
    bucket = LVB_GROUPS.get(int(group), f"{int(group)}s")
  except (TypeError, ValueError):
    bucket = "all"
  return dict(id=_text(r.get("id")), video=_text(r["video_path"]), options=options,
              answer=LETTERS[choice], bucket=bucket, category=_text(r.get("question_category")))


_PARSERS = {"videomme": _videomme, "mlvu": _mlvu, "longvideobench": _longvideobench}


def load_questions(path: str, layout: str = "") -> tuple[str, list[Question]]:
  """(layout, questions) from a benchmark file; `layout` forces one, "" detects it."""
  records = read_records(path)
  if layout and layout not in LAYOUTS:
    raise ConfigError(f"--layout={layout!r} is unknown; use one of {', '.join(LAYOUTS)}")
  if layout:
    for i, r in enumerate(records):
      missing = [f for f in LAYOUTS[layout] if not isinstance(r, dict) or f not in r]
      if missing:
        raise InputError(f"{path}: record {i} lacks {', '.join(missing)}, which the "
                         f"{layout} layout needs")
  else:
    layout = detect_layout(records, path)
  questions, seen = [], {}
  for i, r in enumerate(records):
    fields = _PARSERS[layout](r, f"{path} record {i}")
    question = _text(r["question"])
    qid = fields.pop("id") or _made_id(fields["video"], question, fields["options"])
    seen[qid] = seen.get(qid, 0) + 1
    if seen[qid] > 1:          # the same question twice: keep both, under distinct ids
      qid = f"{qid}#{seen[qid]}"
    questions.append(Question(id=qid, question=question, options=tuple(fields.pop("options")),
                              **fields))
  return layout, questions


def _made_id(video: str, question: str, options) -> str:
  digest = hashlib.sha1(json.dumps([video, question, list(options)]).encode()).hexdigest()
  return f"{video}:{digest[:10]}"


def build_prompt(q: Question) -> str:
  """Video-MME's wording, which lmms-eval and VLMEvalKit reuse for the other two."""
  letters = LETTERS[:len(q.options)]
  listed = ", ".join(letters[:-1]) + f", or {letters[-1]}" if len(letters) > 2 else \
      f"{letters[0]} or {letters[1]}"
  lines = ["Select the best answer to the following multiple-choice question based on the "
           f"video. Respond with only the letter ({listed}) of the correct option.", q.question]
  lines += [f"{letter}. {text}" for letter, text in zip(letters, q.options)]
  lines.append("The best answer is:")
  return "\n".join(lines)


def _normal(text: str) -> str:
  return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def extract_letter(response: str, options) -> str | None:
  """The option a free-form answer picks, or None.

  In order: a letter that opens the answer ("B", "B.", "(B) ...", "C: ..."), a letter after
  "answer"/"option" ("The answer is C", "Answer: (D)"), a letter in parentheses, the first
  standalone capital letter, and last the one option whose text the answer contains (the
  longest, when one option's text holds another's). "A" followed by a lower-case word is the
  article, not an option. Letters beyond the number of options do not count.
  """
  letters = LETTERS[:len(options)]
  text = response.strip().lstrip("*#>` ").strip()
  if not text:
    return None
  ok = lambda m: m is not None and m.group(1) in letters
  alone = re.fullmatch(r"\(?([a-h])\)?\.?", text)     # "b", "(c)": a bare letter, any case
  if alone and alone.group(1).upper() in letters:
    return alone.group(1).upper()
  start = re.match(r"\(?([A-H])(?:\)|[.:](?!\w)|$|\s)", text)
  if ok(start) and not (start.group(1) == "A" and re.match(r"A\s+[a-z]", text)):
    return start.group(1)
  for pattern in (r"(?i:answer|option|choice)(?:\s+is)?\s*:?\s*\(?([A-H])(?![\w'])",
                  r"\(([A-H])\)"):
    for m in re.finditer(pattern, text):
      if ok(m):
        return m.group(1)
  for m in re.finditer(r"(?<![\w'])([A-H])(?![\w'])", text):
    if ok(m) and not (m.group(1) == "A" and re.match(r"\s+[a-z]", text[m.end():])):
      return m.group(1)
  said = f" {_normal(text)} "
  hits = [(len(_normal(o)), i) for i, o in enumerate(options)
          if _normal(o) and f" {_normal(o)} " in said]
  if not hits:
    return None
  hits.sort(reverse=True)
  if len(hits) > 1 and hits[0][0] == hits[1][0]:
    return None                 # two different options named: no answer
  longest = options[hits[0][1]]
  if any(_normal(options[i]) not in _normal(longest) for _, i in hits[1:]):
    return None
  return letters[hits[0][1]]
