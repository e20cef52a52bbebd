"""The code examples of docs/*.md run in the test suite, so the documentation never rots.

Each page runs in a fresh temporary folder (the working directory), its blocks in order and in one
namespace, like a notebook: a block may use what an earlier block of the same page defined.

- `````python`` blocks are executed. A block whose first line starts with ``>>>`` is a doctest:
  its printed output is compared (``...`` matches anything; whitespace runs compare equal).
- `````console`` blocks are shell sessions of the ``ckpt-callbacks`` command: each
  ``$ ckpt-callbacks ...`` line runs in-process (:func:`ckpt_callbacks.cli.main`) and what it
  prints (stdout, then stderr, as a terminal shows it) is compared with the lines that follow, the
  same way; ``$ echo $?`` prints the previous command's exit code. Other commands are refused:
  mark such a block to skip, or use a ``bash`` block, which is never run.
- Markers are HTML comments, invisible in the rendered page:

  ``<!-- docs-test: skip <reason> -->`` on the line before a block: not run (a GPU, a real
  bucket, ``torchrun``...). ``<!-- docs-test: setup`` + code lines + ``-->``: hidden code, run
  where it stands (fixtures a reader does not need to see).
"""

from __future__ import annotations

import contextlib
import doctest
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from ckpt_callbacks.cli import main

DOCS = Path(__file__).resolve().parent.parent / "docs"
_FENCE = re.compile(r"^```(\w*)\s*$")
_SKIP = re.compile(r"^<!--\s*docs-test:\s*skip\b(.*?)-->\s*$")
_SETUP = re.compile(r"^<!--\s*docs-test:\s*setup\s*$")
_FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@dataclass(frozen=True)
class Block:
    """One example of a page: its language, code, first line number, and why it is skipped."""

    language: str
    code: str
    line: int
    skip: str | None = None


def blocks_of(page: Path) -> list[Block]:
    """The python and console blocks of a page, and its hidden setup code, in page order."""
    lines = page.read_text().splitlines()
    found: list[Block] = []
    skip: str | None = None
    index = 0
    while index < len(lines):
        line = lines[index]
        if (marker := _SKIP.match(line.strip())) is not None:
            skip = marker[1].strip() or "marked to skip"
        elif _SETUP.match(line.strip()):
            end = next(i for i in range(index + 1, len(lines)) if lines[i].strip() == "-->")
            found.append(Block("python", "\n".join(lines[index + 1:end]), index + 2))
            index = end
        elif (fence := _FENCE.match(line)) is not None:
            end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith("```"))
            if fence[1] in ("python", "console"):
                found.append(Block(fence[1], "\n".join(lines[index + 1:end]) + "\n", index + 2, skip))
            skip, index = None, end
        index += 1
    return found


def run_python(block: Block, page: Path, namespace: dict) -> None:
    name = f"{page.name}:{block.line}"
    if not block.code.lstrip().startswith(">>>"):
        exec(compile(block.code, name, "exec"), namespace)  # noqa: S102 -- our own documentation
        return
    test = doctest.DocTestParser().get_doctest(block.code, namespace, name, str(page), block.line - 1)
    report = io.StringIO()
    result = doctest.DocTestRunner(optionflags=_FLAGS).run(test, out=report.write, clear_globs=False)
    namespace.update(test.globs)  # a DocTest runs in a copy; later blocks see what it defined
    assert result.failed == 0, report.getvalue()


def run_console(block: Block, page: Path) -> None:
    sessions = re.split(r"^\$ ", block.code, flags=re.MULTILINE)
    assert not sessions[0].strip(), f"{page.name}:{block.line}: a console block starts with '$ '"
    last_code = 0
    for session in sessions[1:]:
        command, _, expected = session.partition("\n")
        argv = shlex.split(command)
        shown = io.StringIO()
        if argv == ["echo", "$?"]:
            shown.write(f"{last_code}\n")
        else:
            assert argv[0] == "ckpt-callbacks", f"{page.name}:{block.line}: only ckpt-callbacks runs here: {command!r}"
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    last_code = main(argv[1:])
                except SystemExit as exit_:  # --help and usage errors
                    last_code = int(exit_.code or 0)
            shown.write(out.getvalue() + err.getvalue())
        if not doctest.OutputChecker().check_output(expected, shown.getvalue(), _FLAGS):
            pytest.fail(f"{page.name}:{block.line}: `$ {command}` printed:\n{shown.getvalue()}\nexpected:\n{expected}")


PAGES = sorted(DOCS.glob("*.md"))


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_examples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    ran = 0
    for block in blocks_of(page):
        if block.skip is not None:
            continue
        if block.language == "python":
            run_python(block, page, namespace)
        else:
            run_console(block, page)
        ran += 1
    if ran == 0:
        pytest.skip(f"{page.name} has no runnable example")


def test_markers_are_understood(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "text\n<!-- docs-test: setup\nx = 1\n-->\n```python\ny = x + 1\n```\n"
        "<!-- docs-test: skip needs a GPU -->\n```python\nraise SystemExit\n```\n"
        "```bash\nrm -rf /\n```\n```console\n$ ckpt-callbacks --help\n...\n```\n"
    )
    found = blocks_of(page)
    assert [(b.language, b.skip) for b in found] == [("python", None), ("python", None), ("python", "needs a GPU"),
                                                    ("console", None)]
    assert found[0].code == "x = 1" and found[1].line == 6


def test_console_output_is_compared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    page = tmp_path / "page.md"
    page.write_text("```console\n$ ckpt-callbacks ls nowhere\nckpt-callbacks: error: no folder ...\n$ echo $?\n1\n```\n")
    run_console(blocks_of(page)[0], page)
    page.write_text("```console\n$ ckpt-callbacks ls nowhere\nsomething else\n```\n")
    with pytest.raises(pytest.fail.Exception, match="printed"):
        run_console(blocks_of(page)[0], page)
