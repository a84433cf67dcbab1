"""The README and the guides in docs/ point only inside the repository: every relative link resolves
to a file or folder of the checkout, and no page names notes that a clone does not have."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
# Inline links and images `[text](target)` / `![alt](target "title")`, and reference definitions
# `[label]: target`.
INLINE_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
EXTERNAL = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*:|//)")  # http:, https:, mailto:, gs:, //host
FENCE = re.compile(r"^\s*(```|~~~)")
# Private notes that exist beside the authors' checkouts, never in a clone.
PRIVATE = ("METHOD.md", "NOTES.md", "ARCHITECTURE.md", "STYLE.md", "../shared")


def _prose(text):
  """The page without fenced code blocks and inline code spans (where brackets are not links)."""
  lines, in_fence = [], False
  for line in text.splitlines():
    if FENCE.match(line):
      in_fence = not in_fence
      lines.append("")
      continue
    lines.append("" if in_fence else re.sub(r"`[^`]*`", "``", line))
  return "\n".join(lines)


def _links(page):
  prose = _prose(page.read_text(encoding="utf-8"))
  return INLINE_LINK.findall(prose) + REFERENCE_LINK.findall(prose)


def _rel(page):
  return str(page.relative_to(ROOT))


def test_pages_exist():
  assert (ROOT / "README.md").is_file()
  assert len(PAGES) > 1, "docs/ holds no guides"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_resolve(page):
  broken = []
  for target in _links(page):
    if EXTERNAL.match(target) or target.startswith("#"):
      continue
    path = target.split("#", 1)[0].split("?", 1)[0]
    if not path:
      continue
    resolved = (page.parent / path).resolve()
    if not resolved.exists():
      broken.append(target)
    elif ROOT not in resolved.parents and resolved != ROOT:
      broken.append(f"{target} (outside the repository)")
  assert not broken, f"{_rel(page)}: links that resolve to nothing in the repository: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_no_private_notes(page):
  text = page.read_text(encoding="utf-8")
  found = [name for name in PRIVATE if name in text]
  assert not found, f"{_rel(page)} mentions {found}, which a clone lacks; say it in the docs"


def test_the_link_finder_sees_links():
  sample = ('See [a](docs/a.md#x), ![img](images/b.png "t"), [c](https://e.org) and `[d](no.md)`.\n'
            "```\n[e](in_code.md)\n```\n[ref]: ../f.md\n")
  prose = _prose(sample)
  assert INLINE_LINK.findall(prose) + REFERENCE_LINK.findall(prose) == [
      "docs/a.md#x", "images/b.png", "https://e.org", "../f.md"]


# Repository files a page names in code spans (`specialize_jax/jobs/runs.py`, `tools/x.py`): they
# go stale when modules move, so every one must exist.
NAMED_FILE = re.compile(r"`((?:specialize_jax|tools|tests|gin|tasks|docs)/[\w./-]+\.(?:py|gin|md))`")


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_named_repository_files_exist(page):
  named = NAMED_FILE.findall(page.read_text(encoding="utf-8"))
  missing = sorted({path for path in named if not (ROOT / path).exists()})
  assert not missing, f"{_rel(page)} names files the repository lacks: {missing}"


def test_the_file_finder_sees_code_spans():
  assert NAMED_FILE.findall("`specialize_jax/jobs/runs.py` and `tools/a.py --x` and `gin/b.gin`") == [
      "specialize_jax/jobs/runs.py", "gin/b.gin"]
