"""The README's command lines are ones the CLI accepts: every command and option it shows exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from zero2merged.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"


def _command_lines() -> list[str]:
    """``zero2merged …`` lines inside the README's fenced blocks, continuation lines joined."""
    lines, blocks = [], re.findall(r"```[a-z]*\n(.*?)```", README.read_text(), flags=re.S)
    for block in blocks:
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


@pytest.mark.parametrize("line", _command_lines())
def test_readme_command_is_accepted_by_the_cli(line):
    command, options = _options(line)
    assert command in main.commands, f"README shows an unknown command: {line}"
    known = {opt for param in main.commands[command].params for opt in param.opts}
    known |= {opt for param in main.params for opt in param.opts}
    unknown = [opt for opt in options if opt not in known]
    assert not unknown, f"README shows options {command} does not have: {unknown} in {line}"


def test_readme_shows_every_command():
    shown = {_options(line)[0] for line in _command_lines()}
    assert shown == set(main.commands)
