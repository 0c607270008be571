"""Rewrite the flag reference in README.md from the scripts' real argument parsers.

    python -m tools.update_readme          # rewrite README.md in place
    python -m tools.update_readme --check  # exit 1 if README.md is out of date (the tests run this)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {"train": "train", "predict": "predict", "phantom": "phantom", "bench": "tools.bench",
           "gpu_check": "tools.gpu_check", "adapt": "adapt", "export": "export"}


def help_text(script: str) -> str:
    """The script's --help output at a fixed width, so the README does not depend on the terminal."""
    os.environ["COLUMNS"] = "100"
    sys.path.insert(0, str(ROOT))
    module = importlib.import_module(SCRIPTS[script])
    buffer = io.StringIO()
    saved_argv = sys.argv
    sys.argv = [f"{script}.py", "--help"]  # argparse names the program after argv[0]
    try:
        with contextlib.redirect_stdout(buffer), contextlib.suppress(SystemExit):
            module.get_args()
    finally:
        sys.argv = saved_argv
    return buffer.getvalue().rstrip()


def render(readme: str) -> str:
    for script in SCRIPTS:
        pattern = re.compile(rf"(<!-- BEGIN flags:{script} -->\n).*?(<!-- END flags:{script} -->)", re.S)
        if pattern.search(readme):
            readme = pattern.sub(lambda m: f"{m.group(1)}```text\n{help_text(script)}\n```\n{m.group(2)}", readme)
    return readme


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when README.md is stale")
    args = parser.parse_args()
    path = ROOT / "README.md"
    current = path.read_text(encoding="utf-8")
    updated = render(current)
    if args.check:
        if updated != current:
            print("README.md flag reference is out of date: run python -m tools.update_readme")
            return 1
        return 0
    path.write_text(updated, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
