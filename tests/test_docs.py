"""Docs kept true by tests: the README's set-up lines, CI, and the CLI's commands."""

from __future__ import annotations

import re
from pathlib import Path

from mirrord.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def setup_commands() -> list[str]:
    section = README.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for line in section.splitlines() if line.startswith("    ")]


def test_readme_has_exactly_two_setup_lines() -> None:
    commands = setup_commands()
    assert len(commands) == 2
    assert commands[0].endswith("mirrord demo --once")
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    test_command = setup_commands()[1].split("&&")[-1].strip()
    assert ci[-1].strip() == test_command
    install = setup_commands()[1].split("&&")[1].strip()
    assert install.replace("pip install", "pip install --quiet") in ci


def test_every_command_is_in_the_readme() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "==SUPPRESS==" or a.nargs == "A...")
    for name in sub.choices:  # type: ignore[union-attr]
        assert re.search(rf"`mirrord {name}\b", README), f"`mirrord {name}` is not in README"


def test_readme_shows_the_status_page_screenshot() -> None:
    # tests/test_browser.py writes it from a running demo.
    assert "](docs/status-page.png)" in README
    assert (ROOT / "docs" / "status-page.png").exists()
