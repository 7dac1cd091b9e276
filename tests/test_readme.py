"""The documentation holds to the code: the command lines of the README and of every docs/ page are ones the
CLI accepts, every command is shown somewhere, and every relative link points to a file that exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from zero2merged.cli import main

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# [text](target) or [text](target "title"); images too. Targets with a scheme (https:, mailto:) are not files.
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _fenced_blocks(page: Path) -> list[str]:
    """The page's code blocks, but those marked ```text: what a command prints, not what is typed."""
    return [body for kind, body in re.findall(r"```([a-z]*)\n(.*?)```", page.read_text(), flags=re.S) if kind != "text"]


def _command_lines(page: Path) -> list[str]:
    """``zero2merged …`` lines inside a page's fenced blocks, continuation lines joined."""
    lines = []
    for block in _fenced_blocks(page):
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            line = line.split("  #")[0].strip().removeprefix("$ ")
            if line.startswith("zero2merged ") or (line.startswith("torchrun ") and "-m zero2merged " in line):
                lines.append(line[line.index("zero2merged ") :])
    return lines


def _options(line: str) -> tuple[str, list[str]]:
    words = shlex.split(re.sub(r"[\[\]()|]", " ", line))
    command = next(w for w in words[1:] if not w.startswith("-"))
    return command, [w.split("=")[0] for w in words if w.startswith("--") and w not in ("--help",)]


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces made hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(m) for m in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", text, flags=re.M)}


def _links(page: Path) -> list[str]:
    """The relative link targets of a page, outside its fenced blocks."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return [t for t in LINK.findall(text) if not EXTERNAL.match(t)]


COMMAND_LINES = [(_page_id(page), line) for page in PAGES for line in _command_lines(page)]
LINKS = [(page, target) for page in PAGES for target in _links(page)]


@pytest.mark.parametrize(("page", "line"), COMMAND_LINES)
def test_documented_command_is_accepted_by_the_cli(page, line):
    command, options = _options(line)
    assert command in main.commands, f"{page} shows an unknown command: {line}"
    known = {opt for param in main.commands[command].params for opt in param.opts}
    known |= {opt for param in main.params for opt in param.opts}
    unknown = [opt for opt in options if opt not in known]
    assert not unknown, f"{page} shows options {command} does not have: {unknown} in {line}"


def test_every_command_is_shown():
    shown = {_options(line)[0] for _, line in COMMAND_LINES}
    assert shown == set(main.commands)


def test_the_readme_shows_the_main_commands_and_the_test_command():
    readme = PAGES[0]
    shown = {_options(line)[0] for line in _command_lines(readme)}
    assert {"convert", "verify"} <= shown
    assert any(line.strip().startswith("make test") for block in _fenced_blocks(readme) for line in block.splitlines())


def test_every_docs_page_is_listed_in_the_readme():
    linked = {(ROOT / target.split("#")[0]).resolve() for target in _links(PAGES[0])}
    unlisted = [_page_id(page) for page in PAGES[1:] if page.resolve() not in linked]
    assert not unlisted, f"README.md's Documentation list lacks {unlisted}"


@pytest.mark.parametrize(("page", "target"), LINKS, ids=[f"{_page_id(p)}->{t}" for p, t in LINKS])
def test_relative_link_points_to_a_file(page, target):
    path, _, anchor = target.partition("#")
    file = (page.parent / path).resolve() if path else page
    assert file.exists(), f"{_page_id(page)} links to {target}, which does not exist"
    if anchor and file.suffix == ".md":
        assert anchor in _anchors(file), f"{_page_id(page)} links to {target}: no heading gives #{anchor}"
