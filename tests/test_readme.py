"""Every command of the README's "Ten commands" runs as written, in order, in a fresh folder (the CLI in this
process: the same ``main`` the ``diffrt`` script calls, without a new interpreter per line)."""

from __future__ import annotations

import re
import shlex

import pytest

from tests.test_layers import ROOT

pytestmark = pytest.mark.integration


def readme_commands() -> list[str]:
    """The ``diffrt ...`` lines of the README's first code block after "## Ten commands", comments cut."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Ten commands", 1)[1]
    block = re.search(r"```\n(.*?)```", section, re.S).group(1)
    commands = [line.split("  #")[0].strip() for line in block.splitlines()]
    return [c for c in commands if c]


def test_the_readme_lists_ten_diffrt_commands():
    commands = readme_commands()
    assert len(commands) == 10 and all(c.startswith("diffrt ") for c in commands), commands


def test_every_readme_command_runs(tmp_path, monkeypatch):
    from diffrt.cli import main

    monkeypatch.chdir(tmp_path)
    for command in readme_commands():
        assert main(shlex.split(command)[1:]) == 0, command
    assert (tmp_path / "boots.png").is_file() and len(list((tmp_path / "coats").glob("*.png"))) == 4
    assert (tmp_path / "lcm-onnx" / "manifest.json").is_file() and (tmp_path / "sandal.png").is_file()
