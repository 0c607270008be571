"""Write docs/flags.md, the flag reference, from the commands' real argument parsers.

    python -m tools.update_docs          # rewrite docs/flags.md
    python -m tools.update_docs --check  # exit 1 if docs/flags.md is out of date (the tests run this)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLAGS_PAGE = ROOT / "docs" / "flags.md"
# The page's sections, in order: the name a user types -> the module that holds its get_args().
COMMANDS = {"train.py": "train", "predict.py": "predict", "adapt.py": "adapt", "export.py": "export",
            "phantom.py": "phantom", "tools/bench.py": "tools.bench", "tools/gpu_check.py": "tools.gpu_check"}
HEADER = """# Flags

Every command's `--help`, generated from its own parser by `python -m tools.update_docs`; a test
fails when this page is out of date. The topic pages say what the flags are for:
[data](data.md), [training](training.md), [prediction](prediction.md), [DICOM](dicom.md),
[adaptation](adaptation.md), [export](export.md), [GPU](gpu.md).
"""


def help_text(module_name: str, program: str) -> str:
    """The command's --help output at a fixed width, so the page does not depend on the terminal."""
    module = importlib.import_module(module_name)
    buffer = io.StringIO()
    saved_argv, saved_columns = sys.argv, os.environ.get("COLUMNS")
    sys.argv = [program, "--help"]  # argparse names the program after argv[0]
    os.environ["COLUMNS"] = "100"
    try:
        with contextlib.redirect_stdout(buffer), contextlib.suppress(SystemExit):
            module.get_args()
    finally:
        sys.argv = saved_argv
        if saved_columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved_columns
    return buffer.getvalue().rstrip()


def render() -> str:
    sections = [HEADER]
    for name, module_name in COMMANDS.items():
        sections.append(f"## {name}\n\n```text\n{help_text(module_name, Path(name).name)}\n```\n")
    return "\n".join(sections)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when docs/flags.md is stale")
    args = parser.parse_args(argv)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    page = render()
    if args.check:
        if not FLAGS_PAGE.is_file() or FLAGS_PAGE.read_text(encoding="utf-8") != page:
            print(f"{FLAGS_PAGE.relative_to(ROOT)} is out of date: run python -m tools.update_docs")
            return 1
        return 0
    FLAGS_PAGE.write_text(page, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
