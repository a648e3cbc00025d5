"""The repository stands alone: nothing points at documents outside it.

Code and docs once cited a team-internal specification under ``shared/`` that users never see.
Its content now lives in ``docs/math.md``; every pointer must go there (``docs/math.md §N``).
"""

import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent
# A path into the team's shared folder, or the old name of the math specification. A plain
# "/shared/..." (e.g. a cluster filesystem in a command-line example) is not a reference.
FORBIDDEN = re.compile(r"\bshared/docs\b|\.\./shared\b|draco-math")
# Skipped when walking the tree without git: hidden folders (.git, .venv, caches) and these
# build outputs and environments.
SKIPPED_DIRS = {"venv", "__pycache__", "build", "dist", "results", "runs", "workdir", "tmp"}
MATH_DOC = ROOT / "docs" / "math.md"
SECTIONS = range(1, 9)


def _tracked_files() -> list[pathlib.Path]:
  """Every file git tracks; without git, every file of the tree outside SKIPPED_DIRS."""
  try:
    out = subprocess.run(
      ["git", "ls-files", "-z"],
      cwd=ROOT,
      capture_output=True,
      check=True,
      timeout=60,
    ).stdout
    names = sorted({n for n in out.decode("utf-8", "replace").split("\0") if n})
    return [ROOT / n for n in names if (ROOT / n).is_file()]
  except (OSError, subprocess.SubprocessError):
    files = []
    for path in ROOT.rglob("*"):
      folders = path.relative_to(ROOT).parts[:-1]
      if any(p.startswith(".") or p in SKIPPED_DIRS or p.endswith(".egg-info") for p in folders):
        continue
      if path.is_file():
        files.append(path)
    return sorted(files)


def _text(path: pathlib.Path) -> str | None:
  """The file's text, or None for binary files."""
  data = path.read_bytes()
  if b"\0" in data[:8192]:
    return None
  return data.decode("utf-8", "replace")


def test_no_reference_to_the_shared_folder():
  this_file = pathlib.Path(__file__).resolve()
  files = _tracked_files()
  assert files, "found no files to check"
  hits = []
  for path in files:
    if path.resolve() == this_file:
      continue
    text = _text(path)
    if text is None:
      continue
    for number, line in enumerate(text.splitlines(), 1):
      if FORBIDDEN.search(line):
        hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:120]}")
  assert not hits, (
    f"{len(hits)} references to documents outside the repository (use docs/math.md §N):\n"
    + "\n".join(hits)
  )


def test_math_doc_exists_with_sections_one_to_eight():
  assert MATH_DOC.is_file(), f"missing {MATH_DOC.relative_to(ROOT)}"
  headings = re.findall(r"^## (\d+)\. \S", MATH_DOC.read_text(encoding="utf-8"), re.MULTILINE)
  numbers = [int(h) for h in headings]
  missing = [n for n in SECTIONS if n not in numbers]
  assert not missing, f"docs/math.md lacks sections {missing} (found {numbers})"
  assert numbers == sorted(numbers), f"docs/math.md sections out of order: {numbers}"
