"""The README and docs/ stay true: the flag reference is the parsers' own help, every relative
link and image resolves, and CI runs the README's test command."""

import re
import sys
from pathlib import Path

from tools import update_docs

REPO = Path(__file__).resolve().parents[1]
# [text](target) and ![alt](target); the target up to a space (a title) or the closing parenthesis
MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)[^)]*\)")


def broken_links(page: Path) -> list[str]:
    """Relative links and images of one markdown page that point at no file (anchors dropped)."""
    broken = []
    for target in MARKDOWN_LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # https:, mailto:, an anchor in the page itself
        path = target.split("#")[0]
        if not (page.parent / path).exists():
            broken.append(f"{page.name}: {target}")
    return broken


def test_flag_reference_matches_the_parsers(monkeypatch, capsys):
    """``python -m tools.update_docs --check`` in this process (sys.path and argv restored after)."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    code = update_docs.main(["--check"])
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err


def test_every_relative_link_and_image_resolves():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    assert len(pages) >= 9, [p.name for p in pages]  # the README and the topic pages
    assert [] == [link for page in pages for link in broken_links(page)]


def test_the_link_check_finds_a_broken_link_and_an_image(tmp_path):
    (tmp_path / "there.md").write_text("x")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.md) [ok](there.md#part) [web](https://example.org/x) [self](#top)\n"
                    "[gone](missing.md) ![figure](figures/none.png)\n")
    assert broken_links(page) == ["page.md: missing.md", "page.md: figures/none.png"]


def test_the_readme_is_a_front_door():
    """One screen of substance and links (issue: at most about 200 lines)."""
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 210, len(lines)


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- test-command -->\s*```bash\n(.*?)\n```", readme, re.S)
    assert match is not None, "README.md has no <!-- test-command --> block"
    command = match.group(1).strip()
    assert "pip install -r requirements.txt" in command and "pytest" in command
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert "<!-- test-command -->" in ci and 'bash -euo pipefail -c "$command"' in ci
