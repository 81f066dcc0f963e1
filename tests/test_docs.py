"""The documentation holds together: links resolve, anchors exist, named commands exist.

Docstrings cite `docs/design.md#model` and the like, and the README and docs/ link to each
other; a renamed heading or a moved module silently breaks those pointers. These tests read
README.md, docs/*.md and every .py file of the repository and check:

- every relative Markdown link points to a file inside the repository, and no link leaves it
  (the project must stand alone);
- every `#anchor` (in a link, or in a `docs/<page>.md#anchor` reference in Python source) is the
  GitHub slug of a heading of the target page;
- every `python -m <module>` the docs name can be found by `importlib.util.find_spec`, and every
  `make <target>` is a Makefile target.

Pages that teammates are writing on other branches are listed in EXPECTED_ELSEWHERE: links to
them may dangle only while the file is absent. Empty the set once they are merged.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import re
import unicodedata

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Pages linked from the README that other branches add; a test below fails once one exists, so
# the set cannot outlive its reason.
EXPECTED_ELSEWHERE: set[str] = set()
# Other projects' commands the docs show how to run against ours; not installed here.
OTHER_PROJECTS = {"lmms_eval"}
SKIP_DIRS = {".git", ".venv", "runs", "build", "dist", "__pycache__", "node_modules"}

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_PY_REF = re.compile(r"\bdocs/([\w.-]+\.md)(?:#([\w-]+))?")
_PYTHON_M = re.compile(r"(?:\bpython3?|\btorchrun\b[^\n`]*?)\s+-m\s+([A-Za-z_][\w.]*)")
_MAKE = re.compile(r"(?<![\w/.-])make\s+([a-z][\w-]*)")


def markdown_files() -> list[str]:
  """README.md and docs/*.md, as paths relative to the repository root."""
  docs = os.path.join(ROOT, "docs")
  pages = sorted(f"docs/{n}" for n in os.listdir(docs) if n.endswith(".md"))
  return ["README.md", *pages]


def python_files() -> list[str]:
  out = []
  for folder, dirs, files in os.walk(ROOT):
    dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith(".")]
    out += [os.path.relpath(os.path.join(folder, f), ROOT) for f in files if f.endswith(".py")]
  return sorted(out)


def _read(rel: str) -> str:
  with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
    return f.read()


def split_code(text: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
  """(prose lines, fenced-code lines) as (line number, text): headings and links count only in
  prose, while commands are shown in both."""
  prose, code, fenced = [], [], False
  for number, line in enumerate(text.splitlines(), 1):
    if _FENCE.match(line):
      fenced = not fenced
      continue
    (code if fenced else prose).append((number, line))
  return prose, code


def github_slug(heading: str) -> str:
  """The anchor GitHub gives a heading: markup dropped, lower case, punctuation other than
  '-' and '_' removed, each space a hyphen."""
  text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # a link keeps its text
  text = re.sub(r"<[^>]+>", "", text)                           # inline HTML
  text = unicodedata.normalize("NFC", text).lower()
  text = "".join(c for c in text if c.isalnum() or c in " -_")
  return text.replace(" ", "-")


def anchors(rel: str) -> set[str]:
  """Heading slugs of a page, with GitHub's -1, -2, ... suffixes for repeated headings."""
  prose, _ = split_code(_read(rel))
  seen: dict[str, int] = {}
  out = set()
  for _, line in prose:
    m = _HEADING.match(line)
    if not m:
      continue
    slug = github_slug(m.group(2))
    n = seen.get(slug, 0)
    seen[slug] = n + 1
    out.add(slug if n == 0 else f"{slug}-{n}")
  return out


def links(rel: str) -> list[tuple[int, str]]:
  """(line, target) of every Markdown link in the prose of a page (not in code)."""
  prose, _ = split_code(_read(rel))
  return [(number, m.group(1)) for number, line in prose
          for m in _LINK.finditer(_INLINE_CODE.sub("", line))]


def _check_target(source: str, where: str, target_rel: str, anchor: str | None,
                  problems: list[str]) -> None:
  """Append a sentence to `problems` when target_rel (repo-relative) or its anchor is wrong."""
  if target_rel.startswith(".."):
    problems.append(f"{where}: {target_rel!r} is outside the repository; link only to files in it")
    return
  if not os.path.exists(os.path.join(ROOT, target_rel)):
    if target_rel not in EXPECTED_ELSEWHERE:
      problems.append(f"{where}: {target_rel} does not exist; fix the path or add the file")
    return
  if anchor and target_rel.endswith(".md") and anchor not in anchors(target_rel):
    problems.append(f"{where}: no heading of {target_rel} has the anchor #{anchor} "
                    f"(anchors there: {', '.join(sorted(anchors(target_rel)))})")


@pytest.mark.parametrize("page", markdown_files())
def test_links_resolve_and_anchors_exist(page):
  problems: list[str] = []
  for line, target in links(page):
    where = f"{page}:{line}"
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
      problems.append(f"{where}: {target!r} leaves the repository; the docs must stand alone")
      continue
    path, _, anchor = target.partition("#")
    if path:
      resolved = os.path.normpath(os.path.join(os.path.dirname(page), path))
      _check_target(page, where, resolved.replace(os.sep, "/"), anchor or None, problems)
    elif anchor not in anchors(page):
      problems.append(f"{where}: no heading of {page} has the anchor #{anchor}")
  assert not problems, "\n".join(problems)


def test_docs_references_in_python_source_exist():
  problems: list[str] = []
  for rel in python_files():
    for number, line in enumerate(_read(rel).splitlines(), 1):
      for m in _PY_REF.finditer(line):
        _check_target(rel, f"{rel}:{number}", f"docs/{m.group(1)}", m.group(2), problems)
  assert not problems, "\n".join(problems)


def _named(pattern: re.Pattern) -> list[tuple[str, str]]:
  """(page:line, name) for every match of pattern in the prose and code of all pages."""
  found = []
  for page in markdown_files():
    prose, code = split_code(_read(page))
    for number, line in prose + code:
      found += [(f"{page}:{number}", m.group(1)) for m in pattern.finditer(line)]
  return found


def module_exists(dotted: str) -> bool:
  """Whether `python -m dotted` finds a module, without executing any package's __init__
  (`importlib.util.find_spec` would import the parents, and vita_torch's loads torch)."""
  top, *rest = dotted.split(".")
  spec = importlib.util.find_spec(top)
  for part in rest:
    if spec is None or spec.submodule_search_locations is None:
      return False
    spec = importlib.machinery.PathFinder.find_spec(part, list(spec.submodule_search_locations))
  return spec is not None


def test_python_m_modules_exist():
  named = _named(_PYTHON_M)
  assert named, "no `python -m` found in the docs: the pattern is broken"
  missing = [f"{where}: python -m {module} names no importable module"
             for where, module in named
             if module.split(".")[0] not in OTHER_PROJECTS and not module_exists(module)]
  assert not missing, "\n".join(missing)


def test_make_targets_exist():
  makefile = _read("Makefile")
  targets = set(re.findall(r"^([A-Za-z][\w-]*)\s*:", makefile, re.M))
  named = _named(_MAKE)
  assert named, "no `make <target>` found in the docs: the pattern is broken"
  missing = [f"{where}: make {target} is not a target of the Makefile"
             for where, target in named if target not in targets]
  assert not missing, "\n".join(missing)


def test_expected_elsewhere_lists_only_absent_pages():
  present = sorted(p for p in EXPECTED_ELSEWHERE if os.path.exists(os.path.join(ROOT, p)))
  assert not present, (f"{', '.join(present)} now exist; remove them from EXPECTED_ELSEWHERE "
                       "in tests/test_docs.py so their links and anchors are checked")


@pytest.mark.parametrize("heading, slug", [
    ("Library notes", "library-notes"),
    ("The PyTorch mirror (`vita_torch`): NPU, GPU and CPU inference",
     "the-pytorch-mirror-vita_torch-npu-gpu-and-cpu-inference"),
    ("Long sequences: ring attention and the zigzag layout",
     "long-sequences-ring-attention-and-the-zigzag-layout"),
    ("Stage 4 (1M tokens) at 14B on TPU v5p", "stage-4-1m-tokens-at-14b-on-tpu-v5p"),
    ("A [linked](x.md) title", "a-linked-title"),
])
def test_github_slug(heading, slug):
  assert github_slug(heading) == slug
