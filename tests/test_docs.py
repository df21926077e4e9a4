"""Every ```python block of README.md and docs/*.md runs, so the docs cannot rot.

Blocks of one file run in order, in one namespace, in a fresh working directory (later blocks may use what
earlier ones defined, as a reader would). Markers on the line(s) just before a block:

- `<!-- skip-doctest -->`: not executed (a block that needs real Hub IDs, your own data, or hours of compute);
- `<!-- doctest: hub -->`: executed with `HF_TOKEN` set to a write token of the test suite's local Hub server
  (`tests/hub_server.py`, already on `HF_ENDPOINT`); such a block creates what it reads.

Blocks written as `>>>` sessions run through `doctest` (`# doctest: +SKIP` is honoured, outputs compared).
"""

from __future__ import annotations

import doctest
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = "<!-- skip-doctest -->"
HUB = "<!-- doctest: hub -->"
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)(?P<info>[^\n`]*)$")


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    code: str
    marker: str | None  # SKIP, HUB or None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def doc_files() -> list[Path]:
    files = [ROOT / "README.md"] if (ROOT / "README.md").is_file() else []
    return files + sorted((ROOT / "docs").glob("*.md"))


def python_blocks(path: Path) -> list[Block]:
    """The fenced blocks whose info string is `python` / `py` / `pycon`, with the marker before each."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m.group("indent"), m.group("fence"), m.group("info").strip().lower()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not (
            lines[i].strip().startswith(fence) and lines[i].strip().strip(fence[0]) == ""
        ):
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        i += 1  # the closing fence
        if info.split()[:1] not in (["python"], ["py"], ["pycon"]):
            continue
        marker = None
        j = start - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        if j >= 0 and lines[j].strip() in (SKIP, HUB):
            marker = lines[j].strip()
        blocks.append(Block(path, start + 1, "\n".join(body) + "\n", marker))
    return blocks


def _run_block(block: Block, namespace: dict) -> None:
    code = textwrap.dedent(block.code)
    if code.lstrip().startswith(">>>"):
        parser = doctest.DocTestParser()
        test = parser.get_doctest(code, namespace, block.where, str(block.path), block.line)
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        runner.run(test, clear_globs=False)
        result = runner.summarize(verbose=False)
        assert result.failed == 0, (
            f"{block.where}: {result.failed} doctest example(s) failed (see output above)"
        )
        return
    compiled = compile(code, block.where, "exec")
    exec(compiled, namespace)


DOCS = [p for p in doc_files() if any(b.marker != SKIP for b in python_blocks(p))]


def test_doc_parser_finds_blocks_and_markers(tmp_path, monkeypatch):
    doc = tmp_path / "x.md"
    doc.write_text(
        "text\n\n```python\na = 1\n```\n\n<!-- skip-doctest -->\n```python\nraise SystemExit\n```\n"
        "- item:\n\n  ```py\n  b = a + 1\n  ```\n\n```bash\nrm -rf /\n```\n<!-- doctest: hub -->\n\n```python\nc=3\n```\n"
    )
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    blocks = python_blocks(doc)
    assert [(b.line, b.marker) for b in blocks] == [(3, None), (8, SKIP), (13, None), (22, HUB)]
    assert blocks[2].code == "b = a + 1\n"
    namespace: dict = {}
    _run_block(blocks[0], namespace)
    _run_block(blocks[2], namespace)
    assert namespace["b"] == 2
    failing = Block(doc, 1, "assert 1 == 2\n", None)
    with pytest.raises(AssertionError):
        _run_block(failing, {})
    doctest_block = Block(doc, 1, ">>> 1 + 1\n3\n", None)
    with pytest.raises(AssertionError, match="failed"):
        _run_block(doctest_block, {})


def test_readme_and_guide_have_runnable_examples():
    assert {p.name for p in DOCS} >= {"README.md", "guide.md", "hub.md"}


@pytest.mark.parametrize("path", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_doc_code_blocks_run(path: Path, tmp_path, monkeypatch, request):
    blocks = [b for b in python_blocks(path) if b.marker != SKIP]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if any(b.marker == HUB for b in blocks):
        hub = request.getfixturevalue("hub_server")
        monkeypatch.setenv("HF_TOKEN", hub.token)
    namespace: dict = {"__name__": "__doc__"}
    for block in blocks:
        try:
            _run_block(block, namespace)
        except Exception as err:
            raise AssertionError(
                f"The python block at {block.where} failed: {type(err).__name__}: {err}\n"
                f"If it cannot run offline (real Hub IDs, user data), put `{SKIP}` on the line before it."
            ) from err
