"""Every flag of every command is passed by some test: a flag no test passes is a code path nobody
ran (issue #32 found --debug, --overlap, --roi-names and export's --version among them).

Each command's parser is taken from its own ``get_args`` without running it: argparse's
``parse_args`` is replaced, for that one call, by a function that hands back the parser it was
called on. A flag counts as passed where it stands as a command-line word (quoted, or inside a
quoted command line) in a test file that refers to that command (imports it, runs it as
``name.py`` or ``-m tools.name``, or calls its ``get_args``); the same flag of another command
does not count. This file itself does not count.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from pathlib import Path
from unittest import mock

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

COMMANDS = ("train", "predict", "adapt", "export", "phantom", "tools.bench", "tools.gpu_check")
TESTS = Path(__file__).resolve().parent


class _Parser(Exception):
    """Carries the parser out of ``get_args`` before it parses anything."""


def parser_of(get_args) -> argparse.ArgumentParser:
    """The ArgumentParser that ``get_args`` builds, taken at its ``parse_args`` call."""
    def hand_back(self, args=None, namespace=None):
        raise _Parser(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", hand_back):
        try:
            get_args([])
        except _Parser as caught:
            return caught.args[0]
    raise AssertionError(f"{get_args.__module__}.get_args never called ArgumentParser.parse_args")


def long_flags(parser: argparse.ArgumentParser) -> list[str]:
    return [option for action in parser._actions for option in action.option_strings
            if option.startswith("--") and option != "--help"]


def refers_to(text: str, command: str) -> bool:
    name = command.rsplit(".", 1)[-1]
    if command.startswith("tools."):
        patterns = [rf"\btools\.{name}\b", rf"^\s*from tools import [^\n]*\b{name}\b", rf"\btools/{name}\.py\b"]
    else:
        patterns = [rf"^\s*import {name}\b", rf"^\s*from {name} import\b", rf"(?<![\w/.]){name}\.py\b",
                    rf"\b{name}\.(get_args|main)\b"]
    return any(re.search(pattern, text, re.MULTILINE) for pattern in patterns)


def passes(text: str, flag: str) -> bool:
    """``flag`` as a command-line word: after a quote or a space, before a quote, a space or '='."""
    return re.search(rf"[\"'\s]{re.escape(flag)}(?=[\"'\s=])", text) is not None


def untested_flags(command: str, flags: list[str], test_files: dict[str, str]) -> list[str]:
    texts = [text for text in test_files.values() if refers_to(text, command)]
    return [flag for flag in flags if not any(passes(text, flag) for text in texts)]


def texts_of_the_tests() -> dict[str, str]:
    return {path.name: path.read_text(encoding="utf-8") for path in sorted(TESTS.glob("*.py"))
            if path.name != Path(__file__).name}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_of_the_command_is_passed_by_a_test(command):
    flags = long_flags(parser_of(importlib.import_module(command).get_args))
    assert "--help" not in flags and len(flags) >= 3, flags
    missing = untested_flags(command, flags, texts_of_the_tests())
    assert not missing, (f"{command}: no test passes {', '.join(missing)}; add a test that passes each and "
                         "checks its effect")


def test_the_check_finds_a_flag_that_only_another_command_passes(tmp_path):
    """The checker on made-up test files: a flag passed only to another command, or only named in
    prose, is reported; one passed on a command line of this command is not."""
    def get_args(argv=None):
        parser = argparse.ArgumentParser()
        parser.add_argument("--passed")
        parser.add_argument("--other-command-only", action="store_true")
        parser.add_argument("--in-prose-only", action="store_true")
        parser.add_argument("--in-a-command-line", action="store_true")
        return parser.parse_args(argv)

    flags = long_flags(parser_of(get_args))
    assert flags == ["--passed", "--other-command-only", "--in-prose-only", "--in-a-command-line"]
    texts = {"test_a.py": 'import predict\npredict.get_args(["--passed=1"])\n# see --in-prose-only-not\n'
                          'run("python predict.py --in-a-command-line")\n',
             "test_b.py": 'import train\ntrain.get_args(["--other-command-only"])\n'}
    assert untested_flags("predict", flags, texts) == ["--other-command-only", "--in-prose-only"]
    assert untested_flags("tools.bench", ["--passed"], texts) == ["--passed"]
    assert untested_flags("tools.bench", ["--passed"], {"t.py": 'cmd = ["-m", "tools.bench", "--passed"]'}) == []
