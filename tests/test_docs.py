"""The README and the manual in docs/ stay true: every `distill` command they show is accepted by the real command
line (each flag exists and takes the value shown), and every link between the pages resolves."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
import typer

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LAUNCHERS = re.compile(r"^(?:accelerate launch (?:--\S+ (?:\S+ )?)*-m |torchrun (?:--\S+ )*-m |python -m )?distill\b")


def shown_commands(page: Path) -> list[tuple[int, str]]:
    """The commands of a page's code blocks (indented or fenced): `distill ...`, also behind a launcher, with
    backslash continuations joined and comments dropped."""
    commands, pending, start = [], "", 0
    fenced = False
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if line.strip().startswith("```"):
            fenced = not fenced
            continue
        if not (fenced or line.startswith("    ")):
            continue
        text = line.strip()
        if pending:
            text, start = pending + " " + text, start
        elif LAUNCHERS.match(text):
            start = number
        else:
            continue
        if text.endswith("\\"):
            pending = text[:-1].strip()
            continue
        pending = ""
        commands.append((start, text))
    return commands


def arguments(command: str) -> list[str]:
    words = shlex.split(command, comments=True)
    return words[words.index("distill") + 1:]


CASES = [pytest.param(page, line, command, id=f"{page.name}:{line}") for page in PAGES
         for line, command in shown_commands(page)]


def test_the_pages_show_commands():
    assert len(CASES) > 60 and {case.values[0].name for case in CASES} >= {"README.md", "stages.md", "weights.md"}


@pytest.mark.parametrize(("page", "line", "command"), CASES)
def test_every_shown_command_parses(page, line, command):
    from distill.cli import app

    group = typer.main.get_command(app)
    args = [a for a in arguments(command) if a != "--debug"]  # the one root option a page may show first
    errors = importlib.import_module(type(group).__module__.rsplit(".", 1)[0] + ".exceptions")  # click, or typer's own
    root = type(group).context_class(group, info_name="distill")
    sub = group.get_command(root, args[0])
    assert sub is not None, f"{page.name}:{line}: `{command}`: distill has no command {args[0]}"
    try:
        sub.make_context(args[0], args[1:], parent=root).close()
    except errors.Exit:
        pass
    except errors.UsageError as error:
        pytest.fail(f"{page.name}:{line}: `{command}` is refused: {error.format_message()}")


def test_every_link_resolves():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_readme_is_a_page_and_keeps_its_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert "    python3 -m venv .venv && . .venv/bin/activate && pip install -e . && distill pipeline\n" in readme
    assert '    python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test]" && pytest -q\n' in readme
