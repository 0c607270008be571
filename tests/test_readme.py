"""The README stays true: its flag reference is the parsers' own help, and CI runs its test command."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_flag_reference_matches_the_parsers():
    result = subprocess.run([sys.executable, "docs/update_readme.py", "--check"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- test-command -->\s*```bash\n(.*?)\n```", readme, re.S)
    assert match is not None, "README.md has no <!-- test-command --> block"
    command = match.group(1).strip()
    assert "pip install -r requirements.txt" in command and "pytest" in command
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert "<!-- test-command -->" in ci and 'bash -euo pipefail -c "$command"' in ci
