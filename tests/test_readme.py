"""The README stays true: its flag reference is the parsers' own help, and CI runs its test command."""

import importlib.util
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_flag_reference_matches_the_parsers(monkeypatch, capsys):
    """``python docs/update_readme.py --check``: its main() in this process (it imports each script
    and prints its --help at 100 columns, which it sets in the environment: restored afterwards)."""
    spec = importlib.util.spec_from_file_location("update_readme", REPO / "tools" / "update_readme.py")
    update_readme = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(update_readme)
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.setattr(sys, "argv", ["update_readme.py", "--check"])
    monkeypatch.setattr(sys, "path", list(sys.path))
    code = update_readme.main()
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- test-command -->\s*```bash\n(.*?)\n```", readme, re.S)
    assert match is not None, "README.md has no <!-- test-command --> block"
    command = match.group(1).strip()
    assert "pip install -r requirements.txt" in command and "pytest" in command
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert "<!-- test-command -->" in ci and 'bash -euo pipefail -c "$command"' in ci
